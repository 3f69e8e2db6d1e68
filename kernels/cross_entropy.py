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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import _is_dtensor, kernel_mode, use_triton

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
    return dh, dw, None, None, None


class _LinearCrossEntropyChunked(torch.autograd.Function):
    """Loss and both gradients in one chunked pass; the backward only scales by the upstream gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index: int, chunk_rows: int):
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        valid = targets != ignore_index
        inv_valid = 1.0 / valid.sum().clamp(min=1).to(torch.float32)
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # Row-major whatever hidden's layout, so each chunk's rows are a contiguous out= block (no temporary).
        grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_dh else None
        # Accumulated in the weight's dtype (exact for fp32; for 16-bit, one rounding per chunk, as Liger does).
        grad_weight = torch.zeros_like(weight) if need_dw else None
        for start in range(0, hidden.shape[0], chunk_rows):
            h = hidden[start : start + chunk_rows]
            t = targets[start : start + chunk_rows]
            v = valid[start : start + chunk_rows]
            safe_t = torch.where(v, t, torch.zeros_like(t)).unsqueeze(1)  # ignored rows point at class 0
            logits = (h @ weight.t()).float()  # [c, V]: logits in the input dtype then fp32, like the reference
            lse = torch.logsumexp(logits, dim=1)
            target_logit = logits.gather(1, safe_t).squeeze(1)
            loss_sum += torch.where(v, lse - target_logit, torch.zeros_like(lse)).sum()
            if not (need_dh or need_dw):
                continue
            # d loss / d logits = (softmax - onehot) / num_valid on valid rows, 0 on ignored ones; built in place.
            grad = logits.sub_(lse.unsqueeze(1)).exp_()
            grad.scatter_add_(1, safe_t, -v.to(grad.dtype).unsqueeze(1))
            grad.mul_((v.to(grad.dtype) * inv_valid).unsqueeze(1))
            grad = grad.to(hidden.dtype)
            if need_dh:
                torch.mm(grad, weight, out=grad_hidden[start : start + chunk_rows])
            if need_dw:
                grad_weight.addmm_(grad.t(), h)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss_sum * inv_valid

    @staticmethod
    def backward(ctx, grad_loss):
        return scale_saved_gradients(ctx, grad_loss)


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
        budget = CUDA_CHUNK_ELEMENTS if hidden.is_cuda else CPU_CHUNK_ELEMENTS
        chunk_rows = chunk_rows_for(hidden.shape[0], vocab, budget)
    if chunk_rows < 1:
        raise ValueError(f"linear_cross_entropy: chunk_rows must be >= 1, got {chunk_rows}")
    if not torch.is_grad_enabled():
        # Under no_grad, ctx.needs_input_grad still follows requires_grad: detach so no gradient is computed.
        hidden, weight = hidden.detach(), weight.detach()
    return _LinearCrossEntropyChunked.apply(hidden, weight, targets, ignore_index, chunk_rows)


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
