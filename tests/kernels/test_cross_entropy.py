"""Linear cross-entropy: the Triton path (under TRITON_INTERPRET=1 on CPU) and the chunked PyTorch path against a
float64 reference, plus the memory property (no [N, V] tensor is ever made).

    pytest tests/kernels/test_cross_entropy.py -q
"""

from __future__ import annotations

import pytest
import torch
from kernel_dtypes import BF16_OVER_FP16, FLOAT_DTYPES
from megasynth.kernels._cross_entropy_triton import linear_cross_entropy_triton
from megasynth.kernels.cross_entropy import (
    chunk_rows_for,
    linear_cross_entropy_chunked,
    linear_cross_entropy_ref,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

IMPLS = {"triton": linear_cross_entropy_triton, "chunked": linear_cross_entropy_chunked}

# Relative error (in norm) against float64 on the same rounded inputs.
# fp32: each softmax probability carries the relative rounding of the fp32 logsumexp (|lse| ~ 11 at V = 50257,
# ulp ~ 1e-6); measured worst 5e-6 (grad_hidden, V = 50257), same for both paths; 3e-5 leaves margin.
# fp16: the logits are rounded to fp16 (2^-11 relative, as the reference also does) before the fp32 softmax, and
# the gradient is rounded to fp16 before its matmuls; measured worst 4.5e-4; 2e-3 leaves margin. A wrong softmax,
# scale or skipped chunk is O(1) off.
RTOL = {torch.float32: 3e-5, torch.float16: 2e-3}
RTOL[torch.bfloat16] = BF16_OVER_FP16 * RTOL[torch.float16]

# Where the kernels run: see tests/kernels/conftest.py (its autouse fixture makes DEVICE the default device).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def ce_float64(hidden, weight, targets, ignore_index=-100):
    """Independent reference: float64 log-softmax, mean over non-ignored rows, 0 when there are none."""
    logp = torch.log_softmax(hidden.double() @ weight.double().t(), dim=-1)
    valid = targets != ignore_index
    picked = logp.gather(1, torch.where(valid, targets, 0).unsqueeze(1)).squeeze(1)
    return -(picked * valid).sum() / valid.sum().clamp(min=1)


def assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    # ||got - want|| <= rtol * ||want||; where want is exactly 0 (V = 1, all ignored) got must be exactly 0 too.
    err = (got.double() - want).norm().item()
    assert err <= rtol * want.norm().item(), f"error {err:.3g} vs norm {want.norm().item():.3g}"


def make_inputs(n, h, v, dtype, seed, ignored=(), ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, device="cpu").to(DEVICE, dtype)
    weight = (torch.randn(v, h, generator=g, device="cpu") / h**0.5 * 2).to(DEVICE, dtype)  # logits of std ~2
    targets = torch.randint(0, v, (n,), generator=g, device="cpu")
    targets[list(ignored)] = ignore_index
    return hidden, weight, targets.to(DEVICE)


def check_against_float64(impl, hidden, weight, targets, ignore_index=-100, chunk_rows=None, upstream=1.0):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss = impl(h, w, targets, ignore_index, chunk_rows=chunk_rows)
    (loss * upstream).backward()

    h64 = hidden.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    want = ce_float64(h64, w64, targets, ignore_index)
    (want * upstream).backward()

    assert loss.dtype == torch.float32 and loss.shape == ()
    assert h.grad.dtype == hidden.dtype and w.grad.dtype == weight.dtype
    tol = RTOL[hidden.dtype]
    assert_close(loss.detach(), want.detach(), tol)
    assert_close(h.grad, h64.grad, tol)
    assert_close(w.grad, w64.grad, tol)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(
    "n, h, v, chunk_rows, ignored",
    [
        (1, 8, 1, None, ()),  # a single class: loss and gradients are exactly 0
        (3, 8, 17, 2, (1,)),  # chunk of 2 over 3 rows: ragged last chunk
        (7, 5, 17, 3, (0, 6)),  # ignored rows at both ends
        (129, 16, 1000, 50, (3, 64, 100)),  # vocab not a power of two, 3 chunks, last one ragged
        (3, 4, 50257, None, ()),  # GPT-2 vocab: several 8192-wide tiles per row in the kernel
    ],
)
def test_matches_float64_reference(impl, dtype, n, h, v, chunk_rows, ignored, poisoned_empty):
    hidden, weight, targets = make_inputs(n, h, v, dtype, seed=n + v, ignored=ignored)
    check_against_float64(IMPLS[impl], hidden, weight, targets, chunk_rows=chunk_rows)


@pytest.mark.parametrize("impl", IMPLS)
def test_upstream_gradient_scales_and_custom_ignore_index(impl):
    # ignore_index = 3 is also a real class id: rows with target 3 must drop out, other classes count.
    hidden, weight, targets = make_inputs(20, 6, 11, torch.float32, seed=7, ignored=(2, 5), ignore_index=3)
    check_against_float64(IMPLS[impl], hidden, weight, targets, ignore_index=3, chunk_rows=6, upstream=-2.5)


@pytest.mark.parametrize("impl", IMPLS)
def test_transposed_inputs(impl, poisoned_empty):
    # Column-major hidden and weight (views of transposed buffers): gradients still land in the right rows.
    hidden, weight, targets = make_inputs(10, 6, 23, torch.float32, seed=8, ignored=(9,))
    check_against_float64(IMPLS[impl], hidden.t().contiguous().t(), weight.t().contiguous().t(), targets, chunk_rows=4)


@pytest.mark.parametrize("impl", IMPLS)
def test_all_ignored_gives_zero_not_nan(impl, poisoned_empty):
    hidden, weight, targets = make_inputs(5, 4, 9, torch.float32, seed=0, ignored=range(5))
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    loss = IMPLS[impl](h, w, targets, chunk_rows=2)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))
    # The reference follows the same convention, so every dispatch path agrees.
    assert linear_cross_entropy_ref(hidden, weight, targets).item() == 0.0


