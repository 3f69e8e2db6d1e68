"""The fused QK-norm + RoPE pre-pass (Triton, forward and backward) against a float64 reference written here with
plain torch ops, under TRITON_INTERPRET=1 on the CPU (compiled kernels on a GPU machine).

    pytest tests/kernels/test_qknorm_rope.py -q
"""

from __future__ import annotations

import math

import pytest
import torch
from kernel_dtypes import BF16_OVER_FP16, FLOAT_DTYPES
from megasynth.kernels import apply_rope_ref, qknorm_rope, qknorm_rope_ref, rms_norm_ref, rope_cos_sin
from megasynth.kernels._launch import MAX_SHARED_BYTES, planning_for
from megasynth.kernels._qknorm_rope_triton import qknorm_rope_triton

# Relative error (in norm) against float64 on the same rounded inputs. fp32: a mean over D <= 256 squares, a
# rotation and a scale, each a few fp32 roundings (2^-24 ~ 6e-8 each); measured 1.2e-7; 2e-6 leaves margin. fp16:
# outputs and dx are rounded once to fp16 (2^-11 ~ 4.9e-4 relative); measured 2.7e-4; 2e-3 leaves margin, far
# below what a wrong formula gives (O(1)).
RTOL = {torch.float32: 2e-6, torch.float16: 2e-3}
RTOL[torch.bfloat16] = BF16_OVER_FP16 * RTOL[torch.float16]
SCALE = 0.125 * math.log2(math.e)  # a softmax scale pre-multiplied by log2(e), as an attention core would want


def rel_err(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """||got - want|| / ||scale|| (scale defaults to want)."""
    scale = want if scale is None else scale
    return ((got.double() - want).norm() / scale.norm().clamp_min(1e-30)).item()


def norm_rope_float64(x, w, cos, sin, eps, scale):
    """Independent reference: x / sqrt(mean(x^2) + eps) * w, rotate-half by (cos, sin), times scale; float64."""
    half = x.shape[-1] // 2
    n = x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps) * w
    c, s = cos.double().unsqueeze(-2), sin.double().unsqueeze(-2)  # broadcast over the heads dimension
    a, b = n[..., :half], n[..., half:]
    return torch.cat((a * c - b * s, b * c + a * s), dim=-1) * scale


