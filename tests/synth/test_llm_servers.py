"""Several servers (issue 20, item 5) against local servers: requests spread with a concurrency per server, a
server that stops answering is taken out of rotation and its failed requests retried on another at once (nothing
lost, no backoff), probed again after the cool-down, a 429 pauses only its server; the flags and their errors."""

import argparse
import asyncio
import threading
import time

import pytest
from helpers import load_tool
from synth.openai_server import TEST_API_KEY_ENV, Fault, OpenAIServer

from megasynth.io import read_jsonl
from megasynth.synth.llm import LLMClient, LLMRequest, LLMSettings, add_llm_arguments, settings_from_args
from megasynth.synth.llm.servers import SERVER_FAILURES_IN_ROW


def settings(*servers, **kw) -> LLMSettings:
    # A backoff of seconds: a retry that waited for it instead of going to the other server would show.
    return LLMSettings(**{"base_url": ",".join(s.base_url for s in servers), "model": "m",
                          "api_key_env": TEST_API_KEY_ENV, "timeout_s": 5.0, "backoff_base_s": 5.0,
                          "backoff_max_s": 5.0, **kw})


def run_map(s: LLMSettings, n: int, ledger=None, seed: int = 0):
    async def go():
        async with LLMClient(s, ledger, seed=seed) as client:
            started = time.monotonic()
            results = await client.map([LLMRequest(f"k{i}", prompt=f"p{i}") for i in range(n)])
            return results, time.monotonic() - started

    return asyncio.run(go())


class DiesAfter:
    """A reply that answers `n` requests, then drops every connection (a server that died mid-run)."""

    def __init__(self, n: int):
        self.left, self.lock, self.dropped = n, threading.Lock(), 0

    def __call__(self, body):
        with self.lock:
            self.left -= 1
            if self.left >= 0:
                return "fine"
            self.dropped += 1
            return Fault.drop()


def test_requests_spread_over_the_servers_with_the_concurrency_per_server(tmp_path):
    with OpenAIServer(delay_s=0.05) as a, OpenAIServer(delay_s=0.05) as b:
        results, _ = run_map(settings(a, b, concurrency=3), 36, tmp_path / "l.jsonl")
        assert len(results) == 36 and all(r.ok for r in results.values())
        assert a.max_in_flight == b.max_in_flight == 3  # both saturated, neither past its own limit
        served = {a.base_url: len(a.requests), b.base_url: len(b.requests)}
        assert sum(served.values()) == 36 and min(served.values()) >= 12
        lines = [e for _, e in read_jsonl(tmp_path / "l.jsonl")]
        assert {e["server"] for e in lines} == set(served)
        assert {url: sum(e["server"] == url for e in lines) for url in served} == served
        assert {results[k].server for k in results} == set(served)


def test_a_server_that_dies_mid_run_is_taken_out_and_nothing_is_lost(tmp_path, capsys):
    dies = DiesAfter(4)
    with OpenAIServer(delay_s=0.01) as healthy, OpenAIServer(reply=dies, delay_s=0.01) as dying:
        results, elapsed = run_map(settings(healthy, dying, concurrency=2, server_cooldown_s=60), 40,
                                   tmp_path / "l.jsonl")
        assert len(results) == 40 and all(r.ok and r.text in ("ok", "fine") for r in results.values())
        # Out after SERVER_FAILURES_IN_ROW dropped connections in a row (plus what was in flight there then).
        assert SERVER_FAILURES_IN_ROW <= dies.dropped <= SERVER_FAILURES_IN_ROW + 2
        retried = [r for r in results.values() if r.transient_failures]
        assert len(retried) == dies.dropped and all(r.server == healthy.base_url for r in retried)
        assert elapsed < 4.0  # each retry went to the healthy server at once: no 0-5 s backoff
        lines = [e for _, e in read_jsonl(tmp_path / "l.jsonl")]
        assert len(lines) == 40 and {e["key"] for e in lines} == set(results)
        assert sum(e["server"] == dying.base_url for e in lines) == 4 and all(e["outcome"] == "ok" for e in lines)
    err = capsys.readouterr().err
    assert err.count("out of rotation for 60 s") == 1 and dying.base_url in err


