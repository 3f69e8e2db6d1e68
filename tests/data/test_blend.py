"""Blended datasets: Megatron-syntax parsing, shares, the prefix bound, the order against an exact reference,
the repetition table, fingerprints, the cache, tokenizer checks, and item contents."""

import pickle
import shutil
import warnings
from fractions import Fraction

import numpy as np
import pytest

import megasynth.data.blend as blend
from megasynth.config import DataSource
from megasynth.data.blend import (
    BlendError,
    blend_order,
    build_blended_dataset,
    parse_data_path,
)
from megasynth.data.gpt_dataset import GPTDataset
from megasynth.data.indexed import IndexedDataset, IndexedDatasetWriter

SOURCE_VOCAB = 100  # source s writes ids in [s * 100, s * 100 + 100), so every window names its source


def prefix_deviation(source_ids: np.ndarray, weights) -> np.ndarray:
    """max over prefixes m of |c_k(m) - m w_k|, per source k (what the order's bound limits)."""
    m = np.arange(1, source_ids.size + 1, dtype=np.float64)
    out = []
    for k, w in enumerate(weights):
        counts = np.cumsum(source_ids == k)
        out.append(float(np.abs(counts - m * w).max()) if source_ids.size else 0.0)
    return np.asarray(out)


def prefix_bound(weights) -> np.ndarray:
    """The guaranteed per-source bound (1 - w_k)/2 + w_k (K - 1)/2, K = number of drawn (w > 0) sources."""
    w = np.asarray(weights, dtype=np.float64)
    k = int((w > 0).sum())
    return (1 - w) / 2 + w * (k - 1) / 2


def make_source(prefix, s, *, num_docs=20, doc_len=30, tokenizer_sha="tok-a", seed=0):
    rng = np.random.default_rng([seed, s])
    docs = [rng.integers(s * SOURCE_VOCAB, (s + 1) * SOURCE_VOCAB, size=int(rng.integers(1, 2 * doc_len)))
            for _ in range(num_docs)]
    meta = {"vocab_size": 1024, "eod_id": 0}
    if tokenizer_sha is not None:
        meta["tokenizer"] = {"type": "hf", "path": "tok", "sha256": tokenizer_sha}
    with IndexedDatasetWriter(prefix, np.uint16, metadata=meta) as w:
        w.add_documents(docs)
    return str(prefix)


@pytest.fixture
def prefixes(tmp_path):
    return [make_source(tmp_path / f"src{s}", s) for s in range(4)]


# ----------------------------------------------------------------------------------------------- parsing


def test_parse_pairs_and_single_prefix():
    got = parse_data_path("0.3 /data/a  0.7 /data/b")
    assert [(s.path, s.weight, s.name) for s in got] == [("/data/a", 0.3, "a"), ("/data/b", 0.7, "b")]
    (single,) = parse_data_path("  data/web_text ")
    assert (single.path, single.weight, single.name) == ("data/web_text", 1.0, "web_text")
    (quoted,) = parse_data_path("1 'dir with space/x'")[:1]
    assert quoted.path == "dir with space/x"
    assert [s.weight for s in parse_data_path("3 a 0 b 1e-1 c")] == [3.0, 0.0, 0.1]


@pytest.mark.parametrize("text, offending", [
    ("", "empty"),
    ("0.3 /a 0.7", "'0.7': weight without a prefix"),
    ("/a /b", "token 1 '/a': expected a weight"),
    ("0.3 /a /b /c", "token 3 '/b': expected a weight"),
    ("0.3 0.7", "token 2 '0.7': expected a dataset prefix"),
    ("-1 /a 2 /b", "token 1 '-1': a weight must be"),
    ("nan /a 1 /b", "token 1 'nan'"),
    ("0.5", "'0.5' is a number"),
    ("1 'unclosed", "No closing quotation"),
])
def test_parse_errors_name_the_token(text, offending):
    with pytest.raises(BlendError, match=offending):
        parse_data_path(text)


# ----------------------------------------------------------------------------------------------- the order


