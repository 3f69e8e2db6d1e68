"""An exclusive lock on a run directory, so that two trainers never write into the same one (issue 10).

    lock = acquire_run_lock(run_dir)   # RunDirBusy("... pid 4242 on host gpu-7 ...") if another run holds it
    ...                                # the whole run
    lock.release()                     # or let the process end: the kernel drops the lock either way

The lock is `fcntl.flock(LOCK_EX | LOCK_NB)` on RUN_DIR/.lock, held by keeping the file open. The kernel
releases it when the holding process exits, however it ends (SIGKILL, OOM, a node reboot), so a crashed run
never leaves a stale lock behind. The holder writes its pid, host and start time into the file after locking;
they only make the refusal message useful and are never used to decide anything. The file itself is left in
place on release: unlinking it would let a waiting process lock the old inode while a third one creates a new
file and locks that too. A flock belongs to the open file, which a fork shares: forked children (data-loader
workers) close their copy at once, so that the lock lives exactly as long as the process that took it.

On a shared file system flock must reach the server: Linux NFS clients implement it with NFS byte-range locks;
Lustre needs the `flock` mount option (with `localflock` a lock is seen only on its own node).
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

    def release(self) -> None:
        if self._fd is not None:
            _HELD.discard(self)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire_run_lock(run_dir: str | os.PathLike) -> RunLock:
    """Create RUN_DIR (if needed) and take its lock without waiting; RunDirBusy if another process holds it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    # No O_TRUNC: the holder's pid and host must survive a refused open. The fd is not inherited across exec.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise RunDirBusy(
            f"train.run_dir {run_dir} is in use by another trainer ({holder}; lock file {path}); wait for it to "
            "finish or stop it, or choose another --train.run_dir") from None
    except BaseException:
        os.close(fd)
        raise
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}, started {started}\n".encode(), 0)
    except OSError:  # e.g. a full disk: the lock holds all the same, only a refused run's message is vaguer
        pass
    lock = RunLock(path, fd)
    _HELD.add(lock)
    return lock


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
