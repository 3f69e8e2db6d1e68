"""examples/sft/run.py end to end, in its test-suite variant (--tiny): instruction set in two formats ->
preprocess_sft -> a tiny base model -> fine-tuning with packing from it -> masked held-out loss -> chat answers."""

import json
import subprocess
import sys
from pathlib import Path

from megasynth.data.indexed import IndexedDataset
from megasynth.io import read_jsonl
from megasynth.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]


def test_sft_example_tiny_runs_every_stage(tmp_path):
    out = tmp_path / "sft"
    result = subprocess.run([sys.executable, "examples/sft/run.py", "--tiny", "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # Both formats were written and preprocessed into masked prefixes whose targets are the answers.
    alpaca = [row for _, row in read_jsonl(out / "instructions" / "train_alpaca.jsonl")]
    assert alpaca and alpaca[0]["instruction"].startswith("What does ") and alpaca[0]["output"]
    chat = [row for _, row in read_jsonl(out / "instructions" / "train_chat.jsonl")]
    assert chat and [m["role"] for m in chat[0]["messages"]] == ["user", "assistant"]
    for name in ("train_alpaca", "train_chat", "valid_alpaca", "valid_chat"):
        ds = IndexedDataset(out / "data" / name)
        assert ds.has_loss_mask and 0 < ds.loss_mask(0).sum() < len(ds[0])
    # The run started from the base checkpoint, packed its sources, and evaluated the masked held-out sets.
    cfg = (out / "run" / "config.toml").read_text()
    assert 'packing = "pack"' in cfg and "init_from" in cfg and str(out / "base") in cfg
    records = read_metrics(out / "run" / "metrics.jsonl")
    evals = {(r["name"], r["step"]) for r in records if r["kind"] == "eval"}
    assert evals == {(n, s) for n in ("valid_alpaca", "valid_chat") for s in (0, 4)}
    assert all(0 < r["targets"] < 4 * 128 for r in records if r["kind"] == "train")
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 3 and all(a["prompt"].startswith("What does ") for a in answers)
    assert "held-out masked loss" in result.stdout and "efficiency" in result.stdout
