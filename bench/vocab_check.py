"""What the vocabulary check costs: the largest token id of a large prefix, scanned and from the sidecar.

    python bench/vocab_check.py                              # 1B tokens, uint16 then int32 (needs ~4 GB of disk)
    python bench/vocab_check.py --tokens 200_000_000 --dtypes uint16

For each dtype it writes a synthetic prefix (documents of --doc-len tokens, ids below --vocab) with
IndexedDatasetWriter, then times:
  write            the writer, which tracks the largest id of every batch it is given (add_flat)
  open+sidecar     IndexedDataset(prefix) with the sidecar: .idx validation and sha256, max_token_id check
  scan (no cache)  the same prefix without its sidecar (a Megatron prefix): max_token_id scans the .bin
  cached           reopening it: max_token_id comes from the cache file
The scan reads the memory-mapped .bin, so the numbers are for a file in the page cache (just written) unless
the machine has less memory than the file. One prefix at a time is on disk; it is removed afterwards.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from megasynth.data.indexed import IndexedDataset, IndexedDatasetWriter, sidecar_path
from megasynth.data.prefix import max_id_cache_path


def write_prefix(prefix: Path, dtype: np.dtype, tokens: int, doc_len: int, vocab: int) -> tuple[float, int]:
    """A prefix of `tokens` ids (a repeating ramp below vocab, one planted vocab - 1); return (seconds, max id)."""
    block_docs = max(1, (16 << 20) // doc_len)
    block = np.arange(block_docs * doc_len, dtype=np.int64) % (vocab - 1)
    block = block.astype(dtype)
    started = time.perf_counter()
    with IndexedDatasetWriter(prefix, dtype, metadata={"vocab_size": vocab}) as w:
        done = 0
        while done < tokens:
            n = min(block.size, tokens - done)
            chunk = block[:n].copy() if done == 0 else block[:n]
            if done == 0:
                chunk[n // 2] = vocab - 1  # the one largest id, somewhere inside
            lengths = np.full(n // doc_len, doc_len, dtype=np.int64)
            if n % doc_len:
                lengths = np.append(lengths, n % doc_len)
            w.add_flat(chunk, lengths)
            done += n
    return time.perf_counter() - started, vocab - 1


def timed(fn):
    started = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - started


def bench_one(work: Path, dtype: np.dtype, tokens: int, doc_len: int, vocab: int) -> dict:
    prefix = work / f"synthetic_{dtype.name}"
    write_s, expected = write_prefix(prefix, dtype, tokens, doc_len, vocab)
    with_sidecar, open_s = timed(lambda: IndexedDataset(prefix))
    assert with_sidecar.max_token_id == expected
    os.remove(sidecar_path(prefix))  # now a Megatron prefix: nothing records the largest id
    plain, open_plain_s = timed(lambda: IndexedDataset(prefix))
    scanned, scan_s = timed(lambda: plain.max_token_id)
    assert scanned == expected and max_id_cache_path(prefix).is_file()
    cached, cached_s = timed(lambda: IndexedDataset(prefix).max_token_id)
    assert cached == expected
    size = prefix.with_suffix(".bin").stat().st_size
    for p in work.iterdir():
        p.unlink()
    return {"dtype": dtype.name, "tokens": tokens, "bin_gb": size / 1e9, "write_s": write_s, "open_sidecar_s": open_s,
            "open_plain_s": open_plain_s, "scan_s": scan_s, "cached_s": cached_s}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=lambda s: int(float(s.replace("_", ""))), default=1_000_000_000,
                   help="tokens in the synthetic prefix (default 1e9; 1e9 int32 tokens take 4 GB of disk)")
    p.add_argument("--dtypes", nargs="+", default=["uint16", "int32"], choices=["uint16", "int32"],
                   help="token dtypes to measure, one prefix each (default: uint16 int32)")
    p.add_argument("--doc-len", type=int, default=1000, help="tokens per synthetic document (default 1000)")
    p.add_argument("--vocab", type=int, default=50_000, help="vocabulary size the ids stay below (default 50000)")
    p.add_argument("--workdir", help="where the prefix is written (default: a temp dir, removed after)")
    args = p.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-vocab-check-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        rows = [bench_one(work, np.dtype(d), args.tokens, args.doc_len, args.vocab) for d in args.dtypes]
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nlargest token id of a {args.tokens:,}-token prefix ({args.doc_len}-token documents, page cache warm)")
    print(f"{'dtype':>7} {'.bin GB':>8} {'write s':>8} {'open+sidecar s':>15} {'scan s':>8} {'scan tokens/s':>14} "
          f"{'scan GB/s':>10} {'cached s':>9}")
    for r in rows:
        print(f"{r['dtype']:>7} {r['bin_gb']:8.2f} {r['write_s']:8.1f} {r['open_sidecar_s']:15.3f} {r['scan_s']:8.2f} "
              f"{r['tokens'] / r['scan_s']:14.3g} {r['bin_gb'] / r['scan_s']:10.2f} {r['cached_s']:9.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
