"""EntiGraph (Yang et al., "Synthetic continued pretraining", ICLR 2025): a small corpus of niche documents
becomes a large, diverse synthetic corpus through any OpenAI-compatible LLM (issue 13). The library behind
tools/entigraph.py.

    summary = run_entigraph(EntiGraphConfig(input="docs.jsonl", work_dir="W", output_prefix="data/eg",
                                            tokenizer="tok/", llm=LLMSettings(base_url=..., model=...)))

Per source document (megasynth.synth.corpus):
  step 1, "entities": one request returns JSON {"summary", "entities"}, checked against ENTITIES_SCHEMA (the
          client repairs bad JSON a bounded number of times). Entities are normalised (whitespace collapsed) and
          deduplicated case-insensitively, keeping the first spelling. An empty list is a recorded outcome: the
          document gets no relation requests (the reference code asked again forever).
  step 2, "pair" / "triple": for each entity pair (all of them, or a seeded sample of at most
          max_pairs_per_doc) and a seeded sample of at most max_triples_per_doc triples, one request writes how
          those entities relate in the context of the document. The sample is drawn by sample_combinations
          (Floyd's algorithm on random.random(), whose stream Python keeps stable, seeded by sha256 of (seed,
          document id, step)) and stored in the entities record, so a resumed run uses the very same plan.

Every request has a deterministic key, request_key(document id, step, entities...). Finished requests are
appended to W/entities.jsonl and W/relations.jsonl (megasynth.synth.workdir: one fsynced line each) as they
come back; the entity step of a document is recorded before its relation requests are sent. A run killed at
any point and started again sends only the requests without a record, so no finished request is repeated and no
output duplicated. An item that fails is recorded as failed with its reason and whether the failure was
transient (429, 408, 5xx, timeouts, dropped connections that outlasted the client's transient_budget_s) or
permanent (invalid JSON, empty replies, other 4xx after max_attempts), and the run goes on. Transient failures
are not data loss (issue 19): a rerun asks for them again; permanent ones only with retry_failed (so reruns of a
finished run cost nothing). A run that ends with failed items writes no output unless allow_partial (then the
sidecar says "partial" and counts what is missing). When the budget stops the run, the records so far stay and
no output is written; a rerun with a larger budget continues.

The output prefix is built from the records only, in a fixed order: documents in input order, then step
(summary, pair, triple), then key; so an interrupted and resumed run gives the same bytes as an uninterrupted
one. Texts are written as documents ending with EOD (megasynth.synth.synthetic_prefix), the summaries only with
include_summaries; PREFIX.provenance.parquet gives each document's source id and index, step, entities and key;
the sidecar's "synthetic" entry records model, prompt hash, settings, counts (documents, entities, pairs,
triples, failed by step and reason), "partial" (true only under allow_partial with items missing) with
"missing" ({"transient"|"permanent": {step: {reason: count}}}), and the ledger's tokens and estimated cost.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import math
import os
import random
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa

from megasynth.data.prefix import EmptyOutputError
from megasynth.synth.llm import BudgetExceeded, LLMClient, LLMRequest, LLMResult, LLMSettings
from megasynth.synth.llm.prompts import load_prompt, prompts_hash
from megasynth.synth.corpus import SourceDoc, documents_sha256, read_source_documents
from megasynth.synth.synthetic_prefix import SyntheticDoc, check_synthetic_output, write_synthetic_prefix
from megasynth.synth.workdir import (
    WorkDir, finished_from, load_finished, missing_items, refuse_overlapping_paths, request_key,
)
from megasynth.tokenizer import load_tokenizer

ENTITIES_LOG = "entities.jsonl"
RELATIONS_LOG = "relations.jsonl"
LEDGER = "ledger.jsonl"
STEPS = ("summary", "pair", "triple")  # the order of a document's outputs in the prefix

ENTITIES_SCHEMA = {
    "type": "object",
    "required": ["summary", "entities"],
    "properties": {"summary": {"type": "string", "minLength": 1},
                   "entities": {"type": "array", "items": {"type": "string"}}},
}

PROVENANCE_COLUMNS = {"source_id": pa.string(), "source_index": pa.int64(), "step": pa.string(),
                      "entities": pa.list_(pa.string()), "key": pa.string()}


@dataclass
class EntiGraphConfig:
    """One EntiGraph run; tools/entigraph.py builds it from its flags."""

    input: str
    """Documents JSONL ({"id", "title"?, "text"}) or an indexed prefix."""
    work_dir: str
    """Where the records, the ledger and the manifest live; a rerun with the same one resumes."""
    output_prefix: str
    """The synthetic prefix to write (PREFIX.bin/.idx/.json and PREFIX.provenance.parquet)."""
    tokenizer: str
    """The tokenizer of the output prefix."""
    llm: LLMSettings = field(default_factory=LLMSettings)
    """The endpoint, limits, retries, prices and budget (megasynth.synth.llm)."""
    input_tokenizer: str | None = None
    """For a prefix input: the tokenizer that decodes it (default: the one its sidecar names)."""
    max_pairs_per_doc: int | None = None
    """Most entity pairs per document (a seeded sample); None: every pair, as in the paper."""
    max_triples_per_doc: int = 20
    """Most entity triples per document (a seeded sample); 0: none."""
    seed: int = 0
    """Seeds the pair and triple samples."""
    include_summaries: bool = False
    """Also write each document's summary (step 1) as a synthetic document."""
    retry_failed: bool = False
    """Also ask again for items an earlier run recorded as failed for good (transient failures are always)."""
    allow_partial: bool = False
    """Write the output even when items failed (the sidecar says partial); default: write nothing."""
    overwrite: bool = False
    """Replace an existing output prefix."""
    progress: bool = True
    """A progress bar on stderr."""


