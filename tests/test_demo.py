"""`make demo` end to end in its test-suite variant (--tiny: --quick's 20 steps with a smaller model, the tools forked
from one preloaded process): every stage runs the real tools and the held-out loss falls."""

import subprocess
import sys
from pathlib import Path

from megasynth.io import read_jsonl
from megasynth.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]


def test_demo_tiny_runs_every_stage(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "examples/demo.py", "--tiny", "--out", str(out)],
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


def test_preloaded_run_forks_each_tool_with_its_argv_and_exit_code(tmp_path):
    """demo.preload() (the --tiny variants): run() forks the driver for each Python command; the tool runs as __main__
    from its file (or `-m` module) with its argv and the repository as working directory, and its exit code
    reaches the driver as a fresh interpreter's would (examples/entigraph reads codes 3 and 4)."""
    tool = tmp_path / "tool.py"
    tool.write_text("import os, sys\n"
                    "print('tool', __name__, sys.argv[1:], os.getcwd(), sys.path[0] == str(os.path.dirname(__file__)),"
                    " 'demo' in sys.modules, flush=True)\n"
                    "sys.exit(int(sys.argv[1]) if sys.argv[1].isdigit() else sys.argv[1])\n")
    (tmp_path / "data.json").write_text('{"a": [1]}')
    driver = tmp_path / "driver.py"
    driver.write_text(f"""import sys
sys.path.insert(0, {str(REPO / "examples")!r})
import demo
demo.preload("json")
demo.run([sys.executable, {str(tool)!r}, "0"])
demo.run([sys.executable, "-m", "json.tool", "--compact", {str(tmp_path / "data.json")!r}])
for arg in ("3", "bad input: no such file"):
    try:
        demo.run([sys.executable, {str(tool)!r}, arg])
    except SystemExit as e:
        print("driver:", e, flush=True)
""")
    result = subprocess.run([sys.executable, str(driver)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line and not line.startswith("  (")]
    assert lines[1] == f"tool __main__ ['0'] {REPO} True True"  # forked: the driver's modules are there
    assert lines[3] == '{"a":[1]}'
    assert lines[5] == f"tool __main__ ['3'] {REPO} True True"
    assert lines[6].startswith("driver: demo: step failed with exit code 3: python ")
    assert lines[-1].startswith("driver: demo: step failed with exit code 1: python ")
    assert "bad input: no such file" in result.stderr
