"""What tools/entigraph.py and tools/rephrase.py share around their library call: the source and outcome
flags (`add_source_arguments`, `add_outcome_arguments`), exit codes and messages.

    out, code = run_tool(lambda: run_entigraph(cfg), cfg.output_prefix)
    if out is None:
        return code          # 2: bad input/output (one line on stderr), 3: stopped by the budget, 1: incomplete,
                             # 4: items left out (failed), nothing published

Exit codes (EXIT_*): 0 the output was written (complete, or without the failed items under --allow-partial);
1 requests still without a record (rerun the same command); 2 bad input or output; 3 stopped by the budget;
4 partial: some items failed and nothing was written (issue 19: a run never drops data silently). The failures
are listed by step and reason, split into transient ones (the endpoint's fault: a plain rerun asks again) and
permanent ones (the content's, after --max-attempts: --retry-failed asks again); --allow-partial publishes
without them and the sidecar says "partial". 130: interrupted.

A pipeline result is a dict with "complete", "budget_stopped", "sidecar" (None when nothing was written),
"llm" (the ledger summary), "failed" ({step: {reason: count}}) and "missing" ({"transient": {step: {reason:
count}}, "permanent": {...}}: the failed items the output lacks).
"""

from __future__ import annotations

import argparse
import sys

from megasynth.data.indexed import IndexedDatasetError
from megasynth.data.prefix import PrefixOutputError
from megasynth.data.readers import BadInputError, InputError
from megasynth.io import JsonlError
from megasynth.synth.llm.ledger import anomalies_text
from megasynth.run_lock import RunDirBusy
from megasynth.synth.llm.prompts import PromptError
from megasynth.synth.workdir import WorkDirMismatch
from megasynth.tokenizer import TokenizerError

EXIT_INCOMPLETE = 1
EXIT_BAD_INPUT = 2
EXIT_BUDGET = 3
EXIT_PARTIAL = 4
_INPUT_ERRORS = (BadInputError, InputError, JsonlError, TokenizerError, IndexedDatasetError, PrefixOutputError,
                 WorkDirMismatch, RunDirBusy, PromptError)


def add_source_arguments(parser: argparse.ArgumentParser, *, tokenizer_help: str) -> None:
    """--input, --input-tokenizer, --work-dir, --output-prefix and --tokenizer, as both pipelines take them."""
    parser.add_argument("--input", required=True, metavar="PATH",
                        help="documents JSONL ({'id', 'title'?, 'text'}) or an indexed prefix")
    parser.add_argument("--input-tokenizer", default=None, metavar="PATH",
                        help="for a prefix --input: the tokenizer that decodes it (default: the one its sidecar names)")
    parser.add_argument("--work-dir", required=True, metavar="DIR",
                        help="records, ledger and manifest; the same directory resumes an earlier run (one that is, "
                             "holds or sits inside an input is refused)")
    parser.add_argument("--output-prefix", required=True, metavar="PREFIX",
                        help="writes PREFIX.bin/.idx/.json and PREFIX.provenance.parquet")
    parser.add_argument("--tokenizer", required=True, metavar="PATH", help=tokenizer_help)


def add_outcome_arguments(parser: argparse.ArgumentParser) -> None:
    """--retry-failed, --allow-partial and --overwrite: what a rerun asks again, and what gets published."""
    parser.add_argument("--retry-failed", action="store_true",
                        help="also ask again for items an earlier run recorded as failed for good (invalid JSON, empty "
                             "replies, other 4xx after --max-attempts); transient failures (429, 5xx, timeouts, "
                             "dropped connections) are asked again by any rerun")
    parser.add_argument("--allow-partial", action="store_true",
                        help="publish the output even when items failed (default: write nothing and exit 4); the "
                             "sidecar then says \"partial\": true, with the missing counts")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output prefix")


def missing_total(missing: dict) -> int:
    return sum(n for kind in missing.values() for reasons in kind.values() for n in reasons.values())


def report_missing(missing: dict, *, published: bool, output_prefix: str) -> None:
    """Stderr lines: what the output lacks, by kind, step and reason, and how to continue."""
    hows = {"transient": "transient: a plain rerun asks again",
            "permanent": "permanent after --max-attempts: --retry-failed asks again"}
    for kind, how in hows.items():
        for step, reasons in sorted(missing.get(kind, {}).items()):
            if reasons:
                shown = ", ".join(f"{reason} {n:,}" for reason, n in sorted(reasons.items()))
                print(f"missing {step} items ({how}): {shown}", file=sys.stderr)
    transient = sum(n for reasons in missing.get("transient", {}).values() for n in reasons.values())
    permanent = missing_total(missing) - transient
    steps = []
    if transient:
        steps.append("rerun the same command" + (" with --overwrite" if published else ""))
    if permanent:
        steps.append(("add" if transient else "rerun with") + " --retry-failed"
                     + (" --overwrite" if published and not transient else ""))
    todo = " and ".join(steps)
    if published:
        print(f"published {output_prefix} without {missing_total(missing):,} failed items (--allow-partial; the "
              f"sidecar says partial); to fill them in, {todo}", file=sys.stderr)
    else:
        print(f"{missing_total(missing):,} items failed: no output written to {output_prefix} (exit "
              f"{EXIT_PARTIAL}); {todo} to ask for them again, or pass --allow-partial to publish without them",
              file=sys.stderr)


def run_tool(call, output_prefix: str) -> tuple[dict | None, int]:
    """(result, 0) when the output was written; (None, exit code) after printing why not."""
    try:
        out = call()
    except _INPUT_ERRORS as e:
        print(f"{e}", file=sys.stderr)
        print(f"no output written to {output_prefix}", file=sys.stderr)
        return None, EXIT_BAD_INPUT
    except OSError as e:  # the work dir or the output directory is not writable, the disk is full
        print(f"{e.filename or output_prefix}: {e.strerror or e}", file=sys.stderr)
        print(f"no output written to {output_prefix}", file=sys.stderr)
        return None, EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted; every finished request is recorded, rerun the same command to continue",
              file=sys.stderr)
        return None, 130
    llm = out["llm"]
    if anomalies_text(llm):  # what a hostile or broken endpoint made the client correct (issue 19)
        print(f"endpoint replies corrected: {anomalies_text(llm)} (each marked in the ledger)", file=sys.stderr)
    spent = (f"{llm['requests']:,} requests in the ledger, {llm['prompt_tokens']:,} in / "
             f"{llm['completion_tokens']:,} out tokens, ${llm['cost_usd']:.4f}")
    if out["budget_stopped"]:
        print(f"stopped by the budget ({spent}); the finished requests are recorded: rerun with a larger "
              f"--budget-tokens/--budget-usd to continue. No output written to {output_prefix}", file=sys.stderr)
        return None, EXIT_BUDGET
    if not out["complete"]:
        print(f"the run ended with requests still missing ({spent}); rerun the same command to continue. No "
              f"output written to {output_prefix}", file=sys.stderr)
        return None, EXIT_INCOMPLETE
    if missing_total(out["missing"]):
        report_missing(out["missing"], published=out["sidecar"] is not None, output_prefix=output_prefix)
        if out["sidecar"] is None:
            return None, EXIT_PARTIAL
    return out, 0
