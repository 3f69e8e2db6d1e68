"""Worker processes that die with their parent: the one home for it (docs/training.md, "Worker processes").

    die_with_parent(parent_pid)     # first thing in a pool worker's initializer
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
WATCHDOG_INTERVAL_S = 0.5  # how often the fallback watchdog looks at the parent pid
MECHANISMS = ("auto", "pdeathsig", "watchdog")


def _set_pdeathsig(sig: int) -> bool:
    """Ask Linux to send `sig` to this process when its parent dies; False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # the C library this interpreter is linked against
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch(parent_pid: int) -> None:
    while os.getppid() == parent_pid:  # an orphan is re-parented (to init or a subreaper): its ppid changes
        time.sleep(WATCHDOG_INTERVAL_S)
    os._exit(1)


def die_with_parent(parent_pid: int, mechanism: str = "auto") -> str:
    """Make this process exit as soon as its parent `parent_pid` dies; returns the mechanism used.

    "pdeathsig" (Linux, what "auto" picks there): SIGKILL from the kernel when the parent dies. The parent may
    already have died before the call, so the parent pid is checked right after it. The signal fires when the
    parent *thread* that started this process exits, so start workers from a thread that lives as long as the
    pool (the main thread: ProcessPoolExecutor starts them in submit()). "watchdog" (elsewhere): a daemon
    thread that exits the process within WATCHDOG_INTERVAL_S of the parent's death.
    """
    if mechanism not in MECHANISMS:
        raise ValueError(f"mechanism must be one of {MECHANISMS}, got {mechanism!r}")
    if mechanism != "watchdog" and _set_pdeathsig(signal.SIGKILL):
        if os.getppid() != parent_pid:  # died before prctl took effect: nobody will send the signal
            os._exit(1)
        return "pdeathsig"
    if mechanism == "pdeathsig":
        raise OSError("prctl(PR_SET_PDEATHSIG) is not available on this system")
    if os.getppid() != parent_pid:
        os._exit(1)
    threading.Thread(target=_watch, args=(parent_pid,), daemon=True, name="die-with-parent").start()
    return "watchdog"
