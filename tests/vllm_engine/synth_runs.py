"""The in-process vLLM runs that test_vllm_synthesize.py checks: tools/synthesize.py --backend vllm, run by
.venv-vllm's python. conftest.py starts them as soon as the base model exists, so that they run while the servers
start and while the other tests wait for the servers (each engine computes on one thread); test_vllm_synthesize.py
waits for them.

    runs = SynthRuns(vllm_python, base_run, corpus, out).start()
    result = runs.wait()         # Result: exit codes, logs, what the killed run left
    runs.stop()                  # whatever happens (kills what still runs)

Two interpreters, vLLM imported once in each, an engine per run: one runs OUT/killed and is killed (SIGKILL, by the
shard fault point) right after its second of three shards; the other runs OUT/batched (the same samples with other
batching), OUT/greedy (temperature 0) and OUT/long (a shard of more prompt tokens than one prefill step), then,
once a thread of this process has seen the kill and noted what it left, OUT/killed again (--keep-work: the export
is reused). Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from vllm_server import REPO, START_TIMEOUT, kill_session

from megasynth.synth.sbp.shards import FAULT_ENV

NUM_DOCS, SHARD, MAX_NEW, SEED = 40, 16, 32, 5  # 3 shards
LONG_SHARD = "140"  # samples whose prompts exceed the 4,096 tokens vLLM prefills in one step by default
# Greedy runs (ours, --backend vllm, --endpoint): the same 40 samples in one shard, one engine pass of MAX_NEW steps.
GREEDY = ("--temperature", "0", "--shard-docs", str(NUM_DOCS))
RUN_TIMEOUT = START_TIMEOUT + 180  # one interpreter: vLLM's import, an engine start, the shards
# Runs tools/synthesize.py's main() for each argv of a JSON list in one interpreter (vLLM is imported once); a
# string in the list is a file to wait for first.
DRIVER = """
import importlib.util, json, os, sys, time
spec = importlib.util.spec_from_file_location("synthesize_tool", sys.argv[1])
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)
for argv in json.loads(sys.argv[2]):
    if isinstance(argv, str):
        while not os.path.exists(argv):
            time.sleep(0.5)
        continue
    code = tool.main(argv)
    print("EXIT", code, flush=True)
    if code:
        sys.exit(code)
import vllm
print("VLLM_VERSION", vllm.__version__, flush=True)
"""


def common(run, corpus, out, *extra) -> list[str]:
    return ["--checkpoint", str(run), "--corpus", str(corpus), "--output-prefix", str(out), "--num-docs",
            str(NUM_DOCS), "--shard-docs", str(SHARD), "--max-new-tokens", str(MAX_NEW), "--seed", str(SEED),
            "--no-progress", *map(str, extra)]


def vllm_args(run, corpus, out, *extra) -> list[str]:
    # A 64 MiB KV cache holds these runs many times over; 1 GiB took seconds of each engine start to allocate.
    return common(run, corpus, out, "--backend", "vllm", "--vllm-enforce-eager", "--vllm-kv-cache-gib", "0.0625",
                  *extra)


@dataclass
class Result:
    killed_code: int | str  # the killed run's exit code (-SIGKILL), or why it has none
    killed_log: str
    killed_shards: list[str]  # the shard files its work directory held when it died
    killed_weights: os.stat_result | None  # its export's weights then
    code: int | str  # the other interpreter's exit code
    log: str
    argvs: int  # the runs that interpreter made


class SynthRuns:
    def __init__(self, python: Path, run: Path, corpus: Path, out: Path):
        self.python, self.out = Path(python), Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.killed = self.out / "killed"
        self.killed_work = Path(f"{self.killed}.work")
        self._seen = self.out / "killed.seen"  # the other interpreter resumes the killed run once this exists
        self.argvs = [vllm_args(run, corpus, self.out / "batched", "--vllm-max-num-seqs", "8",
                                "--no-vllm-prefix-caching"),
                      vllm_args(run, corpus, self.out / "greedy", *GREEDY),
                      vllm_args(run, corpus, self.out / "long", "--num-docs", LONG_SHARD, "--shard-docs", LONG_SHARD),
                      str(self._seen),
                      vllm_args(run, corpus, self.killed, "--keep-work")]
        self._killed_args = [vllm_args(run, corpus, self.killed)]
        self._procs: list[subprocess.Popen] = []
        self._watcher: threading.Thread | None = None
        self._killed: tuple | None = None
        self._limits: dict[int, tuple[float, float]] = {}

    def _launch(self, argvs: list, log: Path, **env) -> subprocess.Popen:
        """DRIVER over argvs in a fresh vLLM-venv interpreter (a process group of its own), output to log."""
        # One OpenMP thread: a second only spins on this model (vllm_server.py's docstring has the numbers).
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "VLLM_NO_USAGE_STATS": "1",
               "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **env}
        env.pop("TRITON_INTERPRET", None)  # tests/conftest.py's, for our kernels; not vLLM's business
        with open(log, "wb") as f:
            proc = subprocess.Popen([str(self.python), "-c", DRIVER, str(REPO / "tools" / "synthesize.py"),
                                     json.dumps(argvs)], stdout=f, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
        self._procs.append(proc)
        return proc

    def start(self) -> SynthRuns:
        now = time.monotonic()
        killed = self._launch(self._killed_args, self.out / "killed.log", **{FAULT_ENV: "shard:1"})
        self._others = self._launch(self.argvs, self.out / "runs.log")
        # The other interpreter makes four runs and waits for the killed one: twice the time of one.
        self._limits = {killed.pid: (now, RUN_TIMEOUT), self._others.pid: (now, 2 * RUN_TIMEOUT)}
        self._watcher = threading.Thread(target=self._watch, args=(killed,), daemon=True)
        self._watcher.start()
        return self

    def _watch(self, proc: subprocess.Popen) -> None:
        """Wait for the killed run; note what it left, then let the other interpreter resume it."""
        try:
            code = self._wait(proc)
            weights = self.killed_work / "vllm_model" / "model.safetensors"
            self._killed = (code, sorted(p.name for p in self.killed_work.glob("shard_*.npz")),
                            weights.stat() if weights.exists() else None)
        finally:
            self._seen.touch()

    def wait(self) -> Result:
        code = self._wait(self._others)
        self._watcher.join(timeout=60)
        killed_code, shards, weights = self._killed or ("not seen", [], None)
        return Result(killed_code, _read(self.out / "killed.log"), shards, weights, code, _read(self.out / "runs.log"),
                      sum(isinstance(a, list) for a in self.argvs))

    def _wait(self, proc: subprocess.Popen) -> int | str:
        """Its exit code; past its deadline it is killed (its process group) and the answer says so."""
        started, limit = self._limits[proc.pid]
        try:
            return proc.wait(timeout=max(0.0, started + limit - time.monotonic()))
        except subprocess.TimeoutExpired:
            kill_session(proc)
            return f"timed out: killed {limit:.0f} s after its start"

    def stop(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                kill_session(proc)
        self._seen.touch()  # the watcher's wait has ended: nothing else waits for it


def _read(log: Path) -> str:
    return log.read_text(errors="replace") if log.exists() else "(no log)"
