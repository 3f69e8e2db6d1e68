"""An exclusive lock on a run directory, so that two trainers never write into the same one.

    lock = acquire_run_lock(run_dir)   # RunDirBusy("... pid 4242 on host gpu-7 ...") if another run holds it
    ...                                # the whole run
    lock.release()                     # or let the process end: the kernel drops the lock either way

How the lock works and what it guarantees (also for the tools' work directories): docs/training.md.
"""

from __future__ import annotations

import datetime
import fcntl
import os
import socket
from pathlib import Path

LOCK_NAME = ".lock"
_HELD: set[RunLock] = set()  # locks this process holds, for the fork hook below


class RunDirBusy(RuntimeError):
    """Another live process holds the run directory's lock; the message names its pid and host."""


class RunLock:
    """A held run-directory lock; `release()` (idempotent) closes the file and so drops the lock."""

    def __init__(self, path: Path, fd: int):
        self.path, self._fd = path, fd

    def release(self, *, remove: bool = False) -> None:
        """Drop the lock; with `remove`, delete the lock file first (while still holding it: docs/training.md says
        why that is safe), for a lock beside user files that should leave nothing behind."""
        if self._fd is not None:
            if remove:
                self.path.unlink(missing_ok=True)
            _HELD.discard(self)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire_run_lock(run_dir: str | os.PathLike, *, tool: str | None = None, flag: str = "--work-dir") -> RunLock:
    """Create RUN_DIR (if needed) and take its lock without waiting; RunDirBusy if another process holds it.

    `tool` (e.g. "tools/synthesize.py"): a tool's work directory rather than a trainer's run directory; the
    refusal then names RUN_DIR, the holder's tool and `flag`, the option to choose another one with."""
    run_dir = Path(run_dir)
    return _acquire(run_dir / LOCK_NAME, run_dir, tool, flag)


def acquire_path_lock(target: str | os.PathLike, *, tool: str, flag: str) -> RunLock:
    """Lock TARGET (e.g. an output prefix) through the file TARGET.lock beside it, creating its directory;
    RunDirBusy naming TARGET, the holding tool and `flag` if another process holds it. Release with
    `release(remove=True)` to leave no lock file behind."""
    return _acquire(Path(f"{os.fspath(target)}.lock"), target, tool, flag)


def _acquire(path: Path, target: str | os.PathLike, tool: str | None, flag: str) -> RunLock:
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        # No O_TRUNC: the holder's pid and host must survive a refused open. The fd is not inherited across exec.
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            if tool is None:
                raise RunDirBusy(
                    f"train.run_dir {target} is in use by another trainer ({holder}; lock file {path}); wait for it "
                    "to finish or stop it, or choose another --train.run_dir") from None
            if holder.startswith("pid ") or holder.startswith("holder "):  # a trainer's record, or none yet
                holder = f"another process ({holder})"
            raise RunDirBusy(f"{os.fspath(target)}: in use by {holder}; wait for it or use another {flag}") from None
        except BaseException:
            os.close(fd)
            raise
        if _names(path, fd):
            break
        # The holder removed the file (its run ended and cleaned up) between our open and our flock: the lock we
        # got is on a file nobody else will ever open. Start again on the path as it is now.
        os.close(fd)
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    who = f"pid {os.getpid()} on host {socket.gethostname()}, started {started}"
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (who if tool is None else f"{tool} ({who})").encode() + b"\n", 0)
    except OSError:  # e.g. a full disk: the lock holds all the same, only a refused run's message is vaguer
        pass
    lock = RunLock(path, fd)
    _HELD.add(lock)
    return lock


def _names(path: Path, fd: int) -> bool:
    """Whether `path` still names the open file `fd`."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)


def _close_in_forked_child() -> None:
    # The child's fd is a second reference to the locked open file: closing it leaves the parent's lock alone,
    # while keeping it would hold the lock after the parent died, until the child noticed and exited.
    for lock in list(_HELD):
        lock.release()


os.register_at_fork(after_in_child=_close_in_forked_child)


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    # Empty between the holder's flock and its write: it has only just started.
    return text or "holder not yet recorded: it is starting"
