"""Concatenate indexed-dataset prefixes into one prefix (streaming; inputs must share dtype and tokenizer).

    python tools/merge_datasets.py --inputs data/a data/b --output data/ab
    python tools/merge_datasets.py --input-dir data/shards --output data/all

Documents keep their order: every document of the first input, then the second's, and so on. The output's
sidecar (OUTPUT.json) lists the inputs and carries their source files. Loss masks (PREFIX.mask) are carried;
merging masked with unmasked inputs needs --unmasked-as-all-true. An existing output prefix is refused unless
--overwrite, an output that is one of the inputs always, an output of no documents unless --allow-empty. Exit code
2, with one line, on a missing or corrupt input or a refused output; the output is published atomically
(docs/format.md, "Publishing a prefix").
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from megasynth.cli import ToolParser, check_outputs, prefix
from megasynth.data.indexed import (
    IndexedDatasetError,
    PrefixOutputError,
    bin_path,
    idx_path,
    prefix_exists,
)
from megasynth.data.merge import merge_datasets


def prefixes_in_dir(directory: str | os.PathLike) -> list[str]:
    """Every prefix (a .idx with its .bin) directly inside directory, sorted by name."""
    return sorted(str(p.with_suffix("")) for p in Path(directory).glob("*.idx") if prefix_exists(p.with_suffix("")))


def main(argv: list[str] | None = None) -> int:
    parser = ToolParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--inputs", nargs="+", metavar="PREFIX", help="input prefixes (PREFIX.bin + PREFIX.idx), merged in this order")
    source.add_argument("--input-dir", metavar="DIR", help="merge every prefix found in DIR, in sorted order")
    parser.add_argument("--output", required=True, metavar="PREFIX", help="output prefix; writes PREFIX.bin, .idx and .json")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output prefix (default: refuse it); the old prefix stays whole "
                             "until the new one is complete")
    parser.add_argument("--allow-empty", action="store_true",
                        help="write the output even when the inputs hold no documents (default: an error)")
    parser.add_argument("--unmasked-as-all-true", action="store_true",
                        help="when some inputs have a loss mask and others do not, treat every token of the "
                             "unmasked ones as a target (default: refuse to mix them)")
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
    # --input-dir DIR --output DIR/all is fine (the output is not among the inputs); an output that is an input is not.
    check_outputs(parser, {"--output": prefix(args.output)},
                  {"--input-dir" if args.input_dir is not None else "--inputs": [prefix(p) for p in inputs]})
    try:
        sidecar = merge_datasets(inputs, args.output, progress=not args.quiet, overwrite=args.overwrite,
                                 allow_empty=args.allow_empty, unmasked_as_all_true=args.unmasked_as_all_true)
    except (IndexedDatasetError, PrefixOutputError, ValueError) as e:
        print(f"{e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. the output directory is not writable, the disk is full
        print(f"{e.filename or args.output}: {e.strerror or e}; no output written", file=sys.stderr)
        return 2
    for entry in sidecar["inputs"]:
        print(f"  {entry['prefix']}: {entry['num_documents']:,} documents, {entry['num_tokens']:,} tokens")
    mask = f", loss mask {sidecar['loss_mask']['num_targets']:,} targets" if "loss_mask" in sidecar else ""
    print(f"merged {len(inputs)} prefixes -> {bin_path(args.output)}, {idx_path(args.output)}: "
          f"{sidecar['num_documents']:,} documents, {sidecar['num_tokens']:,} tokens ({sidecar['dtype']}{mask})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
