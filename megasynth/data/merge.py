"""Operations over whole prefixes: concatenating prefixes into one, and summarising their document lengths.

    from megasynth.data.merge import merge_datasets, length_summary, length_histogram
    sidecar = merge_datasets(["data/a", "data/b"], "data/ab")         # streams; returns the new sidecar
    length_summary(IndexedDataset("data/ab").sequence_lengths)         # {"count", "min", "mean", ..., "max"}

tools/merge_datasets.py and tools/inspect_dataset.py are the command-line fronts; the format itself (writer,
reader) is megasynth/data/indexed.py, and the sidecar keys merging writes are listed in docs/format.md.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from megasynth.cli import overlap_refusal, prefix
from megasynth.data.indexed import (IndexedDataset, IndexedDatasetError, IndexedDatasetWriter, check_not_empty,
    check_output_free, idx_path, sidecar_path)
from megasynth.data.layout import tokenizer_hash

# One copy run is at most this many sequences and tokens (or a single longer sequence): bounds merge memory
# (8 MiB of int64 lengths, 32 MiB of uint16 tokens) whatever the inputs' sizes.
_MERGE_SEQUENCES = 1 << 20
_MERGE_TOKENS = 16 << 20


def _check_compatible(datasets: list[IndexedDataset]) -> None:
    """Same dtype everywhere; the same tokenizer hash, vocab size and EOD id wherever sidecars record them."""
    first = datasets[0]
    for ds in datasets[1:]:
        if ds.dtype != first.dtype:
            raise IndexedDatasetError(f"{idx_path(ds.prefix)}: dtype {ds.dtype} differs from {first.prefix}'s {first.dtype}")
        for key, value_of in (("tokenizer hash", tokenizer_hash),
                              ("vocab_size", lambda m: (m or {}).get("vocab_size")),
                              ("eod_id", lambda m: (m or {}).get("eod_id"))):
            a, b = value_of(first.metadata), value_of(ds.metadata)
            if a is not None and b is not None and a != b:
                raise IndexedDatasetError(f"{sidecar_path(ds.prefix)}: {key} {b!r} differs from {first.prefix}'s {a!r}")
    for ds in datasets:
        if not np.array_equal(ds.document_indices, np.arange(len(ds) + 1)):
            raise IndexedDatasetError(
                f"{idx_path(ds.prefix)}: documents of several sequences cannot be merged (one sequence per document expected)"
            )


def _check_masks(datasets: list[IndexedDataset], unmasked_as_all_true: bool) -> bool:
    """Whether the output carries a loss mask: when any input has one. Mixing is refused unless the unmasked
    inputs are to count as all-True (every token a target, as in pretraining data)."""
    masked = [ds for ds in datasets if ds.has_loss_mask]
    unmasked = [ds for ds in datasets if not ds.has_loss_mask]
    if masked and unmasked and not unmasked_as_all_true:
        raise IndexedDatasetError(
            f"{unmasked[0].prefix}: has no loss mask but {masked[0].prefix} has one; pass --unmasked-as-all-true "
            "(unmasked_as_all_true=True) to treat every token of the unmasked inputs as a target")
    return bool(masked)


def _merged_metadata(datasets: list[IndexedDataset], with_mask: bool) -> dict:
    metadata: dict = {"created_by": "merge_datasets"}
    for key in ("tokenizer", "vocab_size", "eod_id"):
        found = [ds.metadata[key] for ds in datasets if ds.metadata and key in ds.metadata]
        if found:
            metadata[key] = found[0]
    metadata["inputs"] = [
        {"prefix": os.fspath(ds.prefix), "num_documents": len(ds), "num_tokens": ds.num_tokens,
         **({"loss_mask": "file" if ds.has_loss_mask else "all-true"} if with_mask else {})}
        for ds in datasets
    ]
    sources = [s for ds in datasets for s in (ds.metadata or {}).get("sources", [])]
    if sources:
        metadata["sources"] = sources
    return metadata


def _copy_runs(ds: IndexedDataset):
    """(first token's stream offset, tokens, lengths) of ds in runs of whole sequences: a view into the memory
    map plus an int64 slice."""
    lengths = ds.sequence_lengths
    start = 0
    while start < len(ds):
        ln = lengths[start : min(start + _MERGE_SEQUENCES, len(ds))].astype(np.int64)
        ends = np.cumsum(ln)
        # As many sequences as fit in _MERGE_TOKENS, but at least one (a longer sequence goes alone).
        take = max(1, int(np.searchsorted(ends, max(int(ends[0]), _MERGE_TOKENS), side="right")))
        ln = ln[:take]
        t0 = int(ds.sequence_pointers[start]) // ds.dtype.itemsize
        yield t0, ds.tokens[t0 : t0 + int(ends[take - 1])], ln
        start += take


def append_dataset(writer: IndexedDatasetWriter, ds: IndexedDataset, *, with_mask: bool = False,
                   on_bytes=None) -> None:
    """Stream every sequence of `ds` into `writer` (its loss mask too, all-true when it has none and `with_mask`);
    `on_bytes(n)` after each run of n token bytes."""
    for t0, tokens, lengths in _copy_runs(ds):
        # add_flat checks the ids (a foreign or corrupt input can hold one outside the dtype or the vocabulary:
        # that stops the merge instead of propagating) and tracks the largest.
        mask = None
        if with_mask:
            mask = ds.loss_mask_tokens(t0, tokens.size) if ds.has_loss_mask else np.ones(tokens.size, dtype=np.bool_)
        writer.add_flat(tokens, lengths, loss_mask=mask)
        if on_bytes is not None:
            on_bytes(tokens.nbytes)


def merge_datasets(prefixes: Sequence, output_prefix, *, progress: bool = False, overwrite: bool = False,
                   allow_empty: bool = False, unmasked_as_all_true: bool = False) -> dict:
    """Concatenate prefixes (in order) into output_prefix, streaming; return the new sidecar. What must agree,
    how loss masks are carried and the sidecar: docs/format.md ("Written by merging"). An output that is, holds
    or sits inside an input is refused (ValueError, megasynth.cli.overlap_refusal), an existing output unless
    `overwrite` (OutputExistsError), an output of no documents unless `allow_empty` (EmptyOutputError)."""
    if not prefixes:
        raise ValueError("merge_datasets needs at least one input prefix")
    refusal = overlap_refusal({"output_prefix": prefix(output_prefix)}, {"prefixes": [prefix(p) for p in prefixes]})
    if refusal:  # the rule every tool applies (megasynth.cli): resolved paths, a prefix standing for its files
        raise ValueError(refusal)
    datasets = [IndexedDataset(p) for p in prefixes]
    _check_compatible(datasets)
    with_mask = _check_masks(datasets, unmasked_as_all_true)
    check_output_free(output_prefix, overwrite=overwrite)
    check_not_empty(output_prefix, sum(len(ds) for ds in datasets), allow_empty=allow_empty)

    bar = tqdm(total=sum(ds.num_tokens * ds.dtype.itemsize for ds in datasets), unit="B", unit_scale=True,
               desc="merge", disable=not progress)
    try:
        with IndexedDatasetWriter(output_prefix, datasets[0].dtype, metadata=_merged_metadata(datasets, with_mask),
                                  loss_mask=with_mask) as writer:
            for ds in datasets:
                append_dataset(writer, ds, with_mask=with_mask, on_bytes=bar.update)
            return writer.finalize()
    finally:
        bar.close()


def length_summary(lengths: np.ndarray) -> dict:
    """min / mean / median / p99 / max of document lengths (all 0 for an empty dataset)."""
    ln = np.asarray(lengths, dtype=np.int64)
    if ln.size == 0:
        return {"count": 0, "min": 0, "mean": 0.0, "median": 0.0, "p99": 0.0, "max": 0}
    return {"count": int(ln.size), "min": int(ln.min()), "mean": float(ln.mean()), "median": float(np.median(ln)),
            "p99": float(np.percentile(ln, 99)), "max": int(ln.max())}


def length_histogram(lengths: np.ndarray) -> list[tuple[int, int, int]]:
    """Counts of lengths in power-of-two buckets: [(0, 1, n0), (1, 2, n1), (2, 4, n2), ...], lo inclusive, hi exclusive."""
    ln = np.asarray(lengths, dtype=np.int64)
    if ln.size == 0:
        return []
    # Bucket 0 holds length 0, bucket k >= 1 holds [2**(k-1), 2**k): k is the bit length, which frexp's exponent
    # gives exactly for integers below 2**53.
    counts = np.bincount(np.frexp(ln.astype(np.float64))[1])
    return [(0 if k == 0 else 2 ** (k - 1), 1 if k == 0 else 2**k, int(c)) for k, c in enumerate(counts)]
