"""Learning-rate schedules: linear warmup, then cosine decay, warmup-stable-decay (WSD) or a constant rate.

    scheduler = build_lr_scheduler(optimizer, cfg.optim, total_steps=cfg.train.steps)
    ...
    optimizer.step(); scheduler.step()

The shapes and why a resumed run follows the same rates: docs/training.md ("Learning-rate schedules").
"""

from __future__ import annotations

import math

import torch

from megasynth.config import OptimConfig

SCHEDULES = ("cosine", "wsd", "constant")


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, schedule: str = "cosine",
              min_lr_ratio: float = 0.1, decay_fraction: float = 0.2) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule={schedule!r}: expected one of {', '.join(SCHEDULES)}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if step >= total_steps:
        return min_lr_ratio
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    # WSD (Hu et al. 2024, MiniCPM): hold the peak, then decay over the last decay_fraction of the run. The decay
    # never starts inside the warmup, so a short run with a long warmup decays from the end of the warmup.
    decay_start = max(warmup_steps, total_steps - round(decay_fraction * total_steps))
    if step < decay_start:
        return 1.0
    progress = (step - decay_start) / max(1, total_steps - decay_start)
    return 1.0 - (1.0 - min_lr_ratio) * progress


def build_lr_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig,
                       total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over `lr_factor`; the optimizer's param groups hold the peak rate as their initial lr."""

    # A closure (not a callable object): LambdaLR then saves only its step counter, so a resumed run picks up
    # the schedule of its current config rather than attributes pickled into the checkpoint.
    def factor(step: int) -> float:
        return lr_factor(step, total_steps=total_steps, warmup_steps=optim.warmup_steps, schedule=optim.schedule,
                         min_lr_ratio=optim.min_lr_ratio, decay_fraction=optim.decay_fraction)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
