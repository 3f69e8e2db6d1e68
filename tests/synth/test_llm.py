"""The LLM client against the local OpenAI-compatible server: exact request counts under scripted replies and
faults, Retry-After, JSON repair, budget, ledger, API-key hygiene, concurrency."""

import argparse
import asyncio
import email.utils
import json
import logging
import random
import time
from datetime import UTC, datetime

import pytest
from synth.openai_server import (
    TEST_API_KEY,
    TEST_API_KEY_ENV,
    Fault,
    OpenAIServer,
    Reply,
)

from megasynth.io import read_jsonl
from megasynth.synth.llm.ledger import Ledger
from megasynth.synth.llm import (
    BudgetExceeded,
    LLMClient,
    LLMRequest,
    LLMSettings,
    add_llm_arguments,
    settings_from_args,
)
from megasynth.synth.llm.json_replies import check_schema, extract_json
from megasynth.synth.llm.limits import TokenBucket, backoff_delay, parse_retry_after

ENTITIES = {"type": "object", "required": ["entities"],
            "properties": {"entities": {"type": "array", "items": {"type": "string"}, "minItems": 1}}}
USER = [{"role": "user", "content": "List the entities."}]


def http_date(seconds_from_now: float) -> str:
    """An HTTP date seconds_from_now in the future (a Retry-After as a date)."""
    return email.utils.format_datetime(datetime.fromtimestamp(time.time() + seconds_from_now, UTC), usegmt=True)


def settings(server, **kw) -> LLMSettings:
    base = {"base_url": server.base_url, "model": "test-model", "api_key_env": TEST_API_KEY_ENV, "timeout_s": 5.0,
            "backoff_base_s": 0.01, "backoff_max_s": 0.05}
    return LLMSettings(**{**base, **kw})


def run(coro):
    return asyncio.run(coro)


def last_user(body) -> str:
    return body["messages"][-1]["content"] if "messages" in body else body["prompt"]


# --------------------------------------------------------------------------------------------- scripted successes
def test_scripted_successes_make_exactly_one_request_each(openai_server, tmp_path):
    openai_server.reply = lambda body: f"answer to {last_user(body)}"
    requests = [LLMRequest(f"c{i}", messages=[{"role": "user", "content": f"q{i}"}]) for i in range(6)]
    requests += [LLMRequest(f"p{i}", prompt=f"text {i}", sampling={"max_tokens": 7}) for i in range(4)]

    async def go():
        async with LLMClient(settings(openai_server, temperature=0.3), tmp_path / "ledger.jsonl") as client:
            return await client.map(requests)

    results = run(go())
    assert len(openai_server.requests) == 10
    assert sorted(r.path for r in openai_server.requests) == ["/v1/chat/completions"] * 6 + ["/v1/completions"] * 4
    assert all(r.headers["Authorization"] == f"Bearer {TEST_API_KEY}" for r in openai_server.requests)
    assert results["c3"].ok and results["c3"].text == "answer to q3" and results["c3"].attempts == 1
    assert results["p2"].text == "answer to text 2" and results["p2"].usage.completion_tokens == 4
    bodies = {last_user(r.json): r.json for r in openai_server.requests}
    assert bodies["q0"]["model"] == "test-model" and bodies["q0"]["temperature"] == 0.3
    assert bodies["text 1"]["max_tokens"] == 7 and "max_tokens" not in bodies["q1"]


# --------------------------------------------------------------------------------------------------- retries
def test_429_waits_at_least_retry_after_then_succeeds(openai_server):
    openai_server.inject(Fault.status(429, retry_after=0.3))

    async def go():
        async with LLMClient(settings(openai_server)) as client:
            return await client.chat("k", USER)

    r = run(go())
    first, second = openai_server.requests
    assert r.ok and r.attempts == 2 and len(openai_server.requests) == 2
    assert second.time - first.time >= 0.3


