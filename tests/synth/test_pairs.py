"""SBP stage 2 library: near-duplicate primitives, exact and approximate search, the pair filters.

References are independent: Python sets for n-gram Jaccard, datasketch's own MinHash for signatures, a numpy
full sort of all inner products for nearest neighbours and for the expected pair table.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from datasketch import MinHash
from synth.pair_inputs import clustered, unit, write_emb, write_prefix

from megasynth.synth.sbp.ann import IndexOptions, build_index, exact_knn, measure_recall, recall_at_k
from megasynth.synth.sbp.embed_files import EmbeddingsError
from megasynth.synth.sbp.near_dup import (
    containment,
    jaccard,
    minhash_jaccard,
    minhash_signatures,
    near_duplicate_pairs,
    ngram_hashes,
)
from megasynth.synth.sbp.pairs import PairOptions, PairsError, build_pairs


def read_pairs(out) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    t = pq.read_table(f"{out}.parquet")
    with open(f"{out}.json", encoding="utf-8") as f:
        meta = json.load(f)
    return (t.column("seed").to_numpy(), t.column("target").to_numpy(), t.column("similarity").to_numpy(), meta)


# -- near-duplicate primitives -------------------------------------------------------------------------------------
def test_ngram_jaccard_matches_python_sets():
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = rng.integers(0, 20, size=rng.integers(0, 40))
        b = np.concatenate([a[: len(a) // 2], rng.integers(0, 20, size=10)])
        ga = {tuple(a[i:i + 3]) for i in range(len(a) - 2)} if len(a) >= 3 else ({tuple(a)} if len(a) else set())
        gb = {tuple(b[i:i + 3]) for i in range(len(b) - 2)} if len(b) >= 3 else ({tuple(b)} if len(b) else set())
        expected = 1.0 if not ga and not gb else len(ga & gb) / len(ga | gb)
        assert jaccard(ngram_hashes(a, 3), ngram_hashes(b, 3)) == pytest.approx(expected)
        if gb:
            assert containment(ngram_hashes(b, 3), ngram_hashes(a, 3)) == pytest.approx(len(ga & gb) / len(gb))
    assert jaccard(ngram_hashes([1, 2, 3, 4, 5, 6]), ngram_hashes([1, 2, 3, 4, 5, 6])) == 1.0


def test_minhash_signatures_equal_datasketch():
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 500, size=rng.integers(0, 80)) for _ in range(30)] + [[7, 8]]
    sig = minhash_signatures(docs, n=4, num_perm=64, seed=3, batch_ngrams=50)  # several groups
    for i, doc in enumerate(docs):
        m = MinHash(num_perm=64, seed=3, hashfunc=int, scheme="affine32")
        m.update_batch([int(h) for h in ngram_hashes(doc, 4) >> np.uint64(32)])
        np.testing.assert_array_equal(sig[i], m.hashvalues, err_msg=f"document {i}")


def test_minhash_estimate_and_lsh_find_constructed_duplicates():
    rng = np.random.default_rng(2)
    base = [rng.integers(1, 1000, size=300) for _ in range(6)]
    near = base[0].copy()
    near[::50] = 999  # 6 of 300 tokens changed: Jaccard of 5-grams ~0.82
    docs = [*base, near, base[3].copy()]
    sig = minhash_signatures(docs)
    truth = jaccard(ngram_hashes(base[0]), ngram_hashes(near))
    assert 0.7 < truth < 0.95
    assert abs(minhash_jaccard(sig[0], sig[6]) - truth) < 0.12  # 3 standard errors at 128 permutations
    assert near_duplicate_pairs(sig, threshold=0.7) == [(0, 6), (3, 7)]


# -- search ----------------------------------------------------------------------------------------------------------
def test_exact_knn_matches_full_sort():
    emb = clustered(700, 16, 10, 0.5, seed=3).astype(np.float16)
    rows = np.array([0, 5, 699, 350])
    sims, ids = exact_knn(emb, rows, k=9, chunk=128)  # several database chunks
    full = emb[rows].astype(np.float32) @ emb.astype(np.float32).T
    ref = np.argsort(-full, axis=1, kind="stable")[:, :9]
    np.testing.assert_array_equal(ids, ref)
    np.testing.assert_allclose(sims, np.take_along_axis(full, ref, 1), rtol=1e-6)


def test_ivf_reaches_target_recall_on_clustered_vectors():
    emb = clustered(8000, 32, 100, 0.6, seed=4).astype(np.float16)
    options = IndexOptions(kind="ivf", target_recall=0.95, recall_queries=300, chunk=3000)
    index, info = build_index(emb, options)
    record = measure_recall(index, info, emb, 10, options)
    assert info["nlist"] == round(np.sqrt(8000)) and info["nprobe_tuned"]
    assert info["nprobe"] < info["nlist"]  # tuning stopped before exhaustive search
    assert record["recall"] >= 0.95
    # The recorded recall is what an independent check of the same queries gives.
    rows = np.sort(np.random.default_rng([0, 2]).choice(8000, size=300, replace=False))
    _, approx = index.search(emb[rows].astype(np.float32), 10)
    full = emb[rows].astype(np.float32) @ emb.astype(np.float32).T
    assert recall_at_k(approx, np.argsort(-full, axis=1)[:, :10]) == pytest.approx(record["recall"], abs=0.01)


# -- the pair table ------------------------------------------------------------------------------------------------
def expected_pairs(vecs16: np.ndarray, k: int, lo: float, hi: float, cap: int):
    """Brute force: every seed's k+1 nearest rows (float64 inner products), then self / band / cap."""
    v = vecs16.astype(np.float64)
    sims = v @ v.T
    rows = []
    for s in range(len(v)):
        order = np.lexsort((np.arange(len(v)), -sims[s]))[: k + 1]
        kept = [(s, int(t), sims[s, t]) for t in order if t != s and lo <= sims[s, t] < hi]
        kept.sort(key=lambda r: (-r[2], r[1]))
        rows += kept[:cap]
    return rows


