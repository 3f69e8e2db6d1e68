"""GPT pretraining samples over an indexed dataset: fixed windows of seq_len + 1 tokens, Megatron's semantics.

    ds = GPTDataset(IndexedDataset("data/x"), seq_len=2048, num_samples=10_000, seed=1234, cache_dir="cache")
    ds[j]    # {"tokens": int64[seq_len + 1], "doc_ids": int32[seq_len + 1]} (+ "loss_mask" on masked prefixes)

The document order, the windows, the index arrays and their cache: docs/format.md ("Training samples").
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from megasynth.data.index_cache import cached_index, check_sample_args, index_key
from megasynth.data.indexed import IndexedDataset

# Bump when the index construction changes, so caches built by older code are never reused.
INDEX_FORMAT_VERSION = 1
_ARRAYS = ("doc_order", "sample_doc", "sample_offset", "shuffle")


def _rng(seed: int, *stream: int) -> np.random.Generator:
    # One independent, reproducible generator per purpose (epoch e's document order, the sample shuffle),
    # so changing the number of epochs never changes the permutation of an earlier epoch.
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, *stream])))


def compute_num_epochs(tokens_per_epoch: int, seq_len: int, num_samples: int) -> int:
    """The fewest passes whose tokens cover num_samples windows: E * tokens_per_epoch >= num_samples * seq_len + 1."""
    if tokens_per_epoch <= 0:
        raise ValueError("the selected documents hold no tokens: cannot build samples")
    needed = num_samples * seq_len + 1
    return -(-needed // tokens_per_epoch)


def build_sample_index(doc_lengths: np.ndarray, documents: np.ndarray, *, seq_len: int, num_samples: int,
                       seed: int) -> dict[str, np.ndarray]:
    """Build the index arrays (docs/format.md, "The index arrays and their cache") for documents with the given lengths.

    doc_lengths[k] is the length of document documents[k]. Vectorized: memory and time are O(E * D + N).
    """
    lengths = np.asarray(doc_lengths, dtype=np.int64)
    num_epochs = compute_num_epochs(int(lengths.sum()), seq_len, num_samples)
    perms = [_rng(seed, 0, e).permutation(documents.size) for e in range(num_epochs)]
    doc_order = np.concatenate([documents[p] for p in perms])
    order_lengths = np.concatenate([lengths[p] for p in perms])
    del perms
    ends = np.cumsum(order_lengths)  # stream position one past each document in doc_order
    starts = np.arange(num_samples, dtype=np.int64) * seq_len
    # The document holding stream position s is the first whose end exceeds s; side="right" also steps over
    # empty documents, whose end equals their start.
    sample_doc = np.searchsorted(ends, starts, side="right")
    sample_offset = starts - (ends[sample_doc] - order_lengths[sample_doc])
    shuffle = _rng(seed, 1).permutation(num_samples)
    return {
        "doc_order": doc_order.astype(np.int32),
        "sample_doc": sample_doc.astype(np.int64),
        "sample_offset": sample_offset.astype(np.int32),
        "shuffle": shuffle.astype(np.int64),
    }


class GPTDataset:
    """num_samples windows of seq_len + 1 tokens over `dataset` (or its `documents` subset), seeded and cached."""

    def __init__(self, dataset: IndexedDataset, *, seq_len: int, num_samples: int, seed: int,
                 cache_dir: str | os.PathLike | None = None, documents: np.ndarray | None = None, name: str = ""):
        check_sample_args(f"GPTDataset {name!r}", seq_len, num_samples, seed)
        self.dataset, self.name = dataset, name
        self.seq_len, self.num_samples, self.seed = int(seq_len), int(num_samples), int(seed)
        self.documents = self._check_documents(documents)
        doc_lengths = dataset.sequence_lengths[self.documents]
        self.tokens_per_epoch = int(doc_lengths.sum(dtype=np.int64))
        if self.tokens_per_epoch == 0:
            raise ValueError(f"GPTDataset {name!r}: the selected documents of {dataset.prefix} hold no tokens")
        self.num_epochs = compute_num_epochs(self.tokens_per_epoch, self.seq_len, self.num_samples)
        # Everything the index content depends on, and nothing else (no paths, no mtimes): a copied or renamed
        # prefix reuses its cache, a changed document selection or length gets a new one.
        self.cache_key = index_key(f"megasynth-gpt-index:{INDEX_FORMAT_VERSION}:{self.seq_len}:{self.num_samples}:"
                                   f"{self.seed}:", self.documents, doc_lengths)
        self.cache_path = Path(cache_dir) / f"{self.cache_key}.npz" if cache_dir is not None else None
        n, order_size = self.num_samples, self.num_epochs * self.documents.size
        index, self.loaded_from_cache = cached_index(
            self.cache_path, _ARRAYS, "sample-index",
            lambda ix: (ix["shuffle"].shape == ix["sample_doc"].shape == ix["sample_offset"].shape == (n,)
                        and ix["doc_order"].shape == (order_size,)),
            lambda: build_sample_index(doc_lengths, self.documents, seq_len=self.seq_len, num_samples=n,
                                       seed=self.seed),
            self._description)
        self.doc_order, self.sample_doc, self.sample_offset, self.shuffle = (index[k] for k in _ARRAYS)
        self._token_start = None  # token offset of each sequence in the .bin, computed on first read

    def _check_documents(self, documents) -> np.ndarray:
        n = len(self.dataset)
        if documents is None:
            return np.arange(n, dtype=np.int64)
        docs = np.asarray(documents)
        if docs.ndim != 1 or (docs.size and docs.dtype.kind not in "iu"):
            raise ValueError(f"GPTDataset {self.name!r}: documents must be a 1-D integer array, got {docs.dtype} {docs.shape}")
        docs = docs.astype(np.int64)
        if docs.size and (docs.min() < 0 or docs.max() >= n):
            raise ValueError(f"GPTDataset {self.name!r}: document ids must be in [0, {n}) for {self.dataset.prefix}")
        return docs

    def _description(self) -> str:
        return json.dumps({"name": self.name, "prefix": os.fspath(self.dataset.prefix), "seq_len": self.seq_len,
                           "num_samples": self.num_samples, "seed": self.seed, "num_epochs": self.num_epochs,
                           "num_documents": int(self.documents.size), "index_format_version": INDEX_FORMAT_VERSION})

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i) -> dict:
        if not -self.num_samples <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for GPTDataset {self.name!r} of {self.num_samples} samples")
        j = int(self.shuffle[i])
        pos, offset = int(self.sample_doc[j]), int(self.sample_offset[j])
        if self._token_start is None:
            self._token_start = self.dataset.sequence_pointers // self.dataset.dtype.itemsize
        data, lengths = self.dataset.tokens, self.dataset.sequence_lengths
        tokens = np.empty(self.seq_len + 1, dtype=np.int64)
        doc_ids = np.empty(self.seq_len + 1, dtype=np.int32)
        # A masked prefix (SFT / pair data read as a stream) carries its mask piece by piece with the tokens.
        masked = self.dataset.has_loss_mask
        loss_mask = np.empty(self.seq_len + 1, dtype=bool) if masked else None
        filled, segment = 0, 0
        while filled < tokens.size:
            doc = int(self.doc_order[pos])
            take = min(int(lengths[doc]) - offset, tokens.size - filled)
            if take > 0:  # empty documents contribute nothing and open no segment
                start = int(self._token_start[doc]) + offset
                tokens[filled : filled + take] = data[start : start + take]
                doc_ids[filled : filled + take] = segment
                if masked:
                    loss_mask[filled : filled + take] = self.dataset.loss_mask_slice(doc, offset, take)
                filled += take
                segment += 1
            pos, offset = pos + 1, 0
        if masked:
            return {"tokens": tokens, "doc_ids": doc_ids, "loss_mask": loss_mask}
        return {"tokens": tokens, "doc_ids": doc_ids}

    def __repr__(self) -> str:
        return (f"GPTDataset({self.name!r}: {self.num_samples} x {self.seq_len + 1} tokens over "
                f"{self.documents.size} documents of {self.dataset.prefix}, {self.num_epochs} epochs)")
