"""The pretraining loop. One process or many, the same command line:

    python -m megasynth.train --config examples/configs/tiny.toml --data.data_path=data/train --train.steps=100
    torchrun --nproc-per-node 8 -m megasynth.train --config examples/configs/llama-1b.toml --parallel.tp=2

`--help` lists every config key. Read top to bottom: setup (process group, model, optimizer, data, resume),
then the loop (batch -> accumulated forward/backward -> clip -> step -> log / eval / checkpoint).

Decisions worth knowing:
- Weight decay applies to every parameter with 2+ dimensions (projection matrices and the embedding, as in
  Llama and nanoGPT), never to norm weights.
- The loss of a step is the mean over every labelled token of the global batch: each micro-batch's mean is
  weighted by its share of the step's labelled tokens (counted across dp ranks), so micro-batches with
  different numbers of targets (loss masks, SFT data) are weighted correctly.
- A step whose loss or gradient norm is not finite is skipped: gradients are dropped, the optimizer does not
  move, but the step number, the data position and the LR schedule advance (the LR stays a pure function of the
  step, and the offending batch is not retried). `train.max_nonfinite_steps` such steps in a row stop the run
  with exit code 3. A periodic checkpoint is never written right after a skipped step; the end-of-run one is
  written whenever progress is unsaved, skipped last step or not (the weights are then those of the last good
  update), so a finished run is finished and a rerun does not repeat its tail.
- One trainer per run directory: rank 0 holds an exclusive lock on RUN_DIR/.lock for the whole run
  (megasynth/run_lock.py); a second trainer is refused before it touches anything, naming the holder.
- Before any step, every training and held-out prefix's largest token id, and the tokenizer named by the first
  source's sidecar, must fit model.vocab_size (an id past the embedding would otherwise kill the run when first
  reached: an IndexError on the CPU, a device-side assert on a GPU).
- Exit codes: 0 done, 2 bad configuration or input, or a run directory in use (one line, no traceback),
  3 too many non-finite steps, 4 a checkpoint could not be saved (e.g. disk full: one line; the temp
  directory is removed and the last good checkpoint stays the newest).
- Checkpoints are verified against their checksums before loading; train.resume=auto skips damaged ones
  (saying so) for the newest intact one. Temp directories of crashed saves are removed at start-up.
- Test-only fault injection: MEGASYNTH_FAULT_NAN_AT_STEP="5,7-9" makes those steps' losses NaN.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from megasynth import checkpoint
from megasynth.config import Config, ConfigError, config_to_dict, describe_config, load_config, save_config
from megasynth.data.loader import DistributedBatchLoader, accumulation_steps, build_train_dataset, data_sources
from megasynth.distributed import DistInfo, all_reduce_sum, destroy_distributed, init_distributed
from megasynth.io import atomic_dir, fsync_dir
from megasynth.metrics import MetricsLogger, ThroughputMeter, memory_gb, peak_flops
from megasynth.model import build_model, flops_per_token
from megasynth.parallelize import loss_parallel_context, parallelize_model
from megasynth.run_lock import RunDirBusy, RunLock, acquire_run_lock
from megasynth.schedule import build_lr_scheduler
from megasynth.tokenizer import load_tokenizer

EVAL_SEED = 0  # held-out samples are the same at every evaluation and in every run
EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_SAVE_FAILED = 2, 3, 4


class SetupError(ValueError):
    """A problem with the run's inputs found before training starts (printed as one line, exit code 2)."""


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


def copy_tokenizer(first_prefix: str, run_dir: Path) -> dict | None:
    """Copy the tokenizer named by the first source's sidecar into RUN_DIR/tokenizer; return its identity."""
    sidecar = Path(f"{first_prefix}.json")
    try:
        tok = json.loads(sidecar.read_text()).get("tokenizer")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(tok, dict):
        return None
    try:
        tokenizer = load_tokenizer(tok["path"])
        with atomic_dir(run_dir / "tokenizer", replace=True) as tmp:  # complete before it takes the final name
            tokenizer.save(tmp)
        return tokenizer.identity()
    except Exception as e:  # the run does not need the tokenizer; tools that sample from it will say so
        print(f"warning: could not copy the tokenizer named in {sidecar} ({e}); RUN_DIR/tokenizer is absent",
              file=sys.stderr)
        return tok


