"""Tokenize JSONL / Parquet / text files into an indexed-dataset prefix (PREFIX.bin, PREFIX.idx, PREFIX.json).

    python tools/preprocess_data.py --input 'corpus/*.jsonl.zst' --tokenizer tok/ --output-prefix data/web --workers 8
    python tools/preprocess_data.py --input books/ --text-mode paragraph --tokenizer tok.model --output-prefix data/books

One document per JSONL line / Parquet row / text file, line or paragraph (see --text-mode); the end-of-document
id is appended to each (--no-append-eod to leave it out). The main process reads the input and writes the
output; --workers processes parse and tokenize batches of --batch-size records, and their results are
written in input order, so the output is byte-identical whatever the number of workers. The output
directory is created when it does not exist. An existing output prefix is refused unless --overwrite, and an
input that yields no document unless --allow-empty; the prefix is published atomically (the old one stays whole
until the new one is complete; docs/format.md, "Publishing a prefix"). An output whose files are an input's (or
inside an input directory, or the tokenizer's) is refused before any work, --overwrite or not.

Text is text: the literal string of a special token in a document ("<|endoftext|>", "<|im_end|>", "</s>", ...,
which web text does contain) is tokenized as ordinary text, never as that token's id, so each document's only
EOD is the appended one; text without such strings tokenizes as it always did (docs/format.md).

Bad input (invalid JSON or UTF-8, a missing key, a value that is not a string) stops the run with
`FILE:LINE: what is wrong` and exit code 2, and leaves no output; --skip-bad-lines skips such records and
reports them. Empty documents are skipped and counted. The sidecar records the tokenizer's identity, the
source files with their sizes and sha256, and the counts; it holds no timings, so reruns are identical.

On a cluster (docs/cluster.md): `--worker I/N` (or `auto` in a Slurm array) makes worker I's share of the work
units (runs of whole input files, at most --unit-bytes each) in --work-dir; any number of workers may run at once,
killed ones are restarted or their units taken by the others, and the last to find every unit done (or a
`--publish` job) merges the parts into the output, byte-identical to a one-process run:

    sbatch --array=0-63 --wrap "python tools/preprocess_data.py --input 'web/*.jsonl.zst' --tokenizer tok/ \
        --output-prefix data/web --worker auto --workers 8"

The pipeline itself is megasynth.data.preprocess (megasynth.data.preprocess_units for workers); this file is its
command line.
"""

from __future__ import annotations

import argparse
import sys

from megasynth.cli import (ToolParser, add_input_arguments, add_worker_arguments, check_outputs, directory,
                           reader_options_from_args, worker_mode, worker_outcome)
from megasynth.data.preprocess import parse_cli_args, preprocess, run_for_cli
from megasynth.data.preprocess_units import DEFAULT_UNIT_BYTES, preprocess_units
from megasynth.work_units import WorkUnitsError


def build_parser() -> argparse.ArgumentParser:
    parser = ToolParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_arguments(parser)
    parser.add_argument("--output-prefix", required=True, metavar="PREFIX",
                        help="writes PREFIX.bin, PREFIX.idx and PREFIX.json; missing directories are created")
    parser.add_argument("--tokenizer", required=True, metavar="PATH",
                        help="a SentencePiece .model, a Hugging Face tokenizer.json, or a directory holding one")
    parser.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                        help="append the tokenizer's end-of-document id to every document (default: append)")
    parser.add_argument("--add-bos", action="store_true", help="prepend the tokenizer's BOS id to every document")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="tokenizing processes, each single-threaded (default 1); 0 tokenizes in the main "
                             "process with the tokenizer library's own threads")
    parser.add_argument("--batch-size", type=int, default=1024, metavar="N",
                        help="records per batch handed to a worker (default 1024)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output prefix (default: refuse it, exit 2); the old prefix stays "
                             "whole until the new one is complete")
    parser.add_argument("--allow-empty", action="store_true",
                        help="write the prefix even when the input yields no document (default: an error, exit 2)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = add_worker_arguments(parser, default_work_dir="PREFIX.work/")
    g.add_argument("--unit-bytes", type=int, default=DEFAULT_UNIT_BYTES, metavar="B",
                   help=f"a work unit is a run of whole input files of at most B bytes on disk (a larger file is a "
                        f"unit of its own; default {DEFAULT_UNIT_BYTES:,}); part of the work directory's settings")
    return parser


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n):,} B"
        n /= 1024
    return f"{n:,.1f} TiB"  # pragma: no cover


def summary_line(s: dict) -> str:
    sec = max(s["seconds"], 1e-9)
    return (f"{s['documents']:,} documents, {s['tokens']:,} tokens, skipped {s['skipped_empty']:,} empty and "
            f"{s['skipped_bad']:,} bad | input {_fmt_bytes(s['input_bytes'])}, output {_fmt_bytes(s['output_bytes'])}"
            f" | {s['seconds']:.1f} s, {s['documents'] / sec:,.0f} docs/s, {s['tokens'] / sec:,.0f} tokens/s")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_cli_args(parser, argv)
    try:
        mode = worker_mode(args)
    except ValueError as e:
        parser.error(str(e))
    options = reader_options_from_args(args, batch_size=args.batch_size)
    if mode is not None:
        args.work_dir = args.work_dir or f"{args.output_prefix}.work"
        check_outputs(parser, {"--work-dir": directory(args.work_dir)}, {"--input": args.input,
                                                                        "--tokenizer": args.tokenizer})
        return _as_worker(args, options, *mode)
    return run_for_cli(args.output_prefix, lambda: preprocess(
        args.input, args.output_prefix, args.tokenizer,
        options=options, add_bos=args.add_bos, append_eod=args.append_eod, workers=args.workers, progress=not args.no_progress, overwrite=args.overwrite,
        allow_empty=args.allow_empty), files=".bin/.idx/.json", summary_line=summary_line)


def _as_worker(args, options, worker, publish: str) -> int:
    def run() -> dict:
        return preprocess_units(args.input, args.output_prefix, args.tokenizer,
                                work_dir=args.work_dir, worker=worker, options=options,
                                add_bos=args.add_bos, append_eod=args.append_eod, workers=args.workers,
                                unit_bytes=args.unit_bytes, publish=publish, overwrite=args.overwrite,
                                allow_empty=args.allow_empty,
                                log=None if args.no_progress else lambda m: print(m, file=sys.stderr))

    def unpublished(out: dict) -> str | None:
        if out["published"] and not out.get("already_published"):
            return None  # the usual "wrote" line
        return worker_outcome(out, worker, args.output_prefix, "")

    return run_for_cli(args.output_prefix, run, files=".bin/.idx/.json", summary_line=summary_line,
                       bad_input=(WorkUnitsError,), other_outcome=unpublished)


if __name__ == "__main__":
    sys.exit(main())
