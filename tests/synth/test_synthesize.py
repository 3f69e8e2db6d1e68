"""SBP stage 5 (megasynth.synth.sbp.synthesize) on a tiny real checkpoint: every document against an independent
reference (one prompt at a time, no KV cache, its own seeded stream), independence from the batch size, shards
and ranks (2 gloo ranks give the bytes of 1 process), the --tokens rule, the endpoint backend against the local
OpenAI-compatible server (scripted replies, injected faults), every rank stopping at a refusal, and bad inputs."""

import hashlib
import importlib.util
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from dist import run_on_ranks
from sbp_helpers import make_corpus, make_synthesizer, make_tokenizer
from synth.openai_server import TEST_API_KEY_ENV, Fault

from megasynth.checkpoint import load_for_inference, resolve_checkpoint
from megasynth.data.indexed import IndexedDataset
from megasynth.data.prefix import OutputExistsError
from megasynth.generate import sample_without_cache
from megasynth.run_lock import acquire_path_lock
from megasynth.synth.sbp.samplers import endpoint_seed
from megasynth.synth.llm import LLMSettings
from megasynth.synth.sbp.synthesize import SynthError, SynthSettings, shard_seed_documents, synthesize
from megasynth.synth.sbp.vllm_sampler import VLLMError, VLLMSettings
from megasynth.synth.workdir import WorkDirMismatch
from megasynth.tokenizer import TokenizerError

L1, L2 = 6, 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    tok = make_tokenizer(d / "tok")
    corpus = make_corpus(d / "data" / "real", tok)
    return tok, corpus, make_synthesizer(d / "run", tok, corpus), d


def settings(**kw):
    return SynthSettings(**{"num_docs": 24, "shard_docs": 8, "max_seed_tokens": L1, "max_new_tokens": L2,
                            "seed": 7, **kw})


def files(prefix) -> dict:
    """sha256 of every output file, and the sidecar without the table's file name (the output's own name)."""
    out = {ext: hashlib.sha256(Path(f"{prefix}.{ext}").read_bytes()).hexdigest()
           for ext in ("bin", "idx", "provenance.parquet")}
    out["json"] = json.loads(Path(f"{prefix}.json").read_text())
    assert out["json"]["provenance"].pop("file") == Path(f"{prefix}.provenance.parquet").name
    return out


def docs_and_provenance(prefix):
    ds = IndexedDataset(prefix)
    table = pq.read_table(f"{prefix}.provenance.parquet").to_pydict()
    return [ds[i].tolist() for i in range(len(ds))], table


def one_process(setup, out, **kw):
    _, corpus, run, _ = setup
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same arithmetic as each gloo rank below
    try:
        return synthesize(run, corpus, out, settings(**kw), progress=False)
    finally:
        torch.set_num_threads(threads)


