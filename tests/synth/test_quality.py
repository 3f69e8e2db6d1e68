"""SBP quality (megasynth/synth/sbp/quality): each test on constructed cases whose answer is known.

The token tests are checked against plain-Python references (sets of tuples); the embedding and judge tests
run end to end on real text (standard-library docstrings, tests/synth/quality_data.py) with the offline MiniLM
and, for the judge, the local OpenAI-compatible server with scripted verdicts.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest
from synth.openai_server import TEST_API_KEY_ENV
from synth.quality_data import REPEATED_SENTENCE, build_corpus, encode, write_pairs, write_synthetic

from megasynth.synth.corpus import CorpusError
from megasynth.synth.sbp.ann import sample_indices
from megasynth.synth.sbp.embed import default_model, load_model
from megasynth.synth.sbp.quality import JUDGE_DEFAULTS, QualityError, QualitySettings, measure_quality
from megasynth.synth.sbp.quality_metrics import copy_score, near_duplicate_flags, repetition_score

# Short texts keep the embedding cheap; the tests' documents are ~130-320 tokens.
FAST = dict(embed_max_tokens=32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("quality"))


def _body(doc: np.ndarray) -> np.ndarray:
    return doc[:-1]  # without EOD


def _rep_ref(tokens, n) -> float:
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if len(grams) >= 2 else 0.0


# -- token tests ----------------------------------------------------------------------------------------------------
def test_repetition_flags_a_document_repeating_one_sentence(corpus):
    looped = _body(encode(corpus, " ".join([REPEATED_SENTENCE] * 6)))
    twice = _body(encode(corpus, corpus.texts[0] + "\n" + corpus.texts[0]))
    s = QualitySettings()
    assert repetition_score(looped, s.repetition_n) > 0.7
    assert repetition_score(twice, s.repetition_n) == pytest.approx(_rep_ref(list(twice), s.repetition_n))
    assert repetition_score(twice, s.repetition_n) > s.repetition_threshold  # a paragraph said twice: ~0.5
    for doc in corpus.docs:  # real docstrings are not repetitive
        assert repetition_score(_body(doc), s.repetition_n) < s.repetition_threshold
    rng = np.random.default_rng(0)
    for _ in range(5):
        t = rng.integers(0, 6, size=60)
        assert repetition_score(t, 3) == pytest.approx(_rep_ref(list(t), 3))
    assert repetition_score(np.arange(8), 8) == 0.0  # one n-gram: nothing can repeat


def test_copy_score_on_copies_parts_and_strangers(corpus):
    a, b = _body(corpus.docs[0]), _body(corpus.docs[1])
    assert copy_score(a, a, 8) == 1.0
    assert copy_score(a[: len(a) // 2], a, 8) == 1.0  # half the seed, verbatim, is still a copy
    assert copy_score(b, a, 8) < 0.05
    mixed = np.concatenate([a[:40], b])  # 33 of the document's n-grams come from the seed
    grams = {tuple(mixed[i:i + 8]) for i in range(len(mixed) - 7)}
    seed_grams = {tuple(a[i:i + 8]) for i in range(len(a) - 7)}
    assert copy_score(mixed, a, 8) == pytest.approx(len(grams & seed_grams) / len(grams))
    assert copy_score(a[5:8], a, 8) == 1.0  # shorter than n: found whole inside the seed
    assert copy_score(np.array([], dtype=np.int64), a, 8) == 0.0


def test_near_duplicates_are_found_and_distinct_documents_are_not(corpus):
    docs = [_body(d) for d in corpus.docs[:12]]
    edited = docs[3].copy()
    edited[-1] = (edited[-1] + 1) % 600  # one token changed: Jaccard ~0.97
    docs += [edited, docs[5].copy()]
    flags = near_duplicate_flags(docs, 5, 0.8)
    assert np.flatnonzero(flags).tolist() == [3, 5, 12, 13]
    assert not near_duplicate_flags([docs[0]], 5, 0.8).any()


# -- the whole measurement ------------------------------------------------------------------------------------------
def test_exact_copies_score_full_pair_copying(corpus, tmp_path):
    n = len(corpus.docs)
    syn = write_synthetic(tmp_path / "copies", corpus, corpus.docs, list(range(n)))
    res = measure_quality(syn, corpus.prefix, tmp_path / "out", QualitySettings(**FAST), log=lambda *a: None)
    row = res["rows"]["synthetic"]
    assert row["documents"] == n
    assert row["pair_copying"] == {"count": n, "n": n, "share": 1.0}
    assert row["pair_irrelevance"]["count"] == 0 and row["pair_irrelevance"]["mean_cosine"] > 0.99
    assert row["repetition"]["count"] == 0 and row["duplicate"]["count"] == 0
    assert row["non_factual"]["status"] == "n/a"
    ref = res["rows"]["reference"]  # random corpus documents with their nearest neighbour in the sample
    assert ref["documents"] == n and ref["pair_copying"]["count"] == 0
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == res
    md = (tmp_path / "out" / "results.md").read_text().splitlines()
    # repetition, duplicate@n, non-factual, pair-irrelevance, pair-copying; then Yang et al.'s published row
    assert f"| synthetic (this run) | {n} | 0.0% (0/{n}) | 0.0% (0/{n}) | n/a | 0.0% (0/{n}) | 100.0% ({n}/{n}) |" in md
    assert "| paper, 200B scale (Yang et al. 2025) | — | 4.3% | 0.8% (@1M) | 15.1% | 25.6% | 0.1% |" in md
    table = pq.read_table(tmp_path / "out" / "documents.parquet").to_pydict()
    assert table["row"].count("synthetic") == n and set(table["copy"][:n]) == {1.0}


def test_shuffled_seeds_score_high_pair_irrelevance_and_planted_cases_are_counted(corpus, tmp_path):
    n = len(corpus.docs)
    docs = list(corpus.docs) + [encode(corpus, " ".join([REPEATED_SENTENCE] * 6)), corpus.docs[2]]
    seeds = [(i + 7) % n for i in range(n)] + [0, 2]  # every real document gets another's seed
    syn = write_synthetic(tmp_path / "shuffled", corpus, docs, seeds)
    pairs = write_pairs(tmp_path / "pairs.parquet", seeds=[0, 1, 2, 3], targets=[4, 4, 5, 6])
    res = measure_quality(syn, corpus.prefix, tmp_path / "out", QualitySettings(**FAST), pairs=pairs,
                          log=lambda *a: None)
    row = res["rows"]["synthetic"]
    assert row["documents"] == n + 2
    assert row["pair_irrelevance"]["share"] >= 0.8
    assert row["repetition"]["count"] == 1  # the looped sentence
    assert row["duplicate"]["count"] == 2  # corpus document 2, twice
    assert row["pair_copying"]["count"] == 1  # the second copy of document 2 names it as its seed
    ref = res["rows"]["reference"]
    assert ref["documents"] == 3  # target 4 appears in two pairs: one of them is kept
    table = pq.read_table(tmp_path / "out" / "documents.parquet").to_pydict()
    assert sorted(table["doc"][-3:]) == [4, 5, 6]
    # Each document's cosine with its own seed, against a float64 reference from the model's plain encode of
    # the first 32 tokens decoded (the stored vectors are float16: a few 1e-4 apart).
    model = load_model(default_model(), "cpu")

    def vectors(token_lists):
        v = model.encode([corpus.tokenizer.decode(t[:32].tolist()) for t in token_lists]).astype(np.float64)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    want = np.einsum("nd,nd->n", vectors(docs), vectors([corpus.docs[s] for s in seeds]))
    assert table["doc"][:n + 2] == list(range(n + 2)) and table["seed"][:n + 2] == seeds
    np.testing.assert_allclose(table["cosine"][:n + 2], want, atol=3e-3)
    assert row["pair_irrelevance"]["count"] == int((want < 0.3).sum())


def test_sample_limits_the_documents_measured(corpus, tmp_path):
    n = len(corpus.docs)
    syn = write_synthetic(tmp_path / "s", corpus, corpus.docs, list(range(n)))

    def sampled(out, seed):
        res = measure_quality(syn, corpus.prefix, tmp_path / out, QualitySettings(sample=10, seed=seed, **FAST),
                              log=lambda *a: None)
        assert res["rows"]["synthetic"]["documents"] == 10 and res["rows"]["reference"]["documents"] == 10
        table = pq.read_table(tmp_path / out / "documents.parquet").to_pydict()
        assert table["row"] == ["synthetic"] * 10 + ["reference"] * 10
        return table["doc"][:10]

    docs = sampled("a", 0)
    assert docs == sorted(set(docs)) and len(docs) == 10 and 0 <= docs[0] and docs[-1] < n  # sorted, distinct
    assert sampled("b", 0) == docs and sampled("c", 1) != docs  # the seed decides the sample
    assert sample_indices(5, 10, np.random.default_rng(0)).tolist() == [0, 1, 2, 3, 4]  # all when fewer


def test_judge_verdicts_are_counted_and_a_malformed_reply_is_failed_not_factual(corpus, tmp_path, openai_server):
    n = len(corpus.docs)
    # Scripted verdicts by document: i % 3 == 0 non-factual, document 1 answers garbage every time, the rest
    # are factual. The reply reads which document the prompt holds.
    def verdict(i: int) -> str:
        return "garbage" if i == 1 else "non_factual" if i % 3 == 0 else "factual"

    def reply(body):
        # Every user message: a repair request's last one is the repair note, the document is in the first.
        prompt = "".join(m["content"] for m in body["messages"] if m["role"] == "user")
        i = next(k for k, text in enumerate(corpus.texts) if text[:80] in prompt)
        v = verdict(i)
        return "It looks fine to me." if v == "garbage" else json.dumps({"verdict": v, "errors": []})

    openai_server.reply = reply
    syn = write_synthetic(tmp_path / "copies", corpus, corpus.docs, list(range(n)))
    judge = replace(JUDGE_DEFAULTS, base_url=openai_server.base_url, model="judge", api_key_env=TEST_API_KEY_ENV)
    settings = QualitySettings(judge=judge, **FAST)
    res = measure_quality(syn, corpus.prefix, tmp_path / "out", settings, log=lambda *a: None)
    expected_bad = sum(verdict(i) == "non_factual" for i in range(n))
    got = res["rows"]["synthetic"]["non_factual"]
    assert got == {"status": "judged", "count": expected_bad, "n": n - 1, "failed": 1, "unanswered": 0,
                   "share": expected_bad / (n - 1)}
    assert res["partial"] is False and res["missing"] == {"judge": {}}
    assert res["rows"]["reference"]["non_factual"]["failed"] == 1  # the reference row is judged too
    table = pq.read_table(tmp_path / "out" / "documents.parquet").to_pydict()
    assert table["verdict"][1] == "failed" and table["verdict"][0] == "non_factual"
    assert "1 failed" in (tmp_path / "out" / "results.md").read_text()


def test_bad_provenance_is_refused_with_its_file_named(corpus, tmp_path):
    n = len(corpus.docs)
    syn = write_synthetic(tmp_path / "short", corpus, corpus.docs, list(range(n - 1)) + [n + 5])
    with pytest.raises(CorpusError, match=rf"short\.provenance\.parquet: row {n - 1}: seed {n + 5} is not a "
                                          rf"document of .*corpus \({n} documents\)"):
        measure_quality(syn, corpus.prefix, tmp_path / "out", QualitySettings(**FAST))
    import pyarrow as pa

    pq.write_table(pa.table({"doc": pa.array(range(n - 1), pa.int64()), "seed": pa.array([0] * (n - 1), pa.int64())}),
                   syn + ".provenance.parquet")
    with pytest.raises(QualityError, match=f"{n - 1} rows for {n} synthetic documents"):
        measure_quality(syn, corpus.prefix, tmp_path / "out", QualitySettings(**FAST))
    with pytest.raises(QualityError, match="no pairs"):
        measure_quality(write_synthetic(tmp_path / "ok", corpus, corpus.docs, list(range(n))), corpus.prefix,
                        tmp_path / "out", QualitySettings(**FAST), pairs=write_pairs(tmp_path / "p.parquet", [], []))
    with pytest.raises(QualityError, match="--judge-model"):
        QualitySettings(judge=replace(JUDGE_DEFAULTS, base_url="http://x/v1")).check()


def test_a_synthetic_prefix_of_another_corpus_or_provenance_is_refused(corpus, tmp_path):
    other = {"synthesis": {"settings": {"corpus": {"prefix": "elsewhere", "idx_sha256": "0" * 64}}}}
    syn = write_synthetic(tmp_path / "a", corpus, corpus.docs[:3], [0, 1, 2], extra=other)
    with pytest.raises(QualityError, match="its seeds index the corpus elsewhere"):
        measure_quality(syn, corpus.prefix, tmp_path / "out", QualitySettings(**FAST))
    syn = write_synthetic(tmp_path / "b", corpus, corpus.docs[:3], [0, 1, 2],
                          extra={"provenance": {"file": "b.provenance.parquet", "sha256": "f" * 64}})
    with pytest.raises(QualityError, match=r"b\.provenance\.parquet: sha256 .* belongs to another write"):
        measure_quality(syn, corpus.prefix, tmp_path / "out", QualitySettings(**FAST))
