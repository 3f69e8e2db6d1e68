"""SBP stage 3: a pair table and its corpus -> a loss-masked prefix for tuning the synthesizer on p(target | seed).

    summary = make_pair_dataset("runs/pairs.parquet", "data/real", "data/pairs", max_seed_tokens=512)

The layout (seed, separator, target, EOD; loss on the target), truncation and errors: docs/sbp.md, "How each
stage works"."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from megasynth.chat import PAIR_SEPARATOR
from megasynth.cli import file
from megasynth.cli import prefix as prefix_spec
from megasynth.data.indexed import (
    IndexedDataset,
    IndexedDatasetWriter,
    check_not_empty,
    smallest_token_dtype,
)
from megasynth.data.prefix import check_output_prefix
from megasynth.io import file_sha256
from megasynth.synth.corpus import (
    CorpusError,
    check_table_exists,
    document_bodies,
    pair_separator_id,
    prefix_tokenizer,
    read_index_columns,
)

PAIR_COLUMNS = ("seed", "target")
_ROWS_PER_BATCH = 1 << 16  # pairs gathered per vectorised step: bounds memory whatever the table's size


class PairDatasetError(CorpusError):
    """Bad input for a pair dataset; one line naming the file and the problem."""


# -- the pair table ----------------------------------------------------------------------------------------------------
def read_pair_table(path: str | os.PathLike, corpus: IndexedDataset) -> tuple[np.ndarray, np.ndarray]:
    """(seed, target) int64 arrays of a PAIRS.parquet, every index checked against the corpus (CorpusError)."""
    cols = read_index_columns(path, {name: (len(corpus), corpus.prefix) for name in PAIR_COLUMNS})
    return cols["seed"], cols["target"]


def check_pairs_sidecar(pairs_path: str | os.PathLike, corpus: IndexedDataset, pairs_sha256: str) -> None:
    """PAIRS.json (megasynth.synth.sbp.pairs), when present beside the table, must describe this table and this corpus:
    its recorded parquet sha256, the corpus .idx sha256 (recorded when build_pairs was given the corpus) and the
    number of embedded documents."""
    side = Path(pairs_path).with_suffix(".json")
    if not side.is_file():
        return
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PairDatasetError(f"{side}: unreadable ({e})") from None
    if not isinstance(meta, dict):
        raise PairDatasetError(f"{side}: not a JSON object")
    recorded = _get(meta, "files", "parquet", "sha256")
    if isinstance(recorded, str) and recorded != pairs_sha256:
        raise PairDatasetError(f"{side}: describes another pair table (sha256 {recorded[:12]}..., {pairs_path} has "
                               f"{pairs_sha256[:12]}...)")
    recorded = _get(meta, "corpus", "idx_sha256")
    if isinstance(recorded, str) and recorded != corpus.idx_sha256:
        raise PairDatasetError(f"{side}: the pairs were built from a corpus with .idx sha256 {recorded[:12]}..., "
                               f"not {corpus.prefix} ({corpus.idx_sha256[:12]}...)")
    recorded = _get(meta, "embeddings", "num_documents")
    if isinstance(recorded, int) and recorded != len(corpus):
        raise PairDatasetError(f"{side}: the pairs were built from embeddings of {recorded:,} documents, but "
                               f"{corpus.prefix} has {len(corpus):,}")


def _get(meta: dict, *keys):
    for key in keys:
        meta = meta.get(key) if isinstance(meta, dict) else None
    return meta


# -- gathering ---------------------------------------------------------------------------------------------------------
def segment_positions(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated ranges [starts[i], starts[i] + lengths[i]) as one int64 array, without a Python loop."""
    lengths = lengths.astype(np.int64, copy=False)
    total = int(lengths.sum())
    if total == 0:
        return np.empty(0, np.int64)
    offsets = np.cumsum(lengths) - lengths
    return np.repeat(starts.astype(np.int64, copy=False) - offsets, lengths) + np.arange(total, dtype=np.int64)