def _fault_steps(name: str) -> set[int]:
    """Steps listed in a test-only env var: "5", "5,7", "3-6"."""
    steps: set[int] = set()
    for part in filter(None, os.environ.get(name, "").replace(" ", "").split(",")):
        lo, _, hi = part.partition("-")
        steps.update(range(int(lo), int(hi or lo) + 1))
    return steps


def _rank0_first(info: DistInfo, fn):
    """Run fn on rank 0 first (it builds caches), then on the other ranks (they read them)."""
    if info.world_size == 1:
        return fn()
    result, error = None, None
    if info.rank == 0:
        try:
            result = fn()
        except Exception as e:  # still reach the barrier, so the other ranks do not hang
            error = e
    torch.distributed.barrier()
    if error is not None:
        raise error
    return fn() if info.rank != 0 else result


def lock_run_dir(run_dir: Path, info: DistInfo) -> RunLock | None:
    """Rank 0 takes the run directory's lock (see megasynth/run_lock.py) and tells every rank whether it got
    it, so that all ranks stop together (SetupError, the same message) instead of waiting for rank 0 in a
    collective. Returns the lock on rank 0, None elsewhere."""
    lock, refusal = None, None
    if info.is_main:
        try:
            lock = acquire_run_lock(run_dir)
        except (RunDirBusy, OSError) as e:
            refusal = str(e)
    if info.distributed:
        box = [refusal]
        torch.distributed.broadcast_object_list(box, src=0)
        refusal = box[0]
    if refusal is not None:
        raise SetupError(refusal)
    return lock


def tokenizer_vocab_size(metadata: dict | None) -> int | None:
    """The vocabulary size a prefix's sidecar records for its tokenizer (None when it records none)."""
    meta = metadata or {}
    tok = meta.get("tokenizer")
    size = tok.get("vocab_size") if isinstance(tok, dict) else None
    size = meta.get("vocab_size") if size is None else size
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def check_vocabulary(cfg: Config, cache_dir: Path) -> None:
    """Refuse data or a tokenizer that does not fit model.vocab_size, naming the prefix, the id and the key.
    A prefix whose sidecar does not record its largest id (Megatron's files) is scanned once; the result is
    cached in `cache_dir` beside the sample indices."""
    from megasynth.data.indexed import IndexedDataset  # noqa: PLC0415

    vocab = cfg.model.vocab_size
    prefixes = [s.path for s in data_sources(cfg.data)] + list(cfg.data.valid_paths)
    for i, prefix in enumerate(prefixes):
        ds = IndexedDataset(prefix, cache_dir=cache_dir)
        tok_vocab = tokenizer_vocab_size(ds.metadata) if i == 0 else None
        if tok_vocab is not None and tok_vocab > vocab:
            raise SetupError(f"{prefix}: its tokenizer has {tok_vocab} ids (sidecar {prefix}.json) but "
                             f"model.vocab_size={vocab}; set --model.vocab_size={tok_vocab} (or more)")
        top = ds.max_token_id  # -1 for an empty prefix
        if top >= vocab:
            raise SetupError(f"{prefix}: its largest token id is {top} but model.vocab_size={vocab} (ids must be "
                             f"below it); set --model.vocab_size={top + 1} (or more), or re-tokenize the data")


def find_resume_checkpoint(cfg: Config, checkpoints_dir: Path, say=print) -> Path | None:
    """The verified checkpoint to resume from, or None. 'auto' passes over damaged checkpoints (saying so
    through `say`) to the newest intact one; an explicit path is verified and never falls back; 'none' starts
    over (`set_aside_earlier_run` has moved an earlier run's checkpoints out of the way first)."""
    resume = cfg.train.resume
    if resume == "auto":
        return checkpoint.find_latest_intact(checkpoints_dir, say=say)
    if resume == "none":
        existing = checkpoint.find_latest(checkpoints_dir)
        if existing is not None:  # only when set_aside_earlier_run was skipped: never mix two runs
            raise SetupError(f"train.resume='none' but {checkpoints_dir} holds checkpoints of an earlier run (newest "
                             f"{existing.name}); use --train.resume=auto to continue it, or another train.run_dir")
        return None
    return checkpoint.verify_checkpoint(resume)


