"""SBP synthesis throughput of the three backends of tools/synthesize.py on one checkpoint: ours (megasynth.generate's
KV-cache sampler), --backend vllm (a vllm.LLM in the process) and --endpoint (a vLLM OpenAI server).

    python bench/vllm_synthesis.py                  # CPU: the three, a 2-layer dim-256 model, 64 samples
    python bench/vllm_synthesis.py --device cuda --dtype bfloat16 --dim 768 --layers 16 --heads 12 --kv-heads 4 \\
        --ffn 2560 --docs 1024 --backends ours,vllm          # the GPU row of bench/gpu_all.sh (~150M)

Set-up as bench/synthesize.py's (a BPE tokenizer and corpus from the standard library's docstrings, one random
model saved as a checkpoint and exported with megasynth.hf.export_hf), then every backend samples exactly the
same prompts (the seed documents synthesize draws, cut to --seed-tokens, then <|sep|>), sample indices 0..N-1,
temperature 1, at most --new-tokens each: each backend's sampler (megasynth.synth.sbp.samplers) is called on them
once as a warm-up on --batch prompts, then timed over all of them, with --threads CPU threads each (two threads
on a loaded 2-core box made our sampler 10x slower: OpenMP spin-waiting). Sampled tokens (EOD included) over the wall
time of that call is the rate; engine and server starts are reported apart. A random model rarely samples EOD, so
nearly every sample runs to --new-tokens on every side.

vLLM runs where it is installed: in this Python on a GPU machine, else in --vllm-python (default .venv-vllm, `make
vllm-venv`, its CPU build), which runs this file with --worker. The server is tests/vllm_engine/vllm_server.py's
(`--dtype float32 --enforce-eager` on the CPU), each backend runs alone on the machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "bench"), str(REPO / "tests" / "vllm_engine")]

from megasynth.synth.llm import LLMSettings  # noqa: E402
from megasynth.synth.sbp.samplers import EndpointSampler, LocalSampler, Sampling  # noqa: E402
from megasynth.synth.sbp.synthesize import SynthSettings  # noqa: E402
from megasynth.synth.sbp.vllm_sampler import VLLMSampler, VLLMSettings  # noqa: E402

BACKENDS = ("ours", "vllm", "endpoint")


def parameter_count(hf_dir: Path) -> int:
    from safetensors import safe_open  # noqa: PLC0415

    total = 0
    for path in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            total += sum(int(np.prod(f.get_slice(name).get_shape())) for name in f.keys())
    return total


def sampled_tokens(sampled) -> int:
    return sum(len(ids) + ended for ids, ended in sampled)  # the stopping EOD counts as sampled


def timed(sampler, prompts, warmup: int) -> dict:
    samples = np.arange(len(prompts), dtype=np.int64)
    sampler(prompts[:warmup], samples[:warmup])
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    tokens = sampled_tokens(sampler(prompts, samples))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return {"tokens": tokens, "seconds": time.perf_counter() - t0}


def vllm_worker(spec: dict) -> dict:
    """In the Python that has vLLM: engine start, then the timed call."""
    t0 = time.perf_counter()
    engine = VLLMSettings(enforce_eager=spec["enforce_eager"], kv_cache_gib=spec["kv_cache_gib"],
                          max_num_seqs=spec["max_num_seqs"])
    sampler = VLLMSampler(Path(spec["hf"]), spec["eod"], Sampling(**spec["sampling"]), engine,
                          dtype=getattr(torch, spec["dtype"]), max_model_len=spec["max_model_len"])
    sampler.start()
    start = time.perf_counter() - t0
    prompts = [np.asarray(p, np.int64) for p in spec["prompts"]]
    try:
        return {**timed(sampler, prompts, spec["warmup"]), "start_seconds": start}
    finally:
        sampler.close()


def run_vllm(args, spec: dict, tmp: Path) -> dict:
    if importlib.util.find_spec("vllm") is not None:  # a GPU machine: vLLM beside torch in this Python
        return vllm_worker(spec)
    (tmp / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(REPO), "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": str(args.threads)}
    env.pop("TRITON_INTERPRET", None)
    with open(tmp / "vllm_worker.log", "wb") as log:
        proc = subprocess.run([args.vllm_python, __file__, "--worker", str(tmp / "spec.json")], stdout=log,
                              stderr=subprocess.STDOUT, env=env, timeout=1800)
    text = (tmp / "vllm_worker.log").read_text(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"the vLLM worker failed (exit {proc.returncode}):\n{text[-3000:]}")
    return json.loads(next(line for line in reversed(text.splitlines()) if line.startswith("{")))


def run_endpoint(args, hf_dir: Path, tok, sampling: Sampling, prompts, tmp: Path) -> dict:
    from vllm_server import MODEL_NAME, VLLMServer  # noqa: PLC0415

    t0 = time.perf_counter()
    server = VLLMServer(Path(args.vllm_python), hf_dir, log=tmp / "server.log", kv_cache_gib=args.kv_cache_gib)
    server.env["OMP_NUM_THREADS"] = str(args.threads)
    server.args[server.args.index("--max-num-seqs") + 1] = str(args.max_num_seqs)  # the tests' 16, as in-process
    if args.dtype != "float32":
        server.args[server.args.index("--dtype") + 1] = args.dtype
    if not args.enforce_eager_resolved:
        server.args.remove("--enforce-eager")
    if args.device == "cpu":  # as the in-process backend does on the CPU (megasynth/synth/sbp/vllm_sampler.py)
        server.args += ["--no-enable-chunked-prefill", "--max-num-batched-tokens",
                        str(max(4096, args.max_num_seqs, args.seed_tokens + 1 + args.new_tokens))]
    with server:
        start = time.perf_counter() - t0
        endpoint = LLMSettings(f"{server.base_url}/v1", MODEL_NAME, concurrency=args.concurrency, timeout_s=1800)
        sampler = EndpointSampler(endpoint, tok, sampling, tmp / "ledger.jsonl")
        return {**timed(sampler, prompts, args.batch), "start_seconds": start}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where ours runs (default: cuda when available); vLLM runs on its platform")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="model dtype, every backend")
    p.add_argument("--dim", type=int, default=256, help="hidden size")
    p.add_argument("--layers", type=int, default=2, help="transformer blocks")
    p.add_argument("--heads", type=int, default=4, help="query heads")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads")
    p.add_argument("--ffn", type=int, default=768, help="MLP hidden size")
    p.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary size (trained on the stdlib docstrings)")
    p.add_argument("--corpus-docs", type=int, default=1000, help="stdlib docstrings in the corpus")
    p.add_argument("--docs", type=int, default=64, help="samples, the same prompts for every backend")
    p.add_argument("--batch", type=int, default=16, help="our sampler's batch size; also the warm-up's prompts")
    p.add_argument("--seed-tokens", type=int, default=64, help="seed tokens per prompt (--max-seed-tokens)")
    p.add_argument("--new-tokens", type=int, default=128, help="most tokens sampled per document")
    p.add_argument("--backends", default=",".join(BACKENDS), help="which to run, comma-separated: ours,vllm,endpoint")
    p.add_argument("--vllm-python", default=str(REPO / ".venv-vllm" / "bin" / "python"),
                   help="the Python with vLLM (CPU: .venv-vllm); used when this one has no vLLM, and for the server")
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                   help="vLLM without torch.compile / CUDA graphs (default: on the CPU, where compiling takes minutes)")
    p.add_argument("--kv-cache-gib", type=int, default=1, help="vLLM's KV cache in GiB (both vLLM backends)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads of every backend (torch here, OMP_NUM_THREADS for vLLM; default 1, what vLLM "
                        "takes on the CPU unless told otherwise)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="vLLM's most sequences at once, both vLLM backends "
                   "(default 64)")
    p.add_argument("--concurrency", type=int, default=64, help="requests in flight to the server")
    p.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:  # the vLLM side, in the Python that has it
        print(json.dumps(vllm_worker(json.loads(Path(args.worker).read_text()))), flush=True)
        return 0
    backends = [b for b in args.backends.split(",") if b]
    if unknown := set(backends) - set(BACKENDS):
        p.error(f"--backends: unknown {sorted(unknown)}; choose from {','.join(BACKENDS)}")
    enforce_eager = args.enforce_eager if args.enforce_eager is not None else args.device == "cpu"
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # a vLLM in this Python (a GPU machine) takes it too
    args.enforce_eager_resolved = enforce_eager

    from synthesize import build_inputs, drawn_prompts  # noqa: PLC0415 (bench/synthesize.py's set-up)

    from megasynth.checkpoint import load_for_inference, resolve_checkpoint  # noqa: PLC0415

    dtype = getattr(torch, args.dtype)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        shape = argparse.Namespace(**vars(args), shard_docs=args.docs)
        tok, corpus, run, hf_dir = build_inputs(shape, tmp, dtype)
        settings = SynthSettings(num_docs=args.docs, shard_docs=args.docs, max_seed_tokens=args.seed_tokens,
                                 max_new_tokens=args.new_tokens, seed=0)
        sep_id = tok.encode("<|sep|>")[-1]
        prompts = [np.asarray(x, np.int64) for x in drawn_prompts(corpus, settings, sep_id, tok.eod_id)]
        sampling = Sampling(seed=0, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=args.new_tokens)
        max_len = args.seed_tokens + 1 + args.new_tokens
        for backend in backends:
            print(f"== {backend}", file=sys.stderr, flush=True)
            if backend == "ours":
                model, _ = load_for_inference(resolve_checkpoint(run), device=args.device, dtype=dtype)
                results[backend] = timed(LocalSampler(model, tok.eod_id, sampling, args.batch), prompts, args.batch)
                del model
            elif backend == "vllm":
                spec = {"hf": str(hf_dir), "eod": tok.eod_id, "sampling": sampling.__dict__, "dtype": args.dtype,
                        "max_model_len": max_len, "prompts": [x.tolist() for x in prompts], "warmup": args.batch,
                        "enforce_eager": enforce_eager, "kv_cache_gib": args.kv_cache_gib,
                        "max_num_seqs": args.max_num_seqs}
                results[backend] = run_vllm(args, spec, tmp)
            else:
                results[backend] = run_endpoint(args, hf_dir, tok, sampling, prompts, tmp)
            r = results[backend]
            print(f"   {r['tokens']} tokens in {r['seconds']:.2f} s", file=sys.stderr, flush=True)
        n_params = parameter_count(hf_dir)
    print(f"\n{args.device} {args.dtype}, {n_params / 1e6:.1f}M parameters (dim {args.dim}, {args.layers} layers, "
          f"vocab {tok.vocab_size}), {args.docs} samples, prompts <= {args.seed_tokens} + 1 tokens, <= "
          f"{args.new_tokens} new, temperature 1; ours batch {args.batch}, vLLM enforce_eager={enforce_eager}, "
          f"{args.threads} CPU thread(s) each\n")
    base = results.get("ours")
    print("| backend | engine/server start (s) | sampling (s) | sampled tokens | tokens/s | vs ours |")
    print("|---|---:|---:|---:|---:|---:|")
    for backend, r in results.items():
        rate = r["tokens"] / r["seconds"]
        ratio = f"{rate / (base['tokens'] / base['seconds']):.2f}x" if base else "-"
        start = f"{r['start_seconds']:.1f}" if "start_seconds" in r else "-"
        print(f"| {backend} | {start} | {r['seconds']:.2f} | {r['tokens']:,} | {rate:,.0f} | {ratio} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
