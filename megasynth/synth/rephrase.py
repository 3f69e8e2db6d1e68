"""The rephrase baseline (WRAP-style, Maini et al. 2024) for EntiGraph: each source document rewritten by an LLM
in several styles, through the same client and with the same guarantees (issue 13). The library behind
tools/rephrase.py.

    summary = run_rephrase(RephraseConfig(input="docs.jsonl", work_dir="W", output_prefix="data/rp",
                                          tokenizer="tok/", llm=LLMSettings(...), styles=["plain", "qa"],
                                          samples_per_doc=8, target_tokens=455_000_000))

Styles (prompt templates megasynth/synth/llm/promptsrephrase_STYLE.vN.txt): plain (simple, clear language),
encyclopedic (a reference-work article), qa (questions and answers covering the document). Each request is one
(document, style, sample) with key request_key(document id, "rephrase", style, sample) and its own `seed`
sampling parameter (derived from --seed and the key), so samples differ at temperature > 0 and an endpoint
that honours seeds gives reproducible ones.

The plan is round-major: sample 0 of every (document, style), then sample 1, ... up to samples_per_doc, so a
token target spreads over all documents before repeating any. With `target_tokens` (to compare with EntiGraph
at the same token count), the output is the shortest start of the plan whose successful rephrasings hold at
least that many tokens (EOD included, with the output tokenizer), and only as many requests are sent as that
needs (in waves, estimated from the lengths seen so far); without it, the whole plan. Records, resumption,
failures (transient ones asked again by any rerun, permanent ones with retry_failed; no output while items of
the selection failed, unless allow_partial), the budget stop and the output (prefix + provenance parquet +
sidecar, built from the records in a fixed order: document, style, sample) work as in megasynth.synth.entigraph.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
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
from megasynth.tokenizer import Tokenizer, load_tokenizer

STYLES = ("plain", "encyclopedic", "qa")
RECORDS_LOG = "rephrasings.jsonl"
LEDGER = "ledger.jsonl"
PROVENANCE_COLUMNS = {"source_id": pa.string(), "source_index": pa.int64(), "step": pa.string(),
                      "style": pa.string(), "sample": pa.int64(), "key": pa.string()}


@dataclass
class RephraseConfig:
    """One rephrase run; tools/rephrase.py builds it from its flags."""

    input: str
    """Documents JSONL ({"id", "title"?, "text"}) or an indexed prefix."""
    work_dir: str
    """Where the records, the ledger and the manifest live; a rerun with the same one resumes."""
    output_prefix: str
    """The synthetic prefix to write (PREFIX.bin/.idx/.json and PREFIX.provenance.parquet)."""
    tokenizer: str
    """The tokenizer of the output prefix (and of the token target)."""
    llm: LLMSettings = field(default_factory=LLMSettings)
    """The endpoint, limits, retries, prices and budget (megasynth.synth.llm)."""
    input_tokenizer: str | None = None
    """For a prefix input: the tokenizer that decodes it (default: the one its sidecar names)."""
    styles: list[str] = field(default_factory=lambda: list(STYLES))
    """Rephrase styles, from STYLES; their order is the order of a document's outputs."""
    samples_per_doc: int = 1
    """Samples of each (document, style); with target_tokens, the most that may be drawn."""
    target_tokens: int | None = None
    """Stop at the shortest start of the plan that reaches this many output tokens; None: the whole plan."""
    seed: int = 0
    """Derives each request's `seed` sampling parameter."""
    retry_failed: bool = False
    """Also ask again for items an earlier run recorded as failed for good (transient failures are always)."""
    allow_partial: bool = False
    """Write the output even when items of it failed (the sidecar says partial); default: write nothing."""
    overwrite: bool = False
    """Replace an existing output prefix."""
    progress: bool = True
    """A progress bar on stderr."""

    def __post_init__(self):
        unknown = [s for s in self.styles if s not in STYLES]
        if unknown or not self.styles or len(set(self.styles)) != len(self.styles):
            raise ValueError(f"styles must be distinct names from {STYLES}, got {self.styles}")
        if self.samples_per_doc < 1:
            raise ValueError(f"samples_per_doc must be >= 1, got {self.samples_per_doc}")
        if self.target_tokens is not None and self.target_tokens < 1:
            raise ValueError(f"target_tokens must be >= 1, got {self.target_tokens}")


@dataclass(frozen=True)
class Item:
    doc: SourceDoc
    style: str
    sample: int
    key: str


