"""RMSNorm Triton kernel (forward and backward) against a float64 reference, under TRITON_INTERPRET=1 on CPU.

    pytest tests/kernels/test_rms_norm.py -q
"""

from __future__ import annotations

import pytest
import torch
from kernel_dtypes import BF16_OVER_FP16, FLOAT_DTYPES
from megasynth.kernels import rms_norm_ref
from megasynth.kernels._rms_norm_triton import _rows_2d, rms_norm_triton

# Relative error (in norm) allowed against float64 on the same rounded inputs. fp32: statistics over H <= 4096
# terms in fp32 lose about log2(H) * 2^-24 ~ 1e-6 at worst; measured 1.8e-7; 2e-6 leaves margin. fp16: y and dx
# are rounded once to fp16 (2^-11 ~ 4.9e-4 relative per element); measured 4.7e-4; 2e-3 leaves margin, far below
# what a wrong formula gives (O(1)).
RTOL = {torch.float32: 2e-6, torch.float16: 2e-3}
RTOL[torch.bfloat16] = BF16_OVER_FP16 * RTOL[torch.float16]

# Where the kernels run: see tests/kernels/conftest.py (its autouse fixture makes DEVICE the default device).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def rel_err(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """||got - want|| / ||scale|| (scale defaults to want)."""
    scale = want if scale is None else scale
    return ((got.double() - want).norm() / scale.norm().clamp_min(1e-30)).item()


def check_against_float64(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> None:
    """Run the kernel on (x, weight) as given and the reference on float64 copies; compare y, dx, dweight."""
    x = x.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    y = rms_norm_triton(x, weight, eps)
    dy = torch.randn(y.shape, dtype=torch.float64).to(x.dtype)
    y.backward(dy)

    x64 = x.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    y64 = rms_norm_ref(x64, w64, eps)
    y64.backward(dy.double())

    assert y.dtype == x.dtype and y.shape == x.shape
    assert x.grad.dtype == x.dtype and weight.grad.dtype == weight.dtype
    tol = RTOL[x.dtype]
    assert rel_err(y, y64) < tol
    # dx = rstd * (dy*w - xhat * mean(dy*w*xhat)) is a difference of terms of size |dy * w * rstd| that can cancel
    # (exactly, up to eps, when H = 1), and rounding is relative to the terms: measure the error against them.
    terms = dy.double() * w64.detach() * torch.rsqrt(x64.detach().pow(2).mean(-1, keepdim=True) + eps)
    assert rel_err(x.grad, x64.grad, terms) < tol
    # dweight sums dy * xhat over all rows in fp32 before one rounding: the fp32 tolerance holds when the weight
    # is fp32; an fp16 weight gets the fp16 one.
    assert rel_err(weight.grad, w64.grad) < RTOL[weight.dtype]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("hidden", [1, 7, 100])
@pytest.mark.parametrize("rows", [1, 3, 129])
def test_matches_float64_reference(rows, hidden, dtype, poisoned_empty):
    torch.manual_seed(rows * 1000 + hidden)
    x = torch.randn(rows, hidden).to(dtype)
    weight = (1 + 0.5 * torch.randn(hidden)).to(dtype)
    check_against_float64(x, weight)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_llama_hidden_size(dtype, poisoned_empty):
    # One row per program (BLOCK_H = 4096), rows split across several backward programs.
    torch.manual_seed(0)
    check_against_float64(torch.randn(5, 4096).to(dtype), (1 + 0.5 * torch.randn(4096)).to(dtype))


def test_three_dimensional_input(poisoned_empty):
    torch.manual_seed(1)
    check_against_float64(torch.randn(2, 5, 24), torch.randn(24))


def test_row_strided_view_is_used_without_copy(poisoned_empty):
    # The first 24 columns of a [9, 40] tensor: unit column stride, row stride 40, so the kernel's stride path runs.
    torch.manual_seed(2)
    base = torch.randn(9, 40)
    assert _rows_2d(base[:, :24], 24).data_ptr() == base.data_ptr()
    check_against_float64(base[:, :24], torch.randn(24))


def test_non_contiguous_last_dim(poisoned_empty):
    # QK-norm sees [B, S, heads, D] views; a transposed tensor has column stride != 1 and must still be right.
    torch.manual_seed(3)
    x = torch.randn(2, 16, 3, 6).transpose(1, 3)  # [2, 6, 3, 16], last dim stride 18
    assert x.stride(-1) != 1
    check_against_float64(x, torch.randn(16))


def test_fp32_weight_with_fp16_activations(poisoned_empty):
    # The model keeps norm weights in fp32 while activations run in 16-bit: output and dx follow x's dtype.
    torch.manual_seed(4)
    check_against_float64(torch.randn(7, 33).half(), (1 + 0.5 * torch.randn(33)))


def test_zero_rows_are_finite():
    # mean(x^2) = 0: rstd = 1/sqrt(eps) must give y = 0 and finite gradients, not NaN.
    x = torch.zeros(3, 8, requires_grad=True)
    w = torch.ones(8, requires_grad=True)
    y = rms_norm_triton(x, w, 1e-6)
    y.backward(torch.ones_like(y))
    assert torch.equal(y, torch.zeros_like(y))
    assert torch.isfinite(x.grad).all() and torch.equal(w.grad, torch.zeros(8))


def test_weight_gradient_is_deterministic():
    torch.manual_seed(5)
    x = torch.randn(129, 100, requires_grad=True)
    w = torch.randn(100, requires_grad=True)
    dy = torch.randn(129, 100)
    grads = []
    for _ in range(2):
        w.grad = None
        rms_norm_triton(x, w, 1e-6).backward(dy)
        grads.append(w.grad.clone())
    assert torch.equal(grads[0], grads[1])


def test_empty_input():
    x = torch.empty(0, 8, requires_grad=True)
    w = torch.randn(8, requires_grad=True)
    y = rms_norm_triton(x, w, 1e-6)
    y.sum().backward()
    assert y.shape == (0, 8) and torch.equal(w.grad, torch.zeros(8))


@pytest.mark.parametrize(
    "x_shape, w_shape, match",
    [((4, 8), (7,), r"weight has shape \(7,\), expected \(8,\)"), ((), (1,), "at least one dimension")],
)
def test_bad_shapes_raise(x_shape, w_shape, match):
    with pytest.raises(ValueError, match=match):
        rms_norm_triton(torch.randn(x_shape), torch.randn(w_shape), 1e-6)