def test_flat_pairs_equal_brute_force_with_band_and_cap(tmp_path):
    rng = np.random.default_rng(5)
    n = 300
    vecs = clustered(n, 24, 12, 0.8, seed=5)
    vecs[-10:] = unit(vecs[:10] + 0.01 * rng.normal(size=(10, 24)))  # near-duplicates by meaning: above max_sim
    vecs = vecs.astype(np.float16)
    prefix = write_prefix(tmp_path / "corpus", [rng.integers(1, 1000, size=40) for _ in range(n)])
    emb = write_emb(tmp_path / "emb", vecs, prefix)
    opts = PairOptions(k=6, min_sim=0.6, max_sim=0.9, max_pairs_per_seed=3, near_copy="exact",
                       index=IndexOptions(kind="flat", chunk=64))
    meta = build_pairs(emb, tmp_path / "pairs", opts, progress=False)
    seeds, targets, sims, meta2 = read_pairs(tmp_path / "pairs")
    assert meta == meta2
    ref = expected_pairs(vecs, 6, 0.6, 0.9, 3)
    assert list(zip(seeds.tolist(), targets.tolist())) == [(s, t) for s, t, _ in ref]
    np.testing.assert_allclose(sims, [x for _, _, x in ref], rtol=0, atol=1e-6)
    assert seeds.dtype == np.int64 and targets.dtype == np.int64 and sims.dtype == np.float32
    c = meta["counts"]
    assert c["candidates"] == n * 7 and c["kept"] == len(ref) and c["dropped"]["self"] == n
    assert c["candidates"] == c["kept"] + sum(c["dropped"].values())
    assert c["dropped"]["over_cap"] > 0 and c["dropped"]["below_min"] > 0 and c["dropped"]["above_max"] > 0
    assert np.bincount(seeds).max() <= 3
    assert sum(meta["histogram"]["kept"]) == c["kept"] and meta["recall"]["recall"] == 1.0
    assert (tmp_path / "pairs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Deterministic: a rerun, with IVF searching every list, writes the same table.
    opts.index = IndexOptions(kind="ivf", nlist=4, nprobe=4, chunk=50)
    build_pairs(emb, tmp_path / "again", opts, progress=False)
    assert (tmp_path / "again.parquet").read_bytes() == (tmp_path / "pairs.parquet").read_bytes()


@pytest.mark.parametrize("method", ["minhash", "exact"])
def test_near_copies_are_dropped(tmp_path, method):
    rng = np.random.default_rng(6)
    docs = [rng.integers(1, 1000, size=200) for _ in range(4)]
    copy = docs[0].copy()
    copy[::40] = 5  # a near-copy of document 0 (5 of 200 tokens changed)
    docs.append(copy)
    prefix = write_prefix(tmp_path / "corpus", docs)
    # Every document close to every other in embedding space (sims ~0.8), so only the text test separates them.
    base = rng.normal(size=16)
    vecs = unit(base + 0.5 * rng.normal(size=(5, 16))).astype(np.float16)
    emb = write_emb(tmp_path / "emb", vecs, prefix)
    meta = build_pairs(emb, tmp_path / "pairs", PairOptions(k=4, min_sim=-1.0, max_sim=1.01, near_copy=method),
                       progress=False)
    seeds, targets, _, _ = read_pairs(tmp_path / "pairs")
    got = set(zip(seeds.tolist(), targets.tolist()))
    assert (0, 4) not in got and (4, 0) not in got
    assert len(got) == 5 * 4 - 2 and meta["counts"]["dropped"]["near_copy"] == 2
    assert meta["near_copy"]["method"] == method and meta["near_copy"]["threshold"] == 0.6


def test_bad_inputs(tmp_path):
    rng = np.random.default_rng(7)
    docs = [rng.integers(1, 1000, size=30) for _ in range(20)]
    prefix = write_prefix(tmp_path / "corpus", docs)
    vecs = unit(rng.normal(size=(20, 8))).astype(np.float16)
    emb = write_emb(tmp_path / "emb", vecs, prefix)
    other = write_prefix(tmp_path / "other", docs[:19])
    with pytest.raises(EmbeddingsError, match="20 embedding rows but .* has 19 documents"):
        build_pairs(emb, tmp_path / "p", PairOptions(), corpus=other, progress=False)
    same_count = write_prefix(tmp_path / "same_count", [d[:-1] for d in docs])  # other lengths: another .idx
    with pytest.raises(EmbeddingsError, match="sha256"):
        build_pairs(emb, tmp_path / "p", PairOptions(), corpus=same_count, progress=False)
    bad = vecs.astype(np.float32)
    bad[13] *= 2
    emb_bad = write_emb(tmp_path / "emb_bad", bad, prefix)
    with pytest.raises(EmbeddingsError, match="row 13 has L2 norm 2"):
        build_pairs(emb_bad, tmp_path / "p", PairOptions(), progress=False)
    emb_json = write_emb(tmp_path / "emb_jsonl", vecs, None)
    with pytest.raises(PairsError, match="--corpus PREFIX or --near-copy off"):
        build_pairs(emb_json, tmp_path / "p", PairOptions(), progress=False)
    with pytest.raises(PairsError, match="no pair survived"):
        build_pairs(emb, tmp_path / "p", PairOptions(min_sim=0.999, max_sim=1.0), progress=False)
    assert not list(tmp_path.glob("p.*")) and not list(tmp_path.glob(".p.*"))
    meta = build_pairs(emb, tmp_path / "p", PairOptions(min_sim=0.999, max_sim=1.0), allow_empty=True,
                       progress=False)
    assert meta["counts"]["kept"] == 0 and pq.read_table(tmp_path / "p.parquet").num_rows == 0
    with pytest.raises(PairsError, match="exists"):
        build_pairs(emb, tmp_path / "p", PairOptions(), progress=False)
