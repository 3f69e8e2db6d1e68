"""Packing efficiency: the share of real tokens in training windows, packed (megasynth.data.packed_dataset:
whole examples, best-fit decreasing) against one example per window padded to seq_len + 1.

    python bench/packing.py --prefix sft_out/data/train_alpaca sft_out/data/train_chat [--seq-len 256 512 1024]

The prefixes are what examples/sft/run.py writes (run it first, or pass any prefixes). Prints one row per
seq_len: examples, windows, efficiency of each, and the ratio (how many more real tokens a packed step holds).
Results go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megasynth.data.indexed import IndexedDataset  # noqa: E402
from megasynth.data.packed_dataset import best_fit_decreasing  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefix", nargs="+", default=["sft_out/data/train_alpaca", "sft_out/data/train_chat"],
                        help="dataset prefixes whose sequences are the examples (default: examples/sft's output)")
    parser.add_argument("--seq-len", type=int, nargs="+", default=[128, 256, 512, 1024, 2048],
                        help="window sizes to compare (each window holds seq_len + 1 tokens)")
    args = parser.parse_args(argv)
    lengths = np.concatenate([IndexedDataset(p).sequence_lengths.astype(np.int64) for p in args.prefix])
    lengths = lengths[lengths > 0]
    print(f"{lengths.size} examples from {', '.join(args.prefix)}: tokens per example mean {lengths.mean():.1f}, "
          f"median {np.median(lengths):.0f}, max {lengths.max()}")
    print(f"{'seq_len':>8} {'truncated':>9} {'windows (pad)':>13} {'windows (pack)':>14} {'pad eff.':>9} "
          f"{'pack eff.':>9} {'ratio':>6} {'pack time':>9}")
    for seq_len in args.seq_len:
        cap = seq_len + 1
        clipped = np.minimum(lengths, cap)
        started = time.perf_counter()
        _, starts = best_fit_decreasing(clipped, cap)
        seconds = time.perf_counter() - started
        packed_windows = starts.size - 1
        pad_eff = clipped.sum() / (lengths.size * cap)
        pack_eff = clipped.sum() / (packed_windows * cap)
        print(f"{seq_len:>8} {int((lengths > cap).sum()):>9} {lengths.size:>13} {packed_windows:>14} "
              f"{100 * pad_eff:>8.1f}% {100 * pack_eff:>8.1f}% {pack_eff / pad_eff:>5.1f}x {seconds * 1e3:>7.1f}ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
