"""Tokenize instruction, chat and pair records into a loss-masked prefix (PREFIX.bin/.idx/.mask/.json).

    python tools/preprocess_sft.py --input train.jsonl --tokenizer tok/ --output-prefix data/sft --workers 4
    python tools/preprocess_sft.py --input pairs.jsonl --format pair --tokenizer tok/ --output-prefix data/sbp \\
        --max-len 2048 --truncate

Formats (one JSON object a line; --format auto decides from the first record and says what it chose):
  prompt_response  {"prompt", "response"}
  alpaca           {"instruction", "input" (optional), "output"}  (instruction + "\\n\\n" + input when input is set)
  chat             {"messages": [{"role": "system"|"user"|"assistant", "content"}, ...]}
  pair             {"source", "target"}: source, <|sep|>, target, EOD; the loss on target and EOD (SBP);
                   --separator TOKEN uses another single-id token instead of <|sep|> (a pretrained tokenizer's)
The first three are rendered with the tokenizer's chat_template (tokenizer_config.json), else the built-in ChatML
template (<|im_start|>role\\n...<|im_end|>\\n; tools/train_tokenizer.py --chat-tokens adds its tokens); the
targets are every assistant turn's content and its end-of-turn token. Every record ends with EOD. The template
and its special tokens are recorded in the sidecar; tools/generate.py --chat formats prompts with the same one.

Same pipeline and guarantees as tools/preprocess_data.py: byte-identical output for any --workers; a bad record
(missing field, empty response, no assistant turn, unknown role, a special token inside a text (any string the
tokenizer would turn into a special id: content never produces one), more than
--max-len tokens) stops the run with FILE:LINE: what is wrong, exit code 2 and no output; --skip-bad-lines
skips and counts them instead. The library is megasynth.data.sft; docs/sft.md has the details.
"""

from __future__ import annotations

import argparse
import sys

from megasynth.chat import ChatTemplateError
from megasynth.cli import ToolParser
from megasynth.data.preprocess import parse_cli_args, run_for_cli
from megasynth.data.sft import FORMATS, preprocess_sft, resolve_format


def build_parser() -> argparse.ArgumentParser:
    parser = ToolParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help="JSONL files (.jsonl/.json/.ndjson, optionally .gz/.zst), directories or quoted globs")
    parser.add_argument("--tokenizer", required=True, metavar="PATH",
                        help="a Hugging Face tokenizer directory or tokenizer.json (its chat_template is used)")
    parser.add_argument("--output-prefix", required=True, metavar="PREFIX",
                        help="writes PREFIX.bin, .idx, .mask and .json; missing directories are created")
    parser.add_argument("--format", choices=("auto", *FORMATS), default="auto",
                        help="record format (default auto: from the keys of the first record)")
    parser.add_argument("--separator", metavar="TOKEN",
                        help="--format pair: the token between source and target (default <|sep|>); any token that is "
                             "one id of the tokenizer, e.g. a pretrained tokenizer's reserved special token; recorded "
                             "in the sidecar")
    parser.add_argument("--max-len", type=int, default=None, metavar="N",
                        help="longest record in tokens, EOD included; a longer one is a bad record (default: none)")
    parser.add_argument("--truncate", action="store_true",
                        help="with --max-len: keep the first N-1 tokens of a longer record and end it with EOD as "
                             "context (counted; a record left without any target token is still bad)")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="tokenizing processes (default 1); 0 tokenizes in the main process")
    parser.add_argument("--batch-size", type=int, default=512, metavar="N",
                        help="records per batch handed to a worker (default 512)")
    parser.add_argument("--skip-bad-lines", action="store_true",
                        help="skip and count bad records instead of stopping at the first one")
    parser.add_argument("--max-bad-lines-shown", type=int, default=5, metavar="N",
                        help="with --skip-bad-lines, how many bad locations the final report lists (default 5)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output prefix")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def summary_line(s: dict) -> str:
    sec = max(s["seconds"], 1e-9)
    share = s["target_tokens"] / max(s["tokens"], 1)
    return (f"{s['records']:,} records, {s['tokens']:,} tokens, {s['target_tokens']:,} target tokens ({share:.1%}), "
            f"skipped {s['skipped_bad']:,} bad and {s['skipped_empty']:,} blank lines, truncated {s['truncated']:,} "
            f"| {s['seconds']:.1f} s, {s['records'] / sec:,.0f} records/s, {s['tokens'] / sec:,.0f} tokens/s")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_cli_args(parser, argv)
    if args.max_len is not None and args.max_len < 2:
        parser.error("--max-len must be >= 2")
    if args.truncate and args.max_len is None:
        parser.error("--truncate needs --max-len")
    def run() -> dict:
        fmt, where = resolve_format(args.input, args.format, skip_bad=args.skip_bad_lines)
        if args.format == "auto":
            print(f"format: {fmt} (auto, from the keys of the record at {where})", file=sys.stderr)
        return preprocess_sft(args.input, args.output_prefix, args.tokenizer, fmt=fmt, max_len=args.max_len,
                              truncate=args.truncate, skip_bad=args.skip_bad_lines, workers=args.workers,
                              batch_size=args.batch_size, max_bad_shown=args.max_bad_lines_shown,
                              progress=not args.no_progress, overwrite=args.overwrite, separator=args.separator)

    return run_for_cli(args.output_prefix, run, files=".bin/.idx/.mask/.json", summary_line=summary_line,
                       bad_input=(ChatTemplateError,))


if __name__ == "__main__":
    sys.exit(main())
