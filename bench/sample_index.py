"""Benchmark the indexed writer, the GPT sample index (build, cache load) and random sample reads.

Writes a prefix of --tokens random uint16 ids in documents of lognormal lengths (mean about --mean-doc-len),
then measures, for --seq-len and enough samples for 1 epoch and for 3 epochs: index build time, cache
load time, and random-sample read throughput over --reads random indices. Prints a Markdown table.

    python bench/sample_index.py                         # 1B tokens (2 GB) in a temp dir, removed after
    python bench/sample_index.py --tokens 200_000_000 --dir /tmp/bench --keep
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np
from tqdm import tqdm

from megasynth.data.gpt_dataset import GPTDataset
from megasynth.data.indexed import IndexedDataset, IndexedDatasetWriter


def write_random_prefix(prefix: str, num_tokens: int, mean_doc_len: float, seed: int) -> float:
    """Write about num_tokens random uint16 ids in lognormal-length documents; return seconds spent."""
    rng = np.random.default_rng(seed)
    sigma = 1.0
    mu = np.log(mean_doc_len) - sigma**2 / 2  # lognormal mean = exp(mu + sigma^2 / 2)
    chunk_tokens = 1 << 25  # 32M tokens (64 MB) per vectorized write
    start = time.perf_counter()
    with IndexedDatasetWriter(prefix, np.uint16, metadata={"created_by": "bench/sample_index.py"}) as w, \
            tqdm(total=num_tokens, unit="tok", unit_scale=True, desc="write") as bar:
        written = 0
        while written < num_tokens:
            want = min(chunk_tokens, num_tokens - written)
            lengths = np.maximum(1, rng.lognormal(mu, sigma, size=int(2 * want / mean_doc_len) + 16)).astype(np.int64)
            cut = int(np.searchsorted(np.cumsum(lengths), want))
            lengths = lengths[: cut + 1]
            lengths[-1] -= int(lengths.sum()) - want  # make this chunk exactly `want` tokens
            lengths = lengths[lengths > 0]
            tokens = rng.integers(0, 65536, size=want, dtype=np.uint16)
            w.add_documents(np.split(tokens, np.cumsum(lengths)[:-1]))
            written += want
            bar.update(want)
    return time.perf_counter() - start


def measure(ds: IndexedDataset, seq_len: int, num_samples: int, cache_dir: str, reads: int, seed: int) -> dict:
    t0 = time.perf_counter()
    built = GPTDataset(ds, seq_len=seq_len, num_samples=num_samples, seed=seed, cache_dir=cache_dir)
    build_s = time.perf_counter() - t0
    assert not built.loaded_from_cache
    t0 = time.perf_counter()
    loaded = GPTDataset(ds, seq_len=seq_len, num_samples=num_samples, seed=seed, cache_dir=cache_dir)
    load_s = time.perf_counter() - t0
    assert loaded.loaded_from_cache
    idx = np.random.default_rng(seed + 1).integers(0, num_samples, size=reads)
    t0 = time.perf_counter()
    for i in idx:
        loaded[int(i)]
    read_s = time.perf_counter() - t0
    return {"samples": num_samples, "epochs": built.num_epochs, "build_s": build_s, "load_s": load_s,
            "samples_per_s": reads / read_s, "tokens_per_s": reads * (seq_len + 1) / read_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=lambda s: int(s.replace("_", "")), default=1_000_000_000,
                        help="tokens to write (default 1_000_000_000, 2 GB as uint16)")
    parser.add_argument("--dir", help="where to write the prefix and the index cache (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the written files (default: remove them)")
    parser.add_argument("--seq-len", type=int, default=4096, help="sample length in tokens (default 4096)")
    parser.add_argument("--mean-doc-len", type=float, default=1000.0, help="mean document length (default 1000)")
    parser.add_argument("--reads", type=int, default=100_000, help="random samples read per setting (default 100000)")
    parser.add_argument("--seed", type=int, default=1234, help="seed for data, index and reads (default 1234)")
    args = parser.parse_args(argv)

    work = args.dir or tempfile.mkdtemp(prefix="megasynth-bench-")
    os.makedirs(work, exist_ok=True)
    prefix = os.path.join(work, "random")
    try:
        write_s = write_random_prefix(prefix, args.tokens, args.mean_doc_len, args.seed)
        t0 = time.perf_counter()
        ds = IndexedDataset(prefix)
        open_s = time.perf_counter() - t0
        per_epoch = (ds.num_tokens - 1) // args.seq_len
        rows = [measure(ds, args.seq_len, n, os.path.join(work, "cache"), args.reads, args.seed)
                for n in (per_epoch, 3 * per_epoch)]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\n{ds.num_tokens:,} tokens in {len(ds):,} documents (uint16); seq_len {args.seq_len}; "
          f"{args.reads:,} random reads per row")
    print(f"write: {write_s:.1f} s ({ds.num_tokens / write_s / 1e6:.0f}M tokens/s); open + validate: {open_s * 1e3:.0f} ms\n")
    print("| samples | epochs | index build (s) | cache load (s) | random reads (samples/s) | random reads (Mtokens/s) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['samples']:,} | {r['epochs']} | {r['build_s']:.3f} | {r['load_s']:.4f} | "
              f"{r['samples_per_s']:,.0f} | {r['tokens_per_s'] / 1e6:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
