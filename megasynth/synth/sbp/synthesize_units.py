"""Synthesis as independent workers (megasynth.work_units; docs/cluster.md): units are the shards of the run, each
worker samples shards with any backend, and publish assembles the prefix and provenance in shard order: the bytes
of a one-process run with the same settings (for a deterministic backend).

    out = synthesize_units("runs/synth", "data/real", "data/synthetic", SynthSettings(num_docs=10**7),
                           worker=Worker(3, 64), work_dir="data/synthetic.work")

With --num-docs the shards are one fixed list (WORK/units/). With --tokens T they come in rounds of ROUND_SHARDS
shards (WORK/r0000/, r0001/, ...): every worker helps finish a round, and once it is complete the shards' token
counts say whether another is needed; the output is shards 0..m, m the first at which the total reaches T, as in a
one-process run. The rounds do not depend on the number of workers, so neither does the output; a round's shards
past m are made and not used.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import torch

from megasynth.cli import prefix as prefix_spec
from megasynth.data.prefix import check_output_prefix, idx_path
from megasynth.synth.sbp.shards import ShardStore
from megasynth.synth.sbp.synthesize import (_ZERO_ROUNDS, TOOL, SynthError, SynthSettings, _Run, make_sampler,
                                            prepare, publish_shards)
from megasynth.work_units import Worker, WorkUnits, make_then_check, publishing, run_worker

ROUND_SHARDS = 8  # --tokens: shards per round (a constant: the rounds, so the output, do not depend on the workers)
WAIT_S = 2.0  # --tokens: how often a worker looks whether the shards other live workers hold are done


def synthesize_units(checkpoint, corpus_prefix, output_prefix, settings: SynthSettings, *, worker: Worker,
                     work_dir, publish: str = "auto", tokenizer=None, overwrite: bool = False, device="cpu",
                     dtype: torch.dtype = torch.float32, endpoint=None, prompt_format: str = "ids", separator=None,
                     vllm=None, log=None) -> dict:
    """Make this worker's shards, then publish when every shard is done (`publish`: "auto", "never" or "only",
    as megasynth.data.preprocess_units). Returns {"units", "made", "published", ...} and, from the publisher,
    the output's counts."""
    output_prefix, corpus_prefix = os.fspath(output_prefix), os.fspath(corpus_prefix)
    corpus, synth, settings, sep_id, record = prepare(
        checkpoint, corpus_prefix, settings, tokenizer=tokenizer, device=device, dtype=dtype, endpoint=endpoint,
        vllm=vllm, prompt_format=prompt_format, separator=separator, load_weights=publish != "only")
    create = publish != "only"
    if settings.num_docs is not None:
        first = WorkUnits(Path(work_dir), stage="synthesize", settings=record,
                          num_units=-(-settings.num_docs // settings.shard_docs), create=create)
    else:
        first = _round(work_dir, record, 0, create)
    out: dict = {"units": first.num_units, "made": [], "published": False}
    done = first.published(idx_path(output_prefix))  # the publisher marks the first (or only) unit list
    if done is not None:
        return {**out, **done["summary"], "already_published": True}
    run = None
    if publish != "only":
        ledger = Path(work_dir) / f"ledger.{socket.gethostname()}.{os.getpid()}.jsonl"
        sampler = make_sampler(synth, settings, endpoint=endpoint, vllm=vllm, prompt_format=prompt_format,
                               dtype=dtype, work_path=Path(work_dir), ledger=ledger)
        run = _Run(corpus, synth, settings, sampler, sep_id, None, progress=False)

    def make_shard(k: int, tmp: Path) -> dict:
        shard = run.sample(k)
        ShardStore(tmp).write(k, shard)
        return {"tokens": shard.num_tokens, "requested": shard.requested, "documents": int(shard.lengths.size)}

    try:
        if settings.num_docs is not None:
            if not make_then_check(first, worker, make_shard, publish, out, log=log):
                return out
            lists, num_shards = [first], first.num_units
        else:
            lists, num_shards = _token_rounds(first, work_dir, record, settings.tokens, worker, make_shard, publish,
                                              out, log)
            out["units"] = num_shards
            if publish == "never":
                return out
    finally:
        if run is not None:
            run.close()

    # Shard k -> (its unit list, its unit there): the one list of a --num-docs run, or round k // ROUND_SHARDS.
    places = [(lists[k // lists[0].num_units], k % lists[0].num_units) for k in range(num_shards)]

    with publishing(first, output_prefix, idx_path(output_prefix), tool=TOOL, flag="--output-prefix",
                    publish=publish) as turn:
        if turn != "publish":  # another worker is publishing, or published while we looked
            return out if turn == "busy" else {**out, **first.published()["summary"], "already_published": True}
        for units, j in places:
            units.record(j)  # settings, sizes, sha256
        check_output_prefix(output_prefix, {"--corpus": prefix_spec(corpus_prefix)}, overwrite=overwrite,
                            error=SynthError)
        counts = publish_shards(output_prefix, lambda k: ShardStore(places[k][0].unit_dir(places[k][1])).read(k),
                                num_shards, synth.tokenizer, record, endpoint, overwrite)
        first.mark_published(output_prefix, counts)
    return {**out, **counts, "published": True}


def _round(work_dir, record: dict, r: int, create: bool) -> WorkUnits:
    return WorkUnits(Path(work_dir) / f"r{r:04d}", stage="synthesize",
                     settings={**record, "round": r, "round_shards": ROUND_SHARDS}, num_units=ROUND_SHARDS,
                     create=create)


def _token_rounds(first: WorkUnits, work_dir, record: dict, tokens: int, worker: Worker, make_shard, publish: str,
                  out: dict, log) -> tuple[list[WorkUnits], int]:
    """Finish round after round until the shards' tokens reach `tokens`; (every round's units, the number of shards
    of the output). A round another live worker still works on is waited for; publish="only"
    makes nothing and refuses an unfinished round, naming its missing shards."""
    lists, total, empty_rounds, r = [], 0, 0, 0
    while True:
        units = first if r == 0 else _round(work_dir, record, r, publish != "only")
        start = r * ROUND_SHARDS
        lists.append(units)
        while publish != "only" and units.missing():
            report = run_worker(units, worker, lambda j, tmp, start=start: make_shard(start + j, tmp), progress=log)
            out["made"] += [start + j for j in report.made]
            if units.missing():
                time.sleep(WAIT_S)  # held by live workers: wait for them (or for their locks, if they die)
        units.refuse_missing()
        counts = [units.record(j, verify=False)["counts"]["tokens"] for j in range(ROUND_SHARDS)]
        for j, c in enumerate(counts):
            total += c
            if total >= tokens:
                return lists, start + j + 1
        empty_rounds = empty_rounds + 1 if sum(counts) == 0 else 0
        if empty_rounds * ROUND_SHARDS >= _ZERO_ROUNDS:
            raise SynthError(f"shards {start + ROUND_SHARDS - empty_rounds * ROUND_SHARDS}..{start + ROUND_SHARDS - 1}"
                             " produced no token (every output empty): is the checkpoint a tuned synthesizer?")
        r += 1
