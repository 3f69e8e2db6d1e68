"""tools/synthesize.py with vLLM (issue 20): the in-process backend (--backend vllm, run by .venv-vllm's python)
and the endpoint backend against a real `vllm serve` of the export, on the base model trained here.

- --backend vllm writes a complete prefix with provenance and counts; a run killed after its second shard and
  started again reuses its export and publishes the bytes of an uninterrupted run made with other batching
  (--vllm-max-num-seqs 3, no prefix caching): per-request seeds make a sample independent of its batch on this
  CPU (docs/sbp.md says what is not promised elsewhere);
- a shard whose prompts exceed what vLLM prefills in one step completes (vLLM's CPU runner crashes on a seeded
  request it prefills in chunks; the backend turns chunked prefill off on the CPU);
- greedy (temperature 0), ours, --backend vllm and --endpoint write the same documents token for token;
- at temperature 1 the endpoint and --backend vllm draw the same samples (vLLM either way, the same per-request seeds);
  the endpoint's come back as text, so each is its vLLM twin decoded and encoded again, cut to --max-new-tokens.

The in-process runs cost two interpreter starts (one is killed midway) and five engine starts of a few seconds
each (the engine runs in the process: docs/sbp.md); every wait is bounded.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import load_tool
from vllm_server import MODEL_NAME, REPO

from megasynth.data.indexed import IndexedDataset
from megasynth.synth.sbp.shards import FAULT_ENV
from megasynth.synth.sbp.synthesize import shard_seed_documents
from megasynth.tokenizer import load_tokenizer

NUM_DOCS, SHARD, MAX_NEW, SEED = 40, 16, 48, 5  # 3 shards
LONG_SHARD = "140"  # samples whose prompts exceed the 4,096 tokens vLLM prefills in one step by default
RUN_TIMEOUT = float(os.environ.get("MEGASYNTH_VLLM_START_TIMEOUT", 420)) + 180
# Runs tools/synthesize.py's main() for each argv of a JSON list in one interpreter (vLLM is imported once).
DRIVER = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("synthesize_tool", sys.argv[1])
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)
for argv in json.loads(sys.argv[2]):
    code = tool.main(argv)
    print("EXIT", code, flush=True)
    if code:
        sys.exit(code)
import vllm
print("VLLM_VERSION", vllm.__version__, flush=True)
"""


@dataclass
class Runs:
    run: Path  # the base model's run directory
    corpus: str
    out: Path  # the outputs: killed (killed, then resumed), batched (other batching), greedy (temperature 0)
    vllm_version: str


def common(run, corpus, out, *extra) -> list[str]:
    return ["--checkpoint", str(run), "--corpus", corpus, "--output-prefix", str(out), "--num-docs", str(NUM_DOCS),
            "--shard-docs", str(SHARD), "--max-new-tokens", str(MAX_NEW), "--seed", str(SEED), "--no-progress",
            *map(str, extra)]


def vllm_args(run, corpus, out, *extra) -> list[str]:
    return common(run, corpus, out, "--backend", "vllm", "--vllm-enforce-eager", "--vllm-kv-cache-gib", "1", *extra)


def drive(python: Path, argvs: list[list[str]], log: Path, **env) -> tuple[int, str]:
    """(exit code, log text) of DRIVER over argvs in a fresh vLLM-venv interpreter, killed (its process group)
    after RUN_TIMEOUT."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **env}
    env.pop("TRITON_INTERPRET", None)  # tests/conftest.py's, for our kernels; not vLLM's business
    with open(log, "wb") as f:
        proc = subprocess.Popen([str(python), "-c", DRIVER, str(REPO / "tools" / "synthesize.py"), json.dumps(argvs)],
                                stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            code = f"timed out after {RUN_TIMEOUT:.0f} s"
    return code, log.read_text(errors="replace")


@pytest.fixture(scope="module")
def runs(vllm_python, vllm_models, tmp_path_factory) -> Runs:
    run = vllm_models.base
    corpus = str(run.parent / "data" / "text")  # the corpus vllm_models.build_models trained it on
    out = tmp_path_factory.mktemp("vllm_synth")
    killed = out / "killed"
    work = Path(f"{killed}.work")
    # 1. Killed (SIGKILL, by the shard fault point) right after its second of three shards.
    code, log = drive(vllm_python, [vllm_args(run, corpus, killed)], out / "killed.log", **{FAULT_ENV: "shard:1"})
    assert code == -signal.SIGKILL, f"exit {code}:\n{log[-4000:]}"
    assert sorted(p.name for p in work.glob("shard_*.npz")) == ["shard_000000.npz", "shard_000001.npz"]
    weights = (work / "vllm_model" / "model.safetensors").stat()
    # 2. One interpreter: the same command again (work kept to show the export was reused), the same samples with
    # other batching, and greedy.
    argvs = [vllm_args(run, corpus, killed, "--keep-work"),
             vllm_args(run, corpus, out / "batched", "--vllm-max-num-seqs", "3", "--no-vllm-prefix-caching"),
             vllm_args(run, corpus, out / "greedy", "--temperature", "0"),
             vllm_args(run, corpus, out / "long", "--num-docs", LONG_SHARD, "--shard-docs", LONG_SHARD)]
    code, log = drive(vllm_python, argvs, out / "runs.log")
    assert code == 0 and log.count("EXIT 0") == len(argvs), f"exit {code}:\n{log[-4000:]}"
    again = (work / "vllm_model" / "model.safetensors").stat()
    assert (again.st_ino, again.st_mtime_ns) == (weights.st_ino, weights.st_mtime_ns), "the export was redone"
    version = next(line.split()[1] for line in log.splitlines() if line.startswith("VLLM_VERSION "))
    return Runs(run, corpus, out, version)


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
    greedy = ("--temperature", "0")
    assert tool.main(common(runs.run, runs.corpus, tmp_path / "ours", *greedy, "--device", "cpu")) == 0
    endpoint = ("--endpoint", f"{vllm_base_server.base_url}/v1", "--served-model", MODEL_NAME)
    assert tool.main(common(runs.run, runs.corpus, tmp_path / "served", *greedy, *endpoint)) == 0
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
