"""Fused QK-norm + RoPE pre-pass: the public entry point, its PyTorch reference and the shared input checks.

    q_hat, k_hat = qknorm_rope(q, k, q_norm_weight, k_norm_weight, cos, sin, *, eps=1e-6, q_scale=1.0)

q_hat = rope(rms_norm(q) * q_norm_weight) * q_scale, k_hat = rope(rms_norm(k) * k_norm_weight) per (token, head)
in fp32; shapes and limits: docs/kernels.md.
"""

from __future__ import annotations

import math

import torch

from ._dispatch import use_triton
from ._layout import TokenLayout
from .rms_norm import rms_norm_ref
from .rope import apply_rope_ref

_NAME = "qknorm_rope"


def check_inputs(q, k, q_norm_weight, k_norm_weight, cos, sin, eps, q_scale) -> TokenLayout:
    """Validate shapes, devices, eps and q_scale (shared by the reference and the Triton path) -> the layout."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or not eps > 0:
        raise ValueError(f"{_NAME}: eps must be a finite number > 0, got {eps!r} (eps = 0 divides by zero on an "
                         "all-zero head vector)")
    if isinstance(q_scale, bool) or not isinstance(q_scale, (int, float)) or not math.isfinite(q_scale):
        raise ValueError(f"{_NAME}: q_scale must be a finite number, got {q_scale!r}")
    named = (("q", q), ("k", k), ("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight),
             ("cos", cos), ("sin", sin))
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{_NAME}: {name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{_NAME}: {name} must be floating point, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{_NAME}: {name} on {t.device} but q on {q.device}")
    if q.dim() not in (3, 4):
        raise ValueError(f"{_NAME}: q has shape {tuple(q.shape)}; expected [B, S, Hq, D] or packed [T, Hq, D]")
    if k.dim() != q.dim() or k.shape[:-2] != q.shape[:-2] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"{_NAME}: k has shape {tuple(k.shape)}, expected {tuple(q.shape[:-2])} + (Hkv, "
                         f"{q.shape[-1]}) to match q {tuple(q.shape)}")
    if q.dtype != k.dtype:
        raise ValueError(f"{_NAME}: q is {q.dtype} but k is {k.dtype}; they must share one dtype")
    head_dim = q.shape[-1]
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"{_NAME}: head_dim (last dim of q, k) must be even and >= 2 for RoPE, got {head_dim}")
    for name, w in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
        if w.shape != (head_dim,):
            raise ValueError(f"{_NAME}: {name} has shape {tuple(w.shape)}, expected ({head_dim},) = head_dim")
    packed = q.dim() == 3
    batch, seq = (1, q.shape[0]) if packed else (q.shape[0], q.shape[1])
    allowed = [(seq, head_dim // 2)] + ([] if packed else [(batch, seq, head_dim // 2)])
    for name, t in (("cos", cos), ("sin", sin)):
        if tuple(t.shape) not in allowed:
            want = " or ".join(str(list(s)) for s in allowed)
            raise ValueError(f"{_NAME}: {name} has shape {tuple(t.shape)}, expected {want} for "
                             f"{'packed' if packed else 'batched'} q {tuple(q.shape)}")
    if cos.shape != sin.shape:
        raise ValueError(f"{_NAME}: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have one shape")
    return TokenLayout(packed, batch, seq, q.shape[-2], k.shape[-2], head_dim)


def _norm_rope_ref(x, weight, cos, sin, eps, scale):
    # rms_norm_ref then apply_rope_ref on fp32 input: the same operations, minus the rounding to x.dtype between.
    y = apply_rope_ref(rms_norm_ref(x.float(), weight, eps), cos, sin)
    if scale != 1.0:
        y = y * scale
    return y.to(x.dtype)


def qknorm_rope_ref(q, k, q_norm_weight, k_norm_weight, cos, sin, *, eps=1e-6, q_scale=1.0):
    """PyTorch reference of the pre-pass (see the module docstring): -> (q_hat, k_hat), fp32 math."""
    check_inputs(q, k, q_norm_weight, k_norm_weight, cos, sin, eps, q_scale)
    return (_norm_rope_ref(q, q_norm_weight, cos, sin, eps, float(q_scale)),
            _norm_rope_ref(k, k_norm_weight, cos, sin, eps, 1.0))


def qknorm_rope(q, k, q_norm_weight, k_norm_weight, cos, sin, *, eps=1e-6, q_scale=1.0):
    """QK-norm + RoPE (see the module docstring): Triton on CUDA tensors, the reference elsewhere (_dispatch.py)."""
    if use_triton(q, k, q_norm_weight, k_norm_weight):
        from ._qknorm_rope_triton import qknorm_rope_triton  # noqa: PLC0415 (the Triton path is optional)

        return qknorm_rope_triton(q, k, q_norm_weight, k_norm_weight, cos, sin, eps=eps, q_scale=q_scale)
    return qknorm_rope_ref(q, k, q_norm_weight, k_norm_weight, cos, sin, eps=eps, q_scale=q_scale)
