"""Fused RMSNorm in Triton, forward and backward: `rms_norm_triton(x, weight, eps)` (contract of rms_norm_ref)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import launch, target_arch

# One program holds a whole row in registers; beyond this the row no longer fits and a split-row kernel would be
# needed. Llama-family hidden sizes stop at 16384.
MAX_HIDDEN = 65536
# Elements per program tile: small rows (QK-norm over head_dim = 64..256) are packed several to a program so a
# launch is not one tiny program per row.
_TILE_ELEMENTS = 4096


@triton.jit
def _rms_norm_fwd_kernel(
    X, W, Y, RSTD,
    stride_x, stride_y, n_rows, H, eps,
    BLOCK_ROWS: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_H)
    row_mask = rows < n_rows
    col_mask = cols < H
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)  # rows * stride overflows int32 past 2^31 elements
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / H + eps)
    # Same operation order as the reference: (x * rstd) * w, rounded once to the output dtype.
    y = (x * rstd[:, None]) * w[None, :]
    tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, X, W, RSTD, DX, DW_PARTIAL,
    stride_dy, stride_x, stride_dx, n_rows, H, rows_per_program,
    BLOCK_ROWS: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # With xhat = x * rstd and g = dy * w:  dx = rstd * (g - xhat * mean(g * xhat)),  dw = sum_rows(dy * xhat).
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    col_mask = cols < H
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_ROWS, BLOCK_H), dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for first in range(row_start, row_end, BLOCK_ROWS):
        rows = first + tl.arange(0, BLOCK_ROWS)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        xhat = x * rstd[:, None]
        g = dy * w[None, :]
        c = tl.sum(g * xhat, axis=1) / H
        dx = (g - xhat * c[:, None]) * rstd[:, None]
        tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw_acc += dy * xhat  # masked lanes load 0, so they add nothing
    tl.store(DW_PARTIAL + pid.to(tl.int64) * H + cols, tl.sum(dw_acc, axis=0), mask=col_mask)


def _launch_config(n_cols: int) -> tuple[int, int, int]:
    """H -> (BLOCK_H, BLOCK_ROWS, num_warps) for one program tile of about _TILE_ELEMENTS or one whole row."""
    block_h = triton.next_power_of_2(n_cols)
    block_rows = max(1, _TILE_ELEMENTS // block_h)
    tile = block_rows * block_h
    # About 16 fp32 elements per thread for each live row vector; more warps for wider rows keep registers bounded.
    num_warps = 4 if tile <= 2048 else 8 if tile <= 8192 else 16 if tile <= 32768 else 32
    return block_h, block_rows, num_warps


# SMs assumed when planning for a GPU that is not here (an H100 SXM); the count changes the grid, not the code.
_PLANNED_SMS = 132


def _backward_programs(device: torch.device, n_row_blocks: int) -> int:
    # Enough programs to fill the GPU a few times over, few enough that the [programs, H] partials stay small.
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    elif target_arch(device) is not None:  # planning for a GPU ahead of time
        target = 4 * _PLANNED_SMS
    else:
        target = 4  # the interpreter runs programs one after another: a handful still exercises the reduction
    return max(1, min(n_row_blocks, target))


def _rows_2d(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """[..., H] -> [rows, H] with unit column stride (a view when possible, a copy otherwise)."""
    t2 = t.reshape(-1, n_cols)
    return t2 if t2.stride(-1) == 1 or t2.shape[0] == 0 else t2.contiguous()


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        n_cols = x.shape[-1]
        x2 = _rows_2d(x, n_cols)
        n_rows = x2.shape[0]
        y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        if n_rows > 0:
            block_h, block_rows, num_warps = _launch_config(n_cols)
            grid = (triton.cdiv(n_rows, block_rows),)
            launch(
                _rms_norm_fwd_kernel, grid, x2, weight, y, rstd, x2.stride(0), y.stride(0), n_rows, n_cols, eps,
                BLOCK_ROWS=block_rows, BLOCK_H=block_h, num_warps=num_warps,
            )
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        dy2 = _rows_2d(dy, n_cols)
        dx = torch.empty((n_rows, n_cols), dtype=x2.dtype, device=x2.device)
        block_h, block_rows, num_warps = _launch_config(n_cols)
        programs = _backward_programs(x2.device, triton.cdiv(n_rows, block_rows)) if n_rows else 0
        dw_partial = torch.zeros((max(programs, 1), n_cols), dtype=torch.float32, device=x2.device)
        if programs:
            # Each program takes a whole number of row blocks, so only the last block of the last program is ragged.
            rows_per_program = triton.cdiv(triton.cdiv(n_rows, programs), block_rows) * block_rows
            programs = triton.cdiv(n_rows, rows_per_program)
            launch(
                _rms_norm_bwd_kernel, (programs,), dy2, x2, weight, rstd, dx, dw_partial,
                dy2.stride(0), x2.stride(0), dx.stride(0), n_rows, n_cols, rows_per_program,
                BLOCK_ROWS=block_rows, BLOCK_H=block_h, num_warps=num_warps,
            )
            dw_partial = dw_partial[:programs]
        dweight = dw_partial.sum(dim=0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx.view(ctx.x_shape), dweight, None


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x [..., H], weight [H] -> x / sqrt(mean(x^2, -1) + eps) * weight, in x's dtype (fp32 statistics)."""
    if x.dim() == 0:
        raise ValueError("rms_norm: x must have at least one dimension (the normalised one)")
    n_cols = x.shape[-1]
    if weight.shape != (n_cols,):
        raise ValueError(f"rms_norm: weight has shape {tuple(weight.shape)}, expected ({n_cols},) = x.shape[-1:]")
    if n_cols == 0 or n_cols > MAX_HIDDEN:
        raise ValueError(f"rms_norm: last dimension {n_cols} outside the Triton kernel's range 1..{MAX_HIDDEN}")
    if x.device != weight.device:
        raise ValueError(f"rms_norm: x on {x.device} but weight on {weight.device}")
    return _RMSNormFunction.apply(x, weight, eps)
