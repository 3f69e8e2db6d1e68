"""Independent workers of a stage (megasynth.work_units) run as real processes, killed and restarted.

    base = [sys.executable, TOOL, *args]
    with Zygote(TOOL, env=env, preload=("sentence_transformers",)) as zygote:
        history = chaos_workers(lambda worker: [*base, "--worker", worker], num_units, seed=3, work_dir=work,
                                publish=lambda: zygote.run([*base, "--publish"], env), env=env, start=zygote.start)
    assert history.killed_units and published_counts(work / "events") == {k: 1 for k in range(num_units)}

The schedule, from `seed`: workers 0/3, 1/3, 2/3 start together; each is stopped by the fault hook half-way through
one of its own units (MEGASYNTH_FAULT_UNIT=stop:unit:K: the unit is made, not yet published) and then SIGKILLed;
a publish now must be refused, naming exactly the units not done (those among them); then worker 0/3 restarts and
kills itself half-way through another unit (MEGASYNTH_FAULT_UNIT=unit:K); then 1/3 restarts while a fourth worker
(3/4) starts late, and the two of them finish every unit (the one 0/3 died on included). Every process is bounded
by TIMEOUT and killed if the test fails.

A Zygote starts the workers of a tool without each paying for its imports (torch, sentence-transformers, openai:
seconds of CPU apiece, most of such a test): one Python process imports the tool once, then forks every worker
from itself and runs the tool as `python TOOL ARGS` would (`__main__`, sys.argv, the environment given). Each
worker is still its own process, with its own pid, locks and fate (SIGSTOP, SIGKILL). Forking is safe because the
zygote runs no Python thread (checked after its imports) and no computation: torch's and the tokenizers' pools are
not started yet; the native threads that imports do start (OpenBLAS's pool, pyarrow's jemalloc) belong to libraries
that prepare for a fork (pthread_atfork).
"""

from __future__ import annotations

import atexit
import importlib
import itertools
import json
import os
import queue
import random
import runpy
import select
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from procfs import stopped

from megasynth.work_units import FAULT_ENV, RECORD

TIMEOUT = 300


@dataclass
class History:
    killed_units: list[int] = field(default_factory=list)  # units a worker was killed half-way through
    outputs: list[str] = field(default_factory=list)  # stdout + stderr of every process, in order