# -- entities and the sampled plan -------------------------------------------------------------------------------
def normalise_entities(raw: list[str]) -> list[str]:
    """Whitespace collapsed, blanks dropped, case-insensitive duplicates removed (first spelling kept)."""
    seen, out = set(), []
    for entity in raw:
        name = " ".join(entity.split())
        if name and name.casefold() not in seen:
            seen.add(name.casefold())
            out.append(name)
    return out


def unrank_combination(n: int, k: int, rank: int) -> tuple[int, ...]:
    """The rank-th k-subset of range(n) in lexicographic order (itertools.combinations' order)."""
    out, x = [], 0
    for left in range(k, 0, -1):
        while True:
            count = math.comb(n - x - 1, left - 1)  # subsets whose next element is x
            if rank < count:
                out.append(x)
                x += 1
                break
            rank -= count
            x += 1
    return tuple(out)


def sample_combinations(n: int, k: int, limit: int | None, seed_material: str) -> list[tuple[int, ...]]:
    """k-subsets of range(n): all of them when limit is None or they are at most limit, else `limit` of them
    drawn without replacement, seeded by `seed_material`; in lexicographic order either way.

    Floyd's algorithm draws the ranks without listing all C(n, k) subsets, using only random.random(), whose
    sequence for a given int seed Python promises to keep across versions."""
    total = math.comb(n, k)
    if limit is None or total <= limit:
        return list(itertools.combinations(range(n), k))
    rng = random.Random(int.from_bytes(hashlib.sha256(seed_material.encode("utf-8")).digest()[:8], "little"))
    chosen: set[int] = set()
    for j in range(total - limit, total):
        t = min(int(rng.random() * (j + 1)), j)  # uniform in [0, j]
        chosen.add(j if t in chosen else t)
    return [unrank_combination(n, k, r) for r in sorted(chosen)]


def plan_relations(doc_id: str, n_entities: int, cfg: EntiGraphConfig) -> dict[str, list[list[int]]]:
    pairs = sample_combinations(n_entities, 2, cfg.max_pairs_per_doc, f"{cfg.seed}\0{doc_id}\0pair")
    triples = sample_combinations(n_entities, 3, cfg.max_triples_per_doc, f"{cfg.seed}\0{doc_id}\0triple")
    return {"pair": [list(p) for p in pairs], "triple": [list(t) for t in triples]}


