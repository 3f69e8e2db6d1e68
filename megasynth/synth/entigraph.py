"""EntiGraph (Yang et al., "Synthetic continued pretraining", ICLR 2025) as a method on the LLM-pipeline runner:
entities per document, then how pairs and triples of them relate. The library behind tools/entigraph.py.

    out = run_entigraph(EntiGraphConfig(input="docs.jsonl", work_dir="W", output_prefix="data/eg",
                                        tokenizer="tok/", llm=LLMSettings(base_url=..., model=...)))

The steps, the records and the output order: docs/synth.md, "EntiGraph"."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa

from megasynth.synth.llm.prompts import load_prompt
from megasynth.synth.llm.runner import Item, LLMPipeline, PipelineConfig
from megasynth.synth.llm.runner_units import WorkerRun
from megasynth.synth.synthetic_prefix import SyntheticDoc
from megasynth.synth.workdir import derive_seed, request_key

ENTITIES_LOG = "entities.jsonl"
RELATIONS_LOG = "relations.jsonl"
STEPS = ("summary", "entity", "pair", "triple")  # the order of a document's outputs in the prefix

# Bounds a real model never meets ("one or two paragraphs", "a short name"); under schema-constrained decoding they
# are what ends a reply that would otherwise run on to max_tokens (a small or confused model) and fail as cut JSON.
SUMMARY_MAX_CHARS = 2000
ENTITY_MAX_CHARS = 100
ENTITIES_SCHEMA = {
    "title": "entigraph_entities",
    "type": "object",
    "required": ["summary", "entities"],
    "properties": {"summary": {"type": "string", "minLength": 1, "maxLength": SUMMARY_MAX_CHARS},
                   "entities": {"type": "array", "items": {"type": "string", "maxLength": ENTITY_MAX_CHARS}}},
}


def entities_schema(max_entities: int | None) -> dict:
    """ENTITIES_SCHEMA, its list capped at max_entities items when given."""
    if max_entities is None:
        return ENTITIES_SCHEMA
    entities = {**ENTITIES_SCHEMA["properties"]["entities"], "maxItems": max_entities}
    return {**ENTITIES_SCHEMA, "properties": {**ENTITIES_SCHEMA["properties"], "entities": entities}}


@dataclass
class EntiGraphConfig(PipelineConfig):
    """One EntiGraph run; tools/entigraph.py builds it from its flags."""

    max_pairs_per_doc: int | None = None
    """Most entity pairs per document (a seeded sample); None: every pair, as in the paper."""
    max_triples_per_doc: int = 20
    """Most entity triples per document (a seeded sample); 0: none."""
    include_summaries: bool = False
    """Also write each document's summary (step 1) as a synthetic document."""
    entity_questions: bool = False
    """Also the single-entity step: per entity, a description and questions with answers about it."""
    max_entities: int | None = None
    """Most entities per document: the entity step's schema caps its list (a schema-constrained server cannot
    exceed it; a longer list from another gets a repair request). None: no cap, as in the paper."""

    def __post_init__(self):
        if self.max_entities is not None and self.max_entities < 1:
            raise ValueError(f"max_entities must be >= 1 (or None), got {self.max_entities}")


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


def sample_combinations(n: int, k: int, limit: int | None, *seed_parts: str | int) -> list[tuple[int, ...]]:
    """k-subsets of range(n): all of them when limit is None or they are at most limit, else `limit` of them
    drawn without replacement, seeded by derive_seed(*seed_parts); in lexicographic order either way.

    Floyd's algorithm draws the ranks without listing all C(n, k) subsets, using only random.random(), whose
    sequence for a given int seed Python promises to keep across versions."""
    total = math.comb(n, k)
    if limit is None or total <= limit:
        return list(itertools.combinations(range(n), k))
    rng = random.Random(derive_seed(*seed_parts, bits=64))
    chosen: set[int] = set()
    for j in range(total - limit, total):
        t = min(int(rng.random() * (j + 1)), j)  # uniform in [0, j]
        chosen.add(j if t in chosen else t)
    return [unrank_combination(n, k, r) for r in sorted(chosen)]


def _check_summary(value: dict) -> str | None:
    return None if value["summary"].strip() else "the summary is blank"


