"""The cluster launchers (issue 21): the Slurm array script checked without Slurm (its worker and publish commands run
by hand with the array variables set) and tools/plan_fleet.py. tools/run_on_ray.py runs a synthesis on a local Ray
in tests/tools/test_synthesize_cli.py."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import load_tool

from megasynth.tokenizer import train_bpe_tokenizer
from megasynth.work_units import published_counts

ROOT = Path(__file__).resolve().parents[2]
SBATCH = ROOT / "examples" / "launch" / "synth_array.sbatch"
TEXT = ("The json module encodes and decodes JSON documents. A dictionary maps keys to values; a list keeps items in "
        "order; sorting is stable.").split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch")
    for i in range(5):
        (root / "in").mkdir(exist_ok=True)
        (root / "in" / f"f{i}.jsonl").write_text("".join(json.dumps({"text": " ".join(TEXT[j % 7: j % 7 + i + 3])}) + "\n"
                                                         for j in range(30 + i)))
    tok = train_bpe_tokenizer([" ".join(TEXT)] * 10, root / "tok", vocab_size=280)
    ref = root / "ref" / "data"
    code = load_tool("preprocess_data").main(["--input", str(root / "in"), "--tokenizer", tok.path,
                                              "--output-prefix", str(ref), "--no-progress"])
    assert code == 0
    return root, tok.path, ref


def _stage_args(root: Path, tok: str, out: Path) -> str:
    # --workers 0: each unit tokenized in its worker's process, not in a tokenizer pool started per unit (the
    # reference used one: the same bytes)
    return (f"--input {root / 'in'} --tokenizer {tok} --output-prefix {out} --no-progress --unit-bytes 1000 "
            "--workers 0")


def _same_prefix(a: Path, b: Path) -> None:
    for suffix in (".bin", ".idx", ".json"):
        assert Path(f"{a}{suffix}").read_bytes() == Path(f"{b}{suffix}").read_bytes(), suffix


def test_slurm_array_script_submits_workers_and_a_dependent_publish_whose_commands_work(corpus, tmp_path):
    root, tok, ref = corpus
    assert subprocess.run(["bash", "-n", str(SBATCH)]).returncode == 0
    out = tmp_path / "out" / "data"
    env = dict(os.environ, DRY_RUN="1", STAGE="preprocess_data", WORKERS="3", GPUS="1", PYTHON=sys.executable,
               ARGS=_stage_args(root, tok, out), LOGS=str(tmp_path / "logs"))
    proc = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    array, publish = [shlex.split(line) for line in proc.stderr.splitlines() if line.startswith("sbatch")]
    assert "--array=0-2" in array and "--requeue" in array and "--gres=gpu:1" in array
    assert "--dependency=afterany:12345" in publish and not any(a.startswith("--gres") for a in publish)
    worker_cmd, publish_cmd = (next(a for a in args if a.startswith("--wrap=")).removeprefix("--wrap=")
                               for args in (array, publish))
    assert "--worker auto --no-publish" in worker_cmd and publish_cmd.endswith("--publish")
    # What each array task runs, by hand, with Slurm's variables (a task id range that does not start at 0).
    early = subprocess.run(["bash", "-c", publish_cmd], capture_output=True, text=True, timeout=300)
    assert early.returncode == 2 and "all 5 units are missing" in early.stderr, early.stderr
    for task in (5, 6, 7):
        task_env = dict(os.environ, SLURM_ARRAY_TASK_ID=str(task), SLURM_ARRAY_TASK_COUNT="3",
                        SLURM_ARRAY_TASK_MIN="5")
        run = subprocess.run(["bash", "-c", worker_cmd], env=task_env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0 and f"worker {task - 5}/3: made" in run.stdout, run.stdout + run.stderr
    done = subprocess.run(["bash", "-c", publish_cmd], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    _same_prefix(out, ref)
    assert published_counts(Path(f"{out}.work") / "events") == {k: 1 for k in range(5)}


def test_slurm_script_refuses_an_unknown_stage(tmp_path):
    env = dict(os.environ, DRY_RUN="1", STAGE="train", ARGS="--x", LOGS=str(tmp_path / "logs"))
    proc = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "STAGE=train is not one of" in proc.stderr


def test_fleet_plan_from_a_rate_and_from_a_calibration_run(corpus, tmp_path, capsys):
    root, tok, _ = corpus
    main = load_tool("plan_fleet").main
    assert main(["--tokens", "100B", "--tokens-per-s", "10000", "--gpus", "64,1024", "--usd-per-gpu-hour", "2",
                 "--overhead", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    hours = 100e9 / 1e4 / 3600  # 2,778 GPU-hours; on 64 GPUs 43.4 h; $5,556
    assert lines[0] == f"100.00B tokens at 10,000 tokens/s per worker: {hours:,.0f} GPU-hours"
    assert lines[3].split() == ["64", "64", f"{hours / 64:.1f}", "h", f"{2 * hours:,.0f}"]
    assert lines[4].split() == ["1024", "1024", f"{hours / 1024:.1f}", "h", f"{2 * hours:,.0f}"]
    # Calibration: the unit records of a worker run (tokens and seconds each).
    out = tmp_path / "cal" / "data"
    assert load_tool("preprocess_data").main([*shlex.split(_stage_args(root, tok, out)), "--worker", "0/1"]) == 0
    records = [json.loads(p.read_text()) for p in sorted(Path(f"{out}.work").glob("units/*/DONE.json"))]
    rate = sum(r["counts"]["tokens"] for r in records) / sum(r["seconds"] for r in records)
    capsys.readouterr()
    assert main(["--tokens", "1B", "--calibration", f"{out}.work", "--gpus", "8"]) == 0
    assert f"calibration: {rate:,.0f} tokens/s per worker over 5 units" in capsys.readouterr().out
    assert main(["--tokens", "1B", "--calibration", str(tmp_path)]) == 2
    assert "no published unit" in capsys.readouterr().err
    assert main(["--tokens", "1B", "--tokens-per-s", "5", "--gpus", "2", "--gpus-per-worker", "4"]) == 2
    assert "fewer than the 4 GPUs" in capsys.readouterr().err
