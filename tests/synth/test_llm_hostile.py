"""A hostile endpoint (issue 19), over real HTTP to the local test server, through the real client and the tools'
command lines: replies longer than max_tokens, usage that is not a count, bodies of hundreds of MB, a ledger the
disk refuses, a server that echoes the API key in a successful reply."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from helpers import load_tool
from sbp_helpers import make_tokenizer
from synth.openai_server import TEST_API_KEY, TEST_API_KEY_ENV, Fault, Reply
from synth.scripted_llm import DOCS, ScriptedLLM, request_id

from megasynth.data.indexed import IndexedDataset
from megasynth.io import read_jsonl
from megasynth.synth.llm.ledger import Ledger
from megasynth.synth.llm import BudgetExceeded, LLMClient, LLMRequest, LLMSettings
from megasynth.synth.sbp.samplers import EndpointSampler, Sampling
from megasynth.tokenizer import load_tokenizer, train_bpe_tokenizer

USER = [{"role": "user", "content": "Tell me about the lighthouse."}]
LONG = " ".join(f"the keeper walked {i} steps along Storm Bay" for i in range(12))  # ~100 tokens in any of ours
ENTITIES_TOOL = Path(__file__).resolve().parents[2] / "tools" / "entigraph.py"


def settings(server, **kw) -> LLMSettings:
    base = {"base_url": server.base_url, "model": "test-model", "api_key_env": TEST_API_KEY_ENV, "timeout_s": 10.0,
            "backoff_base_s": 0.01, "backoff_max_s": 0.05}
    return LLMSettings(**{**base, **kw})


def chat(server, *keys: str, ledger=None, tokenizer=None, **kw):
    async def go():
        async with LLMClient(settings(server, **kw), ledger, tokenizer=tokenizer) as client:
            results = await client.map([LLMRequest(k, messages=USER) for k in keys])
            return results, client.summary()

    return asyncio.run(go())


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


# ------------------------------------------------------------------------------------ 9: longer than max_tokens
def test_a_reply_over_max_tokens_is_cut_to_the_limit_and_counted(openai_server, tmp_path, tok):
    openai_server.reply = lambda body: LONG if body["messages"][0]["content"] == USER[0]["content"] else "short"
    assert len(tok.encode(LONG)) > 43
    results, summary = chat(openai_server, "long", ledger=tmp_path / "l.jsonl", tokenizer=tok, max_tokens=16)
    r = results["long"]
    assert r.ok and r.cut_to_max_tokens and r.finish_reason == "length"
    assert len(tok.encode(r.text, parse_special=False)) <= 16 and LONG.startswith(r.text) and len(r.text) > 20
    assert r.usage.completion_tokens == -(-len(LONG) // 4)  # what the server says it generated is still paid for
    line = next(e for _, e in read_jsonl(tmp_path / "l.jsonl"))
    assert line["cut_to_max_tokens"] is True and summary["cut_to_max_tokens"] == 1
    # Within the limit: untouched. Without a tokenizer the server's own count decides (here 26 > 16).
    results, summary = chat(openai_server, "fits", tokenizer=tok, max_tokens=2000)
    assert results["fits"].text == LONG and not results["fits"].cut_to_max_tokens and summary["cut_to_max_tokens"] == 0
    results, _ = chat(openai_server, "no-tokenizer", max_tokens=16)
    cut = results["no-tokenizer"]
    assert cut.cut_to_max_tokens and LONG.startswith(cut.text) and len(cut.text) == len(LONG) * 16 // -(-len(LONG) // 4)


def test_synthesize_endpoint_keeps_at_most_max_new_tokens_and_counts_them_truncated(openai_server, tmp_path, tok):
    # The reproduction: a completion of 43+ tokens for a limit of 16 was kept whole and counted as ended.
    openai_server.reply = lambda body: LONG
    endpoint = LLMSettings(openai_server.base_url, "synth", concurrency=2, max_attempts=2,
                           api_key_env=TEST_API_KEY_ENV, backoff_base_s=0.01, timeout_s=10)
    sampler = EndpointSampler(endpoint, tok, Sampling(seed=1, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=16),
                              tmp_path / "ledger.jsonl")
    prompt = np.asarray(tok.encode("the keeper") + tok.encode("<|sep|>"), np.int64)
    out = sampler([prompt, prompt], np.array([0, 1]))
    for ids, ended in out:
        assert len(ids) == 16 and not ended  # counted as truncated by synthesize
        assert tok.decode(ids) == LONG[:len(tok.decode(ids))]
    assert all(r.json["max_tokens"] == 16 for r in openai_server.completion_requests())
    lines = [e for _, e in read_jsonl(tmp_path / "ledger.jsonl")]
    assert len(lines) == 2 and all(e["cut_to_max_tokens"] for e in lines)


# -------------------------------------------------------------------------------------- 10: usage is not a count
@pytest.mark.parametrize("usage", [
    {"prompt_tokens": "12", "completion_tokens": "5"},                   # strings crashed the run (ValueError)
    {"prompt_tokens": 12, "completion_tokens": -23_000_000_000},         # negatives defeated the budget
    {"prompt_tokens": 12.5, "completion_tokens": 5},                     # not an int
    {"prompt_tokens": True, "completion_tokens": 5},                     # a bool is not a count
    {"prompt_tokens": 12, "completion_tokens": 10**30},                  # absurd
    {"prompt_tokens": 12},                                               # half missing
    {}, "lots",
], ids=["strings", "negative", "float", "bool", "absurd", "half", "empty", "not-an-object"])
def test_usage_that_is_not_a_count_is_estimated_and_counted(openai_server, tmp_path, usage):
    openai_server.reply = lambda body: Reply("fine answer here", usage=usage)
    results, summary = chat(openai_server, "k", ledger=tmp_path / "l.jsonl")
    r = results["k"]
    assert r.ok and r.usage.estimated
    assert r.usage.prompt_tokens == len(USER[0]["content"]) // 4 and r.usage.completion_tokens == 16 // 4
    assert summary["usage_estimated"] == 1 and summary["prompt_tokens"] == r.usage.prompt_tokens
    line = next(e for _, e in read_jsonl(tmp_path / "l.jsonl"))
    assert line["usage_estimated"] is True and line["completion_tokens"] == 4


def test_negative_usage_no_longer_defeats_the_budget(openai_server, tmp_path):
    openai_server.reply = lambda body: Reply("an answer of some length", usage={"prompt_tokens": -23_000_000_000,
                                                                                "completion_tokens": -1})

    async def go():
        async with LLMClient(settings(openai_server, concurrency=1, budget_tokens=40), tmp_path / "l.jsonl") as c:
            with pytest.raises(BudgetExceeded):
                await c.map([LLMRequest(f"k{i}", messages=USER) for i in range(50)])
            return c.summary()

    summary = asyncio.run(go())
    assert 40 <= summary["prompt_tokens"] + summary["completion_tokens"] < 80 and summary["requests"] < 10
    assert summary["usage_estimated"] == summary["requests"]


# ----------------------------------------------------------------------------------------- 11: huge bodies
_CLIENT_SCRIPT = textwrap.dedent("""
    import asyncio, json, resource, sys, time
    from megasynth.synth.llm import LLMClient, LLMRequest, LLMSettings

    base_url, key_env = sys.argv[1], sys.argv[2]
    s = LLMSettings(base_url=base_url, model="m", api_key_env=key_env, concurrency=4, timeout_s=60,
                    max_reply_bytes=4 * 1024 * 1024, backoff_base_s=0.01, backoff_max_s=0.05)

    async def go(kinds):
        async with LLMClient(s) as client:
            requests = [LLMRequest(f"{kind}{i}", messages=[{"role": "user", "content": kind}])
                        for kind in kinds for i in range(4)]
            return await client.map(requests)

    for group in sys.argv[3:]:  # each: its results, wall time, and the peak RSS of the process so far
        t0 = time.monotonic()
        results = asyncio.run(go(group.split(",")))
        print(json.dumps({"seconds": time.monotonic() - t0,
                          "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                          "results": {k: [r.ok, r.error, r.detail] for k, r in results.items()}}))
""")
HUGE = 300 * 1024 * 1024


def _run_client(server, *groups: str) -> list[dict]:
    out = subprocess.run([sys.executable, "-c", _CLIENT_SCRIPT, server.base_url, TEST_API_KEY_ENV, *groups],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, TEST_API_KEY_ENV: TEST_API_KEY})
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines()[-len(groups):]]


def test_a_huge_reply_fails_fast_with_a_named_reason_and_bounded_memory(openai_server):
    def reply(body):
        kind = body["messages"][0]["content"]
        return {"ok": "ok", "streamed": Fault.huge(HUGE), "announced": Fault.huge(HUGE, announce=True),
                "error": Fault.huge(HUGE, status=500)}[kind]

    openai_server.reply = reply
    baseline, hostile = _run_client(openai_server, "ok", "streamed,announced,error")
    assert all(ok for ok, _, _ in baseline["results"].values())
    assert len(hostile["results"]) == 12
    for key, (ok, error, detail) in hostile["results"].items():
        assert not ok and error == "reply_too_large" and "--max-reply-bytes" in detail, (key, error, detail)
    # 12 bodies of 300 MB, 4 at a time: before the cap this took ~45 s and GBs of memory.
    assert hostile["seconds"] < 15
    assert hostile["peak_rss"] - baseline["peak_rss"] < 64 * 1024 * 1024, (hostile["peak_rss"], baseline["peak_rss"])
    assert len(openai_server.completion_requests()) == 4 + 12  # not retried: the next reply would be as large


# ----------------------------------------------------------------------------- 13 (+9, 10): through the CLI
@pytest.fixture
def entigraph(tmp_path, openai_server):
    train_bpe_tokenizer([d["text"] for d in DOCS] * 10, tmp_path / "tok", vocab_size=300)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS), encoding="utf-8")

    def argv(work: str, out: str, *extra: str) -> list[str]:
        return ["--input", str(tmp_path / "docs.jsonl"), "--work-dir", str(tmp_path / work), "--output-prefix",
                str(tmp_path / out), "--tokenizer", str(tmp_path / "tok"), "--base-url", openai_server.base_url,
                "--model", "test-model", "--api-key-env", TEST_API_KEY_ENV, "--max-triples-per-doc", "2",
                "--max-attempts", "3", "--no-progress", *extra]
    return argv


def test_entigraph_cli_scrubs_an_echoed_key_cuts_long_replies_and_survives_bad_usage(tmp_path, openai_server,
                                                                                     entigraph, capsys):
    scripted = ScriptedLLM()

    def hostile(body):
        _, step, _ = request_id(body)
        if step == "entities":  # valid JSON, but usage a server made up
            return Reply(scripted(body), usage={"prompt_tokens": "812", "completion_tokens": -23_000_000_000})
        # A relation: the key echoed inside a successful reply, then far more text than max_tokens allows.
        return Reply(scripted(body) + " " + LONG * 3, echo_authorization=True)

    openai_server.reply = hostile
    assert load_tool("entigraph").main(entigraph("W", "out/eg", "--max-tokens", "150")) == 0
    out = capsys.readouterr()
    relations = [e for _, e in read_jsonl(tmp_path / "W" / "relations.jsonl")]
    assert len(relations) == 12 and all(r["ok"] and r["finish_reason"] == "length" for r in relations)
    assert all("Bearer ***" in r["text"] for r in relations)
    tok = load_tokenizer(tmp_path / "tok")
    ds = IndexedDataset(tmp_path / "out" / "eg")
    texts = [tok.decode(ds[i].tolist()[:-1]) for i in range(len(ds))]
    assert len(texts) == 12 and all(len(ds[i]) - 1 <= 150 for i in range(len(ds)))
    sidecar = json.loads((tmp_path / "out" / "eg.json").read_text())
    llm = sidecar["synthetic"]["llm"]
    assert llm["api_key_scrubbed"] == 12 and llm["cut_to_max_tokens"] == 12 and llm["usage_estimated"] == 3
    assert llm["prompt_tokens"] > 0 and llm["completion_tokens"] > 0  # the made-up usage was not believed
    assert ("12 replies cut to max_tokens, 12 replies with the API key removed, 3 replies with usage estimated"
            in out.err)
    everything = "\n".join([out.out, out.err, *texts] + [p.read_text(errors="replace") for p in tmp_path.rglob("*")
                                                          if p.is_file() and p.suffix in (".jsonl", ".json")])
    assert TEST_API_KEY not in everything and TEST_API_KEY[-8:] not in everything
    # The budget holds against usage that claims -23e9 tokens (it used to exit 0 after a negative ledger).
    code = load_tool("entigraph").main(entigraph("W2", "out/eg2", "--max-tokens", "150", "--budget-tokens", "300"))
    assert code == 3 and not (tmp_path / "out" / "eg2.idx").exists()


def test_a_key_spelt_with_json_escapes_is_scrubbed_from_the_parsed_value(openai_server):
    escaped = "".join(f"\\u{ord(c):04x}" for c in TEST_API_KEY)
    openai_server.reply = lambda body: '{"entities": ["Mara", "' + escaped + '"]}'

    async def go():
        async with LLMClient(settings(openai_server)) as client:
            return await client.chat("k", USER, schema={"type": "object", "required": ["entities"]})

    r = asyncio.run(go())
    assert r.ok and r.parsed == {"entities": ["Mara", "***"]} and r.api_key_scrubbed


# ------------------------------------------------------------------------------------- 12: the disk fills up
def _limit_file_size(limit: int):
    def apply():  # in the child: writes past `limit` bytes fail with EFBIG (Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_ledger_the_disk_refuses_stops_the_run_and_no_result_outlives_its_ledger_line(tmp_path, openai_server,
                                                                                      entigraph):
    openai_server.reply = ScriptedLLM()
    argv = entigraph("W", "out/eg", "--concurrency", "1")
    env = {**os.environ, TEST_API_KEY_ENV: TEST_API_KEY}
    # A real failure of write(2): the child may not grow any file past 1500 bytes, which the ledger (one ~250-byte
    # line per request) reaches first, after 5 or 6 of the 15 requests.
    run = subprocess.run([sys.executable, str(ENTITIES_TOOL), *argv], capture_output=True, text=True, env=env,
                         timeout=120, preexec_fn=_limit_file_size(1500))
    work = tmp_path / "W"
    assert run.returncode == 2, run.stderr
    assert "ledger.jsonl: writing the LLM ledger failed (File too large)" in run.stderr, run.stderr
    answered = len(openai_server.completion_requests())
    assert 3 <= answered < 15
    ledger = Ledger(work / "ledger.jsonl")  # cuts the torn line the failed write left
    ledger.close()
    first_lines = [e for _, e in read_jsonl(work / "ledger.jsonl")]
    ledgered = {e["key"] for e in first_lines}
    # At least the request whose line the disk refused is answered and unledgered; how many more were answered
    # before the run stopped depends on the machine's speed (they are neither ledgered nor recorded).
    assert len(first_lines) < answered
    recorded = {e["key"] for name in ("entities.jsonl", "relations.jsonl") if (work / name).exists()
                for _, e in read_jsonl(work / name)}
    assert recorded and recorded <= ledgered  # the bug: 23 answered and recorded, 22 ledgered
    # Space again: the rerun (in-process this time) finishes, and the ledger counts every request with a result.
    assert load_tool("entigraph").main(argv) == 0
    final = [e for _, e in read_jsonl(work / "ledger.jsonl")]
    assert {e["key"] for e in final} >= recorded and len({e["key"] for e in final}) == 15
    # With space again, every request of the rerun has its line: nothing answered goes unledgered.
    assert len(final) - len(first_lines) == len(openai_server.completion_requests()) - answered
