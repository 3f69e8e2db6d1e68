"""The LLM-pipeline runner that every LLM method (EntiGraph, rephrase) is a subclass of: the method supplies its
plan, prompts and output order (the hooks of LLMPipeline); the runner does the rest.

    out = EntiGraph(cfg).run()      # a subclass: name, logs, columns, failure_steps, plan(), request(), order(), ...
    out = EntiGraph(cfg).run(WorkerRun(Worker.parse("1/3")))   # one of independent workers (runner_units.py)

A worked example of a method, what a run does, what is pending, what a rerun does and what run() returns:
docs/synth.md, "The LLM-pipeline runner"."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from megasynth.data.indexed import check_output_free
from megasynth.data.prefix import EmptyOutputError
from megasynth.synth.corpus import SourceDoc, documents_sha256, read_source_documents
from megasynth.synth.llm.client import LLMClient
from megasynth.synth.llm.prompts import Prompt, prompts_hash
from megasynth.synth.llm.settings import LLMSettings
from megasynth.synth.llm.types import BudgetExceeded, LLMRequest, LLMResult
from megasynth.synth.synthetic_prefix import SyntheticDoc, write_synthetic_prefix
from megasynth.synth.workdir import (
    RecordLog, WorkDir, finished_from, load_finished, missing_items, refuse_overlapping_paths,
)
from megasynth.tokenizer import load_tokenizer

if TYPE_CHECKING:
    from megasynth.synth.llm.runner_units import WorkerRun

LEDGER = "ledger.jsonl"


@dataclass
class PipelineConfig:
    """What every LLM method's run takes; a method's config adds its own fields after these."""

    input: str
    """Documents JSONL ({"id", "title"?, "text"}) or an indexed prefix."""
    work_dir: str
    """Where the records, the ledger and the manifest live; a rerun with the same one resumes."""
    output_prefix: str
    """The synthetic prefix to write (PREFIX.bin/.idx/.json and PREFIX.provenance.parquet)."""
    tokenizer: str
    """The tokenizer of the output prefix (and of any token count the method makes)."""
    llm: LLMSettings = field(default_factory=LLMSettings)
    """The endpoint, limits, retries, prices and budget (megasynth.synth.llm)."""
    input_tokenizer: str | None = None
    """For a prefix input: the tokenizer that decodes it (default: the one its sidecar names)."""
    seed: int = 0
    """Seeds what the method samples (EntiGraph: the pair and triple samples; rephrase: each request's `seed`)."""
    retry_failed: bool = False
    """Also ask again for items an earlier run recorded as failed for good (transient failures are always)."""
    allow_partial: bool = False
    """Write the output even when items of it failed (the sidecar says partial); default: write nothing."""
    overwrite: bool = False
    """Replace an existing output prefix."""
    progress: bool = True
    """A progress bar on stderr."""


@dataclass(frozen=True, eq=False, slots=True)
class Item:
    """One request of a plan. `fields` go into its record and provenance between "step" and the outcome."""

    key: str
    doc: SourceDoc
    step: str
    fields: dict = field(default_factory=dict)


class LLMPipeline:
    """The runner; a method subclasses it (docs/synth.md, "The LLM-pipeline runner"). For the hooks, `self.docs`,
    `self.tokenizer`, `self.items` (the plan) and `self.done` ({key: megasynth.synth.workdir.Finished}) describe the
    run."""

    name: str
    """The pipeline: the work dir's manifest, the sidecar's generator, the progress bar; tools/NAME.py runs it."""
    logs: dict[str, str]
    """Step -> the record file of its items in the work dir."""
    kept_logs: tuple[str, ...] = ()
    """Record files whose records on_record() sees, as loaded and as written."""
    columns: dict[str, pa.DataType]
    """The provenance columns (source_id, source_index, step, the items' fields, key)."""
    failure_steps: tuple[str, ...]
    """The steps counted in "failed", in order."""

    def __init__(self, cfg: PipelineConfig, prompts: list[Prompt]):
        self.cfg, self.prompts = cfg, prompts
        self.label = self.name
        """The progress bar's label (a work unit's names the unit)."""

    # -- the hooks -------------------------------------------------------------------------------------------------
    def settings(self) -> dict:
        """The method's settings that decide its records (the manifest's, after the common ones)."""
        return {}

    def publish_settings(self) -> dict:
        """Settings recorded in the sidecar besides the manifest's."""
        return {}

    def plan(self) -> list[Item]:
        """The items known before any reply."""
        raise NotImplementedError

    def request(self, item: Item) -> dict:
        """The LLMRequest fields of an item: messages (or prompt), and schema, validate, sampling as needed."""
        raise NotImplementedError

    def reply(self, item: Item, result: LLMResult) -> dict:
        """What an ok item's record holds besides key, doc, step, fields, ok and attempts."""
        return {"text": result.text, "finish_reason": result.finish_reason}

    def on_record(self, record: dict) -> None:
        """Sees each final record of kept_logs (the winning one of a key as loaded, then each one written)."""

    def follow_ups(self, item: Item) -> list[Item]:
        """The items an ok item's record plans (asked once that record is on disk)."""
        return []

    def wave(self, asked: set[str]) -> list[Item]:
        """The next items to ask for (`asked`: the keys asked by this run); none: the run is over."""
        return [item for item in self.items if item.key not in asked]

    def chosen(self) -> list[Item] | None:
        """The items of the output, or None while one has no record: by default the plan and the follow-ups of
        its ok items."""
        out: list[Item] = []

        def walk(items: list[Item]) -> bool:
            for item in items:
                done = self.done.get(item.key)
                if done is None:
                    return False
                out.append(item)
                if done.ok and not walk(self.follow_ups(item)):
                    return False
            return True

        return out if walk(self.items) else None

    def order(self, item: Item) -> tuple:
        """The sort key of the output order."""
        raise NotImplementedError

    def documents(self, item: Item) -> Iterator[SyntheticDoc]:
        """The output documents of an ok item, in order."""
        yield self.output(item, self.record(item)["text"])

    def counts(self) -> dict:
        """The sidecar's counts, once every document was written (self.planned, self.failed: Counters by step)."""
        raise NotImplementedError

    def nothing_written(self) -> str:
        """Why an output would be empty (every item failed), for the error message."""
        raise NotImplementedError

    def units_refusal(self) -> str | None:
        """Why this run cannot be split into work units of documents (a setting that spans every document), or
        None: it can."""
        return None

    # -- what the hooks use ----------------------------------------------------------------------------------------
    def pending(self, item: Item) -> bool:
        done = self.done.get(item.key)
        return done is None or done.pending(self.cfg.retry_failed)

    def record(self, item: Item) -> dict:
        """An item's final record, read back from its log."""
        return self._logs[self.logs[item.step]].read_at(self.done[item.key].offset)

    def output(self, item: Item, text: str, step: str | None = None, **fields) -> SyntheticDoc:
        return SyntheticDoc(text, {"source_id": item.doc.id, "source_index": item.doc.index,
                                   "step": step or item.step, **item.fields, **fields, "key": item.key})

    # -- the run ---------------------------------------------------------------------------------------------------
    def run(self, workers: WorkerRun | None = None) -> dict:
        """Generate what is missing, then publish (what it returns and raises: docs/synth.md). With `workers`, as
        one of independent workers over work units (megasynth.synth.llm.runner_units; docs/synth.md, "Workers")."""
        if workers is not None:
            from megasynth.synth.llm.runner_units import run_units  # noqa: PLC0415 - imports this module

            return run_units(self, workers)
        cfg = self.cfg
        refuse_overlapping_paths(cfg)
        check_output_free(cfg.output_prefix, overwrite=cfg.overwrite)
        manifest = self.prepare()
        with WorkDir.open(cfg.work_dir, pipeline=self.name, settings=manifest, output=cfg.output_prefix) as wd:
            return self.publish(manifest, *self.generate(wd, cfg.llm))

    def prepare(self) -> dict:
        """Read the documents and the tokenizer; return the manifest: what decides the records."""
        cfg = self.cfg
        self.docs = read_source_documents(cfg.input, tokenizer=cfg.input_tokenizer)
        self.tokenizer = load_tokenizer(cfg.tokenizer)
        return {"input_sha256": documents_sha256(self.docs), "documents": len(self.docs), "model": cfg.llm.model,
                "temperature": cfg.llm.temperature, "max_tokens": cfg.llm.max_tokens,
                "prompts_hash": prompts_hash(self.prompts), **self.settings()}

    def log_names(self) -> list[str]:
        """The record files, each once."""
        return list(dict.fromkeys(self.logs.values()))

    def publish(self, manifest: dict, llm: dict, budget_stopped: bool) -> dict:
        """Write the output prefix from the records loaded (self.done) for the plan (self.items), unless an item
        has no record yet or failed (without allow_partial); returns what run() returns."""
        cfg = self.cfg
        chosen = self.chosen()
        out = {"complete": chosen is not None, "budget_stopped": budget_stopped, "sidecar": None, "llm": llm,
               "counts": {}, "failed": {}, "missing": {}}
        if chosen is None:
            return out
        missing = out["missing"] = self.missing(chosen)
        partial = any(missing.values())
        if partial and not cfg.allow_partial:
            return out  # nothing published: the caller lists what is missing
        self.planned = Counter(it.step for it in chosen)
        self.failed = {step: Counter() for step in self.failure_steps}
        synthetic = {"generator": self.name, "model": cfg.llm.model,
                     "prompts": {"hash": manifest["prompts_hash"], "templates": [p.describe() for p in self.prompts]},
                     "settings": {**manifest, **self.publish_settings()},
                     "source": {"path": os.fspath(cfg.input), "sha256": manifest["input_sha256"],
                                "documents": len(self.docs)}}
        try:
            # The counts are known once every document has been written: the sidecar gets them at finalize.
            sidecar = write_synthetic_prefix(
                cfg.output_prefix, self.tokenizer, self._outputs(chosen), columns=self.columns,
                generator=self.name, overwrite=cfg.overwrite, late_metadata=lambda: {"synthetic": {
                    **synthetic, "counts": self.counts(), "partial": partial, "missing": missing, "llm": llm}})
        except EmptyOutputError:
            raise EmptyOutputError(f"{cfg.output_prefix}: nothing to write: {self.nothing_written()}; fix the "
                                   "cause and rerun with --retry-failed") from None
        out.update(sidecar=sidecar, counts=self.counts(), failed={k: dict(v) for k, v in self.failed.items()})
        return out

    def missing(self, chosen: list[Item]) -> dict:
        """What an output of `chosen` would lack: megasynth.synth.workdir.missing_items of its failed items."""
        return missing_items((it.step, self.done[it.key]) for it in chosen if not self.done[it.key].ok)

    def load(self, logs: dict[str, RecordLog]) -> None:
        """self.done from the record logs (a name of log_names() -> its log), on_record() seeing the kept ones; then
        self.items, the plan."""
        self._logs = logs
        self.done = {}
        for name, log in self._logs.items():
            kept: dict[str, dict] | None = {} if name in self.kept_logs else None
            self.done.update(load_finished(log, keep=kept))
            for record in (kept or {}).values():
                self.on_record(record)
        self.items = self.plan()

    def _add(self, record: dict) -> None:
        name = self.logs[record["step"]]
        offset = self._logs[name].append(record)
        self.done[record["key"]] = finished_from(offset, record)
        if name in self.kept_logs:
            self.on_record(record)

    def generate(self, wd: WorkDir, settings: LLMSettings) -> tuple[dict, bool]:
        """Load the records in `wd` and ask for every pending item, wave by wave, through one client (its ledger in
        `wd`); returns (the ledger summary, whether the budget stopped it)."""
        self.load({name: wd.log(name) for name in self.log_names()})
        return asyncio.run(self._generate(settings, wd.path / LEDGER))

    async def _generate(self, settings: LLMSettings, ledger: Path) -> tuple[dict, bool]:
        asked: set[str] = set()

        async def visit(batch, item: Item) -> None:
            if self.pending(item):
                await batch.submit(LLMRequest(key=item.key, meta=item, **self.request(item)))
            elif self.done[item.key].ok:
                for follow in self.follow_ups(item):
                    await visit(batch, follow)

        async def on_result(request: LLMRequest, result: LLMResult) -> None:
            item: Item = request.meta
            record = {"key": item.key, "doc": item.doc.id, "step": item.step, **item.fields, "ok": result.ok,
                      "attempts": result.attempts}
            if result.ok:
                record.update(self.reply(item, result))
            else:
                record.update(error=result.error, detail=result.detail, transient=result.transient)
            self._add(record)  # on disk before any follow-up is sent (a resumed run finds their plan)
            if result.ok:
                for follow in self.follow_ups(item):
                    await visit(batch, follow)

        # The output tokenizer counts replies against max_tokens: a longer reply is cut.
        async with LLMClient(settings, ledger_path=ledger, seed=self.cfg.seed, tokenizer=self.tokenizer) as client:
            try:
                while wave := self.wave(asked):
                    async with client.batch(on_result, progress=self.label if self.cfg.progress else False) as batch:
                        for item in wave:
                            asked.add(item.key)
                            await visit(batch, item)
            except BudgetExceeded:
                return client.summary(), True
            return client.summary(), False

    def _outputs(self, chosen: list[Item]) -> Iterator[SyntheticDoc]:
        for item in sorted(chosen, key=self.order):
            done = self.done[item.key]
            if not done.ok:
                self.failed[item.step][done.error] += 1
                continue
            yield from self.documents(item)
