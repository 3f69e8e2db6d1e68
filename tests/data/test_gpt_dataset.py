"""The GPT sample index: every sample against a pure-Python reference, epochs, seeds, selection and the cache."""

import os
import shutil

import numpy as np
import pytest

import megasynth.data.gpt_dataset as gpt_dataset
from megasynth.data.gpt_dataset import GPTDataset, compute_num_epochs
from megasynth.data.indexed import IndexedDataset, IndexedDatasetWriter


def make_prefix(path, lengths, seed=0):
    """Documents of the given lengths; token values are random, so windows are told apart by content."""
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, 65536, size=int(n)) for n in lengths]
    with IndexedDatasetWriter(path, np.uint16) as w:
        w.add_documents(docs)
    return IndexedDataset(path), docs


def samples_ref(docs, doc_order, shuffle, seq_len):
    """Slow reference: build the token stream and per-token document occurrence in Python, then cut windows."""
    stream, occurrence = [], []
    for k, d in enumerate(doc_order.tolist()):
        stream.extend(int(t) for t in docs[d])
        occurrence.extend([k] * len(docs[d]))
    out = []
    for j in shuffle.tolist():
        window = stream[j * seq_len : j * seq_len + seq_len + 1]
        occ = occurrence[j * seq_len : j * seq_len + seq_len + 1]
        assert len(window) == seq_len + 1  # the index promised enough tokens
        ids, seg = [], 0
        for p in range(len(occ)):
            if p and occ[p] != occ[p - 1]:
                seg += 1
            ids.append(seg)
        out.append((window, ids))
    return out


def check_against_ref(ds, docs):
    # Each sample starts on a real token: never at the end of a document, never inside an empty one.
    starts_in = ds.doc_order[ds.sample_doc]
    assert ((ds.sample_offset >= 0) & (ds.sample_offset < ds.dataset.sequence_lengths[starts_in])).all()
    ref = samples_ref(docs, ds.doc_order, ds.shuffle, ds.seq_len)
    assert len(ds) == len(ref)
    for i, (tokens, ids) in enumerate(ref):
        item = ds[i]
        assert item["tokens"].dtype == np.int64 and item["doc_ids"].dtype == np.int32
        assert item["tokens"].shape == item["doc_ids"].shape == (ds.seq_len + 1,)
        assert item["tokens"].tolist() == tokens, i
        assert item["doc_ids"].tolist() == ids, i


@pytest.mark.parametrize("seq_len, num_samples", [(7, 40), (16, 5), (1, 30), (300, 3)])
def test_every_sample_matches_reference(tmp_path, seq_len, num_samples):
    # Zero-length documents sprinkled in; (300, 3) makes one window span several whole epochs.
    lengths = [5, 0, 13, 1, 0, 8, 21, 2, 0, 3, 9]
    ds_idx, docs = make_prefix(tmp_path / "x", lengths)
    ds = GPTDataset(ds_idx, seq_len=seq_len, num_samples=num_samples, seed=3)
    check_against_ref(ds, docs)


def test_epochs_are_minimal_and_each_a_permutation(tmp_path):
    lengths = [4, 0, 6, 10, 3]  # 23 tokens an epoch
    ds_idx, _ = make_prefix(tmp_path / "x", lengths)
    for seq_len, num_samples, epochs in [(5, 4, 1), (11, 2, 1), (11, 3, 2), (23, 1, 2), (5, 20, 5)]:
        # Need num_samples * seq_len + 1 tokens: (11, 2) needs 23 = one epoch; (23, 1) needs 24 = two.
        ds = GPTDataset(ds_idx, seq_len=seq_len, num_samples=num_samples, seed=0)
        assert ds.num_epochs == epochs == compute_num_epochs(23, seq_len, num_samples)
        assert ds.doc_order.size == epochs * 5
        for e in range(epochs):
            assert sorted(ds.doc_order[e * 5 : (e + 1) * 5].tolist()) == [0, 1, 2, 3, 4]
        assert sorted(ds.shuffle.tolist()) == list(range(num_samples))
    many = GPTDataset(ds_idx, seq_len=5, num_samples=20, seed=0)
    perms = {tuple(many.doc_order[e * 5 : (e + 1) * 5].tolist()) for e in range(5)}
    assert len(perms) > 1  # epochs are shuffled independently, not one order repeated
    # The first epochs do not depend on how many epochs follow.
    few = GPTDataset(ds_idx, seq_len=5, num_samples=4, seed=0)
    assert many.doc_order[:5].tolist() == few.doc_order.tolist()


def test_samples_tile_the_stream(tmp_path):
    # Labels (tokens[1:]) of all samples together are each stream token after the first exactly once.
    ds_idx, docs = make_prefix(tmp_path / "x", [30, 7, 0, 19, 44])
    ds = GPTDataset(ds_idx, seq_len=10, num_samples=9, seed=5)
    stream = np.concatenate([docs[d] for d in ds.doc_order])
    by_start = {int(ds.shuffle[i]): ds[i]["tokens"] for i in range(len(ds))}
    tiled = np.concatenate([by_start[j][:-1] for j in range(len(ds))] + [by_start[len(ds) - 1][-1:]])
    np.testing.assert_array_equal(tiled, stream[: 9 * 10 + 1])


def test_doc_ids_mark_document_starts(tmp_path):
    # Every document holds only its own index, so a document start is visible in the tokens themselves.
    lengths = [3, 0, 1, 5, 2, 4, 0, 6]
    with IndexedDatasetWriter(tmp_path / "d", np.uint16) as w:
        for k, n in enumerate(lengths):
            w.add_document(np.full(n, k))
    ds = GPTDataset(IndexedDataset(tmp_path / "d"), seq_len=6, num_samples=12, seed=1)
    for i in range(len(ds)):
        tokens, ids = ds[i]["tokens"], ds[i]["doc_ids"]
        assert ids[0] == 0
        steps = np.diff(ids)
        assert set(steps.tolist()) <= {0, 1}
        # Within one epoch consecutive documents differ, so a change of token is a change of document.
        changed = np.diff(tokens) != 0
        assert (steps[changed] == 1).all()
        assert 1 not in tokens.tolist() and 6 not in tokens.tolist()  # empty documents contribute nothing


