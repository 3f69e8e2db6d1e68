"""SBP stage 5: synthetic documents from a tuned synthesizer, each prompted with a random document of a corpus.

    python tools/synthesize.py --checkpoint runs/synthesizer --corpus data/real --output-prefix data/synth \\
        --num-docs 20000
    torchrun --nproc_per_node=8 tools/synthesize.py --checkpoint runs/synthesizer --corpus data/real \\
        --output-prefix data/synth --tokens 200000000
    python tools/synthesize.py --checkpoint runs/synthesizer --corpus data/real --output-prefix data/synth \\
        --num-docs 100000 --backend vllm --dtype bfloat16 --shard-docs 4096            # vLLM in this process
    python tools/synthesize.py --checkpoint runs/synthesizer --corpus data/real --output-prefix data/synth \\
        --num-docs 100000 --endpoint http://localhost:8000/v1 --served-model synthesizer   # a vLLM server

Sample i is prompted with a corpus document drawn uniformly (seeded by --seed), cut to --max-seed-tokens, and
the pair separator (the layout of tools/make_pair_dataset.py): the one recorded in the sidecar of the pair data the
checkpoint was tuned on (its config's data sources), else --separator, else <|sep|>; the model samples up to
--max-new-tokens tokens at --temperature (1 by default: varied syntheses of one seed) and stops at EOD. Empty
outputs are dropped and counted. A document depends only on (--seed, its sample index): not on the batch size,
the number of torchrun ranks (each takes a share of the shards) or interruptions. Work goes in shards to --work-dir (default
OUT.work/) with a manifest of the settings; run the same command again after a crash or kill and it resumes,
publishing the same bytes as an uninterrupted run. --tokens T draws whole shards until the output holds at
least T tokens (EOD included). On a cluster, --worker I/N (or auto in a Slurm array) makes shards as independent
workers on any hosts that see --work-dir, surviving each other's loss; the last one (or a --publish job) writes
the bytes one process would (docs/cluster.md).

Backends (--backend): ours (default) samples with megasynth.generate's KV-cache sampler, on --device, under
torchrun on every rank. vllm runs a vLLM engine in this process (one process: not under torchrun; a model larger
than a GPU takes --vllm-tensor-parallel-size) on the checkpoint exported into the work directory, each sample one
request seeded by (--seed, its sample index) that stops at EOD; it needs vLLM installed (GPU: pip install vllm;
CPU: `make vllm-venv`, then .venv-vllm/bin/python). endpoint (the default when --endpoint is given): with
--endpoint URL --served-model NAME (the shared LLM flags --base-url and --model) the prompts go to an
OpenAI-compatible completions server (vLLM serving the checkpoint exported with tools/export_hf.py) as token
ids, or with --endpoint-prompt text as text. What each backend reproduces: docs/sbp.md.
No sample is ever left out: transient failures (429 with its Retry-After, 408, 5xx, timeouts, dropped
connections) are retried for --transient-budget-s per sample without counting as attempts, and a sample that
still fails, or fails --max-attempts times for its content, stops the run with exit code 1 (the finished shards
stay; the same command resumes).

Output: OUT.bin/.idx/.json, a normal prefix of the documents in sample order, whose sidecar names the checkpoint
(and the sha256 of its meta.json), the corpus and its .idx sha256, the settings and the counts; and
OUT.provenance.parquet (doc, seed, sample). An existing output is refused unless --overwrite, an output or a
work directory that is, holds or sits inside one of the inputs (OUT = --corpus, say) always; a float flag that
is not a finite number in its range (--temperature nan) is refused while parsing. Bad input (a checkpoint whose
tokenizer lacks <|sep|> and no --separator, a --separator other than the recorded one, a corpus of another
tokenizer, --num-docs 0, ...) stops with one line and exit code 2. Library: megasynth.synth.sbp.synthesize.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from megasynth.checkpoint import CheckpointError
from megasynth.cli import (ToolParser, add_worker_arguments, check_outputs, directory, float_range, nonnegative_float,
                           positive_float, prefix, worker_mode, worker_outcome,
                           run_dir)
from megasynth.data.indexed import IndexedDatasetError, PrefixOutputError
from megasynth.distributed import destroy_distributed, init_distributed, pick_device
from megasynth.run_lock import RunDirBusy
from megasynth.synth.llm import LLMSettings, add_llm_arguments, settings_from_args
from megasynth.synth.sbp.samplers import EndpointError
from megasynth.synth.sbp.shards import ShardError
from megasynth.synth.sbp.synthesize import SynthSettings, synthesize
from megasynth.synth.sbp.synthesize_units import synthesize_units
from megasynth.synth.sbp.vllm_sampler import VLLMSettings, vllm_version
from megasynth.tokenizer import TokenizerError


def build_parser() -> argparse.ArgumentParser:
    p = ToolParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = SynthSettings()
    p.add_argument("--checkpoint", required=True, metavar="RUN_OR_STEP_DIR",
                   help="the tuned synthesizer: a run directory (its newest checkpoint) or a step directory")
    p.add_argument("--tokenizer", metavar="DIR",
                   help="its tokenizer (default: the checkpoint's tokenizer/ or RUN_DIR/tokenizer)")
    p.add_argument("--separator", metavar="TOKEN",
                   help="the pair separator (one id of the tokenizer) the synthesizer was tuned on; default: the one "
                        "the sidecar of its pair data records (tools/make_pair_dataset.py --separator), else "
                        "<|sep|>; refused when it differs from the recorded one")
    p.add_argument("--corpus", required=True, metavar="PREFIX",
                   help="the real corpus the seed documents are drawn from (tokenized with that tokenizer)")
    p.add_argument("--output-prefix", required=True, metavar="OUT",
                   help="writes OUT.bin/.idx/.json and OUT.provenance.parquet")
    p.add_argument("--num-docs", type=int, metavar="N",
                   help="draw N samples (the output holds N minus the empty ones); give this or --tokens")
    p.add_argument("--tokens", type=int, metavar="T",
                   help="draw whole shards until the output holds at least T tokens (EOD included)")
    p.add_argument("--temperature", type=nonnegative_float, default=d.temperature,
                   help="softmax temperature (default 1; 0 = greedy)")
    p.add_argument("--top-k", type=int, default=d.top_k, help="sample among the k most likely tokens (default 0 = all)")
    p.add_argument("--top-p", type=float_range(0, 1, low_open=True), default=d.top_p,
                   help="nucleus sampling mass in (0, 1] (default 1 = off)")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="seeds the seed draws and every sample's stream (default 0)")
    p.add_argument("--max-seed-tokens", type=int, metavar="L1",
                   help="seed tokens in each prompt (default: (max_seq_len - 1) // 2, or what --max-new-tokens leaves)")
    p.add_argument("--max-new-tokens", type=int, metavar="L2",
                   help="most tokens sampled per document (default: what the prompt leaves of the model's max_seq_len)")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"prompts per sampling batch of --backend ours (default {d.batch_size}); does not change "
                        "the output")
    p.add_argument("--shard-docs", type=int, default=d.shard_docs,
                   help=f"samples per shard, the unit of resumable work and of sharing over ranks (default "
                        f"{d.shard_docs})")
    p.add_argument("--work-dir", metavar="W", help="where shards and the manifest go (default OUT.work/; with "
                   "--worker: on a filesystem every worker sees, with working file locks; one that "
                   "is, holds or sits inside an input is refused)")
    p.add_argument("--keep-work", action="store_true", help="keep the work directory after a successful run")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output (default: refuse, exit 2); an output that is an input (the corpus, "
                        "the checkpoint, the tokenizer) is refused regardless")
    p.add_argument("--backend", choices=BACKENDS,
                   help="who samples: ours (megasynth's sampler; default), vllm (a vLLM engine in this process) or "
                        "endpoint (an OpenAI-compatible server; the default when --endpoint is given)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where --backend ours runs (auto: CUDA when available; a rank uses its local GPU)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="model dtype of --backend ours and vllm (default float32); recorded: it changes samples")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    v = p.add_argument_group("vLLM engine (--backend vllm)")
    dv = VLLMSettings()
    v.add_argument("--vllm-tensor-parallel-size", type=int, metavar="N",
                   help=f"GPUs one engine shards the synthesizer over, for a model larger than one GPU (default "
                        f"{dv.tensor_parallel_size}); recorded, since it can change samples")
    v.add_argument("--vllm-gpu-memory-utilization", type=float_range(0, 1, low_open=True), metavar="F",
                   help="share of GPU memory vLLM takes for weights and KV cache (default: vLLM's, 0.92; 0.1 "
                        "without CUDA, where it is the share of host memory vLLM reserves)")
    v.add_argument("--vllm-kv-cache-gib", type=positive_float, metavar="GIB",
                   help="KV cache size in GiB instead of what the memory share leaves (on the CPU: its KV cache "
                        "space, like VLLM_CPU_KVCACHE_SPACE)")
    v.add_argument("--vllm-prefix-caching", action=argparse.BooleanOptionalAction,
                   help="reuse the KV cache of shared prompt prefixes (default on: many samples share a seed "
                        "document); --no-vllm-prefix-caching turns it off")
    v.add_argument("--vllm-max-num-seqs", type=int, metavar="N",
                   help="most sequences the engine runs at once (default: vLLM's); raise --shard-docs above it, "
                        "since each shard is one batch of requests and the engine drains between shards")
    v.add_argument("--vllm-enforce-eager", action="store_true", default=None,
                   help="no torch.compile or CUDA graphs: starts in seconds instead of minutes on a small CPU, "
                        "samples slower on a GPU")
    # The endpoint serves the synthesizer itself: the flags above give its sampling and size the run, so the shared
    # --temperature/--max-tokens and the price/budget flags are not taken here. Only --base-url, --model and
    # --endpoint-prompt decide the output; the other defaults are LLMSettings' but a longer --timeout.
    e = add_llm_arguments(
        p, required=False, title="OpenAI-compatible completions backend (instead of sampling here)",
        defaults=LLMSettings(timeout_s=300.0), aliases={"base-url": ("--endpoint",), "model": ("--served-model",)},
        omit=("temperature", "max-tokens", "price-in", "price-out", "budget-tokens", "budget-usd"),
        helps={"base-url": "the API root, e.g. http://localhost:8000/v1 (vLLM); --endpoint is the same flag",
               "model": "the model name the server serves (vLLM --served-model-name); --served-model is the same flag",
               "max-attempts": "requests per sample that got a reply (retries after empty or unreadable ones included) "
                               "before the run stops (default 5); transient failures do not count, see "
                               "--transient-budget-s",
               "transient-budget-s": "seconds a sample keeps retrying transient failures (429 with its Retry-After, "
                                     "408, 5xx, timeouts, dropped connections) before the run stops, resumable "
                                     "(default 600)"})
    e.add_argument("--endpoint-prompt", choices=["ids", "text"], default="ids",
                   help="send each prompt as token ids (default; exact, vLLM accepts them) or as decoded text")
    add_worker_arguments(p, default_work_dir=None)
    return p


BACKENDS = ("ours", "vllm", "endpoint")
VLLM_FLAGS = ("tensor_parallel_size", "gpu_memory_utilization", "kv_cache_gib", "prefix_caching", "max_num_seqs",
              "enforce_eager")


def pick_backend(args) -> tuple[str, VLLMSettings | None]:
    """(backend, vLLM settings or None) from the flags; ValueError naming the flags that do not go together."""
    endpoint_given = args.base_url is not None or args.model is not None
    backend = args.backend or ("endpoint" if endpoint_given else "ours")
    if backend == "endpoint" and (args.base_url is None or args.model is None):
        raise ValueError("--endpoint and --served-model go together (or --base-url and --model)"
                         if endpoint_given else "--backend endpoint needs --endpoint URL and --served-model NAME")
    if backend != "endpoint" and endpoint_given:
        raise ValueError(f"--endpoint/--served-model are for --backend endpoint, not --backend {backend}")
    given = [f for f in VLLM_FLAGS if getattr(args, f"vllm_{f}") is not None]  # the flags default to None
    if backend != "vllm":
        if given:
            raise ValueError(f"--vllm-{given[0].replace('_', '-')} is a setting of --backend vllm, not of --backend "
                             f"{backend}")
        return backend, None
    vllm = VLLMSettings(**{f: getattr(args, f"vllm_{f}") for f in given})
    vllm.check()
    # vLLM sets up its own process group; under torchrun every rank would start an engine over the same GPUs. As
    # independent workers (--worker auto under torchrun) no process group of ours exists.
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.worker is None:
        raise ValueError("--backend vllm runs one engine in one process, not under torchrun: use "
                         "--vllm-tensor-parallel-size for a model larger than one GPU, or one run per GPU with its "
                         "own --seed and --output-prefix")
    vllm_version()  # the one-line error (what to install) before any work when vLLM is missing
    return backend, vllm


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # The work directory (default OUT.work/) is an output too: it is created, filled and, after a success, removed.
    check_outputs(parser, {"--output-prefix": prefix(args.output_prefix),
                           "--work-dir": directory(args.work_dir or f"{args.output_prefix}.work")},
                  {"--corpus": prefix(args.corpus), "--checkpoint": run_dir(args.checkpoint),
                   "--tokenizer": args.tokenizer})
    settings = SynthSettings(num_docs=args.num_docs, tokens=args.tokens, seed=args.seed, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p, max_seed_tokens=args.max_seed_tokens,
                             max_new_tokens=args.max_new_tokens, shard_docs=args.shard_docs, batch_size=args.batch_size)
    try:
        settings.check()
        backend, vllm = pick_backend(args)
        endpoint = settings_from_args(args) if backend == "endpoint" else None
        mode = worker_mode(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    again = "start the worker again" if mode is not None else "run the same command again"
    try:
        if mode is not None:
            return _as_worker(args, settings, backend, vllm, endpoint, *mode)
        return _in_one_run(args, settings, backend, vllm, endpoint)
    except EndpointError as e:
        print(f"error: {e}; the finished {'units' if mode else 'shards'} are kept, {again} to resume", file=sys.stderr)
        return 1
    except (ValueError, CheckpointError, TokenizerError, IndexedDatasetError, PrefixOutputError, ShardError,
            RunDirBusy, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if mode is not None:
            raise
        print("interrupted; the finished shards are kept, run the same command again to resume", file=sys.stderr)
        return 130


def _in_one_run(args, settings, backend: str, vllm, endpoint) -> int:
    """One process, or every rank of torchrun."""
    info = init_distributed(tp=1, device=args.device if backend == "ours" else "cpu")
    try:
        summary = synthesize(args.checkpoint, args.corpus, args.output_prefix, settings, tokenizer=args.tokenizer,
                             work_dir=args.work_dir, overwrite=args.overwrite, keep_work=args.keep_work,
                             device=info.device, dtype=getattr(torch, args.dtype), endpoint=endpoint,
                             prompt_format=args.endpoint_prompt, progress=not args.no_progress,
                             separator=args.separator, vllm=vllm)
    finally:
        destroy_distributed()
    if info.is_main:
        if summary.get("already_complete"):
            print(f"{args.output_prefix}: already complete (a finished run with these settings)")
        else:
            print(f"wrote {args.output_prefix}.bin/.idx/.json and .provenance.parquet: {summary['generated']:,} "
                  f"documents, "
                  f"{summary['tokens']:,} tokens from {summary['requested']:,} samples; dropped "
                  f"{summary['empty_dropped']:,} empty and {summary['out_of_vocab_dropped']:,} with unknown ids; "
                  f"{summary['truncated']:,} hit --max-new-tokens")
    return 0


def _as_worker(args, settings, backend: str, vllm, endpoint, worker, publish: str) -> int:
    """Independent worker I/N (docs/cluster.md): no process group; each worker on its own (local) GPU."""
    device = pick_device(args.device if backend == "ours" else "cpu", int(os.environ.get("LOCAL_RANK", "0")))
    out = synthesize_units(args.checkpoint, args.corpus, args.output_prefix, settings, worker=worker,
                           work_dir=args.work_dir or f"{args.output_prefix}.work", publish=publish,
                           tokenizer=args.tokenizer, overwrite=args.overwrite, device=device,
                           dtype=getattr(torch, args.dtype), endpoint=endpoint, prompt_format=args.endpoint_prompt,
                           separator=args.separator, vllm=vllm,
                           log=None if args.no_progress else lambda m: print(m, file=sys.stderr))
    wrote = (f"wrote {args.output_prefix}.bin/.idx/.json and .provenance.parquet: {out['generated']:,} documents, "
             f"{out['tokens']:,} tokens" if out["published"] else "")
    print(worker_outcome(out, worker, args.output_prefix, wrote))
    return 0


if __name__ == "__main__":
    sys.exit(main())
