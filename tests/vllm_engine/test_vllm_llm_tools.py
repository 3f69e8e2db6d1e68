"""The LLM tools end to end against the real engine (issue 20, items 2, 3 and 5): tools/entigraph.py,
tools/rephrase.py and tools/synth_quality.py's judge, run as a user runs them (a process each) with --base-url /
--judge-base-url at the session's vLLM server of the SFT'd export (chat completions through its chat template);
and a fleet of that server and one of our scripted servers that drops every request.

The model is tiny and has memorised a dozen sentences: it writes garbage and never closes a JSON string by itself.
EntiGraph completes all the same because its entity step asks for schema-constrained JSON (response_format
json_schema, --structured-output auto): vLLM's grammar lets through only what the schema allows, and the schema's
bounds (the summary's and the names' lengths, --max-entities) end each string and the list. Greedy sampling
(--temperature 0) keeps the runs the same from one session to the next; the replies run to their bounds (or
--max-tokens), about a thousand tokens for an entity reply. The four runs start together (the tool_runs fixture)
and each test checks one: the engine decodes their requests in the same steps instead of one run after another.

The server needs a context longer than the model was trained for (prompts of ~700 tokens, replies up to
--max-tokens) and JSON without free whitespace (a tiny model pads with it forever): tests/vllm_engine/conftest.py
starts it so; the api fixture says which setting is missing when it does not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from synth.openai_server import Fault, OpenAIServer
from vllm_models import TEXTS
from vllm_server import MODEL_NAME, REPO, kill_session

from megasynth.io import read_jsonl

NEEDED_CONTEXT = 2560  # a prompt (~600-900 tokens with this tokenizer) + the --max-tokens below
DOCS = [{"id": "d0", "title": "Lists and sets", "text": f"{TEXTS[0]} {TEXTS[1]}"},
        {"id": "d1", "title": "Mappings", "text": f"{TEXTS[3]} {TEXTS[5]}"}]
TOOL_TIMEOUT = 900  # seconds for a whole run (each request is bounded by --timeout 300 besides)


@pytest.fixture(scope="module")
def api(vllm_sft_server) -> str:
    """The server's API root, once it is known to take the prompts below."""
    with urllib.request.urlopen(f"{vllm_sft_server.base_url}/v1/models", timeout=30) as reply:
        card = json.loads(reply.read())["data"][0]
    assert card["max_model_len"] >= NEEDED_CONTEXT, (
        f"the SFT server serves {card['max_model_len']} tokens of context; these tests need {NEEDED_CONTEXT}: "
        "conftest.py must start it with --max-model-len and --hf-overrides max_position_embeddings, and "
        "--structured-outputs-config with disable_any_whitespace")
    return f"{vllm_sft_server.base_url}/v1"