@pytest.mark.parametrize("impl", IMPLS)
def test_partial_requires_grad_and_no_grad(impl):
    hidden, weight, targets = make_inputs(9, 4, 13, torch.float32, seed=3, ignored=(4,))
    want = ce_float64(hidden, weight, targets)
    with torch.no_grad():
        assert_close(IMPLS[impl](hidden, weight, targets, chunk_rows=4), want, RTOL[torch.float32])
    # Frozen embeddings / frozen head: only the other gradient is produced.
    w = weight.clone().requires_grad_()
    IMPLS[impl](hidden, w, targets, chunk_rows=4).backward()
    w64 = weight.double().requires_grad_()
    ce_float64(hidden, w64, targets).backward()
    assert_close(w.grad, w64.grad, RTOL[torch.float32])


@pytest.mark.parametrize("impl", IMPLS)
def test_backward_twice_with_retain_graph(impl):
    hidden, weight, targets = make_inputs(6, 4, 7, torch.float32, seed=4)
    h = hidden.requires_grad_()
    loss = IMPLS[impl](h, weight, targets, chunk_rows=4)
    loss.backward(retain_graph=True)
    first = h.grad.clone()
    loss.backward()
    assert torch.allclose(h.grad, 2 * first, rtol=1e-6, atol=0)  # fp32 doubling is exact up to the add's rounding


def test_out_of_range_target():
    hidden, weight, targets = make_inputs(4, 4, 5, torch.float32, seed=5)
    targets[2] = 5
    # The Triton path cannot check on the host without a device sync: it poisons the loss instead.
    assert torch.isnan(linear_cross_entropy_triton(hidden, weight, targets))
    with pytest.raises(ValueError, match=r"targets\[2\] = 5 is outside \[0, 5\)"):
        linear_cross_entropy_chunked(hidden, weight, targets)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "shapes, match",
    [
        (((4, 3), (5, 2), (4,)), "hidden size differs"),
        (((4, 3), (5, 3), (3,)), r"targets has shape \(3,\), expected \(4,\)"),
        (((2, 4, 3), (5, 3), (8,)), r"expected hidden \[N, H\]"),
        (((4, 3), (0, 3), (4,)), "empty vocabulary"),
    ],
)
def test_bad_shapes_raise(impl, shapes, match):
    hs, ws, ts = shapes
    with pytest.raises(ValueError, match=match):
        IMPLS[impl](torch.randn(hs), torch.randn(ws), torch.zeros(ts, dtype=torch.long))


