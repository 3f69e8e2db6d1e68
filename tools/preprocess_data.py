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
The pipeline itself is megasynth.data.preprocess; this file is its command line.
"""

from __future__ import annotations

import argparse
import sys

from megasynth.cli import ToolParser, add_input_arguments, reader_options_from_args
from megasynth.data.preprocess import parse_cli_args, preprocess, run_for_cli


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
    return run_for_cli(args.output_prefix, lambda: preprocess(
        args.input, args.output_prefix, args.tokenizer,
        options=reader_options_from_args(args, batch_size=args.batch_size), add_bos=args.add_bos,
        append_eod=args.append_eod, workers=args.workers, progress=not args.no_progress, overwrite=args.overwrite,
        allow_empty=args.allow_empty), files=".bin/.idx/.json", summary_line=summary_line)


if __name__ == "__main__":
    sys.exit(main())
