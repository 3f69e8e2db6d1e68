"""tools/synthesize.py with vLLM (issue 20): the in-process backend (--backend vllm, run by .venv-vllm's python)
and the endpoint backend against a real `vllm serve` of the export, on the base model trained here.

- --backend vllm writes a complete prefix with provenance and counts; a run killed after its second shard and
  started again reuses its export and publishes the bytes of an uninterrupted run made with other batching
  (--vllm-max-num-seqs 8 instead of all 16 samples of a shard at once, no prefix caching): per-request seeds make a
  sample independent of its batch on this CPU (docs/sbp.md says what is not promised elsewhere);
- a shard whose prompts exceed what vLLM prefills in one step completes (vLLM's CPU runner crashes on a seeded
  request it prefills in chunks; the backend turns chunked prefill off on the CPU);
- greedy (temperature 0), ours, --backend vllm and --endpoint write the same documents token for token;
- at temperature 1 the endpoint and --backend vllm draw the same samples (vLLM either way, the same per-request seeds);
  the endpoint's come back as text, so each is its vLLM twin decoded and encoded again, cut to --max-new-tokens.

The in-process runs (synth_runs.py) start with the session's servers, in two interpreters (one is killed midway),
five engine starts of a few seconds each (the engine runs in the process: docs/sbp.md); every wait is bounded.
"""

from __future__ import annotations

import hashlib
import json
import signal
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import load_tool
from synth_runs import GREEDY, LONG_SHARD, MAX_NEW, NUM_DOCS, SEED, SHARD, common
from vllm_server import MODEL_NAME

from megasynth.data.indexed import IndexedDataset
from megasynth.synth.sbp.synthesize import shard_seed_documents
from megasynth.tokenizer import load_tokenizer


@dataclass
class Runs:
    run: Path  # the base model's run directory
    corpus: str
    out: Path  # the outputs: killed (killed, then resumed), batched (other batching), greedy (temperature 0), long
    vllm_version: str


@pytest.fixture(scope="module")
def runs(vllm_models, vllm_synth_runs) -> Runs:
    result = vllm_synth_runs.wait()
    # 1. Killed (SIGKILL, by the shard fault point) right after its second of three shards.
    assert result.killed_code == -signal.SIGKILL, f"exit {result.killed_code}:\n{result.killed_log[-4000:]}"
    assert result.killed_shards == ["shard_000000.npz", "shard_000001.npz"]
    # 2. One interpreter: the same samples with other batching, greedy, the long shard, and the killed run's
    # command again (work kept to show the export was reused).
    log = result.log
    assert result.code == 0 and log.count("EXIT 0") == result.argvs, f"exit {result.code}:\n{log[-4000:]}"
    again = (vllm_synth_runs.killed_work / "vllm_model" / "model.safetensors").stat()
    weights = result.killed_weights
    assert (again.st_ino, again.st_mtime_ns) == (weights.st_ino, weights.st_mtime_ns), "the export was redone"
    version = next(line.split()[1] for line in log.splitlines() if line.startswith("VLLM_VERSION "))
    return Runs(vllm_models.base, str(vllm_models.base.parent / "data" / "text"), vllm_synth_runs.out, version)


def documents(prefix) -> tuple[list[list[int]], dict]:
    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))], pq.read_table(f"{prefix}.provenance.parquet").to_pydict()


def file_hashes(prefix) -> dict:
    out = {ext: hashlib.sha256(Path(f"{prefix}.{ext}").read_bytes()).hexdigest()
           for ext in ("bin", "idx", "provenance.parquet")}
    meta = json.loads(Path(f"{prefix}.json").read_text())
    meta["provenance"].pop("file")  # the output's own name
    return {**out, "json": meta}


def test_vllm_backend_writes_a_complete_prefix_with_provenance(runs):
    tok = load_tokenizer(runs.run / "tokenizer")
    docs, prov = documents(runs.out / "batched")
    meta = json.loads((runs.out / "batched.json").read_text())
    synthesis = meta["synthesis"]
    assert synthesis["settings"]["backend"] == {"kind": "vllm", "dtype": "float32", "tensor_parallel_size": 1,
                                                "vllm_version": runs.vllm_version}
    counts = synthesis["counts"]
    assert counts["requested"] == NUM_DOCS and counts["shards"] == 3
    assert counts["generated"] == len(docs) == NUM_DOCS - counts["empty_dropped"] - counts["out_of_vocab_dropped"]
    assert counts["tokens"] == sum(map(len, docs)) and len(docs) >= NUM_DOCS - 2
    # Every document ends with its one EOD; one cut at --max-new-tokens is counted as truncated.
    assert all(d[-1] == tok.eod_id and tok.eod_id not in d[:-1] and len(d) <= MAX_NEW + 1 for d in docs)
    assert counts["truncated"] == sum(len(d) == MAX_NEW + 1 for d in docs) > 0
    assert any(len(d) < MAX_NEW + 1 for d in docs)  # and some stopped at EOD on their own
    assert len({tuple(d) for d in docs}) == len(docs)  # varied samples, not one repeated
    # Provenance: the seed documents synthesize draws (per shard of SHARD), in sample order.
    ds = IndexedDataset(runs.corpus)
    candidates = np.flatnonzero(ds.sequence_lengths > 1)
    seeds = np.concatenate([shard_seed_documents(SEED, k, SHARD, candidates) for k in range(3)])[:NUM_DOCS]
    assert prov["doc"] == list(range(len(docs))) and prov["sample"] == sorted(prov["sample"])
    assert prov["seed"] == seeds[prov["sample"]].tolist()
    assert meta["provenance"]["rows"] == len(docs)


