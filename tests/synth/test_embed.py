"""SBP stage 1 library on real data: stdlib docstrings, a trained BPE, the offline MiniLM model.

The reference is sentence-transformers' own `encode` on texts decoded independently of megasynth.synth.sbp.embed;
the embed-then-pair test compares the flat index's pairs with a numpy brute force over the real embeddings.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from synth.stdlib_prefix import stdlib_texts, write_stdlib_prefix

from megasynth.data.indexed import IndexedDataset
from megasynth.synth.sbp.ann import IndexOptions
from megasynth.synth.sbp.embed import EmbedError, EmbedOptions, JsonlTexts, PrefixTexts, default_model, embed_corpus, load_model
from megasynth.synth.sbp.embed_files import load_embeddings, work_dir
from megasynth.synth.sbp.pairs import PairOptions, build_pairs
from megasynth.tokenizer import load_tokenizer


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny batches: a second intra-op thread buys nothing, and on a shared CPU every op waits for it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return load_model(default_model(), "cpu")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    # Document 40 is document 0 with two words changed: a near-copy by text.
    base = stdlib_texts(1)[0]
    near = base.replace("the", "THE", 2)
    assert near != base
    prefix, texts = write_stdlib_prefix(d, num_docs=40, extra_texts=(near,))
    return prefix, texts, d / "tok"


def test_prefix_embeddings_match_sentence_transformers(tmp_path, model, corpus):
    prefix, _, tok_dir = corpus
    options = EmbedOptions(model=default_model(), batch_size=4, shard_size=7)
    summary = embed_corpus(PrefixTexts(prefix, max_tokens=16), tmp_path / "emb", options, model=model, progress=False)
    emb, meta = load_embeddings(tmp_path / "emb", verify_sha=True)
    ds, tok = IndexedDataset(prefix), load_tokenizer(tok_dir)
    texts = [tok.decode([t for t in ds[i][:16].tolist() if t != tok.eod_id]) for i in range(len(ds))]
    ref = model.encode(texts, batch_size=4, normalize_embeddings=True, convert_to_numpy=True)
    assert emb.shape == (41, 384) and emb.dtype == np.float16
    np.testing.assert_allclose(emb.astype(np.float32), ref, rtol=0, atol=1e-3)  # float16 storage
    norms = np.linalg.norm(emb.astype(np.float64), axis=1)
    assert np.abs(norms - 1).max() < 2e-3
    assert np.lib.format.open_memmap(tmp_path / "emb.npy", mode="r").shape == (41, 384)
    assert meta["input"]["idx_sha256"] == ds.idx_sha256 and meta["max_tokens"] == 16
    assert meta["model"]["name"] == default_model() and meta["dim"] == 384 and meta["normalization"] == "l2"
    assert summary["shards"] == 6 and not work_dir(tmp_path / "emb").exists()


def test_jsonl_input_and_existing_output(tmp_path, model, corpus):
    texts = [t[:200] for t in corpus[1][:5]]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    source = JsonlTexts(path, json_key="body")
    options = EmbedOptions(model=default_model(), batch_size=2, shard_size=3)
    embed_corpus(source, tmp_path / "emb.npy", options, model=model, progress=False)  # a .npy suffix is accepted
    emb, meta = load_embeddings(tmp_path / "emb")
    ref = model.encode(texts, batch_size=2, normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(emb.astype(np.float32), ref, rtol=0, atol=1e-3)
    assert meta["input"]["type"] == "jsonl" and meta["input"]["json_key"] == "body"
    with pytest.raises(EmbedError, match="exists .*--overwrite"):
        embed_corpus(source, tmp_path / "emb", options, model=model, progress=False)
    embed_corpus(source, tmp_path / "emb", options, model=model, overwrite=True, progress=False)


def test_real_corpus_embed_then_pair(tmp_path, model, corpus):
    prefix = corpus[0]
    embed_corpus(PrefixTexts(prefix, max_tokens=40), tmp_path / "emb",
                 EmbedOptions(model=default_model(), batch_size=8, shard_size=64), model=model, progress=False)
    emb, _ = load_embeddings(tmp_path / "emb")
    opts = PairOptions(k=5, min_sim=0.2, max_sim=1.01, near_copy="exact", index=IndexOptions(kind="flat"))
    meta = build_pairs(tmp_path / "emb", tmp_path / "pairs", opts, progress=False)
    t = pq.read_table(tmp_path / "pairs.parquet")
    got = list(zip(t.column("seed").to_pylist(), t.column("target").to_pylist()))
    # Brute force over the real embeddings, and Python sets of token 5-grams for the near-copy test.
    ds = IndexedDataset(prefix)
    grams = [{tuple(d[i:i + 5]) for i in range(len(d) - 4)} for d in (ds[j].tolist() for j in range(len(ds)))]
    v = emb.astype(np.float64)
    sims = v @ v.T
    ref, copies = [], 0
    for s in range(len(v)):
        near = [int(x) for x in np.lexsort((np.arange(len(v)), -sims[s]))[:6]]
        band = [x for x in near if x != s and sims[s, x] >= 0.2]
        keep = [x for x in band if len(grams[s] & grams[x]) / len(grams[s] | grams[x]) < 0.6]
        copies += len(band) - len(keep)
        ref += [(s, x) for x in sorted(keep, key=lambda x: (-sims[s, x], x))]
    assert got == ref
    assert meta["counts"]["dropped"]["near_copy"] == copies
    assert 40 in np.lexsort((np.arange(len(v)), -sims[0]))[:6] and (0, 40) not in got  # the constructed near-copy
