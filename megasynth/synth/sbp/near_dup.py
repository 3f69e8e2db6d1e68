"""Near-duplicate tests on token sequences: hashed token n-grams, exact Jaccard, MinHash signatures, LSH.

    a, b = ngram_hashes(tokens_a, n=5), ngram_hashes(tokens_b, n=5)
    jaccard(a, b)                                   # exact Jaccard of the two n-gram sets
    sig = minhash_signatures([tokens_a, tokens_b])  # [2, 128] uint32, datasketch's affine32 MinHash
    minhash_jaccard(sig[0], sig[1])                 # its estimate of the same Jaccard
    near_duplicate_pairs(sig, threshold=0.8)        # [(i, j), ...] i < j, found with datasketch's MinHashLSH

The hashing and MinHash scheme: docs/sbp.md, "How each stage works"."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_U64 = np.uint64
# A large odd multiplier (2^64 / golden ratio) for the polynomial over token ids.
_POLY = _U64(0x9E3779B97F4A7C15)


def _fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser (a bijection that spreads every input bit over every output bit)."""
    h = h ^ (h >> _U64(33))
    h = h * _U64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> _U64(33))
    h = h * _U64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> _U64(33))


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser, as datasketch applies it before its affine32 permutations."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def ngram_hashes(tokens: Sequence[int] | np.ndarray, n: int = 5) -> np.ndarray:
    """The sorted, unique 64-bit hashes of the token n-grams of one document (uint64 array)."""
    if n < 1:
        raise ValueError(f"n-gram size must be >= 1, got {n}")
    ids = np.asarray(tokens).astype(np.int64, copy=False).ravel()
    if ids.size == 0:
        return np.empty(0, dtype=np.uint64)
    if ids.size < n:
        windows = ids[None, :]  # a short document is one n-gram of all it has
    else:
        windows = np.lib.stride_tricks.sliding_window_view(ids, n)
    with np.errstate(over="ignore"):  # wrap-around multiplication is the hash
        h = np.full(windows.shape[0], _U64(windows.shape[1]), dtype=np.uint64)
        for j in range(windows.shape[1]):
            h = h * _POLY + windows[:, j].astype(np.uint64) + _U64(1)
        h = _fmix64(h)
    return np.unique(h)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """|A ∩ B| / |A ∪ B| of two sets given as unique hash arrays (from ngram_hashes); 1.0 for two empty sets."""
    if a.size == 0 and b.size == 0:
        return 1.0
    inter = np.intersect1d(a, b, assume_unique=True).size
    return inter / (a.size + b.size - inter)


def containment(part: np.ndarray, whole: np.ndarray) -> float:
    """|PART ∩ WHOLE| / |PART|: the share of PART's n-grams that also occur in WHOLE (0.0 for an empty PART)."""
    if part.size == 0:
        return 0.0
    return np.intersect1d(part, whole, assume_unique=True).size / part.size


def minhash_permutations(num_perm: int = 128, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's affine32 permutation parameters (a, b), each uint32 [num_perm]."""
    from datasketch import MinHash  # noqa: PLC0415 - only the near-copy paths need it

    perm = MinHash(num_perm=num_perm, seed=seed, scheme="affine32").permutations
    return perm[0].astype(np.uint32), perm[1].astype(np.uint32)


def minhash_signatures(token_lists, *, n: int = 5, num_perm: int = 128, seed: int = 1,
                       batch_ngrams: int = 1 << 16) -> np.ndarray:
    """MinHash signatures [len(token_lists), num_perm] (uint32) of the documents' token n-gram sets.

    Row i equals `datasketch.MinHash(num_perm, seed, scheme="affine32", hashfunc=int)` updated with the top 32
    bits of document i's `ngram_hashes(...)`. An empty document gets all-0xFFFFFFFF (datasketch's empty
    signature). Documents are processed in groups of about `batch_ngrams` n-grams, so memory stays bounded."""
    a, b = minhash_permutations(num_perm, seed)
    docs = list(token_lists)
    out = np.full((len(docs), num_perm), np.uint32(0xFFFFFFFF), dtype=np.uint32)
    group: list[np.ndarray] = []
    rows: list[int] = []
    size = 0

    def flush() -> None:
        nonlocal group, rows, size
        if group:
            hv = _fmix32(np.concatenate(group))
            with np.errstate(over="ignore"):
                phv = hv[:, None] * a[None, :] + b[None, :]  # uint32 arithmetic wraps: mod 2^32, as datasketch
            starts = np.cumsum([0] + [g.size for g in group[:-1]])
            out[rows] = np.minimum.reduceat(phv, starts, axis=0)
        group, rows, size = [], [], 0

    for i, tokens in enumerate(docs):
        h = ngram_hashes(tokens, n)
        if h.size == 0:
            continue
        group.append((h >> _U64(32)).astype(np.uint32))
        rows.append(i)
        size += h.size
        if size >= batch_ngrams:
            flush()
    flush()
    return out


def minhash_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray | float:
    """MinHash estimate of Jaccard: the share of equal positions (row-wise for 2-D inputs)."""
    eq = np.asarray(sig_a) == np.asarray(sig_b)
    return float(eq.mean()) if eq.ndim == 1 else eq.mean(axis=-1)


def near_duplicate_pairs(signatures: np.ndarray, threshold: float = 0.8, *, seed: int = 1) -> list[tuple[int, int]]:
    """All pairs (i, j), i < j, whose MinHash Jaccard estimate is >= threshold, sorted.

    Candidates come from datasketch's MinHashLSH (banding tuned for `threshold`), then each is checked on the
    full signatures, so no pair below the threshold is reported; LSH may miss a few pairs just above it.
    `seed` must be the seed the signatures were made with."""
    from datasketch import MinHash, MinHashLSH  # noqa: PLC0415

    sig = np.asarray(signatures, dtype=np.uint32)
    num_perm = sig.shape[1]
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    perm = MinHash(num_perm=num_perm, seed=seed, scheme="affine32").permutations
    found: set[tuple[int, int]] = set()
    for i in range(sig.shape[0]):
        m = MinHash(num_perm=num_perm, seed=seed, hashvalues=sig[i], permutations=perm, scheme="affine32")
        for j in lsh.query(m):
            if minhash_jaccard(sig[i], sig[j]) >= threshold:
                found.add((j, i))
        lsh.insert(i, m)
    return sorted(found)
