"""Test-wide setup.

Triton kernels run under the interpreter on machines without a GPU; the variable must be set before any
`@triton.jit` decorator executes, so it is set here, before the tests import megasynth.kernels.
"""

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Deterministic, quiet CPU runs.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on 2 cores: one intra-op thread each, and in every process they start (OpenMP threads that
    # outnumber the cores spin while they wait for each other).
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TESTS = Path(__file__).resolve().parent
# `make test` runs the suite on two pytest-xdist workers (`-n 2`): most tests keep one core busy or wait on the
# processes and servers they start, so a single pytest left much of 2 cores idle. The scheduler below hands out
# groups: a test file is one (its module fixtures are built once), tests/vllm_engine/ is one (its engines are
# session fixtures: started once). pytest-xdist's own `--dist loadgroup` marks do not group under pytest 9 (they
# rewrite a node id pytest no longer reads). The longest groups go first (their seconds on the 2-core CI box,
# largest first) so that neither worker is left alone with one of them at the end: the order decides wall time
# only, never a result.
LONGEST_FIRST = ("vllm_engine", "tools/test_synthesize_cli.py", "test_parallel.py", "kernels/test_kernel_resources.py",
                 "tools/test_embed_corpus.py", "test_sbp_pipeline.py", "test_demo.py")


def _group(nodeid: str) -> str:
    """The group of a test: its file, relative to tests/, or "vllm_engine"."""
    path = nodeid.split("::", 1)[0]
    rel = path[len("tests/"):] if path.startswith("tests/") else path
    return "vllm_engine" if rel.startswith("vllm_engine/") else rel


def pytest_collection_modifyitems(config, items):
    rank = {group: i for i, group in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(_group(item.nodeid), len(rank)))  # stable: the others keep their order


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling  # noqa: PLC0415 - only under pytest-xdist

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group(nodeid)

    config.option.loadscopereorder = False  # the items' order above, not "most tests first"
    return GroupScheduling(config, log)


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
