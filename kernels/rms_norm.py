"""RMSNorm over the last dimension, y = x / sqrt(mean(x^2) + eps) * weight: `rms_norm` (dispatches, _dispatch.py)
and its PyTorch reference `rms_norm_ref`."""

from __future__ import annotations

import torch

from ._dispatch import use_triton


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    # Statistics in fp32 whatever the input dtype, as Llama and Qwen3 do; output in the input dtype.
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    if use_triton(x, weight):
        from ._rms_norm_triton import rms_norm_triton  # noqa: PLC0415 (the Triton path is optional)

        return rms_norm_triton(x, weight, eps)
    return rms_norm_ref(x, weight, eps)
