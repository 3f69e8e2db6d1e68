"""Import QuALITY's released JSONL: source documents for EntiGraph plus a closed-book task file for tools/eval.py.

    python tools/import_quality.py --input QuALITY.v1.0.1.htmlstripped.train QuALITY.v1.0.1.htmlstripped.dev \\
        --out data/quality
    python tools/import_quality.py --input QuALITY.v1.0.1.htmlstripped.train \\
        --held-out QuALITY.v1.0.1.htmlstripped.dev --fewshot 5 --out data/quality-split
    python tools/import_quality.py --input quality.jsonl --split-by-article --held-out-fraction 0.2 --seed 0 --out q

Articles are merged by article_id (QuALITY repeats each article once per writer set) and questions are kept
once. OUT/documents.jsonl ({"id", "title", "text"}) is the corpus to synthesize from (tools/entigraph.py
--input), OUT/quality.jsonl the closed-book questions about those articles (type "quality", gold 0-based; see
docs/eval.md). With a split by article (--split-by-article or --held-out FILE) the held-out articles go to
OUT/heldout_documents.jsonl and OUT/quality_heldout.jsonl instead: books the model never trains on, a control
for the closed-book gain and the pool of --fewshot examples. OUT/import.json records counts and settings.
OUT is published like a prefix: the files are built beside it and moved in with import.json last, so a reader
sees the complete old or the complete new set; other files in OUT are left alone. Existing output files are
refused unless --overwrite (which replaces only these files), and an OUT that is, holds or sits inside an input
is refused (exit code 2, one line).
A malformed record stops the tool with exit code 2 and `FILE:LINE: field: what was expected` (--skip-bad-lines
skips and counts such lines instead).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megasynth.cli import ToolParser, check_outputs, directory, float_range
from megasynth.data.readers import BadInputError, InputError
from megasynth.eval.quality_import import (
    HTML_MODES,
    OUTPUT_FILES,
    merge_held_out,
    read_quality,
    split_articles,
    write_import,
)


def build_parser() -> argparse.ArgumentParser:
    p = ToolParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help="QuALITY JSONL files (any name, e.g. QuALITY.v1.0.1.htmlstripped.train; .gz/.zst read too); "
                        "their articles form one pool")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output directory: its files appear complete or not at all; other files there are kept")
    p.add_argument("--split-by-article", action="store_true",
                   help="hold a seeded --held-out-fraction of the articles out of the corpus (their questions go "
                        "to quality_heldout.jsonl)")
    p.add_argument("--held-out-fraction", type=float_range(0, 1, low_open=True, high_open=True), default=None,
                   metavar="F",
                   help="with --split-by-article: share of the articles held out (default 0.2; at least one "
                        "article, never all)")
    p.add_argument("--held-out", nargs="+", default=[], metavar="FILE",
                   help="QuALITY files whose articles are the held-out side (e.g. the official dev file); implies a "
                        "split by article; an article in both --input and --held-out is an error")
    p.add_argument("--seed", type=int, default=0, help="seed of the article split and the few-shot draw (default 0)")
    p.add_argument("--fewshot", type=int, default=0, metavar="N",
                   help="add N questions as \"split\": \"fewshot\" lines to quality.jsonl, for tools/eval.py "
                        "--num-fewshot; drawn from the held-out articles (without a split: from all questions, which "
                        "are then not evaluated). Default 0")
    p.add_argument("--html", choices=HTML_MODES, default="auto",
                   help="article markup: auto (convert texts that look like HTML to plain paragraphs, the default), "
                        "strip (always convert), keep (leave the text as it is)")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip and count malformed lines (invalid JSON, missing fields, gold_label outside 1..4, not "
                        "4 options) instead of stopping at the first one")
    p.add_argument("--overwrite", action="store_true",
                   help="replace this tool's files in an existing --out directory (other files there are kept)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.held_out and args.held_out_fraction is not None:
        parser.error("give --held-out FILE or --held-out-fraction, not both")
    if args.held_out_fraction is not None and not args.split_by_article:
        parser.error("--held-out-fraction needs --split-by-article")
    if args.fewshot < 0:
        parser.error("--fewshot must be >= 0")
    out = Path(args.out)
    check_outputs(parser, {"--out": directory(out, OUTPUT_FILES)}, {"--input": args.input, "--held-out": args.held_out},
                  overwrite=args.overwrite)
    try:
        result = read_quality(args.input, skip_bad=args.skip_bad_lines, html_mode=args.html)
        held_out: set[str] = set()
        if args.held_out:
            held_out = merge_held_out(result, read_quality(args.held_out, skip_bad=args.skip_bad_lines,
                                                           html_mode=args.html))
        elif args.split_by_article:
            fraction = 0.2 if args.held_out_fraction is None else args.held_out_fraction
            held_out = split_articles(result.articles, fraction, args.seed)
        settings = {"held_out_fraction": args.held_out_fraction if args.split_by_article else None,
                    "held_out_files": args.held_out, "seed": args.seed, "fewshot": args.fewshot, "html": args.html,
                    "skip_bad_lines": args.skip_bad_lines}
        summary = write_import(out, result, held_out, fewshot=args.fewshot, seed=args.seed, settings=settings,
                               overwrite=args.overwrite)
    except (BadInputError, InputError, ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{summary['articles']} articles, {summary['questions']} questions -> {out / 'documents.jsonl'}, "
          f"{out / 'quality.jsonl'}")
    if held_out:
        print(f"held out: {summary['heldout_articles']} articles, {summary['heldout_questions']} questions -> "
              f"{out / 'heldout_documents.jsonl'}, {out / 'quality_heldout.jsonl'}")
    print(f"{summary['lines']} lines read, {summary['duplicate_questions']} duplicate questions dropped"
          + (f", {summary['fewshot']} few-shot lines" if summary["fewshot"] else ""))
    for message in result.text_conflicts[:5]:
        print(f"warning: {message}", file=sys.stderr)
    if result.text_conflicts:
        print(f"warning: {len(result.text_conflicts)} line(s) repeat an article with a different text", file=sys.stderr)
    if result.skipped_bad:
        print(f"skipped {result.skipped_bad} bad line(s), e.g.:", file=sys.stderr)
        for message in result.bad_examples:
            print(f"  {message}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