def plan(docs: list[SourceDoc], styles: list[str], samples: int) -> list[Item]:
    """Round-major: every (document, style) once per round, documents in input order."""
    return [Item(d, style, s, request_key(d.id, "rephrase", style, s))
            for s in range(samples) for d in docs for style in styles]


def request_seed(seed: int, key: str) -> int:
    """A 31-bit sampling seed per request (endpoints take int32 seeds)."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{key}".encode()).digest()[:4], "little") & 0x7FFFFFFF


class _State:
    def __init__(self, wd: WorkDir, tokenizer: Tokenizer, count_tokens: bool):
        self.log = wd.log(RECORDS_LOG)
        self.tokenizer = tokenizer
        self.count_tokens = count_tokens
        self.tokens: dict[str, int] = {}  # output tokens (EOD included) of each ok record, when counted
        records: dict[str, dict] = {}
        self.done = load_finished(self.log, keep=records if count_tokens else None)
        for key, record in records.items():
            if record.get("ok") is True:
                self.tokens[key] = self._count(record["text"])

    def _count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, parse_special=False)) + 1  # as synthetic_prefix encodes it

    def add(self, record: dict) -> None:
        offset = self.log.append(record)
        self.done[record["key"]] = finished_from(offset, record)
        if record["ok"] and self.count_tokens:
            self.tokens[record["key"]] = self._count(record["text"])

    def pending(self, item: Item, retry_failed: bool) -> bool:
        done = self.done.get(item.key)
        return done is None or done.pending(retry_failed)


def selection(items: list[Item], state: _State, target: int | None) -> tuple[list[Item] | None, int]:
    """(the items of the output, their tokens when counted): the whole plan when every item has a record and
    there is no target; with a target, the shortest start of the plan whose ok items reach it, or the whole
    plan when it never does. None while a needed item has no record."""
    total = 0
    for i, item in enumerate(items):
        if item.key not in state.done:
            return None, total
        total += state.tokens.get(item.key, 0) if state.done[item.key].ok else 0
        if target is not None and total >= target:
            return items[: i + 1], total
    return items, total


def next_wave(items: list[Item], state: _State, cfg: RephraseConfig, asked: set[str]) -> list[Item]:
    """The pending items to ask for now: all of them without a target; with one, those the plan needs to reach
    it if every pending item turns out as long as the average ok one so far (the document's own length in
    tokens before there is any)."""
    pending = [it for it in items if it.key not in asked and state.pending(it, cfg.retry_failed)]
    if cfg.target_tokens is None or not pending:
        return pending
    known = list(state.tokens.values())
    average = sum(known) / len(known) if known else None
    wave, total = [], 0
    for it in items:
        if it.key in state.done and state.done[it.key].ok:
            total += state.tokens[it.key]
        elif it.key not in asked and state.pending(it, cfg.retry_failed):
            wave.append(it)
            total += average if average is not None else len(state.tokenizer.encode(it.doc.text, parse_special=False)) + 1
        if total >= cfg.target_tokens:
            break
    return wave


async def _generate(cfg: RephraseConfig, items: list[Item], state: _State, client, prompts: dict) -> None:
    asked: set[str] = set()  # keys submitted by this run (a wave never asks twice)

    async def on_result(request: LLMRequest, result: LLMResult) -> None:
        item: Item = request.meta
        record = {"key": item.key, "doc": item.doc.id, "step": "rephrase", "style": item.style,
                  "sample": item.sample, "ok": result.ok, "attempts": result.attempts}
        if result.ok:
            record.update(text=result.text, finish_reason=result.finish_reason)
        else:
            record.update(error=result.error, detail=result.detail, transient=result.transient)
        state.add(record)

    while True:
        wave = next_wave(items, state, cfg, asked)
        if not wave:
            return
        async with client.batch(on_result, progress="rephrase" if cfg.progress else False) as batch:
            for it in wave:
                asked.add(it.key)
                messages = prompts[it.style].messages(title=it.doc.display_title, text=it.doc.text)
                await batch.submit(LLMRequest(key=it.key, messages=messages, meta=it,
                                              sampling={"seed": request_seed(cfg.seed, it.key)}))
        if cfg.target_tokens is not None and selection(items, state, cfg.target_tokens)[0] is not None:
            return


def run_rephrase(cfg: RephraseConfig) -> dict:
    """Generate what is missing, then write the prefix. Returns {"complete", "budget_stopped", "sidecar" (or
    None), "llm", "counts", "failed", "missing"}; raises like megasynth.synth.entigraph.run_entigraph (InputError
    for an output prefix or work dir that is, holds or sits inside an input)."""
    refuse_overlapping_paths(cfg)
    check_synthetic_output(cfg.output_prefix, overwrite=cfg.overwrite)
    docs = read_source_documents(cfg.input, tokenizer=cfg.input_tokenizer)
    tokenizer = load_tokenizer(cfg.tokenizer)
    prompts = {style: load_prompt(f"rephrase_{style}") for style in cfg.styles}
    phash = prompts_hash(prompts.values())
    manifest = {"input_sha256": documents_sha256(docs), "documents": len(docs), "model": cfg.llm.model,
                "temperature": cfg.llm.temperature, "max_tokens": cfg.llm.max_tokens, "prompts_hash": phash,
                "styles": list(cfg.styles), "seed": cfg.seed}
    items = plan(docs, cfg.styles, cfg.samples_per_doc)
    with WorkDir.open(cfg.work_dir, pipeline="rephrase", settings=manifest, output=cfg.output_prefix) as wd:
        state = _State(wd, tokenizer, count_tokens=cfg.target_tokens is not None)
        llm_summary, budget_stopped = asyncio.run(_run_client(cfg, items, state, prompts, tokenizer))
        chosen, _ = selection(items, state, cfg.target_tokens)
        out = {"complete": chosen is not None, "budget_stopped": budget_stopped, "sidecar": None,
               "llm": llm_summary, "counts": {}, "failed": {}, "missing": {}}
        if chosen is None:
            return out
        missing = out["missing"] = missing_items(("rephrase", state.done[it.key]) for it in chosen
                                                 if not state.done[it.key].ok)
        partial = any(missing.values())
        if partial and not cfg.allow_partial:
            return out  # nothing published (issue 19): the caller lists what is missing
        order = {style: i for i, style in enumerate(cfg.styles)}
        chosen = sorted(chosen, key=lambda it: (it.doc.index, order[it.style], it.sample))
        counts: Counter = Counter()
        failed: Counter = Counter()

        def outputs():
            for it in chosen:
                done = state.done[it.key]
                if not done.ok:
                    failed[done.error] += 1
                    continue
                counts[it.style] += 1
                text = state.log.read_at(done.offset)["text"]
                yield SyntheticDoc(text, {"source_id": it.doc.id, "source_index": it.doc.index, "step": "rephrase",
                                          "style": it.style, "sample": it.sample, "key": it.key})

        synthetic = {"generator": "rephrase", "model": cfg.llm.model,
                     "prompts": {"hash": phash, "templates": [p.describe() for p in prompts.values()]},
                     "settings": {**manifest, "samples_per_doc": cfg.samples_per_doc,
                                  "target_tokens": cfg.target_tokens},
                     "source": {"path": os.fspath(cfg.input), "sha256": manifest["input_sha256"],
                                "documents": len(docs)}}

        def late() -> dict:
            n = sum(counts.values())
            return {"synthetic": {**synthetic, "counts": {"documents": len(docs), "items": len(chosen),
                                                          "rephrasings": n, "by_style": dict(counts),
                                                          "failed": {"rephrase": dict(sorted(failed.items()))}},
                                  "partial": partial, "missing": missing, "llm": llm_summary}}

        try:
            sidecar = write_synthetic_prefix(cfg.output_prefix, tokenizer, outputs(), columns=PROVENANCE_COLUMNS,
                                             generator="rephrase", overwrite=cfg.overwrite, late_metadata=late)
        except EmptyOutputError:
            raise EmptyOutputError(f"{cfg.output_prefix}: nothing to write: every rephrasing failed ({dict(failed)}); "
                                   "fix the cause and rerun with --retry-failed") from None
        target_reached = cfg.target_tokens is None or sidecar["num_tokens"] >= cfg.target_tokens
        out.update(sidecar=sidecar, counts={"documents": len(docs), "rephrasings": sum(counts.values()),
                                            "by_style": dict(counts)},
                   failed={"rephrase": dict(failed)}, target_reached=target_reached)
        return out


async def _run_client(cfg: RephraseConfig, items: list[Item], state: _State,
                      prompts: dict, tokenizer=None) -> tuple[dict, bool]:
    """(the ledger summary, whether the budget stopped the run)."""
    # The output tokenizer counts replies against max_tokens: a longer reply is cut (issue 19).
    async with LLMClient(cfg.llm, ledger_path=os.path.join(cfg.work_dir, LEDGER), seed=cfg.seed,
                         tokenizer=tokenizer) as client:
        stopped = False
        try:
            await _generate(cfg, items, state, client, prompts)
        except BudgetExceeded:
            stopped = True
        return client.summary(), stopped
