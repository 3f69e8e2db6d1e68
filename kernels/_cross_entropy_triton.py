"""Fused linear cross-entropy with a Triton softmax: `linear_cross_entropy_triton(hidden, weight, targets)`, which
never materialises the [N, V] logits (scheme: docs/kernels.md)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import launch
from .cross_entropy import check_linear_ce_inputs, chunked_gradients, fused_linear_cross_entropy

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


def _loss_and_grads(hidden, weight, targets, ignore_index, chunk_rows, compute_dtype, need_dh, need_dw):
    """-> (loss fp32 scalar, grad_hidden or None, grad_weight or None); matmuls in compute_dtype."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    inv_valid = 1.0 / (targets != ignore_index).sum().clamp(min=1).to(torch.float32)  # on device: no host sync
    row_loss = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
    logits_buf = torch.empty((min(chunk_rows, n_rows), vocab), dtype=compute_dtype, device=hidden.device)
    block_v = min(_MAX_BLOCK_V, triton.next_power_of_2(vocab))
    num_warps = 4 if block_v <= 1024 else 8 if block_v <= 4096 else 16

    def dlogits_of(start, stop, h, w):
        logits = logits_buf[: stop - start]
        torch.mm(h, w.t(), out=logits)
        launch(
            _ce_loss_grad_kernel, (stop - start,),
            logits, logits.stride(0), targets[start:stop], row_loss[start:stop], inv_valid, vocab, ignore_index,
            BLOCK_V=block_v, WRITE_GRAD=need_dh or need_dw, num_warps=num_warps,
        )
        return logits  # now d loss / d logits, in place

    grad_hidden, grad_weight = chunked_gradients(hidden, weight, chunk_rows, compute_dtype, need_dh, need_dw,
                                                 dlogits_of)
    return row_loss.sum() * inv_valid, grad_hidden, grad_weight


def linear_cross_entropy_triton(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                ignore_index: int = -100, *, chunk_rows: int | None = None) -> torch.Tensor:
    """hidden [N, H], weight [V, H], targets [N] -> fp32 mean CE over targets != ignore_index (0 if none).

    A target outside [0, V) that is not ignore_index makes the loss NaN (checking on the host would cost a sync).
    chunk_rows defaults to chunk_rows_for(N, V, CUDA_CHUNK_ELEMENTS, or CPU_CHUNK_ELEMENTS under the interpreter);
    tests pass small values. Under autocast: docs/kernels.md."""
    check_linear_ce_inputs(hidden, weight, targets)
    # contiguous: the kernel reads one id per row at unit stride
    return fused_linear_cross_entropy(_loss_and_grads, hidden, weight, targets.contiguous(), ignore_index, chunk_rows)
