"""Run a stage's independent workers (megasynth.work_units) as Ray tasks, then publish (tools/run_on_ray.py).

    code = run_on_ray("preprocess_data", ["--input", ..., "--output-prefix", ...], workers=8, gpus_per_worker=0)

Each task runs `tools/STAGE.py ARGS --worker I/N --no-publish` (its main(), in the Ray worker process) on whatever
node Ray puts it, with the resources asked for; a task whose process dies (a lost node, an OOM kill, a non-zero exit) is retried by
Ray up to `max_retries` times, and a retried worker skips the units already published in the shared work
directory. Once every task has ended, `tools/STAGE.py ARGS --publish` runs here; it refuses, naming the missing
units, if some task used up its retries. The work directory must be on a filesystem every node sees.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

STAGES = ("preprocess_data", "synthesize", "embed_corpus", "entigraph", "rephrase")
TOOLS = Path(__file__).resolve().parents[1] / "tools"


class WorkerFailed(RuntimeError):
    """A worker process exited non-zero (Ray retries the task)."""


def _worker(tool: str, args: list[str], index: int, count: int) -> str:
    """Worker I/N in this Ray worker process: the tool's main() (no second interpreter to start and import)."""
    import contextlib  # noqa: PLC0415
    import importlib.util  # noqa: PLC0415
    import io  # noqa: PLC0415

    spec = importlib.util.spec_from_file_location(f"megasynth_tool_{Path(tool).stem}", tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = module.main([*args, "--worker", f"{index}/{count}", "--no-publish"])
        except SystemExit as e:  # argparse's error()
            code = e.code
    if code:
        raise WorkerFailed(f"worker {index}/{count} exited with {code}: {err.getvalue().strip()[-2000:]}")
    return out.getvalue().strip()


def run_on_ray(stage: str, args: list[str], *, workers: int, gpus_per_worker: float = 0.0,
               cpus_per_worker: float = 1.0, max_retries: int = 3, address: str | None = None,
               num_cpus: int | None = None, log=print) -> int:
    """The workers as Ray tasks, then the publish step here; returns the publish step's exit code."""
    import ray  # noqa: PLC0415 - the optional extra

    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")
    tool = str(TOOLS / f"{stage}.py")
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        task = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, max_retries=max_retries,
                          retry_exceptions=[WorkerFailed])(_worker)
        pending = {task.remote(tool, args, i, workers): i for i in range(workers)}
        failed = 0
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(done[0])
            try:
                log(f"worker {i}/{workers}: {ray.get(done[0])}")
            except Exception as e:  # noqa: BLE001 - retries used up; publish names what is missing
                failed += 1
                log(f"worker {i}/{workers} failed after {max_retries} retries: {e}")
    finally:
        if started_here:
            ray.shutdown()
    publish = subprocess.run([sys.executable, tool, *args, "--publish"], capture_output=True, text=True)
    log(publish.stdout.strip())
    if publish.returncode:
        print(publish.stderr.strip(), file=sys.stderr)
    return publish.returncode
