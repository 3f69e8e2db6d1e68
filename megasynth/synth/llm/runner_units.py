"""An LLM method (megasynth.synth.llm.runner) run as independent workers over work units (megasynth.work_units,
issue 21): the tools' --worker I/N, --publish and --no-publish.

    out = EntiGraph(cfg).run(WorkerRun(Worker.parse("1/3")))              # make units; publish if the last
    out = EntiGraph(cfg).run(WorkerRun(Worker(), publish="only"))          # publish, or name the missing units

A unit is a slice of `unit_docs` source documents in input order (known from the input and that setting alone).
Making one is a run of the method over its documents with the unit's own record logs and ledger, kept in the
unit's scratch directory, so a worker killed mid-unit loses no finished request: the next worker to take the unit
resumes it and asks only for what has no record. The unit is published (its logs and ledger copied into it, the
ledger's summary in its record) under the rule a single run publishes by: every item has a record and none failed,
or `allow_partial`. Otherwise (a budget stop, failed items) it stays unpublished with its scratch, and the worker
goes on with other units. Budgets are split evenly over the units: each unit's ledger may spend budget / units.
Publishing loads every unit's records as one run's and writes the output exactly as a single run does, from the
records, in the method's order (docs/synth.md, "Workers").
"""

from __future__ import annotations

import bisect
import dataclasses
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from megasynth.cli import LLM_UNIT_DOCS
from megasynth.data.indexed import check_output_free
from megasynth.data.prefix import idx_path
from megasynth.data.readers import InputError
from megasynth.synth.llm.runner import LEDGER, LLMPipeline
from megasynth.synth.workdir import RecordLog, WorkDir, refuse_overlapping_paths
from megasynth.work_units import UnitDeferred, Worker, WorkUnits, WorkUnitsError, publishing, run_worker

PUBLISH_MODES = ("auto", "never", "only")


@dataclass(frozen=True)
class WorkerRun:
    """How this process takes part in a run split into work units."""

    worker: Worker = field(default_factory=Worker)
    """Which worker this is (--worker I/N): its own units first, then any other one no live worker holds."""
    publish: str = "auto"
    """auto: publish once this worker finds every unit done; never: only make units; only: make none, publish or
    refuse naming the missing units."""
    unit_docs: int = LLM_UNIT_DOCS
    """Source documents per unit, in input order; part of the work directory's settings."""
    log: Callable[[str], None] | None = None
    """Where a line goes as each unit is published or left unpublished (None: nowhere)."""

    def __post_init__(self):
        if self.publish not in PUBLISH_MODES:
            raise ValueError(f"publish must be one of {', '.join(PUBLISH_MODES)}, got {self.publish!r}")
        if self.unit_docs < 1:
            raise ValueError(f"--unit-docs must be >= 1, got {self.unit_docs}")


class UnitNotFinished(UnitDeferred):
    """A unit this worker could not finish (its records stay in its scratch directory, for a later worker)."""

    def __init__(self, unit: int, why: str, missing: dict | None = None):
        super().__init__(unit, why)
        self.missing = missing or {}


def add_counts(total: dict, more: dict) -> dict:
    """`more`'s counts added into `total`, nested dicts key by key (ledger summaries, missing items)."""
    for key, value in more.items():
        if isinstance(value, dict):
            add_counts(total.setdefault(key, {}), value)
        else:
            total[key] = total.get(key, 0) + value
    return total


def merge_summaries(summaries: list[dict]) -> dict:
    """The ledger summary (megasynth.synth.llm.ledger.Ledger.summary) of the units' ledgers taken together: counts
    added, failure reasons merged, the cost summed and rounded as one ledger's."""
    total: dict = {}
    for summary in summaries:
        add_counts(total, summary)
    return {k: dict(sorted(v.items())) if isinstance(v, dict) else round(v, 6) if isinstance(v, float) else v
            for k, v in total.items()}


class ConcatLog:
    """The same record log of every unit read as one: RecordLog's load() and read_at(), with offsets counted over
    the files end to end (so megasynth.synth.workdir.load_finished and the runner's record() take it as is)."""

    def __init__(self, paths: list[Path]):
        self._logs = [RecordLog(p) for p in paths]
        self._starts, start = [], 0
        for path in paths:
            self._starts.append(start)
            start += path.stat().st_size

    def load(self) -> Iterator[tuple[int, dict]]:
        for start, log in zip(self._starts, self._logs):
            for offset, record in log.load():
                yield start + offset, record

    def read_at(self, offset: int) -> dict:
        i = bisect.bisect_right(self._starts, offset) - 1  # the last file starting there: empty ones hold nothing
        return self._logs[i].read_at(offset - self._starts[i])

    def close(self) -> None:
        for log in self._logs:
            log.close()


