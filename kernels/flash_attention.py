"""Flash-attention core: the public entry point and its PyTorch reference (no QK-norm, no RoPE: see qknorm_rope.py).

    flash_attention(q, k, v, *, cu_seqlens=None, max_seqlen=None, causal=True, softmax_scale=None,
                    deterministic=None) -> out

Batched form: q [B, S, Hq, D], k/v [B, S, Hkv, D] -> out [B, S, Hq, D].
Packed form (cu_seqlens int32 [N+1], offsets of N documents; empty documents allowed): q [T, Hq, D],
k/v [T, Hkv, D] -> out [T, Hq, D]; attention never crosses a document. max_seqlen (the longest document) is
accepted for the flash-attn varlen calling convention; neither implementation needs it.
out = softmax(q k^T * softmax_scale) v per head, causal by default, softmax_scale 1/sqrt(D) by default; Hq a
multiple of Hkv (GQA: q head h reads kv head h // (Hq / Hkv)); D <= 256; fp16/bf16/fp32, output in that dtype.

deterministic chooses the Triton backward, following PyTorch's convention: None (default) reads
torch.are_deterministic_algorithms_enabled() when the forward runs. False: FlashAttention-2's single pass, 5 matmuls
per (query tile, key tile) pair, dQ summed across key tiles with fp32 atomics in an extra 4 * tokens * Hq * D-byte
buffer, so dQ's last bits vary from run to run on a GPU. True: a second kernel recomputes S and dP for dQ, 7
matmuls per pair (about 1.4x the backward's matmul work) and bit-identical gradients run to run. The forward is
the same either way; the reference ignores the argument (it is deterministic).

The Triton kernels (kernels/_flash_attn_triton.py) run on CUDA tensors, the reference elsewhere; see _dispatch.py.
"""

from __future__ import annotations

import math

import torch

from ._dispatch import use_triton


def flash_attention_ref(q, k, v, *, cu_seqlens=None, max_seqlen=None, causal=True, softmax_scale=None,
                        deterministic=None):
    """The same contract in plain PyTorch math: scores in fp32 (float64 for float64 inputs), one dense
    [B, Hq, S, S] score tensor, documents as a block-diagonal mask. For tests and CPU runs, not for speed.
    deterministic is accepted for the common signature and ignored."""
    packed = cu_seqlens is not None
    if packed:  # view the packed tokens as one batch row whose mask is block-diagonal over documents
        q, k, v = q[None], k[None], v[None]
    seq, heads_q, head_dim = q.shape[1], q.shape[2], q.shape[3]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    compute = torch.promote_types(q.dtype, torch.float32)
    group = heads_q // k.shape[2]
    qh = q.transpose(1, 2).to(compute)  # [B, Hq, S, D]
    kh = k.transpose(1, 2).to(compute).repeat_interleave(group, dim=1)
    vh = v.transpose(1, 2).to(compute).repeat_interleave(group, dim=1)
    idx = torch.arange(seq, device=q.device)
    mask = torch.ones(seq, seq, dtype=torch.bool, device=q.device)
    if causal:
        mask = idx[:, None] >= idx[None, :]
    if packed:
        doc = torch.searchsorted(cu_seqlens[1:].to(idx.device), idx, right=True)
        mask = mask & (doc[:, None] == doc[None, :])
    scores = (qh @ kh.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    # Every row sees at least its own token (causal) or its own document, so no row is all -inf.
    out = (torch.softmax(scores, dim=-1) @ vh).to(q.dtype).transpose(1, 2)
    return out[0] if packed else out


def flash_attention(q, k, v, *, cu_seqlens=None, max_seqlen=None, causal=True, softmax_scale=None,
                    deterministic=None):
    """Attention core on already-prepared q, k, v (shapes and the deterministic modes in the module docstring);
    differentiable in q, k, v."""
    kwargs = {"cu_seqlens": cu_seqlens, "max_seqlen": max_seqlen, "causal": causal, "softmax_scale": softmax_scale,
              "deterministic": deterministic}
    if use_triton(q, k, v):
        # Imported here so that Triton is needed only when used.
        from ._flash_attn_triton import flash_attention_triton

        return flash_attention_triton(q, k, v, **kwargs)
    return flash_attention_ref(q, k, v, **kwargs)
