"""SBP stage 3: a pair table and its corpus -> a loss-masked prefix for tuning the synthesizer on p(target | seed).

    from megasynth.synth.sbp.pair_dataset import make_pair_dataset
    summary = make_pair_dataset("runs/pairs.parquet", "data/real", "data/pairs", max_seed_tokens=512)

Each pair (seed, target) of PAIRS.parquet (columns `seed`, `target`: int64 document indices of the corpus
prefix; written by tools/build_pairs.py) becomes one sequence

    seed tokens (the first max_seed_tokens), <|sep|>, target tokens (the first max_target_tokens), EOD

(`separator` names another single-id token in place of <|sep|>, for a pretrained tokenizer that lacks it; the
sidecar's sft.pair_separator records its text and id, and tools/synthesize.py prompts with the same one)

with the loss on the target tokens and the EOD only: exactly the layout of a `pair` record of
megasynth.data.sft (the separator id and its "needs --chat-tokens" check come from its SftEncoder), so a JSONL
record {"source": A, "target": B} run through tools/preprocess_sft.py and the pair of the documents A and B here
give the same tokens and the same mask. A document's own trailing EOD is not part of its text. When the
target is cut at max_target_tokens, the EOD after it is context, not a target (the text did not end there;
preprocess_sft's --truncate does the same), so the synthesizer never learns to stop at an artificial cut.
A pair whose seed or target document holds no token (besides its EOD) is skipped and counted.

--both-directions also writes (target, seed) right after each (seed, target). The order of the output is the
row order of the pair table (twice as many with both directions), so reruns are byte-identical.

Bad input raises PairDatasetError naming the file (and for a pair table the row, counting from 0): missing
columns, non-integer columns, nulls, indices outside the corpus, a table that records another corpus, an
empty table (unless allow_empty). The sidecar records the pair table (path, sha256, rows), the corpus (prefix,
.idx sha256, documents), the limits and the counts.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from megasynth.chat import PAIR_SEPARATOR
from megasynth.cli import file, overlap_refusal
from megasynth.cli import prefix as prefix_spec
from megasynth.data.indexed import (
    IndexedDataset,
    IndexedDatasetWriter,
    check_not_empty,
    smallest_token_dtype,
)
from megasynth.data.prefix import check_output_free, sidecar_path
from megasynth.data.sft_encode import SftEncoder
from megasynth.data.sft_records import SftOptions
from megasynth.io import file_sha256
from megasynth.tokenizer import Tokenizer, TokenizerError, load_tokenizer

PAIR_COLUMNS = ("seed", "target")
_ROWS_PER_BATCH = 1 << 16  # pairs gathered per vectorised step: bounds memory whatever the table's size


class PairDatasetError(ValueError):
    """Bad input for a pair dataset (or for synthesis from a corpus); one line naming the file and the problem."""


# -- the corpus and its tokenizer --------------------------------------------------------------------------------------
def corpus_tokenizer(corpus: IndexedDataset, tokenizer: str | os.PathLike | None = None) -> Tokenizer:
    """The tokenizer of a corpus prefix: `tokenizer` when given, else the one its sidecar names; either must be the
    one the sidecar records (same sha256) when it records one."""
    recorded = (corpus.metadata or {}).get("tokenizer")
    recorded = recorded if isinstance(recorded, dict) else None
    if tokenizer is None:
        if recorded is None or not recorded.get("path"):
            raise PairDatasetError(f"{sidecar_path(corpus.prefix)}: names no tokenizer; pass --tokenizer")
        tokenizer = recorded["path"]
    tok = load_tokenizer(tokenizer)
    if recorded is not None and recorded.get("sha256") and recorded["sha256"] != tok.identity()["sha256"]:
        raise PairDatasetError(f"{tok.path}: not the tokenizer of {corpus.prefix} (its sidecar records "
                               f"{recorded.get('path')} with sha256 {recorded['sha256'][:12]}...)")
    return tok


def pair_separator_id(tokenizer: Tokenizer, separator: str | None = None) -> int:
    """The id of the pair separator (default <|sep|>), as megasynth.data.sft's pair format defines it; TokenizerError
    naming the token and the tokenizer when it is not one id (or is the EOD)."""
    return SftEncoder(tokenizer, SftOptions("pair", separator=separator), np.int64).sep_id


def document_bodies(corpus: IndexedDataset, eod_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(first token position in corpus.tokens, tokens without the trailing EOD) for every document, int64."""
    starts = corpus.sequence_pointers.astype(np.int64) // corpus.dtype.itemsize
    lengths = corpus.sequence_lengths.astype(np.int64)
    last = np.where(lengths > 0, starts + lengths - 1, 0)
    ends_in_eod = (lengths > 0) & (corpus.tokens[last] == eod_id) if corpus.tokens.size else lengths > 0
    return starts, lengths - ends_in_eod