@pytest.mark.parametrize("fault,reason", [(Fault.status(500), "http_500"), (Fault.status(503), "http_503"),
                                          (Fault.status(408), "http_408"), (Fault.slow(3.0), "timeout"),
                                          (Fault.drop(), "connection")])
def test_transient_fault_is_retried_once(openai_server, fault, reason):
    openai_server.inject(fault)

    async def go():
        async with LLMClient(settings(openai_server, timeout_s=0.4)) as client:
            return await client.chat("k", USER)

    r = run(go())
    assert r.ok and r.attempts == 2 and r.error is None
    assert len(openai_server.completion_requests()) == 2


def test_persistent_transient_failure_ends_after_the_time_budget_not_max_attempts(openai_server, tmp_path):
    """Issue 19: 5xx are retried for transient_budget_s (from the first one), whatever max_attempts says; the
    item then fails marked transient, and the run goes on."""
    openai_server.reply = lambda body: Fault.status(500) if last_user(body) == "bad" else "fine"

    async def go():
        async with LLMClient(settings(openai_server, max_attempts=2, transient_budget_s=0.4),
                             tmp_path / "l.jsonl") as client:
            started = time.monotonic()
            bad = await client.chat("bad", [{"role": "user", "content": "bad"}])
            waited = time.monotonic() - started
            good = await client.chat("good", USER)
            return bad, waited, good, client.summary()

    bad, waited, good, summary = run(go())
    assert not bad.ok and bad.error == "http_500" and bad.transient and "HTTP 500" in bad.detail
    assert bad.attempts == bad.transient_failures > 2 and 0.4 <= waited < 2.0
    assert good.ok and good.attempts == 1 and not good.transient
    assert len(openai_server.requests) == bad.attempts + 1
    assert summary["requests"] == 2 and summary["ok"] == 1 and summary["failed"] == {"http_500": 1}
    assert summary["http_requests"] == bad.attempts + 1
    assert [line["transient"] for _, line in read_jsonl(tmp_path / "l.jsonl")] == [True, False]


@pytest.mark.parametrize("code", [400, 404, 422])
def test_other_4xx_is_not_retried(openai_server, code):
    openai_server.inject(Fault.status(code))

    async def go():
        async with LLMClient(settings(openai_server)) as client:
            return await client.chat("k", USER)

    r = run(go())
    assert not r.ok and r.error == f"http_{code}" and r.attempts == 1
    assert len(openai_server.requests) == 1


# ------------------------------------------------------------------------------------------------------ JSON
def test_fenced_json_with_prose_is_parsed(openai_server):
    openai_server.reply = lambda body: 'Sure!\n```json\n{"entities": ["Ada", "engine"]}\n```\nAnything else?'

    async def go():
        async with LLMClient(settings(openai_server)) as client:
            return await client.chat("k", USER, schema=ENTITIES)

    r = run(go())
    assert r.ok and r.parsed == {"entities": ["Ada", "engine"]} and r.attempts == 1


def test_always_malformed_json_fails_after_one_plus_repairs_requests(openai_server, tmp_path):
    openai_server.reply = lambda body: '{"entities": ["Ada", '  # truncated: never valid

    async def go(**kw):
        async with LLMClient(settings(openai_server, **kw), tmp_path / "l.jsonl") as client:
            return await client.chat("k", USER, schema=ENTITIES)

    r = run(go(max_attempts=5, json_repair_attempts=2))
    assert not r.ok and r.error == "invalid_json" and r.attempts == 3 and r.repairs == 2
    assert len(openai_server.requests) == 3
    # Each repair carries the conversation, the bad reply and what was wrong with it.
    repair = openai_server.requests[1].json["messages"]
    assert repair[:1] == USER and repair[1] == {"role": "assistant", "content": '{"entities": ["Ada", '}
    assert "not valid JSON" in repair[2]["content"]
    assert len(openai_server.requests[2].json["messages"]) == 5
    # max_attempts bounds repairs too.
    openai_server.reset()
    r = run(go(max_attempts=2, json_repair_attempts=5))
    assert not r.ok and r.error == "invalid_json" and r.attempts == 2 and len(openai_server.requests) == 2