def order_ref(weights, n):
    """Exact reference: every (source k, sample j) gets key (j + 1/2) / w_k in rational arithmetic; sort by
    (key, k). The weights below are dyadic, so float64 holds them exactly and the orders must agree exactly."""
    items = []
    for k, w in enumerate(weights):
        wf = Fraction(w)
        items += [((Fraction(2 * j + 1, 2) / wf), k, j) for j in range(int(n * w) + len(weights) + 2)]
    items.sort()
    return np.array([k for _, k, _ in items[:n]]), np.array([j for _, _, j in items[:n]])


@pytest.mark.parametrize("chunk", [1 << 20, 7])
def test_order_matches_exact_reference(monkeypatch, chunk):
    # Chunk 7 forces hundreds of chunk boundaries; samples must be neither lost nor duplicated across them.
    monkeypatch.setattr(blend, "_CHUNK", chunk)
    weights = [0.5, 0.25, 0.125, 0.125]  # many exact key ties: tie-breaking by source index is tested too
    ids, samples = blend_order(weights, 1000)
    ref_ids, ref_samples = order_ref(weights, 1000)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(samples, ref_samples)


@pytest.mark.parametrize("weights", [
    [0.5, 0.3, 0.2], [0.61, 0.29, 0.07, 0.03], [0.999, 0.001], [1 / 3, 1 / 3, 1 / 3],
    list(np.random.default_rng(0).dirichlet(np.ones(8))),
])
def test_every_prefix_stays_within_the_bound(weights):
    w = np.asarray(weights) / np.sum(weights)
    ids, samples = blend_order(w, 50_000)
    dev = prefix_deviation(ids, w)
    bound = prefix_bound(w)
    # The bound is proved in blend.py's docstring; 1e-9 absorbs float rounding of m * w_k for m <= 5e4.
    assert (dev <= bound + 1e-9).all(), (dev, bound)
    assert bound.max() <= max(0.5, (len(w) - 1) / 2) + 1e-12
    # Source k's samples are read in order 0, 1, 2, ... (each GPTDataset shuffles its own samples).
    for k in range(len(w)):
        np.testing.assert_array_equal(samples[ids == k], np.arange(int((ids == k).sum())))


def test_order_is_a_prefix_of_any_longer_order():
    a, sa = blend_order([0.2, 0.5, 0.3], 997)
    b, sb = blend_order([0.2, 0.5, 0.3], 5000)
    np.testing.assert_array_equal(a, b[:997])
    np.testing.assert_array_equal(sa, sb[:997])


def test_zero_weight_sources_are_never_drawn():
    ids, _ = blend_order([0.0, 0.6, 0.0, 0.4], 1000)
    assert set(np.unique(ids).tolist()) == {1, 3}


# ----------------------------------------------------------------------------------------------- the dataset


