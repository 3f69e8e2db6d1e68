"""Evaluation results on disk: results.json, a Markdown table (results.md) and per-task predictions JSONL,
published together with results.json last (megasynth.io.atomic_files; docs/eval.md).

    write_report(out_dir, results, predictions={"capitals": records}, overwrite=False)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from megasynth.io import atomic_files, atomic_write_text

RESULT_FILES = ("results.json", "results.md", "predictions")  # what write_report owns in its directory
COLUMNS = ("acc", "acc_norm", "exact_match", "f1", "loss", "ppl")


def markdown_table(results: dict) -> str:
    """One row per task: | task | type | n | acc | acc_norm | exact_match | f1 | loss | ppl | (blank when n/a)."""
    lines = ["| task | type | n | " + " | ".join(COLUMNS) + " |", "|---|---|---:|" + "---:|" * len(COLUMNS)]
    for name, res in results["tasks"].items():
        values = [(col, res["metrics"].get(col)) for col in COLUMNS]
        cells = ["" if v is None else f"{v:.2f}" if col == "ppl" else f"{v:.4f}" for col, v in values]
        n = f"{res['n']:,} tok" if res["type"] == "perplexity" else f"{res['n']:,}"
        lines.append(f"| {name} | {res['type']} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(out_dir: str | os.PathLike, results: dict, predictions: dict[str, list[dict]] | None = None, *,
                 overwrite: bool = False) -> Path:
    """Publish results.json, results.md and predictions/TASK.jsonl into `out_dir` (FileExistsError when a report
    is there already, unless `overwrite`, which replaces the report only)."""
    out = Path(out_dir)
    with atomic_files(out, RESULT_FILES, commit="results.json", replace=overwrite) as tmp:
        atomic_write_text(tmp / "results.json", json.dumps(results, indent=2) + "\n")
        header = f"Checkpoint: `{results.get('checkpoint')}` (step {results.get('step')})\n\n"
        atomic_write_text(tmp / "results.md", header + markdown_table(results))
        for name, records in (predictions or {}).items():
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            atomic_write_text(tmp / "predictions" / f"{name}.jsonl", text)
    return out
