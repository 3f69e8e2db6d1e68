"""Choose between a kernel's Triton implementation and its PyTorch reference (`MEGASYNTH_KERNELS`: docs/kernels.md)."""

from __future__ import annotations

import os

import torch

_VALID = ("auto", "triton", "reference")


def kernel_mode() -> str:
    mode = os.environ.get("MEGASYNTH_KERNELS", "auto").strip().lower()
    if mode not in _VALID:
        raise ValueError(f"MEGASYNTH_KERNELS={mode!r}: expected one of {', '.join(_VALID)}")
    return mode


def _is_dtensor(t: torch.Tensor) -> bool:
    # DTensor subclasses torch.Tensor; its ops dispatch through sharding propagation, which a raw Triton launch
    # would bypass, so DTensors always take the reference path (their local shards can use local_map later).
    return type(t).__name__ == "DTensor"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """True when the Triton implementation should run for these inputs."""
    mode = kernel_mode()
    if mode == "reference":
        return False
    if mode == "triton":
        if not triton_available():
            raise RuntimeError("MEGASYNTH_KERNELS=triton but triton is not importable")
        return True
    return triton_available() and all(t.is_cuda and not _is_dtensor(t) for t in tensors if t is not None)