def make_inputs(lead, hq, hkv, dim, dtype, cos_form, seed):
    """q [*lead, hq, dim], k [*lead, hkv, dim], weights [dim] and cos/sin of the requested form."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(*lead, hq, dim, generator=gen).to(dtype)
    k = (3 * torch.randn(*lead, hkv, dim, generator=gen)).to(dtype)
    wq = (1 + 0.5 * torch.randn(dim, generator=gen)).to(dtype)
    wk = (1 + 0.5 * torch.randn(dim, generator=gen)).to(dtype)
    if cos_form == "shared":  # [S, D/2] for batched q [B, S, H, D]
        positions = torch.arange(lead[1])
    elif cos_form == "per_row":  # [B, S, D/2]: positions restart at document starts inside each row
        positions = torch.randint(0, 50, (lead[0], lead[1]), generator=gen)
    else:  # packed [T, D/2]
        positions = torch.randint(0, 50, (lead[0],), generator=gen)
    cos, sin = rope_cos_sin(positions.to(q.device), dim, theta=10000.0)
    return q, k, wq, wk, cos, sin


def run_with_grads(fn, q, k, wq, wk, cos, sin, dq_hat, dk_hat, eps, q_scale):
    leaves = [t.detach().requires_grad_() for t in (q, k, wq, wk)]
    q_hat, k_hat = fn(*leaves, cos, sin, eps=eps, q_scale=q_scale)
    grads = torch.autograd.grad((q_hat, k_hat), leaves, (dq_hat, dk_hat))
    return q_hat, k_hat, grads


def ref_with_grads_float64(q, k, wq, wk, cos, sin, dq_hat, dk_hat, eps, q_scale):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, wq, wk)]
    q_hat = norm_rope_float64(leaves[0], leaves[2], cos, sin, eps, q_scale)
    k_hat = norm_rope_float64(leaves[1], leaves[3], cos, sin, eps, 1.0)
    grads = torch.autograd.grad((q_hat, k_hat), leaves, (dq_hat.double(), dk_hat.double()))
    return q_hat.detach(), k_hat.detach(), grads


def check_against_float64(q, k, wq, wk, cos, sin, *, eps=1e-6, q_scale=SCALE):
    """Kernel on the inputs as given vs the float64 reference on the same values: outputs and all 4 gradients."""
    gen = torch.Generator().manual_seed(123)
    dq_hat = torch.randn(q.shape, generator=gen).to(q.dtype)
    dk_hat = torch.randn(k.shape, generator=gen).to(k.dtype)
    q_hat, k_hat, (dq, dk, dwq, dwk) = run_with_grads(qknorm_rope_triton, q, k, wq, wk, cos, sin, dq_hat, dk_hat,
                                                     eps, q_scale)
    q64, k64, (dq64, dk64, dwq64, dwk64) = ref_with_grads_float64(q, k, wq, wk, cos, sin, dq_hat, dk_hat, eps,
                                                                 q_scale)
    for got, x in ((q_hat, q), (k_hat, k), (dq, q), (dk, k)):
        assert got.shape == x.shape and got.dtype == x.dtype and got.is_contiguous()
    assert dwq.dtype == wq.dtype and dwk.dtype == wk.dtype
    tol = RTOL[q.dtype]
    assert rel_err(q_hat, q64) < tol
    assert rel_err(k_hat, k64) < tol
    # dx = rstd * (gx - xhat * mean(gx * xhat)) is a difference of terms of size |dy * w * rstd|, and rounding is
    # relative to the terms: measure the error against them.
    for dx, dx64, x, w, dy, scale in ((dq, dq64, q, wq, dq_hat, q_scale), (dk, dk64, k, wk, dk_hat, 1.0)):
        x64 = x.double()
        rstd = torch.rsqrt((x64 * x64).mean(-1, keepdim=True) + eps)
        terms = dy.double() * abs(scale) * rstd * w.double().abs().max()
        assert rel_err(dx, dx64, terms) < tol
    assert rel_err(dwq, dwq64) < RTOL[wq.dtype]
    assert rel_err(dwk, dwk64) < RTOL[wk.dtype]
    for t in (q_hat, k_hat, dq, dk, dwq, dwk):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("cos_form", ["shared", "per_row", "packed"])
def test_matches_float64_reference(cos_form, dtype, poisoned_empty):
    # GQA 5:2 heads (ragged head chunks), odd token counts (ragged token blocks), several programs.
    lead = (19,) if cos_form == "packed" else (2, 9)
    check_against_float64(*make_inputs(lead, 5, 2, 64, dtype, cos_form, seed=1))


@pytest.mark.parametrize(("dim", "dtype", "cos_form"), [
    (32, torch.float32, "shared"),
    (48, torch.float16, "packed"),  # D/2 = 24 padded to 32: masked columns
    (80, torch.float32, "per_row"),
    (2, torch.float32, "packed"),  # a single rotation pair
])
def test_head_dims(dim, dtype, cos_form, poisoned_empty):
    lead = (7,) if cos_form == "packed" else (1, 7)
    check_against_float64(*make_inputs(lead, 3, 1, dim, dtype, cos_form, seed=dim))


def test_q_scale_one_and_equal_heads(poisoned_empty):
    check_against_float64(*make_inputs((3, 5), 2, 2, 64, torch.float32, "shared", seed=3), q_scale=1.0)


def test_fp32_weights_with_fp16_activations(poisoned_empty):
    # Mixed precision training keeps the norm weights in fp32: their gradients come back in fp32.
    q, k, wq, wk, cos, sin = make_inputs((11,), 3, 1, 32, torch.float16, "packed", seed=13)
    check_against_float64(q, k, (1 + 0.5 * torch.randn(32)), (1 + 0.5 * torch.randn(32)), cos, sin)


def test_non_contiguous_views(poisoned_empty):
    torch.manual_seed(4)
    b, s, hq, hkv, dim = 2, 7, 4, 2, 32
    _, _, wq, wk, cos, sin = make_inputs((b, s), hq, hkv, dim, torch.float32, "shared", seed=4)
    # As the model does it: q and k are views of one fused projection [B, S, (Hq + 2 Hkv) * D].
    proj = torch.randn(b, s, (hq + 2 * hkv) * dim)
    q = proj[..., : hq * dim].view(b, s, hq, dim)
    k = proj[..., hq * dim : (hq + hkv) * dim].view(b, s, hkv, dim)
    assert not q.is_contiguous() and q.stride(-1) == 1
    check_against_float64(q, k, wq, wk, cos, sin)
    # Heads-major storage seen through a transpose, and a head dim with stride 2.
    q_t = torch.randn(b, hq, s, dim).transpose(1, 2)
    k_t = torch.randn(b, s, hkv, 2 * dim)[..., ::2]
    check_against_float64(q_t, k_t, wq, wk, cos, sin)
    # Per-row tables given as a strided view.
    cos_rows = torch.randn(b, s, 2 * (dim // 2))[..., ::2]
    sin_rows = torch.randn(b, s, 2 * (dim // 2))[..., 1::2]
    check_against_float64(q_t, k_t, wq, wk, cos_rows, sin_rows)


@pytest.mark.parametrize("lead", [(0,), (0, 5), (3, 0)])
def test_empty(lead, poisoned_empty):
    q, k, wq, wk, cos, sin = make_inputs(lead, 4, 2, 32, torch.float32, "packed" if len(lead) == 1 else "shared",
                                         seed=5)
    if len(lead) == 2 and lead[0] == 0:
        cos, sin = cos[: lead[1]], sin[: lead[1]]
    leaves = [t.requires_grad_() for t in (q, k, wq, wk)]
    q_hat, k_hat = qknorm_rope_triton(*leaves, cos, sin)
    assert q_hat.shape == q.shape and k_hat.shape == k.shape
    dq, dk, dwq, dwk = torch.autograd.grad((q_hat, k_hat), leaves, (torch.ones_like(q_hat), torch.ones_like(k_hat)))
    assert dq.shape == q.shape and dk.shape == k.shape
    assert torch.equal(dwq, torch.zeros_like(wq)) and torch.equal(dwk, torch.zeros_like(wk))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_zero_and_huge_rows(dtype, poisoned_empty):
    # All-zero head vectors: rstd = 1/sqrt(eps), output 0, gradients finite. Huge rows: x^2 beyond the fp16
    # range (3e4^2 ~ 1e9), and near the top of fp32's range for fp32 inputs (1e18^2 * D ~ 6e37 < 3.4e38).
    q, k, wq, wk, cos, sin = make_inputs((2, 6), 3, 2, 32, dtype, "shared", seed=6)
    big = 3e4 if dtype == torch.float16 else 1e18
    q[0, 1] = 0
    k[1, :2] = 0
    q[1, 3, 1] = (q[1, 3, 1].float() / q[1, 3, 1].float().abs().max() * big).to(dtype)
    k[0, 4] = (k[0, 4].float() / k[0, 4].float().abs().max() * big).to(dtype)
    check_against_float64(q, k, wq, wk, cos, sin)
    check_against_float64(q, k, wq, wk, cos, sin, eps=1e-2)


def test_backward_is_bit_reproducible():
    q, k, wq, wk, cos, sin = make_inputs((13,), 3, 2, 64, torch.float32, "packed", seed=7)
    dq_hat, dk_hat = torch.randn(q.shape), torch.randn(k.shape)
    first = run_with_grads(qknorm_rope_triton, q, k, wq, wk, cos, sin, dq_hat, dk_hat, 1e-6, SCALE)
    second = run_with_grads(qknorm_rope_triton, q, k, wq, wk, cos, sin, dq_hat, dk_hat, 1e-6, SCALE)
    for a, b in zip((first[0], first[1], *first[2]), (second[0], second[1], *second[2]), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_reference_matches_model_unfused_chain(dtype):
    # qknorm_rope_ref must be the model's existing chain apply_rope_ref(rms_norm_ref(.)) (bit for bit in fp32;
    # fp16 differs by the chain's one extra rounding to fp16 between the norm and the rotation).
    q, k, wq, wk, cos, sin = make_inputs((2, 9), 4, 2, 64, dtype, "per_row", seed=8)
    q_hat, k_hat = qknorm_rope_ref(q, k, wq, wk, cos, sin, eps=1e-5)
    q_chain = apply_rope_ref(rms_norm_ref(q, wq, 1e-5), cos, sin)
    k_chain = apply_rope_ref(rms_norm_ref(k, wk, 1e-5), cos, sin)
    if dtype == torch.float32:
        assert torch.equal(q_hat, q_chain) and torch.equal(k_hat, k_chain)
    else:
        assert rel_err(q_hat, q_chain.double()) < RTOL[dtype] and rel_err(k_hat, k_chain.double()) < RTOL[dtype]
    q_scaled, _ = qknorm_rope_ref(q, k, wq, wk, cos, sin, eps=1e-5, q_scale=SCALE)
    assert rel_err(q_scaled, q_hat.double() * SCALE) < RTOL[dtype]


def test_public_entry_dispatches(monkeypatch):
    inputs = make_inputs((2, 5), 2, 1, 32, torch.float32, "shared", seed=9)
    monkeypatch.setenv("MEGASYNTH_KERNELS", "triton")
    got = qknorm_rope(*inputs, q_scale=SCALE)
    monkeypatch.setenv("MEGASYNTH_KERNELS", "reference")
    want = qknorm_rope(*inputs, q_scale=SCALE)
    for a, b in zip(got, want, strict=True):
        assert rel_err(a, b.double()) < RTOL[torch.float32]


@pytest.mark.parametrize("eps", [0, 0.0, -1e-6, float("nan"), float("inf"), None, True])
@pytest.mark.parametrize("fn", [qknorm_rope_triton, qknorm_rope_ref])
def test_eps_must_be_positive(fn, eps):
    with pytest.raises(ValueError, match="eps"):
        fn(*make_inputs((4,), 2, 1, 8, torch.float32, "packed", seed=10), eps=eps)


def test_bad_inputs_raise_clearly():
    q, k, wq, wk, cos, sin = make_inputs((2, 5), 4, 2, 16, torch.float32, "shared", seed=11)
    cases = [
        ((q[0, 0], k, wq, wk, cos, sin), "q has shape"),
        ((q, k[:1], wq, wk, cos, sin), "k has shape"),
        ((q, k[..., :8], wq, wk, cos, sin), "k has shape"),
        ((q, k.half(), wq, wk, cos, sin), "share one dtype"),
        ((q, k, wq[:8], wk, cos, sin), "q_norm_weight has shape"),
        ((q, k, wq, wk[None], cos, sin), "k_norm_weight has shape"),
        ((q, k, wq, wk, cos[:4], sin), "cos has shape"),
        ((q, k, wq, wk, cos, sin[:, :4]), "sin has shape"),
        ((q, k, wq, wk, cos, sin.expand(2, 5, 8)), "must have one shape"),
        ((q[..., :15], k[..., :15], wq[:15], wk[:15], cos, sin), "even"),
        ((q.long(), k.long(), wq, wk, cos, sin), "floating point"),
        ((q, k, wq, wk, cos, [0.0]), "sin must be a tensor"),
        ((q.double(), k.double(), wq, wk, cos, sin), "fp16, bf16 or fp32"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            qknorm_rope_triton(*args)
    with pytest.raises(ValueError, match="q_scale"):
        qknorm_rope_triton(q, k, wq, wk, cos, sin, q_scale=float("nan"))
    big = torch.zeros(1, 1, 1, 258)
    with pytest.raises(ValueError, match="exceeds"):
        qknorm_rope_triton(big, big, torch.ones(258), torch.ones(258), torch.ones(1, 129), torch.ones(1, 129))
    with pytest.raises(ValueError, match="require grad"):
        qknorm_rope_triton(q, k, wq, wk, cos.requires_grad_(), sin)


def test_planning_records_gpu_configs_without_running():
    # On CPU tensors inside planning_for(arch): host code runs, kernels are only recorded, with the GPU configs.
    for arch in MAX_SHARED_BYTES:
        q, k, wq, wk, cos, sin = make_inputs((2, 40), 32, 8, 128, torch.float16, "shared", seed=12)
        leaves = [t.requires_grad_() for t in (q, k, wq, wk)]
        with planning_for(arch) as launches:
            q_hat, k_hat = qknorm_rope_triton(*leaves, cos, sin)
            torch.autograd.grad((q_hat, k_hat), leaves, (torch.ones_like(q_hat), torch.ones_like(k_hat)))
        assert [launch.name for launch in launches] == ["_qknorm_rope_fwd_kernel", "_qknorm_rope_bwd_kernel"]
        # head_dim 128: steps of 4096 (forward) and 2048 (backward) elements of 16 tokens, so 2 and 1 heads a step.
        expected = [{"HEAD_DIM": 128, "HALF_PAD": 64, "BLOCK_T": 16, "BLOCK_HQ": 2, "BLOCK_HK": 2, "num_warps": 8},
                    {"HEAD_DIM": 128, "HALF_PAD": 64, "BLOCK_T": 16, "BLOCK_HQ": 1, "BLOCK_HK": 1, "num_warps": 8}]
        for launch, meta in zip(launches, expected, strict=True):
            assert launch.grid == (5,)  # 80 tokens, 16 a program (the interpreter's tiles hold 4)
            assert launch.meta == meta
