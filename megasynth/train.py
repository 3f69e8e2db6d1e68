"""The pretraining loop. One process or many, the same command line:

    python -m megasynth.train --config examples/configs/demo.toml --data.data_path=data/train --train.steps=100
    torchrun --nproc-per-node 8 -m megasynth.train --config examples/configs/llama-1b.toml --parallel.tp=2

Setup (process group, model, optimizer, data, resume), then the loop (batch -> accumulated forward/backward
-> clip -> step -> log / eval / checkpoint). Loss, non-finite steps, exit codes: docs/training.md.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from megasynth import checkpoint
from megasynth.config import Config, ConfigError, config_to_dict, describe_config, load_config, save_config
from megasynth.data.loader import DistributedBatchLoader, accumulation_steps, build_train_dataset, data_sources
from megasynth.distributed import DistInfo, all_reduce_sum, destroy_distributed, init_distributed, rank0_first
from megasynth.faults import fault_steps
from megasynth.metrics import MetricsLogger, ThroughputMeter, memory_gb, peak_flops
from megasynth.model import build_model, flops_per_token
from megasynth.parallelize import loss_parallel_context, parallelize_model
from megasynth.rng_state import gather_rng_states, set_rng_state
from megasynth.schedule import build_lr_scheduler
from megasynth.train_setup import (SetupError, check_same_model, check_vocabulary, copy_tokenizer,
    find_resume_checkpoint, lock_run_dir, set_aside_earlier_run)

EVAL_SEED = 0  # held-out samples are the same at every evaluation and in every run
EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_SAVE_FAILED = 2, 3, 4


@dataclass
class Progress:
    step: int = 0  # optimizer steps taken (skipped non-finite steps included)
    tokens: int = 0  # training tokens consumed (all ranks)
    flops: float = 0.0  # model FLOPs spent on them (Megatron's formula)
    nonfinite_total: int = 0


# ----------------------------------------------------------------------------------------------- building blocks


def build_optimizer(model: torch.nn.Module, optim, device: torch.device) -> torch.optim.AdamW:
    """AdamW with decay on parameters of 2+ dimensions (matrices, embedding), none on norms."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": optim.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps,
                             fused=True if device.type == "cuda" else None)


def autocast_context(device: torch.device, dtype: str):
    """bf16 autocast on CUDA when asked; CPU runs always compute in fp32."""
    if device.type == "cuda" and dtype == "bfloat16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # a DTensor norm (FSDP/TP) -> a plain tensor


