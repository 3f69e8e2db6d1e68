"""Synthesis as independent workers (megasynth.work_units; docs/cluster.md): units are the shards of a --num-docs
run, each worker samples its shards with any backend, and publish assembles the prefix and provenance in shard
order: the bytes of a one-process run with the same settings (for a deterministic backend).

    out = synthesize_units("runs/synth", "data/real", "data/synthetic", SynthSettings(num_docs=10**7),
                           worker=Worker(3, 64), work_dir="data/synthetic.work")
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch

from megasynth.cli import prefix as prefix_spec
from megasynth.data.prefix import idx_path
from megasynth.run_lock import acquire_path_lock
from megasynth.synth.corpus import check_output_prefix
from megasynth.synth.sbp.shards import ShardStore
from megasynth.synth.sbp.synthesize import (TOOL, SynthError, SynthSettings, _Run, make_sampler, prepare,
                                            publish_shards)
from megasynth.synth.sbp.vllm_sampler import VLLMSampler
from megasynth.work_units import Worker, WorkUnits, run_worker


def synthesize_units(checkpoint, corpus_prefix, output_prefix, settings: SynthSettings, *, worker: Worker,
                     work_dir, publish: str = "auto", tokenizer=None, overwrite: bool = False, device="cpu",
                     dtype: torch.dtype = torch.float32, endpoint=None, prompt_format: str = "ids", separator=None,
                     vllm=None, log=None) -> dict:
    """Make this worker's shards, then publish when every shard is done (`publish`: "auto", "never" or "only",
    as megasynth.data.preprocess_units). Returns {"units", "made", "published", ...} and, from the publisher,
    the output's counts."""
    if settings.tokens is not None:
        raise SynthError("--tokens with --worker: independent workers need the number of shards up front; give "
                         "--num-docs (tools/plan_fleet.py turns a token target into documents from a calibration)")
    output_prefix, corpus_prefix = os.fspath(output_prefix), os.fspath(corpus_prefix)
    corpus, synth, settings, sep_id, record = prepare(
        checkpoint, corpus_prefix, settings, tokenizer=tokenizer, device=device, dtype=dtype, endpoint=endpoint,
        vllm=vllm, prompt_format=prompt_format, separator=separator, load_weights=publish != "only")
    units = WorkUnits(work_dir, stage="synthesize", settings=record,
                      num_units=-(-settings.num_docs // settings.shard_docs), create=publish != "only")
    out: dict = {"units": units.num_units, "made": [], "published": False}
    done = units.published()
    if done is not None and idx_path(output_prefix).is_file():
        return {**out, **done["summary"], "already_published": True}
    if publish != "only":
        ledger = Path(work_dir) / f"ledger.{socket.gethostname()}.{os.getpid()}.jsonl"
        sampler = make_sampler(synth, settings, endpoint=endpoint, vllm=vllm, prompt_format=prompt_format,
                               dtype=dtype, work_path=Path(work_dir), ledger=ledger)
        run = _Run(corpus, synth, settings, sampler, sep_id, None, progress=False)

        def make_unit(k: int, tmp: Path) -> dict:
            shard = run.sample(k)
            ShardStore(tmp).write(k, shard)
            return {"tokens": shard.num_tokens, "requested": shard.requested, "documents": int(shard.lengths.size)}

        try:
            report = run_worker(units, worker, make_unit, progress=log)
        finally:
            if isinstance(sampler, VLLMSampler):
                sampler.close()
        out["made"], out["busy"] = report.made, report.busy
        if publish == "never" or units.missing():
            return out
    units.refuse_missing()
    lock = acquire_path_lock(output_prefix, tool=TOOL, flag="--output-prefix")
    try:
        done = units.published()
        if done is not None and publish != "only":  # another worker published while we looked
            return {**out, **done["summary"], "already_published": True}
        for k in range(units.num_units):
            units.record(k)  # settings, sizes, sha256
        check_output_prefix(output_prefix, {"--corpus": prefix_spec(corpus_prefix)}, overwrite=overwrite,
                            error=SynthError)
        served_by = {} if endpoint is None else {"served_by": endpoint.base_url}
        counts = publish_shards(output_prefix, lambda k: ShardStore(units.unit_dir(k)).read(k), units.num_units,
                                synth.tokenizer, record, served_by, overwrite)
        units.mark_published(output_prefix, counts)
    finally:
        lock.release(remove=True)
    return {**out, **counts, "published": True}
