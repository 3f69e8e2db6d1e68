"""Compare training runs: a Markdown table of final held-out losses and a PNG of held-out loss against tokens.

    python tools/compare_runs.py runs/baseline runs/synthetic runs/oracle --out reports/sbp
    python tools/compare_runs.py a/metrics.jsonl b/metrics.jsonl --out cmp --x-axis flops
    python tools/compare_runs.py runs/a runs/b --label "real only" --label "real + synthetic" --out cmp

Each input is a run directory (its metrics.jsonl is read) or a metrics.jsonl file, in the format the trainer
writes (megasynth/metrics.py): "train" lines {"step", "tokens", "flops", ...} and "eval" lines {"step",
"tokens", "flops", "name", "loss", "ppl"}. Writes OUT/comparison.md (per run: steps, tokens, FLOPs, and the
final held-out loss and perplexity per eval set) and OUT/heldout_loss.png (one panel per eval set, one line
per run). A bad line is an error naming FILE:LINE; a torn last line (a writer killed mid-line) is skipped.
OUT is published like a prefix (comparison.md last: a reader sees the complete old or the complete new
comparison); other files in OUT are left alone. An existing comparison is refused unless --overwrite (which
replaces only these two files), and an OUT that is, holds or sits inside a run's files is refused.
Exit code 2 on bad input, with one line naming it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from megasynth.cli import ToolParser, check_outputs, directory, run_dir
from megasynth.io import JsonlError, atomic_files, atomic_open, atomic_write_text, read_jsonl

EXIT_BAD_INPUT = 2
RESULT_FILES = ("comparison.md", "heldout_loss.png")  # what --overwrite replaces in --out; comparison.md last
_TRAIN_KEYS = {"step": int, "tokens": int, "flops": float}
_EVAL_KEYS = {"step": int, "tokens": int, "flops": float, "name": str, "loss": float, "ppl": float}


class MetricsFileError(ValueError):
    """A missing or malformed metrics file; the message starts with FILE or FILE:LINE."""


@dataclass
class RunMetrics:
    """What one run's metrics.jsonl says: its last train record and its eval records per eval-set name."""

    label: str
    path: Path
    last_train: dict | None = None
    evals: dict[str, list[dict]] = field(default_factory=dict)

    def final_eval(self, name: str) -> dict | None:
        records = self.evals.get(name)
        return max(records, key=lambda r: r["step"]) if records else None

    @property
    def steps(self) -> int:
        candidates = [self.last_train["step"]] if self.last_train else []
        candidates += [r["step"] for recs in self.evals.values() for r in recs]
        return max(candidates, default=0)

    @property
    def final(self) -> dict:
        """The record with the most tokens (train or eval): the run's tokens and FLOPs so far."""
        records = ([self.last_train] if self.last_train else []) + [r for recs in self.evals.values() for r in recs]
        return max(records, key=lambda r: (r["tokens"], r["step"]))


def _number(value, kind: type, where: str, key: str):
    # The trainer writes non-finite floats as strings ("nan", "inf") so every line stays valid JSON.
    if kind is float and isinstance(value, str) and value.lower() in ("nan", "inf", "-inf", "infinity", "-infinity"):
        return float(value)
    if kind is str:
        if not isinstance(value, str) or not value:
            raise MetricsFileError(f"{where}: field \"{key}\" must be a non-empty string, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise MetricsFileError(f"{where}: field \"{key}\" must be {'an integer' if kind is int else 'a number'}, "
                               f"got {value!r}")
    return kind(value)


def _checked(rec: dict, keys: dict, where: str) -> dict:
    missing = [k for k in keys if k not in rec]
    if missing:
        raise MetricsFileError(f"{where}: {rec.get('kind')} record lacks {', '.join(map(repr, missing))}")
    return {**rec, **{k: _number(rec[k], tp, where, k) for k, tp in keys.items()}}


def metrics_path(arg: str | os.PathLike) -> Path:
    path = Path(arg)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise MetricsFileError(f"{path}: no such file (give a run directory holding metrics.jsonl, or the file)")
    return path


def _drop_torn_last_line(path: Path, text: str) -> str:
    """`text` without its last line when that line has no newline and is not JSON: a writer killed mid-line."""
    last = text.rpartition("\n")[2]  # "" when the text ends with a newline
    if not last.strip():
        return text
    try:
        json.loads(last)
    except json.JSONDecodeError:
        print(f"warning: {path}:{text.count(chr(10)) + 1}: skipping a torn last line", file=sys.stderr)
        return text[: len(text) - len(last)]
    return text


