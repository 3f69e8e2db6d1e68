"""Cross-entropy of a linear head: mean over non-ignored tokens of CE(hidden @ weight.T, targets).

    linear_cross_entropy(hidden [N, H], weight [V, H], targets [N]) -> fp32 scalar

The reference, chunked and Triton versions and how the dispatcher picks: docs/kernels.md.
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
        raise ValueError(f"linear_cross_entropy: expected hidden [N, H] and weight [V, H], got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden size differs, hidden {tuple(hidden.shape)} vs weight "
                         f"{tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("linear_cross_entropy: weight has an empty vocabulary (V = 0)")
    if targets.shape != (hidden.shape[0],):
        raise ValueError(f"linear_cross_entropy: targets has shape {tuple(targets.shape)}, expected "
                         f"({hidden.shape[0]},)")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool or targets.is_complex():
        raise ValueError(f"linear_cross_entropy: targets must be integer class ids, got {targets.dtype}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"linear_cross_entropy: hidden is {hidden.dtype} but weight is {weight.dtype}")
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(f"linear_cross_entropy: tensors on different devices (hidden {hidden.device}, weight "
                         f"{weight.device}, targets {targets.device})")


def _check_target_range(targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    # A host-side check costs a device sync, so only the CPU path does it; the Triton kernel returns NaN instead.
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"linear_cross_entropy: targets[{i}] = {int(targets[i])} is outside [0, {vocab}) and is not "
                         f"ignore_index ({ignore_index})")


def linear_cross_entropy_ref(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             ignore_index: int = -100) -> torch.Tensor:
    """hidden [N, H], weight [V, H], targets [N] -> scalar mean loss over targets != ignore_index (fp32)."""
    logits = (hidden @ weight.t()).float()
    # sum / max(count, 1) rather than reduction="mean": all-ignored gives 0, not 0/0.
    num_valid = (targets != ignore_index).sum().clamp(min=1)
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum") / num_valid


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Loss and both gradients in one chunked pass of `loss_and_grads` (the PyTorch or the Triton one); the backward
    only scales them by the upstream gradient."""

    @staticmethod
    def forward(ctx, loss_and_grads, hidden, weight, targets, ignore_index: int, chunk_rows: int, compute_dtype):
        # Autocast off inside: every dtype below is chosen explicitly (matmuls in compute_dtype, softmax in fp32).
        with torch.autocast(hidden.device.type, enabled=False):
            loss, grad_hidden, grad_weight = loss_and_grads(hidden, weight, targets, ignore_index, chunk_rows,
                                                            compute_dtype, *ctx.needs_input_grad[1:3])
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # Out of place, so a second backward (retain_graph) sees the saved gradients unscaled.
        grad_hidden, grad_weight = ctx.saved_tensors
        dh = grad_hidden * grad_loss.to(grad_hidden.dtype) if grad_hidden is not None else None
        dw = grad_weight * grad_loss.to(grad_weight.dtype) if grad_weight is not None else None
        return None, dh, dw, None, None, None, None


def fused_linear_cross_entropy(loss_and_grads, hidden, weight, targets, ignore_index: int, chunk_rows: int | None):
    """The chunked implementations' common entry: chunk_rows defaults to chunk_rows_for(N, V, the device's budget);
    with gradients enabled both gradients are computed in this call and kept (N x H + V x H) until backward."""
    if chunk_rows is None:
        # The GPU budget on CUDA (or when planning launches for a GPU), the CPU one else.
        budget = CUDA_CHUNK_ELEMENTS if target_arch(hidden.device) is not None else CPU_CHUNK_ELEMENTS
        chunk_rows = chunk_rows_for(hidden.shape[0], weight.shape[0], budget)
    if chunk_rows < 1:
        raise ValueError(f"linear_cross_entropy: chunk_rows must be >= 1, got {chunk_rows}")
    if not torch.is_grad_enabled():
        # Under no_grad, ctx.needs_input_grad still follows requires_grad: detach so no gradient is computed.
        hidden, weight = hidden.detach(), weight.detach()
    return _FusedLinearCrossEntropy.apply(loss_and_grads, hidden, weight, targets, ignore_index, chunk_rows,
                                          matmul_dtype(hidden))


