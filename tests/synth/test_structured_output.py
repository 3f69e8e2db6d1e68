"""Structured output (issue 20, item 3) against the local server: a request with a schema carries response_format
json_schema; "auto" drops it, per server and said once, for a server that refuses it, "on" fails, "off" never
sends it; the reply is checked (and repaired) whatever the server did with it."""

import asyncio
import json

import pytest
from helpers import load_tool
from synth.openai_server import TEST_API_KEY_ENV, Fault, OpenAIServer
from synth.scripted_llm import DOCS, ScriptedLLM

from megasynth.io import read_jsonl
from megasynth.synth.entigraph import ENTITIES_SCHEMA, entities_schema
from megasynth.synth.llm import LLMClient, LLMRequest, LLMSettings
from megasynth.synth.llm.json_replies import check_schema, response_format
from megasynth.synth.sbp.quality import JUDGE_SCHEMA
from megasynth.tokenizer import train_bpe_tokenizer

ENTITIES = {"type": "object", "required": ["entities"],
            "properties": {"entities": {"type": "array", "items": {"type": "string"}, "minItems": 1}}}
USER = [{"role": "user", "content": "List the entities."}]
GOOD = '{"entities": ["Ada"]}'


def settings(url, **kw) -> LLMSettings:
    return LLMSettings(**{"base_url": url, "model": "m", "api_key_env": TEST_API_KEY_ENV, "timeout_s": 5.0,
                          "backoff_base_s": 0.01, "backoff_max_s": 0.05, **kw})


def run_map(s: LLMSettings, requests, ledger=None):
    async def go():
        async with LLMClient(s, ledger) as client:
            return await client.map(requests)

    return asyncio.run(go())


def refuses_response_format(body):
    """A server without structured output: a request that asks for it is a 400."""
    return Fault.status(400) if "response_format" in body else GOOD


def with_format(server) -> list:
    return [r for r in server.completion_requests() if "response_format" in r.json]


def test_a_schema_request_asks_for_schema_constrained_json(openai_server, tmp_path):
    openai_server.reply = lambda body: GOOD
    requests = [LLMRequest("schema", messages=USER, schema=ENTITIES),
                LLMRequest("plain", messages=USER),
                LLMRequest("validator", messages=USER, validate=lambda v: None),
                LLMRequest("completion", prompt="x", schema=ENTITIES)]
    results = run_map(settings(openai_server.base_url, concurrency=1), requests, tmp_path / "l.jsonl")
    bodies = {r.json.get("prompt", "chat"): r.json for r in openai_server.completion_requests()}
    sent = [r.json["response_format"] for r in with_format(openai_server)]
    assert sent == [{"type": "json_schema", "json_schema": {"name": "reply", "schema": ENTITIES, "strict": False}}] * 2
    assert "response_format" in bodies["x"]  # /v1/completions takes it too (vLLM)
    assert all(r.ok for r in results.values()) and results["schema"].parsed == {"entities": ["Ada"]}
    assert [results[k].structured_output for k in ("schema", "plain", "validator", "completion")] == [
        True, False, False, True]
    lines = {e["key"]: e for _, e in read_jsonl(tmp_path / "l.jsonl")}
    assert lines["schema"]["structured_output"] is True and "structured_output" not in lines["plain"]
    assert "server" not in lines["schema"]  # one server: the ledger does not name it on every line


