"""examples/entigraph/run.py end to end in its test-suite variant (--tiny) against the local OpenAI-compatible test
server (tests/synth/openai_server.py), which answers with the example's offline stand-in: niche corpus ->
import_quality -> a tiny base -> entigraph + rephrase -> prefixes -> continued pretraining (synthetic 0.9 + replay
0.1, from the base) -> closed-book eval of the base and both runs. No claim about improvement at this scale."""

import importlib.util
import json
import os
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path

import pytest

from megasynth.data.indexed import IndexedDataset
from megasynth.eval.tasks import load_task
from megasynth.io import read_jsonl

from synth.openai_server import TEST_API_KEY, TEST_API_KEY_ENV, OpenAIServer

REPO = Path(__file__).resolve().parents[1]
# The example's stand-in answers for the test server; loaded by path, so examples/ never joins sys.path.
_spec = importlib.util.spec_from_file_location("entigraph_offline_llm", REPO / "examples/entigraph/offline_llm.py")
offline_llm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(offline_llm)


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv(TEST_API_KEY_ENV, TEST_API_KEY)
    with OpenAIServer(api_key=TEST_API_KEY, reply=offline_llm.reply) as s:
        yield s


def test_entigraph_example_tiny_runs_every_stage(tmp_path, server):
    out = tmp_path / "eg"
    result = subprocess.run([sys.executable, "examples/entigraph/run.py", "--tiny", "--out", str(out),
                             "--base-url", server.base_url, "--model", "test-model", "--api-key-env", TEST_API_KEY_ENV,
                             "--price-in", "1", "--price-out", "2"],
                            cwd=REPO, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    docs = [d for _, d in read_jsonl(out / "quality" / "documents.jsonl")]
    questions = load_task(out / "quality" / "quality.jsonl").examples
    assert len(docs) == 2 and {q.article_id for q in questions} == {d["id"] for d in docs}

    # The generator was asked through the endpoint: one entity request per document, relation requests for the
    # sampled pairs and triples (3 + 1 per document at most), and the rephrase styles per document.
    requests = [r.json for r in server.completion_requests()]
    users = [r["messages"][-1]["content"] for r in requests]
    kinds = [offline_llm.recognise(u)[0] for u in users]
    assert kinds.count("entigraph_entities") == 2
    assert 2 <= kinds.count("entigraph_pair") + kinds.count("entigraph_triple") <= 2 * 4
    assert sum(k.startswith("rephrase_") for k in kinds) >= 2
    assert all(r["model"] == "test-model" for r in requests)

    entigraph, rephrase = IndexedDataset(out / "data" / "entigraph"), IndexedDataset(out / "data" / "rephrase")
    assert len(entigraph) >= 2 and entigraph.num_tokens > 0 and len(rephrase) >= 2

    # Continued pretraining started from the base, on the blend synthetic 0.9 + replay 0.1.
    for name in ("entigraph", "rephrase"):
        cfg = tomllib.loads((out / "runs" / name / "config.toml").read_text())
        assert cfg["train"]["init_from"].startswith(str(out / "base" / "run"))
        weights = {Path(s["path"]).name: s["weight"] for s in cfg["data"]["sources"]}
        assert weights == {name: pytest.approx(0.9), "train": pytest.approx(0.1)}

    # Closed-book evaluation of the base and of both runs, on every question; the table is printed.
    rows = json.loads((out / "summary.json").read_text())
    assert [r["model"] for r in rows] == ["base", "entigraph CPT", "rephrase CPT"]
    for r in rows:
        assert r["quality_n"] == len(questions) and 0 <= r["quality_acc"] <= 1 and 0 <= r["quality_acc_norm"] <= 1
    assert rows[1]["training_tokens"] == rows[2]["training_tokens"] > 0  # the same token count for both
    assert rows[1]["synthetic_tokens"] == entigraph.num_tokens and rows[1]["synthetic_documents"] == len(entigraph)
    # The generator's spend, from the ledger summary in the sidecar, priced with --price-in / --price-out.
    entigraph_requests = sum(k.startswith("entigraph_") for k in kinds)
    assert rows[1]["llm_requests"] == entigraph_requests and rows[1]["cost_usd"] > 0
    assert "| entigraph CPT |" in result.stdout and "| rephrase CPT |" in result.stdout

    # The API key reached the server but appears nowhere in what the example wrote.
    for path in out.rglob("*"):
        if path.is_file():
            assert TEST_API_KEY.encode() not in path.read_bytes(), path


def test_offline_stand_in_serves_the_prompts(tmp_path):
    """offline_llm.py as run.py starts it (a subprocess on a free port): an entities request gets valid JSON."""
    from megasynth.synth.llm.prompts import load_prompt

    proc = subprocess.Popen([sys.executable, str(REPO / "examples" / "entigraph" / "offline_llm.py")],
                            stdout=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        text = "heapq.heappush(heap, item): Push item onto heap.\nheapq.heappop(heap): Pop the smallest item."
        body = {"model": "m", "messages": load_prompt("entigraph_entities").messages(title="The heapq module",
                                                                                        text=text)}
        request = urllib.request.Request(f"{url}/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            reply = json.loads(response.read())
        parsed = json.loads(reply["choices"][0]["message"]["content"])
        assert parsed["entities"] == ["heapq.heappush", "heapq.heappop"] and parsed["summary"]
        assert reply["usage"]["prompt_tokens"] > 0
        bad = urllib.request.Request(f"{url}/chat/completions", data=json.dumps(
            {"messages": [{"role": "user", "content": "hello"}]}).encode())
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(bad, timeout=30)
        assert e.value.code == 400
    finally:
        proc.terminate()
        proc.wait(10)