def relation_items(doc_id: str, record: dict) -> list[tuple[str, str, list[str]]]:
    """(key, step, entities) of every relation request an ok entities record plans."""
    names = record["entities"]
    items = []
    for step in ("pair", "triple"):
        for combo in record[step]:
            ents = [names[i] for i in combo]
            items.append((request_key(doc_id, step, *ents), step, ents))
    return items


# -- the prompts -------------------------------------------------------------------------------------------------
class Prompts:
    def __init__(self):
        self.entities = load_prompt("entigraph_entities")
        self.pair = load_prompt("entigraph_pair")
        self.triple = load_prompt("entigraph_triple")
        self.all = [self.entities, self.pair, self.triple]
        self.hash = prompts_hash(self.all)

    def entities_messages(self, doc: SourceDoc) -> list[dict]:
        return self.entities.messages(title=doc.display_title, text=doc.text)

    def relation_messages(self, doc: SourceDoc, step: str, ents: list[str]) -> list[dict]:
        if step == "pair":
            return self.pair.messages(title=doc.display_title, text=doc.text, entity_a=ents[0], entity_b=ents[1])
        return self.triple.messages(title=doc.display_title, text=doc.text, entity_a=ents[0], entity_b=ents[1],
                                    entity_c=ents[2])


def _check_summary(value: dict) -> str | None:
    return None if value["summary"].strip() else "the summary is blank"


# -- the run -----------------------------------------------------------------------------------------------------
class _State:
    """What the work dir holds: the final entities record per document, where each relation record is."""

    def __init__(self, wd: WorkDir):
        self.entities_log = wd.log(ENTITIES_LOG)
        self.relations_log = wd.log(RELATIONS_LOG)
        self.entity_records: dict[str, dict] = {}
        self.entities = load_finished(self.entities_log, keep=self.entity_records)
        self.relations = load_finished(self.relations_log)

    def entities_record(self, doc: SourceDoc) -> dict | None:
        return self.entity_records.get(request_key(doc.id, "entities"))

    def add_entities(self, record: dict) -> None:
        offset = self.entities_log.append(record)
        self.entities[record["key"]] = finished_from(offset, record)
        self.entity_records[record["key"]] = record

    def add_relation(self, record: dict) -> None:
        offset = self.relations_log.append(record)
        self.relations[record["key"]] = finished_from(offset, record)


def _manifest(cfg: EntiGraphConfig, docs: list[SourceDoc], prompts: Prompts) -> dict:
    return {"input_sha256": documents_sha256(docs), "documents": len(docs), "model": cfg.llm.model,
            "temperature": cfg.llm.temperature, "max_tokens": cfg.llm.max_tokens, "prompts_hash": prompts.hash,
            "seed": cfg.seed, "max_pairs_per_doc": cfg.max_pairs_per_doc,
            "max_triples_per_doc": cfg.max_triples_per_doc}


def _pending(state: _State, key: str, retry_failed: bool, table) -> bool:
    done = table.get(key)
    return done is None or done.pending(retry_failed)