def test_shares_within_half_a_percent_over_100k_samples(tmp_path, prefixes):
    weights = [0.55, 0.25, 0.15, 0.05]
    sources = [DataSource(path=p, weight=w) for p, w in zip(prefixes, weights)]
    ds = build_blended_dataset(sources, seq_len=8, num_samples=100_000, seed=3, cache_dir=tmp_path / "cache")
    counts = np.bincount(ds.source_ids, minlength=4)
    shares = counts / len(ds)
    assert np.abs(shares - weights).max() < 0.005
    assert [s.num_samples for s in ds.sources] == counts.tolist()
    assert [len(s.dataset) for s in ds.sources] == counts.tolist()
    # The samples really come from the named source: read a spread of them and check their id ranges.
    for i in range(0, 100_000, 499):
        tokens = ds[i]["tokens"]
        assert (tokens // SOURCE_VOCAB == ds.source_ids[i]).all(), i


def test_items_are_gpt_samples_of_their_source(tmp_path, prefixes):
    sources = [DataSource(path=prefixes[0], weight=2), DataSource(path=prefixes[1], weight=1)]
    ds = build_blended_dataset(sources, seq_len=5, num_samples=60, seed=9, cache_dir=None)
    # Independent check: GPTDatasets built directly with the counts the blend gives each source.
    direct = [GPTDataset(IndexedDataset(p), seq_len=5, num_samples=n, seed=9) for p, n in zip(prefixes, [40, 20])]
    seen = [0, 0]
    for i in range(len(ds)):
        k = int(ds.source_ids[i])
        item, ref = ds[i], direct[k][seen[k]]
        seen[k] += 1
        assert item["tokens"].dtype == np.int64 and item["doc_ids"].dtype == np.int32
        np.testing.assert_array_equal(item["tokens"], ref["tokens"])
        np.testing.assert_array_equal(item["doc_ids"], ref["doc_ids"])
    assert seen == [40, 20]
    with pytest.raises(IndexError, match="out of range"):
        ds[60]


def test_single_source_blend_is_the_gpt_dataset(tmp_path, prefixes):
    ds = build_blended_dataset(parse_data_path(prefixes[2]), seq_len=7, num_samples=50, seed=1, cache_dir=None)
    ref = GPTDataset(IndexedDataset(prefixes[2]), seq_len=7, num_samples=50, seed=1)
    for i in range(50):
        np.testing.assert_array_equal(ds[i]["tokens"], ref[i]["tokens"])


def test_repetition_table_and_max_repetition(tmp_path, prefixes):
    sources = [DataSource(path=prefixes[0], weight=0.75, name="big"), DataSource(path=prefixes[1], weight=0.25)]
    ds = build_blended_dataset(sources, seq_len=4, num_samples=10, seed=0, cache_dir=None)
    n0, n1 = (IndexedDataset(p).num_tokens for p in prefixes[:2])
    horizon = 40 * n0  # big is read 0.75 * 40 = 30 times, src1 0.25 * 40 * n0 / n1 times
    assert ds.max_repetition(horizon) == pytest.approx(max(30.0, 10.0 * n0 / n1), rel=1e-12)
    table = ds.sources_table(horizon, max_repetition=20)
    lines = table.splitlines()
    big = next(line for line in lines if line.startswith("big"))
    assert "75.00%" in big and "30.00" in big and "WARNING: > 20 epochs" in big
    src1 = next(line for line in lines if line.startswith("src1"))
    assert "25.00%" in src1 and f"{10.0 * n0 / n1:.2f}" in src1
    assert ("WARNING" in src1) == (10.0 * n0 / n1 > 20)
    assert ds.sources_table(horizon, max_repetition=20) == table  # deterministic


def test_errors_name_the_source(tmp_path, prefixes):
    with pytest.raises(BlendError, match="at least one source"):
        build_blended_dataset([], seq_len=4, num_samples=10, seed=0, cache_dir=None)
    with pytest.raises(BlendError, match="every source weight is 0"):
        build_blended_dataset([DataSource(path=prefixes[0], weight=0)], seq_len=4, num_samples=10, seed=0,
                              cache_dir=None)
    with pytest.raises(BlendError, match=r"source 1 \(.*src0\): the same prefix as source 0"):
        build_blended_dataset([DataSource(path=prefixes[0]), DataSource(path=prefixes[0])], seq_len=4,
                              num_samples=10, seed=0, cache_dir=None)
    with pytest.raises(ValueError, match="nowhere.idx: no such file"):
        build_blended_dataset(parse_data_path(f"1 {prefixes[0]} 1 {tmp_path}/nowhere"), seq_len=4,
                              num_samples=10, seed=0, cache_dir=None)


def test_different_tokenizers_are_an_error_naming_both(tmp_path, prefixes):
    other = make_source(tmp_path / "other_tok", 1, tokenizer_sha="tok-b")
    with pytest.raises(BlendError, match="different tokenizers") as e:
        build_blended_dataset(parse_data_path(f"1 {prefixes[0]} 1 {other}"), seq_len=4, num_samples=10, seed=0,
                              cache_dir=None)
    assert prefixes[0] in str(e.value) and other in str(e.value)
    # A Megatron prefix without a sidecar has no tokenizer on record: it blends with anything.
    bare = make_source(tmp_path / "bare", 2, tokenizer_sha=None)
    build_blended_dataset(parse_data_path(f"1 {prefixes[0]} 1 {bare}"), seq_len=4, num_samples=10, seed=0,
                          cache_dir=None)


# ----------------------------------------------------------------------------------------------- fingerprint, cache


def fingerprint(text, seq_len=8, seed=0, num_samples=20):
    return build_blended_dataset(parse_data_path(text), seq_len=seq_len, num_samples=num_samples, seed=seed,
                                 cache_dir=None).fingerprint


def test_fingerprint_changes_with_the_blend_and_only_then(tmp_path, prefixes):
    a, b, c = prefixes[:3]
    base = fingerprint(f"0.3 {a} 0.7 {b}")
    assert fingerprint(f"0.3 {a} 0.7 {b}") == base  # nothing changed
    assert fingerprint(f"3 {a} 7 {b}") == base  # the same normalised weights
    assert fingerprint(f"0.3 {a} 0.7 {b}", num_samples=500) == base  # a longer run is the same blend
    moved = tmp_path / "moved"
    moved.mkdir()
    for ext in (".bin", ".idx", ".json"):
        shutil.copy(a + ext, moved / ("src0" + ext))
    assert fingerprint(f"0.3 {moved / 'src0'} 0.7 {b}") == base  # identity is content, not path
    changed = {
        "weights": fingerprint(f"0.4 {a} 0.6 {b}"),
        "order": fingerprint(f"0.7 {b} 0.3 {a}"),
        "source": fingerprint(f"0.3 {a} 0.7 {c}"),
        "added": fingerprint(f"0.3 {a} 0.7 {b} 0.1 {c}"),
        "seq_len": fingerprint(f"0.3 {a} 0.7 {b}", seq_len=9),
        "seed": fingerprint(f"0.3 {a} 0.7 {b}", seed=1),
    }
    assert len(set(changed.values()) | {base}) == len(changed) + 1, changed
    # Same counts and tokenizer but other documents: the .idx hash tells them apart.
    make_source(moved / "src0", 0, seed=123)
    assert fingerprint(f"0.3 {moved / 'src0'} 0.7 {b}") != base


def test_cache_is_reused_and_rebuilt_when_corrupt(tmp_path, prefixes):
    cache = tmp_path / "cache"
    sources = parse_data_path(f"0.6 {prefixes[0]} 0.4 {prefixes[1]}")
    first = build_blended_dataset(sources, seq_len=6, num_samples=300, seed=2, cache_dir=cache)
    assert not first.loaded_from_cache and first.cache_path.is_file()
    assert first.cache_path.name == f"blend_{first.fingerprint}_300.npz"
    assert not list(cache.glob(".*tmp*"))  # atomic write left no temp file
    second = build_blended_dataset(sources, seq_len=6, num_samples=300, seed=2, cache_dir=cache)
    assert second.loaded_from_cache
    np.testing.assert_array_equal(first.source_ids, second.source_ids)
    np.testing.assert_array_equal(first.source_samples, second.source_samples)
    assert all(s.dataset.loaded_from_cache for s in second.sources)
    other = build_blended_dataset(sources, seq_len=6, num_samples=301, seed=2, cache_dir=cache)
    assert not other.loaded_from_cache  # the key holds num_samples
    first.cache_path.write_bytes(b"not a zip file")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        third = build_blended_dataset(sources, seq_len=6, num_samples=300, seed=2, cache_dir=cache)
    assert any("unreadable blend-index cache" in str(w.message) for w in caught)
    assert not third.loaded_from_cache
    np.testing.assert_array_equal(third.source_ids, first.source_ids)


def test_sources_without_samples_and_pickling(tmp_path, prefixes):
    # Weight 0, and a weight too small to earn one of 10 samples: both stay in the table, neither is read.
    sources = [DataSource(path=prefixes[0], weight=1.0), DataSource(path=prefixes[1], weight=0.0),
               DataSource(path=prefixes[2], weight=0.001)]
    ds = build_blended_dataset(sources, seq_len=4, num_samples=10, seed=0, cache_dir=tmp_path / "c")
    assert [s.num_samples for s in ds.sources] == [10, 0, 0]
    assert ds.sources[1].dataset is None and ds.sources[2].dataset is None
    assert "src1" in ds.sources_table(1000) and ds.max_repetition(1000) > 0
    # DataLoader workers receive the dataset pickled; the copy must read the same samples.
    copy = pickle.loads(pickle.dumps(ds))
    for i in range(10):
        np.testing.assert_array_equal(copy[i]["tokens"], ds[i]["tokens"])


@pytest.mark.parametrize("weights", [[0.5, 0.6], [0.0, 0.0], [1.5, -0.5], [float("nan"), 1.0]])
def test_order_rejects_unnormalised_weights(weights):
    with pytest.raises(BlendError, match="weights must be finite"):
        blend_order(weights, 10)
