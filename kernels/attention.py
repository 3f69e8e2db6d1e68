"""Attention with QK-norm and RoPE: the public entry point (pre-pass + attention core) and its PyTorch reference.

    qknorm_rope_attention(q, k, v, q_norm_weight, k_norm_weight, cos, sin, *,
                          cu_seqlens=None, max_seqlen=None, causal=True, eps=1e-6, softmax_scale=None, core="auto")

Batched form: q [B, S, Hq, D], k/v [B, S, Hkv, D], cos/sin [S, D/2] or [B, S, D/2] -> out [B, S, Hq, D].
Packed form (cu_seqlens int32 [N+1]): q [T, Hq, D], k/v [T, Hkv, D], cos/sin [T, D/2]; attention never crosses
a document boundary. q and k are RMS-normalised over D, scaled by their weight [D] (shared by all heads), then
rotated (rotate-half), then softmax(q k^T * scale) v, causal by default, scale 1/sqrt(D) by default.

Two steps (issue 14): the fused QK-norm + RoPE pre-pass (qknorm_rope.py, memory-bound, one read of q and k and one
write of q_hat and k_hat) and a standard attention core on (q_hat, k_hat, v) chosen per machine (attention_core.py:
flash-attn, SDPA cuDNN / flash, our Triton flash kernel, or the reference). Gradients reach q, k, v and both norm
weights through the two steps' own autograd; cos/sin are constants.
"""

from __future__ import annotations

import math

import torch

from .attention_core import run_core, select_core
from .flash_attention import flash_attention_ref
from .qknorm_rope import qknorm_rope, qknorm_rope_ref

_NAME = "qknorm_rope_attention"


def _check_eps(eps) -> float:
    # eps = 0 divides by zero on an all-zero row (padding): rsqrt(0) = inf, then 0 * inf = NaN in the gradients.
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"{_NAME}: eps must be a finite number > 0, got {eps!r}")
    return float(eps)


def qknorm_rope_attention_ref(
    q, k, v, q_norm_weight, k_norm_weight, cos, sin, *,
    cu_seqlens=None, max_seqlen=None, causal=True, eps=1e-6, softmax_scale=None, core="auto",
):
    """The same two steps in plain PyTorch: qknorm_rope_ref, then flash_attention_ref (a dense masked softmax).
    `core` is accepted for signature parity and ignored; max_seqlen is not needed."""
    eps = _check_eps(eps)
    q_hat, k_hat = qknorm_rope_ref(q, k, q_norm_weight, k_norm_weight, cos, sin, eps=eps)
    return flash_attention_ref(q_hat, k_hat, v, cu_seqlens=cu_seqlens, causal=causal, softmax_scale=softmax_scale)


def qknorm_rope_attention(
    q, k, v, q_norm_weight, k_norm_weight, cos, sin, *,
    cu_seqlens=None, max_seqlen=None, causal=True, eps=1e-6, softmax_scale=None, core="auto",
):
    """The fused pre-pass (Triton on CUDA or under MEGASYNTH_KERNELS=triton, the reference otherwise; see
    qknorm_rope.py), then the attention core `core` ("auto" or one of attention_core.CORES; see choose_core).

    max_seqlen (longest document, packed form) is passed to the cores that need it (flash-attn varlen); if it is
    None there, the core computes it from cu_seqlens with one device synchronisation per call, so training code
    computes it once per batch and passes it to every layer."""
    eps = _check_eps(eps)
    if not isinstance(q, torch.Tensor) or q.dim() < 1:
        raise ValueError(f"{_NAME}: q must be a tensor [B, S, Hq, D] or [T, Hq, D], got {q!r:.80}")
    # Chosen before any work, so a core that cannot serve these inputs fails without computing anything.
    name = select_core(core, q, varlen=cu_seqlens is not None, tensors=(k, v, q_norm_weight, k_norm_weight))
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if not math.isfinite(scale):
        raise ValueError(f"{_NAME}: softmax_scale must be finite, got {softmax_scale!r}")
    q_hat, k_hat = qknorm_rope(q, k, q_norm_weight, k_norm_weight, cos, sin, eps=eps)
    return run_core(name, q_hat, k_hat, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, causal=causal, scale=scale)
