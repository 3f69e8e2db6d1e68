"""Issue 19, case 15: transient failures are not data loss. The tools as a user runs them (tools/entigraph.py,
tools/rephrase.py through load_tool) against the local server with a seeded fault schedule (429 with
Retry-After, 5xx, dropped connections, replies slower than the timeout), time scaled down by flags: a short
request timeout, small backoff, a short per-item transient budget.

- A ~30% transient failure rate loses nothing: every item completes, exit 0, the bytes of a fault-free run.
- Failures that outlast the budget: exit 4, the missing items listed by step and reason, nothing published; a
  plain rerun against a healthy server asks for exactly those and ends with the bytes of an uninterrupted run.
  With --allow-partial the rest is published and the sidecar says "partial".
- A 429's wait is not an attempt (--max-attempts 1 still succeeds after 429s); content failures (invalid JSON)
  stop at --max-attempts and are asked again only with --retry-failed.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path

import pytest
from helpers import load_tool
from synth.openai_server import TEST_API_KEY_ENV, Fault
from synth.scripted_llm import DOCS, ScriptedLLM, request_id

from megasynth.synth.llm import LLMClient, LLMSettings
from megasynth.synth.llm.limits import is_transient
from megasynth.tokenizer import train_bpe_tokenizer

FULL_RUN = 3 + 9 + 3  # tests/synth/test_entigraph.py explains the count
FAST = ["--timeout", "0.5", "--backoff-base-s", "0.02", "--backoff-max-s", "0.1"]
# Relation requests that fail transiently for as long as the outage lasts, each in its own way.
OUTAGE = {("The Lighthouse", "pair", ("Mara", "the keeper")): Fault.drop(),
          ("The Lighthouse", "pair", ("Storm Bay", "the lamp")): Fault.status(429, retry_after=0.05),
          ("Salt Roads", "triple", ("Tomas", "salt", "the caravan")): Fault.status(503)}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tok"
    train_bpe_tokenizer([d["text"] for d in DOCS] * 10, out, vocab_size=300)
    return out


@pytest.fixture
def argv(tmp_path, openai_server, tok_dir):
    """argv(tool, work, out, *extra): the command line of tools/entigraph.py or tools/rephrase.py."""
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps(d) + "\n" for d in DOCS), encoding="utf-8")
    openai_server.reply = ScriptedLLM()

    def build(tool: str, work: str, out: str, *extra: str) -> list[str]:
        own = ["--max-triples-per-doc", "2", "--include-summaries"] if tool == "entigraph" else ["--styles",
                                                                                                 "plain,qa"]
        return ["--input", str(docs), "--work-dir", str(tmp_path / work), "--output-prefix", str(tmp_path / out),
                "--tokenizer", str(tok_dir), "--base-url", openai_server.base_url, "--model", "test-model",
                "--api-key-env", TEST_API_KEY_ENV, "--no-progress", "--concurrency", "4", *FAST, *own, *extra]
    return build


def asked(server) -> Counter:
    return Counter(request_id(r.json) for r in server.completion_requests())


def same_bytes(a: Path, b: Path) -> bool:
    return all(Path(f"{a}{s}").read_bytes() == Path(f"{b}{s}").read_bytes()
               for s in (".bin", ".idx", ".provenance.parquet"))


def sidecar(prefix: Path) -> dict:
    return json.loads(Path(f"{prefix}.json").read_text())["synthetic"]


def test_thirty_percent_transient_failures_lose_nothing(tmp_path, openai_server, argv):
    entigraph, rephrase = load_tool("entigraph"), load_tool("rephrase")
    assert entigraph.main(argv("entigraph", "Wref", "ref/eg")) == 0
    assert rephrase.main(argv("rephrase", "Rref", "ref/rp")) == 0
    openai_server.reset()
    openai_server.chaos(0.3, seed=19)
    assert entigraph.main(argv("entigraph", "W", "out/eg", "--max-attempts", "3", "--transient-budget-s", "30")) == 0
    assert rephrase.main(argv("rephrase", "R", "out/rp", "--max-attempts", "1", "--transient-budget-s", "30")) == 0
    served = openai_server.faults_served
    assert {"status_429", "status_500", "status_503", "drop", "slow"} <= set(served), served
    assert sum(served.values()) >= 6
    assert same_bytes(tmp_path / "out/eg", tmp_path / "ref/eg") and same_bytes(tmp_path / "out/rp", tmp_path / "ref/rp")
    assert sidecar(tmp_path / "out/eg")["partial"] is False and sidecar(tmp_path / "out/eg")["counts"]["pairs"] == 9
    # Every request that was answered was answered once: the faults cost retries, never a duplicate record.
    keys = [json.loads(line)["key"] for line in (tmp_path / "W/relations.jsonl").read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 12


def test_an_outage_beyond_the_budget_exits_4_and_a_plain_rerun_asks_only_for_the_missing(
        tmp_path, openai_server, argv, capsys):
    tool = load_tool("entigraph")
    assert tool.main(argv("entigraph", "Wref", "ref/eg")) == 0
    llm = ScriptedLLM()
    openai_server.reply = lambda body: OUTAGE.get(request_id(body)) or llm(body)
    openai_server.reset()
    capsys.readouterr()
    assert tool.main(argv("entigraph", "W", "out/eg", "--transient-budget-s", "0.3")) == 4
    err = capsys.readouterr().err
    assert "missing pair items (transient: a plain rerun asks again): connection 1, http_429 1" in err
    assert "missing triple items (transient: a plain rerun asks again): http_503 1" in err
    assert "3 items failed: no output written" in err and "rerun the same command" in err
    assert "--allow-partial" in err and "Traceback" not in err
    assert not list(tmp_path.glob("out/eg*"))  # nothing published
    first = asked(openai_server)
    assert len(first) == FULL_RUN and all(first[k] > 1 for k in OUTAGE)  # retried within the budget
    records = [json.loads(line) for line in (tmp_path / "W/relations.jsonl").read_text().splitlines()]
    assert sorted((r["error"], r["transient"]) for r in records if not r["ok"]) == [
        ("connection", True), ("http_429", True), ("http_503", True)]

    openai_server.reply = ScriptedLLM()  # the endpoint is back
    openai_server.reset()
    assert tool.main(argv("entigraph", "W", "out/eg")) == 0
    assert asked(openai_server) == Counter(list(OUTAGE))  # exactly the missing items, once each
    assert same_bytes(tmp_path / "out/eg", tmp_path / "ref/eg")
    ours, ref = sidecar(tmp_path / "out/eg"), sidecar(tmp_path / "ref/eg")
    ours.pop("llm"), ref.pop("llm")  # the failed run spent more
    assert ours == ref and ours["partial"] is False


def test_allow_partial_publishes_the_rest_and_the_sidecar_says_partial(tmp_path, openai_server, argv, capsys):
    tool = load_tool("entigraph")
    assert tool.main(argv("entigraph", "Wref", "ref/eg")) == 0
    llm = ScriptedLLM()
    openai_server.reply = lambda body: OUTAGE.get(request_id(body)) or llm(body)
    capsys.readouterr()
    assert tool.main(argv("entigraph", "W", "out/eg", "--transient-budget-s", "0.2", "--allow-partial")) == 0
    err = capsys.readouterr().err
    assert "published" in err and "without 3 failed items" in err and "--overwrite" in err
    meta = sidecar(tmp_path / "out/eg")
    assert meta["partial"] is True and meta["counts"]["pairs"] == 7 and meta["counts"]["triples"] == 2
    assert meta["missing"] == {"transient": {"pair": {"connection": 1, "http_429": 1}, "triple": {"http_503": 1}},
                               "permanent": {}}

    # Records written before issue 19 have no "transient" field: the reason decides, so a plain rerun of such a
    # work dir asks for its connection / 429 / 5xx failures again.
    log = tmp_path / "W/relations.jsonl"
    old = [{k: v for k, v in json.loads(line).items() if k != "transient"} for line in log.read_text().splitlines()]
    log.write_text("".join(json.dumps(r) + "\n" for r in old))
    openai_server.reply = ScriptedLLM()
    openai_server.reset()
    assert tool.main(argv("entigraph", "W", "out/eg", "--overwrite")) == 0
    assert asked(openai_server) == Counter(list(OUTAGE))
    assert same_bytes(tmp_path / "out/eg", tmp_path / "ref/eg") and sidecar(tmp_path / "out/eg")["partial"] is False


def test_a_429_wait_is_not_an_attempt(tmp_path, openai_server, argv):
    tool = load_tool("entigraph")
    openai_server.inject(*[Fault.status(429, retry_after=0.05)] * 6)  # the first requests: up to 6 waits each
    assert tool.main(argv("entigraph", "W", "out/eg", "--max-attempts", "1")) == 0
    assert len(openai_server.completion_requests()) == FULL_RUN + 6 and len(asked(openai_server)) == FULL_RUN
    ledger = [json.loads(line) for line in (tmp_path / "W/ledger.jsonl").read_text().splitlines()]
    assert all(line["outcome"] == "ok" for line in ledger) and sum(line["attempts"] for line in ledger) == FULL_RUN + 6

    # In the client: 429s are waited out whatever max_attempts says; a Retry-After longer than what is left
    # of the budget ends the item at once, transient.
    openai_server.reset()
    openai_server.reply = lambda body: "fine"
    openai_server.inject(*[Fault.status(429, retry_after=0.05)] * 3)
    user = [{"role": "user", "content": "hi"}]

    async def go():
        settings = LLMSettings(base_url=openai_server.base_url, model="m", api_key_env=TEST_API_KEY_ENV,
                               max_attempts=1, transient_budget_s=5.0)
        async with LLMClient(settings) as client:
            ok = await client.chat("a", user)
            openai_server.inject(Fault.status(429, retry_after=30))
            started = time.monotonic()
            told_to_wait = await client.chat("b", user)
            return ok, told_to_wait, time.monotonic() - started

    ok, told_to_wait, took = asyncio.run(go())
    assert ok.ok and ok.attempts == 4 and ok.transient_failures == 3
    assert not told_to_wait.ok and told_to_wait.transient and told_to_wait.error == "http_429" and took < 2.0
    assert told_to_wait.attempts == 1 and len(openai_server.completion_requests()) == 5
    assert [is_transient(r) for r in ("http_429", "http_408", "http_502", "timeout", "connection")] == [True] * 5
    assert not any(is_transient(r) for r in ("http_400", "http_404", "invalid_json", "empty_reply", None, "http_5"))


def test_content_failures_stop_at_max_attempts_and_only_retry_failed_asks_again(
        tmp_path, openai_server, argv, capsys):
    tool = load_tool("entigraph")
    llm = ScriptedLLM()
    llm.malformed.add("Salt Roads")
    openai_server.reply = llm
    assert tool.main(argv("entigraph", "W", "out/eg", "--max-attempts", "2")) == 4
    err = capsys.readouterr().err
    assert "missing entities items (permanent after --max-attempts: --retry-failed asks again): invalid_json 1" in err
    assert "rerun with --retry-failed" in err and not list(tmp_path.glob("out/eg*"))
    assert asked(openai_server)[("Salt Roads", "entities", ())] == 2  # --max-attempts, the repair included

    llm.malformed.clear()
    openai_server.reset()
    assert tool.main(argv("entigraph", "W", "out/eg", "--max-attempts", "2")) == 4  # a plain rerun: nothing asked
    assert openai_server.completion_requests() == []
    assert tool.main(argv("entigraph", "W", "out/eg", "--retry-failed")) == 0
    assert sum(asked(openai_server).values()) == 1 + 3 + 1  # Salt Roads: entities, 3 pairs, 1 triple


def test_judge_requests_the_endpoint_never_answered_exit_4_unless_allow_partial(tmp_path, openai_server, capsys):
    from synth.quality_data import build_corpus, write_synthetic

    corpus = build_corpus(tmp_path / "c")
    n = len(corpus.docs)
    syn = write_synthetic(tmp_path / "syn", corpus, corpus.docs, list(range(n)))
    verdict = json.dumps({"verdict": "factual", "errors": []})

    def outage(body):  # the requests about a third of the documents fail transiently, whatever the wait
        return Fault.status(503) if sum(map(ord, body["messages"][-1]["content"])) % 3 == 0 else verdict

    openai_server.reply = outage
    tool = load_tool("synth_quality")
    argv = ["--synthetic", syn, "--corpus", corpus.prefix, "--out", str(tmp_path / "q"), "--sample", "8",
            "--embed-max-tokens", "16", "--judge-endpoint", openai_server.base_url, "--judge-model", "judge",
            "--judge-api-key-env", TEST_API_KEY_ENV, "--judge-transient-budget-s", "0.2"]
    assert tool.main(argv) == 4
    err = capsys.readouterr().err
    assert "unanswered" in err and "--allow-partial" in err and not (tmp_path / "q" / "results.json").exists()
    assert tool.main([*argv, "--allow-partial"]) == 0
    res = json.loads((tmp_path / "q" / "results.json").read_text())
    unanswered = {k: row["non_factual"]["unanswered"] for k, row in res["rows"].items()}
    assert res["partial"] is True and res["missing"] == {"judge": {k: v for k, v in unanswered.items() if v}}
    assert sum(unanswered.values()) >= 1 and all(row["non_factual"]["failed"] == 0 for row in res["rows"].values())
    assert "unanswered" in (tmp_path / "q" / "results.md").read_text()


def test_synthesize_endpoint_rides_out_transient_failures_and_stops_resumably_past_the_budget(
        tmp_path, openai_server, capsys):
    from sbp_helpers import make_corpus, make_synthesizer, make_tokenizer

    tok = make_tokenizer(tmp_path / "tok")
    corpus = make_corpus(tmp_path / "real", tok)
    run = make_synthesizer(tmp_path / "run", tok, corpus)
    openai_server.reply = lambda body: f" synthetic text {len(body['prompt'])} {sum(body['prompt']) % 97}"
    tool = load_tool("synthesize")

    def argv(out: str, *extra: str) -> list[str]:
        return ["--checkpoint", str(run), "--corpus", str(corpus), "--output-prefix", str(tmp_path / out),
                "--num-docs", "12", "--shard-docs", "4", "--max-seed-tokens", "6", "--max-new-tokens", "12",
                "--endpoint", openai_server.base_url, "--served-model", "synth", "--api-key-env", TEST_API_KEY_ENV,
                "--concurrency", "4", "--timeout", "0.5", "--max-attempts", "1", "--no-progress", *extra]

    assert tool.main(argv("ref")) == 0
    openai_server.chaos(0.3, seed=5)
    assert tool.main(argv("out", "--transient-budget-s", "30")) == 0  # --max-attempts 1: no fault is an attempt
    assert sum(openai_server.faults_served.values()) >= 3
    assert same_bytes(tmp_path / "out", tmp_path / "ref")

    openai_server.reset()
    openai_server.reply = lambda body: Fault.drop()
    capsys.readouterr()
    assert tool.main(argv("down", "--transient-budget-s", "0.2")) == 1
    err = capsys.readouterr().err
    assert "kept failing transiently for 0.2 s" in err and "run the same command again to resume" in err
    assert not (tmp_path / "down.idx").exists()


def test_rephrase_outage_then_a_plain_rerun_asks_only_for_the_missing(tmp_path, openai_server, argv, capsys):
    tool = load_tool("rephrase")
    assert tool.main(argv("rephrase", "Rref", "ref/rp")) == 0
    llm, down = ScriptedLLM(), ("Salt Roads", "rephrase", "qa")
    openai_server.reply = lambda body: Fault.status(500) if request_id(body) == down else llm(body)
    capsys.readouterr()
    assert tool.main(argv("rephrase", "R", "out/rp", "--transient-budget-s", "0.2", "--max-attempts", "1")) == 4
    err = capsys.readouterr().err
    assert "missing rephrase items (transient: a plain rerun asks again): http_500 1" in err
    assert not list(tmp_path.glob("out/rp*"))
    openai_server.reply = ScriptedLLM()
    openai_server.reset()
    assert tool.main(argv("rephrase", "R", "out/rp")) == 0
    assert asked(openai_server) == Counter([down])
    assert same_bytes(tmp_path / "out/rp", tmp_path / "ref/rp")