# -- the method --------------------------------------------------------------------------------------------------
class EntiGraph(LLMPipeline):
    name = "entigraph"
    logs = {"entities": ENTITIES_LOG, "entity": RELATIONS_LOG, "pair": RELATIONS_LOG, "triple": RELATIONS_LOG}
    kept_logs = (ENTITIES_LOG,)
    columns = {"source_id": pa.string(), "source_index": pa.int64(), "step": pa.string(),
               "entities": pa.list_(pa.string()), "key": pa.string()}

    def __init__(self, cfg: EntiGraphConfig):
        names = ["entigraph_entities", "entigraph_pair", "entigraph_triple"]
        if cfg.entity_questions:
            names.append("entigraph_entity")
        super().__init__(cfg, [load_prompt(name) for name in names])
        self.templates = {p.name.removeprefix("entigraph_"): p for p in self.prompts}
        self.failure_steps = ("entities", "entity", "pair", "triple") if cfg.entity_questions else \
            ("entities", "pair", "triple")
        self.entities_schema = entities_schema(cfg.max_entities)
        self.entity_records: dict[str, dict] = {}  # the final entities record of each document, by key
        self.tally: Counter = Counter()

    def settings(self) -> dict:
        cfg = self.cfg
        more = {"entity_questions": True} if cfg.entity_questions else {}  # absent when off: older work dirs match
        if cfg.max_entities is not None:
            more["max_entities"] = cfg.max_entities
        return {"seed": cfg.seed, "max_pairs_per_doc": cfg.max_pairs_per_doc,
                "max_triples_per_doc": cfg.max_triples_per_doc, **more}

    def publish_settings(self) -> dict:
        return {"include_summaries": self.cfg.include_summaries}

    def plan(self) -> list[Item]:
        return [Item(request_key(doc.id, "entities"), doc, "entities") for doc in self.docs]

    def request(self, item: Item) -> dict:
        doc, names = item.doc, item.fields.get("entities", [])
        values = {"title": doc.display_title, "text": doc.text}
        if item.step == "entities":
            return {"messages": self.templates["entities"].messages(**values), "schema": self.entities_schema,
                    "validate": _check_summary}
        if item.step == "entity":
            values["entity"] = names[0]
        else:
            values.update(zip(("entity_a", "entity_b", "entity_c"), names))
        return {"messages": self.templates[item.step].messages(**values)}

    def reply(self, item: Item, result) -> dict:
        if item.step != "entities":
            return super().reply(item, result)
        names = normalise_entities(result.parsed["entities"])
        pairs = sample_combinations(len(names), 2, self.cfg.max_pairs_per_doc, self.cfg.seed, item.doc.id, "pair")
        triples = sample_combinations(len(names), 3, self.cfg.max_triples_per_doc, self.cfg.seed, item.doc.id,
                                      "triple")
        return {"summary": result.parsed["summary"].strip(), "entities": names,
                "pair": [list(p) for p in pairs], "triple": [list(t) for t in triples]}

    def on_record(self, record: dict) -> None:
        self.entity_records[record["key"]] = record

    def follow_ups(self, item: Item) -> list[Item]:
        if item.step != "entities":
            return []
        record = self.entity_records[item.key]
        names = record["entities"]
        combos = [("entity", [i]) for i in range(len(names))] if self.cfg.entity_questions else []
        combos += [(step, combo) for step in ("pair", "triple") for combo in record[step]]
        items = []
        for step, combo in combos:
            ents = [names[i] for i in combo]
            items.append(Item(request_key(item.doc.id, step, *ents), item.doc, step, {"entities": ents}))
        return items

    def order(self, item: Item) -> tuple:
        return item.doc.index, STEPS.index("summary" if item.step == "entities" else item.step), item.key

    def documents(self, item: Item) -> Iterator[SyntheticDoc]:
        if item.step != "entities":
            yield from super().documents(item)
            return
        record = self.entity_records[item.key]
        self.tally["entities"] += len(record["entities"])
        self.tally["documents_without_entities"] += not record["entities"]
        if self.cfg.include_summaries:
            self.tally["summaries"] += 1
            yield self.output(item, record["summary"], step="summary", entities=[])

    def counts(self) -> dict:
        def made(step: str) -> int:
            return self.planned[step] - sum(self.failed[step].values())

        out = {"documents": self.planned["entities"],
               **{k: int(self.tally[k]) for k in ("documents_without_entities", "entities", "summaries")}}
        if self.cfg.entity_questions:
            out.update(entity_questions_planned=self.planned["entity"], entity_questions=made("entity"))
        out.update(pairs_planned=self.planned["pair"], pairs=made("pair"), triples_planned=self.planned["triple"],
                   triples=made("triple"))
        return {**out, "failed": {step: dict(sorted(c.items())) for step, c in self.failed.items()}}

    def nothing_written(self) -> str:
        return f"no relation text and no summary succeeded (failed: {self.counts()['failed']})"


def run_entigraph(cfg: EntiGraphConfig, workers: WorkerRun | None = None) -> dict:
    """Generate what is missing, then write the prefix; returns and raises as LLMPipeline.run (with `workers`, as
    one of independent workers: megasynth.synth.llm.runner_units)."""
    return EntiGraph(cfg).run(workers)
