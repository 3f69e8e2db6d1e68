"""Fused QK-norm + RoPE pre-pass in Triton, forward and backward: `qknorm_rope_triton` (contract in qknorm_rope.py;
design: docs/kernels.md)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import launch, target_arch
from ._layout import TokenLayout
from .qknorm_rope import _NAME, check_inputs

# (tokens per program, elements per head-chunk step, num_warps), forward then backward, on every architecture;
# under the interpreter 4 tokens and at most 2 heads per step. Why these: docs/kernels.md.
_GPU_CONFIG = ((16, 4096, 8), (16, 2048, 8))
_INTERPRETER_BLOCK_T, _INTERPRETER_BLOCK_H = 4, 2


@triton.jit
def _token_block(pid, COS, SIN, n_tokens, seq, sc_b, sc_s, sc_d, HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr,
                 BLOCK_T: tl.constexpr):
    """The program's BLOCK_T tokens -> (row mask, int64 token index, batch row, position, cos, sin). cos/sin are
    loaded here once per token row and reused by every q and k head of the program."""
    tok = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = tok < n_tokens
    tok64 = tok.to(tl.int64)  # token * row stride passes 2^31 elements on large batches
    b = tok64 // seq
    pos = tok64 - b * seq
    d = tl.arange(0, HALF_PAD)
    cs_mask = row_mask[:, None] & (d < HEAD_DIM // 2)[None, :]
    cs_off = (b * sc_b + pos * sc_s)[:, None] + d[None, :] * sc_d
    c = tl.load(COS + cs_off, mask=cs_mask, other=0.0).to(tl.float32)
    s = tl.load(SIN + cs_off, mask=cs_mask, other=0.0).to(tl.float32)
    return row_mask, tok64, b, pos, c, s


@triton.jit
def _halves(W, c, s, HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr):
    """The rotate-half view shared by every head: column index and mask of a half, the norm weight's two halves
    [1, 1, HALF_PAD] and cos/sin broadcast over heads [BLOCK_T, 1, HALF_PAD] (fp32)."""
    HALF: tl.constexpr = HEAD_DIM // 2
    d = tl.arange(0, HALF_PAD)
    d_mask = d < HALF
    w1 = tl.load(W + d, mask=d_mask, other=0.0).to(tl.float32)[None, None, :]
    w2 = tl.load(W + HALF + d, mask=d_mask, other=0.0).to(tl.float32)[None, None, :]
    return d, d_mask, w1, w2, c[:, None, :], s[:, None, :]


@triton.jit
def _fwd_heads(
    X, Y, RSTD, W, c, s, x_row, y_row, r_row, row_mask, n_heads, stride_xh, stride_xd, eps, scale,
    HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Normalise, rotate and store every head of one block of tokens (c, s: [BLOCK_T, HALF_PAD] fp32)."""
    HALF: tl.constexpr = HEAD_DIM // 2
    d, d_mask, w1, w2, c3, s3 = _halves(W, c, s, HEAD_DIM, HALF_PAD)
    for h0 in range(0, n_heads, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        hr_mask = row_mask[:, None] & (h < n_heads)[None, :]
        mask = hr_mask[:, :, None] & d_mask[None, None, :]
        # int64 head offsets: a heads-major tensor seen through a transpose has a head stride of S * D.
        x_off = x_row[:, None, None] + h.to(tl.int64)[None, :, None] * stride_xh + d[None, None, :] * stride_xd
        x1 = tl.load(X + x_off, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(X + x_off + HALF * stride_xd, mask=mask, other=0.0).to(tl.float32)
        # Masked lanes hold 0, so padded columns add nothing and padded rows get the finite 1/sqrt(eps).
        mean_sq = (tl.sum(x1 * x1, axis=2) + tl.sum(x2 * x2, axis=2)) / HEAD_DIM
        rstd = 1.0 / tl.sqrt(mean_sq + eps)
        # Same order as rms_norm_ref then apply_rope_ref: (x * rstd) * w, then the rotation, then the scale.
        n1 = (x1 * rstd[:, :, None]) * w1
        n2 = (x2 * rstd[:, :, None]) * w2
        y1 = (n1 * c3 - n2 * s3) * scale
        y2 = (n2 * c3 + n1 * s3) * scale
        y_off = y_row[:, None, None] + h[None, :, None] * HEAD_DIM + d[None, None, :]
        tl.store(Y + y_off, y1.to(Y.dtype.element_ty), mask=mask)
        tl.store(Y + y_off + HALF, y2.to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + r_row[:, None] + h[None, :], rstd, mask=hr_mask)


@triton.jit
def _qknorm_rope_fwd_kernel(
    Q, K, WQ, WK, COS, SIN, QO, KO, RSTD_Q, RSTD_K,
    n_tokens, seq, n_heads_q, n_heads_k,
    sq_b, sq_s, sq_h, sq_d, sk_b, sk_s, sk_h, sk_d, sc_b, sc_s, sc_d,
    eps, q_scale,
    HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
):
    pid = tl.program_id(0)
    row_mask, tok64, b, pos, c, s = _token_block(pid, COS, SIN, n_tokens, seq, sc_b, sc_s, sc_d, HEAD_DIM, HALF_PAD,
                                                 BLOCK_T)
    _fwd_heads(Q, QO, RSTD_Q, WQ, c, s, b * sq_b + pos * sq_s, tok64 * (n_heads_q * HEAD_DIM), tok64 * n_heads_q,
               row_mask, n_heads_q, sq_h, sq_d, eps, q_scale, HEAD_DIM, HALF_PAD, BLOCK_HQ)
    _fwd_heads(K, KO, RSTD_K, WK, c, s, b * sk_b + pos * sk_s, tok64 * (n_heads_k * HEAD_DIM), tok64 * n_heads_k,
               row_mask, n_heads_k, sk_h, sk_d, eps, 1.0, HEAD_DIM, HALF_PAD, BLOCK_HK)


@triton.jit
def _bwd_heads(
    X, DY, DX, RSTD, W, DW_PARTIAL, pid, c, s, x_row, y_row, r_row, row_mask, n_heads, stride_xh, stride_xd, scale,
    HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """dx for every head of one block of tokens; writes this program's fp32 partial weight gradient row.

    With g = dy * scale: inverse rotation dn1 = g1 c + g2 s, dn2 = g2 c - g1 s; then with xhat = x * rstd and
    gx = dn * w: dx = rstd * (gx - xhat * mean(gx * xhat)), dw = sum over tokens and heads of dn * xhat.
    """
    HALF: tl.constexpr = HEAD_DIM // 2
    d, d_mask, w1, w2, c3, s3 = _halves(W, c, s, HEAD_DIM, HALF_PAD)
    dw1 = tl.zeros((BLOCK_T, HALF_PAD), dtype=tl.float32)
    dw2 = tl.zeros((BLOCK_T, HALF_PAD), dtype=tl.float32)
    for h0 in range(0, n_heads, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        hr_mask = row_mask[:, None] & (h < n_heads)[None, :]
        mask = hr_mask[:, :, None] & d_mask[None, None, :]
        x_off = x_row[:, None, None] + h.to(tl.int64)[None, :, None] * stride_xh + d[None, None, :] * stride_xd
        y_off = y_row[:, None, None] + h[None, :, None] * HEAD_DIM + d[None, None, :]
        x1 = tl.load(X + x_off, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(X + x_off + HALF * stride_xd, mask=mask, other=0.0).to(tl.float32)
        g1 = tl.load(DY + y_off, mask=mask, other=0.0).to(tl.float32) * scale
        g2 = tl.load(DY + y_off + HALF, mask=mask, other=0.0).to(tl.float32) * scale
        # Padded (token, head) lanes read rstd 0, so xhat, dx and their dw terms are exactly 0 there.
        rstd = tl.load(RSTD + r_row[:, None] + h[None, :], mask=hr_mask, other=0.0)[:, :, None]
        dn1 = g1 * c3 + g2 * s3
        dn2 = g2 * c3 - g1 * s3
        xh1 = x1 * rstd
        xh2 = x2 * rstd
        dw1 += tl.sum(dn1 * xh1, axis=1)
        dw2 += tl.sum(dn2 * xh2, axis=1)
        gx1 = dn1 * w1
        gx2 = dn2 * w2
        proj = (tl.sum(gx1 * xh1, axis=2) + tl.sum(gx2 * xh2, axis=2)) / HEAD_DIM
        dx1 = (gx1 - xh1 * proj[:, :, None]) * rstd
        dx2 = (gx2 - xh2 * proj[:, :, None]) * rstd
        tl.store(DX + y_off, dx1.to(DX.dtype.element_ty), mask=mask)
        tl.store(DX + y_off + HALF, dx2.to(DX.dtype.element_ty), mask=mask)
    part = DW_PARTIAL + pid.to(tl.int64) * HEAD_DIM
    tl.store(part + d, tl.sum(dw1, axis=0), mask=d_mask)
    tl.store(part + HALF + d, tl.sum(dw2, axis=0), mask=d_mask)


@triton.jit
def _qknorm_rope_bwd_kernel(
    Q, K, WQ, WK, COS, SIN, DQO, DKO, RSTD_Q, RSTD_K, DQ, DK, DWQ_PARTIAL, DWK_PARTIAL,
    n_tokens, seq, n_heads_q, n_heads_k,
    sq_b, sq_s, sq_h, sq_d, sk_b, sk_s, sk_h, sk_d, sc_b, sc_s, sc_d,
    q_scale,
    HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
):
    # DQO/DKO (upstream gradients) and DQ/DK are contiguous [tokens, heads, D], like the forward outputs.
    pid = tl.program_id(0)
    row_mask, tok64, b, pos, c, s = _token_block(pid, COS, SIN, n_tokens, seq, sc_b, sc_s, sc_d, HEAD_DIM, HALF_PAD,
                                                 BLOCK_T)
    _bwd_heads(Q, DQO, DQ, RSTD_Q, WQ, DWQ_PARTIAL, pid, c, s, b * sq_b + pos * sq_s,
               tok64 * (n_heads_q * HEAD_DIM), tok64 * n_heads_q, row_mask, n_heads_q, sq_h, sq_d, q_scale,
               HEAD_DIM, HALF_PAD, BLOCK_T, BLOCK_HQ)
    _bwd_heads(K, DKO, DK, RSTD_K, WK, DWK_PARTIAL, pid, c, s, b * sk_b + pos * sk_s,
               tok64 * (n_heads_k * HEAD_DIM), tok64 * n_heads_k, row_mask, n_heads_k, sk_h, sk_d, 1.0,
               HEAD_DIM, HALF_PAD, BLOCK_T, BLOCK_HK)


def _config(layout: TokenLayout, device: torch.device, backward: bool) -> tuple[dict, int]:
    """-> (compile-time constants and num_warps of the forward or backward kernel, number of programs)."""
    half_pad = triton.next_power_of_2(layout.head_dim // 2)
    if target_arch(device) is None:  # the interpreter
        block_t, max_block_h, num_warps = _INTERPRETER_BLOCK_T, _INTERPRETER_BLOCK_H, 4
    else:
        block_t, tile, num_warps = _GPU_CONFIG[int(backward)]
        block_t = max(1, min(block_t, tile // (2 * half_pad)))  # a wide head (256) takes fewer tokens a step
        # The largest power of two of heads that keeps a step within `tile` elements (at least one head).
        max_block_h = triton.next_power_of_2(max(1, tile // (block_t * 2 * half_pad)) + 1) // 2

    def block_h(heads: int) -> int:
        return min(triton.next_power_of_2(max(heads, 1)), max_block_h)

    meta = {"HEAD_DIM": layout.head_dim, "HALF_PAD": half_pad, "BLOCK_T": block_t, "BLOCK_HQ": block_h(layout.heads_q),
            "BLOCK_HK": block_h(layout.heads_kv), "num_warps": num_warps}
    return meta, triton.cdiv(layout.n_tokens, block_t)


def _strides(t: torch.Tensor, shared: bool) -> tuple[int, ...]:
    """(batch, token, head, dim) strides of [B, S, H, D] or packed [T, H, D], and (batch, token, dim) of cos/sin
    [B, S, D/2] or [S|T, D/2]; batch stride 0 when `shared` (packed, or one table for every batch row)."""
    return (0, *t.stride()) if shared else tuple(t.stride())


class _QKNormRopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, q_w, k_w, cos, sin, layout: TokenLayout, eps: float, q_scale: float):
        n, hq, hkv = layout.n_tokens, layout.heads_q, layout.heads_kv
        q_hat, k_hat = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k))
        rstd_q, rstd_k = (torch.empty((n, h), dtype=torch.float32, device=q.device) for h in (hq, hkv))
        meta, programs = _config(layout, q.device, backward=False)
        if programs:
            launch(
                _qknorm_rope_fwd_kernel, (programs,),
                q, k, q_w, k_w, cos, sin, q_hat, k_hat, rstd_q, rstd_k,
                n, layout.seq, hq, hkv,
                *_strides(q, layout.packed), *_strides(k, layout.packed), *_strides(cos, cos.dim() == 2),
                eps, q_scale, **meta,
            )
        ctx.save_for_backward(q, k, q_w, k_w, cos, sin, rstd_q, rstd_k)
        ctx.layout, ctx.q_scale = layout, q_scale
        return q_hat, k_hat

    @staticmethod
    def backward(ctx, dq_hat, dk_hat):
        q, k, q_w, k_w, cos, sin, rstd_q, rstd_k = ctx.saved_tensors
        layout = ctx.layout
        # The kernel addresses upstream gradients like the outputs it wrote: contiguous (a no-op in practice).
        dq_hat, dk_hat = dq_hat.contiguous(), dk_hat.contiguous()
        dq, dk = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k))
        meta, programs = _config(layout, q.device, backward=True)
        dwq_partial, dwk_partial = (torch.empty((programs, layout.head_dim), dtype=torch.float32, device=q.device)
                                    for _ in range(2))
        if programs:
            launch(
                _qknorm_rope_bwd_kernel, (programs,),
                q, k, q_w, k_w, cos, sin, dq_hat, dk_hat, rstd_q, rstd_k, dq, dk, dwq_partial, dwk_partial,
                layout.n_tokens, layout.seq, layout.heads_q, layout.heads_kv,
                *_strides(q, layout.packed), *_strides(k, layout.packed), *_strides(cos, cos.dim() == 2),
                ctx.q_scale, **meta,
            )
        # A fixed-shape sum over a buffer each program filled alone: the same bits on every run (no atomics).
        dq_w = dwq_partial.sum(dim=0).to(q_w.dtype) if ctx.needs_input_grad[2] else None
        dk_w = dwk_partial.sum(dim=0).to(k_w.dtype) if ctx.needs_input_grad[3] else None
        return dq, dk, dq_w, dk_w, None, None, None, None, None


def qknorm_rope_triton(q, k, q_norm_weight, k_norm_weight, cos, sin, *, eps=1e-6, q_scale=1.0):
    """The Triton pre-pass: same contract as qknorm_rope_ref (qknorm_rope.py). cos/sin must not require grad."""
    layout = check_inputs(q, k, q_norm_weight, k_norm_weight, cos, sin, eps, q_scale)
    layout.check_triton_limits(_NAME, q.dtype)
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        raise ValueError(f"{_NAME}: cos/sin require grad, but the Triton pre-pass treats the RoPE tables as "
                         "constants; pass cos.detach(), sin.detach() (or use qknorm_rope_ref)")
    if cos.stride() != sin.stride():  # the kernels address both tables with one set of strides
        cos, sin = cos.contiguous(), sin.contiguous()
    return _QKNormRopeFunction.apply(q, k, q_norm_weight, k_norm_weight, cos, sin, layout, float(eps),
                                     float(q_scale))
