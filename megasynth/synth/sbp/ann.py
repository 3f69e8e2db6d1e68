"""Nearest neighbours of unit vectors by inner product with faiss: exact, IVF or HNSW, with measured recall.

    index, info = build_index(emb, IndexOptions(kind="auto"))    # emb: [n, d] float16 memmap, unit rows
    for start, sims, ids in search_chunks(index, emb, k=17): ...  # every row's k nearest rows, chunk by chunk

The kinds and how recall picks nprobe / efSearch: docs/sbp.md, "How each stage works"."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

KINDS = ("auto", "flat", "ivf", "hnsw")
CODECS = ("fp16", "sq8")
_GPU_RESOURCES: list = []


class IndexSettingsError(ValueError):
    """Index settings that cannot work for this corpus or this faiss build; one line naming the setting."""


@dataclass
class IndexOptions:
    kind: str = "auto"
    """auto | flat | ivf | hnsw (auto: flat up to flat_max rows, else ivf)."""
    flat_max: int = 200_000
    """The largest corpus "auto" searches exactly."""
    nlist: int = 0
    """IVF lists; 0 means round(sqrt(n)), at most n // 39 (faiss wants >= 39 training points per list)."""
    nprobe: int = 0
    """IVF lists visited per query; 0 tunes it on the recall sample (smallest power of two from 8 reaching
    target_recall)."""
    train_size: int = 0
    """Rows (a seeded sample) IVF's k-means trains on; 0 means min(n, 64 * nlist)."""
    codec: str = "fp16"
    """IVF vector storage: fp16 (exact for float16 inputs, 2 bytes/dim) or sq8 (1 byte/dim, approximate)."""
    hnsw_m: int = 32
    """HNSW graph degree."""
    ef_construction: int = 80
    """HNSW build-time beam width."""
    ef_search: int = 0
    """HNSW search beam width; 0 tunes it like nprobe."""
    target_recall: float = 0.95
    """What tuning nprobe / efSearch aims for on the recall sample."""
    recall_queries: int = 1000
    """Query rows (a seeded sample) on which recall@k is measured against exact search."""
    chunk: int = 65536
    """Rows read from the memory map at a time (adding and searching)."""
    seed: int = 0
    """Seed of the training sample and of the recall sample."""
    gpu: str = "auto"
    """auto (use faiss's GPU build when it is installed and sees a GPU) | on | off."""


def faiss_gpu_available() -> bool:
    import faiss  # noqa: PLC0415

    try:
        return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    except Exception:  # noqa: BLE001 - a CPU build may lack the call altogether
        return False


def _rows_f32(emb: np.ndarray, start: int, stop: int) -> np.ndarray:
    return np.ascontiguousarray(emb[start:stop], dtype=np.float32)


