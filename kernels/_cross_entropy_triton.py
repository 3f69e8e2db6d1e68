"""Fused linear cross-entropy with a Triton softmax: `linear_cross_entropy_triton(hidden, weight, targets)`.

Never materialises the [N, V] logits. Tokens go through in chunks of chunk_rows (logits of a chunk bounded by
CUDA_CHUNK_ELEMENTS); for each chunk:
    logits = h_chunk @ W^T                  cuBLAS, in the matmul dtype with fp32 accumulation
    _ce_loss_grad_kernel                    per row: fp32 logsumexp, loss, and d loss / d logits written in place
    grad_h[chunk] = dlogits @ W             cuBLAS
    grad_W       += dlogits^T @ h_chunk     cuBLAS
so the gradients exist when the forward returns (the Liger "fused linear cross-entropy" scheme) and the
backward only multiplies them by the upstream gradient. The matmul dtype is the input dtype, or autocast's when
autocast is on (cross_entropy.matmul_dtype): out= matmuls are not autocast ops, so the cast is done here.

Why logits in the input dtype (bf16 in training) and not fp32: it halves the chunk's memory and traffic, uses the
tensor cores' full rate, and is exactly what the reference does ((hidden @ weight.T).float()); the softmax
statistics are fp32 inside the kernel. The gradient written back is rounded to the input dtype, which the
reference's autograd also does before its matmuls.

Runs on CUDA, or on the CPU under TRITON_INTERPRET=1 (how the tests run it):
    TRITON_INTERPRET=1 pytest tests/kernels/test_cross_entropy.py -q
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import launch
from .cross_entropy import (
    addmm_into,
    check_linear_ce_inputs,
    chunk_budget,
    chunk_rows_for,
    matmul_dtype,
    mm_into,
    scale_saved_gradients,
)

# Vocabulary tile per loop step: 8192 fp32 over 16 warps = 16 values per thread.
_MAX_BLOCK_V = 8192


@triton.jit
def _ce_loss_grad_kernel(
    LOGITS, stride_row, TARGETS, LOSS, INV_VALID, V, ignore_index,
    BLOCK_V: tl.constexpr, WRITE_GRAD: tl.constexpr,
):
    """One program per row: LOSS[row] = logsumexp(x) - x[target] (0 if ignored, NaN if target out of range);
    with WRITE_GRAD, x is overwritten by (softmax(x) - onehot(target)) * INV_VALID (0 on ignored rows)."""
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_row
    target = tl.load(TARGETS + row).to(tl.int64)
    valid = target != ignore_index
    in_range = (target >= 0) & (target < V)
    cols = tl.arange(0, BLOCK_V)

    # Pass 1: online logsumexp (running max m, running sum s of exp(x - m)) over the row in BLOCK_V tiles.
    m = float("-inf")
    s = 0.0
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        x = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)

    x_target = tl.load(base + target, mask=valid & in_range, other=0.0).to(tl.float32)
    loss = tl.where(valid, lse - x_target, 0.0)
    # An out-of-range class id would read another row's logit: poison the loss so the run sees it.
    loss = tl.where(valid & (in_range == 0), float("nan"), loss)
    tl.store(LOSS + row, loss)

    if WRITE_GRAD:
        scale = tl.where(valid, tl.load(INV_VALID), 0.0)
        # Pass 2: each tile is read, then overwritten by its gradient; tiles do not overlap.
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            mask = offs < V
            x = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
            p = tl.exp(x - lse)
            g = tl.where(offs == target, p - 1.0, p) * scale
            tl.store(base + offs, g.to(LOGITS.dtype.element_ty), mask=mask)


def _kernel_config(vocab: int) -> tuple[int, int]:
    block_v = min(_MAX_BLOCK_V, triton.next_power_of_2(vocab))
    num_warps = 4 if block_v <= 1024 else 8 if block_v <= 4096 else 16
    return block_v, num_warps


def _chunked_loss_and_grads(
    hidden, weight, targets, ignore_index: int, chunk_rows: int, compute_dtype, need_dh: bool, need_dw: bool
):
    """-> (loss fp32 scalar, grad_hidden or None, grad_weight or None); matmuls in compute_dtype."""
    # Autocast off inside: every dtype below is chosen explicitly.
    with torch.autocast(hidden.device.type, enabled=False):
        return _loss_and_grads(hidden, weight, targets, ignore_index, chunk_rows, compute_dtype, need_dh, need_dw)


def _loss_and_grads(hidden, weight, targets, ignore_index, chunk_rows, compute_dtype, need_dh, need_dw):
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    write_grad = need_dh or need_dw
    inv_valid = 1.0 / (targets != ignore_index).sum().clamp(min=1).to(torch.float32)  # on device: no host sync
    row_loss = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
    # Row-major whatever hidden's layout, so each chunk's rows are a contiguous out= block (no temporary).
    grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_dh else None
    # Accumulated in the weight's dtype: exact for fp32; for bf16 one rounding per chunk (addmm adds in fp32 inside
    # cuBLAS, then rounds), ~N * V / 2^26 roundings in all. An fp32 buffer would cost another 4 * V * H bytes.
    grad_weight = torch.zeros_like(weight) if need_dw else None
    logits_buf = torch.empty((min(chunk_rows, n_rows), vocab), dtype=compute_dtype, device=hidden.device)
    w = weight.to(compute_dtype)  # the same tensor without autocast
    block_v, num_warps = _kernel_config(vocab)
    for start in range(0, n_rows, chunk_rows):
        stop = min(start + chunk_rows, n_rows)
        h = hidden[start:stop].to(compute_dtype)
        logits = logits_buf[: stop - start]
        torch.mm(h, w.t(), out=logits)
        launch(
            _ce_loss_grad_kernel, (stop - start,),
            logits, logits.stride(0), targets[start:stop], row_loss[start:stop], inv_valid, vocab, ignore_index,
            BLOCK_V=block_v, WRITE_GRAD=write_grad, num_warps=num_warps,
        )
        if need_dh:
            mm_into(grad_hidden[start:stop], logits, w)
        if need_dw:
            addmm_into(grad_weight, logits.t(), h)
    return row_loss.sum() * inv_valid, grad_hidden, grad_weight


class _LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index: int, chunk_rows: int, compute_dtype: torch.dtype):
        loss, grad_hidden, grad_weight = _chunked_loss_and_grads(
            hidden, weight, targets, ignore_index, chunk_rows, compute_dtype,
            ctx.needs_input_grad[0], ctx.needs_input_grad[1],
        )
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        return scale_saved_gradients(ctx, grad_loss)


def linear_cross_entropy_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    *,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """hidden [N, H], weight [V, H], targets [N] -> fp32 mean CE over targets != ignore_index (0 if none).

    A target outside [0, V) that is not ignore_index makes the loss NaN (checking on the host would cost a sync).
    chunk_rows defaults to chunk_rows_for(N, V, chunk_budget(device)); tests pass small values. Under autocast
    the matmuls run in the autocast dtype; the loss stays fp32 and the gradients take hidden's / weight's dtypes.
    """
    check_linear_ce_inputs(hidden, weight, targets)
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    if chunk_rows is None:
        chunk_rows = chunk_rows_for(n_rows, vocab, chunk_budget(hidden.device))
    if chunk_rows < 1:
        raise ValueError(f"linear_cross_entropy: chunk_rows must be >= 1, got {chunk_rows}")
    targets = targets.contiguous()  # the kernel reads one id per row at unit stride
    compute_dtype = matmul_dtype(hidden)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropyFunction.apply(hidden, weight, targets, ignore_index, chunk_rows, compute_dtype)
    loss, _, _ = _chunked_loss_and_grads(hidden, weight, targets, ignore_index, chunk_rows, compute_dtype, False, False)
    return loss