def test_repair_succeeds_and_validator_is_applied(openai_server):
    replies = iter(['{"entities": []}', '{"entities": ["x"]}', '{"entities": ["Ada"]}'])
    openai_server.reply = lambda body: next(replies)

    def validate(value):
        return None if value["entities"] != ["x"] else "x is not an entity"

    async def go():
        async with LLMClient(settings(openai_server)) as client:
            return await client.chat("k", USER, schema=ENTITIES, validate=validate)

    r = run(go())
    assert r.ok and r.parsed == {"entities": ["Ada"]} and r.attempts == 3 and r.repairs == 2
    assert "at least 1 items" in openai_server.requests[1].json["messages"][-1]["content"]
    assert "x is not an entity" in openai_server.requests[2].json["messages"][-1]["content"]


# ----------------------------------------------------------------------------------------------------- budget
def test_budget_stops_new_requests_and_carries_over_to_a_resumed_run(openai_server, tmp_path):
    openai_server.reply = lambda body: Reply("fine", prompt_tokens=60, completion_tokens=40)
    ledger = tmp_path / "ledger.jsonl"
    finished = []

    async def go():
        async with LLMClient(settings(openai_server, concurrency=1, budget_tokens=250), ledger) as client:
            await client.map([LLMRequest(f"k{i}", messages=USER) for i in range(10)],
                             lambda req, res: finished.append(req.key))

    with pytest.raises(BudgetExceeded):
        run(go())
    # Requests start one at a time: after 3 x 100 tokens >= 250 no fourth one is sent.
    assert len(openai_server.requests) == 3 and finished == ["k0", "k1", "k2"]
    assert [e["key"] for _, e in read_jsonl(ledger)] == ["k0", "k1", "k2"]
    with pytest.raises(BudgetExceeded):  # the same ledger, the same budget: nothing more is sent
        run(go())
    assert len(openai_server.requests) == 3


def test_budget_usd_counts_cost_from_prices(openai_server, tmp_path):
    openai_server.reply = lambda body: Reply("fine", prompt_tokens=1000, completion_tokens=1000)

    async def go():
        s = settings(openai_server, concurrency=1, price_in_per_m=2.0, price_out_per_m=8.0, budget_usd=0.025)
        async with LLMClient(s, tmp_path / "l.jsonl") as client:
            try:
                await client.map([LLMRequest(f"k{i}", prompt="x") for i in range(10)])
            finally:
                return client.summary()  # noqa: B012

    summary = run(go())
    assert summary["requests"] == 3 and summary["cost_usd"] == pytest.approx(0.03)  # 0.01 per request


# ----------------------------------------------------------------------------------------------------- ledger
def test_ledger_lines_summary_and_progress(openai_server, tmp_path):
    openai_server.inject(Fault.status(400))  # the first request (k0) fails
    openai_server.reply = lambda body: Reply("ok", prompt_tokens=10, completion_tokens=5)
    path = tmp_path / "w" / "ledger.jsonl"

    async def go():
        async with LLMClient(settings(openai_server, concurrency=1, price_in_per_m=1.0, price_out_per_m=2.0),
                             path) as client:
            await client.map([LLMRequest(f"k{i}", messages=USER) for i in range(3)])
            return client.summary(), client.progress_text()

    summary, progress = run(go())
    lines = [e for _, e in read_jsonl(path)]
    assert [(e["key"], e["outcome"], e["attempts"], e["error"]) for e in lines] == [
        ("k0", "failed", 1, "http_400"), ("k1", "ok", 1, None), ("k2", "ok", 1, None)]
    assert lines[1]["prompt_tokens"] == 10 and lines[1]["completion_tokens"] == 5 and lines[1]["model"] == "test-model"
    assert lines[1]["cost_usd"] == pytest.approx(20e-6) and lines[1]["latency_s"] >= 0 and lines[1]["time"] > 0
    assert summary == {"requests": 3, "ok": 2, "failed": {"http_400": 1}, "http_requests": 3, "repairs": 0,
                       "prompt_tokens": 20, "completion_tokens": 10, "cost_usd": pytest.approx(40e-6),
                       "previous_requests": 0, "usage_estimated": 0, "cut_to_max_tokens": 0, "api_key_scrubbed": 0}
    assert progress.startswith("3 requests (2 ok, 1 failed: http_400 1), 20 in / 10 out tokens")
    # A torn last line (a crash mid-write) is cut off when the ledger is opened again; the rest counts.
    with open(path, "a") as f:
        f.write('{"key": "k3", "outc')
    ledger = Ledger(path)
    ledger.close()
    assert ledger.summary()["requests"] == 3 and path.read_text().endswith("\n")
    assert len(path.read_text().splitlines()) == 3