def chunked_gradients(hidden, weight, chunk_rows, compute_dtype, need_dh, need_dw, dlogits_of):
    """The chunk loop of the fused heads: per chunk of rows h = hidden[start:stop] (in compute_dtype),
    dlogits = dlogits_of(start, stop, h, w) (which also records the chunk's loss; it may return None when no
    gradient is needed), then grad_hidden[start:stop] = dlogits @ W and grad_weight += dlogits^T h.
    -> (grad_hidden or None, grad_weight or None)."""
    # Row-major whatever hidden's layout, so each chunk's rows are a contiguous out= block (no temporary).
    grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_dh else None
    # Accumulated in the weight's dtype: exact for fp32; for 16-bit one rounding per chunk (addmm adds in fp32
    # inside cuBLAS, then rounds), ~N * V / 2^26 roundings in all. An fp32 buffer would cost 4 * V * H more bytes.
    grad_weight = torch.zeros_like(weight) if need_dw else None
    w = weight.to(compute_dtype)  # the same tensor without autocast
    for start in range(0, hidden.shape[0], chunk_rows):
        stop = min(start + chunk_rows, hidden.shape[0])
        h = hidden[start:stop].to(compute_dtype)
        dlogits = dlogits_of(start, stop, h, w)
        # Products in compute_dtype (rounded once, as autocast's matmul would); out= and addmm_ need equal dtypes,
        # and under autocast the gradients may be wider.
        if need_dh and grad_hidden.dtype == dlogits.dtype:
            torch.mm(dlogits, w, out=grad_hidden[start:stop])
        elif need_dh:
            grad_hidden[start:stop].copy_(dlogits @ w)
        if need_dw and grad_weight.dtype == dlogits.dtype:
            grad_weight.addmm_(dlogits.t(), h)
        elif need_dw:
            grad_weight.add_(dlogits.t() @ h)
    return grad_hidden, grad_weight


def _chunked_pytorch(hidden, weight, targets, ignore_index, chunk_rows, compute_dtype, need_dh, need_dw):
    """-> (loss fp32 scalar, grad_hidden or None, grad_weight or None), one chunk of logits at a time."""
    valid = targets != ignore_index
    inv_valid = 1.0 / valid.sum().clamp(min=1).to(torch.float32)
    loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)

    def dlogits_of(start, stop, h, w):
        t, v = targets[start:stop], valid[start:stop]
        safe_t = torch.where(v, t, torch.zeros_like(t)).unsqueeze(1)  # ignored rows point at class 0
        logits = (h @ w.t()).float()  # [c, V]: logits in the matmul dtype then fp32, like the reference
        lse = torch.logsumexp(logits, dim=1)
        target_logit = logits.gather(1, safe_t).squeeze(1)
        loss_sum.add_(torch.where(v, lse - target_logit, torch.zeros_like(lse)).sum())
        if not (need_dh or need_dw):
            return None
        # d loss / d logits = (softmax - onehot) / num_valid on valid rows, 0 on ignored ones; built in place.
        grad = logits.sub_(lse.unsqueeze(1)).exp_()
        grad.scatter_add_(1, safe_t, -v.to(grad.dtype).unsqueeze(1))
        grad.mul_((v.to(grad.dtype) * inv_valid).unsqueeze(1))
        return grad.to(compute_dtype)

    grad_hidden, grad_weight = chunked_gradients(hidden, weight, chunk_rows, compute_dtype, need_dh, need_dw,
                                                 dlogits_of)
    return loss_sum * inv_valid, grad_hidden, grad_weight


def linear_cross_entropy_chunked(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 ignore_index: int = -100, *, chunk_rows: int | None = None) -> torch.Tensor:
    """Same result as linear_cross_entropy_ref, holding at most chunk_rows x V logits at a time (default:
    chunk_rows_for(N, V, CPU_CHUNK_ELEMENTS or CUDA_CHUNK_ELEMENTS))."""
    check_linear_ce_inputs(hidden, weight, targets)
    if not _is_dtensor(targets):
        _check_target_range(targets, weight.shape[0], ignore_index)
    return fused_linear_cross_entropy(_chunked_pytorch, hidden, weight, targets, ignore_index, chunk_rows)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100) -> torch.Tensor:
    """hidden [N, H], weight [V, H], targets [N] -> fp32 mean CE over targets != ignore_index (0 if none)."""
    if use_triton(hidden, weight, targets):
        from ._cross_entropy_triton import linear_cross_entropy_triton  # noqa: PLC0415

        return linear_cross_entropy_triton(hidden, weight, targets, ignore_index)
    big = hidden.shape[0] * weight.shape[0] > CHUNKED_ABOVE_ELEMENTS
    if kernel_mode() == "auto" and big and not any(_is_dtensor(t) for t in (hidden, weight, targets)):
        return linear_cross_entropy_chunked(hidden, weight, targets, ignore_index)
    return linear_cross_entropy_ref(hidden, weight, targets, ignore_index)
