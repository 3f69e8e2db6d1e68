"""Shard files of a synthesis run (megasynth.synth.sbp.synthesize): one .npz per shard in the run's work directory.

    store = ShardStore(work_dir)
    if not store.has(k): store.write(k, shard)
    shard = store.read(k)

What a shard holds, atomicity and the fault points: docs/sbp.md, "How each stage works"."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megasynth.faults import fault_point
from megasynth.io import atomic_open

FAULT_ENV = "MEGASYNTH_FAULT_SYNTH_KILL_AFTER"


class ShardError(ValueError):
    """A damaged shard file; one line naming it."""


@dataclass
class Shard:
    """The synthetic documents of one shard, in sample order (empty outputs already dropped)."""

    tokens: np.ndarray  # every kept document's tokens, EOD included, concatenated
    lengths: np.ndarray  # int64 tokens per kept document
    samples: np.ndarray  # int64 sample index of each kept document (it names the document's random stream)
    seeds: np.ndarray  # int64 corpus document each kept document was prompted with
    requested: int  # samples in the shard
    empty: int  # samples whose output was empty (EOD first), dropped
    truncated: int  # kept documents that hit max_new_tokens before an EOD (an EOD is appended)
    out_of_vocab: int  # samples dropped for a token id the tokenizer does not have

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.size)


_COUNTS = ("requested", "empty", "truncated", "out_of_vocab")


class ShardStore:
    def __init__(self, work_dir: str | os.PathLike):
        self.path = Path(work_dir)

    def shard_path(self, k: int) -> Path:
        return self.path / f"shard_{k:06d}.npz"

    def has(self, k: int) -> bool:
        return self.shard_path(k).is_file()

    def write(self, k: int, shard: Shard) -> None:
        with atomic_open(self.shard_path(k), "wb") as f:
            np.savez(f, tokens=shard.tokens, lengths=shard.lengths, samples=shard.samples, seeds=shard.seeds,
                     counts=np.array([getattr(shard, c) for c in _COUNTS], np.int64))
        fault_point(FAULT_ENV, f"shard:{k}")

    def read(self, k: int) -> Shard:
        path = self.shard_path(k)
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {name: z[name] for name in ("tokens", "lengths", "samples", "seeds", "counts")}
        except (OSError, ValueError, KeyError) as e:
            raise ShardError(f"{path}: damaged shard ({e}); remove it and run again") from None
        n = arrays["lengths"].size
        if (int(arrays["lengths"].sum()) != arrays["tokens"].size or arrays["samples"].size != n
                or arrays["seeds"].size != n or arrays["counts"].size != len(_COUNTS)):
            raise ShardError(f"{path}: damaged shard (inconsistent array sizes); remove it and run again")
        counts = dict(zip(_COUNTS, (int(c) for c in arrays["counts"])))
        return Shard(arrays["tokens"], arrays["lengths"], arrays["samples"], arrays["seeds"], **counts)
