"""Benchmark checkpoint checksums: xxh3_64 (what megasynth records) against sha256, on a synthetic shard file.

A 1B-parameter run's checkpoint is ~12 GB (fp32 weights 4 GB + AdamW's two fp32 moments 8 GB). Writing that
much just to time it is wasteful, so this hashes a --size-gb file (default 2 GB) and extrapolates linearly
(hashing streams the file in fixed chunks, so its time is linear in the bytes). Prints GB/s and the projected
seconds for --params parameters, for a plain read of the file, xxh3_64 through the same function the save and
load paths use (megasynth.checkpoint_verify.file_checksum) and sha256 (hashlib), each the best of --repeat runs.

    python bench/checkpoint_checksum.py                     # 2 GB file in a temp dir, removed after
    python bench/checkpoint_checksum.py --size-gb 4 --dir /scratch --params 8e9

The file is read back from the page cache right after it is written (as a checkpoint is verified at save time),
so these are hashing costs, not disk costs; a cold load from disk is bounded by the disk's read rate instead.
Under N ranks each rank hashes 1/N of the files, so the wall time divides by up to N.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import tempfile
import time

import numpy as np

from megasynth.checkpoint_verify import file_checksum

CHUNK = 8 << 20


def write_random_file(path: str, size: int) -> None:
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 64 << 20)
            f.write(rng.integers(0, 256, size=n, dtype=np.uint8).tobytes())
            left -= n


def read_only(path: str) -> None:
    buf = bytearray(CHUNK)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def best_seconds(fn, path: str, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn(path)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gb", type=float, default=2.0, help="size of the synthetic file in GB (1e9 bytes)")
    p.add_argument("--params", type=float, default=1e9, help="model parameters to project for (default 1e9)")
    p.add_argument("--bytes-per-param", type=float, default=12.0,
                   help="checkpoint bytes per parameter: 4 (fp32 weights) + 8 (AdamW moments) = 12")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per method; the best is reported")
    p.add_argument("--dir", default=None, help="where to write the file (default: a temp dir, removed after)")
    p.add_argument("--keep", action="store_true", help="keep the file")
    args = p.parse_args()

    size = int(args.size_gb * 1e9)
    ckpt_bytes = args.params * args.bytes_per_param
    root = args.dir or tempfile.mkdtemp(prefix="ckpt_checksum_")
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, "__0_0.distcp")
    try:
        write_random_file(path, size)
        read_only(path)  # warm the page cache once, so every method sees the same state
        rows = [("read only", read_only), ("xxh3_64 (megasynth)", file_checksum), ("sha256 (hashlib)", sha256_file)]
        print(f"file: {size / 1e9:.2f} GB; projection: {args.params:.3g} params x {args.bytes_per_param:g} B = "
              f"{ckpt_bytes / 1e9:.1f} GB (linear extrapolation); best of {args.repeat}\n")
        print("| method | GB/s | seconds for the file | projected seconds for the checkpoint |")
        print("|---|---|---|---|")
        for name, fn in rows:
            seconds = best_seconds(fn, path, args.repeat)
            rate = size / seconds
            print(f"| {name} | {rate / 1e9:.2f} | {seconds:.2f} | {ckpt_bytes / rate:.1f} |")
    finally:
        if not args.keep:
            if args.dir:
                os.unlink(path)
            else:
                shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
