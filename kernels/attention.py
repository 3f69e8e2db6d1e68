"""Attention with QK-norm and RoPE applied inside: the public entry point and its PyTorch reference.

    qknorm_rope_attention(q, k, v, q_norm_weight, k_norm_weight, cos, sin, *,
                          cu_seqlens=None, max_seqlen=None, causal=True, eps=1e-6, softmax_scale=None)

Batched form: q [B, S, Hq, D], k/v [B, S, Hkv, D], cos/sin [S, D/2] or [B, S, D/2] -> out [B, S, Hq, D].
Packed form (cu_seqlens int32 [N+1]): q [T, Hq, D], k/v [T, Hkv, D], cos/sin [T, D/2]; attention never crosses
a document boundary. q and k are RMS-normalised over D, scaled by their weight [D] (shared by all heads), then
rotated (rotate-half), then softmax(q k^T * scale) v, causal by default, scale 1/sqrt(D) by default.
"""

from __future__ import annotations

import math

import torch

from ._dispatch import use_triton
from .rms_norm import rms_norm_ref
from .rope import apply_rope_ref


def _attention_math_ref(q, k, v, mask, scale):
    """q [B, Hq, S, D], k/v [B, Hkv, S, D], mask [B|1, 1, S, S] bool (True = attend) -> [B, Hq, S, D]."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # A row with no visible key (cannot happen for causal attention) would be NaN; keep it 0 instead.
    probs = torch.nan_to_num(probs, nan=0.0)
    return (probs @ v.float()).to(q.dtype)


def qknorm_rope_attention_ref(
    q, k, v, q_norm_weight, k_norm_weight, cos, sin, *,
    cu_seqlens=None, max_seqlen=None, causal=True, eps=1e-6, softmax_scale=None,
):
    packed = cu_seqlens is not None
    if packed:  # view the packed tokens as one batch row whose mask is block-diagonal over documents
        q, k, v, cos, sin = q[None], k[None], v[None], cos[None], sin[None]
    batch, seq, _, head_dim = q.shape
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    q = apply_rope_ref(rms_norm_ref(q, q_norm_weight, eps), cos, sin)
    k = apply_rope_ref(rms_norm_ref(k, k_norm_weight, eps), cos, sin)
    idx = torch.arange(seq, device=q.device)
    mask = torch.ones(seq, seq, dtype=torch.bool, device=q.device)
    if causal:
        mask = idx[:, None] >= idx[None, :]
    if packed:
        doc = torch.searchsorted(cu_seqlens[1:].to(idx.device), idx, right=True)
        mask = mask & (doc[:, None] == doc[None, :])
    out = _attention_math_ref(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask[None, None], scale)
    out = out.transpose(1, 2)
    return out[0] if packed else out


def qknorm_rope_attention(
    q, k, v, q_norm_weight, k_norm_weight, cos, sin, *,
    cu_seqlens=None, max_seqlen=None, causal=True, eps=1e-6, softmax_scale=None,
):
    kwargs = dict(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, causal=causal, eps=eps, softmax_scale=softmax_scale)
    if use_triton(q, k, v, q_norm_weight, k_norm_weight):
        from ._attention_triton import qknorm_rope_attention_triton  # noqa: PLC0415

        return qknorm_rope_attention_triton(q, k, v, q_norm_weight, k_norm_weight, cos, sin, **kwargs)
    return qknorm_rope_attention_ref(q, k, v, q_norm_weight, k_norm_weight, cos, sin, **kwargs)