def test_a_killed_vllm_run_resumes_to_the_bytes_of_a_run_with_other_batching(runs):
    assert file_hashes(runs.out / "killed") == file_hashes(runs.out / "batched")


def test_a_shard_of_more_prompt_tokens_than_one_prefill_step_completes(runs):
    # vLLM's CPU runner kills its engine when it prefills a seeded request in chunks (it rewinds the request's
    # generator by an offset, which CPU generators lack); the backend turns chunked prefill off on the CPU.
    counts = json.loads((runs.out / "long.json").read_text())["synthesis"]["counts"]
    assert counts["requested"] == int(LONG_SHARD) and counts["shards"] == 1
    assert len(documents(runs.out / "long")[0]) == counts["generated"] >= int(LONG_SHARD) - 4
    ds = IndexedDataset(runs.corpus)
    max_seed = 128 - 1 - MAX_NEW  # the default: what --max-new-tokens leaves of max_seq_len 128
    candidates = np.flatnonzero(ds.sequence_lengths > 1)
    seeds = shard_seed_documents(SEED, 0, int(LONG_SHARD), candidates)
    assert sum(min(int(ds.sequence_lengths[s]) - 1, max_seed) + 1 for s in seeds) > 4096


def test_greedy_documents_agree_across_ours_vllm_and_the_server(runs, vllm_base_server, tmp_path):
    tool = load_tool("synthesize")
    assert tool.main(common(runs.run, runs.corpus, tmp_path / "ours", *GREEDY, "--device", "cpu")) == 0
    endpoint = ("--endpoint", f"{vllm_base_server.base_url}/v1", "--served-model", MODEL_NAME)
    assert tool.main(common(runs.run, runs.corpus, tmp_path / "served", *GREEDY, *endpoint)) == 0
    ours, prov = documents(tmp_path / "ours")
    vllm_docs, vllm_prov = documents(runs.out / "greedy")
    served, served_prov = documents(tmp_path / "served")
    assert prov == vllm_prov == served_prov
    # Different prompts, different continuations (the corpus holds each of its 13 texts 4 times).
    ds = IndexedDataset(runs.corpus)
    prompts = {tuple(ds[seed].tolist()[:-1]) for seed in prov["seed"]}
    assert len(prompts) > 8 and len({tuple(d) for d in ours}) >= len(prompts) - 2
    problems = [f"sample {s}: ours {a}\n  vLLM {b}\n  server {c}"
                for s, a, b, c in zip(prov["sample"], ours, vllm_docs, served) if not a == b == c]
    assert not problems, "\n".join(problems)


def test_endpoint_against_vllm_serve_draws_the_vllm_backends_samples(runs, vllm_base_server, tmp_path):
    url = f"{vllm_base_server.base_url}/v1"
    out = tmp_path / "served"
    code = load_tool("synthesize").main(common(runs.run, runs.corpus, out, "--endpoint", url,
                                               "--served-model", MODEL_NAME))
    assert code == 0
    tok = load_tokenizer(runs.run / "tokenizer")
    served, prov = documents(out)
    meta = json.loads(Path(f"{out}.json").read_text())["synthesis"]
    # The URL is where it was served, not a setting: a rerun against another server of the model resumes.
    assert meta["settings"]["backend"] == {"kind": "endpoint", "served_model": MODEL_NAME, "prompt_format": "ids"}
    assert meta["served_by"] == url and meta["counts"]["requested"] == NUM_DOCS
    twins, twin_prov = documents(runs.out / "batched")
    assert prov == twin_prov
    for sample, doc, twin in zip(prov["sample"], served, twins):
        body, twin_body = doc[:-1], twin[:-1]
        # The reply is text: a byte token that is no UTF-8 on its own comes back as U+FFFD, 3 tokens.
        assert body == tok.encode(tok.decode(twin_body))[:MAX_NEW], f"sample {sample}: {body} vs vLLM {twin_body}"