# -- the pair table ----------------------------------------------------------------------------------------------------
def read_pair_table(path: str | os.PathLike, num_documents: int,
                    corpus_prefix: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(seed, target) int64 arrays of a PAIRS.parquet, every index checked against a corpus of num_documents."""
    import pyarrow as pa  # noqa: PLC0415
    import pyarrow.parquet as pq  # noqa: PLC0415

    path = Path(path)
    check_pair_table_exists(path)
    try:
        table = pq.read_table(path, columns=None)
    except (pa.ArrowException, OSError) as e:
        raise PairDatasetError(f"{path}: not a readable Parquet file ({e})") from None
    out = []
    for name in PAIR_COLUMNS:
        if name not in table.column_names:
            raise PairDatasetError(f"{path}: no column {name!r} (expected columns {', '.join(PAIR_COLUMNS)}, "
                                   f"found {', '.join(table.column_names) or 'none'})")
        column = table.column(name)
        if not pa.types.is_integer(column.type):
            raise PairDatasetError(f"{path}: column {name!r} is {column.type}, expected int64 document indices")
        if column.null_count:
            row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
            raise PairDatasetError(f"{path}: row {row}: {name} is null")
        values = column.to_numpy().astype(np.int64, copy=False)
        bad = np.flatnonzero((values < 0) | (values >= num_documents))
        if bad.size:
            row = int(bad[0])
            raise PairDatasetError(f"{path}: row {row}: {name} {int(values[row])} is not a document of "
                                   f"{corpus_prefix or 'the corpus'} ({num_documents:,} documents); were the pairs "
                                   "built from another corpus?")
        out.append(values)
    return out[0], out[1]


def check_pair_table_exists(path: str | os.PathLike) -> None:
    """PairDatasetError for a missing pair table, pointing at PATH.parquet when PATH is its stem (build_pairs.py's
    --output names the stem: its PAIRS.json beside it would otherwise seem to describe another table)."""
    path = Path(path)
    if path.is_file():
        return
    hint = ""
    if path.suffix != ".parquet" and Path(f"{path}.parquet").is_file():
        hint = f"; did you mean {path}.parquet?"
    raise PairDatasetError(f"{path}: no such file{hint}" if hint or not path.exists() else
                           f"{path}: not a file (expected a PAIRS.parquet pair table)")


def check_pairs_sidecar(pairs_path: str | os.PathLike, corpus: IndexedDataset, pairs_sha256: str) -> None:
    """PAIRS.json (megasynth.synth.sbp.pairs), when present beside the table, must describe this table and this corpus:
    its recorded parquet sha256, the corpus .idx sha256 (recorded when build_pairs was given the corpus) and the
    number of embedded documents."""
    check_pair_table_exists(pairs_path)
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


def _check_output(output_prefix: str, inputs: list, overwrite: bool) -> None:
    if Path(output_prefix).is_dir():
        raise PairDatasetError(f"{output_prefix}: is a directory; --output-prefix names files PREFIX.bin/.idx/.json")
    refusal = overlap_refusal({"": prefix_spec(output_prefix)}, {"": inputs})  # megasynth.cli: the one overlap rule
    if refusal:
        raise PairDatasetError(refusal)
    check_output_free(output_prefix, overwrite=overwrite)


def make_pair_dataset(pairs: str | os.PathLike, corpus_prefix: str | os.PathLike, output_prefix: str | os.PathLike,
                      *, tokenizer: str | os.PathLike | None = None, max_seed_tokens: int | None = None,
                      max_target_tokens: int | None = None, both_directions: bool = False, overwrite: bool = False,
                      allow_empty: bool = False, progress: bool = True, separator: str | None = None) -> dict:
    """Write the loss-masked pair prefix (see the module docstring); return the counts.

    Raises PairDatasetError, IndexedDatasetError, TokenizerError or OutputExistsError / EmptyOutputError on bad
    input, before writing anything (the writer publishes atomically, so a failure leaves no output)."""
    _check_limit("max_seed_tokens", max_seed_tokens)
    _check_limit("max_target_tokens", max_target_tokens)
    corpus_prefix, output_prefix = os.fspath(corpus_prefix), os.fspath(output_prefix)
    corpus = IndexedDataset(corpus_prefix)
    _check_output(output_prefix, [file(pairs), prefix_spec(corpus_prefix)]
                  + ([tokenizer] if tokenizer is not None else []), overwrite)
    tok = corpus_tokenizer(corpus, tokenizer)
    separator = separator or PAIR_SEPARATOR
    sep_id, eod_id = pair_separator_id(tok, separator), tok.eod_id
    check_pair_table_exists(pairs)
    pairs_sha256 = file_sha256(pairs)
    check_pairs_sidecar(pairs, corpus, pairs_sha256)
    seeds, targets = read_pair_table(pairs, len(corpus), corpus_prefix)
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


__all__ = ["PAIR_COLUMNS", "PairDatasetError", "TokenizerError", "check_pair_table_exists", "corpus_tokenizer",
           "document_bodies",
           "make_pair_dataset", "pair_separator_id", "pair_sequences", "read_pair_table", "segment_positions"]
