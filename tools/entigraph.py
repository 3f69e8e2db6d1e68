"""EntiGraph: turn a small corpus into a large synthetic one through any OpenAI-compatible LLM.

    OPENAI_API_KEY=... python tools/entigraph.py --input docs.jsonl --work-dir runs/eg --output-prefix data/eg \\
        --tokenizer tok/ --base-url https://api.openai.com/v1 --model gpt-4o-mini --max-pairs-per-doc 200 \\
        --max-triples-per-doc 50 --concurrency 32 --budget-usd 20 --price-in 0.15 --price-out 0.6
    python tools/entigraph.py ... --base-url http://localhost:8000/v1 --model Qwen/Qwen3-8B     # a vLLM server

Input: JSONL documents {"id", "title" (optional), "text"} (ids unique), or an indexed prefix (decoded with
--input-tokenizer, default the tokenizer its sidecar names). Per document, one request extracts a summary and the
salient entities (JSON); then, for entity pairs (all, or a seeded sample of --max-pairs-per-doc) and a seeded
sample of --max-triples-per-doc triples, one request each writes how those entities relate in the document.
With --entity-questions, also one request per entity (the EntiGraph reference's single-entity step): a
description of the entity and questions with answers about it, in the context of the document.

Resumable: every finished request is appended to WORK_DIR/entities.jsonl or relations.jsonl before it counts;
run the same command again after a crash, a kill or a budget stop and only the missing requests are sent.
Transient failures (429 with its Retry-After, 408, 5xx, timeouts, dropped connections) are retried with
backoff for up to --transient-budget-s seconds per item and never count as attempts; --max-attempts bounds the
content failures (invalid JSON after repairs, empty replies, other 4xx). An item that still fails is recorded
with the reason and whether it was transient: a plain rerun asks for the transient ones again, --retry-failed
also for the permanent ones. A run that leaves items out lists them (by step and reason) and writes nothing,
unless --allow-partial, which publishes the rest and marks the sidecar "partial". The output prefix (relation
texts, and with --include-summaries the summaries, each a document ending with EOD) is built from the records
in a fixed order, so every rerun gives the same bytes; PREFIX.provenance.parquet names each document's source,
step and entities; the sidecar records the model, the prompt hash, the counts and the estimated cost.
WORK_DIR/ledger.jsonl has one line per finished request.

An --output-prefix that is the --input (or one of its files, or a tokenizer), and a --work-dir that is, holds or
sits inside one of those, are refused before anything is written, --overwrite or not.

On a cluster (docs/cluster.md, docs/synth.md "Workers"): `--worker I/N` (or `auto` in a Slurm array) makes worker
I's work units (slices of --unit-docs documents) in --work-dir, each with its own records and ledger, so a worker
killed mid-unit is resumed by the next without asking again for a finished request; --budget-tokens/--budget-usd
are split evenly over the units; the last worker to find every unit done (or a `--publish` job) writes the output
from every unit's records, the bytes a one-process run writes for the same replies:

    sbatch --array=0-15 --wrap "python tools/entigraph.py --input docs.jsonl --work-dir /shared/eg.work \
        --output-prefix /shared/data/eg --tokenizer tok/ --base-url http://vllm:8000/v1 --model M --worker auto"

Exit codes: 0 written (complete, or partial with --allow-partial; a worker: its units done); 1 requests still
unanswered (rerun to continue); 2 bad input or output (one line on stderr; a --publish with units missing names
them); 3 stopped by the budget (records kept, no output: rerun with a larger budget to continue); 4 partial: items
failed, no output (rerun, --retry-failed or --allow-partial, as printed); 130 interrupted. The API key is read
from --api-key-env and written nowhere.
"""

from __future__ import annotations

import argparse
import sys

from megasynth.cli import (
    ToolParser, add_llm_worker_arguments, add_outcome_arguments, add_source_arguments, parse_llm_pipeline_args,
    run_llm_pipeline,
)
from megasynth.synth.llm import add_llm_arguments, settings_from_args


def build_parser() -> argparse.ArgumentParser:
    parser = ToolParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_arguments(parser, tokenizer_help="tokenizer of the output prefix")
    parser.add_argument("--max-pairs-per-doc", type=int, default=None, metavar="M",
                        help="most entity pairs per document, a seeded sample (default: every pair)")
    parser.add_argument("--max-triples-per-doc", type=int, default=20, metavar="K",
                        help="most entity triples per document, a seeded sample (default 20; 0: none)")
    parser.add_argument("--max-entities", type=int, default=None, metavar="E",
                        help="most entities per document: the entity step's JSON schema caps the list (a server "
                             "with structured output cannot exceed it; a longer list from another gets a repair "
                             "request); bounds the pairs and triples as well (default: no cap)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pair and triple samples (default 0)")
    parser.add_argument("--include-summaries", action="store_true",
                        help="also write each document's summary as a synthetic document")
    parser.add_argument("--entity-questions", action="store_true",
                        help="also the single-entity step: per entity, one request for a description of it and "
                             "questions with answers about it (off by default; a work dir made without it is refused "
                             "with it, and the other way round)")
    add_outcome_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_llm_arguments(parser)
    add_llm_worker_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    from megasynth.synth.entigraph import EntiGraphConfig, run_entigraph

    parser = build_parser()
    args, workers = parse_llm_pipeline_args(parser, argv)
    if args.max_pairs_per_doc is not None and args.max_pairs_per_doc < 0 or args.max_triples_per_doc < 0:
        parser.error("--max-pairs-per-doc and --max-triples-per-doc must be >= 0")
    if args.max_entities is not None and args.max_entities < 1:
        parser.error(f"--max-entities must be >= 1, got {args.max_entities}")
    try:
        # Every attempt may be a JSON repair: a document whose replies are never valid fails after exactly
        # --max-attempts requests.
        llm = settings_from_args(args, json_repair_attempts=args.max_attempts - 1)
    except ValueError as e:
        parser.error(str(e))
    cfg = EntiGraphConfig(input=args.input, work_dir=args.work_dir, output_prefix=args.output_prefix,
                          tokenizer=args.tokenizer, llm=llm, input_tokenizer=args.input_tokenizer,
                          max_pairs_per_doc=args.max_pairs_per_doc, max_triples_per_doc=args.max_triples_per_doc,
                          max_entities=args.max_entities, seed=args.seed, include_summaries=args.include_summaries,
                          entity_questions=args.entity_questions, retry_failed=args.retry_failed,
                          allow_partial=args.allow_partial, overwrite=args.overwrite, progress=not args.no_progress)
    out, code = run_llm_pipeline(lambda: run_entigraph(cfg, workers), args.output_prefix)
    if out is None:
        return code
    c = out["counts"]
    questions = f"{c['entity_questions']:,} entity questions, " if args.entity_questions else ""
    print(f"wrote {args.output_prefix}: {out['sidecar']['num_documents']:,} documents, "
          f"{out['sidecar']['num_tokens']:,} tokens from {c['documents']:,} source documents "
          f"({c['entities']:,} entities, {questions}{c['pairs']:,} pairs, {c['triples']:,} triples, "
          f"{c['summaries']:,} summaries) | {out['llm']['requests']:,} requests in the ledger, "
          f"{out['llm']['prompt_tokens']:,} in / {out['llm']['completion_tokens']:,} out tokens, "
          f"${out['llm']['cost_usd']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
