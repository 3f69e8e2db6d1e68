"""Test-only fault injection: a process that kills or stops itself at a named point, or poisons named steps
(docs/training.md, "Fault injection").

    fault_point(FAULT_ENV, "idx-renamed")     # SIGKILL here when FAULT_ENV == "idx-renamed"
    nan_steps = fault_steps("MEGASYNTH_FAULT_NAN_AT_STEP")
"""

from __future__ import annotations

import os
import signal


def fault_point(env: str, point: str) -> None:
    value = os.environ.get(env)
    if value == point:
        os.kill(os.getpid(), signal.SIGKILL)
    elif value == f"stop:{point}":
        os.kill(os.getpid(), signal.SIGSTOP)


def fault_steps(env: str) -> set[int]:
    """The steps listed in `env`: "5", "5,7", "3-6"."""
    steps: set[int] = set()
    for part in filter(None, os.environ.get(env, "").replace(" ", "").split(",")):
        lo, _, hi = part.partition("-")
        steps.update(range(int(lo), int(hi or lo) + 1))
    return steps
