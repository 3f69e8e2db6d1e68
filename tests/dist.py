"""Run a function on N gloo ranks on the CPU, as torchrun would, and collect what each rank returns; or start
one process that runs a function (a trainer that must outlive the call, be killed, ...).

    from dist import run_on_ranks, start_process

    def body(x):                       # module-level: the ranks import it by name
        info = init_distributed(tp=2)  # the process group is already up; this builds the (dp, tp) mesh
        return info.rank * x

    assert run_on_ranks(body, 4, 10) == [0, 10, 20, 30]
    proc = start_process(megasynth.train.main, ["--config", cfg], stderr=tmp_path / "err")  # .pid, .kill(), ...

Each rank is a new process with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT set, the parent's
environment as it is at the call, and a gloo process group already initialised (or, with init_group=False, left
for the function to create from those variables, as a program under torchrun does); one torch thread per rank
(the machine has few cores and N ranks share them). The group is destroyed however the function ends. An
exception on any rank fails the call with that rank's traceback and its number; the other ranks, which may now
wait forever in a collective, are killed. A run that exceeds `timeout` is killed and reported with the ranks
that had not finished.

The ranks come from multiprocessing's forkserver, not from a fork of the parent (which would inherit the
parent's torch threads, locks and module state) and not from a fresh interpreter each (spawn: every rank would
import torch and megasynth again, seconds of CPU per rank on a small machine). The server is a fresh interpreter
started once per test session that imports PRELOAD and nothing else, runs no torch op, and forks each rank: a
rank sees the modules as imported, whatever the parent or an earlier rank changed in its own copy. start_process
makes its process the same way.
"""

from __future__ import annotations

import contextlib
import datetime
import multiprocessing as mp
import os
import pickle
import queue
import socket
import sys
import time
import traceback

# What the server imports once for every later rank: torch's distributed stack (DTensor pulls in dynamo and
# sympy) and the trainer, which imports the rest of megasynth that the ranks use. A module that fails to import
# here is simply imported by the rank that needs it (the forkserver ignores ImportError).
PRELOAD = ["torch", "torch.distributed", "torch.distributed.tensor", "torch.distributed.fsdp",
           "torch.distributed.checkpoint", "megasynth.train"]


class DistributedTestError(AssertionError):
    """A rank raised, died or hung; the message names the rank and carries its traceback."""


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it; another process could take it before we do,
    which on a test machine is rare enough that a failed rendezvous is an acceptable symptom)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # takes effect when the server starts: the first call of the session
    return ctx


def _rank_main(fn, rank: int, world_size: int, port: int, env: dict, init_group: bool, timeout: float, results,
               args, kwargs) -> None:
    """Entry point of one rank: environment, process group, fn, result (or traceback) to the parent.

    (multiprocessing hands the parent's sys.path and working directory to the rank, so fn's test module and
    helpers.py import here too. The environment it inherits is the server's, from the start of the session:
    `env` is the parent's, now.)
    """
    os.environ.clear()
    os.environ.update({k: str(v) for k, v in env.items()})
    # What torchrun would set; init_process_group's default env:// rendezvous reads MASTER_ADDR / MASTER_PORT.
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415

    torch.set_num_threads(1)
    succeeded = False
    try:
        if init_group:
            # A collective waiting on a dead peer gives up after the run's own timeout (the parent stops it anyway).
            dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                    timeout=datetime.timedelta(seconds=timeout))
        # Pickled here, by value: torch would otherwise share tensors through file descriptors that die with
        # this process before the parent reads them.
        results.put((rank, "ok", pickle.dumps(fn(*args, **kwargs))))
        succeeded = True
    except BaseException:  # noqa: BLE001 (anything, including SystemExit, is reported to the parent)
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            if succeeded:
                # Leave together: rank 0 hosts the rendezvous store and each rank holds gloo connections, so a rank
                # that returns at once (a refusal made before any collective) and exits could cut off a peer still
                # setting up ("Connection closed by peer", seen once under load). Its report is already sent.
                with contextlib.suppress(Exception):
                    dist.barrier()
            dist.destroy_process_group()


