"""examples/launch/slurm.sbatch cannot die of SIGPIPE while it finds the rendezvous host (issue 10).

The script used `scontrol show hostnames ... | head -n 1` under `set -o pipefail`: head exits after one line,
scontrol is killed by SIGPIPE if it is still writing, and the script exits 141 (about one run in six with two
hosts, every time with a long host list). A stub scontrol that prints 200,000 host names (far past the 64 KiB
pipe buffer) makes that failure certain for the old script; the fixed one reads the whole list.
"""

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "examples" / "launch" / "slurm.sbatch"


def stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(f"#!/usr/bin/env bash\n{body}\n")
    path.chmod(0o755)


def run_sbatch(tmp_path: Path, scontrol_body: str) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stub(bin_dir, "scontrol", scontrol_body)
    stub(bin_dir, "torchrun", 'echo torchrun "$@"')
    stub(bin_dir, "srun", 'while [[ "$1" == --* ]]; do shift; done; SLURM_NODEID=0 exec "$@"')
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-node-[1-9]",
           "SLURM_JOB_ID": "77", "SLURM_NNODES": "9", "SLURM_GPUS_ON_NODE": "8"}
    return subprocess.run(["bash", str(SLURM), "cfg.toml", "--train.steps=3"], env=env, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("hosts", [2, 200_000])
def test_slurm_script_takes_the_first_host_of_any_host_list(tmp_path, hosts):
    done = run_sbatch(tmp_path, f'seq -f "gpu-node-%g" 1 {hosts}')
    assert done.returncode == 0, (done.returncode, done.stderr)
    assert "--rdzv_endpoint=gpu-node-1:20077 " in done.stdout


def test_slurm_script_survives_repeated_runs(tmp_path):
    # The original symptom, with the two-host list of tests/test_parallel.py: a race, so repeat it.
    for _ in range(20):
        done = run_sbatch(tmp_path, "printf 'gpu-node-7\\ngpu-node-8\\n'")
        assert done.returncode == 0, (done.returncode, done.stderr)


def test_slurm_script_refuses_an_empty_host_list(tmp_path):
    done = run_sbatch(tmp_path, "true")
    assert done.returncode == 2 and "printed no host" in done.stderr and "torchrun" not in done.stdout
