"""What tools/entigraph.py and tools/rephrase.py share around their library call: the source and output
flags (`add_source_arguments`), exit codes and messages.

    out, code = run_tool(lambda: run_entigraph(cfg), cfg.output_prefix)
    if out is None:
        return code          # 2: bad input/output (one line on stderr), 3: stopped by the budget, 1: incomplete

A pipeline result is a dict with "complete", "budget_stopped", "sidecar", "llm" (the ledger summary) and
"failed" ({step: {reason: count}}).
"""

from __future__ import annotations

import argparse
import sys

from megasynth.data.indexed import IndexedDatasetError
from megasynth.data.prefix import PrefixOutputError
from megasynth.data.readers import BadInputError, InputError
from megasynth.io import JsonlError
from megasynth.run_lock import RunDirBusy
from megasynth.synth.prompts import PromptError
from megasynth.synth.workdir import WorkDirMismatch
from megasynth.tokenizer import TokenizerError

EXIT_BUDGET = 3
_INPUT_ERRORS = (BadInputError, InputError, JsonlError, TokenizerError, IndexedDatasetError, PrefixOutputError,
                 WorkDirMismatch, RunDirBusy, PromptError)


def add_source_arguments(parser: argparse.ArgumentParser, *, tokenizer_help: str) -> None:
    """--input, --input-tokenizer, --work-dir, --output-prefix and --tokenizer, as both pipelines take them."""
    parser.add_argument("--input", required=True, metavar="PATH",
                        help="documents JSONL ({'id', 'title'?, 'text'}) or an indexed prefix")
    parser.add_argument("--input-tokenizer", default=None, metavar="PATH",
                        help="for a prefix --input: the tokenizer that decodes it (default: the one its sidecar names)")
    parser.add_argument("--work-dir", required=True, metavar="DIR",
                        help="records, ledger and manifest; the same directory resumes an earlier run")
    parser.add_argument("--output-prefix", required=True, metavar="PREFIX",
                        help="writes PREFIX.bin/.idx/.json and PREFIX.provenance.parquet")
    parser.add_argument("--tokenizer", required=True, metavar="PATH", help=tokenizer_help)


def run_tool(call, output_prefix: str) -> tuple[dict | None, int]:
    """(result, 0) when the output was written; (None, exit code) after printing why not."""
    try:
        out = call()
    except _INPUT_ERRORS as e:
        print(f"{e}", file=sys.stderr)
        print(f"no output written to {output_prefix}", file=sys.stderr)
        return None, 2
    except OSError as e:  # the work dir or the output directory is not writable, the disk is full
        print(f"{e.filename or output_prefix}: {e.strerror or e}", file=sys.stderr)
        print(f"no output written to {output_prefix}", file=sys.stderr)
        return None, 2
    except KeyboardInterrupt:
        print("interrupted; every finished request is recorded, rerun the same command to continue",
              file=sys.stderr)
        return None, 130
    llm = out["llm"]
    spent = (f"{llm['requests']:,} requests in the ledger, {llm['prompt_tokens']:,} in / "
             f"{llm['completion_tokens']:,} out tokens, ${llm['cost_usd']:.4f}")
    if out["budget_stopped"]:
        print(f"stopped by the budget ({spent}); the finished requests are recorded: rerun with a larger "
              f"--budget-tokens/--budget-usd to continue. No output written to {output_prefix}", file=sys.stderr)
        return None, EXIT_BUDGET
    if not out["complete"]:
        print(f"the run ended with requests still missing ({spent}); rerun the same command to continue. No "
              f"output written to {output_prefix}", file=sys.stderr)
        return None, 1
    return out, 0


def report_failures(failed: dict[str, dict[str, int]]) -> None:
    """One stderr line per step with failed items, by reason, and how to retry them."""
    any_failed = False
    for step, reasons in failed.items():
        if reasons:
            any_failed = True
            shown = ", ".join(f"{reason} {n:,}" for reason, n in sorted(reasons.items()))
            print(f"failed {step} requests (left out): {shown}", file=sys.stderr)
    if any_failed:
        print("rerun with --retry-failed to ask for the failed items again", file=sys.stderr)
