"""Processes seen through /proc (Linux): what a test started, and whether it is still alive.

    kids = descendants(proc.pid)           # {pid: start time}, recorded while the parent lives
    stopped(proc)                          # True once it stopped itself (SIGSTOP from a test's pause hook)
    alive(pid, kids[pid])                  # False once it exited (a zombie counts as exited)
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path


def stat(pid: int) -> tuple[str, int, int, str] | None:
    """(state, ppid, pgid, start time) of a live process from /proc/PID/stat, None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces
    return fields[0], int(fields[1]), int(fields[2]), fields[19]


def descendants(root: int) -> dict[int, str]:
    """{pid: start time} of every live process below `root`."""
    children: dict[int, list[int]] = {}
    starts = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := stat(int(entry))) is not None and st[0] != "Z":
            children.setdefault(st[1], []).append(int(entry))
            starts[int(entry)] = st[3]
    found, todo = {}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found[child] = starts[child]
            todo.append(child)
    return found


def alive(pid: int, start: str) -> bool:
    st = stat(pid)
    return st is not None and st[0] != "Z" and st[3] == start  # a zombie has exited; a new start time is pid reuse


def stopped(proc: subprocess.Popen, timeout: float = 240) -> bool:
    """Wait until the process has stopped itself (SIGSTOP from a pause hook); False if it ended instead or the
    timeout passed."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        st = stat(proc.pid)
        if st is not None and st[0] == "T":
            return True
        time.sleep(0.02)
    return False