def test_response_format_is_plain_json_schema_named_by_its_title_strict_only_where_openai_takes_it():
    closed = {"type": "object", "additionalProperties": False, "required": ["a", "b"],
              "properties": {"a": {"type": "string", "enum": ["x", "y"]},
                             "b": {"type": "array", "items": {"type": "integer"}}}}
    assert response_format(closed)["json_schema"] == {"name": "reply", "schema": closed, "strict": True}
    # Optional properties, an open object or string lengths are outside OpenAI's strict subset.
    assert not response_format({**closed, "required": ["a"]})["json_schema"]["strict"]
    assert not response_format({**closed, "additionalProperties": True})["json_schema"]["strict"]
    assert response_format(ENTITIES_SCHEMA)["json_schema"]["name"] == "entigraph_entities"
    assert response_format(JUDGE_SCHEMA)["json_schema"]["name"] == "quality_verdict"
    assert response_format({"type": "object", "title": "not a name!"})["json_schema"]["name"] == "reply"
    with pytest.raises(ValueError, match="unsupported keywords"):
        response_format({"type": "object", "properties": {"a": {"pattern": "x"}}})
    # The bounds the pipelines' schemas add are checked on every reply, constrained or not.
    capped = entities_schema(2)
    assert check_schema({"summary": "s", "entities": ["a", "b", "c"]}, capped) == \
        "$.entities: expected at most 2 items, got 3"
    assert check_schema({"summary": "s" * 2001, "entities": []}, ENTITIES_SCHEMA) == \
        "$.summary: expected at most 2000 characters, got 2001"
    assert entities_schema(None) is ENTITIES_SCHEMA and "maxItems" not in ENTITIES_SCHEMA["properties"]["entities"]


def test_auto_drops_response_format_for_a_server_that_refuses_it_once_and_for_good(openai_server, tmp_path,
                                                                                    capsys):
    openai_server.reply = refuses_response_format
    requests = [LLMRequest(f"k{i}", messages=USER, schema=ENTITIES) for i in range(6)]
    # max_attempts 1: the refused request is not an attempt of the item's.
    results = run_map(settings(openai_server.base_url, concurrency=1, max_attempts=1), requests,
                      tmp_path / "l.jsonl")
    assert all(r.ok and r.parsed == {"entities": ["Ada"]} for r in results.values())
    assert len(openai_server.completion_requests()) == 7 and len(with_format(openai_server)) == 1
    first = results["k0"]
    assert (first.attempts, first.structured_rejected, first.structured_output) == (2, 1, False)
    assert all(results[f"k{i}"].attempts == 1 and not results[f"k{i}"].structured_output for i in range(1, 6))
    lines = [e for _, e in read_jsonl(tmp_path / "l.jsonl")]
    assert lines[0]["structured_output_rejected"] is True and lines[0]["attempts"] == 2
    assert all(e["structured_output"] is False and "structured_output_rejected" not in e for e in lines[1:])
    err = capsys.readouterr().err
    assert err.count("refused response_format") == 1 and openai_server.base_url in err and "HTTP 400" in err


@pytest.mark.parametrize("code", [404, 422])
def test_auto_falls_back_on_the_other_refusals_too(openai_server, code):
    openai_server.reply = lambda body: Fault.status(code) if "response_format" in body else GOOD
    results = run_map(settings(openai_server.base_url), [LLMRequest("k", messages=USER, schema=ENTITIES)])
    assert results["k"].ok and results["k"].structured_rejected == 1
    assert len(openai_server.completion_requests()) == 2


def test_a_request_refused_with_and_without_response_format_fails_and_the_server_keeps_it(openai_server):
    """A 400 for another reason (a prompt over the context length): the fallback gets a 400 too, so the item
    fails with it and the server is not marked; the next request asks for structured output again."""
    openai_server.reply = lambda body: Fault.status(400) if "too long" in body["messages"][-1]["content"] else GOOD
    requests = [LLMRequest("long", messages=[{"role": "user", "content": "too long"}], schema=ENTITIES),
                LLMRequest("next", messages=USER, schema=ENTITIES)]
    results = run_map(settings(openai_server.base_url, concurrency=1), requests)
    assert not results["long"].ok and results["long"].error == "http_400" and results["long"].attempts == 2
    assert results["next"].ok and results["next"].structured_output
    assert ["response_format" in r.json for r in openai_server.completion_requests()] == [True, False, True]


def test_on_treats_a_refusal_as_a_failure_and_off_never_asks(openai_server, tmp_path):
    openai_server.reply = refuses_response_format
    on = run_map(settings(openai_server.base_url, structured_output="on"),
                 [LLMRequest("k", messages=USER, schema=ENTITIES)])["k"]
    assert not on.ok and on.error == "http_400" and on.attempts == 1 and len(openai_server.requests) == 1
    openai_server.reset()
    off = run_map(settings(openai_server.base_url, structured_output="off"),
                  [LLMRequest("k", messages=USER, schema=ENTITIES)], tmp_path / "l.jsonl")["k"]
    assert off.ok and not off.structured_output and not with_format(openai_server)
    assert [e["structured_output"] for _, e in read_jsonl(tmp_path / "l.jsonl")] == [False]


