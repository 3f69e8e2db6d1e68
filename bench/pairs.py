"""Benchmark the IVF index of build_pairs against exact search (issue 12: recall@10 >= 0.95, speed-up >= 10x).

    python bench/pairs.py                          # 1M clustered vectors of dim 384, 500 sample queries
    python bench/pairs.py --n 200000 --queries 1000 --nprobe 16

The vectors are synthetic: --clusters random unit centres, each vector a centre plus Gaussian noise (--noise,
relative to the centre's norm), normalised and stored as float16 like EMB.npy. Real embeddings cluster by topic;
uniform random vectors in 384 dimensions have no neighbourhood structure and no index helps them. The index is
built exactly as build_pairs builds it (megasynth.synth.sbp.ann: IVF, sqrt(n) lists, float16 codes, trained on a
seeded sample of 64 rows per list, nprobe tuned to --target-recall on the recall sample unless --nprobe).

Searching all n vectors exactly takes O(n^2 d) (1M x 1M x 384 ~ 4e14 multiply-adds, hours on 2 cores), so exact
search (faiss IndexFlatIP, what --index flat runs) and IVF search are both timed on the same --queries sample
rows against the full database, and the per-query times are extrapolated to n queries (a batch of a few
hundred queries keeps BLAS as efficient as a full pass would). Reported: recall@k of IVF on the sample (against numpy exact search), the
per-query speed-up, and the speed-up for a full pairing pass (IVF: build + n queries; exact: n queries).
Times are wall-clock with faiss's and BLAS's default threads.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from megasynth.synth.sbp.ann import IndexOptions, build_index, exact_knn, measure_recall, recall_at_k, sample_rows


def clustered_unit_vectors(n: int, d: int, clusters: int, noise: float, seed: int, chunk: int = 1 << 16):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, d), dtype=np.float16)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        x = centres[rng.integers(clusters, size=m)] + (noise / np.sqrt(d)) * rng.normal(size=(m, d)).astype(np.float32)
        out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="vectors (default 1,000,000)")
    parser.add_argument("--dim", type=int, default=384, help="dimension (default 384, MiniLM's)")
    parser.add_argument("--clusters", type=int, default=2000, help="cluster centres (default 2000)")
    parser.add_argument("--noise", type=float, default=0.8, help="noise norm relative to a centre (default 0.8)")
    parser.add_argument("--k", type=int, default=10, help="neighbours (default 10)")
    parser.add_argument("--queries", type=int, default=500, help="sample queries timed on both sides (default 500)")
    parser.add_argument("--nprobe", type=int, default=0, help="IVF nprobe (default 0: tuned to --target-recall)")
    parser.add_argument("--target-recall", type=float, default=0.95, help="tuning target (default 0.95)")
    parser.add_argument("--seed", type=int, default=0, help="data and sample seed (default 0)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args()

    t0 = time.perf_counter()
    emb = clustered_unit_vectors(args.n, args.dim, args.clusters, args.noise, args.seed)
    print(f"{args.n:,} x {args.dim} float16 clustered unit vectors ({args.clusters} clusters, noise {args.noise}) "
          f"in {time.perf_counter() - t0:.1f} s")
    options = IndexOptions(kind="ivf", nprobe=args.nprobe, target_recall=args.target_recall,
                           recall_queries=args.queries, seed=args.seed)
    t0 = time.perf_counter()
    index, info = build_index(emb, options)
    build_s = time.perf_counter() - t0
    print(f"IVF built in {build_s:.1f} s: {info}")
    t0 = time.perf_counter()
    record = measure_recall(index, info, emb, args.k, options)  # tunes nprobe on the sample
    print(f"recall sample + tuning {time.perf_counter() - t0:.1f} s: nprobe {info['nprobe']}, recall@{args.k} "
          f"{record['recall']:.4f}")

    rows = sample_rows(args.n, args.queries, args.seed, 2)  # the recall sample: same rows on both sides
    _, exact_ids = exact_knn(emb, rows, args.k)  # the numpy reference the recall is measured against
    q = np.ascontiguousarray(emb[rows], dtype=np.float32)
    # The exact competitor: faiss's flat inner-product index (BLAS + heaps), what --index flat runs.
    flat, _ = build_index(emb, IndexOptions(kind="flat"))
    t0 = time.perf_counter()
    _, flat_ids = flat.search(q, args.k)
    exact_s = time.perf_counter() - t0
    del flat
    flat_recall = recall_at_k(flat_ids, exact_ids)
    t0 = time.perf_counter()
    _, ivf_ids = index.search(q, args.k)
    ivf_s = time.perf_counter() - t0
    recall = recall_at_k(ivf_ids, exact_ids)
    per_exact, per_ivf = exact_s / rows.size, ivf_s / rows.size
    full_exact, full_ivf = per_exact * args.n, build_s + per_ivf * args.n
    result = {"n": args.n, "dim": args.dim, "k": args.k, "queries": int(rows.size), "index": info,
              "recall_at_k": recall, "flat_recall_at_k": flat_recall, "exact_ms_per_query": 1e3 * per_exact, "ivf_ms_per_query": 1e3 * per_ivf,
              "speedup_per_query": per_exact / per_ivf, "build_s": build_s,
              "full_pass_exact_s_extrapolated": full_exact, "full_pass_ivf_s_extrapolated": full_ivf,
              "speedup_full_pass": full_exact / full_ivf}
    print(f"exact: {1e3 * per_exact:.2f} ms/query ({rows.size} queries over {args.n:,} rows, faiss IndexFlatIP; its "
          f"recall against the numpy reference {flat_recall:.4f})")
    print(f"IVF:   {1e3 * per_ivf:.3f} ms/query (nlist {info['nlist']}, nprobe {info['nprobe']}, fp16 codes)")
    print(f"recall@{args.k} {recall:.4f} (target >= 0.95); speed-up per query {per_exact / per_ivf:.1f}x; full pass "
          f"over {args.n:,} queries, extrapolated: exact {full_exact / 3600:.2f} h vs IVF {full_ivf / 60:.1f} min "
          f"incl. build = {full_exact / full_ivf:.1f}x (target >= 10x)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