async def _generate(cfg: EntiGraphConfig, docs: list[SourceDoc], state: _State, client, prompts: Prompts) -> None:
    """Send every request without a final record; raises BudgetExceeded when the budget stops it."""
    by_id = {d.id: d for d in docs}

    def relation_request(doc: SourceDoc, key: str, step: str, ents: list[str]) -> LLMRequest:
        return LLMRequest(key=key, messages=prompts.relation_messages(doc, step, ents),
                          meta=("relation", doc.id, step, ents))

    async def submit_relations(batch, doc: SourceDoc, record: dict) -> None:
        for key, step, ents in relation_items(doc.id, record):
            if _pending(state, key, cfg.retry_failed, state.relations):
                await batch.submit(relation_request(doc, key, step, ents))

    async def on_result(request: LLMRequest, result: LLMResult) -> None:
        kind, doc_id = request.meta[0], request.meta[1]
        doc = by_id[doc_id]
        if kind == "entities":
            record = {"key": request.key, "doc": doc_id, "step": "entities", "ok": result.ok,
                      "attempts": result.attempts}
            if result.ok:
                ents = normalise_entities(result.parsed["entities"])
                record.update(summary=result.parsed["summary"].strip(), entities=ents,
                              **plan_relations(doc_id, len(ents), cfg))
            else:
                record.update(error=result.error, detail=result.detail, transient=result.transient)
            # The plan reaches the disk before any of its requests is sent (resume relies on it).
            state.add_entities(record)
            if result.ok:
                await submit_relations(batch, doc, record)
        else:
            _, _, step, ents = request.meta
            record = {"key": request.key, "doc": doc_id, "step": step, "entities": ents, "ok": result.ok,
                      "attempts": result.attempts}
            if result.ok:
                record.update(text=result.text, finish_reason=result.finish_reason)
            else:
                record.update(error=result.error, detail=result.detail, transient=result.transient)
            state.add_relation(record)

    async with client.batch(on_result, progress="entigraph" if cfg.progress else False) as batch:
        for doc in docs:
            key = request_key(doc.id, "entities")
            if _pending(state, key, cfg.retry_failed, state.entities):
                await batch.submit(LLMRequest(key=key, messages=prompts.entities_messages(doc),
                                              schema=ENTITIES_SCHEMA, validate=_check_summary,
                                              meta=("entities", doc.id)))
            elif state.entities[key].ok:
                await submit_relations(batch, doc, state.entity_records[key])


def _missing(docs: list[SourceDoc], state: _State) -> dict:
    """missing_items over the failed items of a complete run (a document whose entities failed counts once: its
    relations were never planned)."""
    def failed():
        for doc in docs:
            done = state.entities[request_key(doc.id, "entities")]
            if not done.ok:
                yield "entities", done
                continue
            for key, step, _ in relation_items(doc.id, state.entities_record(doc)):
                if not state.relations[key].ok:
                    yield step, state.relations[key]
    return missing_items(failed())


# -- the output --------------------------------------------------------------------------------------------------
def _outputs(docs: list[SourceDoc], state: _State, include_summaries: bool, counts: Counter, failed: dict):
    """Yield the SyntheticDocs in the fixed order; fill counts and failures as a side effect."""
    for doc in docs:
        ekey = request_key(doc.id, "entities")
        done = state.entities.get(ekey)
        if done is None:
            raise RuntimeError(f"document {doc.id!r} has no entities record; the run is not complete")
        counts["documents"] += 1
        if not done.ok:
            failed["entities"][done.error] += 1
            continue
        record = state.entity_records[ekey]
        counts["entities"] += len(record["entities"])
        counts["documents_without_entities"] += not record["entities"]
        if include_summaries:
            counts["summaries"] += 1
            yield SyntheticDoc(record["summary"], {"source_id": doc.id, "source_index": doc.index, "step": "summary",
                                                   "entities": [], "key": ekey})
        items = sorted(relation_items(doc.id, record), key=lambda it: (STEPS.index(it[1]), it[0]))
        for key, step, ents in items:
            counts[f"{step}s_planned"] += 1
            rel = state.relations.get(key)
            if rel is None:
                raise RuntimeError(f"request {key} has no record; the run is not complete")
            if not rel.ok:
                failed[step][rel.error] += 1
                continue
            counts[f"{step}s"] += 1
            text = state.relations_log.read_at(rel.offset)["text"]
            yield SyntheticDoc(text, {"source_id": doc.id, "source_index": doc.index, "step": step,
                                      "entities": ents, "key": key})


def _complete(docs: list[SourceDoc], state: _State) -> bool:
    for doc in docs:
        done = state.entities.get(request_key(doc.id, "entities"))
        if done is None:
            return False
        if done.ok and any(k not in state.relations for k, _, _ in relation_items(doc.id, state.entities_record(doc))):
            return False
    return True


