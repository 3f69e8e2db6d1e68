"""SwiGLU Triton kernel (forward and backward) against a float64 reference, under TRITON_INTERPRET=1 on CPU.

    pytest tests/kernels/test_swiglu.py -q
"""

from __future__ import annotations

import pytest
import torch
from kernel_dtypes import BF16_OVER_FP16, FLOAT_DTYPES
from megasynth.kernels import swiglu_ref
from megasynth.kernels._swiglu_triton import swiglu_triton

# Relative error (in norm) allowed against float64 on the same rounded inputs. The kernel computes in fp32 and
# rounds each output once. fp32: a few ulps of exp/sigmoid (2^-24 each); measured 1.3e-7; 1e-6 leaves margin.
# fp16: one rounding to fp16 (2^-11 ~ 4.9e-4 relative per element, ~2.8e-4 in norm); measured 3.9e-4; 1e-3.
RTOL = {torch.float32: 1e-6, torch.float16: 1e-3}
RTOL[torch.bfloat16] = BF16_OVER_FP16 * RTOL[torch.float16]

# Where the kernels run: see tests/kernels/conftest.py (its autouse fixture makes DEVICE the default device).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()


def check_against_float64(gate: torch.Tensor, up: torch.Tensor) -> None:
    gate = gate.detach().requires_grad_()
    up = up.detach().requires_grad_()
    out = swiglu_triton(gate, up)
    dout = torch.randn(out.shape, dtype=torch.float64).to(gate.dtype)
    out.backward(dout)

    g64 = gate.detach().double().requires_grad_()
    u64 = up.detach().double().requires_grad_()
    swiglu_ref(g64, u64).backward(dout.double())

    assert out.shape == gate.shape and out.dtype == gate.dtype
    tol = RTOL[gate.dtype]
    assert rel_err(out, swiglu_ref(g64, u64)) < tol
    assert rel_err(gate.grad, g64.grad) < tol
    assert rel_err(up.grad, u64.grad) < tol


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 1000), (2, 5, 211)])  # 3000 and 2110 span several 1024-blocks
def test_matches_float64_reference(shape, dtype, poisoned_empty):
    torch.manual_seed(sum(shape))
    check_against_float64((2 * torch.randn(shape)).to(dtype), torch.randn(shape).to(dtype))


# The interpreter evaluates sigmoid with numpy, which warns when exp(100) overflows to inf (the result, 0, is right).
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
def test_saturated_gate(poisoned_empty):
    # sigmoid saturates at |g| ~ 17 in fp32 and exp overflows at g ~ -89: large gates must stay finite and exact.
    gate = torch.tensor([-100.0, -30.0, -17.0, 0.0, 17.0, 30.0, 100.0])
    check_against_float64(gate, torch.linspace(-1, 1, 7))


def test_non_contiguous_inputs(poisoned_empty):
    torch.manual_seed(1)
    gate = torch.randn(40, 9).t()  # [9, 40], strides (1, 9)
    up = torch.randn(9, 80)[:, ::2]  # [9, 40], strides (80, 2)
    check_against_float64(gate, up)


def test_empty_input():
    gate = torch.empty(0, 4, requires_grad=True)
    up = torch.empty(0, 4, requires_grad=True)
    swiglu_triton(gate, up).sum().backward()
    assert gate.grad.shape == (0, 4)


@pytest.mark.parametrize(
    "gate, up, match",
    [
        (torch.randn(3, 4), torch.randn(4), "same shape"),
        (torch.randn(3), torch.randn(3).double(), "one dtype"),
        (torch.ones(3, dtype=torch.int32), torch.ones(3, dtype=torch.int32), "floating-point"),
    ],
)
def test_bad_inputs_raise(gate, up, match):
    with pytest.raises(ValueError, match=match):
        swiglu_triton(gate, up)