def popen(argv: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def chaos_workers(command: Callable[[str], list[str]], num_units: int, *, seed: int, work_dir: Path,
                  publish: Callable[[], subprocess.CompletedProcess], env: dict | None = None,
                  start: Callable[[list[str], dict], subprocess.Popen] = popen) -> History:
    """Run the schedule above: `command(worker)` is a worker's argv, `start(argv, env)` starts it (a Popen or a
    Zygote's Forked), `publish()` runs the stage's --publish and is expected to refuse mid-way."""
    rng = random.Random(seed)
    history = History()
    procs = []

    def run(worker: str, fault: str | None = None):
        run_env = {k: v for k, v in (env or os.environ).items() if k != FAULT_ENV}
        if fault:
            run_env[FAULT_ENV] = fault
        procs.append(start(command(worker), run_env))
        return procs[-1]

    def finish(p, code: int | None = 0) -> None:
        out = p.communicate(timeout=TIMEOUT)[0]
        history.outputs.append(out)
        assert code is None or p.returncode == code, f"exit code {p.returncode}, expected {code}:\n{out}"

    try:
        # 1. three workers, each stopped half-way through one of its own units, then killed
        first = []
        for i in range(3):
            k = rng.choice(range(i, num_units, 3))
            history.killed_units.append(k)
            first.append(run(f"{i}/3", f"stop:unit:{k}"))
        for p in first:
            if not stopped(p, timeout=TIMEOUT):
                out = p.communicate(timeout=TIMEOUT)[0]
                raise AssertionError(f"a worker ended before its unit's fault point:\n{out}")
            p.send_signal(signal.SIGKILL)
            finish(p, -signal.SIGKILL)
        missing = [u for u in range(num_units) if not (Path(work_dir) / "units" / f"u{u:06d}" / RECORD).exists()]
        assert set(history.killed_units) <= set(missing), (history.killed_units, missing)
        refused = publish()
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert f"not done yet (units {', '.join(map(str, missing))})" in refused.stderr, (missing, refused.stderr)
        history.outputs.append(refused.stderr)
        # 2. worker 0/3 again, killed half-way through a unit not done yet (nobody else runs: it gets there),
        # another than those the first three died on where one is left
        k = rng.choice([u for u in missing if u not in history.killed_units] or missing)
        history.killed_units.append(k)
        finish(run("0/3", f"unit:{k}"), -signal.SIGKILL)
        # 3. 1/3 restarts and a fourth worker starts late: between them they make every unit still missing
        for p in [run("1/3"), run("3/4")]:
            finish(p)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return history


def leftover_temps(work_dir: Path) -> list[str]:
    """Temp directories in units/ (a kill leaves one; the next worker to take the unit removes it)."""
    return sorted(p.name for p in (Path(work_dir) / "units").iterdir() if p.name.startswith("."))


# -- the zygote ---------------------------------------------------------------------------------------------------
class Forked:
    """A worker forked by a Zygote, used like the subprocess.Popen of `python TOOL ARGS` (stdout and stderr
    together, as text)."""

    def __init__(self, zygote: Zygote, pid: int, out: Path):
        self._zygote, self.pid, self._out, self.returncode = zygote, pid, out, None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._zygote._exits.get(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        with self._zygote._changed:
            if not self._zygote._changed.wait_for(lambda: self.poll() is not None, timeout):
                raise subprocess.TimeoutExpired(f"worker pid {self.pid}", timeout)
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, None]:
        self.wait(timeout)
        return self._out.read_text(errors="replace"), None

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # not reaped yet (the zygote reports an exit right after reaping it)
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Zygote:
    """One process that imports `tools` (and `preload`: modules they import only when they run) with `env`, then
    forks workers of them on request: start(argv, env) for argv = [sys.executable, TOOL, *args]. `env` (.env) is
    the environment at import time (libraries read some of it then); a worker's own may differ in what the tool
    reads while it runs (a fault hook, an API key)."""

    def __init__(self, *tools: str | os.PathLike, env: dict, preload: tuple[str, ...] = ()):
        self.tools, self.env = [str(t) for t in tools], dict(env)
        self._dir = Path(tempfile.mkdtemp(prefix="zygote-"))
        self._count = itertools.count()
        self._exits: dict[int, int] = {}
        self._started: queue.Queue = queue.Queue()
        self._changed = threading.Condition()
        self._lock = threading.Lock()
        self._proc = subprocess.Popen([sys.executable, __file__, *preload, *self.tools], env=env,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        ready = self._started.get(timeout=TIMEOUT)
        if ready != "ready":
            self.close()
            raise RuntimeError(f"the zygote of {', '.join(self.tools)} did not start: {ready}")

    def _read(self) -> None:
        for line in self._proc.stdout:
            word, *rest = line.split()
            if word == "exit":
                with self._changed:
                    self._exits[int(rest[0])] = int(rest[1])
                    self._changed.notify_all()
            else:
                self._started.put(line.strip())
        self._started.put("the zygote ended")

    def start(self, argv: list[str], env: dict) -> Forked:
        assert argv[0] == sys.executable and argv[1] in self.tools, (argv[:2], self.tools)
        out = self._dir / f"{next(self._count)}.out"
        with self._lock:
            self._proc.stdin.write(json.dumps({"tool": argv[1], "args": argv[2:], "env": env, "out": str(out)}) + "\n")
            self._proc.stdin.flush()
            reply = self._started.get(timeout=TIMEOUT)
        word, _, pid = reply.partition(" ")
        assert word == "started", reply
        return Forked(self, int(pid), out)

    def run(self, argv: list[str], env: dict, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
        """start(argv, env) to its end, as subprocess.run(..., capture_output=True) with stdout and stderr
        together in both."""
        p = self.start(argv, env)
        output = p.communicate(timeout)[0]
        return subprocess.CompletedProcess(argv, p.returncode, output, output)

    def close(self) -> None:
        try:
            self._proc.stdin.close()  # the zygote kills and reaps the workers still running, then exits
            self._proc.wait(timeout=60)
        finally:
            if self._proc.poll() is None:
                self._proc.kill()
                self._proc.wait()
            for p in self._dir.iterdir():
                p.unlink()
            self._dir.rmdir()

    def __enter__(self) -> Zygote:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _serve(preload: list[str]) -> None:
    """The zygote: import `preload` (modules, and tools: paths ending in .py), say "ready", then "started PID" per
    request line and "exit PID CODE" per worker that ended (CODE negative for a signal, as Popen's returncode).
    Ends when its stdin does, killing what still runs."""
    tools = [name for name in preload if name.endswith(".py")]
    sys.path[0] = os.path.dirname(tools[0])  # not tests/: a worker's is its tool's directory, as `python TOOL` has it
    for name in preload:
        if name in tools:
            sys.path[0] = os.path.dirname(name)
            runpy.run_path(name, run_name="__zygote__")  # the tool's imports, not its main
        else:
            importlib.import_module(name)
    if threading.active_count() != 1:  # a thread is gone in a forked child, and any lock it held stays held
        print(f"Python threads after importing {preload}: {threading.enumerate()}; forking is not safe", flush=True)
        return
    print("ready", flush=True)
    children: set[int] = set()
    buffer, open_ = b"", True
    while open_ or children:
        if open_ and select.select([0], [], [], 0.02)[0]:
            chunk = os.read(0, 1 << 16)
            open_ = bool(chunk)
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                pid = os.fork()
                if pid == 0:
                    _worker(json.loads(line))  # does not return
                children.add(pid)
                print(f"started {pid}", flush=True)
            if not open_:  # the test is over (or died): nothing of it should outlive it
                for pid in children:
                    os.kill(pid, signal.SIGKILL)
        elif not open_:
            select.select([], [], [], 0.02)
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            children.discard(pid)
            print(f"exit {pid} {os.waitstatus_to_exitcode(status)}", flush=True)


def _worker(request: dict) -> None:
    """In the forked child: `python TOOL ARGS` with the request's environment, output to its file."""
    code, tool = 1, request["tool"]
    try:
        fd = os.open(request["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)  # replaces the zygote's pipes: the worker cannot talk to the test through them
        os.dup2(fd, 2)
        os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = [tool, *request["args"]]
        sys.path[0] = os.path.dirname(tool)
        if "numpy" in sys.modules:  # a fresh process seeds numpy's global generator from the OS (random reseeds itself)
            sys.modules["numpy"].random.seed()
        try:
            runpy.run_path(tool, run_name="__main__")
            code = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001 - reported as the interpreter would
            traceback.print_exc()
        atexit._run_exitfuncs()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


if __name__ == "__main__":
    _serve(sys.argv[1:])