def test_float_targets_raise():
    with pytest.raises(ValueError, match="integer class ids"):
        linear_cross_entropy_chunked(torch.randn(4, 3), torch.randn(5, 3), torch.zeros(4))


def test_chunk_rows_bounds_the_logits():
    assert chunk_rows_for(16384, 128256, 1 << 26) == (1 << 26) // 128256  # 523 rows: 67M elements at most
    assert chunk_rows_for(10, 1000, 1 << 26) == 10  # never more rows than there are
    assert chunk_rows_for(10, 1 << 30, 1 << 26) == 1  # a vocab beyond the budget still makes progress


class MaxTensorSize(TorchDispatchMode):
    """Records the largest tensor (in bytes) any aten op returns while active.

    Bytes, not elements: the Triton interpreter moves arguments as raw byte storages (uint8 tensors)."""

    def __init__(self):
        super().__init__()
        self.max_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.max_bytes = max(self.max_bytes, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("impl", ["chunked", "triton", "reference"])
def test_never_materialises_full_logits(impl):
    # N * V = 3200 logits; chunks of 16 rows hold 800; the gradients are N * H = 512 and V * H = 400 (all fp32).
    n, h, v, chunk = 64, 8, 50, 16
    fp32 = 4
    hidden, weight, targets = make_inputs(n, h, v, torch.float32, seed=6, ignored=(0,))
    hidden.requires_grad_()
    weight.requires_grad_()
    with MaxTensorSize() as sizes:
        if impl == "reference":
            loss = linear_cross_entropy_ref(hidden, weight, targets)
        else:
            loss = IMPLS[impl](hidden, weight, targets, chunk_rows=chunk)
        loss.backward()
    if impl == "reference":
        assert sizes.max_bytes >= n * v * fp32  # the probe does see a full [N, V] tensor when one is made
    else:
        assert sizes.max_bytes <= max(chunk * v, n * h, v * h) * fp32 < n * v * fp32


def autocast_reference(hidden, weight, targets, dtype, chunk_rows, ignore_index=-100):
    """What autocast means for the head, in float64 between the roundings autocast makes: hidden and weight
    rounded to `dtype`, logits = their product rounded to `dtype`, loss and d loss / d logits in float64 from
    those logits; the logits gradient rounded to `dtype`, each chunk's matmul product rounded to `dtype` (what a
    16-bit matmul with fp32 accumulation returns), grad_weight summed over chunks. -> (loss, grad_h, grad_w)."""
    h = hidden.to(dtype).double()
    w = weight.to(dtype).double()
    logits = (h @ w.t()).to(dtype).double()
    valid = targets != ignore_index
    count = valid.sum().clamp(min=1)
    logp = torch.log_softmax(logits, dim=-1)
    safe = torch.where(valid, targets, 0)
    loss = -(logp.gather(1, safe[:, None]).squeeze(1) * valid).sum() / count
    dlogits = logp.exp()
    dlogits[torch.arange(len(safe)), safe] -= 1.0
    dlogits = (dlogits * (valid[:, None] / count)).to(dtype).double()
    grad_h = (dlogits @ w).to(dtype).double()
    chunk_rows = chunk_rows or len(targets)
    grad_w = sum((dlogits[i : i + chunk_rows].t() @ h[i : i + chunk_rows]).to(dtype).double()
                 for i in range(0, len(targets), chunk_rows))
    return loss, grad_h, grad_w


# The Triton interpreter cannot run bf16 (tests/conftest.py), so on the CPU the Triton path is checked under fp16
# autocast, which exercises the same cast; on a GPU both dtypes run.
AUTOCAST_CASES = [
    ("chunked", torch.bfloat16),
    ("chunked", torch.float16),
    ("triton", torch.float16),
    pytest.param("triton", torch.bfloat16, marks=pytest.mark.skipif(
        DEVICE.type != "cuda", reason="the Triton interpreter cannot run bf16")),
]


# Unit roundoff of the 16-bit formats (half their relative spacing) and of fp32, their accumulator.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
FP32_UNIT_ROUNDOFF = 2.0**-24


def sixteen_bit_matmul_rtol(dtype: torch.dtype, reduction_len: int) -> float:
    """How far (norm-wise, relative) a correct 16-bit matmul may land from `autocast_reference` on any CPU or GPU.

    The reference rounds the exact product once to `dtype`; a real matmul accumulates in fp32, in an order that
    depends on the machine (oneDNN picks AVX2, AVX-512 BF16 or AMX kernels by CPU; cuBLAS by GPU). Its fp32 sum is
    off by about sqrt(K) * u32 * sum|a*b| ~ K * u32 * |x| for random inputs, so an output element rounds to the
    neighbouring `dtype` value (one ulp, 2u relative) with probability about K * u32 / u. Norm-wise that is
    2u * sqrt(K * u32 / u) = 2 * sqrt(K * u * u32), using the pessimistic K rather than sqrt(K) for how a random
    dot product's size compares with sum|a*b|. (bf16, K = 300: 5.3e-4; measured 0 to 8e-7 on an AVX2 CPU and
    9.8e-5 on one with bf16 instructions, where the old fixed 5e-5 failed. fp16: 1.9e-4.)"""
    return 2 * (reduction_len * UNIT_ROUNDOFF[dtype] * FP32_UNIT_ROUNDOFF) ** 0.5


@pytest.mark.parametrize("impl, dtype", AUTOCAST_CASES)
@pytest.mark.parametrize("chunk_rows", [None, 16])
def test_autocast_runs_the_head_in_the_autocast_dtype(impl, dtype, chunk_rows):
    # torch.mm(..., out=) is not an autocast op, so without the explicit cast the head ran in
    # fp32 under bf16 autocast. Here the result must match the autocast reference within what a 16-bit matmul
    # may differ by on any machine, and the fp32 computation must lie beyond that (bf16: gradients 3.3e-3 away,
    # fp16: 4.4e-4), so a head left in fp32 fails the first check.
    n, hdim, vocab = 48, 64, 300
    hidden, weight, targets = make_inputs(n, hdim, vocab, torch.float32, seed=0, ignored=(3,))
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    with torch.autocast(DEVICE.type, dtype=dtype):
        loss = IMPLS[impl](h, w, targets, chunk_rows=chunk_rows)
    loss.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32

    want_loss, want_h, want_w = autocast_reference(hidden, weight, targets, dtype, chunk_rows)
    fp32_loss, fp32_h, fp32_w = autocast_reference(hidden, weight, targets, torch.float64, chunk_rows)
    rtol = sixteen_bit_matmul_rtol(dtype, max(n, hdim, vocab))
    # A flipped logit moves the mean loss by at most its ulp: the relative bound holds for the loss too.
    assert abs(loss.item() - want_loss.item()) <= rtol * abs(want_loss.item())
    assert_close(h.grad, want_h, rtol)
    assert_close(w.grad, want_w, rtol)
    # Machine-independent (both are float64 computations): the fp32 head is more than twice the tolerance away,
    # so the checks above can tell the two apart.
    for want, fp32 in ((want_h, fp32_h), (want_w, fp32_w)):
        assert (fp32 - want).norm() > 2 * rtol * want.norm()


def test_autocast_off_keeps_input_dtype():
    # Outside autocast nothing is cast: fp32 in, fp32 matmuls (a bf16 head would be ~3e-3 off, not 1e-6).
    hidden, weight, targets = make_inputs(48, 64, 300, torch.float32, seed=0, ignored=(3,))
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=False):
        loss = linear_cross_entropy_chunked(hidden, weight, targets)
    assert abs(loss.item() - ce_float64(hidden, weight, targets).item()) < 1e-5
