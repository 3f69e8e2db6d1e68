"""`make demo` end to end, shortened (--quick): every stage runs the real tools and the held-out loss falls."""

import subprocess
import sys
from pathlib import Path

from megasynth.io import read_jsonl
from megasynth.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]


def test_demo_quick_runs_every_stage(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "examples/demo.py", "--quick", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for path in ("corpus/train.jsonl", "tokenizer/tokenizer.json", "data/train.bin", "data/valid.idx",
                 "run/config.toml", "run/metrics.jsonl", "samples.jsonl"):
        assert (out / path).exists(), path
    evals = [r for r in read_metrics(out / "run" / "metrics.jsonl") if r["kind"] == "eval"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 20
    # From a uniform guess over 4096 ids (ln 4096 = 8.3) 20 steps of real text must already help.
    assert evals[-1]["loss"] < evals[0]["loss"] - 0.5
    samples = [row for _, row in read_jsonl(out / "samples.jsonl")]
    assert len(samples) == 3 and all(s["num_tokens"] > 0 for s in samples)
    assert "held-out perplexity:" in result.stdout