def test_documents_match_an_uncached_one_by_one_reference(setup, tmp_path):
    tok, corpus, run, _ = setup
    counts = synthesize(run, corpus, tmp_path / "syn", settings(batch_size=5), progress=False)
    docs, prov = docs_and_provenance(tmp_path / "syn")
    assert counts["requested"] == 24 and counts["generated"] == len(docs)
    assert prov["doc"] == list(range(len(docs)))
    assert prov["sample"] == sorted(prov["sample"]) and set(prov["sample"]) <= set(range(24))
    # Every sample's reference: its seed document (uniform over the documents with a token besides the EOD, drawn
    # per shard of 8), without its EOD and cut, then <|sep|>; sampled one at a time, without a KV cache.
    model, _ = load_for_inference(resolve_checkpoint(run))
    ds, sep = IndexedDataset(corpus), tok.encode("<|sep|>")
    candidates = np.flatnonzero(ds.sequence_lengths > 1)
    seeds = np.concatenate([shard_seed_documents(7, k, 8, candidates) for k in range(3)])
    refs = [sample_without_cache(model, [ds[int(seed)].tolist()[:-1][:L1] + sep], max_new_tokens=L2,
                                 temperature=1.0, eod_id=tok.eod_id, seed=7, row_ids=[sample])[0]
            for sample, seed in enumerate(seeds)]
    empty = [i for i, ref in enumerate(refs) if ref[0] == tok.eod_id]
    out_of_vocab = [i for i, ref in enumerate(refs) if i not in empty and max(ref) >= tok.vocab_size]
    kept = [i for i in range(24) if i not in empty and i not in out_of_vocab]
    assert prov["sample"] == kept and prov["seed"] == seeds[kept].tolist()
    for doc, sample in zip(docs, kept):
        ref = refs[sample]
        assert doc == (ref if ref[-1] == tok.eod_id else ref + [tok.eod_id])
    assert counts["empty_dropped"] == len(empty) and counts["out_of_vocab_dropped"] == len(out_of_vocab)
    assert counts["truncated"] == sum(refs[i][-1] != tok.eod_id for i in kept)
    meta = json.loads((tmp_path / "syn.json").read_text())
    s = meta["synthesis"]["settings"]
    assert s["checkpoint"]["meta_sha256"] == hashlib.sha256(
        (resolve_checkpoint(run) / "meta.json").read_bytes()).hexdigest()
    assert s["corpus"]["idx_sha256"] == ds.idx_sha256 and s["temperature"] == 1.0 and s["seed"] == 7
    assert meta["synthesis"]["counts"]["empty_dropped"] == counts["empty_dropped"]
    table_sha = hashlib.sha256((tmp_path / "syn.provenance.parquet").read_bytes()).hexdigest()
    assert meta["provenance"]["sha256"] == table_sha
    assert not (tmp_path / "syn.work").exists()  # removed after success
    # Another batch size: the same bytes.
    synthesize(run, corpus, tmp_path / "syn2", settings(batch_size=24), progress=False)
    assert files(tmp_path / "syn2") == files(tmp_path / "syn")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        synthesize(run, corpus, tmp_path / "syn", settings(), progress=False)


