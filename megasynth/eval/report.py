"""Evaluation results on disk: results.json, a Markdown table (results.md) and per-task predictions JSONL.

    write_report(out_dir, results, predictions={"capitals": records})

`results` is {"checkpoint", "step", "settings", "tasks": {name: {"type", "file", "n", "metrics", "config"}}}.
Every file is written to a temporary name in the same directory and renamed, so a reader never sees half.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from megasynth.io import atomic_write_text

COLUMNS = ("acc", "acc_norm", "exact_match", "f1", "loss", "ppl")


def markdown_table(results: dict) -> str:
    """One row per task: | task | type | n | acc | acc_norm | exact_match | f1 | loss | ppl | (blank when n/a)."""
    lines = ["| task | type | n | " + " | ".join(COLUMNS) + " |", "|---|---|---:|" + "---:|" * len(COLUMNS)]
    for name, res in results["tasks"].items():
        cells = []
        for col in COLUMNS:
            value = res["metrics"].get(col)
            cells.append("" if value is None else (f"{value:.2f}" if col == "ppl" else f"{value:.4f}"))
        n = f"{res['n']:,} tok" if res["type"] == "perplexity" else f"{res['n']:,}"
        lines.append(f"| {name} | {res['type']} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(out_dir: str | os.PathLike, results: dict, predictions: dict[str, list[dict]] | None = None) -> Path:
    out = Path(out_dir)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    header = f"Checkpoint: `{results.get('checkpoint')}` (step {results.get('step')})\n\n"
    atomic_write_text(out / "results.md", header + markdown_table(results))
    for name, records in (predictions or {}).items():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        atomic_write_text(out / "predictions" / f"{name}.jsonl", text)
    return out