def pair_sequences(tokens: np.ndarray, starts: np.ndarray, bodies: np.ndarray, seeds: np.ndarray,
                   targets: np.ndarray, *, sep_id: int, eod_id: int, max_seed: int | None, max_target: int | None,
                   dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Build the sequences of pairs whose documents are non-empty: (flat tokens, lengths, loss mask, target cut)."""
    ls = bodies[seeds] if max_seed is None else np.minimum(bodies[seeds], max_seed)
    lt_full = bodies[targets]
    lt = lt_full if max_target is None else np.minimum(lt_full, max_target)
    cut = lt < lt_full
    lengths = ls + lt + 2
    out_starts = np.cumsum(lengths) - lengths
    flat = np.empty(int(lengths.sum()), dtype=dtype)
    mask = np.zeros(flat.size, dtype=np.bool_)
    flat[segment_positions(out_starts, ls)] = tokens[segment_positions(starts[seeds], ls)]
    flat[out_starts + ls] = sep_id
    target_at = segment_positions(out_starts + ls + 1, lt)
    flat[target_at] = tokens[segment_positions(starts[targets], lt)]
    mask[target_at] = True
    ends = out_starts + lengths - 1
    flat[ends] = eod_id
    mask[ends] = ~cut  # the EOD is a target only where the target document really ends
    return flat, lengths, mask, cut


# -- the run -----------------------------------------------------------------------------------------------------------
def _check_limit(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or value < 1):
        raise PairDatasetError(f"{name} must be >= 1, got {value}")


def make_pair_dataset(pairs: str | os.PathLike, corpus_prefix: str | os.PathLike, output_prefix: str | os.PathLike,
                      *, tokenizer: str | os.PathLike | None = None, max_seed_tokens: int | None = None,
                      max_target_tokens: int | None = None, both_directions: bool = False, overwrite: bool = False,
                      allow_empty: bool = False, progress: bool = True, separator: str | None = None) -> dict:
    """Write the loss-masked pair prefix (docs/sbp.md); return the counts.

    Raises CorpusError, IndexedDatasetError, TokenizerError or OutputExistsError / EmptyOutputError on bad input,
    before writing anything (the writer publishes atomically, so a failure leaves no output)."""
    _check_limit("max_seed_tokens", max_seed_tokens)
    _check_limit("max_target_tokens", max_target_tokens)
    corpus_prefix, output_prefix = os.fspath(corpus_prefix), os.fspath(output_prefix)
    corpus = IndexedDataset(corpus_prefix)
    check_output_prefix(output_prefix, {"": [file(pairs), prefix_spec(corpus_prefix)]
                                        + ([tokenizer] if tokenizer is not None else [])},
                        overwrite=overwrite, error=PairDatasetError)
    tok = prefix_tokenizer(corpus, tokenizer)
    separator = separator or PAIR_SEPARATOR
    sep_id, eod_id = pair_separator_id(tok, separator), tok.eod_id
    check_table_exists(pairs)
    pairs_sha256 = file_sha256(pairs)
    check_pairs_sidecar(pairs, corpus, pairs_sha256)
    seeds, targets = read_pair_table(pairs, corpus)
    if seeds.size == 0 and not allow_empty:
        raise PairDatasetError(f"{pairs}: the pair table has no rows; pass --allow-empty to write an empty prefix")
    starts, bodies = document_bodies(corpus, eod_id)
    dtype = smallest_token_dtype(tok.vocab_size)
    counts = {"pairs": int(seeds.size), "sequences": 0, "tokens": 0, "target_tokens": 0, "skipped_empty": 0,
              "truncated_seeds": 0, "truncated_targets": 0}
    metadata = {
        "tokenizer": tok.identity(), "vocab_size": tok.vocab_size, "eod_id": eod_id, "append_eod": True,
        "add_bos": False, "created_by": "make_pair_dataset",
        "sft": {"format": "pair", "max_len": None, "truncate": False, "eod_is_target": True,
                "pair_separator": {"text": separator, "id": sep_id}},
    }
    bar = tqdm(total=int(seeds.size), unit="pair", desc="make_pair_dataset", disable=not progress,
               dynamic_ncols=True, file=sys.stderr)
    try:
        with IndexedDatasetWriter(output_prefix, dtype, metadata=metadata, loss_mask=True) as writer:
            for lo in range(0, seeds.size, _ROWS_PER_BATCH):
                s, t = seeds[lo:lo + _ROWS_PER_BATCH], targets[lo:lo + _ROWS_PER_BATCH]
                if both_directions:  # (s, t) then (t, s), row by row
                    s, t = np.stack([s, t], 1).ravel(), np.stack([t, s], 1).ravel()
                keep = (bodies[s] > 0) & (bodies[t] > 0)
                counts["skipped_empty"] += int(keep.size - np.count_nonzero(keep))
                s, t = s[keep], t[keep]
                flat, lengths, mask, cut = pair_sequences(
                    corpus.tokens, starts, bodies, s, t, sep_id=sep_id, eod_id=eod_id, max_seed=max_seed_tokens,
                    max_target=max_target_tokens, dtype=dtype)
                writer.add_flat(flat, lengths, loss_mask=mask)
                counts["sequences"] += int(lengths.size)
                counts["tokens"] += int(flat.size)
                counts["target_tokens"] += int(np.count_nonzero(mask))
                if max_seed_tokens is not None:
                    counts["truncated_seeds"] += int(np.count_nonzero(bodies[s] > max_seed_tokens))
                counts["truncated_targets"] += int(np.count_nonzero(cut))
                bar.update(min(_ROWS_PER_BATCH, seeds.size - lo))
            check_not_empty(output_prefix, writer.num_documents, allow_empty=allow_empty)
            writer.finalize(metadata={
                "pairs": {"path": os.path.abspath(pairs), "sha256": pairs_sha256, "rows": int(seeds.size)},
                "corpus": {"prefix": os.path.abspath(corpus_prefix), "idx_sha256": corpus.idx_sha256,
                           "num_documents": len(corpus)},
                "limits": {"max_seed_tokens": max_seed_tokens, "max_target_tokens": max_target_tokens,
                           "both_directions": both_directions},
                "stats": counts,
            })
    finally:
        bar.close()
    return counts
