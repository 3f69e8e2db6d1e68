"""Attention with QK-norm and RoPE: the public entry point (pre-pass + attention core) and its PyTorch reference.

    qknorm_rope_attention(q, k, v, q_norm_weight, k_norm_weight, cos, sin, *,
                          cu_seqlens=None, max_seqlen=None, causal=True, eps=1e-6, softmax_scale=None, core="auto")

Shapes and the two steps (qknorm_rope.py, then attention_core.py): docs/kernels.md.
"""

from __future__ import annotations

import torch

from .attention_core import flash_attention_ref, run_core, select_core
from .qknorm_rope import qknorm_rope, qknorm_rope_ref


def qknorm_rope_attention_ref(q, k, v, q_norm_weight, k_norm_weight, cos, sin, *, cu_seqlens=None, max_seqlen=None,
                              causal=True, eps=1e-6, softmax_scale=None, core="auto"):
    """The same two steps in plain PyTorch: qknorm_rope_ref, then flash_attention_ref (a dense masked softmax).
    `core` is accepted for signature parity and ignored; max_seqlen is not needed."""
    q_hat, k_hat = qknorm_rope_ref(q, k, q_norm_weight, k_norm_weight, cos, sin, eps=eps)
    return flash_attention_ref(q_hat, k_hat, v, cu_seqlens=cu_seqlens, causal=causal, softmax_scale=softmax_scale)


def qknorm_rope_attention(q, k, v, q_norm_weight, k_norm_weight, cos, sin, *, cu_seqlens=None, max_seqlen=None,
                          causal=True, eps=1e-6, softmax_scale=None, core="auto"):
    """The fused pre-pass (qknorm_rope), then the attention core `core` ("auto" or one of attention_core.CORES;
    see choose_core). max_seqlen: as for run_core (None costs one device synchronisation per call)."""
    if not isinstance(q, torch.Tensor) or q.dim() < 1:
        raise ValueError(f"qknorm_rope_attention: q must be a tensor [B, S, Hq, D] or [T, Hq, D], got {q!r:.80}")
    # Chosen before any work, so a core that cannot serve these inputs fails without computing anything.
    name = select_core(core, q, varlen=cu_seqlens is not None, tensors=(k, v, q_norm_weight, k_norm_weight))
    q_hat, k_hat = qknorm_rope(q, k, q_norm_weight, k_norm_weight, cos, sin, eps=eps)
    return run_core(name, q_hat, k_hat, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, causal=causal,
                    scale=softmax_scale)
