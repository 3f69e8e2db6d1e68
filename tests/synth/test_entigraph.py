"""EntiGraph against the local OpenAI-compatible server: requests, records, resumption, failures, the output.

The server's replies are scripted (tests/synth/scripted_llm.py): three documents with 4, 3 and 0 entities after
normalising, so with max_triples_per_doc=2 a full run is 3 entity + (6 + 3) pair + (2 + 1) triple requests.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from synth.openai_server import TEST_API_KEY, TEST_API_KEY_ENV, Fault
from synth.scripted_llm import DOCS, NORMALISED, ScriptedLLM, request_id

from megasynth.data.indexed import IndexedDataset
from megasynth.data.prefix import OutputExistsError
from megasynth.data.readers import InputError
from megasynth.io import JsonlError
from megasynth.synth.entigraph import (
    EntiGraphConfig,
    normalise_entities,
    run_entigraph,
    sample_combinations,
    unrank_combination,
)
from megasynth.synth.llm import LLMSettings
from megasynth.synth.llm.prompts import load_prompt, prompts_hash
from megasynth.synth.workdir import RecordLog, WorkDirMismatch
from megasynth.tokenizer import train_bpe_tokenizer

FULL_RUN = 3 + 9 + 3


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tok"
    train_bpe_tokenizer([d["text"] for d in DOCS] * 10, out, vocab_size=300)
    return out


def write_docs(path: Path, docs=DOCS) -> Path:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    return path


def config(tmp_path: Path, server, tok_dir, *, out="out/eg", work="W", **kw) -> EntiGraphConfig:
    llm = {"base_url": server.base_url, "model": "test-model", "api_key_env": TEST_API_KEY_ENV, "concurrency": 4,
           "max_attempts": 3, "json_repair_attempts": 2, "backoff_base_s": 0.01, "backoff_max_s": 0.05,
           "timeout_s": 10}
    llm.update(kw.pop("llm", {}))
    docs = tmp_path / "docs.jsonl"
    if not docs.exists():
        write_docs(docs)
    kw.setdefault("max_triples_per_doc", 2)
    return EntiGraphConfig(input=str(docs), work_dir=str(tmp_path / work), output_prefix=str(tmp_path / out),
                           tokenizer=str(tok_dir), llm=LLMSettings(**llm), progress=False, **kw)


def asked(server) -> Counter:
    return Counter(request_id(r.json) for r in server.completion_requests())


def prefix_bytes(prefix: Path) -> dict[str, bytes]:
    return {s: Path(f"{prefix}{s}").read_bytes() for s in (".bin", ".idx", ".provenance.parquet")}


# -- sampling ------------------------------------------------------------------------------------------------------
def test_unrank_follows_itertools_order_and_samples_are_seeded_subsets():
    for n, k in ((6, 2), (7, 3), (3, 3)):
        assert [unrank_combination(n, k, r) for r in range(math.comb(n, k))] == list(itertools.combinations(range(n), k))
    everything = sample_combinations(30, 3, None, "s")
    assert len(everything) == math.comb(30, 3)
    a = sample_combinations(30, 3, 50, "0\0doc\0triple")
    assert len(a) == len(set(a)) == 50 and a == sorted(a) and set(a) <= set(everything)
    assert a == sample_combinations(30, 3, 50, "0\0doc\0triple")
    assert a != sample_combinations(30, 3, 50, "1\0doc\0triple")
    assert sample_combinations(4, 2, 10, "x") == list(itertools.combinations(range(4), 2))  # fewer than the limit
    assert sample_combinations(1, 2, None, "x") == [] and sample_combinations(5, 3, 0, "x") == []


def test_entities_are_normalised_and_deduplicated():
    assert normalise_entities([" Mara ", "mara", "Storm\n Bay", "", "  ", "MARA", "storm bay"]) == ["Mara", "Storm Bay"]


# -- the run -------------------------------------------------------------------------------------------------------
def test_full_run_requests_records_prefix_and_provenance(tmp_path, openai_server, tok_dir):
    openai_server.reply = ScriptedLLM()
    cfg = config(tmp_path, openai_server, tok_dir, include_summaries=True)
    out = run_entigraph(cfg)
    counts = asked(openai_server)
    assert sum(counts.values()) == FULL_RUN and max(counts.values()) == 1  # every request exactly once
    assert {c for c in counts if c[1] == "pair"} == {
        ("The Lighthouse", "pair", p) for p in itertools.combinations(NORMALISED["The Lighthouse"], 2)} | {
        ("Salt Roads", "pair", p) for p in itertools.combinations(NORMALISED["Salt Roads"], 2)}
    c = out["counts"]
    assert (c["documents"], c["entities"], c["documents_without_entities"], c["pairs"], c["triples"],
            c["summaries"]) == (3, 7, 1, 9, 3, 3)

    ds = IndexedDataset(cfg.output_prefix)
    from megasynth.tokenizer import load_tokenizer
    tok = load_tokenizer(tok_dir)
    texts = [tok.decode(ds[i][:-1].tolist()) for i in range(len(ds))]
    assert all(int(ds[i][-1]) == tok.eod_id for i in range(len(ds)))
    prov = pq.read_table(f"{cfg.output_prefix}.provenance.parquet").to_pylist()
    assert [r["doc"] for r in prov] == list(range(len(ds))) == list(range(3 + 9 + 3))
    # Fixed order: document, then step (summary, pair, triple), then key; each text matches its provenance.
    assert [(r["source_id"], r["step"]) for r in prov] == (
        [("b1", "summary")] + [("b1", "pair")] * 6 + [("b1", "triple")] * 2 + [("b2", "summary")]
        + [("b2", "pair")] * 3 + [("b2", "triple")] + [("b3", "summary")])
    for r, text in zip(prov, texts):
        title = next(d["title"] for d in DOCS if d["id"] == r["source_id"])
        expected = f"A summary of {title}." if r["step"] == "summary" else \
            f"In {title}, " + " and ".join(r["entities"]) + " are connected."
        assert text == expected
    keys = [r["key"] for r in prov if r["source_id"] == "b1" and r["step"] == "pair"]
    assert keys == sorted(keys)
    meta = ds.metadata["synthetic"]
    assert meta["model"] == "test-model" and len(meta["prompts"]["hash"]) == 64
    assert meta["llm"]["requests"] == FULL_RUN and meta["llm"]["prompt_tokens"] > 0
    assert ds.metadata["provenance"]["rows"] == len(ds)

    # A rerun sends nothing and, into a new prefix, writes the same bytes.
    openai_server.reset()
    run_entigraph(config(tmp_path, openai_server, tok_dir, include_summaries=True, out="out/again"))
    assert openai_server.completion_requests() == []
    assert prefix_bytes(tmp_path / "out/again") == prefix_bytes(tmp_path / "out/eg")
    # The output is refused without overwrite, and the key is nowhere on disk.
    with pytest.raises(OutputExistsError):
        run_entigraph(cfg)
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert TEST_API_KEY.encode() not in f.read_bytes(), f


def test_malformed_json_fails_one_document_after_max_attempts_and_retry_failed_asks_again(
        tmp_path, openai_server, tok_dir):
    llm = ScriptedLLM()
    llm.malformed.add("Salt Roads")
    openai_server.reply = llm
    out = run_entigraph(config(tmp_path, openai_server, tok_dir, allow_partial=True))
    counts = asked(openai_server)
    assert counts[("Salt Roads", "entities", ())] == 3  # max_attempts, repairs included
    assert sum(counts.values()) == 1 + 3 + 1 + (6 + 2)  # the rest of the run went on
    assert out["failed"]["entities"] == {"invalid_json": 1}
    assert out["missing"] == {"transient": {}, "permanent": {"entities": {"invalid_json": 1}}}
    assert out["counts"]["pairs"] == 6
    records = [json.loads(line) for line in (tmp_path / "W/entities.jsonl").read_text().splitlines()]
    failed = [r for r in records if not r["ok"]]
    assert len(failed) == 1 and failed[0]["doc"] == "b2" and failed[0]["error"] == "invalid_json"
    assert failed[0]["attempts"] == 3 and failed[0]["transient"] is False

    # Default: a rerun keeps the failure (no request); --retry-failed asks for it and its relations.
    llm.malformed.clear()
    openai_server.reset()
    run_entigraph(config(tmp_path, openai_server, tok_dir, out="out/same"))
    assert openai_server.completion_requests() == []
    out = run_entigraph(config(tmp_path, openai_server, tok_dir, out="out/retried", retry_failed=True))
    assert sum(asked(openai_server).values()) == 1 + 3 + 1
    assert out["failed"]["entities"] == {} and out["counts"]["pairs"] == 9


def test_http_faults_are_retried_and_the_run_completes(tmp_path, openai_server, tok_dir):
    openai_server.reply = ScriptedLLM()
    openai_server.inject(Fault.status(429, retry_after=0.05), Fault.status(500), Fault.drop(), Fault.status(503))
    out = run_entigraph(config(tmp_path, openai_server, tok_dir, llm={"concurrency": 1}))
    assert len(openai_server.completion_requests()) == FULL_RUN + 4
    assert out["counts"]["pairs"] == 9 and out["counts"]["triples"] == 3
    assert all(not v for v in out["failed"].values())


def test_budget_stops_cleanly_and_a_bigger_budget_completes_without_repeats(tmp_path, openai_server, tok_dir):
    openai_server.reply = ScriptedLLM()
    cfg = config(tmp_path, openai_server, tok_dir, llm={"budget_tokens": 700, "concurrency": 2})
    out = run_entigraph(cfg)
    assert out["budget_stopped"] and not out["complete"] and out["sidecar"] is None
    assert not Path(f"{cfg.output_prefix}.idx").exists()
    first = asked(openai_server)
    assert 0 < sum(first.values()) < FULL_RUN
    openai_server.reset()
    out = run_entigraph(config(tmp_path, openai_server, tok_dir, llm={"budget_tokens": 10**6}))
    second = asked(openai_server)
    assert out["complete"] and not set(first) & set(second)
    assert sum(first.values()) + sum(second.values()) == FULL_RUN
    relations = [json.loads(line)["key"] for line in (tmp_path / "W/relations.jsonl").read_text().splitlines()]
    assert len(relations) == len(set(relations)) == 12


def test_entity_questions_are_off_by_default_and_when_on_give_one_text_per_entity_and_resume(
        tmp_path, openai_server, tok_dir):
    openai_server.reply = ScriptedLLM()
    entity_steps = {(d["title"], "entity", (e,)) for d in DOCS for e in NORMALISED[d["title"]]}
    # Off (the default): no entity request, and neither the manifest nor the prompt hash mentions the step.
    run_entigraph(config(tmp_path, openai_server, tok_dir, work="off", out="out/off"))
    assert not {c for c in asked(openai_server) if c[1] == "entity"}
    off = json.loads((tmp_path / "off/manifest.json").read_text())["settings"]
    assert "entity_questions" not in off
    assert off["prompts_hash"] == prompts_hash(load_prompt(f"entigraph_{n}") for n in ("entities", "pair", "triple"))

    # On: stopped by the budget part way, then resumed; every request is asked exactly once over the two runs.
    openai_server.reset()
    out = run_entigraph(config(tmp_path, openai_server, tok_dir, entity_questions=True,
                               llm={"budget_tokens": 900, "concurrency": 2}))
    assert out["budget_stopped"] and out["sidecar"] is None
    first = asked(openai_server)
    openai_server.reset()
    out = run_entigraph(config(tmp_path, openai_server, tok_dir, entity_questions=True))
    second = asked(openai_server)
    assert out["complete"] and not set(first) & set(second) and max((first + second).values()) == 1
    assert set(first + second) >= entity_steps and sum((first + second).values()) == FULL_RUN + len(entity_steps)
    assert out["counts"]["entity_questions"] == out["counts"]["entity_questions_planned"] == len(entity_steps)

    prov = pq.read_table(tmp_path / "out/eg.provenance.parquet").to_pylist()
    assert [(r["source_id"], r["step"]) for r in prov] == (
        [("b1", "entity")] * 4 + [("b1", "pair")] * 6 + [("b1", "triple")] * 2
        + [("b2", "entity")] * 3 + [("b2", "pair")] * 3 + [("b2", "triple")])
    from megasynth.tokenizer import load_tokenizer
    ds, tok = IndexedDataset(tmp_path / "out/eg"), load_tokenizer(tok_dir)
    title = {d["id"]: d["title"] for d in DOCS}
    for i, r in enumerate(prov):
        if r["step"] == "entity":
            (name,) = r["entities"]
            assert tok.decode(ds[i][:-1].tolist()) == f"Q: What is {name} in {title[r['source_id']]}?\nA: {name} " \
                                                      f"is part of {title[r['source_id']]}."
    meta = ds.metadata["synthetic"]
    assert [t["name"] for t in meta["prompts"]["templates"]][-1] == "entigraph_entity"
    assert meta["settings"]["entity_questions"] is True and meta["prompts"]["hash"] != off["prompts_hash"]
    records = [json.loads(line) for line in (tmp_path / "W/relations.jsonl").read_text().splitlines()]
    assert sum(r["step"] == "entity" for r in records) == len(entity_steps)
    # A work dir made without the step is refused with it (its records came from other prompts).
    with pytest.raises(WorkDirMismatch, match="entity_questions"):
        run_entigraph(config(tmp_path, openai_server, tok_dir, work="off", out="out/x", entity_questions=True))


# -- the work dir and the input ------------------------------------------------------------------------------------
def test_torn_last_record_is_dropped_and_a_corrupt_middle_line_is_an_error(tmp_path):
    log = RecordLog(tmp_path / "r.jsonl")
    log.append({"key": "a", "ok": True})
    log.append({"key": "b", "ok": True})
    with open(tmp_path / "r.jsonl", "ab") as f:
        f.write(b'{"key": "c", "ok": tr')  # a kill mid-write
    assert [r["key"] for _, r in log.load()] == ["a", "b"]
    assert (tmp_path / "r.jsonl").read_bytes().endswith(b"}\n")
    offset = log.append({"key": "d", "ok": True})
    assert log.read_at(offset)["key"] == "d"
    log.close()
    (tmp_path / "bad.jsonl").write_bytes(b'{"key": "a"}\nnot json\n{"key": "b"}\n')
    with pytest.raises(JsonlError, match=r"bad\.jsonl:2"):
        list(RecordLog(tmp_path / "bad.jsonl").load())


def test_work_dir_made_with_other_settings_is_refused(tmp_path, openai_server, tok_dir):
    openai_server.reply = ScriptedLLM()
    run_entigraph(config(tmp_path, openai_server, tok_dir))
    with pytest.raises(WorkDirMismatch, match="max_triples_per_doc"):
        run_entigraph(config(tmp_path, openai_server, tok_dir, out="out/b", max_triples_per_doc=1))


def test_bad_input_names_the_line(tmp_path, openai_server, tok_dir):
    bad = [DOCS[0], {"id": "x", "text": "fine"}, {"id": "b1", "text": "again"}]
    write_docs(tmp_path / "docs.jsonl", bad)
    with pytest.raises(InputError, match=r"docs\.jsonl:3: duplicate id 'b1' \(first at line 1\)"):
        run_entigraph(config(tmp_path, openai_server, tok_dir))
    write_docs(tmp_path / "docs.jsonl", [{"id": "x", "text": ""}])
    with pytest.raises(InputError, match=r"docs\.jsonl:1: 'text' must be a non-empty string"):
        run_entigraph(config(tmp_path, openai_server, tok_dir))
    assert openai_server.completion_requests() == []


def test_a_prefix_input_is_decoded_with_the_tokenizer_its_sidecar_names(tmp_path, tok_dir):
    from megasynth.data.indexed import IndexedDatasetWriter, smallest_token_dtype
    from megasynth.synth.corpus import read_source_documents
    from megasynth.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir)
    with IndexedDatasetWriter(tmp_path / "src", smallest_token_dtype(tok.vocab_size),
                              metadata={"tokenizer": tok.identity(), "eod_id": tok.eod_id}) as w:
        for d in DOCS:
            w.add_document(tok.encode(d["text"], append_eod=True))
    docs = read_source_documents(tmp_path / "src")
    assert [(d.id, d.title, d.text) for d in docs] == [(str(i), None, d["text"]) for i, d in enumerate(DOCS)]
    assert docs[1].display_title == "1"