def test_seeded_determinism(tmp_path):
    ds_idx, _ = make_prefix(tmp_path / "x", np.random.default_rng(0).integers(0, 50, size=80))
    a = GPTDataset(ds_idx, seq_len=32, num_samples=100, seed=7)
    b = GPTDataset(ds_idx, seq_len=32, num_samples=100, seed=7)
    c = GPTDataset(ds_idx, seq_len=32, num_samples=100, seed=8)
    for name in ("doc_order", "sample_doc", "sample_offset", "shuffle"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert all((a[i]["tokens"] == b[i]["tokens"]).all() for i in range(0, 100, 7))
    assert not np.array_equal(a.doc_order, c.doc_order)
    assert not np.array_equal(a.shuffle, c.shuffle)
    assert a.cache_key == b.cache_key != c.cache_key


def test_document_selection(tmp_path):
    lengths = [10, 20, 0, 15, 5, 30, 8]
    ds_idx, docs = make_prefix(tmp_path / "x", lengths)
    train = np.array([0, 1, 2, 5, 6])
    valid = np.array([3, 4])
    dt = GPTDataset(ds_idx, seq_len=9, num_samples=20, seed=2, documents=train, name="train")
    dv = GPTDataset(ds_idx, seq_len=9, num_samples=4, seed=2, documents=valid, name="valid")
    assert set(dt.doc_order.tolist()) == set(train.tolist()) and set(dv.doc_order.tolist()) == set(valid.tolist())
    assert dt.tokens_per_epoch == 68 and dv.tokens_per_epoch == 20
    check_against_ref(dt, docs)
    check_against_ref(dv, docs)
    assert dt.cache_key != GPTDataset(ds_idx, seq_len=9, num_samples=20, seed=2, documents=train[:-1]).cache_key
    with pytest.raises(ValueError, match=r"document ids must be in \[0, 7\)"):
        GPTDataset(ds_idx, seq_len=9, num_samples=4, seed=2, documents=[0, 7])
    with pytest.raises(ValueError, match="hold no tokens"):
        GPTDataset(ds_idx, seq_len=9, num_samples=4, seed=2, documents=[2])
    with pytest.raises(ValueError, match="seq_len must be an integer >= 1"):
        GPTDataset(ds_idx, seq_len=0, num_samples=4, seed=2)
    with pytest.raises(IndexError, match="out of range"):
        dv[4]


def test_cache_reuse_and_invalidation(tmp_path, monkeypatch):
    ds_idx, docs = make_prefix(tmp_path / "x", [12, 0, 7, 30, 4, 9])
    cache = tmp_path / "cache"
    calls = []
    real_build = gpt_dataset.build_sample_index

    def counting_build(*args, **kwargs):
        calls.append(kwargs)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(gpt_dataset, "build_sample_index", counting_build)
    first = GPTDataset(ds_idx, seq_len=8, num_samples=25, seed=4, cache_dir=cache)
    assert len(calls) == 1 and not first.loaded_from_cache
    assert sorted(os.listdir(cache)) == [f"{first.cache_key}.npz"]  # no temp file left behind

    second = GPTDataset(ds_idx, seq_len=8, num_samples=25, seed=4, cache_dir=cache)
    assert len(calls) == 1 and second.loaded_from_cache
    for name in ("doc_order", "sample_doc", "sample_offset", "shuffle"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))
    check_against_ref(second, docs)

    # The key ignores where the files are: a copied prefix reuses the cache.
    for ext in (".bin", ".idx", ".json"):
        shutil.copy(tmp_path / f"x{ext}", tmp_path / f"copy{ext}")
    moved = GPTDataset(IndexedDataset(tmp_path / "copy"), seq_len=8, num_samples=25, seed=4, cache_dir=cache)
    assert moved.loaded_from_cache and moved.cache_key == first.cache_key and len(calls) == 1

    keys = {first.cache_key}
    for change in ({"seed": 5}, {"seq_len": 9}, {"num_samples": 26}, {"documents": np.array([0, 2, 3, 4, 5])}):
        kwargs = {"seq_len": 8, "num_samples": 25, "seed": 4, **change}
        ds = GPTDataset(ds_idx, cache_dir=cache, **kwargs)
        assert not ds.loaded_from_cache and ds.cache_key not in keys, change
        keys.add(ds.cache_key)
    assert len(calls) == 5

    # Different document lengths (same count, same selection) are a different index, hence a different key.
    other, _ = make_prefix(tmp_path / "y", [12, 0, 7, 30, 4, 10])
    assert GPTDataset(other, seq_len=8, num_samples=25, seed=4).cache_key != first.cache_key

    # A damaged cache file is rebuilt (with a warning), never trusted.
    (cache / f"{first.cache_key}.npz").write_bytes(b"not a zip")
    builds = len(calls)
    with pytest.warns(UserWarning, match="unreadable sample-index cache"):
        rebuilt = GPTDataset(ds_idx, seq_len=8, num_samples=25, seed=4, cache_dir=cache)
    assert not rebuilt.loaded_from_cache and len(calls) == builds + 1
    np.testing.assert_array_equal(rebuilt.shuffle, first.shuffle)
    assert GPTDataset(ds_idx, seq_len=8, num_samples=25, seed=4, cache_dir=cache).loaded_from_cache
