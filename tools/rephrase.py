"""The rephrase baseline (WRAP-style) for EntiGraph: source documents rewritten by an LLM in several styles.

    python tools/rephrase.py --input docs.jsonl --work-dir runs/rp --output-prefix data/rp --tokenizer tok/ \\
        --base-url http://localhost:8000/v1 --model Qwen/Qwen3-8B --styles plain,encyclopedic,qa \\
        --samples-per-doc 64 --target-tokens-of data/eg       # as many tokens as the EntiGraph corpus data/eg

Styles: plain (simple, clear language), encyclopedic (a reference-work article), qa (questions and answers
covering the document). Each (document, style) is sampled --samples-per-doc times, round by round (every
document once before any twice), each request with its own seed. With --target-tokens N (or
--target-tokens-of PREFIX, N = that prefix's token count) the output is the shortest run of rounds that reaches
N tokens, and only the requests that needs are sent; --samples-per-doc is then the most rounds allowed.

Same guarantees as tools/entigraph.py: every finished request is recorded in WORK_DIR/rephrasings.jsonl before
it counts, a killed or budget-stopped run resumes without repeating one, transient failures (429, 408, 5xx,
timeouts, dropped connections) are retried for --transient-budget-s per item and asked again by a plain rerun,
content failures stop at --max-attempts and are asked again only with --retry-failed, a run that leaves items
out writes nothing unless --allow-partial (sidecar "partial"), and the prefix (+ PREFIX.provenance.parquet,
sidecar with model, prompt hash, counts, cost) is built from the records in a fixed order (document, style,
sample), so reruns give the same bytes.

An --output-prefix that is the --input (or one of its files, a tokenizer or --target-tokens-of), and a
--work-dir that is, holds or sits inside one of those, are refused before anything is written, --overwrite or not.

As independent workers on a cluster (`--worker I/N`, `--publish`, --unit-docs): as tools/entigraph.py says; a
token target spans every document and is refused with them.

Exit codes: 0 written (complete, or partial with --allow-partial); 1 requests still unanswered (rerun); 2 bad
input or output; 3 stopped by the budget (rerun with a larger budget to continue); 4 partial: items failed, no
output (rerun, --retry-failed or --allow-partial, as printed); 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys

from megasynth.cli import (
    ToolParser, add_llm_worker_arguments, add_outcome_arguments, add_source_arguments, parse_llm_pipeline_args,
    run_llm_pipeline,
)
from megasynth.data.prefix import sidecar_path
from megasynth.synth.llm import add_llm_arguments, settings_from_args

STYLES = ("plain", "encyclopedic", "qa")  # megasynth.synth.rephrase.STYLES, without importing it for --help


def build_parser() -> argparse.ArgumentParser:
    parser = ToolParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_arguments(parser, tokenizer_help="tokenizer of the output prefix (and of the token target)")
    parser.add_argument("--styles", default=",".join(STYLES), metavar="LIST",
                        help=f"comma-separated rephrase styles from {', '.join(STYLES)} (default: all)")
    parser.add_argument("--samples-per-doc", type=int, default=1, metavar="N",
                        help="samples of each (document, style); with a token target, the most rounds (default 1)")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--target-tokens", type=int, default=None, metavar="N",
                        help="stop at the first rounds whose rephrasings reach N output tokens (EOD included)")
    target.add_argument("--target-tokens-of", default=None, metavar="PREFIX",
                        help="the target is the token count of this prefix (e.g. the EntiGraph output)")
    parser.add_argument("--seed", type=int, default=0, help="derives each request's sampling seed (default 0)")
    add_outcome_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_llm_arguments(parser)
    add_llm_worker_arguments(parser)
    return parser


def _target(args, parser) -> int | None:
    if args.target_tokens_of is None:
        return args.target_tokens
    path = sidecar_path(args.target_tokens_of)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))["num_tokens"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        parser.error(f"--target-tokens-of: cannot read num_tokens from {path} ({e})")
    return int(value)


def main(argv: list[str] | None = None) -> int:
    from megasynth.synth.rephrase import RephraseConfig, run_rephrase

    parser = build_parser()
    args, workers = parse_llm_pipeline_args(parser, argv, "--target-tokens-of")
    styles = [s.strip() for s in args.styles.split(",") if s.strip()]
    try:
        llm = settings_from_args(args)
        cfg = RephraseConfig(input=args.input, work_dir=args.work_dir, output_prefix=args.output_prefix,
                             tokenizer=args.tokenizer, llm=llm, input_tokenizer=args.input_tokenizer,
                             styles=styles, samples_per_doc=args.samples_per_doc, target_tokens=_target(args, parser),
                             seed=args.seed, retry_failed=args.retry_failed, allow_partial=args.allow_partial,
                             overwrite=args.overwrite,
                             progress=not args.no_progress)
    except ValueError as e:
        parser.error(str(e))
    out, code = run_llm_pipeline(lambda: run_rephrase(cfg, workers), args.output_prefix)
    if out is None:
        return code
    if not out["target_reached"]:
        print(f"the target of {cfg.target_tokens:,} tokens was not reached with --samples-per-doc "
              f"{cfg.samples_per_doc}; raise it and rerun to add rounds", file=sys.stderr)
    by_style = ", ".join(f"{k} {v:,}" for k, v in out["counts"]["by_style"].items())
    print(f"wrote {args.output_prefix}: {out['sidecar']['num_documents']:,} documents, "
          f"{out['sidecar']['num_tokens']:,} tokens ({by_style}) | {out['llm']['requests']:,} requests in the "
          f"ledger, {out['llm']['prompt_tokens']:,} in / {out['llm']['completion_tokens']:,} out tokens, "
          f"${out['llm']['cost_usd']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