def run_on_ranks(fn, world_size: int, *args, timeout: float = 120.0, env: dict | None = None,
                 init_group: bool = True, **kwargs) -> list:
    """fn(*args, **kwargs) on `world_size` gloo ranks; the list of their return values, by rank.

    fn and its arguments must be picklable (a module-level function). `env` is added to the parent's
    environment; init_group=False leaves the process group to fn (it is destroyed afterwards all the same).
    Raises DistributedTestError naming the rank that failed first (with its traceback) or a rank that died
    without a word (its exit code), or, after `timeout` seconds, the ranks still running. Once one rank fails,
    the others often fail too (a peer vanished from their collective); their reports are appended after the
    first, which is usually the cause.
    """
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    env = {**os.environ, **(env or {})}
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world_size, port, env, init_group, timeout, results, args,
                                                  kwargs), name=f"rank{r}", daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    outputs: dict[int, object] = {}
    failures: dict[int, str] = {}  # in the order they were noticed
    deadline = time.monotonic() + timeout
    grace_end = None  # after a first failure: a moment to collect the others' reports, then stop everyone
    try:
        while len(outputs) + len(failures) < world_size:
            now = time.monotonic()
            if grace_end is not None and now > grace_end:
                break
            if now > deadline:
                pending = [r for r in range(world_size) if r not in outputs and r not in failures]
                failures.setdefault(-1, f"timed out after {timeout:.0f}s; ranks {pending} had not finished")
                break
            try:
                _record(results.get(timeout=0.1), outputs, failures, world_size)
            except queue.Empty:
                # A rank that exited without a report died hard (killed, os._exit, segfault). Its report, if any,
                # was flushed into the queue before it exited, so read everything queued first.
                _drain(results, outputs, failures, world_size)
                for r, p in enumerate(procs):
                    if r not in outputs and r not in failures and p.exitcode is not None:
                        failures[r] = f"rank {r} of {world_size} died with exit code {p.exitcode} without reporting"
            if failures and grace_end is None:
                grace_end = time.monotonic() + 2.0
        if failures:
            # A rank that died without a word is the likelier cause: the others' collectives broke because of it.
            first, *others = sorted(failures.values(), key=lambda message: "died with exit code" not in message)
            also = "".join(f"\n\nthen {message}" for message in others)
            raise DistributedTestError(first + also)
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        _stop(procs)
        results.close()
    return [outputs[r] for r in range(world_size)]


def _record(item, outputs: dict, failures: dict, world_size: int) -> None:
    rank, status, value = item
    if status == "error":
        failures[rank] = f"rank {rank} of {world_size} raised:\n{value}"
    else:
        outputs[rank] = pickle.loads(value)


def _drain(results, outputs: dict, failures: dict, world_size: int) -> None:
    while True:
        try:
            item = results.get_nowait()
        except queue.Empty:
            return
        _record(item, outputs, failures, world_size)


def _stop(procs) -> None:
    """Terminate ranks that are still alive (stuck in a collective after another rank failed), then kill."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)


def start_process(fn, *args, stdout: str | os.PathLike | None = None, stderr: str | os.PathLike | None = None,
                  **kwargs):
    """fn(*args, **kwargs) in one new process made as a rank is (the parent's environment now, one torch thread,
    no process group), started and not waited for: a multiprocessing Process (.pid, .is_alive(), .kill(),
    .join(), .exitcode: fn's return value when it is an int, -N after signal N). `stdout` / `stderr`: files
    that take the process's output (its file descriptors, so C-level writes too); otherwise it writes where the
    test session's output went when the server started. Like the ranks, it is daemonic: it dies with the test
    session if the test forgets it, and multiprocessing will not start children from it."""
    p = _context().Process(target=_process_main, args=(fn, dict(os.environ), stdout, stderr, args, kwargs),
                           name=getattr(fn, "__name__", "process"), daemon=True)
    p.start()
    return p


def _process_main(fn, env: dict, stdout, stderr, args, kwargs) -> None:
    os.environ.clear()
    os.environ.update(env)
    for path, stream in ((stdout, sys.stdout), (stderr, sys.stderr)):
        if path is not None:
            stream.flush()
            with open(path, "w") as f:
                os.dup2(f.fileno(), stream.fileno())
    import torch  # noqa: PLC0415

    torch.set_num_threads(1)
    sys.exit(fn(*args, **kwargs))