# What an earlier run left in a run directory that a fresh run (train.resume='none') would mix with or replace.
EARLIER_RUN_FILES = ("checkpoints", "metrics.jsonl")


def set_aside_earlier_run(run_dir: Path, say=print) -> Path | None:
    """Starting over (train.resume='none') in a run directory that holds an earlier run's checkpoints or metrics:
    move them, whole, to RUN_DIR/earlier_runs/UTC-TIME/ and say so. Nothing is deleted: the user removes that
    folder when it is no longer wanted. Returns the folder, or None when there was nothing to move."""
    present = [name for name in EARLIER_RUN_FILES
               if (run_dir / name).is_file() or ((run_dir / name).is_dir() and any((run_dir / name).iterdir()))]
    if not present:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = run_dir / "earlier_runs" / stamp
    n = 1
    while dest.exists():  # two restarts within a second
        dest, n = run_dir / "earlier_runs" / f"{stamp}-{n}", n + 1
    dest.mkdir(parents=True)
    for name in present:
        os.replace(run_dir / name, dest / name)  # one filesystem: a rename, never a copy
    fsync_dir(run_dir)
    say(f"train.resume=none: moved the earlier run's {' and '.join(present)} to {dest} (delete it when no longer "
        f"needed); starting over")
    return dest


# How attention is computed, not what the model is: a run may resume on another machine with another kernel.
_IMPLEMENTATION_FIELDS = ("attention", "attention_core")


def check_same_model(ckpt: Path, cfg: Config) -> None:
    saved = load_config(ckpt / "config.toml").model
    diff = [f"model.{k}: {v!r} in the checkpoint, {getattr(cfg.model, k)!r} now"
            for k, v in asdict(saved).items() if getattr(cfg.model, k) != v and k not in _IMPLEMENTATION_FIELDS]
    if diff:
        raise SetupError(f"{ckpt}: the checkpoint's model differs from the configured one: " + "; ".join(diff))


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
    nan_steps = _fault_steps("MEGASYNTH_FAULT_NAN_AT_STEP")

    # ---- setup: everything here is input checking; its errors are one line and exit code 2
    log = None
    try:
        log = MetricsLogger(run_dir, rank=info.rank, log_cfg=cfg.log, total_steps=t.steps,
                            config=config_to_dict(cfg))
        try:
            accumulation_steps(t.global_batch_size, t.micro_batch_size, info.dp_size)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else run_dir / "index_cache"
        _rank0_first(info, lambda: check_vocabulary(cfg, cache_dir))  # rank 0 first: it may cache largest ids
        if info.is_main:  # the run directory is locked: no save of ours is in flight
            checkpoint.remove_stale_saves(ckpt_dir)
        if t.resume == "none":
            _rank0_first(info, lambda: set_aside_earlier_run(run_dir, say=log.info) if info.is_main else None)
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

        dataset = _rank0_first(info, lambda: build_train_dataset(
            cfg.data, num_samples=max(1, t.steps * t.global_batch_size), seed=t.seed, cache_dir=cache_dir))
        loader = DistributedBatchLoader(
            dataset, global_batch_size=t.global_batch_size, micro_batch_size=t.micro_batch_size,
            dp_rank=info.dp_rank, dp_size=info.dp_size, fingerprint=getattr(dataset, "fingerprint", ""),
            document_masking=cfg.data.document_masking, device=device, num_workers=cfg.data.num_workers)
        eval_sets = _rank0_first(info, lambda: build_eval_sets(cfg, info, cache_dir)) if t.eval_every > 0 else []

        progress = Progress()
        if resume_from is not None:
            parts = checkpoint.load_checkpoint(resume_from, model=model, optimizer=optimizer, verify=False)
            scheduler.load_state_dict(parts["scheduler"])
            loader.load_state_dict(parts["data"], allow_fingerprint_change=cfg.data.allow_blend_change)
            rng = (parts["rng"] or {}).get(f"rank_{info.rank}")
            if rng is not None:  # absent when resuming on more ranks than saved; nothing in training draws from it
                checkpoint.set_rng_state(rng)
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
    n_params = sum(p.numel() for p in model.parameters())
    log.info(f"model: {n_params / 1e6:.2f}M parameters | dp={info.dp_size} tp={info.tp_size} | "
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
                 "rng": checkpoint.gather_rng_states(), "progress": asdict(progress)}
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
