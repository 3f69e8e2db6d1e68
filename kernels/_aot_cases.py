"""The case table of the ahead-of-time check (aot.py): every public Triton entry point, forward and backward, over
the configurations a GPU run would meet (the full and quick matrices: docs/kernels.md)."""

from __future__ import annotations

from functools import partial

import torch

from .aot import Case
from .attention_core import max_seqlen_of

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
FULL_ARCHS = (80, 89, 90)
QUICK_ARCHS = (80, 90)


def _backward(outputs) -> None:
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    torch.autograd.backward(outputs, [torch.empty_like(o) for o in outputs])


def _leaf(*shape, dtype) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype).requires_grad_()


# -- per kernel -----------------------------------------------------------------------------------------------------
def _rms_norm(dtype: str, hidden: int) -> None:
    from ._rms_norm_triton import rms_norm_triton  # noqa: PLC0415

    x = _leaf(64, hidden, dtype=DTYPES[dtype])
    w = _leaf(hidden, dtype=DTYPES[dtype])
    _backward(rms_norm_triton(x, w, 1e-6))


def _swiglu(dtype: str) -> None:
    from ._swiglu_triton import swiglu_triton  # noqa: PLC0415

    gate, up = _leaf(4096, dtype=DTYPES[dtype]), _leaf(4096, dtype=DTYPES[dtype])
    _backward(swiglu_triton(gate, up))


def _linear_ce(dtype: str, vocab: int) -> None:
    from ._cross_entropy_triton import linear_cross_entropy_triton  # noqa: PLC0415

    # The host code multiplies for real (torch.mm on these CPU tensors): keep N x H small. Zeros, so no NaN.
    hidden = torch.zeros(8, 64, dtype=DTYPES[dtype], requires_grad=True)
    weight = torch.zeros(vocab, 64, dtype=DTYPES[dtype], requires_grad=True)
    targets = torch.zeros(8, dtype=torch.long)
    linear_cross_entropy_triton(hidden, weight, targets).backward()  # WRITE_GRAD=True
    with torch.no_grad():
        linear_cross_entropy_triton(hidden, weight, targets)  # WRITE_GRAD=False


def _attention_inputs(dtype, head_dim, varlen, n_q_heads=8, n_kv_heads=2, seq=2048, batch=2):
    """q [B,S,Hq,D] / k,v [B,S,Hkv,D], or packed [T,...] with int32 cu_seqlens of uneven documents."""
    dt = DTYPES[dtype]
    if varlen:
        tokens = batch * seq
        cu = torch.tensor([0, 300, 1800, tokens - 1000, tokens], dtype=torch.int32)
        lead = (tokens,)
    else:
        cu, lead = None, (batch, seq)
    q = _leaf(*lead, n_q_heads, head_dim, dtype=dt)
    k = _leaf(*lead, n_kv_heads, head_dim, dtype=dt)
    v = _leaf(*lead, n_kv_heads, head_dim, dtype=dt)
    max_seqlen = max_seqlen_of(cu) if varlen else None
    return q, k, v, cu, max_seqlen, seq


def _qknorm_rope(dtype: str, head_dim: int, varlen: bool) -> None:
    from ._qknorm_rope_triton import qknorm_rope_triton  # noqa: PLC0415

    q, k, _, _, _, seq = _attention_inputs(dtype, head_dim, varlen)
    rows = q.shape[0] if varlen else seq  # packed: one position per token; batched: per position
    cos = torch.empty(rows, head_dim // 2, dtype=torch.float32)
    sin = torch.empty(rows, head_dim // 2, dtype=torch.float32)
    wq, wk = _leaf(head_dim, dtype=q.dtype), _leaf(head_dim, dtype=q.dtype)
    _backward(tuple(qknorm_rope_triton(q, k, wq, wk, cos, sin, eps=1e-6, q_scale=head_dim**-0.5)))


def _flash_attention(dtype: str, head_dim: int, varlen: bool, causal: bool, deterministic: bool) -> None:
    from ._flash_attn_triton import flash_attention_triton  # noqa: PLC0415

    q, k, v, cu, max_seqlen, _ = _attention_inputs(dtype, head_dim, varlen)
    _backward(flash_attention_triton(q, k, v, cu_seqlens=cu, max_seqlen=max_seqlen, causal=causal,
                                     deterministic=deterministic))


# -- the table ------------------------------------------------------------------------------------------------------
def cases(quick: bool = False) -> list[Case]:
    archs = QUICK_ARCHS if quick else FULL_ARCHS
    out: list[Case] = []
    hiddens = [("bf16", 128), ("fp16", 4096)] if quick else [
        (d, h) for d in DTYPES for h in (64, 128, 256, 2048, 4096, 8192, 16384, 65536)]
    out += [Case("rms_norm", (("dtype", d), ("hidden", h)), partial(_rms_norm, d, h), archs) for d, h in hiddens]
    out += [Case("swiglu", (("dtype", d),), partial(_swiglu, d), archs) for d in DTYPES]
    vocabs = [("bf16", 32768), ("fp16", 1000)] if quick else [(d, v) for d in DTYPES for v in (1000, 32768, 128256)]
    out += [Case("linear_cross_entropy", (("dtype", d), ("vocab", v)), partial(_linear_ce, d, v), archs) for d, v in vocabs]
    if quick:  # the attention matrix: (dtype, head_dim, varlen, causal) points
        points = [(d, hd, v, c) for hd in (64, 128, 256) for d, v, c in (("bf16", True, True), ("fp16", False, False))]
    else:
        points = [(d, hd, v, c) for d in DTYPES for hd in (64, 128, 256) for v in (False, True) for c in (True, False)]
    # The attention kernels' config tables have their own sm_86/89 entries (99 KB of shared memory), so even the
    # quick matrix checks them on FULL_ARCHS; the other kernels' configs do not depend on the architecture's limits.
    # The pre-pass has no causal axis: one case per (dtype, head_dim, layout).
    for d, hd, v in dict.fromkeys((d, hd, v) for d, hd, v, _ in points):
        params = (("dtype", d), ("head_dim", hd), ("layout", "varlen" if v else "batched"))
        out.append(Case("qknorm_rope", params, partial(_qknorm_rope, d, hd, v), FULL_ARCHS))
    for d, hd, v, c in points:
        # Quick: the Latin square of docs/kernels.md; full: both backward modes everywhere.
        modes = [(d == "bf16") == (hd == 128)] if quick else [False, True]
        for det in modes:
            params = (("dtype", d), ("head_dim", hd), ("layout", "varlen" if v else "batched"), ("causal", c),
                      ("deterministic", det))
            out.append(Case("flash_attention", params, partial(_flash_attention, d, hd, v, c, det), FULL_ARCHS))
    return out
