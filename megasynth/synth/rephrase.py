"""The rephrase baseline (WRAP-style, Maini et al. 2024) for EntiGraph: each source document rewritten by an LLM
in several styles; a method on the LLM-pipeline runner. The library behind tools/rephrase.py.

    out = run_rephrase(RephraseConfig(input="docs.jsonl", work_dir="W", output_prefix="data/rp",
                                      tokenizer="tok/", llm=LLMSettings(...), styles=["plain", "qa"],
                                      samples_per_doc=8, target_tokens=455_000_000))

Styles, seeds, the plan's order and the token target: docs/synth.md, "Rephrase"."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa

from megasynth.synth.llm.prompts import load_prompt
from megasynth.synth.llm.runner import Item, LLMPipeline, PipelineConfig
from megasynth.synth.llm.runner_units import WorkerRun
from megasynth.synth.synthetic_prefix import SyntheticDoc
from megasynth.synth.workdir import derive_seed, request_key

STYLES = ("plain", "encyclopedic", "qa")
RECORDS_LOG = "rephrasings.jsonl"


@dataclass
class RephraseConfig(PipelineConfig):
    """One rephrase run; tools/rephrase.py builds it from its flags."""

    styles: list[str] = field(default_factory=lambda: list(STYLES))
    """Rephrase styles, from STYLES; their order is the order of a document's outputs."""
    samples_per_doc: int = 1
    """Samples of each (document, style); with target_tokens, the most that may be drawn."""
    target_tokens: int | None = None
    """Stop at the shortest start of the plan that reaches this many output tokens; None: the whole plan."""

    def __post_init__(self):
        unknown = [s for s in self.styles if s not in STYLES]
        if unknown or not self.styles or len(set(self.styles)) != len(self.styles):
            raise ValueError(f"styles must be distinct names from {STYLES}, got {self.styles}")
        if self.samples_per_doc < 1:
            raise ValueError(f"samples_per_doc must be >= 1, got {self.samples_per_doc}")
        if self.target_tokens is not None and self.target_tokens < 1:
            raise ValueError(f"target_tokens must be >= 1, got {self.target_tokens}")


class Rephrase(LLMPipeline):
    name = "rephrase"
    logs = {"rephrase": RECORDS_LOG}
    columns = {"source_id": pa.string(), "source_index": pa.int64(), "step": pa.string(), "style": pa.string(),
               "sample": pa.int64(), "key": pa.string()}
    failure_steps = ("rephrase",)

    def __init__(self, cfg: RephraseConfig):
        super().__init__(cfg, [load_prompt(f"rephrase_{style}") for style in cfg.styles])
        self.templates = dict(zip(cfg.styles, self.prompts))
        # With a target, the output tokens (EOD included) of each ok record, counted as they are seen.
        self.kept_logs = (RECORDS_LOG,) if cfg.target_tokens is not None else ()
        self.tokens: dict[str, int] = {}
        self.by_style: Counter = Counter()

    def settings(self) -> dict:
        return {"styles": list(self.cfg.styles), "seed": self.cfg.seed}

    def publish_settings(self) -> dict:
        return {"samples_per_doc": self.cfg.samples_per_doc, "target_tokens": self.cfg.target_tokens}

    def plan(self) -> list[Item]:
        """Round-major: every (document, style) once per round, documents in input order."""
        return [Item(request_key(d.id, "rephrase", style, s), d, "rephrase", {"style": style, "sample": s})
                for s in range(self.cfg.samples_per_doc) for d in self.docs for style in self.cfg.styles]

    def request(self, item: Item) -> dict:
        messages = self.templates[item.fields["style"]].messages(title=item.doc.display_title, text=item.doc.text)
        return {"messages": messages, "sampling": {"seed": derive_seed(self.cfg.seed, item.key)}}

    def _count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, parse_special=False)) + 1  # as synthetic_prefix encodes it

    def on_record(self, record: dict) -> None:
        if record.get("ok") is True:
            self.tokens[record["key"]] = self._count(record["text"])

    def chosen(self) -> list[Item] | None:
        """The whole plan when every item has a record and there is no target; with a target, the shortest start
        of the plan whose ok items reach it, or the whole plan when it never does. None while a needed item has
        no record."""
        total, target = 0, self.cfg.target_tokens
        for i, item in enumerate(self.items):
            if item.key not in self.done:
                return None
            total += self.tokens.get(item.key, 0) if self.done[item.key].ok else 0
            if target is not None and total >= target:
                return self.items[: i + 1]
        return self.items

    def wave(self, asked: set[str]) -> list[Item]:
        """The pending items to ask for now: all of them without a target; with one, those the plan needs to
        reach it if every pending item turns out as long as the average ok one so far (the document's own length
        in tokens before there is any). None once a wave has answered every item the target needs."""
        target = self.cfg.target_tokens
        if asked and target is not None and self.chosen() is not None:
            return []
        pending = [it for it in self.items if it.key not in asked and self.pending(it)]
        if target is None or not pending:
            return pending
        known = list(self.tokens.values())
        average = sum(known) / len(known) if known else None
        wave, total = [], 0
        for it in self.items:
            if it.key in self.done and self.done[it.key].ok:
                total += self.tokens[it.key]
            elif it.key not in asked and self.pending(it):
                wave.append(it)
                total += average if average is not None else self._count(it.doc.text)
            if total >= target:
                break
        return wave

    def order(self, item: Item) -> tuple:
        return item.doc.index, self.cfg.styles.index(item.fields["style"]), item.fields["sample"]

    def documents(self, item: Item) -> Iterator[SyntheticDoc]:
        self.by_style[item.fields["style"]] += 1
        yield from super().documents(item)

    def counts(self) -> dict:
        return {"documents": len(self.docs), "items": sum(self.planned.values()),
                "rephrasings": sum(self.by_style.values()), "by_style": dict(self.by_style),
                "failed": {"rephrase": dict(sorted(self.failed["rephrase"].items()))}}

    def nothing_written(self) -> str:
        return f"every rephrasing failed ({dict(self.failed['rephrase'])})"

    def units_refusal(self) -> str | None:
        if self.cfg.target_tokens is None:
            return None
        return ("a token target (--target-tokens, --target-tokens-of) cannot be split into work units: the output is "
                "the shortest start of a plan that runs over every document round by round; run it as one process "
                "(without --worker/--publish), or give --samples-per-doc alone")


def run_rephrase(cfg: RephraseConfig, workers: WorkerRun | None = None) -> dict:
    """Generate what is missing, then write the prefix; returns and raises as LLMPipeline.run, with
    "target_reached" when it published (with `workers`, as one of independent workers:
    megasynth.synth.llm.runner_units)."""
    out = Rephrase(cfg).run(workers)
    if out.get("sidecar") is not None:
        out["target_reached"] = cfg.target_tokens is None or out["sidecar"]["num_tokens"] >= cfg.target_tokens
    return out