def sample_indices(total: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted int64 indices: all of range(total) when total <= n, else n drawn uniformly without replacement."""
    if total <= n:
        return np.arange(total, dtype=np.int64)
    return np.sort(rng.choice(total, size=n, replace=False)).astype(np.int64)


def sample_rows(n: int, size: int, seed: int, salt: int) -> np.ndarray:
    """A sorted seeded sample of `size` distinct row numbers in [0, n) (salt separates the samples' streams)."""
    return sample_indices(n, size, np.random.default_rng([seed, salt]))


def build_index(emb: np.ndarray, options: IndexOptions, progress=None):
    """(a filled faiss index over every row of `emb`, info dict: kind and parameters). `progress`: a callable
    taking a short status string, or None."""
    import faiss  # noqa: PLC0415

    n, d = emb.shape
    if options.kind not in KINDS:
        raise IndexSettingsError(f"index kind must be one of {KINDS}, got {options.kind!r}")
    kind = options.kind if options.kind != "auto" else "flat" if n <= options.flat_max else "ivf"
    use_gpu = options.gpu == "on" or (options.gpu == "auto" and faiss_gpu_available())
    if options.gpu == "on" and not faiss_gpu_available():
        raise IndexSettingsError("--faiss-gpu on: this faiss has no GPU support or sees no GPU")
    info: dict = {"type": kind}
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, options.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = options.ef_construction
        info.update(m=options.hnsw_m, ef_construction=options.ef_construction)
        use_gpu = False
    else:
        if options.codec not in CODECS:
            raise IndexSettingsError(f"IVF codec must be one of {CODECS}, got {options.codec!r}")
        nlist = options.nlist or max(1, min(round(math.sqrt(n)), n // 39))
        if nlist > n:
            raise IndexSettingsError(f"--nlist {nlist} exceeds the {n} vectors")
        qtype = faiss.ScalarQuantizer.QT_fp16 if options.codec == "fp16" else faiss.ScalarQuantizer.QT_8bit
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, qtype, faiss.METRIC_INNER_PRODUCT)
        train = sample_rows(n, options.train_size or 64 * nlist, options.seed, 1)
        info.update(nlist=nlist, codec=options.codec, train_size=int(train.size))
    if use_gpu:
        res = faiss.StandardGpuResources()
        _GPU_RESOURCES.append(res)  # must outlive the index; faiss wrappers refuse new attributes to hold it
        index = faiss.index_cpu_to_gpu(res, 0, index)
    info["gpu"] = bool(use_gpu)
    if kind == "ivf":
        if progress:
            progress(f"training IVF ({info['nlist']} lists) on {info['train_size']} rows")
        index.train(np.ascontiguousarray(emb[train], dtype=np.float32))
    for start in range(0, n, options.chunk):
        if progress:
            progress(f"adding rows {start}..{min(n, start + options.chunk)} of {n}")
        index.add(_rows_f32(emb, start, start + options.chunk))
    return index, info


def search_ids(index, emb: np.ndarray, rows: np.ndarray, k: int, chunk: int) -> np.ndarray:
    """faiss's k nearest ids [q, k] (int64, -1 = none) of the given query rows."""
    ids = [index.search(np.ascontiguousarray(emb[rows[start:start + chunk]], dtype=np.float32), k)[1]
           for start in range(0, rows.size, chunk)]
    return np.concatenate(ids) if ids else np.empty((0, k), np.int64)


def search_chunks(index, emb: np.ndarray, k: int, chunk: int):
    """Yield (first row, similarities [c, k], ids [c, k]) for every row of `emb` as a query, in row order."""
    for start in range(0, emb.shape[0], chunk):
        sims, ids = index.search(_rows_f32(emb, start, start + chunk), k)
        yield start, sims, ids


def exact_knn(emb: np.ndarray, rows: np.ndarray, k: int, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product of the query rows against every row (numpy, float32, chunked over the
    database): (similarities [q, k] descending, ids [q, k]); equal similarities are ordered by row number (which
    of several rows tied exactly at the k-th place is kept is not specified)."""
    q = np.ascontiguousarray(emb[rows], dtype=np.float32)
    n = emb.shape[0]
    k = min(k, n)
    best_s = np.full((q.shape[0], 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((q.shape[0], 0), dtype=np.int64)
    for start in range(0, n, chunk):
        block = _rows_f32(emb, start, start + chunk)
        s = q @ block.T
        if s.shape[1] > k:  # this chunk's k best per query first: sorting only 2k candidates per merge
            part = np.argpartition(-s, k - 1, axis=1)[:, :k]
            s, i = np.take_along_axis(s, part, 1), part + start
        else:
            i = np.broadcast_to(np.arange(start, start + block.shape[0], dtype=np.int64), s.shape)
        s, i = np.concatenate([best_s, s], axis=1), np.concatenate([best_i, i], axis=1)
        # Sort by (-similarity, id) and keep k: lexsort's last key is the primary one.
        order = np.lexsort((i, -s), axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)
    return best_s, best_i


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean over queries of |approx top-k ∩ exact top-k| / k."""
    if exact_ids.size == 0:
        return 1.0
    k = exact_ids.shape[1]
    hits = sum(np.intersect1d(a[a >= 0], e).size for a, e in zip(approx_ids, exact_ids))
    return hits / (k * exact_ids.shape[0])


def measure_recall(index, info: dict, emb: np.ndarray, k: int, options: IndexOptions, progress=None) -> dict:
    """Recall@k of `index` against exact search on a seeded sample of query rows; tunes nprobe / efSearch when
    they are 0 (sets them on the index and records them in `info`). Returns the recall record for PAIRS.json."""
    n = emb.shape[0]
    k = min(k, n)
    rows = sample_rows(n, options.recall_queries, options.seed, 2)
    if progress:
        progress(f"exact search for {rows.size} sample queries (recall reference)")
    _, exact_ids = exact_knn(emb, rows, k, options.chunk)
    kind = info["type"]
    param = {"ivf": ("nprobe", options.nprobe, info.get("nlist", 1)),
             "hnsw": ("ef_search", options.ef_search, max(k, 1 << 14))}.get(kind)
    if param is None:
        recall = recall_at_k(search_ids(index, emb, rows, k, options.chunk), exact_ids)
    else:
        name, fixed, ceiling = param
        candidates = [fixed] if fixed else _powers_from(8 if kind == "ivf" else max(16, k), ceiling)
        for value in candidates:
            if kind == "ivf":
                index.nprobe = value  # CPU IVF indexes and the GPU ones index_cpu_to_gpu returns both have it
            else:
                index.hnsw.efSearch = value
            recall = recall_at_k(search_ids(index, emb, rows, k, options.chunk), exact_ids)
            if progress:
                progress(f"{name}={value}: recall@{k} {recall:.4f}")
            if recall >= options.target_recall:
                break
        info[name] = value
        info[f"{name}_tuned"] = not fixed
    return {"k": k, "queries": int(rows.size), "recall": round(float(recall), 6), "seed": options.seed,
            "reference": "exact inner product over all rows (numpy float32)"}


def _powers_from(start: int, ceiling: int) -> list[int]:
    """start, 2 * start, 4 * start, ... while below `ceiling`, then `ceiling`."""
    values, v = [], start
    while v < ceiling:
        values.append(v)
        v *= 2
    values.append(ceiling)
    return values