def run_entigraph(cfg: EntiGraphConfig) -> dict:
    """Generate what is missing, then write the prefix. Returns {"complete", "budget_stopped", "sidecar" (or
    None: incomplete, budget-stopped, or items failed without allow_partial), "llm" (the ledger summary), "counts",
    "failed", "missing" (the failed items by kind, step and reason; megasynth.synth.pipeline_cli)}. Raises
    InputError / JsonlError on bad input (an output prefix or work dir that is, holds or sits inside an input
    among them, megasynth.cli.overlap_refusal), OutputExistsError, WorkDirMismatch, RunDirBusy."""
    refuse_overlapping_paths(cfg)
    check_synthetic_output(cfg.output_prefix, overwrite=cfg.overwrite)
    docs = read_source_documents(cfg.input, tokenizer=cfg.input_tokenizer)
    tokenizer = load_tokenizer(cfg.tokenizer)
    prompts = Prompts()
    manifest = _manifest(cfg, docs, prompts)
    with WorkDir.open(cfg.work_dir, pipeline="entigraph", settings=manifest, output=cfg.output_prefix) as wd:
        state = _State(wd)
        llm_summary, budget_stopped = asyncio.run(_run_client(cfg, docs, state, prompts, tokenizer))
        out = {"complete": _complete(docs, state), "budget_stopped": budget_stopped, "sidecar": None,
               "llm": llm_summary, "counts": {}, "failed": {}, "missing": {}}
        if not out["complete"]:
            return out
        missing = out["missing"] = _missing(docs, state)
        partial = any(missing.values())
        if partial and not cfg.allow_partial:
            return out  # nothing published (issue 19): the caller lists what is missing
        counts: Counter = Counter()
        failed = {step: Counter() for step in ("entities", "pair", "triple")}
        synthetic = {
            "generator": "entigraph", "model": cfg.llm.model,
            "prompts": {"hash": prompts.hash, "templates": [p.describe() for p in prompts.all]},
            "settings": {**manifest, "include_summaries": cfg.include_summaries},
            "source": {"path": os.fspath(cfg.input), "sha256": manifest["input_sha256"], "documents": len(docs)},
        }
        docs_iter = _outputs(docs, state, cfg.include_summaries, counts, failed)
        # The counts are known once every document has been written: the sidecar gets them at finalize.
        try:
            sidecar = write_synthetic_prefix(
                cfg.output_prefix, tokenizer, docs_iter, columns=PROVENANCE_COLUMNS, generator="entigraph",
                overwrite=cfg.overwrite, late_metadata=lambda: {"synthetic": {
                    **synthetic, "counts": _counts(counts, failed), "partial": partial, "missing": missing,
                    "llm": llm_summary}})
        except EmptyOutputError:
            raise EmptyOutputError(f"{cfg.output_prefix}: nothing to write: no relation text and no summary "
                                   f"succeeded (failed: {_counts(counts, failed)['failed']}); fix the cause and "
                                   "rerun with --retry-failed") from None
        out.update(sidecar=sidecar, counts=_counts(counts, failed), failed={k: dict(v) for k, v in failed.items()})
        return out


def _counts(counts: Counter, failed: dict) -> dict:
    keys = ("documents", "documents_without_entities", "entities", "summaries", "pairs_planned", "pairs",
            "triples_planned", "triples")
    return {**{k: int(counts[k]) for k in keys},
            "failed": {step: dict(sorted(c.items())) for step, c in failed.items()}}


async def _run_client(cfg: EntiGraphConfig, docs: list[SourceDoc], state: _State,
                      prompts: Prompts, tokenizer=None) -> tuple[dict, bool]:
    """(the ledger summary, whether the budget stopped the run)."""
    # The output tokenizer counts replies against max_tokens: a longer reply is cut (issue 19).
    async with LLMClient(cfg.llm, ledger_path=os.path.join(cfg.work_dir, LEDGER), seed=cfg.seed,
                         tokenizer=tokenizer) as client:
        stopped = False
        try:
            await _generate(cfg, docs, state, client, prompts)
        except BudgetExceeded:
            stopped = True
        return client.summary(), stopped
