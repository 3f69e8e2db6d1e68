"""What every tool in tools/ checks on its command line before it touches the disk: outputs that
would destroy an input, existing outputs without --overwrite, and float flags that are not finite numbers.

    parser = ToolParser(description=__doc__)        # argparse, but a refusal is ONE stderr line, exit 2
    parser.add_argument("--temperature", type=nonnegative_float)
    args = parser.parse_args(argv)
    check_outputs(parser, {"--output-prefix": prefix(args.output_prefix)},
                  {"--input": args.input, "--tokenizer": args.tokenizer})   # exits 2 on a refusal

The overlap rule and the other checks: docs/training.md ("What every tool checks on its command line").
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from megasynth.data.readers import FORMATS, KNOWN_INPUTS, TEXT_MODES, ReaderOptions
from megasynth.io import owned_names

# The files of a token prefix (the synthetic pipelines add .provenance.parquet): what an output prefix writes
# unless its tool names other suffixes (embeddings: EMB.npy/.json/.embed-work, pair tables: .parquet/.json/.png).
TOKEN_SUFFIXES = (".bin", ".idx", ".json", ".mask", ".provenance.parquet", ".max_token_id.json")
# Every file a prefix-named input can have: an input prefix stands for all of them.
PREFIX_SUFFIXES = TOKEN_SUFFIXES + (".npy", ".embed-work", ".parquet", ".png")


# -- parsing ----------------------------------------------------------------------------------------------------------
class ToolParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one stderr line, `PROG: error: MESSAGE`, and exit code 2 (argparse's
    own prints the usage block first). Every tool in tools/ builds its parser with it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(str(message).split())}\n")


_FLOAT_TYPES: set[Callable[[str], float]] = set()


def float_range(low: float | None = None, high: float | None = None, *, low_open: bool = False,
                high_open: bool = False) -> Callable[[str], float]:
    """An argparse `type=` that accepts finite numbers within the bounds (None: unbounded on that side; `*_open`
    excludes the bound itself) and refuses anything else, nan and inf included, naming what was expected."""
    if low is None and high is None:
        expected = "a finite number"
    elif high is None:
        expected = f"a number {'>' if low_open else '>='} {low:g}"
    elif low is None:
        expected = f"a number {'<' if high_open else '<='} {high:g}"
    else:
        expected = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except (TypeError, ValueError):
            value = math.nan
        if (not math.isfinite(value) or (low is not None and (value <= low if low_open else value < low))
                or (high is not None and (value >= high if high_open else value > high))):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    _FLOAT_TYPES.add(parse)
    return parse


finite_float = float_range()
positive_float = float_range(0.0, low_open=True)
nonnegative_float = float_range(0.0)
unit_float = float_range(0.0, 1.0)


def is_float_type(fn: Any) -> bool:
    """True for the validators made here (what the test over tools/*.py requires of every float flag)."""
    return fn in _FLOAT_TYPES


# -- paths ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PathSpec:
    """A path and what it names: "prefix", "file", "dir", "run" (a training run or step directory) or "any"
    (an input that may be a file, a directory, a prefix or a glob). `names`: for a "dir" output, the files the
    tool writes there, literal or glob patterns (what --overwrite may replace; without `names` any entry counts);
    for a "prefix" output, the suffixes it writes."""

    path: str
    kind: str
    names: tuple[str, ...] | None = None


def prefix(path: str | os.PathLike, suffixes: Iterable[str] | None = None) -> PathSpec:
    """As an output: PATH + each of `suffixes` (default TOKEN_SUFFIXES); as an input: PATH + any PREFIX_SUFFIXES."""
    return PathSpec(os.fspath(path), "prefix", tuple(suffixes) if suffixes is not None else None)


def file(path: str | os.PathLike) -> PathSpec:
    return PathSpec(os.fspath(path), "file")


def directory(path: str | os.PathLike, names: Iterable[str] | None = None) -> PathSpec:
    return PathSpec(os.fspath(path), "dir", tuple(names) if names is not None else None)


def run_dir(path: str | os.PathLike) -> PathSpec:
    """A --checkpoint argument: a run directory (its checkpoints/, tokenizer/, config.toml and metrics.jsonl
    are inputs; other outputs may sit beside them) or one step directory, known by its meta.json (all of it
    is an input)."""
    return PathSpec(os.fspath(path), "run")


# One place a spec occupies: (as the user wrote it, real path, whole). A whole entry conflicts with anything
# inside it; a container entry (a run directory) only with itself and what contains it.
_Entry = tuple[str, str, bool]


def _real(path: str) -> str:
    return os.path.realpath(os.path.expanduser(path))


def _entries(spec: PathSpec, output: bool = False) -> list[_Entry]:
    path = spec.path
    if spec.kind in ("file", "dir"):
        return [(path, _real(path), True)]
    if spec.kind == "prefix" and output:
        return [(path + s, _real(path + s), True) for s in spec.names or TOKEN_SUFFIXES]
    prefix_files = [(path + s, _real(path + s), True) for s in dict.fromkeys(PREFIX_SUFFIXES + (spec.names or ()))]
    if spec.kind == "prefix":
        return prefix_files
    if spec.kind == "run" and not os.path.lexists(os.path.join(path, "meta.json")):  # a run, not one step
        parts = ("checkpoints", "tokenizer", "config.toml", "metrics.jsonl")
        return [(path, _real(path), False)] + [(os.path.join(path, p), _real(os.path.join(path, p)), True)
                                               for p in parts]
    if glob.has_magic(path):
        return [e for match in sorted(glob.glob(path)) for e in _entries(PathSpec(match, "any"))]
    # "any" (and a step directory): the path itself when it exists or names no prefix, and its prefix files.
    if os.path.lexists(path) or not any(os.path.lexists(p) for p, _, _ in prefix_files):
        return [(path, _real(path), True)] + prefix_files
    return prefix_files


def _specs(value: Any) -> list[PathSpec]:
    if value is None or (isinstance(value, str) and not value):  # an unset flag
        return []
    if isinstance(value, PathSpec):
        return [value]
    if isinstance(value, (str, os.PathLike)):
        return [PathSpec(os.fspath(value), "any")]
    return [s for v in value for s in _specs(v)]


def _inside(inner: str, outer: str) -> bool:
    return inner != outer and inner.startswith(outer.rstrip(os.sep) + os.sep)


def _label(flag: str, path: str) -> str:
    return f"{flag} {path}" if flag else path


def overlap_refusal(outputs: Mapping[str, Any], inputs: Mapping[str, Any]) -> str | None:
    """The one-line reason why writing `outputs` would destroy one of `inputs`, or None. Both map a flag name
    (or "" in library code) to a PathSpec, a path string (an "any" input), or a list of them."""
    ins = [(flag, e) for flag, value in inputs.items() for spec in _specs(value) for e in _entries(spec)]
    for oflag, value in outputs.items():
        for spec in _specs(value):
            found = []
            for _oshown, oreal, _ in _entries(spec, output=True):
                for iflag, (ishown, ireal, iwhole) in ins:
                    if oreal == ireal:
                        what = "would overwrite the input"
                    elif _inside(ireal, oreal):
                        what = "is a directory that holds the input"
                    elif iwhole and _inside(oreal, ireal):
                        what = "would be written inside the input"
                    else:
                        continue
                    found.append((not os.path.lexists(ishown), what, iflag, ishown))
            if found:  # name a file that exists (EMB.json, not the EMB.bin no one wrote) where there is one
                _, what, iflag, ishown = min(found, key=lambda f: f[0])
                return f"{_label(oflag, spec.path)}: the output {what} {_label(iflag, ishown)}"
    return None


def existing_outputs(spec: PathSpec) -> list[str]:
    """The files of an output that exist already (for a "dir" with `names`, only the entries they name count:
    literal names or glob patterns, as megasynth.io.atomic_files owns them)."""
    if spec.kind == "dir":
        if not os.path.isdir(spec.path):  # a file where the directory should be is in the way too
            return [os.path.basename(spec.path.rstrip(os.sep))] if os.path.lexists(spec.path) else []
        return sorted(os.listdir(spec.path)) if spec.names is None else owned_names(spec.names, os.listdir(spec.path))
    return [os.path.basename(shown) for shown, _, _ in _entries(spec, output=True) if os.path.lexists(shown)]


def output_refusal(outputs: Mapping[str, Any], inputs: Mapping[str, Any], *,
                   overwrite: bool | None = None) -> str | None:
    """overlap_refusal, then (unless `overwrite` is None: the tool checks existence itself, e.g. to resume)
    an existing output without `overwrite`."""
    refusal = overlap_refusal(outputs, inputs)
    if refusal or overwrite is None or overwrite:
        return refusal
    for flag, value in outputs.items():
        for spec in _specs(value):
            found = existing_outputs(spec)
            if found:
                return f"{_label(flag, spec.path)}: already exists ({', '.join(found)}); pass --overwrite to replace it"
    return None


def check_outputs(parser: argparse.ArgumentParser, outputs: Mapping[str, Any], inputs: Mapping[str, Any], *,
                  overwrite: bool | None = None) -> None:
    """output_refusal as a command-line error: one stderr line naming the flags, exit code 2, nothing written.
    Call it right after parse_args, before any work."""
    refusal = output_refusal(outputs, inputs, overwrite=overwrite)
    if refusal:
        parser.error(refusal)


# -- the LLM pipelines' tools (tools/entigraph.py, tools/rephrase.py) ------------------------------------------------
# Exit codes: 0 the output was written (complete, or without the failed items under --allow-partial); 1 requests
# still without a record (rerun the same command); 2 bad input or output; 3 stopped by the budget; 4 some items
# failed and nothing was written (a run never drops data silently); 130 interrupted.
EXIT_INCOMPLETE = 1
EXIT_BAD_INPUT = 2
EXIT_BUDGET = 3
EXIT_PARTIAL = 4


def refuse_without_output(error: BaseException, output_prefix: str) -> int:
    """A tool's one-line report of an error that left no output (bad input, or an OSError: an unwritable
    directory, a full disk), then "no output written to OUTPUT"; returns EXIT_BAD_INPUT."""
    oserror = isinstance(error, OSError)
    print(f"{error.filename or output_prefix}: {error.strerror or error}" if oserror else error, file=sys.stderr)
    print(f"no output written to {output_prefix}", file=sys.stderr)
    return EXIT_BAD_INPUT


def add_source_arguments(parser: argparse.ArgumentParser, *, tokenizer_help: str) -> None:
    """--input, --input-tokenizer, --work-dir, --output-prefix and --tokenizer of an LLM pipeline."""
    parser.add_argument("--input", required=True, metavar="PATH",
                        help="documents JSONL ({'id', 'title'?, 'text'}) or an indexed prefix")
    parser.add_argument("--input-tokenizer", default=None, metavar="PATH",
                        help="for a prefix --input: the tokenizer that decodes it (default: the one its sidecar names)")
    parser.add_argument("--work-dir", required=True, metavar="DIR",
                        help="records, ledger and manifest; the same directory resumes an earlier run (one that is, "
                             "holds or sits inside an input is refused). With --worker/--publish: the work units' "
                             "directory, on a filesystem every worker sees (docs/cluster.md)")
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


LLM_UNIT_DOCS = 256  # default of megasynth.synth.llm.runner_units.WorkerRun.unit_docs; here so --help loads no library


def add_llm_worker_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """add_worker_arguments' flags for an LLM pipeline (its --work-dir is add_source_arguments'), and --unit-docs:
    a unit is a slice of documents. Read them back with parse_llm_pipeline_args."""
    g = add_worker_arguments(parser, default_work_dir=None)
    g.add_argument("--unit-docs", type=int, default=LLM_UNIT_DOCS, metavar="N", help="with --worker/--publish: a "
                   f"work unit is a slice of N source documents in input order (default {LLM_UNIT_DOCS}); part of "
                   "the work directory's settings. A worker resumes an unfinished unit without asking again for a "
                   "finished request, and --budget-tokens/--budget-usd are split evenly over the units")
    return g


def parse_llm_pipeline_args(parser: argparse.ArgumentParser, argv: list[str] | None,
                            *more_inputs: str) -> tuple[argparse.Namespace, Any]:
    """An LLM pipeline tool's arguments and the megasynth.synth.llm.runner_units.WorkerRun of its
    add_llm_worker_arguments' flags (None: the single-process run), with its paths checked before the work dir is
    touched: --output-prefix and --work-dir are outputs, add_source_arguments' inputs and `more_inputs` (more input
    flags, e.g. "--target-tokens-of") inputs. A bad flag is a command-line error (exit 2)."""
    args = parser.parse_args(argv)
    inputs = {flag: getattr(args, flag[2:].replace("-", "_"))
              for flag in ("--input", "--input-tokenizer", "--tokenizer", *more_inputs)}
    try:
        mode = worker_mode(args)
    except ValueError as e:
        parser.error(str(e))
    if mode is not None and args.unit_docs < 1:
        parser.error(f"--unit-docs must be >= 1, got {args.unit_docs}")
    check_outputs(parser, {"--output-prefix": prefix(args.output_prefix), "--work-dir": directory(args.work_dir)},
                  inputs)
    if mode is None:
        return args, None
    from megasynth.synth.llm.runner_units import WorkerRun  # noqa: PLC0415 - the library is not loaded for --help

    return args, WorkerRun(*mode, unit_docs=args.unit_docs,
                           log=None if args.no_progress else lambda line: print(line, file=sys.stderr))


def _missing_total(missing: dict) -> int:
    return sum(n for kind in missing.values() for reasons in kind.values() for n in reasons.values())


def _report_missing(missing: dict, *, published: bool, output_prefix: str) -> None:
    """Stderr lines: what the output lacks, by kind, step and reason, and how to continue."""
    hows = {"transient": "transient: a plain rerun asks again",
            "permanent": "permanent after --max-attempts: --retry-failed asks again"}
    for kind, how in hows.items():
        for step, reasons in sorted(missing.get(kind, {}).items()):
            if reasons:
                shown = ", ".join(f"{reason} {n:,}" for reason, n in sorted(reasons.items()))
                print(f"missing {step} items ({how}): {shown}", file=sys.stderr)
    transient = sum(n for reasons in missing.get("transient", {}).values() for n in reasons.values())
    permanent = _missing_total(missing) - transient
    steps = []
    if transient:
        steps.append("rerun the same command" + (" with --overwrite" if published else ""))
    if permanent:
        steps.append(("add" if transient else "rerun with") + " --retry-failed"
                     + (" --overwrite" if published and not transient else ""))
    todo = " and ".join(steps)
    if published:
        print(f"published {output_prefix} without {_missing_total(missing):,} failed items (--allow-partial; the "
              f"sidecar says partial); to fill them in, {todo}", file=sys.stderr)
    else:
        print(f"{_missing_total(missing):,} items failed: no output written to {output_prefix} (exit "
              f"{EXIT_PARTIAL}); {todo} to ask for them again, or pass --allow-partial to publish without them",
              file=sys.stderr)


def run_llm_pipeline(call: Callable[[], dict], output_prefix: str) -> tuple[dict | None, int]:
    """Run an LLM pipeline (megasynth.synth.llm.runner): (its result, 0) when the output was written; (None, exit
    code) after printing why not."""
    # Imported here: the library is not loaded for --help.
    from megasynth.data.indexed import IndexedDatasetError  # noqa: PLC0415
    from megasynth.data.prefix import PrefixOutputError  # noqa: PLC0415
    from megasynth.data.readers import BadInputError, InputError  # noqa: PLC0415
    from megasynth.io import JsonlError  # noqa: PLC0415
    from megasynth.run_lock import RunDirBusy  # noqa: PLC0415
    from megasynth.synth.llm.ledger import anomalies_text  # noqa: PLC0415
    from megasynth.synth.llm.prompts import PromptError  # noqa: PLC0415
    from megasynth.synth.workdir import WorkDirMismatch  # noqa: PLC0415
    from megasynth.tokenizer import TokenizerError  # noqa: PLC0415
    from megasynth.work_units import WorkUnitsError  # noqa: PLC0415

    try:
        out = call()
    # OSError: the work dir or the output directory is not writable, the disk is full.
    except (BadInputError, InputError, JsonlError, TokenizerError, IndexedDatasetError, PrefixOutputError,
            WorkDirMismatch, RunDirBusy, PromptError, WorkUnitsError, OSError) as e:
        return None, refuse_without_output(e, output_prefix)
    except KeyboardInterrupt:
        print("interrupted; every finished request is recorded, rerun the same command to continue",
              file=sys.stderr)
        return None, 130
    if "units" in out and "sidecar" not in out:  # a worker that did not publish
        return None, _report_worker(out, output_prefix)
    if "units" in out:
        print(_worker_line(out), file=sys.stderr)
    llm = out["llm"]
    if anomalies_text(llm):  # what a hostile or broken endpoint made the client correct
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
    if _missing_total(out["missing"]):
        _report_missing(out["missing"], published=out["sidecar"] is not None, output_prefix=output_prefix)
        if out["sidecar"] is None:
            return None, EXIT_PARTIAL
    return out, 0


def _worker_line(out: dict) -> str:
    busy = f", {len(out['busy'])} held by other live workers" if out.get("busy") else ""
    return f"worker {out['worker']}: made {len(out['made'])} of {out['units']} units{busy}"


def _report_worker(out: dict, output_prefix: str) -> int:
    """A worker's report when it published nothing (megasynth.synth.llm.runner_units.run_units' result): 0 when
    every unit it took was published; else, after saying why on stderr, EXIT_BUDGET, EXIT_PARTIAL or
    EXIT_INCOMPLETE for the first of its units' reasons in that order."""
    if out.get("already_published"):
        print(f"{output_prefix}: already published from the {out['units']} units of this work dir; nothing to do")
        return 0
    passed = {why: ", ".join(map(str, units)) for why, units in out["passed"].items()}
    why = "" if out["publish"] == "never" else "; not every unit is done yet, so nothing is published"
    print(f"{_worker_line(out)}{why}", file=sys.stderr if passed else sys.stdout)
    if "budget" in passed:
        share = " and ".join(f"{v:,} tokens" if k == "tokens" else f"${v:.4f}" for k, v in out["budget"].items()
                             if v is not None)
        print(f"units {passed['budget']} stopped by the budget (split evenly over the {out['units']} units: {share} "
              "each); their finished requests are kept: rerun with a larger --budget-tokens/--budget-usd to "
              "continue", file=sys.stderr)
    if "failed" in passed:
        print(f"units {passed['failed']} left unpublished:", file=sys.stderr)
        _report_missing(out["passed_missing"], published=False, output_prefix=output_prefix)
    if "incomplete" in passed:
        print(f"units {passed['incomplete']} ended with requests still missing; rerun the same command to continue",
              file=sys.stderr)
    return (EXIT_BUDGET if "budget" in passed else EXIT_PARTIAL if "failed" in passed else
            EXIT_INCOMPLETE if passed else 0)


# -- the input flags of tools/preprocess_data.py and tools/train_tokenizer.py ---------------------------------------
def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("input")
    g.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help=f"input files, directories (searched recursively) or quoted globs; {KNOWN_INPUTS}")
    g.add_argument("--input-format", choices=("auto", *FORMATS), default="auto",
                   help="read every input as this format instead of guessing from the suffix (default auto)")
    g.add_argument("--json-key", default="text", help="JSONL: the key holding each document's text (default text)")
    g.add_argument("--text-column", default="text", help="Parquet: the column holding the text (default text)")
    g.add_argument("--text-mode", choices=TEXT_MODES, default="file",
                   help="plain text: one document per file, per line, or per blank-line-separated paragraph "
                        "(default file)")
    g.add_argument("--skip-bad-lines", action="store_true",
                   help="skip and count records that cannot be read (invalid JSON or UTF-8, missing key, "
                        "non-string value) instead of stopping at the first one")
    g.add_argument("--max-bad-lines-shown", type=int, default=5, metavar="N",
                   help="with --skip-bad-lines, how many bad locations the final report lists (default 5)")


def reader_options_from_args(args: argparse.Namespace, *, batch_size: int = 1024) -> ReaderOptions:
    return ReaderOptions(json_key=args.json_key, text_column=args.text_column, text_mode=args.text_mode,
                         input_format=args.input_format, skip_bad=args.skip_bad_lines, batch_size=batch_size,
                         max_bad_shown=args.max_bad_lines_shown)


# -- independent workers over work units (megasynth.work_units) ------------------------------------------------------
def add_worker_arguments(parser: argparse.ArgumentParser, *, default_work_dir: str | None) -> argparse._ArgumentGroup:
    """--worker, --work-dir, --publish and --no-publish of every stage that runs as independent workers
    (docs/cluster.md); default_work_dir=None: the tool has its own --work-dir already."""
    g = parser.add_argument_group("independent workers (docs/cluster.md)")
    g.add_argument("--worker", metavar="I/N", help="run as worker I of N (from 0) over the work units in --work-dir, "
                   "on any host that sees it; any number of workers may run at once, and one started again skips "
                   "finished units. `auto`: a Slurm array task (SLURM_ARRAY_TASK_ID/COUNT) or torchrun's RANK/"
                   "WORLD_SIZE. The last worker to find every unit done publishes the output. Without --worker (and "
                   "--publish): one process does everything, as always")
    if default_work_dir is not None:
        g.add_argument("--work-dir", metavar="W", help=f"where the units, their records and the manifest go (default "
                       f"{default_work_dir}); on a filesystem every worker sees, with working file locks (NFSv4, "
                       "Lustre with -o flock, GPFS, a local disk). It stays after publishing: remove it yourself")
    g.add_argument("--publish", action="store_true", help="make no unit: check that every unit is done with these "
                   "settings and assemble the output (the job after a Slurm array); refused, naming the missing "
                   "units, before then")
    g.add_argument("--no-publish", action="store_true", help="as a worker, only make units; leave publishing to a "
                   "--publish job")
    return g


def worker_mode(args: argparse.Namespace) -> tuple[Any, str] | None:
    """(Worker, publish mode) from add_worker_arguments' flags, or None for the single-process run; ValueError
    (a one-line message) for a bad --worker or contradicting flags."""
    from megasynth.work_units import Worker, WorkUnitsError  # noqa: PLC0415

    if args.publish and args.no_publish:
        raise ValueError("--publish and --no-publish contradict each other")
    if args.worker is None and not args.publish:
        if args.no_publish:
            raise ValueError("--no-publish needs --worker I/N")
        return None
    try:
        worker = Worker.parse(args.worker) if args.worker is not None else Worker()
    except WorkUnitsError as e:
        raise ValueError(str(e)) from None
    return worker, "only" if args.publish else "never" if args.no_publish else "auto"


def worker_outcome(out: dict, worker: Any, output: str, wrote: str) -> str:
    """The line a stage's tool prints for a worker: `wrote` (what the publisher wrote) when this call published,
    else what it made; the same words for every stage."""
    if out.get("already_published"):
        return f"{output}: already published from {out['units']} units"
    if out["published"]:
        return f"{wrote} from {out['units']} units ({len(out['made'])} made by worker {worker})"
    return _worker_line({**out, "worker": worker})