@dataclass
class ToolRun:
    """`python tools/NAME.py ARGV` in a process of its own (its own session), its stderr in DIR/stderr.txt."""

    dir: Path
    proc: subprocess.Popen
    deadline: float

    def wait(self) -> tuple[int | str, str]:
        """(exit code, stderr); past TOOL_TIMEOUT the process is killed and the code says so."""
        try:
            code = self.proc.wait(timeout=max(0.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            kill_session(self.proc)
            code = f"killed after {TOOL_TIMEOUT} s"
        return code, (self.dir / "stderr.txt").read_text(errors="replace")


def start_tool(name: str, argv: list, work: Path) -> ToolRun:
    work.mkdir(parents=True, exist_ok=True)
    # The judge embeds documents with torch: one thread (vllm_models.one_torch_thread says why).
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(work / "stderr.txt", "wb") as err:
        proc = subprocess.Popen([sys.executable, str(REPO / "tools" / f"{name}.py"), *map(str, argv)],
                                stdout=subprocess.DEVNULL, stderr=err, env=env, start_new_session=True)
    return ToolRun(work, proc, time.monotonic() + TOOL_TIMEOUT)


def common(vllm_models, docs: Path, work: Path, out: Path, base_url: str) -> list[str]:
    return ["--input", str(docs), "--work-dir", str(work), "--output-prefix", str(out),
            "--tokenizer", str(vllm_models.base / "tokenizer"), "--base-url", base_url, "--model", MODEL_NAME,
            "--temperature", "0", "--timeout", "300", "--no-progress"]


@dataclass
class ToolRuns:
    runs: dict[str, ToolRun]  # entigraph, rephrase, judge, fleet
    dead: OpenAIServer  # the fleet's server that drops every request


@pytest.fixture(scope="module")
def tool_runs(api, vllm_models, tmp_path_factory):
    """The four runs below, started at once; the server that drops everything lives as long as the module."""
    from synth.quality_data import build_corpus, write_synthetic  # noqa: PLC0415

    root = tmp_path_factory.mktemp("llm_tools")
    docs = root / "docs.jsonl"
    docs.write_text("".join(json.dumps(d) + "\n" for d in DOCS), encoding="utf-8")
    corpus = build_corpus(root / "judge" / "c")
    syn = write_synthetic(root / "judge" / "syn", corpus, corpus.docs, list(range(len(corpus.docs))))
    runs = {}
    with OpenAIServer(reply=lambda body: Fault.drop()) as dead:
        try:
            eg = root / "entigraph"
            runs["entigraph"] = start_tool("entigraph", [
                *common(vllm_models, docs, eg / "W", eg / "out" / "eg", api), "--max-entities", "3",
                "--max-triples-per-doc", "1", "--max-tokens", "1500", "--concurrency", "8"], eg)
            rp = root / "rephrase"
            runs["rephrase"] = start_tool("rephrase", [
                *common(vllm_models, docs, rp / "R", rp / "out" / "rp", api), "--styles", "plain,qa",
                "--max-tokens", "48"], rp)
            q = root / "judge"
            runs["judge"] = start_tool("synth_quality", [
                "--synthetic", syn, "--corpus", corpus.prefix, "--out", q / "q", "--sample", "4",
                "--embed-max-tokens", "16", "--judge-base-url", api, "--judge-model", MODEL_NAME,
                "--judge-max-tokens", "800", "--judge-timeout", "300"], q)
            fl = root / "fleet"
            runs["fleet"] = start_tool("rephrase", [
                *common(vllm_models, docs, fl / "R", fl / "out" / "rp", f"{dead.base_url},{api}"),
                "--styles", "plain,qa", "--samples-per-doc", "2", "--max-tokens", "32", "--concurrency", "2",
                "--backoff-base-s", "30", "--server-cooldown-s", "600"], fl)
            yield ToolRuns(runs, dead)
        finally:
            for run in runs.values():
                if run.proc.poll() is None:
                    kill_session(run.proc)


def provenance(prefix: Path) -> list[dict]:
    return pq.read_table(f"{prefix}.provenance.parquet").to_pylist()


def test_entigraph_with_structured_output_writes_relation_documents(tool_runs):
    run = tool_runs.runs["entigraph"]
    code, err = run.wait()
    assert code == 0, err[-3000:]
    work, out = run.dir / "W", run.dir / "out" / "eg"
    entities = [e for _, e in read_jsonl(work / "entities.jsonl")]
    assert [e["doc"] for e in sorted(entities, key=lambda e: e["doc"])] == ["d0", "d1"]
    assert all(e["ok"] and e["attempts"] == 1 and len(e["entities"]) <= 3 for e in entities), entities
    ledger = [e for _, e in read_jsonl(work / "ledger.jsonl")]
    asked = [e for e in ledger if json.loads(e["key"])[1] == "entities"]
    # Valid at the first reply, no repair: the server constrained it.
    assert all(e["structured_output"] is True and e["repairs"] == 0 for e in asked) and len(asked) == 2
    assert "refused response_format" not in err
    rows = provenance(out)
    relations = [r for r in rows if r["step"] in ("pair", "triple")]
    planned = sum(len(e["pair"]) + len(e["triple"]) for e in entities)
    # (Greedy, this model named three distinct entities in each document: 3 pairs and 1 triple each.)
    assert len(relations) == len(rows) == planned >= 1
    by_doc = {e["doc"]: e["entities"] for e in entities}
    assert all(set(r["entities"]) <= set(by_doc[r["source_id"]]) for r in relations)
    meta = json.loads(Path(f"{out}.json").read_text())
    counts = meta["synthetic"]["counts"]
    assert meta["num_documents"] == planned and counts["pairs"] + counts["triples"] == planned
    assert meta["synthetic"]["model"] == MODEL_NAME and not meta["synthetic"]["partial"]


def test_rephrase_end_to_end(tool_runs):
    run = tool_runs.runs["rephrase"]
    code, err = run.wait()
    assert code == 0, err[-3000:]
    out = run.dir / "out" / "rp"
    rows = provenance(out)
    assert [(r["source_id"], r["style"]) for r in rows] == [("d0", "plain"), ("d0", "qa"), ("d1", "plain"),
                                                             ("d1", "qa")]
    records = [e for _, e in read_jsonl(run.dir / "R" / "rephrasings.jsonl")]
    assert all(r["ok"] and r["text"] for r in records) and len(records) == 4
    assert json.loads(Path(f"{out}.json").read_text())["num_documents"] == 4


def test_the_quality_judge_returns_verdicts(tool_runs):
    run = tool_runs.runs["judge"]
    code, err = run.wait()
    assert code == 0, err[-3000:]
    results = json.loads((run.dir / "q" / "results.json").read_text())
    judged = [row["non_factual"] for row in results["rows"].values() if row["non_factual"]["status"] == "judged"]
    # Every document got a verdict (factual or not: the model's opinion is noise), none failed or went unanswered.
    assert judged and all(j["n"] == 4 and j["failed"] == 0 and j["unanswered"] == 0 for j in judged), judged
    lines = [e for _, e in read_jsonl(run.dir / "q" / "judge_ledger.jsonl")]
    assert len(lines) == 4 * len(judged) and all(e["outcome"] == "ok" and e["structured_output"] for e in lines)


def test_a_fleet_of_vllm_and_a_server_that_drops_everything_completes(tool_runs, api):
    run, dead = tool_runs.runs["fleet"], tool_runs.dead
    code, err = run.wait()
    assert code == 0, err[-3000:]
    dropped = len(dead.completion_requests())  # only this run knows the dead server
    assert 2 <= dropped <= 3 and f"{dead.base_url}: 2 failures in a row" in err  # then out of rotation
    records = [e for _, e in read_jsonl(run.dir / "R" / "rephrasings.jsonl")]
    assert len(records) == 8 and all(r["ok"] for r in records)
    ledger = [e for _, e in read_jsonl(run.dir / "R" / "ledger.jsonl")]
    assert len(ledger) == 8 and all(e["outcome"] == "ok" and e["server"] == api for e in ledger)
    assert sum(e["attempts"] - 1 for e in ledger) == dropped  # each dropped request retried on vLLM at once
    assert len(provenance(run.dir / "out" / "rp")) == 8
