"""How host code launches a Triton kernel (`launch`), and which GPU architecture its launch configs are planned for
(`target_arch`, `planning_for`: docs/kernels.md)."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

# Opt-in maximum dynamic shared memory per thread block, in bytes.
MAX_SHARED_BYTES = {
    80: 166_912,  # A100 (163 KB)
    86: 101_376,  # RTX 30xx, A10, A40 (99 KB)
    89: 101_376,  # RTX 40xx, L4, L40 (99 KB)
    90: 232_448,  # H100, H200 (227 KB)
    100: 232_448,  # B200, GB200 (227 KB)
    120: 101_376,  # RTX 50xx, RTX PRO Blackwell (99 KB)
}


@dataclass(frozen=True)
class Launch:
    """One kernel launch as host code issued it: enough to run it, or to compile it ahead of time."""

    kernel: Any  # a triton JITFunction (or Autotuner)
    grid: tuple[int, ...] | Callable[[dict], tuple[int, ...]]
    args: tuple
    meta: dict = field(default_factory=dict)  # constexpr values and num_warps / num_stages

    @property
    def name(self) -> str:
        fn = getattr(self.kernel, "fn", self.kernel)  # Autotuner wraps the JITFunction
        return getattr(fn, "__name__", repr(fn))


_PLAN: contextvars.ContextVar[tuple[int, list[Launch]] | None] = contextvars.ContextVar("megasynth_plan", default=None)


def launch(kernel, grid, *args, **meta) -> None:
    """kernel[grid](*args, **meta), or record it when planning ahead of time (then nothing runs)."""
    plan = _PLAN.get()
    if plan is not None:
        plan[1].append(Launch(kernel, grid, args, meta))
        return
    kernel[grid](*args, **meta)


def planning() -> bool:
    """True inside `planning_for`: kernels do not run, so host code must not read their outputs for decisions."""
    return _PLAN.get() is not None


def target_arch(device: torch.device | None = None) -> int | None:
    """Compute capability as major*10+minor (90 = H100) that launch configs should be chosen for: the planned
    architecture inside `planning_for`, the device's own on CUDA, None on the CPU (the interpreter)."""
    plan = _PLAN.get()
    if plan is not None:
        return plan[0]
    if device is not None and device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return major * 10 + minor
    return None


def max_shared_bytes(arch: int) -> int:
    """The shared-memory limit of `arch`; an architecture not listed gets the smallest listed limit (consumer
    parts of every generation have ~99 KB, so guessing high could plan a launch that fails)."""
    return MAX_SHARED_BYTES.get(arch, min(MAX_SHARED_BYTES.values()))


@contextlib.contextmanager
def planning_for(arch: int) -> Iterator[list[Launch]]:
    """Record, instead of running, every launch made inside the block, with configs chosen for `arch`.

    Host code still runs (on CPU tensors of the real shapes and dtypes), so the recorded arguments are exactly
    what a GPU run would pass; kernel outputs stay uninitialised.
    """
    launches: list[Launch] = []
    token = _PLAN.set((arch, launches))
    try:
        yield launches
    finally:
        _PLAN.reset(token)
