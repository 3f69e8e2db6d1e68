"""SBP stage 2: nearest neighbours -> similarity band -> near-copy filter -> per-seed cap -> the pair table.

    summary = build_pairs("runs/emb", "runs/pairs", PairOptions(k=16, min_sim=0.5, max_sim=0.95), corpus="data/train")
    # -> runs/pairs.parquet (seed int64, target int64, similarity float32), runs/pairs.json, runs/pairs.png

The drop reasons and the files: docs/sbp.md, "How each stage works" and "File formats"."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from megasynth.io import atomic_open, atomic_write_json, file_sha256
from megasynth.synth.sbp.ann import IndexOptions, build_index, measure_recall, search_chunks
from megasynth.synth.sbp.embed_files import check_against_prefix, check_unit_rows, emb_paths, load_embeddings
from megasynth.synth.sbp.near_dup import jaccard, minhash_jaccard, minhash_signatures, ngram_hashes

PAIRS_FORMAT = "megasynth-pairs"
PAIRS_FORMAT_VERSION = 1
DROP_REASONS = ("self", "below_min", "above_max", "near_copy", "over_cap")
NEAR_COPY_METHODS = ("minhash", "exact", "off")
ROW_GROUP = 1 << 20  # rows per parquet row group
HIST_BINS = np.linspace(-1.0, 1.0, 101)  # 0.02 wide


class PairsError(ValueError):
    """Bad input or settings for pairing, or an empty result; the message is one line naming the file/flag."""


@dataclass
class PairOptions:
    k: int = 16
    """Neighbours considered per seed (the index is asked for k+1: the seed itself usually comes back)."""
    min_sim: float = 0.5
    """Keep pairs with similarity >= min_sim (cosine of the unit embeddings)."""
    max_sim: float = 0.95
    """... and similarity < max_sim (above: near-duplicates by meaning)."""
    max_pairs_per_seed: int = 0
    """At most this many pairs per seed, the most similar kept; 0 means k."""
    near_copy: str = "minhash"
    """minhash | exact | off: how near-copies by text (token n-gram Jaccard) are found."""
    near_copy_threshold: float = 0.6
    """Drop a pair whose token n-gram Jaccard is >= this."""
    ngram: int = 5
    """Token n-gram size for the near-copy test."""
    num_perm: int = 128
    """MinHash permutations (the estimate's standard error is about sqrt(J(1-J)/num_perm), 0.04 at J=0.6)."""
    index: IndexOptions = field(default_factory=IndexOptions)
    """Nearest-neighbour index settings (megasynth/synth/sbp/ann)."""


def pairs_paths(output: str | os.PathLike) -> dict[str, Path]:
    out = os.fspath(output)
    for suffix in (".parquet", ".json", ".png"):
        out = out.removesuffix(suffix)
    return {kind: Path(f"{out}.{kind}") for kind in ("parquet", "json", "png")}


class NearCopyTest:
    """Decides whether (seed, target) pairs are near-copies, caching per-document n-gram data."""

    def __init__(self, ds, options: PairOptions):
        self.ds, self.options = ds, options
        self.method = options.near_copy
        if self.method == "minhash":
            n = len(ds)
            self.sig = np.zeros((n, options.num_perm), dtype=np.uint32)  # n x num_perm x 4 bytes
            self.have = np.zeros(n, dtype=bool)
        self._sets: dict[int, np.ndarray] = {}

    def _set(self, i: int) -> np.ndarray:
        s = self._sets.get(i)
        if s is None:
            s = self._sets[i] = ngram_hashes(self.ds[i], self.options.ngram)
        return s

    def scores(self, seeds: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Jaccard (estimated or exact) of each pair's n-gram sets (select_pairs asks for at least one)."""
        if self.method == "minhash":
            docs = np.concatenate([seeds, targets])
            missing = np.unique(docs[~self.have[docs]])
            if missing.size:
                self.sig[missing] = minhash_signatures((self.ds[int(i)] for i in missing), n=self.options.ngram,
                                                       num_perm=self.options.num_perm)
                self.have[missing] = True
            return minhash_jaccard(self.sig[seeds], self.sig[targets])
        out = np.array([jaccard(self._set(int(a)), self._set(int(b))) for a, b in zip(seeds, targets)])
        if len(self._sets) > 200_000:  # bounded memory; exact is meant for small corpora anyway
            self._sets.clear()
        return out


def exact_similarity(emb: np.ndarray, seeds: np.ndarray, targets: np.ndarray, block: int = 1 << 15) -> np.ndarray:
    """float32(sum over dims of float64(emb[seed]) * float64(emb[target])), pair by pair, independent of any index."""
    out = np.empty(seeds.size, dtype=np.float32)
    for start in range(0, seeds.size, block):
        a = np.asarray(emb[seeds[start:start + block]], dtype=np.float64)
        b = np.asarray(emb[targets[start:start + block]], dtype=np.float64)
        out[start:start + block] = np.einsum("ij,ij->i", a, b)
    return out


def select_pairs(seeds: np.ndarray, targets: np.ndarray, sims: np.ndarray, options: PairOptions, near_copy,
                 dropped: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Apply self / band / near-copy / cap to candidate pairs (1-D arrays); count drops into `dropped`; return the
    kept (seed, target, similarity) ordered by seed, similarity descending, target."""
    keep = targets != seeds
    dropped["self"] += int((~keep).sum())
    low = keep & (sims < options.min_sim)
    dropped["below_min"] += int(low.sum())
    keep &= ~low
    high = keep & (sims >= options.max_sim)
    dropped["above_max"] += int(high.sum())
    keep &= ~high
    if near_copy is not None and keep.any():
        idx = np.flatnonzero(keep)
        copy = near_copy.scores(seeds[idx], targets[idx]) >= options.near_copy_threshold
        dropped["near_copy"] += int(copy.sum())
        keep[idx[copy]] = False
    s, t, v = seeds[keep], targets[keep], sims[keep]
    order = np.lexsort((t, -v, s))
    s, t, v = s[order], t[order], v[order]
    cap = options.max_pairs_per_seed or options.k
    if s.size:
        first = np.r_[0, np.flatnonzero(np.diff(s)) + 1]  # where each seed's run starts
        rank = np.arange(s.size) - np.repeat(first, np.diff(np.r_[first, s.size]))
        within = rank < cap
        dropped["over_cap"] += int((~within).sum())
        s, t, v = s[within], t[within], v[within]
    return s, t, v


def _check_options(options: PairOptions) -> None:
    if options.k < 1:
        raise PairsError(f"--k must be >= 1, got {options.k}")
    if not -1.0 <= options.min_sim < options.max_sim:
        raise PairsError(f"need -1 <= --min-sim < --max-sim, got {options.min_sim} and {options.max_sim}")
    if options.max_pairs_per_seed < 0:
        raise PairsError(f"--max-pairs-per-seed must be >= 0, got {options.max_pairs_per_seed}")
    if options.near_copy not in NEAR_COPY_METHODS:
        raise PairsError(f"--near-copy must be one of {', '.join(NEAR_COPY_METHODS)}, got {options.near_copy!r}")
    if not 0.0 < options.near_copy_threshold <= 1.0 or options.ngram < 1 or options.num_perm < 1:
        raise PairsError("need 0 < --near-copy-threshold <= 1, --ngram >= 1 and --num-perm >= 1")


def build_pairs(embeddings: str | os.PathLike, output: str | os.PathLike, options: PairOptions, *,
                corpus: str | os.PathLike | None = None, overwrite: bool = False, allow_empty: bool = False,
                progress: bool = True) -> dict:
    """Pair the documents of EMB (docs/sbp.md); write PAIRS.parquet/.json/.png; return PAIRS.json."""
    import pyarrow as pa  # noqa: PLC0415
    import pyarrow.parquet as pq  # noqa: PLC0415
    from tqdm import tqdm  # noqa: PLC0415

    _check_options(options)
    paths = pairs_paths(output)
    found = [p.name for p in paths.values() if p.exists()]
    if found and not overwrite:
        raise PairsError(f"{os.fspath(output)}: the output exists ({', '.join(found)}); pass --overwrite to replace it")
    emb, meta = load_embeddings(embeddings)
    npy_path, side_path = emb_paths(embeddings)
    n = emb.shape[0]
    if n < 2:
        raise PairsError(f"{npy_path}: {n} embedding row(s); pairing needs at least 2 documents")
    ds = None
    if corpus is None and options.near_copy != "off":
        if meta.get("input", {}).get("type") != "prefix":
            raise PairsError(f"{side_path}: made from JSONL, so the near-copy filter has no tokens; "
                             "pass --corpus PREFIX or --near-copy off")
        corpus = meta["input"]["prefix"]
    if corpus is not None:
        ds = check_against_prefix(meta, corpus, n_rows=n, source=str(side_path))
    check_unit_rows(emb, source=str(npy_path))

    log = (lambda msg: tqdm.write(f"build_pairs: {msg}")) if progress else None
    index, info = build_index(emb, options.index, progress=log)
    recall = measure_recall(index, info, emb, options.k + 1, options.index, progress=log)
    near_copy = NearCopyTest(ds, options) if options.near_copy != "off" else None
    dropped = dict.fromkeys(DROP_REASONS, 0)
    hist_cand = np.zeros(HIST_BINS.size - 1, dtype=np.int64)
    hist_kept = np.zeros_like(hist_cand)
    candidates = kept = seeds_with_pairs = 0
    sim_sum, sim_min, sim_max = 0.0, np.inf, -np.inf
    schema = pa.schema([("seed", pa.int64()), ("target", pa.int64()), ("similarity", pa.float32())])
    bar = tqdm(total=n, unit="seeds", desc="pairs", disable=not progress, dynamic_ncols=True)
    with bar, atomic_open(paths["parquet"], "wb") as f, pq.ParquetWriter(f, schema) as writer:
        groups = _RowGroups(writer, schema, ROW_GROUP)
        for start, _, ids in search_chunks(index, emb, min(options.k + 1, n), options.index.chunk):
            seeds = np.repeat(np.arange(start, start + ids.shape[0], dtype=np.int64), ids.shape[1])
            targets = ids.reshape(-1).astype(np.int64)
            valid = targets >= 0  # faiss pads with -1 when a query finds fewer than k
            seeds, targets = seeds[valid], targets[valid]
            sims = exact_similarity(emb, seeds, targets)
            candidates += seeds.size
            hist_cand += np.histogram(np.clip(sims[targets != seeds], -1, 1), HIST_BINS)[0]
            s, t, v = select_pairs(seeds, targets, sims, options, near_copy, dropped)
            if s.size:
                kept += s.size
                seeds_with_pairs += np.unique(s).size
                hist_kept += np.histogram(np.clip(v, -1, 1), HIST_BINS)[0]
                sim_sum += float(v.astype(np.float64).sum())
                sim_min, sim_max = min(sim_min, float(v.min())), max(sim_max, float(v.max()))
                groups.add(s, t, v)
            bar.update(ids.shape[0])
        groups.flush(final=True)
        if kept == 0 and not allow_empty:
            raise PairsError(f"{os.fspath(output)}: no pair survived ({candidates} candidates, dropped "
                             + ", ".join(f"{v} {k}" for k, v in dropped.items())
                             + "); widen --min-sim/--max-sim or pass --allow-empty")
        if overwrite:  # the old commit point goes before the old parquet is replaced: no stale PAIRS.json
            paths["json"].unlink(missing_ok=True)

    summary = {
        "format": PAIRS_FORMAT, "format_version": PAIRS_FORMAT_VERSION,
        "embeddings": {"path": os.path.abspath(npy_path), "sha256": meta.get("files", {}).get("npy", {}).get("sha256"),
                       "model": meta.get("model", {}).get("name"), "num_documents": n, "dim": emb.shape[1]},
        "corpus": None if ds is None else {"prefix": os.path.abspath(os.fspath(corpus)), "idx_sha256": ds.idx_sha256},
        "settings": {k: v for k, v in asdict(options).items() if k != "index"},
        "index": info,
        "recall": recall,
        "near_copy": ({"method": "off"} if near_copy is None else {
            "method": options.near_copy, "measure": f"Jaccard of token {options.ngram}-gram sets",
            "threshold": options.near_copy_threshold, "ngram": options.ngram,
            **({"num_perm": options.num_perm, "implementation": "datasketch MinHash scheme affine32, seed 1"}
               if options.near_copy == "minhash" else {"implementation": "exact (64-bit n-gram hashes)"})}),
        "counts": {"seeds": n, "candidates": candidates, "kept": kept, "dropped": dropped,
                   "seeds_with_pairs": seeds_with_pairs},
        "kept_similarity": ({"min": round(sim_min, 6), "mean": round(sim_sum / kept, 6), "max": round(sim_max, 6)}
                            if kept else None),
        "histogram": {"bin_edges": [round(float(x), 4) for x in HIST_BINS], "candidates": hist_cand.tolist(),
                      "kept": hist_kept.tolist(), "note": "candidates exclude self-pairs"},
        "files": {"parquet": {"name": paths["parquet"].name, "size": paths["parquet"].stat().st_size,
                              "sha256": file_sha256(paths["parquet"])},
                  "png": {"name": paths["png"].name}},
    }
    write_histogram_png(paths["png"], summary)
    atomic_write_json(paths["json"], summary)
    return summary


class _RowGroups:
    """Buffers kept pairs and writes row groups of exactly `size` rows (the last one shorter), so the parquet
    bytes do not depend on how the search was chunked."""

    def __init__(self, writer, schema, size: int):
        self.writer, self.schema, self.size = writer, schema, size
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.rows = 0

    def add(self, s: np.ndarray, t: np.ndarray, v: np.ndarray) -> None:
        self.parts.append((s, t, v))
        self.rows += s.size
        self.flush(final=False)

    def flush(self, final: bool) -> None:
        import pyarrow as pa  # noqa: PLC0415

        if self.rows < self.size and not (final and self.rows):
            return
        s, t, v = (np.concatenate(x) for x in zip(*self.parts))
        cut = s.size if final else s.size - s.size % self.size
        for start in range(0, cut, self.size):
            stop = min(cut, start + self.size)
            self.writer.write_table(pa.table({"seed": s[start:stop], "target": t[start:stop],
                                              "similarity": v[start:stop]}, schema=self.schema),
                                    row_group_size=self.size)
        self.parts = [(s[cut:], t[cut:], v[cut:])] if cut < s.size else []
        self.rows = s.size - cut


def write_histogram_png(path: Path, summary: dict) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    hist = summary["histogram"]
    edges = np.asarray(hist["bin_edges"])
    s = summary["settings"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.stairs(hist["candidates"], edges, label=f"candidates ({sum(hist['candidates']):,}, self excluded)")
    ax.stairs(hist["kept"], edges, fill=True, alpha=0.5, label=f"kept ({summary['counts']['kept']:,})")
    for x, name in ((s["min_sim"], "min-sim"), (s["max_sim"], "max-sim")):
        ax.axvline(x, color="k", linestyle="--", linewidth=1)
        ax.text(x, ax.get_ylim()[1] * 0.95, f" {name}", fontsize=8, va="top")
    nonzero = np.flatnonzero(np.asarray(hist["candidates"]))
    lo = edges[nonzero[0]] if nonzero.size else -1.0
    ax.set_xlim(max(-1.0, min(lo, s["min_sim"]) - 0.05), 1.0)  # the empty far left says nothing
    ax.set_xlabel("cosine similarity (seed, neighbour)")
    ax.set_ylabel("pairs")
    r = summary["recall"]
    ax.set_title(f"{summary['index']['type']} index, recall@{r['k']} {r['recall']:.3f} on {r['queries']} queries",
                 fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", metadata={"Software": None})
    plt.close(fig)
