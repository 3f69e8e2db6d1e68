"""Cross-entropy of a linear head: mean over non-ignored tokens of CE(hidden @ weight.T, targets).

Three implementations, one signature (hidden [N, H], weight [V, H], targets [N] -> fp32 scalar):
  linear_cross_entropy_ref      materialises the [N, V] logits; autograd does the rest. The reference.
  linear_cross_entropy_chunked  pure PyTorch, never holds more than one chunk of logits (see chunk_rows_for);
                                the gradients are computed during the forward, chunk by chunk.
  linear_cross_entropy_triton   the same scheme with a Triton kernel for the softmax (_cross_entropy_triton.py).
All three return 0 with zero gradients when every target is ignored (F.cross_entropy's mean would give NaN):
a batch made only of padding must not poison the run.

`linear_cross_entropy` dispatches: Triton when _dispatch.use_triton says so (CUDA tensors, or
MEGASYNTH_KERNELS=triton); under MEGASYNTH_KERNELS=auto elsewhere (CPU), the chunked version once N * V exceeds
CHUNKED_ABOVE_ELEMENTS and the reference below it, where the logits are small and one matmul is fastest.
DTensors (tensor parallel) always take the reference, whose ops DTensor knows how to shard.

Under autocast the fused paths run their matmuls in the autocast dtype, as the reference's `hidden @ weight.T`
does: their torch.mm(..., out=) and in-place addmm_ are not autocast ops, so they cast hidden and weight themselves
(`matmul_dtype`). The loss and logsumexp stay fp32; gradients come back in the inputs' dtypes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import _is_dtensor, kernel_mode, use_triton
from ._launch import target_arch

# Logits budget per chunk, in elements. 2^26 fp32 = 256 MiB on a GPU: at vocab 128k a chunk is 512 tokens, a
# matmul large enough to run at full tensor-core speed. The CPU path keeps 4 fp32 temporaries of a chunk, so it
# uses a smaller budget (64 MiB each).
CUDA_CHUNK_ELEMENTS = 1 << 26
CPU_CHUNK_ELEMENTS = 1 << 24
# Below this N * V the reference's full logits are small (64 MiB fp32) and it is the fastest CPU path.
CHUNKED_ABOVE_ELEMENTS = 1 << 24


def chunk_rows_for(n_rows: int, vocab: int, max_elements: int) -> int:
    """Tokens per chunk so that a chunk's logits [rows, vocab] hold at most max_elements (at least 1 row)."""
    return max(1, min(n_rows, max_elements // max(vocab, 1)))


def chunk_budget(device: torch.device) -> int:
    """Logits elements per chunk: the GPU budget on CUDA (or when planning launches for a GPU), the CPU one else."""
    return CUDA_CHUNK_ELEMENTS if target_arch(device) is not None else CPU_CHUNK_ELEMENTS


_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def matmul_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmuls run in: autocast's when autocast is on for hidden's device (and hidden is a
    dtype autocast casts: not float64), hidden's own otherwise. Decided by the caller, outside the autograd
    Function, from the autocast state the model's forward runs under."""
    device_type = hidden.device.type
    if hidden.dtype in _AUTOCAST_ELIGIBLE and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return hidden.dtype


def check_linear_ce_inputs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> None:
    """Raise ValueError naming the argument when shapes, dtypes or devices do not fit together."""
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"linear_cross_entropy: expected hidden [N, H] and weight [V, H], got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy: hidden size differs, hidden {tuple(hidden.shape)} vs weight {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError("linear_cross_entropy: weight has an empty vocabulary (V = 0)")
    if targets.shape != (hidden.shape[0],):
        raise ValueError(
            f"linear_cross_entropy: targets has shape {tuple(targets.shape)}, expected ({hidden.shape[0]},)"
        )
    if targets.dtype.is_floating_point or targets.dtype == torch.bool or targets.is_complex():
        raise ValueError(f"linear_cross_entropy: targets must be integer class ids, got {targets.dtype}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"linear_cross_entropy: hidden is {hidden.dtype} but weight is {weight.dtype}")
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(
            f"linear_cross_entropy: tensors on different devices (hidden {hidden.device}, weight {weight.device}, "
            f"targets {targets.device})"
        )


def _check_target_range(targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    # A host-side check costs a device sync, so only the CPU path does it; the Triton kernel returns NaN instead.
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"linear_cross_entropy: targets[{i}] = {int(targets[i])} is outside [0, {vocab}) and is not "
            f"ignore_index ({ignore_index})"
        )


def linear_cross_entropy_ref(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """hidden [N, H], weight [V, H], targets [N] -> scalar mean loss over targets != ignore_index (fp32)."""
    logits = (hidden @ weight.t()).float()
    # sum / max(count, 1) rather than reduction="mean": all-ignored gives 0, not 0/0.
    num_valid = (targets != ignore_index).sum().clamp(min=1)
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum") / num_valid


def scale_saved_gradients(ctx, grad_loss):
    """Backward of a fused linear CE whose forward already computed d(loss)/d(hidden, weight): scale them by the
    upstream gradient. Out of place, so a second backward (retain_graph) sees the saved gradients unscaled."""
    grad_hidden, grad_weight = ctx.saved_tensors
    dh = grad_hidden * grad_loss.to(grad_hidden.dtype) if grad_hidden is not None else None
    dw = grad_weight * grad_loss.to(grad_weight.dtype) if grad_weight is not None else None
    return dh, dw, None, None, None, None  # hidden, weight; targets, ignore_index, chunk_rows, compute dtype


class _LinearCrossEntropyChunked(torch.autograd.Function):
    """Loss and both gradients in one chunked pass; the backward only scales by the upstream gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index: int, chunk_rows: int, compute_dtype: torch.dtype):
        # Autocast off inside: every dtype below is chosen explicitly (matmuls in compute_dtype, softmax in fp32).
        with torch.autocast(hidden.device.type, enabled=False):
            loss, grad_hidden, grad_weight = _chunked_pytorch(
                hidden, weight, targets, ignore_index, chunk_rows, compute_dtype,
                ctx.needs_input_grad[0], ctx.needs_input_grad[1],
            )
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        return scale_saved_gradients(ctx, grad_loss)


def _chunked_pytorch(hidden, weight, targets, ignore_index, chunk_rows, compute_dtype, need_dh, need_dw):
    """-> (loss fp32 scalar, grad_hidden or None, grad_weight or None), one chunk of logits at a time."""
    valid = targets != ignore_index
    inv_valid = 1.0 / valid.sum().clamp(min=1).to(torch.float32)
    loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
    # Row-major whatever hidden's layout, so each chunk's rows are a contiguous out= block (no temporary).
    grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_dh else None
    # Accumulated in the weight's dtype (exact for fp32; for 16-bit, one rounding per chunk, as Liger does).
    grad_weight = torch.zeros_like(weight) if need_dw else None
    w = weight.to(compute_dtype)  # the same tensor without autocast
    for start in range(0, hidden.shape[0], chunk_rows):
        h = hidden[start : start + chunk_rows].to(compute_dtype)
        t = targets[start : start + chunk_rows]
        v = valid[start : start + chunk_rows]
        safe_t = torch.where(v, t, torch.zeros_like(t)).unsqueeze(1)  # ignored rows point at class 0
        logits = (h @ w.t()).float()  # [c, V]: logits in the matmul dtype then fp32, like the reference
        lse = torch.logsumexp(logits, dim=1)
        target_logit = logits.gather(1, safe_t).squeeze(1)
        loss_sum += torch.where(v, lse - target_logit, torch.zeros_like(lse)).sum()
        if not (need_dh or need_dw):
            continue
        # d loss / d logits = (softmax - onehot) / num_valid on valid rows, 0 on ignored ones; built in place.
        grad = logits.sub_(lse.unsqueeze(1)).exp_()
        grad.scatter_add_(1, safe_t, -v.to(grad.dtype).unsqueeze(1))
        grad.mul_((v.to(grad.dtype) * inv_valid).unsqueeze(1))
        grad = grad.to(compute_dtype)
        if need_dh:
            mm_into(grad_hidden[start : start + chunk_rows], grad, w)
        if need_dw:
            addmm_into(grad_weight, grad.t(), h)
    return loss_sum * inv_valid, grad_hidden, grad_weight


def mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out = a @ b, the product computed in a's dtype (out= needs equal dtypes; under autocast out may be wider)."""
    if out.dtype == a.dtype:
        torch.mm(a, b, out=out)
    else:
        out.copy_(a @ b)


def addmm_into(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, the product computed in a's dtype (rounded to it once, as autocast's matmul would), then
    added in acc's dtype."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    else:
        acc.add_(a @ b)


def linear_cross_entropy_chunked(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    *,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Same result as linear_cross_entropy_ref, holding at most chunk_rows x V logits at a time.

    chunk_rows defaults to chunk_rows_for(N, V, CPU_CHUNK_ELEMENTS or CUDA_CHUNK_ELEMENTS). With gradients
    enabled, both gradients are computed in this call and kept (N x H + V x H) until backward.
    """
    check_linear_ce_inputs(hidden, weight, targets)
    vocab = weight.shape[0]
    if not _is_dtensor(targets):
        _check_target_range(targets, vocab, ignore_index)
    if chunk_rows is None:
        chunk_rows = chunk_rows_for(hidden.shape[0], vocab, chunk_budget(hidden.device))
    if chunk_rows < 1:
        raise ValueError(f"linear_cross_entropy: chunk_rows must be >= 1, got {chunk_rows}")
    if not torch.is_grad_enabled():
        # Under no_grad, ctx.needs_input_grad still follows requires_grad: detach so no gradient is computed.
        hidden, weight = hidden.detach(), weight.detach()
    return _LinearCrossEntropyChunked.apply(hidden, weight, targets, ignore_index, chunk_rows, matmul_dtype(hidden))


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """hidden [N, H], weight [V, H], targets [N] -> fp32 mean CE over targets != ignore_index (0 if none)."""
    if use_triton(hidden, weight, targets):
        from ._cross_entropy_triton import linear_cross_entropy_triton  # noqa: PLC0415

        return linear_cross_entropy_triton(hidden, weight, targets, ignore_index)
    big = hidden.shape[0] * weight.shape[0] > CHUNKED_ABOVE_ELEMENTS
    if kernel_mode() == "auto" and big and not any(_is_dtensor(t) for t in (hidden, weight, targets)):
        return linear_cross_entropy_chunked(hidden, weight, targets, ignore_index)
    return linear_cross_entropy_ref(hidden, weight, targets, ignore_index)
