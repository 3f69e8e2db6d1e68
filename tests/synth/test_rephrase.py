"""The rephrase baseline against the local OpenAI-compatible server: plan, seeds, token target, failures, budget
and resumption (the same guarantees as EntiGraph, on a smaller set)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from synth.openai_server import TEST_API_KEY, TEST_API_KEY_ENV
from synth.scripted_llm import DOCS, ScriptedLLM, first_user, request_id

from megasynth.data.indexed import IndexedDataset
from megasynth.synth.llm import LLMSettings
from megasynth.synth.rephrase import RephraseConfig, run_rephrase
from megasynth.tokenizer import load_tokenizer, train_bpe_tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tok"
    train_bpe_tokenizer([d["text"] for d in DOCS] * 10, out, vocab_size=300)
    return out


def config(tmp_path: Path, server, tok_dir, *, out="out/rp", work="W", llm=None, **kw) -> RephraseConfig:
    settings = {"base_url": server.base_url, "model": "test-model", "api_key_env": TEST_API_KEY_ENV,
                "concurrency": 3, "max_attempts": 2, "backoff_base_s": 0.01, "backoff_max_s": 0.05, "timeout_s": 10}
    settings.update(llm or {})
    docs = tmp_path / "docs.jsonl"
    if not docs.exists():
        docs.write_text("".join(json.dumps(d) + "\n" for d in DOCS), encoding="utf-8")
    kw.setdefault("styles", ["plain", "qa"])
    return RephraseConfig(input=str(docs), work_dir=str(tmp_path / work), output_prefix=str(tmp_path / out),
                          tokenizer=str(tok_dir), llm=LLMSettings(**settings), progress=False, **kw)


def provenance(prefix) -> list[tuple]:
    return [(r["source_id"], r["style"], r["sample"]) for r in pq.read_table(f"{prefix}.provenance.parquet").to_pylist()]


def same_bytes(a, b) -> bool:
    return all(Path(f"{a}{s}").read_bytes() == Path(f"{b}{s}").read_bytes() for s in (".bin", ".idx",
                                                                                          ".provenance.parquet"))


def test_styles_and_samples_in_a_fixed_order_and_a_rerun_asks_nothing(tmp_path, openai_server, tok_dir):
    openai_server.reply = ScriptedLLM()
    cfg = config(tmp_path, openai_server, tok_dir, samples_per_doc=2)
    out = run_rephrase(cfg)
    sent = openai_server.completion_requests()
    assert len(sent) == 3 * 2 * 2 and len({request_id(r.json) + (r.json["seed"],) for r in sent}) == 12
    assert out["counts"]["by_style"] == {"plain": 6, "qa": 6}
    assert provenance(cfg.output_prefix) == [(d["id"], style, s) for d in DOCS for style in ("plain", "qa")
                                             for s in (0, 1)]
    ds, tok = IndexedDataset(cfg.output_prefix), load_tokenizer(tok_dir)
    first = tok.decode(ds[0][:-1].tolist())
    assert first.startswith("[plain ") and "The Lighthouse retold: Mara keeps the lamp" in first
    assert tok.decode(ds[0][:-1].tolist()) != tok.decode(ds[1][:-1].tolist())  # two samples, two seeds
    assert ds.metadata["synthetic"]["generator"] == "rephrase"
    openai_server.reset()
    run_rephrase(config(tmp_path, openai_server, tok_dir, samples_per_doc=2, out="out/again"))
    assert openai_server.completion_requests() == []
    assert same_bytes(tmp_path / "out/rp", tmp_path / "out/again")
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert TEST_API_KEY.encode() not in f.read_bytes(), f


def test_token_target_takes_the_shortest_start_of_the_plan(tmp_path, openai_server, tok_dir):
    openai_server.reply = ScriptedLLM()
    one_round = run_rephrase(config(tmp_path, openai_server, tok_dir, work="W1", out="out/r1"))["sidecar"]
    openai_server.reset()
    target = one_round["num_tokens"] + 1  # round 0 and the first item of round 1
    cfg = config(tmp_path, openai_server, tok_dir, work="W2", out="out/t", samples_per_doc=4, target_tokens=target)
    out = run_rephrase(cfg)
    assert out["target_reached"] and out["sidecar"]["num_tokens"] >= target
    assert sorted(provenance(cfg.output_prefix)) == sorted(
        [(d["id"], style, 0) for d in DOCS for style in ("plain", "qa")] + [("b1", "plain", 1)])
    assert 7 <= len(openai_server.completion_requests()) < 24  # not the whole plan
    openai_server.reset()
    run_rephrase(config(tmp_path, openai_server, tok_dir, work="W2", out="out/t2", samples_per_doc=4,
                        target_tokens=target))
    assert openai_server.completion_requests() == [] and same_bytes(tmp_path / "out/t", tmp_path / "out/t2")


def test_failures_are_counted_and_a_budget_stop_resumes_to_the_same_bytes(tmp_path, openai_server, tok_dir):
    llm = ScriptedLLM()
    # An empty reply is a content failure: retried up to max_attempts, then permanent; published only with
    # allow_partial (tests/synth/test_transient_failures.py covers transient ones and the default refusal).
    openai_server.reply = lambda body: "" if "Salt Roads" in first_user(body) else llm(body)
    out = run_rephrase(config(tmp_path, openai_server, tok_dir, work="Wref", out="out/ref", allow_partial=True))
    assert out["failed"]["rephrase"] == {"empty_reply": 2} and out["counts"]["rephrasings"] == 4
    assert out["missing"] == {"transient": {}, "permanent": {"rephrase": {"empty_reply": 2}}}
    assert Counter(request_id(r.json)[0] for r in openai_server.completion_requests())["Salt Roads"] == 4

    openai_server.reset()
    stopped = run_rephrase(config(tmp_path, openai_server, tok_dir, llm={"budget_tokens": 150, "concurrency": 1},
                                  allow_partial=True))
    assert stopped["budget_stopped"] and stopped["sidecar"] is None
    first = {request_id(r.json) for r in openai_server.completion_requests()}
    openai_server.reset()
    done = run_rephrase(config(tmp_path, openai_server, tok_dir, allow_partial=True))
    second = [request_id(r.json) for r in openai_server.completion_requests()]
    assert done["complete"] and not first & {s for s in second if s[0] != "Salt Roads"}
    assert same_bytes(tmp_path / "out/rp", tmp_path / "out/ref")


def test_cli_matches_the_token_count_of_another_prefix(tmp_path, openai_server, tok_dir, capsys):
    from helpers import load_tool

    openai_server.reply = ScriptedLLM()
    reference = config(tmp_path, openai_server, tok_dir, work="W1", out="out/eg", styles=["encyclopedic"])
    target = run_rephrase(reference)["sidecar"]["num_tokens"]
    base = ["--input", reference.input, "--tokenizer", str(tok_dir), "--base-url", openai_server.base_url,
            "--model", "test-model", "--api-key-env", TEST_API_KEY_ENV, "--no-progress", "--styles", "plain,qa"]
    tool = load_tool("rephrase")
    code = tool.main([*base, "--work-dir", str(tmp_path / "W2"), "--output-prefix", str(tmp_path / "out/rp"),
                      "--samples-per-doc", "3", "--target-tokens-of", str(tmp_path / "out/eg")])
    assert code == 0
    assert IndexedDataset(tmp_path / "out/rp").num_tokens >= target
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        tool.main([*base, "--work-dir", str(tmp_path / "W3"), "--output-prefix", str(tmp_path / "x"),
                   "--styles", "poetry"])
    assert "styles must be distinct names" in capsys.readouterr().err