def load_run(arg: str | os.PathLike, label: str = "") -> RunMetrics:
    """Read and validate one metrics.jsonl; later records of a step replace earlier ones (a resumed run)."""
    path = metrics_path(arg)
    run = RunMetrics(label or (Path(arg).name if Path(arg).is_dir() else path.parent.name) or str(path), path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MetricsFileError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    text = _drop_torn_last_line(path, text)
    evals: dict[str, dict[int, dict]] = {}
    try:
        records = list(read_jsonl(path, text=text))
    except JsonlError as e:  # strict: only a torn *last* line is forgiven, any other bad line is an error
        raise MetricsFileError(str(e)) from None
    for lineno, rec in records:
        where = f"{path}:{lineno}"
        kind = rec.get("kind")
        if kind == "train":
            rec = _checked(rec, _TRAIN_KEYS, where)
            if run.last_train is None or rec["step"] >= run.last_train["step"]:
                run.last_train = rec
        elif kind == "eval":
            rec = _checked(rec, _EVAL_KEYS, where)
            evals.setdefault(rec["name"], {})[rec["step"]] = rec
        elif kind is None:
            raise MetricsFileError(f"{where}: record has no \"kind\" (expected \"train\" or \"eval\")")
        # other kinds are future additions to the format: ignored
    if run.last_train is None and not evals:
        raise MetricsFileError(f"{path}: no train or eval records")
    run.evals = {name: [by_step[s] for s in sorted(by_step)] for name, by_step in sorted(evals.items())}
    return run


def load_runs(args: list[str], labels: list[str] | None = None) -> list[RunMetrics]:
    runs = [load_run(a, label) for a, label in zip(args, labels or [""] * len(args))]
    seen: dict[str, int] = {}
    for run in runs:  # two runs named alike ("run" in two folders) get distinct labels
        if run.label in seen:
            seen[run.label] += 1
            run.label = f"{run.label} ({seen[run.label]})"
        else:
            seen[run.label] = 1
    return runs


def eval_names(runs: list[RunMetrics]) -> list[str]:
    return sorted({name for run in runs for name in run.evals})


def _fmt(x: float, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if math.isfinite(x) else str(x)


def markdown_table(runs: list[RunMetrics]) -> str:
    """| run | steps | tokens | FLOPs | <set> loss | <set> ppl | ... |; '—' where a run has no such evaluation."""
    names = eval_names(runs)
    header = ["run", "steps", "tokens", "FLOPs"] + [f"{n} {what}" for n in names for what in ("loss", "ppl")]
    rows = []
    for run in runs:
        final = run.final
        row = [run.label, str(run.steps), f"{final['tokens']:,}", f"{final['flops']:.4g}"]
        for name in names:
            rec = run.final_eval(name)
            row += [_fmt(rec["loss"]), _fmt(rec["ppl"], 2)] if rec else ["—", "—"]
        rows.append(row)
    rule = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"  # numbers right-aligned
    lines = ["| " + " | ".join(header) + " |", rule]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    note = "Held-out loss and perplexity at each run's last evaluation; tokens and FLOPs are the run's totals."
    return "\n".join(lines) + "\n\n" + note + "\n"


def plot_heldout(runs: list[RunMetrics], path: Path, x_axis: str = "tokens") -> dict[str, dict[str, tuple]]:
    """One panel per eval set, one line per run; returns {set: {run: (xs, losses)}} as plotted."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    names = eval_names(runs)
    plotted: dict[str, dict[str, tuple]] = {}
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        plotted[name] = {}
        for run in runs:
            recs = run.evals.get(name)
            if not recs:
                continue
            xs, ys = [r[x_axis] for r in recs], [r["loss"] for r in recs]
            ax.plot(xs, ys, marker="o", markersize=3, label=run.label)
            plotted[name][run.label] = (xs, ys)
        ax.set_title(f"held-out loss: {name}")
        ax.set_xlabel("training tokens" if x_axis == "tokens" else "training FLOPs")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    try:
        with atomic_open(path, "wb") as f:
            fig.savefig(f, format="png", dpi=110)
    finally:
        plt.close(fig)
    return plotted


def build_parser() -> argparse.ArgumentParser:
    p = ToolParser(prog="tools/compare_runs.py", description=__doc__.split("\n\n")[0],
                   epilog="\n\n".join(__doc__.split("\n\n")[1:]), allow_abbrev=False,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="run directories (holding metrics.jsonl) or metrics.jsonl files")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="where comparison.md and heldout_loss.png are written (other files there are kept)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing comparison in --out (default: refuse, exit 2)")
    p.add_argument("--x-axis", choices=("tokens", "flops"), default="tokens",
                   help="the plot's x axis: training tokens (default) or training FLOPs")
    p.add_argument("--label", action="append", default=None, metavar="NAME",
                   help="what the table and the plot's legend call a run (once per RUN, in order; default: the "
                        "run directory's name)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.label is not None and len(args.label) != len(args.runs):
        print(f"error: --label: {len(args.label)} given for {len(args.runs)} runs (give one per RUN, in order)",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    check_outputs(parser, {"--out": directory(args.out, RESULT_FILES)}, {"RUN": [run_dir(r) for r in args.runs]},
                  overwrite=args.overwrite)
    try:
        runs = load_runs(args.runs, args.label)
        out = Path(args.out)
        table = markdown_table(runs)
        with atomic_files(out, RESULT_FILES, commit="comparison.md", replace=args.overwrite) as tmp:
            atomic_write_text(tmp / "comparison.md", "# Run comparison\n\n" + table)
            if eval_names(runs):
                plot_heldout(runs, tmp / "heldout_loss.png", args.x_axis)
        print(table)
        print(f"-> {out / 'comparison.md'}")
        if eval_names(runs):
            print(f"-> {out / 'heldout_loss.png'}")
        else:
            print("warning: no run has held-out evaluations (train with train.eval_every > 0 and data.valid_paths); "
                  "no plot written", file=sys.stderr)
    except FileExistsError as e:  # a comparison appeared while this one was made
        print(f"error: --out {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (MetricsFileError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