def train_step(model, optimizer, batches, *, info: DistInfo, grad_clip: float, dtype: str = "float32",
               inject_nan: bool = False, stats: dict | None = None) -> tuple[float, float]:
    """Accumulated forward/backward over this rank's micro-batches, clip, and step unless non-finite.

    Returns (loss, grad_norm): the global token-mean loss of the step and the pre-clip gradient norm. When
    `stats` is a dict, stats["targets"] is set to the step's target tokens over all dp ranks.
    """
    device = batches[0].input_ids.device
    counts = [b.num_targets for b in batches]
    total = all_reduce_sum(torch.tensor(float(sum(counts)), device=device, dtype=torch.float64), info, "dp").item()
    if stats is not None:
        stats["targets"] = int(total)
    # FSDP averages gradients over dp ranks; scaling by dp turns that average into the sum the weights need.
    grad_scale = info.dp_size
    loss_sum = torch.zeros((), device=device, dtype=torch.float32)
    # Under tensor parallelism the loss of vocab-sharded logits needs its forward and backward in this context.
    with loss_parallel_context(info):
        for batch, count in zip(batches, counts):
            with autocast_context(device, dtype):
                mean = model(batch.input_ids, batch.labels, doc_ids=batch.doc_ids)
            if inject_nan:
                mean = mean * float("nan")
            weight = count / total if total > 0 else 0.0
            (mean * (weight * grad_scale)).backward()
            if count:  # a micro-batch without targets has a NaN mean and contributes nothing
                loss_sum += _full(mean.detach()).float() * weight
    loss = all_reduce_sum(loss_sum, info, "dp").item() if total > 0 else float("nan")
    max_norm = grad_clip if grad_clip > 0 else float("inf")  # inf: measure the norm, scale by exactly 1
    grad_norm = _full(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)).item()
    if math.isfinite(loss) and math.isfinite(grad_norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm


@torch.no_grad()
def evaluate(model, batches, *, info: DistInfo, dtype: str = "float32") -> float:
    """Token-mean loss over held-out micro-batches, reduced across dp ranks."""
    model.eval()
    device = batches[0].input_ids.device
    sums = torch.zeros(2, device=device, dtype=torch.float64)  # (loss x tokens, tokens)
    with loss_parallel_context(info):
        for batch in batches:
            with autocast_context(device, dtype):
                mean = model(batch.input_ids, batch.labels, doc_ids=batch.doc_ids)
            if batch.num_targets:
                sums += torch.stack([mean.double() * batch.num_targets, torch.tensor(batch.num_targets, device=device)])
    model.train()
    loss_x_tokens, tokens = all_reduce_sum(sums, info, "dp").tolist()
    return loss_x_tokens / tokens if tokens else float("nan")


def build_eval_sets(cfg: Config, info: DistInfo, cache_dir: Path) -> list[tuple[str, list]]:
    """[(name, this rank's micro-batches)] per data.valid_paths prefix, read once: the same samples every eval."""
    from megasynth.data.blend import build_source_dataset  # noqa: PLC0415
    from megasynth.data.indexed import IndexedDataset  # noqa: PLC0415

    sets, mb = [], cfg.train.micro_batch_size
    n = cfg.train.eval_batches * mb * info.dp_size
    for prefix in cfg.data.valid_paths:
        name = Path(prefix).name
        if any(name == other for other, _ in sets):
            name = f"{name}_{len(sets)}"
        indexed = IndexedDataset(prefix)
        packing = cfg.data.valid_packing
        if packing == "auto":  # masked prefixes hold independent examples: evaluate each whole, masked
            packing = "pack" if indexed.has_loss_mask else "concat"
        ds = build_source_dataset(indexed, packing, seq_len=cfg.data.seq_len, num_samples=n, seed=EVAL_SEED,
                                  cache_dir=cache_dir, name=name)
        loader = DistributedBatchLoader(ds, global_batch_size=n, micro_batch_size=mb, dp_rank=info.dp_rank,
                                        dp_size=info.dp_size, document_masking=cfg.data.document_masking,
                                        device=info.device)
        sets.append((name, loader.next_step()))
    return sets


# ----------------------------------------------------------------------------------------------- the run


def train(cfg: Config) -> int:
    try:
        info = init_distributed(cfg.parallel.tp, cfg.train.device)
    except (ConfigError, ValueError, RuntimeError) as e:  # e.g. parallel.tp does not divide the world size
        print(f"error: {e}", file=sys.stderr)
        destroy_distributed()
        return EXIT_BAD_INPUT
    lock = None
    try:
        lock = lock_run_dir(Path(cfg.train.run_dir), info)  # before anything reads or writes the run directory
        return _train(cfg, info)
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except checkpoint.CheckpointSaveError as e:  # raised on every rank alike; one line, from rank 0
        if info.is_main:
            print(f"error: {e}", file=sys.stderr)
        return EXIT_SAVE_FAILED
    finally:
        if lock is not None:
            lock.release()
        destroy_distributed()


def _train(cfg: Config, info: DistInfo) -> int:
    t, device = cfg.train, info.device
    run_dir, ckpt_dir = Path(t.run_dir), Path(t.run_dir) / "checkpoints"
    dtype = t.dtype if device.type == "cuda" else "float32"
    compute_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    nan_steps = fault_steps("MEGASYNTH_FAULT_NAN_AT_STEP")

    # ---- setup: everything here is input checking; its errors are one line and exit code 2
    log = None
    try:
        log = MetricsLogger(run_dir, rank=info.rank, log_cfg=cfg.log, total_steps=t.steps,
                            config=config_to_dict(cfg))
        accumulation_steps(t.global_batch_size, t.micro_batch_size, info.dp_size)  # its ValueError names the keys
        cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else run_dir / "index_cache"
        rank0_first(info, lambda: check_vocabulary(cfg, cache_dir))  # rank 0 first: it may cache largest ids
        if info.is_main:  # the run directory is locked: no save of ours is in flight
            checkpoint.remove_stale_saves(ckpt_dir)
        if t.resume == "none":
            rank0_first(info, lambda: set_aside_earlier_run(run_dir, say=log.info) if info.is_main else None)
        resume_from = find_resume_checkpoint(cfg, ckpt_dir, say=log.info)
        if resume_from is not None:
            check_same_model(resume_from, cfg)

        model = build_model(cfg.model, device, seed=t.seed)  # the same seed on every rank: identical weights before sharding
        if t.init_from and resume_from is None:
            log.info(f"initial weights from {checkpoint.load_model_weights(model, t.init_from)}")
        model = parallelize_model(model, info, cfg.parallel, compute_dtype)
        model.train()
        optimizer = build_optimizer(model, cfg.optim, device)
        scheduler = build_lr_scheduler(optimizer, cfg.optim, t.steps)

        dataset = rank0_first(info, lambda: build_train_dataset(
            cfg.data, num_samples=max(1, t.steps * t.global_batch_size), seed=t.seed, cache_dir=cache_dir))
        loader = DistributedBatchLoader(
            dataset, global_batch_size=t.global_batch_size, micro_batch_size=t.micro_batch_size,
            dp_rank=info.dp_rank, dp_size=info.dp_size, fingerprint=getattr(dataset, "fingerprint", ""),
            document_masking=cfg.data.document_masking, device=device, num_workers=cfg.data.num_workers)
        eval_sets = rank0_first(info, lambda: build_eval_sets(cfg, info, cache_dir)) if t.eval_every > 0 else []

        progress = Progress()
        if resume_from is not None:
            parts = checkpoint.load_checkpoint(resume_from, model=model, optimizer=optimizer, verify=False)
            scheduler.load_state_dict(parts["scheduler"])
            loader.load_state_dict(parts["data"], allow_fingerprint_change=cfg.data.allow_blend_change)
            rng = (parts["rng"] or {}).get(f"rank_{info.rank}")
            if rng is not None:  # absent when resuming on more ranks than saved; nothing in training draws from it
                set_rng_state(rng)
            progress = Progress(**parts["progress"])
    except (ConfigError, SetupError, ValueError, OSError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        if log is not None:
            log.close()  # finishes a W&B run it may have started
        return EXIT_BAD_INPUT

    tokenizer_identity = None
    if info.is_main:
        save_config(cfg, run_dir / "config.toml")
        tokenizer_identity = copy_tokenizer(data_sources(cfg.data)[0].path, run_dir)
    log.open(resume_step=progress.step if resume_from is not None else None)
    if resume_from is not None:
        log.info(f"resumed from {resume_from} at step {progress.step}")
    horizon = t.steps * t.global_batch_size * cfg.data.seq_len
    log.info(dataset.sources_table(horizon, max_repetition=cfg.data.max_repetition))
    for line in dataset.packing_summaries():
        log.info(line)
    if dataset.max_repetition(horizon) > cfg.data.max_repetition:
        log.info(f"warning: a source repeats more than data.max_repetition={cfg.data.max_repetition} times")
    log.info(f"model: {model.num_params() / 1e6:.2f}M parameters | dp={info.dp_size} tp={info.tp_size} | "
             f"{loader.accumulation_steps} micro-batches of {t.micro_batch_size} per rank per step | {device}")

    tokens_per_step = t.global_batch_size * cfg.data.seq_len
    flops_per_step = flops_per_token(cfg.model, cfg.data.seq_len) * tokens_per_step
    peak = peak_flops(device, dtype)

    def run_evals() -> None:
        for name, batches in eval_sets:
            loss = evaluate(model, batches, info=info, dtype=dtype)
            log.log_eval({"step": progress.step, "tokens": progress.tokens, "flops": progress.flops, "name": name,
                          "loss": loss, "ppl": math.exp(min(loss, 700.0))})

    def save() -> Path:
        parts = {"scheduler": scheduler.state_dict(), "data": loader.state_dict(),
                 "rng": gather_rng_states(), "progress": asdict(progress)}
        meta = {"tokens": progress.tokens, "flops": progress.flops, "blend_fingerprint": loader.fingerprint,
                "tokenizer": tokenizer_identity, "world_size": info.world_size, "dp": info.dp_size, "tp": info.tp_size}
        return checkpoint.save_checkpoint(ckpt_dir, progress.step, model=model, optimizer=optimizer, parts=parts,
                                          cfg=cfg, meta=meta, keep_last=t.keep_last)

    if progress.step == 0:
        run_evals()
    last_eval, last_save = progress.step, progress.step
    in_a_row, meter = 0, ThroughputMeter()

    # ---- the loop
    while progress.step < t.steps:
        started = time.perf_counter()
        batches = loader.next_step()
        data_seconds = time.perf_counter() - started
        lr = optimizer.param_groups[0]["lr"]
        step = progress.step + 1
        stats: dict = {}
        loss, grad_norm = train_step(model, optimizer, batches, info=info, grad_clip=cfg.optim.grad_clip,
                                     dtype=dtype, inject_nan=step in nan_steps, stats=stats)
        scheduler.step()
        progress.step = step
        progress.tokens += tokens_per_step
        progress.flops += flops_per_step
        meter.add_step(tokens_per_step, time.perf_counter() - started, data_seconds)
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        in_a_row = 0 if finite else in_a_row + 1
        progress.nonfinite_total += 0 if finite else 1

        if (t.log_every > 0 and step % t.log_every == 0) or step in (1, t.steps) or not finite:
            tokens_per_s, step_seconds, data_share = meter.summary()
            tflops = flops_per_step / tokens_per_step * tokens_per_s / info.world_size
            log.log_train({
                "step": step, "loss": loss, "grad_norm": grad_norm, "lr": lr, "tokens": progress.tokens,
                "targets": stats["targets"],  # tokens the loss of this step averages over (masks, padding out)
                "flops": progress.flops, "tokens_per_s": tokens_per_s, "tflops": tflops / 1e12,
                "mfu": tflops / peak if peak else None, "mem_gb": memory_gb(device), "data_wait": data_share,
                "nonfinite": in_a_row, "nonfinite_total": progress.nonfinite_total,
            }, eta_s=(t.steps - step) * step_seconds)
            meter.reset()
        if in_a_row >= max(1, t.max_nonfinite_steps):
            latest = checkpoint.find_latest(ckpt_dir)
            log.info(f"error: {in_a_row} consecutive steps (through step {step}) had a non-finite loss or gradient "
                     f"norm, reaching train.max_nonfinite_steps={t.max_nonfinite_steps}; stopping. The last good "
                     f"checkpoint is {latest or 'none (no checkpoint was saved)'}")
            log.close()
            return EXIT_NONFINITE
        if t.eval_every > 0 and step % t.eval_every == 0:
            run_evals()
            last_eval = step
        if t.checkpoint_every > 0 and step % t.checkpoint_every == 0 and step < t.steps:  # the last: after the loop
            if finite:
                log.info(f"checkpoint {save()}")
                last_save = step
            else:
                log.info(f"step {step} was skipped (non-finite): no checkpoint written after it")

    if t.eval_every > 0 and last_eval != progress.step:
        run_evals()
    # Even right after a skipped step: it left weights and optimizer as the last good update did, and without
    # this save every rerun would resume from an older checkpoint and repeat the tail.
    if last_save != progress.step:
        log.info(f"checkpoint {save()}")
    log.info(f"done: {progress.step} steps, {progress.tokens:,} tokens, {progress.nonfinite_total} skipped")
    log.close()
    return 0


# ----------------------------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m megasynth.train", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        # The docstring's first two paragraphs: what this is and the command lines that run it.
        description="\n\n".join(__doc__.split("\n\n")[:2])
        + "\n\nEvery config key below can be overridden as --section.key=VALUE.",
        epilog="config keys (defaults shown):\n" + describe_config(),
    )
    parser.add_argument("--config", help="TOML config file (see examples/configs/); defaults apply where it is silent")
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return train(cfg)


if __name__ == "__main__":
    sys.exit(main())
