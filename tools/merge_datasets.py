"""Concatenate indexed-dataset prefixes into one prefix (streaming; inputs must share dtype and tokenizer).

    python tools/merge_datasets.py --inputs data/a data/b --output data/ab
    python tools/merge_datasets.py --input-dir data/shards --output data/all

Documents keep their order: every document of the first input, then the second's, and so on. The output's
sidecar (OUTPUT.json) lists the inputs and carries their source files. Exit code 2 on a missing or corrupt input.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from megasynth.data.indexed import IndexedDatasetError, bin_path, idx_path, prefix_exists
from megasynth.data.merge import merge_datasets


def prefixes_in_dir(directory: str | os.PathLike) -> list[str]:
    """Every prefix (a .idx with its .bin) directly inside directory, sorted by name."""
    return sorted(str(p.with_suffix("")) for p in Path(directory).glob("*.idx") if prefix_exists(p.with_suffix("")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--inputs", nargs="+", metavar="PREFIX", help="input prefixes (PREFIX.bin + PREFIX.idx), merged in this order")
    source.add_argument("--input-dir", metavar="DIR", help="merge every prefix found in DIR, in sorted order")
    parser.add_argument("--output", required=True, metavar="PREFIX", help="output prefix; writes PREFIX.bin, .idx and .json")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    if args.input_dir is not None:
        if not Path(args.input_dir).is_dir():
            print(f"{args.input_dir}: not a directory", file=sys.stderr)
            return 2
        out = os.path.abspath(args.output)
        inputs = [p for p in prefixes_in_dir(args.input_dir) if os.path.abspath(p) != out]
        if not inputs:
            print(f"{args.input_dir}: no prefixes (PREFIX.idx with PREFIX.bin) found", file=sys.stderr)
            return 2
    else:
        inputs = args.inputs
    try:
        sidecar = merge_datasets(inputs, args.output, progress=not args.quiet)
    except (IndexedDatasetError, ValueError) as e:
        print(f"{e}", file=sys.stderr)
        return 2
    for entry in sidecar["inputs"]:
        print(f"  {entry['prefix']}: {entry['num_documents']:,} documents, {entry['num_tokens']:,} tokens")
    print(f"merged {len(inputs)} prefixes -> {bin_path(args.output)}, {idx_path(args.output)}: "
          f"{sidecar['num_documents']:,} documents, {sidecar['num_tokens']:,} tokens ({sidecar['dtype']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
