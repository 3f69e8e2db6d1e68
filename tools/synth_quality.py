"""SBP stage 6: the quality table of a synthetic prefix (repetition, duplicate@N, non-factual, pair-irrelevance,
pair-copying), beside the same tests on real neighbour pairs and the paper's 200B-scale row.

    python tools/synth_quality.py --synthetic data/sbp --corpus data/real --out runs/quality \
        --pairs runs/pairs/PAIRS.parquet --sample 10000
    # with an LLM judge for the non-factual column (any OpenAI-compatible endpoint):
    python tools/synth_quality.py ... --judge-base-url http://localhost:8000/v1 --judge-model Qwen/Qwen3-8B

--synthetic is a prefix written by tools/synthesize.py (its SYNTHETIC.provenance.parquet gives each document's
seed); --corpus is the prefix the seeds index. Writes OUT/results.json (every count and setting),
OUT/results.md (the table and the definitions) and OUT/documents.parquet (each sampled document's scores),
published together (results.json last: a reader sees the complete old or the complete new results); other files
in OUT are left alone. Existing results are refused unless --overwrite (which replaces only these three files),
and an OUT that is, holds or sits inside an input is refused.
docs/sbp.md defines each test and its threshold. Exit codes: 0 written; 2 bad input, with one line naming what
is wrong; 4 judge requests left unanswered (429, 5xx, timeouts, dropped connections for longer than
--judge-transient-budget-s each): nothing written, rerun later, or pass --allow-partial to write the results
with those documents left out of the non-factual rate and results.json saying "partial": true.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megasynth.cli import ToolParser, check_outputs, directory, float_range, prefix, unit_float
from megasynth.synth.llm.settings import add_llm_arguments, settings_from_args
from megasynth.synth.sbp.quality import JUDGE_DEFAULTS, RESULT_FILES, JudgeIncomplete, QualitySettings, measure_quality
from megasynth.synth.sbp.quality_report import render_table

EXIT_BAD_INPUT = 2
EXIT_PARTIAL = 4  # as tools/entigraph.py: items left out, nothing written (megasynth.cli)


def build_parser() -> argparse.ArgumentParser:
    d = QualitySettings()
    p = ToolParser(prog="tools/synth_quality.py", description=__doc__.split("\n\n")[0],
                   epilog="\n\n".join(__doc__.split("\n\n")[1:]), allow_abbrev=False,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--synthetic", required=True, metavar="PREFIX",
                   help="the synthetic prefix (with PREFIX.provenance.parquet: columns doc, seed)")
    p.add_argument("--corpus", required=True, metavar="PREFIX", help="the real corpus prefix the seeds index")
    p.add_argument("--out", required=True, metavar="DIR", help="where results.json, results.md and "
                   "documents.parquet are written (other files there are kept)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing results in --out (default: refuse, exit 2)")
    p.add_argument("--pairs", metavar="PAIRS.parquet",
                   help="real neighbour pairs (tools/build_pairs.py) for the reference row; default: random corpus "
                        "documents each with its nearest neighbour within that sample")
    p.add_argument("--sample", type=int, default=d.sample, metavar="N",
                   help=f"synthetic documents measured, and the reference row's size; duplicate@N looks within "
                        f"them (default {d.sample}; all when there are fewer)")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed of the samples (default {d.seed})")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="tokenizer to decode text for the embedding and the judge (default: the sidecar's)")
    g = p.add_argument_group("thresholds (docs/sbp.md)")
    g.add_argument("--repetition-threshold", type=unit_float, default=d.repetition_threshold,
                   help=f"repetition: 1 - distinct/all token {d.repetition_n}-grams above this "
                        f"(default {d.repetition_threshold})")
    g.add_argument("--duplicate-threshold", type=unit_float, default=d.duplicate_threshold,
                   help=f"duplicate: token {d.duplicate_n}-gram-set Jaccard at least this "
                        f"(default {d.duplicate_threshold})")
    g.add_argument("--copy-threshold", type=unit_float, default=d.copy_threshold,
                   help=f"pair-copying: share of token {d.copy_n}-grams found in the seed at least this "
                        f"(default {d.copy_threshold})")
    g.add_argument("--irrelevance-threshold", type=float_range(-1, 1), default=d.irrelevance_threshold,
                   help=f"pair-irrelevance: embedding cosine below this (default {d.irrelevance_threshold}; "
                        "calibrated for the default model)")
    g = p.add_argument_group("embedding")
    g.add_argument("--embed-model", default=d.embed_model, metavar="M",
                   help="sentence-transformers model name or path (default: the offline MiniLM package)")
    g.add_argument("--embed-max-tokens", type=int, default=d.embed_max_tokens, metavar="T",
                   help=f"tokens of each document decoded for the embedding (default {d.embed_max_tokens})")
    g.add_argument("--embed-batch-size", type=int, default=d.embed_batch_size, metavar="B",
                   help=f"documents per embedding batch (default {d.embed_batch_size})")
    g = add_llm_arguments(p, prefix="judge-", required=False, defaults=JUDGE_DEFAULTS,
                          title="factuality judge (optional; without one the non-factual column is n/a)",
                          aliases={"base-url": ("--judge-endpoint",)},
                          omit=("price-in", "price-out", "budget-tokens", "budget-usd"),
                          helps={"max-attempts": "most requests per document that got a reply (JSON repairs and "
                                 "retries after empty or unreadable replies included); then its verdict is failed "
                                 f"(default {JUDGE_DEFAULTS.max_attempts})",
                                 "transient-budget-s": "seconds a judge request keeps retrying transient failures "
                                 "(429, 408, 5xx, timeouts, dropped connections) before it counts as unanswered "
                                 f"(default {JUDGE_DEFAULTS.transient_budget_s:g})"})
    g.add_argument("--judge-sample", type=int, default=d.judge_sample, metavar="K",
                   help=f"documents per row sent to the judge (default {d.judge_sample})")
    g.add_argument("--allow-partial", action="store_true",
                   help="write the results even when judge requests went unanswered (default: write nothing, "
                        "exit 4); results.json then says \"partial\": true")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_outputs(parser, {"--out": directory(args.out, RESULT_FILES)},
                  {"--synthetic": prefix(args.synthetic), "--corpus": prefix(args.corpus), "--pairs": args.pairs,
                   "--tokenizer": args.tokenizer}, overwrite=args.overwrite)
    try:
        judge = settings_from_args(args, "judge-") if args.judge_base_url or args.judge_model else None
        settings = QualitySettings(
            sample=args.sample, seed=args.seed, repetition_threshold=args.repetition_threshold,
            duplicate_threshold=args.duplicate_threshold, copy_threshold=args.copy_threshold,
            irrelevance_threshold=args.irrelevance_threshold, embed_model=args.embed_model,
            embed_max_tokens=args.embed_max_tokens, embed_batch_size=args.embed_batch_size, judge=judge,
            judge_sample=args.judge_sample)
        results = measure_quality(args.synthetic, args.corpus, args.out, settings, pairs=args.pairs,
                                  tokenizer=args.tokenizer, overwrite=args.overwrite, allow_partial=args.allow_partial)
    except JudgeIncomplete as e:
        print(f"error: {e}; no results written to {args.out}: rerun when the endpoint is healthy, or pass "
              "--allow-partial to write them without those verdicts", file=sys.stderr)
        return EXIT_PARTIAL
    except (ValueError, OSError) as e:  # QualityError, CorpusError, TokenizerError, EmbedError, LLMSettings' checks
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if results["partial"]:
        print(f"warning: {sum(results['missing']['judge'].values())} judge requests went unanswered; the results "
              "leave them out of the non-factual rate and say \"partial\": true", file=sys.stderr)
    print("\n" + render_table(results))
    out = Path(args.out)
    print(f"-> {out / 'results.json'}\n-> {out / 'results.md'}\n-> {out / 'documents.parquet'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