def test_api_key_never_appears_in_ledger_logs_or_errors(openai_server, tmp_path, caplog, capsys, monkeypatch):
    caplog.set_level(logging.DEBUG)
    openai_server.reply = lambda body: "not json"
    ledger = tmp_path / "ledger.jsonl"
    texts = []

    async def go():
        async with LLMClient(settings(openai_server, budget_tokens=10_000), ledger) as client:
            texts.append(repr(await client.chat("json", USER, schema=ENTITIES)))
            openai_server.inject(Fault.status(500), Fault.drop(), Fault.status(400))
            texts.append(repr(await client.chat("faults", USER)))
            texts.append(client.progress_text() + json.dumps(client.summary()))

    run(go())
    # A server that rejects the key and echoes it back (as some do): the echo is scrubbed.
    wrong = "sk-megasynth-WRONG-key-Z9y8X7w6V5u4"
    monkeypatch.setenv(TEST_API_KEY_ENV, wrong)

    async def unauthorised():
        async with LLMClient(settings(openai_server), tmp_path / "other.jsonl") as client:
            texts.append(repr(await client.chat("denied", USER)))
        async with LLMClient(settings(openai_server, budget_tokens=1), ledger) as client:
            with pytest.raises(BudgetExceeded) as e:
                await client.chat("more", USER)
            texts.append(str(e.value))

    run(unauthorised())
    assert "HTTP 401" in texts[-2] and "***" in texts[-2]
    out = capsys.readouterr()
    everything = "\n".join([*texts, caplog.text, out.out, out.err] +
                           [p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file()])
    for key in (TEST_API_KEY, wrong):
        assert key not in everything and key[:8] + key[8:16] not in everything and key[-8:] not in everything
    assert len(list(read_jsonl(ledger))) == 2 and len(list(read_jsonl(tmp_path / "other.jsonl"))) == 1


# ------------------------------------------------------------------------------------------------ concurrency
def test_concurrency_limit_is_respected():
    with OpenAIServer(delay_s=0.05) as server:

        async def go():
            s = LLMSettings(base_url=server.base_url, model="m", api_key_env=TEST_API_KEY_ENV, concurrency=4)
            async with LLMClient(s) as client:
                return await client.map([LLMRequest(f"k{i}", prompt="x") for i in range(24)])

        results = run(go())
        assert len(results) == 24 and all(r.ok for r in results.values())
        assert 1 < server.max_in_flight <= 4


def test_requests_per_minute_spaces_requests():
    with OpenAIServer() as server:

        async def go():
            # 240/min = 4/s with a 2 s burst of 8: requests 9 and 10 wait for refills of 0.25 s each.
            s = LLMSettings(base_url=server.base_url, model="m", api_key_env=TEST_API_KEY_ENV,
                            requests_per_minute=240)
            async with LLMClient(s) as client:
                started = time.monotonic()  # the server records time.monotonic() of this process
                await client.map([LLMRequest(f"k{i}", prompt="x") for i in range(10)])
                return started

        started = run(go())
        assert len(server.requests) == 10 and max(r.time for r in server.requests) - started >= 0.5


