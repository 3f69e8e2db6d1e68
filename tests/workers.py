"""Independent workers of a stage (megasynth.work_units) run as real processes, killed and restarted at random.

    history = chaos_workers(command, work_dir, seed=3, workers=3)   # command(worker: str, env) -> Popen args
    assert history.refused_publish and published_counts(work_dir / "events") == {k: 1 for k in range(n)}

The schedule, from `seed`: workers 0/3, 1/3, 2/3 start together; each is stopped by the fault hook half-way through
one of its own units (MEGASYNTH_FAULT_UNIT=stop:unit:K: the unit is made, not yet published) and then SIGKILLed;
a publish now must be refused; then two of them restart, one of which kills itself half-way through another unit
(MEGASYNTH_FAULT_UNIT=unit:K), and a fourth worker (3/4) starts late; finally one worker runs while units are missing
(the unit a worker died on, if nobody took it since). Every process is bounded by TIMEOUT and killed if the test fails.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from procfs import stopped

from megasynth.work_units import FAULT_ENV

TIMEOUT = 300


@dataclass
class History:
    killed_units: list[int] = field(default_factory=list)  # units a worker was killed half-way through
    outputs: list[str] = field(default_factory=list)  # stdout + stderr of every process, in order


def _start(command, worker: str, fault: str | None, base_env: dict | None = None) -> subprocess.Popen:
    env = dict(base_env or os.environ)
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.Popen(command(worker), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def chaos_workers(command: Callable[[str], list[str]], num_units: int, *, seed: int, work_dir: Path,
                  publish: Callable[[], subprocess.CompletedProcess], env: dict | None = None) -> History:
    """Run the schedule above; `publish()` runs the stage's --publish and is expected to refuse mid-way."""
    rng = random.Random(seed)
    history = History()
    procs: list[subprocess.Popen] = []
    try:
        # 1. three workers, each stopped half-way through one of its own units, then killed
        first = []
        for i in range(3):
            own = list(range(i, num_units, 3))
            k = rng.choice(own)
            history.killed_units.append(k)
            first.append(_start(command, f"{i}/3", f"stop:unit:{k}", env))
        procs += first
        for p in first:
            if not stopped(p, timeout=TIMEOUT):
                out = p.communicate(timeout=TIMEOUT)[0]
                raise AssertionError(f"a worker ended before its unit's fault point:\n{out}")
            p.send_signal(signal.SIGKILL)
            history.outputs.append(p.communicate(timeout=TIMEOUT)[0])
        refused = publish()
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert all(str(k) in refused.stderr for k in history.killed_units), refused.stderr
        history.outputs.append(refused.stderr)
        # 2. two restart (one kills itself half-way through another unit), a fourth starts late
        k = rng.choice([u for u in range(num_units) if u not in history.killed_units])
        history.killed_units.append(k)
        again = [_start(command, "0/3", f"unit:{k}", env), _start(command, "1/3", None, env)]
        procs += again
        late = _start(command, "3/4", None, env)
        procs.append(late)
        for p in (*again, late):
            history.outputs.append(p.communicate(timeout=TIMEOUT)[0])
        # 3. while units are missing (the one a worker died on), a worker again (what a requeue does)
        for _ in range(3):
            if _done_units(work_dir) == num_units:
                break
            p = _start(command, "2/3", None, env)
            procs.append(p)
            out = p.communicate(timeout=TIMEOUT)[0]
            history.outputs.append(out)
            assert p.returncode == 0, out
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return history


def _done_units(work_dir: Path) -> int:
    return len(list(Path(work_dir).glob("units/u*/DONE.json")))


def leftover_temps(work_dir: Path) -> list[str]:
    """Temp directories in units/ (a kill leaves one; the next worker to take the unit removes it)."""
    return sorted(p.name for p in (Path(work_dir) / "units").iterdir() if p.name.startswith("."))