def test_a_server_that_ignores_response_format_is_still_checked_and_repaired(openai_server):
    replies = iter(['Sure! {"entities": []}', '```json\n{"entities": ["Ada"]}\n```'])
    openai_server.reply = lambda body: next(replies)
    r = run_map(settings(openai_server.base_url), [LLMRequest("k", messages=USER, schema=ENTITIES)])["k"]
    assert r.ok and r.parsed == {"entities": ["Ada"]} and r.repairs == 1 and r.structured_output
    assert len(with_format(openai_server)) == 2  # the repair asks for it too


def test_refusal_is_remembered_per_server():
    """Two servers, one without structured output: only that one stops getting response_format."""
    with OpenAIServer(reply=refuses_response_format) as plain, OpenAIServer(reply=lambda body: GOOD) as modern:
        s = settings(f"{plain.base_url},{modern.base_url}", concurrency=1)
        results = run_map(s, [LLMRequest(f"k{i}", messages=USER, schema=ENTITIES) for i in range(12)])
        assert all(r.ok for r in results.values())
        assert len(with_format(plain)) == 1 and len(plain.completion_requests()) >= 3
        assert with_format(modern) == modern.completion_requests() and len(modern.completion_requests()) >= 3


def test_entigraph_max_entities_caps_the_schema_a_constrained_server_honours(tmp_path, openai_server, capsys):
    """tools/entigraph.py --max-entities 2: the entity requests ask for a list of at most 2 (a server that
    constrains decoding, as vLLM, then returns no more); without structured output a longer list is refused by
    the check like any other schema violation; the cap is a setting of the work dir."""
    train_bpe_tokenizer([d["text"] for d in DOCS] * 10, tmp_path / "tok", vocab_size=300)
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps(d) + "\n" for d in DOCS), encoding="utf-8")
    scripted = ScriptedLLM()

    def constrained(body):  # the scripted model, its entity list cut where the schema says
        reply = scripted(body)
        if "response_format" not in body:
            return reply
        cap = body["response_format"]["json_schema"]["schema"]["properties"]["entities"]["maxItems"]
        value = json.loads(reply.strip("`").removeprefix("json"))
        return json.dumps({**value, "entities": value["entities"][:cap]})

    openai_server.reply = constrained
    tool = load_tool("entigraph")

    def argv(work: str, *extra: str) -> list[str]:
        return ["--input", str(docs), "--work-dir", str(tmp_path / work), "--output-prefix",
                str(tmp_path / f"{work}-eg"), "--tokenizer", str(tmp_path / "tok"), "--base-url",
                openai_server.base_url, "--model", "m", "--api-key-env", TEST_API_KEY_ENV, "--no-progress",
                "--max-attempts", "2", *extra]

    assert tool.main(argv("W", "--max-entities", "2")) == 0
    entities = {e["doc"]: e["entities"] for _, e in read_jsonl(tmp_path / "W" / "entities.jsonl")}
    assert entities == {"b1": ["Mara", "the keeper"], "b2": ["Tomas", "salt"], "b3": []}
    caps = [r.json["response_format"]["json_schema"]["schema"]["properties"]["entities"]["maxItems"]
            for r in with_format(openai_server)]
    assert caps == [2, 2, 2]  # the entity requests only: the relation ones have no schema
    capsys.readouterr()
    assert tool.main(argv("W", "--overwrite")) == 2  # no cap: not the work dir's settings
    assert "max_entities" in capsys.readouterr().err
    # A server without structured output returns the whole lists: b1's and b2's fail the check (after a repair).
    assert tool.main(argv("off", "--max-entities", "2", "--structured-output", "off")) == 4
    assert "invalid_json 2" in capsys.readouterr().err
