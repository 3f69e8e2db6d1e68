"""Test-wide setup.

Triton kernels run under the interpreter on machines without a GPU; the variable must be set before any
`@triton.jit` decorator executes, so it is set here, before the tests import megasynth.kernels.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Deterministic, quiet CPU runs.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def openai_server(monkeypatch):
    """A running local OpenAI-compatible server (tests/synth/openai_server.py) for any test directory:

        def test_x(openai_server):
            openai_server.reply = lambda body: '{"entities": ["a"]}'
            settings = LLMSettings(base_url=openai_server.base_url, model="test-model", api_key_env=TEST_API_KEY_ENV)

    The server expects TEST_API_KEY, which the fixture puts in the environment variable TEST_API_KEY_ENV, so
    subprocesses started by the test inherit it."""
    from synth.openai_server import TEST_API_KEY, TEST_API_KEY_ENV, OpenAIServer  # noqa: PLC0415 - aiohttp only here

    monkeypatch.setenv(TEST_API_KEY_ENV, TEST_API_KEY)
    with OpenAIServer(api_key=TEST_API_KEY) as server:
        yield server
