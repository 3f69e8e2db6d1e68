"""Packed samples for instruction / pair data: whole examples placed into windows of seq_len + 1 tokens.

    ds = PackedDataset(IndexedDataset("data/sft"), seq_len=2048, num_samples=10_000, seed=1234, cache_dir="cache")
    ds.efficiency       # share of real tokens in the windows of one epoch

The packing, its cached index and the items: docs/sft.md ("Packing").
"""

from __future__ import annotations

import bisect
import json
import os
from pathlib import Path

import numpy as np

from megasynth.data.gpt_dataset import _rng
from megasynth.data.index_cache import cached_index, check_sample_args, index_key
from megasynth.data.indexed import IndexedDataset

# Bump when the packing changes, so caches built by older code are never reused.
PACK_FORMAT_VERSION = 1
_ARRAYS = ("window_docs", "window_start", "shuffle")


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack items of the given lengths (each 1..capacity) into bins of `capacity`; (items by bin, CSR starts).

    Items are taken longest first (a stable sort, so equal lengths keep their input order); each goes to the
    open bin with the least free space that still fits it, else opens a bin. Items longer than half the
    capacity never share a bin with each other, so they open their bins in one vectorized step; only the
    rest go through the loop over a sorted list of the distinct free spaces (at most `capacity` of them).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and (lengths.min() < 1 or lengths.max() > capacity):
        raise ValueError(f"best_fit_decreasing: lengths must be in [1, {capacity}]")
    order = np.argsort(-lengths, kind="stable")
    big = int((lengths > capacity // 2).sum())
    bin_of = np.empty(lengths.size, dtype=np.int64)
    bin_of[order[:big]] = np.arange(big)
    free_lists: dict[int, list[int]] = {}  # free space -> bins with exactly that much (a stack)
    free_sorted: list[int] = []  # the distinct free spaces with a bin, ascending

    def push(b: int, space: int) -> None:
        if space:
            if space not in free_lists:
                free_lists[space] = []
                bisect.insort(free_sorted, space)
            free_lists[space].append(b)

    for b, space in enumerate((capacity - lengths[order[:big]]).tolist()):
        push(b, space)
    num_bins = big
    small = order[big:]
    for item, length in zip(small.tolist(), lengths[small].tolist()):
        k = bisect.bisect_left(free_sorted, length)
        if k == len(free_sorted):
            b, space = num_bins, capacity
            num_bins += 1
        else:
            space = free_sorted[k]
            stack = free_lists[space]
            b = stack.pop()
            if not stack:
                del free_lists[space]
                free_sorted.pop(k)
        bin_of[item] = b
        push(b, space - length)
    # Items grouped by bin; within a bin in packing order (longest first).
    rank = np.empty(lengths.size, dtype=np.int64)
    rank[order] = np.arange(lengths.size)
    by_bin = np.lexsort((rank, bin_of))
    starts = np.zeros(num_bins + 1, dtype=np.int64)
    np.cumsum(np.bincount(bin_of, minlength=num_bins), out=starts[1:])
    return by_bin, starts


def build_pack_index(doc_lengths: np.ndarray, documents: np.ndarray, *, seq_len: int, num_samples: int,
                     seed: int) -> dict[str, np.ndarray]:
    """The index arrays (docs/sft.md, "Packing") for the (non-empty) documents with the given lengths."""
    capacity = seq_len + 1
    clipped = np.minimum(np.asarray(doc_lengths, dtype=np.int64), capacity)
    docs_out, starts_out, offset, windows = [], [np.zeros(1, np.int64)], 0, None
    epoch = 0
    while windows is None or epoch * windows < num_samples:
        perm = _rng(seed, 0, epoch).permutation(documents.size)
        by_bin, starts = best_fit_decreasing(clipped[perm], capacity)
        windows = starts.size - 1
        # Windows of this epoch in a seeded random order (CSR re-gathered in that order).
        win_order = _rng(seed, 2, epoch).permutation(windows)
        sizes = np.diff(starts)[win_order]
        new_starts = np.cumsum(sizes) - sizes
        gather = np.arange(sizes.sum()) + np.repeat(starts[win_order] - new_starts, sizes)
        docs_out.append(documents[perm[by_bin[gather]]])
        starts_out.append(np.cumsum(sizes) + offset)
        offset += int(sizes.sum())
        epoch += 1
    shuffle = _rng(seed, 1).permutation(num_samples)
    return {"window_docs": np.concatenate(docs_out).astype(np.int32),
            "window_start": np.concatenate(starts_out).astype(np.int64),
            "shuffle": shuffle.astype(np.int64)}


class PackedDataset:
    """num_samples packed windows of seq_len + 1 tokens over `dataset`'s examples, seeded and cached."""

    def __init__(self, dataset: IndexedDataset, *, seq_len: int, num_samples: int, seed: int,
                 cache_dir: str | os.PathLike | None = None, name: str = ""):
        check_sample_args(f"PackedDataset {name!r}", seq_len, num_samples, seed)
        self.dataset, self.name = dataset, name
        self.seq_len, self.num_samples, self.seed = int(seq_len), int(num_samples), int(seed)
        capacity = self.seq_len + 1
        lengths = dataset.sequence_lengths.astype(np.int64)
        self.documents = np.flatnonzero(lengths > 0).astype(np.int64)  # empty examples hold nothing to pack
        lengths = lengths[lengths > 0]
        if self.documents.size == 0:
            raise ValueError(f"PackedDataset {name!r}: the selected examples of {dataset.prefix} hold no tokens")
        self.has_loss_mask = dataset.has_loss_mask
        self.pad_id = int((dataset.metadata or {}).get("eod_id", 0) or 0)
        # Per epoch: examples cut to the window, and the share of window tokens that are real.
        self.truncated = int((lengths > capacity).sum())
        self.truncated_tokens = int((lengths - capacity).clip(min=0).sum())
        self.real_tokens_per_epoch = int(np.minimum(lengths, capacity).sum())

        self.cache_key = index_key(f"megasynth-pack-index:{PACK_FORMAT_VERSION}:{self.seq_len}:{self.num_samples}:"
                                   f"{self.seed}:", self.documents, lengths)
        self.cache_path = Path(cache_dir) / f"pack_{self.cache_key}.npz" if cache_dir is not None else None
        index, self.loaded_from_cache = cached_index(
            self.cache_path, _ARRAYS, "pack-index", self._fits,
            lambda: build_pack_index(lengths, self.documents, seq_len=self.seq_len, num_samples=self.num_samples,
                                     seed=self.seed),
            self._description)
        self.window_docs, self.window_start, self.shuffle = (index[k] for k in _ARRAYS)
        num_windows = self.window_start.size - 1
        self.num_epochs = int(self.window_docs.size // self.documents.size)
        self.windows_per_epoch = num_windows // self.num_epochs
        self.efficiency = self.real_tokens_per_epoch / (self.windows_per_epoch * capacity)
        self._token_start = None

    def _description(self) -> str:
        return json.dumps({"name": self.name, "prefix": os.fspath(self.dataset.prefix), "packing": "pack",
                           "seq_len": self.seq_len, "num_samples": self.num_samples, "seed": self.seed,
                           "num_documents": int(self.documents.size), "pack_format_version": PACK_FORMAT_VERSION})

    def _fits(self, index: dict[str, np.ndarray]) -> bool:
        windows = index["window_start"].size - 1
        return (index["shuffle"].shape == (self.num_samples,) and windows >= self.num_samples
                and index["window_start"][-1] == index["window_docs"].size
                and not index["window_docs"].size % self.documents.size)

    def summary(self) -> str:
        """One line for the training log: windows, packing efficiency, truncated examples."""
        trunc = (f"; {self.truncated} of {self.documents.size} examples longer than the window were truncated "
                 f"({self.truncated_tokens:,} tokens dropped per epoch)") if self.truncated else ""
        return (f"packed {self.name or self.dataset.prefix}: {self.documents.size} examples into "
                f"{self.windows_per_epoch} windows of {self.seq_len + 1} tokens per epoch, efficiency "
                f"{100 * self.efficiency:.1f}% real tokens{trunc}")

    def __len__(self) -> int:
        return self.num_samples

    def window_examples(self, i: int) -> np.ndarray:
        """The example ids packed into sample i, in window order."""
        w = int(self.shuffle[i])
        return self.window_docs[self.window_start[w] : self.window_start[w + 1]]

    def __getitem__(self, i) -> dict:
        if not -self.num_samples <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for PackedDataset {self.name!r} of {self.num_samples} samples")
        if self._token_start is None:
            self._token_start = self.dataset.sequence_pointers // self.dataset.dtype.itemsize
        size = self.seq_len + 1
        tokens = np.full(size, self.pad_id, dtype=np.int64)
        doc_ids = np.empty(size, dtype=np.int32)
        loss_mask = np.zeros(size, dtype=bool)
        filled = 0
        examples = self.window_examples(i)
        for segment, doc in enumerate(examples.tolist()):
            take = min(int(self.dataset.sequence_lengths[doc]), size)
            start = int(self._token_start[doc])
            tokens[filled : filled + take] = self.dataset.tokens[start : start + take]
            doc_ids[filled : filled + take] = segment
            if self.has_loss_mask:
                loss_mask[filled : filled + take] = self.dataset.loss_mask_slice(doc, 0, take)
            else:
                loss_mask[filled : filled + take] = True
            loss_mask[filled] = False  # an example's first token has no predecessor in its segment
            filled += take
        doc_ids[filled:] = len(examples)  # padding: a segment of its own, never a target
        return {"tokens": tokens, "doc_ids": doc_ids, "loss_mask": loss_mask}

    def __repr__(self) -> str:
        return (f"PackedDataset({self.name!r}: {self.num_samples} x {self.seq_len + 1} tokens over "
                f"{self.documents.size} examples of {self.dataset.prefix}, {self.num_epochs} epochs, "
                f"efficiency {self.efficiency:.3f})")