def test_a_server_out_of_rotation_is_probed_after_the_cool_down_and_comes_back(capsys):
    with OpenAIServer() as healthy, OpenAIServer() as flaky:
        flaky.inject(*[Fault.status(503)] * SERVER_FAILURES_IN_ROW)

        async def go():
            async with LLMClient(settings(healthy, flaky, concurrency=1, server_cooldown_s=0.3)) as client:
                first = await client.map([LLMRequest(f"a{i}", prompt="x") for i in range(8)])
                during = len(flaky.requests)
                await asyncio.sleep(0.4)  # the cool-down passes
                later = await client.map([LLMRequest(f"b{i}", prompt="x") for i in range(8)])
                return first, during, later

        first, during, later = asyncio.run(go())
        assert all(r.ok for r in {**first, **later}.values())
        assert during == SERVER_FAILURES_IN_ROW  # out of rotation for the rest of the first batch
        assert len(flaky.requests) >= during + 3  # probed, answered, back in rotation
        assert sum(r.server == flaky.base_url for r in later.values()) >= 3
    err = capsys.readouterr().err
    assert "out of rotation" in err and "back in rotation" in err


def test_a_429_pauses_only_its_server():
    with OpenAIServer() as limited, OpenAIServer() as free:
        limited.inject(Fault.status(429, retry_after=3))
        results, elapsed = run_map(settings(limited, free, concurrency=1), 10)
        assert all(r.ok for r in results.values()) and elapsed < 2.0  # nobody sat out the 3 s
        assert len(limited.requests) == 1 and len(free.requests) == 10


def test_every_server_down_backs_off_and_ends_transient_as_with_one():
    with OpenAIServer(reply=lambda body: Fault.drop()) as a, OpenAIServer(reply=lambda body: Fault.status(502)) as b:
        results, elapsed = run_map(settings(a, b, backoff_base_s=0.02, backoff_max_s=0.05,
                                            transient_budget_s=0.5), 3)
        assert all(not r.ok and r.transient and r.error in ("connection", "http_502") for r in results.values())
        assert a.requests and b.requests and 0.5 <= elapsed < 3.0


def test_several_urls_in_the_flags_and_their_errors(capsys):
    parser = argparse.ArgumentParser()
    add_llm_arguments(parser, prefix="judge-")
    base = ["--judge-model", "m"]
    joined = settings_from_args(parser.parse_args([*base, "--judge-base-url", "http://a:1/v1, http://b:2/v1/"]),
                                "judge-")
    repeated = settings_from_args(parser.parse_args([*base, "--judge-base-url", "http://a:1/v1",
                                                     "--judge-base-url", "http://b:2/v1"]), "judge-")
    assert joined.base_urls == repeated.base_urls == ["http://a:1/v1", "http://b:2/v1"]
    other = settings_from_args(parser.parse_args([*base, "--judge-base-url", "http://a/v1", "--judge-structured-output",
                                                  "off", "--judge-server-cooldown-s", "5"]), "judge-")
    assert (other.structured_output, other.server_cooldown_s, joined.structured_output) == ("off", 5.0, "auto")
    for value, message in [("localhost:8000/v1", "'localhost:8000/v1' is not an http(s) URL"),
                           ("http://a/v1,ftp://b", "'ftp://b' is not an http(s) URL"),
                           ("http://a/v1,,http://b/v1", "'' is not an http(s) URL"),
                           ("http://a/v1,http://a/v1/", "http://a/v1 is named more than once")]:
        with pytest.raises(ValueError, match="^--judge-base-url: ") as e:
            settings_from_args(parser.parse_args([*base, "--judge-base-url", value]), "judge-")
        assert message in str(e.value)
    with pytest.raises(ValueError, match="LLMSettings.base_url: 'nope' is not"):
        LLMSettings(base_url="nope")
    with pytest.raises(ValueError, match="structured_output must be one of auto, on, off"):
        LLMSettings(structured_output="yes")
    assert LLMSettings(base_url=None).base_url is None  # a tool's optional endpoint (the judge's defaults)
    # A tool refuses a bad URL with one line naming the flag, exit 2, before anything is touched.
    with pytest.raises(SystemExit) as e:
        load_tool("rephrase").main(["--input", "x.jsonl", "--work-dir", "w", "--output-prefix", "o", "--tokenizer",
                                    "t", "--model", "m", "--base-url", "http://ok/v1,localhost:8000"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--base-url: 'localhost:8000' is not" in err