def test_tokens_target_takes_whole_shards_until_reached(setup, tmp_path):
    _, corpus, run, _ = setup
    counts = synthesize(run, corpus, tmp_path / "t", settings(num_docs=None, tokens=150), progress=False)
    k = counts["shards"]
    # The same samples as --num-docs k * shard_docs (a shard does not depend on how much is asked for) ...
    synthesize(run, corpus, tmp_path / "n", settings(num_docs=k * 8), progress=False)
    assert docs_and_provenance(tmp_path / "t") == docs_and_provenance(tmp_path / "n")
    # ... and k is the first shard count whose tokens reach T.
    ds, table = IndexedDataset(tmp_path / "t"), pq.read_table(f"{tmp_path / 't'}.provenance.parquet").to_pydict()
    per_shard = np.bincount(np.array(table["sample"]) // 8, weights=ds.sequence_lengths, minlength=k)
    assert per_shard.sum() >= 150 > per_shard[:-1].sum() and counts["tokens"] == ds.num_tokens


def _ranks_body(run, corpus, out_dir):
    from megasynth.synth.sbp.synthesize import SynthSettings, synthesize  # noqa: PLC0415

    for name, kw in (("n", {"num_docs": 20}), ("t", {"tokens": 150})):
        synthesize(run, corpus, f"{out_dir}/{name}", SynthSettings(**{"shard_docs": 8, "max_seed_tokens": L1,
                                                                       "max_new_tokens": L2, "seed": 7, **kw}),
                   progress=False)
    return "done"


def test_two_gloo_ranks_write_the_bytes_of_one_process(setup, tmp_path):
    _, corpus, run, _ = setup
    assert run_on_ranks(_ranks_body, 2, str(run), corpus, str(tmp_path / "ranks"), timeout=240) == ["done", "done"]
    one_process(setup, tmp_path / "one" / "n", num_docs=20)
    one_process(setup, tmp_path / "one" / "t", num_docs=None, tokens=150)
    for name in ("n", "t"):
        assert files(tmp_path / "ranks" / name) == files(tmp_path / "one" / name)


def _refused_body(run, corpus, out):
    from megasynth.synth.sbp.synthesize import SynthSettings, synthesize  # noqa: PLC0415

    try:
        synthesize(run, corpus, out, SynthSettings(num_docs=4), progress=False)
    except (ValueError, RuntimeError) as e:
        return str(e)
    return "not refused"


def _vllm_body(run, corpus, out):
    from megasynth.synth.sbp.synthesize import SynthSettings, synthesize  # noqa: PLC0415
    from megasynth.synth.sbp.vllm_sampler import VLLMSettings  # noqa: PLC0415

    try:
        synthesize(run, corpus, out, SynthSettings(num_docs=4), progress=False, vllm=VLLMSettings())
    except ValueError as e:
        return str(e)
    return "not refused"


def test_the_vllm_backend_is_refused_under_torchrun(setup, tmp_path):
    # vLLM sets up its own process group: every rank starting an engine over the same GPUs is never wanted.
    _, corpus, run, _ = setup
    got = run_on_ranks(_vllm_body, 2, str(run), corpus, str(tmp_path / "syn"), timeout=120)
    assert got[0] == got[1] and "not under torchrun" in got[0], got
    assert list(tmp_path.iterdir()) == []


def test_every_rank_learns_that_the_output_is_in_use(setup, tmp_path):
    # Rank 0 alone takes the locks; without its broadcast, rank 1 would wait for it in a collective.
    _, corpus, run, _ = setup
    out = tmp_path / "syn"
    lock = acquire_path_lock(out, tool="tools/synthesize.py", flag="--output-prefix")
    got = run_on_ranks(_refused_body, 2, str(run), corpus, str(out), timeout=120)
    lock.release(remove=True)
    assert got[0] == got[1] and got[0].startswith(f"{out}: in use by tools/synthesize.py (pid {os.getpid()} ")
    assert list(tmp_path.iterdir()) == []


def test_endpoint_backend_sends_the_prompts_and_survives_faults(setup, tmp_path, openai_server):
    tok, corpus, run, _ = setup

    def reply(body):
        ids = body["prompt"]
        if ids[0] == tok.encode("def")[0]:
            return ""  # an empty document: the client retries it, then synthesis counts it as empty
        return f" synthetic text {len(ids)} {sum(ids) % 97}"

    openai_server.reply = reply
    openai_server.inject(Fault.status(500), Fault.drop())
    endpoint = LLMSettings(openai_server.base_url, "synth", concurrency=4, max_attempts=3,
                           api_key_env=TEST_API_KEY_ENV, backoff_base_s=0.01, timeout_s=10, transient_budget_s=0.3)
    counts = synthesize(run, corpus, tmp_path / "e", settings(num_docs=10), endpoint=endpoint, progress=False)
    docs, prov = docs_and_provenance(tmp_path / "e")
    ds, sep = IndexedDataset(corpus), tok.encode("<|sep|>")
    prompts = {json.dumps(r.json["prompt"]): r.json for r in openai_server.completion_requests()}
    for doc, seed, sample in zip(docs, prov["seed"], prov["sample"]):
        prompt = ds[seed].tolist()[:-1][:L1] + sep
        body = prompts[json.dumps(prompt)]
        # A reply over max_tokens (these are 16 tokens for L2 = 12) is cut to it and counted as truncated.
        assert doc == tok.encode(reply(body))[:L2] + [tok.eod_id]
        assert body["max_tokens"] == L2 and body["temperature"] == 1.0 and body["model"] == "synth"
    seeds_sent = {r.json["seed"] for r in openai_server.completion_requests()}
    assert {endpoint_seed(7, s) for s in prov["sample"]} <= seeds_sent
    assert counts["requested"] == 10 and counts["generated"] + counts["empty_dropped"] == 10
    assert counts["truncated"] == sum(len(tok.encode(reply(prompts[json.dumps(ds[seed].tolist()[:-1][:L1] + sep)])))
                                      > L2 for seed in prov["seed"])
    meta = json.loads((tmp_path / "e.json").read_text())
    # The URL is not a setting (a fleet, or another server of the same model, resumes the run); it is recorded.
    assert meta["synthesis"]["settings"]["backend"] == {"kind": "endpoint", "served_model": "synth",
                                                        "prompt_format": "ids"}
    assert meta["synthesis"]["served_by"] == openai_server.base_url
    # As text: the decoded prompt, <|sep|> written out.
    openai_server.reset()
    openai_server.reply = lambda body: " plain text"
    synthesize(run, corpus, tmp_path / "x", settings(num_docs=4), endpoint=endpoint, prompt_format="text",
               progress=False)
    _, prov = docs_and_provenance(tmp_path / "x")
    sent = sorted(r.json["prompt"] for r in openai_server.completion_requests())
    assert sent == sorted(tok.decode(ds[s].tolist()[:-1][:L1]) + "<|sep|>" for s in prov["seed"])
    # A server that keeps failing past the transient budget stops the run with the sample named; finished
    # shards stay for a resume.
    openai_server.reply = lambda body: Fault.status(503)
    from megasynth.synth.sbp.samplers import EndpointError
    with pytest.raises(EndpointError, match=r"sample \d+: the completion failed \(the endpoint kept failing "
                                            r"transiently for 0.3 s, \d+ requests; http_503"):
        synthesize(run, corpus, tmp_path / "f", settings(num_docs=10), endpoint=endpoint, progress=False)
    assert (tmp_path / "f.work" / "manifest.json").is_file() and not (tmp_path / "f.idx").exists()
    # The same run resumes against the server under another URL; another served model is another run.
    openai_server.reply = lambda body: " resumed"
    moved = replace(endpoint, base_url=openai_server.base_url.replace("127.0.0.1", "localhost"))
    with pytest.raises(WorkDirMismatch, match="backend.served_model"):
        synthesize(run, corpus, tmp_path / "f", settings(num_docs=10), endpoint=replace(moved, model="other"),
                   progress=False)
    assert synthesize(run, corpus, tmp_path / "f", settings(num_docs=10), endpoint=moved,
                      progress=False)["requested"] == 10
    assert json.loads((tmp_path / "f.json").read_text())["synthesis"]["served_by"] == moved.base_url


def test_bad_inputs_are_named(setup, tmp_path):
    _, corpus, run, _ = setup
    plain = make_tokenizer(tmp_path / "plain", separator=False)
    plain_corpus = make_corpus(tmp_path / "plain_corpus", plain)
    plain_run = make_synthesizer(tmp_path / "plain_run", plain, plain_corpus)
    with pytest.raises(TokenizerError, match=r"plain_run/tokenizer.*<\|sep\|>.*--chat-tokens"):
        synthesize(plain_run, plain_corpus, tmp_path / "o", settings(), progress=False)
    with pytest.raises(TokenizerError, match=r"plain_corpus: tokenized with .*plain.*not with the synthesizer's tokenizer"):
        synthesize(run, plain_corpus, tmp_path / "o", settings(), progress=False)
    with pytest.raises(SynthError, match="--num-docs must be >= 1"):
        synthesize(run, corpus, tmp_path / "o", settings(num_docs=0), progress=False)
    with pytest.raises(SynthError, match="give exactly one of --num-docs and --tokens"):
        synthesize(run, corpus, tmp_path / "o", settings(tokens=10), progress=False)
    with pytest.raises(SynthError, match=r"must fit the model's max_seq_len 48"):
        synthesize(run, corpus, tmp_path / "o", settings(max_seed_tokens=30, max_new_tokens=30), progress=False)
    with pytest.raises(SynthError, match="not with an endpoint"):
        synthesize(run, corpus, tmp_path / "o", settings(), progress=False, vllm=VLLMSettings(),
                   endpoint=LLMSettings("http://127.0.0.1:9/v1", "m"))
    with pytest.raises(VLLMError, match="--vllm-max-num-seqs must be >= 1"):
        synthesize(run, corpus, tmp_path / "o", settings(), progress=False, vllm=VLLMSettings(max_num_seqs=0))
    if importlib.util.find_spec("vllm") is None:  # the CPU venv: the backend names what to install
        with pytest.raises(VLLMError, match=r"vLLM is not installed in this Python .*make vllm-venv"):
            synthesize(run, corpus, tmp_path / "o", settings(), progress=False, vllm=VLLMSettings())
    with pytest.raises(SynthError, match="would overwrite the input --corpus"):
        synthesize(run, corpus, corpus, settings(), progress=False, overwrite=True)
    # A work directory of another run (another seed) is refused, naming the setting.
    synthesize(run, corpus, tmp_path / "w", settings(num_docs=8), progress=False, keep_work=True)
    with pytest.raises(WorkDirMismatch, match="seed"):
        synthesize(run, corpus, tmp_path / "w2", settings(num_docs=8, seed=8), work_dir=tmp_path / "w.work",
                   progress=False)
    assert not list(tmp_path.glob("o.*")) and not list(tmp_path.glob("w2*"))
