"""Print what an indexed-dataset prefix holds: header, sidecar, document lengths, and chosen documents.

    python tools/inspect_dataset.py data/x                         # header, sidecar, length summary
    python tools/inspect_dataset.py data/x --doc 0 --doc -1        # plus those documents' ids and text
    python tools/inspect_dataset.py data/x --doc 3 --tokenizer tok.model
    python tools/inspect_dataset.py data/sft --doc 0 --verify      # also read every byte: largest id, mask sha256

Text is decoded with megasynth.tokenizer.load_tokenizer, from --tokenizer or else the sidecar's
tokenizer.path; when no tokenizer loads, ids are printed alone with a note. For a prefix with a loss mask
(PREFIX.mask), each shown document also prints its target tokens (the ones the loss is computed on) inside
[[ ]]: ids, and decoded text when a tokenizer loads. Exit code 2 when the prefix is missing or corrupt, a
--doc index is out of range, or --verify finds a mismatch.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys

import numpy as np

from megasynth.cli import ToolParser
from megasynth.data.indexed import (
    DTYPE_CODES,
    HEADER_SIZE,
    IndexedDataset,
    IndexedDatasetError,
    idx_path,
)
from megasynth.data.merge import length_histogram, length_summary
from megasynth.tokenizer import load_tokenizer


def load_decoder(path: str | None, prefix: str):
    """(tokenizer, note): the tokenizer at path (tried as given, then beside the prefix), or None and why not."""
    if not path:
        return None, "no tokenizer given and the sidecar names none: ids only"
    candidates = [path]
    if not os.path.isabs(path):
        candidates.append(os.path.join(os.path.dirname(os.path.abspath(prefix)), path))
    found = next((p for p in candidates if os.path.exists(p)), None)
    if found is None:
        return None, f"tokenizer {path} not found: ids only"
    try:
        return load_tokenizer(found), f"decoded with {found}"
    except Exception as e:  # any failure to load must still let the ids print
        return None, f"could not load tokenizer {found} ({type(e).__name__}: {e}): ids only"


def target_runs(mask) -> list[tuple[int, int, bool]]:
    """(start, end, is_target) for each maximal run of equal mask values."""
    mask = np.asarray(mask, dtype=bool)
    if mask.size == 0:
        return []
    edges = np.flatnonzero(mask[1:] != mask[:-1]) + 1
    bounds = [0, *edges.tolist(), mask.size]
    return [(a, b, bool(mask[a])) for a, b in zip(bounds[:-1], bounds[1:])]


def print_header(ds: IndexedDataset) -> None:
    with open(idx_path(ds.prefix), "rb") as f:
        version, code, num_seq, num_doc_idx = struct.unpack("<QBQQ", f.read(HEADER_SIZE)[9:])
    print(f"prefix:      {ds.prefix}")
    print(f"version:     {version}")
    print(f"dtype:       {DTYPE_CODES[code]} (code {code})")
    print(f"sequences:   {num_seq:,}")
    print(f"documents:   {num_doc_idx - 1:,} (document index entries: {num_doc_idx:,})")
    print(f"tokens:      {ds.num_tokens:,}")
    if ds.dtype.kind in "iu":
        source = "sidecar" if (ds.metadata or {}).get("max_token_id") is not None else "scanned, cached"
        print(f"max id:      {ds.max_token_id:,} ({source})")
    if ds.has_loss_mask:
        targets = ds.metadata["loss_mask"].get("num_targets")
        share = f" ({100 * targets / ds.num_tokens:.1f}% of tokens)" if ds.num_tokens and targets is not None else ""
        print(f"loss mask:   {ds.metadata['loss_mask']['file']}, {targets:,} target tokens{share}")


def print_lengths(ds: IndexedDataset) -> None:
    s = length_summary(ds.sequence_lengths)
    print(f"\nsequence lengths: min {s['min']:,}  mean {s['mean']:,.1f}  median {s['median']:,.1f}  "
          f"p99 {s['p99']:,.1f}  max {s['max']:,}")
    hist = length_histogram(ds.sequence_lengths)
    if not hist:
        return
    peak = max(c for _, _, c in hist)
    for lo, hi, count in hist:
        if count:
            label = "0" if hi == 1 else f"[{lo:,}, {hi:,})"
            print(f"  {label:>22} {count:>12,} {100 * count / s['count']:6.2f}%  {'#' * max(1, round(40 * count / peak))}")


def print_document(ds: IndexedDataset, i: int, tokenizer, max_tokens: int) -> None:
    ids = ds[i].tolist()
    shown = ids if max_tokens <= 0 else ids[:max_tokens]
    more = f" ... ({len(ids) - len(shown):,} more)" if len(shown) < len(ids) else ""
    print(f"\ndocument {i} ({len(ids):,} tokens):")
    print(f"  ids: {shown}{more}")
    if tokenizer is not None:
        print(f"  text: {tokenizer.decode(shown)!r}{more}")
    if ds.has_loss_mask:
        mask = ds.loss_mask(i)
        runs = target_runs(mask[: len(shown)])
        print(f"  targets: {int(mask.sum()):,} of {len(ids):,} tokens, inside [[ ]]")
        print("  target ids: " + " ".join(
            f"[[{' '.join(map(str, shown[a:b]))}]]" if t else " ".join(map(str, shown[a:b])) for a, b, t in runs) + more)
        if tokenizer is not None:
            print("  target text: " + " ".join(
                f"[[{tokenizer.decode(shown[a:b])!r}]]" if t else repr(tokenizer.decode(shown[a:b])) for a, b, t in runs)
                + more)


def main(argv: list[str] | None = None) -> int:
    parser = ToolParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prefix", help="dataset prefix (PREFIX.bin + PREFIX.idx [+ PREFIX.json])")
    parser.add_argument("--doc", type=int, action="append", default=[], metavar="I",
                        help="print document I's ids and decoded text (repeatable; negative counts from the end)")
    parser.add_argument("--tokenizer", metavar="PATH",
                        help="tokenizer to decode with (default: the sidecar's tokenizer.path)")
    parser.add_argument("--max-tokens", type=int, default=256, metavar="N",
                        help="print at most N ids per document, 0 for all (default 256)")
    parser.add_argument("--verify", action="store_true",
                        help="also run the checks that read every byte: the .bin's largest id against the sidecar, "
                             "the loss mask's sha256")
    args = parser.parse_args(argv)

    try:
        ds = IndexedDataset(args.prefix)
    except IndexedDatasetError as e:
        print(f"{e}", file=sys.stderr)
        return 2
    for i in args.doc:
        if not -len(ds) <= i < len(ds):
            print(f"{idx_path(args.prefix)}: --doc {i} out of range ({len(ds)} documents)", file=sys.stderr)
            return 2
    checked = []
    if args.verify:
        try:
            checked = ds.verify()
        except IndexedDatasetError as e:
            print(f"{e}", file=sys.stderr)
            return 2

    print_header(ds)
    print("\nsidecar:" if ds.metadata is not None else "\nsidecar: none (a Megatron-written prefix, or written without one)")
    if ds.metadata is not None:
        print("  " + json.dumps(ds.metadata, indent=2).replace("\n", "\n  "))
    print_lengths(ds)
    if args.verify:
        print("\nverified: " + ("; ".join(checked) if checked else "nothing to verify (no sidecar records checksums)"))
    if args.doc:
        path = args.tokenizer or ((ds.metadata or {}).get("tokenizer") or {}).get("path")
        tokenizer, note = load_decoder(path, args.prefix)
        print(f"\ntokenizer: {note}")
        for i in args.doc:
            print_document(ds, i, tokenizer, args.max_tokens)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
