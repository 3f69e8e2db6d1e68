"""Inputs for the pairing tests: a token prefix and embeddings files written exactly as embed_corpus writes them.

    prefix = write_prefix(tmp_path / "corpus", docs)           # docs: lists of token ids
    emb = write_emb(tmp_path / "emb", vectors, prefix)        # EMB.npy (float16) + EMB.json naming the prefix
    vectors = clustered(n, d, clusters, noise, seed)          # unit vectors around random centres
"""

from __future__ import annotations

import json

import numpy as np

from megasynth.data.indexed import IndexedDataset, IndexedDatasetWriter
from megasynth.synth.sbp.embed_files import EMB_FORMAT, EMB_FORMAT_VERSION, emb_paths, npy_header


def write_prefix(prefix, docs) -> str:
    with IndexedDatasetWriter(str(prefix), np.uint16, metadata={"vocab_size": 1000, "eod_id": 0}) as w:
        w.add_documents([np.asarray(d, dtype=np.int64) for d in docs])
    return str(prefix)


def write_emb(out, vecs: np.ndarray, prefix: str | None) -> str:
    """EMB.npy / EMB.json as megasynth.synth.sbp.embed writes them (float16 rows, prefix and its .idx sha)."""
    npy, side = emb_paths(out)
    vecs = np.asarray(vecs, dtype=np.float16)
    npy.write_bytes(npy_header(*vecs.shape) + vecs.astype("<f2").tobytes())
    inp = ({"type": "prefix", "prefix": prefix, "idx_sha256": IndexedDataset(prefix).idx_sha256, "max_tokens": 512}
           if prefix else {"type": "jsonl", "path": "x.jsonl", "sha256": "0" * 64, "json_key": "text"})
    side.write_text(json.dumps({"format": EMB_FORMAT, "format_version": EMB_FORMAT_VERSION, "model": {"name": "test"},
                                "dim": vecs.shape[1], "num_documents": vecs.shape[0], "dtype": "float16",
                                "normalization": "l2", "input": inp,
                                "files": {"npy": {"size": npy.stat().st_size, "sha256": "x"}}}))
    return str(out)


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(n: int, d: int, clusters: int, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = unit(rng.normal(size=(clusters, d)))
    return unit(centers[rng.integers(clusters, size=n)] + noise * rng.normal(size=(n, d)) / np.sqrt(d))