def test_batch_follow_ups_duplicates_and_callback_errors(openai_server):
    openai_server.reply = lambda body: last_user(body).upper()
    seen = []

    async def go():
        async with LLMClient(settings(openai_server)) as client:
            async def on_result(request, result):
                seen.append((request.key, result.text, request.meta))
                if request.meta == "parent":  # submit follow-ups from the callback, as EntiGraph does
                    for i in range(2):
                        await batch.submit(LLMRequest(f"{request.key}/{i}", prompt=f"{result.text}{i}", meta="child"))

            async with client.batch(on_result) as batch:
                for name in ("a", "b"):
                    await batch.submit(LLMRequest(name, prompt=name, meta="parent"))
                with pytest.raises(ValueError, match="submitted twice"):
                    await batch.submit(LLMRequest("a", prompt="again"))

            def boom(request, result):
                raise RuntimeError("callback failed")

            with pytest.raises(RuntimeError, match="callback failed"):
                async with client.batch(boom) as batch2:
                    await batch2.submit(LLMRequest("z", prompt="z"))

    run(go())
    assert sorted(seen) == [("a", "A", "parent"), ("a/0", "A0", "child"), ("a/1", "A1", "child"),
                            ("b", "B", "parent"), ("b/0", "B0", "child"), ("b/1", "B1", "child")]
    assert len(openai_server.requests) == 7


# ------------------------------------------------------------------------------------------ pure helpers, CLI
def test_extract_json_and_schema():
    assert extract_json('text {"a": 1} more {"b": 2}') == {"a": 1}
    assert extract_json("```\n[1, 2]\n```") == [1, 2]
    assert extract_json('a {broken then {"ok": true}') == {"ok": True}
    with pytest.raises(ValueError, match="no JSON"):
        extract_json("no json here")
    with pytest.raises(ValueError, match="not valid JSON"):
        extract_json('{"a": ')
    schema = {"type": "object", "required": ["n"], "additionalProperties": False,
              "properties": {"n": {"type": "integer"}, "tags": {"type": "array", "maxItems": 2,
                                                                "items": {"type": "string", "minLength": 1}}}}
    assert check_schema({"n": 1, "tags": ["a"]}, schema) is None
    assert check_schema({"n": True}, schema) == "$.n: expected integer, got boolean"
    assert check_schema({"n": 1, "tags": ["a", ""]}, schema) == "$.tags[1]: expected at least 1 characters, got 0"
    assert check_schema({"n": 1, "tags": ["a"] * 3}, schema) == "$.tags: expected at most 2 items, got 3"
    assert check_schema({"n": 1, "x": 0}, schema) == "$: unexpected keys ['x']"
    assert check_schema({}, schema) == "$: missing required key 'n'"
    with pytest.raises(ValueError, match="unsupported keywords"):
        check_schema(1, {"pattern": "x"})


def test_retry_after_and_backoff():
    assert parse_retry_after("2") == 2.0 and parse_retry_after(" 0.5 ") == 0.5 and parse_retry_after(None) is None
    assert parse_retry_after("garbage") is None and parse_retry_after("-3") == 0.0 and parse_retry_after("1e9") == 600
    assert 28 <= parse_retry_after(http_date(30)) <= 31
    rng = random.Random(0)
    delays = [backoff_delay(n, 1.0, 5.0, rng) for n in (1, 2, 3, 10) for _ in range(50)]
    assert all(0 <= d <= 1.0 for d in delays[:50]) and all(0 <= d <= 5.0 for d in delays)
    assert max(delays[150:]) > 2.0  # the cap, not the first attempt's range, bounds late attempts