def run_units(pipeline: LLMPipeline, run: WorkerRun) -> dict:
    """Make this worker's units (then others no live worker holds), then publish when every unit is done (as
    run.publish says). Returns {"units", "worker", "publish", "made", "busy", "passed": {"budget" | "failed" |
    "incomplete": the units left unpublished for that reason}, "passed_missing": the failed items of the "failed"
    ones (as run()'s "missing"), "budget": each unit's share}; with "already_published": True when the output was
    published before; and, when this call published (or found publishing refused for failed items), what
    LLMPipeline.run returns, plus "published"."""
    cfg = pipeline.cfg
    refuse_overlapping_paths(cfg)
    manifest = pipeline.prepare()
    refusal = pipeline.units_refusal()
    if refusal:
        raise InputError(refusal)
    docs = pipeline.docs
    bounds = [(a, min(len(docs), a + run.unit_docs)) for a in range(0, max(1, len(docs)), run.unit_docs)]
    units = WorkUnits(cfg.work_dir, stage=pipeline.name, settings={**manifest, "unit_docs": run.unit_docs},
                      num_units=len(bounds), create=run.publish != "only")
    out: dict = {"units": units.num_units, "worker": str(run.worker), "publish": run.publish, "made": [], "busy": [],
                 "passed": {}}
    if units.published(idx_path(cfg.output_prefix)) is not None and not (run.publish == "only" and cfg.overwrite):
        return {**out, "already_published": True}
    if run.publish != "only":
        check_output_free(cfg.output_prefix, overwrite=cfg.overwrite)  # before any request, as a single run
        _make_units(pipeline, units, manifest, bounds, run, out)
        if run.publish == "never" or units.missing():
            return out
    units.refuse_missing()
    with publishing(units, cfg.output_prefix, idx_path(cfg.output_prefix), tool=f"tools/{pipeline.name}.py",
                    flag="--output-prefix", publish=run.publish) as turn:
        if turn != "publish":  # another worker is publishing, or published while we looked
            return out if turn == "busy" else {**out, "already_published": True}
        check_output_free(cfg.output_prefix, overwrite=cfg.overwrite)
        pipeline.docs, pipeline.label = docs, pipeline.name
        out.update(_publish(pipeline, units, manifest))
        out["published"] = out["sidecar"] is not None
        if out["published"]:
            units.mark_published(cfg.output_prefix, {"num_documents": out["sidecar"]["num_documents"],
                                                     "num_tokens": out["sidecar"]["num_tokens"],
                                                     "counts": out["counts"]})
    return out


def _make_units(pipeline: LLMPipeline, units: WorkUnits, manifest: dict, bounds: list[tuple[int, int]],
                run: WorkerRun, out: dict) -> None:
    docs, cfg, n = pipeline.docs, pipeline.cfg, units.num_units
    # The budget split evenly over the units, each share counted over the unit's own ledger (which survives kills),
    # so that the whole run stays within the flags whatever the workers, restarts or helpers.
    tokens, usd = cfg.llm.budget_tokens, cfg.llm.budget_usd
    llm = dataclasses.replace(cfg.llm, budget_tokens=None if tokens is None else tokens // n,
                              budget_usd=None if usd is None else usd / n)
    budget = {"tokens": llm.budget_tokens, "usd": llm.budget_usd}

    def make_unit(k: int, tmp: Path) -> dict:
        first, stop = bounds[k]
        scratch = units.scratch_dir(k)
        pipeline.docs, pipeline.label = docs[first:stop], f"{pipeline.name} unit {k}"
        with WorkDir.open(scratch, pipeline=pipeline.name, settings=manifest) as wd:
            summary, budget_stopped = pipeline.generate(wd, llm)
            chosen = pipeline.chosen()
            missing = pipeline.missing(chosen) if chosen is not None else {}
        if budget_stopped:
            raise UnitNotFinished(k, "budget")
        if chosen is None:
            raise UnitNotFinished(k, "incomplete")
        if any(missing.values()) and not cfg.allow_partial:
            raise UnitNotFinished(k, "failed", missing)
        for name in [*pipeline.log_names(), LEDGER]:  # every unit holds every file (a log may have no record)
            if (scratch / name).exists():
                shutil.copyfile(scratch / name, tmp / name)
            else:
                (tmp / name).touch()
        return {"documents": [first, stop], "items": len(chosen), "missing": missing, "llm": summary,
                "budget": budget}

    report = run_worker(units, run.worker, make_unit, progress=run.log)
    passed: dict[int, UnitNotFinished] = report.deferred  # their scratch stays, for the next worker
    if run.log is not None:
        for e in passed.values():
            run.log(f"unit {e.unit} left unpublished ({e.why}); its records are kept for the next worker")
    out["made"], out["busy"], out["budget"] = report.made, report.busy, budget
    out["passed_missing"] = {}
    for k, e in sorted(passed.items()):
        out["passed"].setdefault(e.why, []).append(k)
        add_counts(out["passed_missing"], {kind: steps for kind, steps in e.missing.items() if steps})


def _publish(pipeline: LLMPipeline, units: WorkUnits, manifest: dict) -> dict:
    """Every unit's records as one run's, then the output as LLMPipeline.publish writes it."""
    n = units.num_units
    records = [units.record(k) for k in range(n)]  # settings, sizes and sha256 first
    logs = {name: ConcatLog([units.unit_dir(k) / name for k in range(n)]) for name in pipeline.log_names()}
    try:
        pipeline.load(logs)
        if pipeline.chosen() is None:
            raise WorkUnitsError(f"{units.path}: the units' records do not cover the plan (an item has none); "
                                 "remove the work dir's units/ and run the workers again")
        return pipeline.publish(manifest, merge_summaries([r["counts"]["llm"] for r in records]), False)
    finally:
        for log in logs.values():
            log.close()

