"""Evaluate a checkpoint: multiple-choice, generative and closed-book QuALITY tasks, and perplexity.

    python tools/eval.py --checkpoint runs/tiny --tasks examples/eval/*.jsonl --out eval/tiny
    python tools/eval.py --checkpoint runs/tiny --perplexity data/valid --out eval/tiny-ppl
    torchrun --nproc_per_node=8 tools/eval.py --checkpoint runs/big --tasks qa.jsonl --num-fewshot 5 --out eval/big

Task files are JSONL, one task per file, named by the file (schemas: docs/eval.md). Writes OUT/results.json
(per task: metrics, n, config), OUT/results.md (a Markdown table, also printed) and OUT/predictions/TASK.jsonl
(per-example predictions). Under torchrun each rank scores its share and the sums are reduced exactly.
OUT is published like a prefix: the report is built beside it and moved in with results.json last, so a reader
sees the complete old or the complete new report; other files in OUT are left alone. An existing report is
refused unless --overwrite (which replaces only results.json, results.md and predictions/).
Task files are checked before the model loads; exit code 2 with FILE:LINE: message on bad input, and with one
line for an existing report without --overwrite or an OUT that is, holds or sits inside an input (a task file,
a prefix, the checkpoint's files).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from megasynth.chat import ChatTemplateError, load_chat_template
from megasynth.checkpoint import read_meta
from megasynth.cli import ToolParser, check_outputs, directory, nonnegative_float, run_dir
from megasynth.cli import prefix as prefix_spec
from megasynth.data.indexed import IndexedDataset, IndexedDatasetError, prefix_exists
from megasynth.eval.harness import EvalSettings, run_perplexity, run_task
from megasynth.eval.report import RESULT_FILES, markdown_table, write_report
from megasynth.eval.tasks import TASK_TYPES, TaskError, load_task
from megasynth.generate import add_model_arguments, run_with_model


def build_parser() -> argparse.ArgumentParser:
    p = ToolParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--tasks", nargs="+", default=[], metavar="FILE", help="task files (JSONL, see docs/eval.md)")
    p.add_argument("--task-type", choices=TASK_TYPES,
                   help="task type for lines without a \"type\" field (applies to every --tasks file)")
    p.add_argument("--perplexity", nargs="+", default=[], metavar="PREFIX",
                   help="indexed-dataset prefixes (PREFIX.bin/.idx) to measure loss and perplexity on")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="where results.json, results.md and predictions/ are written (other files there are kept)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing report in --out (default: refuse, exit 2)")
    p.add_argument("--num-fewshot", type=int, default=0,
                   help="few-shot examples per prompt, drawn from each file's \"split\": \"fewshot\" lines (default 0)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the few-shot draws and of sampling (default 1234)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass (default 16)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="generative tasks: longest answer (default 32)")
    p.add_argument("--temperature", type=nonnegative_float, default=0.0, help="generative tasks: 0 = greedy (default)")
    p.add_argument("--quality-answer", choices=["text", "letter"], default="text",
                   help="QuALITY: score the option texts (default) or list the options and score their letters")
    p.add_argument("--quality-no-title", action="store_true", help="QuALITY: leave the article title out of the prompt")
    p.add_argument("--no-start-token", action="store_true",
                   help="do not start contexts with BOS (or EOD when the tokenizer has no BOS)")
    p.add_argument("--seq-len", type=int, default=0,
                   help="perplexity window length (default: the checkpoint's data.seq_len)")
    p.add_argument("--perplexity-windows", type=int, default=0,
                   help="perplexity on the first N windows of each prefix (default 0: the whole prefix)")
    p.add_argument("--no-document-masking", action="store_true",
                   help="perplexity: let windows attend across document boundaries (training masks them by default)")
    p.add_argument("--chat", action="store_true",
                   help="wrap each task prompt (few-shot examples included) as a user turn in the tokenizer's chat "
                        "template with its generation prompt, as tools/generate.py --chat does (the built-in "
                        "ChatML one when the tokenizer has none); no start token; choices are scored as the "
                        "assistant's answer without the leading space; generation also stops at end of turn")
    return p


def check_inputs(args) -> list:
    """Parse every task file and check every prefix before anything heavy happens."""
    tasks = [load_task(path, args.task_type) for path in args.tasks]
    names = [t.name for t in tasks] + [Path(p).name for p in args.perplexity]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise TaskError(f"two tasks or prefixes share the name(s) {', '.join(dupes)} (results are keyed by file name)")
    for t in tasks:
        if args.num_fewshot > len(t.fewshot):
            raise TaskError(f"{t.path}: --num-fewshot {args.num_fewshot} needs that many \"split\": \"fewshot\" lines, "
                            f"the file has {len(t.fewshot)}")
    for prefix in args.perplexity:
        if not prefix_exists(prefix):
            raise TaskError(f"{prefix}: no such indexed dataset (expected {prefix}.bin and {prefix}.idx)")
        try:
            num_tokens = IndexedDataset(prefix).num_tokens
        except IndexedDatasetError as e:
            raise TaskError(str(e)) from None
        if num_tokens < 2:  # nothing to predict: a perplexity of exp(0 / 0) would read as a perfect 1.00
            raise TaskError(f"{prefix}: {num_tokens} tokens; perplexity needs at least 2 (a token to predict "
                            "and one before it)")
    return tasks


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_outputs(parser, {"--out": directory(args.out, RESULT_FILES)},
                  {"--checkpoint": run_dir(args.checkpoint), "--tokenizer": args.tokenizer, "--tasks": args.tasks,
                   "--perplexity": [prefix_spec(p) for p in args.perplexity]}, overwrite=args.overwrite)
    if not args.tasks and not args.perplexity:
        parser.error("give --tasks FILE ... and/or --perplexity PREFIX ...")
    if args.num_fewshot < 0 or args.batch_size < 1 or args.max_new_tokens < 1 or args.temperature < 0:
        parser.error("need --num-fewshot >= 0, --batch-size >= 1, --max-new-tokens >= 1 and --temperature >= 0")
    try:
        tasks = check_inputs(args)
    except TaskError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run_with_model(args, lambda *loaded: _run(args, tasks, *loaded), require_tokenizer=bool(tasks))


def _run(args, tasks, model, cfg, tok, step_dir, info) -> int:
    settings = EvalSettings(num_fewshot=args.num_fewshot, seed=args.seed, batch_size=args.batch_size,
                            max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            quality_title=not args.quality_no_title, quality_answer=args.quality_answer,
                            start_token=not args.no_start_token, document_masking=not args.no_document_masking,
                            chat=args.chat)
    try:
        template = load_chat_template(tok) if args.chat and tasks else None
    except ChatTemplateError as e:
        print(f"error: --chat: {e}", file=sys.stderr)
        return 2
    seq_len = args.seq_len or cfg.data.seq_len
    results = {"checkpoint": str(step_dir), "step": read_meta(step_dir).get("step"), "settings": asdict(settings),
               "world_size": info.world_size, "tasks": {}}
    predictions = {}
    work = [("task", t) for t in tasks] + [("perplexity", p) for p in args.perplexity]
    bar = tqdm(work, unit="task", disable=not info.is_main, desc="eval")
    try:
        for kind, item in bar:
            if kind == "task":
                bar.set_postfix_str(item.name)
                result, records = run_task(model, tok, item, settings, template)
                results["tasks"][item.name] = result
                if records is not None:
                    predictions[item.name] = records
            else:
                bar.set_postfix_str(Path(item).name)
                results["tasks"][Path(item).name] = run_perplexity(model, item, settings, seq_len=seq_len,
                                                                   num_windows=args.perplexity_windows or None)
    except (ValueError, IndexedDatasetError) as e:  # e.g. a prompt too long for the model, too few windows
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        bar.close()
    if info.is_main:
        try:
            write_report(args.out, results, predictions, overwrite=args.overwrite)
        except FileExistsError as e:  # a report appeared while this one was computed
            print(f"error: --out {e}", file=sys.stderr)
            return 2
        print(markdown_table(results), end="")
        print(f"results: {Path(args.out) / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