def test_token_bucket_waits_for_refill_and_takes_corrections():
    async def go():
        bucket = TokenBucket(per_minute=6000)  # 100/s, holds 2 s = 200
        assert bucket.capacity == 200
        await bucket.acquire(200)
        started = time.monotonic()
        await bucket.acquire(30)  # the bucket is empty: 30 tokens take 0.3 s to refill
        waited = time.monotonic() - started
        bucket.adjust(-1000)  # charged more than estimated: in debt
        debt = bucket.level
        bucket.adjust(5000)  # a correction never fills past the capacity
        return waited, debt, bucket.level

    waited, debt, level = run(go())
    assert waited >= 0.29 and debt < -900 and level == 200


def test_retry_after_as_http_date_is_honoured(openai_server):
    date = http_date(3)
    not_before = email.utils.parsedate_to_datetime(date).timestamp()  # whole seconds: the header's resolution
    openai_server.inject(Fault.status(429, retry_after=date))

    async def go():
        async with LLMClient(settings(openai_server)) as client:
            return await client.chat("k", USER)

    r = run(go())
    _, second = openai_server.requests
    second_wall = time.time() - (time.monotonic() - second.time)  # the server records monotonic times
    # The retry waits until the date itself, however late the first request went out (a loaded machine).
    assert r.ok and r.attempts == 2 and second_wall >= not_before - 0.05


def test_cli_flags_build_settings():
    parser = argparse.ArgumentParser()
    add_llm_arguments(parser)
    args = parser.parse_args(["--base-url", "http://h/v1", "--model", "m", "--concurrency", "8", "--rpm", "100",
                              "--tpm", "5000", "--max-attempts", "3", "--timeout", "9", "--temperature", "0.5",
                              "--max-tokens", "64", "--price-in", "1", "--price-out", "2", "--budget-tokens", "99",
                              "--budget-usd", "0.5", "--api-key-env", "K", "--transient-budget-s", "30",
                              "--backoff-base-s", "0.5", "--backoff-max-s", "4"])
    s = settings_from_args(args)
    assert (s.transient_budget_s, s.backoff_base_s, s.backoff_max_s) == (30, 0.5, 4)
    assert (s.base_url, s.model, s.api_key_env, s.concurrency, s.requests_per_minute, s.tokens_per_minute,
            s.max_attempts, s.timeout_s, s.temperature, s.max_tokens, s.price_in_per_m, s.price_out_per_m,
            s.budget_tokens, s.budget_usd) == ("http://h/v1", "m", "K", 8, 100, 5000, 3, 9, 0.5, 64, 1, 2, 99, 0.5)
    help_text = parser.format_help()
    for flag in ("--base-url", "--model", "--api-key-env", "--concurrency", "--rpm", "--tpm", "--max-attempts",
                 "--timeout", "--temperature", "--max-tokens", "--price-in", "--price-out", "--budget-tokens",
                 "--budget-usd", "--transient-budget-s", "--backoff-base-s", "--backoff-max-s"):
        assert flag in help_text
    with pytest.raises(ValueError, match="--budget-usd needs"):
        settings_from_args(parser.parse_args(["--base-url", "u", "--model", "m", "--budget-usd", "1"]))


def test_an_empty_text_completion_that_stopped_is_a_result_but_an_empty_chat_reply_is_retried(openai_server):
    """A synthesizer that emits EOD first returns "" with finish_reason "stop": a legitimate (empty) text, not a
    failure to retry; an empty chat reply is retried and fails. Token-id prompts are budgeted by their length."""
    openai_server.reply = lambda body: ""

    async def go():
        async with LLMClient(settings(openai_server, max_attempts=3, tokens_per_minute=10_000)) as client:
            return await client.complete("ids", [5, 6, 7], max_tokens=8), await client.chat("c", USER)

    completion, chat = run(go())
    assert completion.ok and completion.text == "" and completion.attempts == 1
    assert not chat.ok and chat.error == "empty_reply" and chat.attempts == 3
    assert [r.json["prompt"] for r in openai_server.completion_requests() if "prompt" in r.json] == [[5, 6, 7]]
