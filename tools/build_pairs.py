"""SBP stage 2: pair every document with its nearest neighbours in embedding space.

    python tools/build_pairs.py --embeddings runs/emb --output runs/pairs --k 16 --min-sim 0.5 --max-sim 0.95
    python tools/build_pairs.py --embeddings runs/emb --output runs/pairs --index ivf --nprobe 32 --corpus data/train

Reads EMB.npy / EMB.json (tools/embed_corpus.py) memory-mapped and searches each document's k nearest
neighbours by inner product (= cosine; the rows are unit vectors) with faiss: exact (flat) for small corpora,
IVF for large ones (--index auto decides by --flat-max), or HNSW; the GPU build of faiss is used when present.
Recall@k of the index against exact search is measured on a seeded sample of queries and reported; with
--nprobe / --ef-search 0 the smallest value reaching --target-recall is chosen.

Keeps pairs with min-sim <= similarity < max-sim, drops self-pairs and near-copies by text (token n-gram Jaccard
>= --near-copy-threshold, by MinHash or exactly: --near-copy; needs the corpus prefix, by default the one
EMB.json names, checked against it by document count and .idx sha256), and keeps at most --max-pairs-per-seed
pairs per seed (the most similar). Writes PAIRS.parquet (seed int64, target int64, similarity float32; ordered
by seed, similarity descending, target), PAIRS.json (every count, histograms, recall, index parameters; written
last) and PAIRS.png (the similarity histogram). An existing output is refused unless --overwrite; no surviving
pair is an error unless --allow-empty. An --output whose files are those of --embeddings or of the corpus (the
PAIRS.json would replace EMB.json) is refused, --overwrite or not. Bad input: one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from megasynth.cli import ToolParser, check_outputs, finite_float, float_range, prefix, unit_float
from megasynth.data.indexed import IndexedDatasetError
from megasynth.synth.sbp.ann import CODECS, KINDS, IndexOptions, IndexSettingsError
from megasynth.synth.sbp.embed_files import EmbeddingsError, emb_stem
from megasynth.synth.sbp.pairs import NEAR_COPY_METHODS, PairOptions, PairsError, build_pairs, pairs_paths


def build_parser() -> argparse.ArgumentParser:
    parser = ToolParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d, di = PairOptions(), IndexOptions()
    parser.add_argument("--embeddings", required=True, metavar="EMB", help="reads EMB.npy and EMB.json")
    parser.add_argument("--output", required=True, metavar="PAIRS", help="writes PAIRS.parquet, PAIRS.json, PAIRS.png")
    parser.add_argument("--corpus", metavar="PREFIX",
                        help="the prefix the embeddings were made from, for the near-copy filter (default: the one "
                             "EMB.json names); its document count and .idx sha256 must match EMB.json")
    parser.add_argument("--k", type=int, default=d.k, help=f"neighbours per seed (default {d.k})")
    parser.add_argument("--min-sim", type=float_range(-1, 1), default=d.min_sim, metavar="A",
                        help=f"keep pairs with similarity >= A (default {d.min_sim})")
    parser.add_argument("--max-sim", type=finite_float, default=d.max_sim, metavar="B",
                        help=f"keep pairs with similarity < B; above are near-duplicates (default {d.max_sim})")
    parser.add_argument("--max-pairs-per-seed", type=int, default=0, metavar="M",
                        help="keep at most the M most similar pairs per seed (default 0 = k)")
    parser.add_argument("--near-copy", choices=NEAR_COPY_METHODS, default=d.near_copy,
                        help="near-copy test on token n-grams: minhash (datasketch estimate, default), exact "
                             "(exact Jaccard; small corpora) or off")
    parser.add_argument("--near-copy-threshold", type=unit_float, default=d.near_copy_threshold, metavar="J",
                        help=f"drop pairs whose token n-gram Jaccard is >= J (default {d.near_copy_threshold})")
    parser.add_argument("--ngram", type=int, default=d.ngram, metavar="N", help=f"n-gram size in tokens (default {d.ngram})")
    parser.add_argument("--num-perm", type=int, default=d.num_perm, metavar="P",
                        help=f"MinHash permutations (default {d.num_perm})")
    parser.add_argument("--index", choices=KINDS, default=di.kind,
                        help="auto (flat up to --flat-max documents, else ivf), flat (exact), ivf, hnsw")
    parser.add_argument("--flat-max", type=int, default=di.flat_max, metavar="N",
                        help=f"largest corpus --index auto searches exactly (default {di.flat_max:,})")
    parser.add_argument("--nlist", type=int, default=0, metavar="N", help="IVF lists (default 0 = sqrt(documents))")
    parser.add_argument("--nprobe", type=int, default=0, metavar="N",
                        help="IVF lists searched per query (default 0 = tune to --target-recall)")
    parser.add_argument("--train-size", type=int, default=0, metavar="N",
                        help="IVF training sample (seeded) in rows (default 0 = 64 per list)")
    parser.add_argument("--ivf-codec", choices=CODECS, default=di.codec,
                        help="IVF storage: fp16 (exact for float16 embeddings, default) or sq8 (half the memory)")
    parser.add_argument("--hnsw-m", type=int, default=di.hnsw_m, help=f"HNSW graph degree (default {di.hnsw_m})")
    parser.add_argument("--ef-search", type=int, default=0, metavar="N",
                        help="HNSW search width (default 0 = tune to --target-recall)")
    parser.add_argument("--target-recall", type=float_range(0, 1, low_open=True), default=di.target_recall,
                        metavar="R",
                        help=f"recall@k that tuning --nprobe / --ef-search aims for (default {di.target_recall})")
    parser.add_argument("--recall-queries", type=int, default=di.recall_queries, metavar="N",
                        help=f"sample of queries on which recall is measured against exact search "
                             f"(default {di.recall_queries})")
    parser.add_argument("--chunk", type=int, default=di.chunk, metavar="N",
                        help=f"rows read, added and searched at a time; bounds memory (default {di.chunk})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training and recall samples (default 0)")
    parser.add_argument("--faiss-gpu", choices=("auto", "on", "off"), default="auto",
                        help="use faiss's GPU build: auto (when installed and a GPU is visible), on, off")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing PAIRS.*")
    parser.add_argument("--allow-empty", action="store_true",
                        help="write an empty table when no pair survives (default: an error, exit 2)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or status lines")
    return parser


def _named_corpus(embeddings: str) -> str | None:
    """The corpus prefix EMB.json names (the default --corpus), or None when it names none or cannot be read."""
    try:
        with open(f"{embeddings}.json", encoding="utf-8") as f:
            source = json.load(f).get("input", {})
    except (OSError, ValueError, AttributeError):
        return None
    return source.get("prefix") if isinstance(source, dict) and source.get("type") == "prefix" else None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    corpus = args.corpus if args.corpus is not None else _named_corpus(emb_stem(args.embeddings))
    pairs_stem, emb = str(pairs_paths(args.output)["parquet"].with_suffix("")), emb_stem(args.embeddings)
    check_outputs(parser, {"--output": prefix(pairs_stem, (".parquet", ".json", ".png"))},
                  {"--embeddings": prefix(emb), "--corpus": prefix(corpus) if corpus else None})
    index = IndexOptions(kind=args.index, flat_max=args.flat_max, nlist=args.nlist, nprobe=args.nprobe,
                         train_size=args.train_size, codec=args.ivf_codec, hnsw_m=args.hnsw_m, ef_search=args.ef_search,
                         target_recall=args.target_recall, recall_queries=args.recall_queries, chunk=args.chunk,
                         seed=args.seed, gpu=args.faiss_gpu)
    options = PairOptions(k=args.k, min_sim=args.min_sim, max_sim=args.max_sim,
                          max_pairs_per_seed=args.max_pairs_per_seed, near_copy=args.near_copy,
                          near_copy_threshold=args.near_copy_threshold, ngram=args.ngram, num_perm=args.num_perm,
                          index=index)
    if min(args.chunk, args.recall_queries, args.hnsw_m) < 1 or min(args.nlist, args.nprobe, args.train_size,
                                                                     args.ef_search, args.flat_max) < 0:
        print("--chunk, --recall-queries and --hnsw-m must be >= 1; --nlist, --nprobe, --train-size, --ef-search "
              "and --flat-max >= 0", file=sys.stderr)
        return 2
    try:
        s = build_pairs(args.embeddings, args.output, options, corpus=args.corpus, overwrite=args.overwrite,
                        allow_empty=args.allow_empty, progress=not args.no_progress)
    except (PairsError, EmbeddingsError, IndexedDatasetError, IndexSettingsError) as e:
        print(f"{e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{e.filename or args.output}: {e.strerror or e}", file=sys.stderr)
        return 2
    c, r = s["counts"], s["recall"]
    p = pairs_paths(args.output)
    print(f"wrote {p['parquet']}, {p['json'].name} and {p['png'].name}: {c['kept']:,} pairs "
          f"from {c['candidates']:,} candidates over {c['seeds']:,} seeds ({c['seeds_with_pairs']:,} with a pair); "
          f"dropped " + ", ".join(f"{v:,} {k}" for k, v in c["dropped"].items())
          + f"; {s['index']['type']} index, recall@{r['k']} {r['recall']:.4f} on {r['queries']} queries")
    return 0


if __name__ == "__main__":
    sys.exit(main())
