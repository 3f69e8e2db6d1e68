"""Fused QK-norm + RoPE attention Triton kernel: forward and every gradient against a float64 reference.

On machines without a GPU, tests/conftest.py sets TRITON_INTERPRET=1 and the kernels run on the CPU through the
interpreter, with 16-row tiles (kernels/_attention_triton.py INTERPRETER_BLOCKS), so the tens-of-token sequences
here cross several tiles and end mid-tile. GPU-only tests (bf16, larger shapes) are skipped there.

    pytest tests/kernels/test_attention.py -q
"""

from __future__ import annotations

from dataclasses import dataclass, field

import megasynth.kernels._attention_triton as attention_triton
import pytest
import torch
from megasynth.kernels import qknorm_rope_attention, qknorm_rope_attention_ref, rope_cos_sin
from megasynth.kernels._attention_triton import qknorm_rope_attention_triton

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CUDA_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bf16 / large shapes)")

# Relative error ||got - want|| / ||want|| allowed against float64 on the same rounded inputs.
# fp32: the kernel accumulates dots of D <= 256 terms and softmax sums of tens of terms in fp32 (relative error
#   ~ sqrt(terms) * 2^-24 ~ 1e-7..1e-6; measured <= 6e-7 here); 1e-5 also covers the GPU's approximate
#   rsqrt/exp2 (~2 ulp) and longer sums on the GPU shapes, and stays 5 orders below a wrong formula.
# fp16: q_hat, k_hat, P and dS are rounded to fp16 (2^-11 ~ 4.9e-4 relative) before the tensor-core dots, and
#   outputs are rounded once; measured <= 6e-4 here; 3e-3 leaves margin.
# bf16 (GPU only): the same roundings at 2^-8 ~ 3.9e-3; 2.5e-2 leaves margin for the longer GPU sequences.
RTOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert torch.isfinite(got).all(), "non-finite values (an unwritten NaN-poisoned element?)"
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()


@dataclass
class Case:
    """One attention problem: batched (batch, seq) or packed (doc_lengths), GQA heads, head_dim, dtype."""

    heads_q: int
    heads_kv: int
    head_dim: int
    dtype: torch.dtype = torch.float32
    batch: int = 1
    seq: int = 0
    doc_lengths: list[int] = field(default_factory=list)
    rope_per_batch: bool = False  # batched only: cos/sin [B, S, D/2] with positions restarting mid-row
    fused_qkv: bool = False  # q, k, v as strided views of one projection output (no unit token stride)
    weight_dtype: torch.dtype | None = None  # default: the input dtype
    input_scale: float = 1.0

    @property
    def packed(self) -> bool:
        return bool(self.doc_lengths)

    def make(self, seed: int):
        """-> (q, k, v, q_norm_weight, k_norm_weight, cos, sin, cu_seqlens) on DEVICE, leaves requiring grad."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        tokens = (sum(self.doc_lengths),) if self.packed else (self.batch, self.seq)
        heads = self.heads_q + 2 * self.heads_kv
        qkv = torch.randn(*tokens, heads, self.head_dim, generator=gen, dtype=torch.float64) * self.input_scale
        qkv = qkv.to(DEVICE, self.dtype)
        if self.fused_qkv:  # views with token stride (Hq + 2 Hkv) * D: exercises the kernels' stride handling
            leaves = (qkv.requires_grad_(),)
            q, k, v = qkv.split([self.heads_q, self.heads_kv, self.heads_kv], dim=-2)
        else:
            q, k, v = (t.contiguous().requires_grad_()
                       for t in qkv.split([self.heads_q, self.heads_kv, self.heads_kv], dim=-2))
            leaves = (q, k, v)
        # Weights away from 1 so that a kernel ignoring or misplacing them fails.
        wdtype = self.weight_dtype or self.dtype
        q_w, k_w = ((1 + 0.5 * torch.randn(self.head_dim, generator=gen, dtype=torch.float64))
                    .to(DEVICE, wdtype).requires_grad_() for _ in range(2))
        cu_seqlens = None
        if self.packed:
            positions = torch.cat([torch.arange(n) for n in self.doc_lengths])  # restart at every document
            offsets = torch.tensor([0] + self.doc_lengths).cumsum(0)
            cu_seqlens = offsets.to(DEVICE, torch.int32)
        elif self.rope_per_batch:
            # Row b restarts its positions at token 3 + 5b, as a row holding two documents would.
            positions = torch.stack([torch.cat([torch.arange(3 + 5 * b), torch.arange(self.seq - 3 - 5 * b)])
                                     for b in range(self.batch)])
        else:
            positions = torch.arange(self.seq)
        cos, sin = rope_cos_sin(positions.to(DEVICE), self.head_dim, theta=10000.0)
        return leaves, (q, k, v, q_w, k_w, cos, sin, cu_seqlens)


def check_against_float64(case: Case, *, causal=True, seed=0, rtol=None, **kwargs) -> None:
    leaves, (q, k, v, q_w, k_w, cos, sin, cu_seqlens) = case.make(seed)
    out = qknorm_rope_attention_triton(q, k, v, q_w, k_w, cos, sin, cu_seqlens=cu_seqlens, causal=causal, **kwargs)
    assert out.shape == q.shape and out.dtype == q.dtype
    dout = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    dout = dout.to(DEVICE, out.dtype)
    grads = torch.autograd.grad(out, (q, k, v, q_w, k_w) if not case.fused_qkv else (*leaves, q_w, k_w), dout)

    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v, q_w, k_w)]
    if case.fused_qkv:  # differentiate the reference through the same split as the kernel's inputs
        qkv64 = leaves[0].detach().double().requires_grad_()
        q64, k64, v64 = qkv64.split([case.heads_q, case.heads_kv, case.heads_kv], dim=-2)
        ref_in = [q64, k64, v64, *ref_in[3:]]
    want = qknorm_rope_attention_ref(*ref_in, cos.double(), sin.double(), cu_seqlens=cu_seqlens, causal=causal,
                                     **kwargs)
    wrt = ([qkv64] if case.fused_qkv else ref_in[:3]) + ref_in[3:]
    want_grads = torch.autograd.grad(want, wrt, dout.double())

    tol = rtol or RTOL[case.dtype]
    names = (["qkv"] if case.fused_qkv else ["q", "k", "v"]) + ["q_norm_weight", "k_norm_weight"]
    errors = {"out": rel_err(out, want)}
    for name, got, ref in zip(names, grads, want_grads):
        assert got.shape == ref.shape and got.dtype in (case.dtype, case.weight_dtype or case.dtype)
        errors[name] = rel_err(got, ref)
    # Weight gradients come back in the weight's dtype: an fp16 weight adds its own rounding.
    tols = {name: (max(tol, RTOL[case.weight_dtype or case.dtype]) if "weight" in name else tol) for name in errors}
    bad = {name: f"{err:.2e}" for name, err in errors.items() if not err < tols[name]}
    assert not bad, f"relative errors above {tol:g}: {bad} (all: { {n: f'{e:.1e}' for n, e in errors.items()} })"


# Each tuple covers several axes at once so that the set stays small under the interpreter: every GQA ratio
# (1, 2, 4), head_dim 64 and 128, causal and not, fp32 and fp16, lengths that are not multiples of the tiles.
BATCHED = {
    "gqa2-d64-causal-fp32": (Case(2, 1, 64, batch=2, seq=33), True),
    "gqa4-d128-full-fp16-rope_per_batch": (Case(4, 1, 128, torch.float16, batch=1, seq=50, rope_per_batch=True), False),
    "gqa1-d64-causal-fp16-rope_per_batch": (Case(2, 2, 64, torch.float16, batch=2, seq=17, rope_per_batch=True), True),
    "gqa1-d128-causal-fp32-fused_qkv": (Case(1, 1, 128, batch=1, seq=50, fused_qkv=True), True),
    "gqa2-d64-full-fp32": (Case(2, 1, 64, batch=1, seq=17), False),
}


@pytest.mark.parametrize("name", BATCHED)
def test_batched_matches_float64_reference(name, poisoned_empty):
    case, causal = BATCHED[name]
    check_against_float64(case, causal=causal)


PACKED = {
    "gqa1-d64-causal-fp32": (Case(2, 2, 64, doc_lengths=[1, 33, 16, 7]), True),
    "gqa4-d128-full-fp16-fp32weights": (Case(4, 1, 128, torch.float16, doc_lengths=[20, 1, 31],
                                              weight_dtype=torch.float32), False),
    "gqa2-d128-causal-fp16-empty_doc": (Case(2, 1, 128, torch.float16, doc_lengths=[9, 0, 40]), True),
    "gqa2-d64-full-fp32": (Case(2, 1, 64, doc_lengths=[5, 18]), False),
}


@pytest.mark.parametrize("name", PACKED)
def test_packed_matches_float64_reference(name, poisoned_empty):
    case, causal = PACKED[name]
    check_against_float64(case, causal=causal)


@pytest.mark.parametrize("head_dim", [16, 24, 256])
def test_other_head_dims(head_dim, poisoned_empty):
    # 16: D/2 = 8 is padded to tl.dot's minimum depth 16; 24: D/2 = 12 is not a power of two; 256: the largest.
    check_against_float64(Case(2, 1, head_dim, batch=1, seq=20), causal=True)


def test_unequal_tiles(monkeypatch, poisoned_empty):
    # Query tiles twice the key tiles (forward, dq) and key tiles twice the query steps (dk/dv), as on the GPU:
    # the causal diagonal then spans several inner tiles, some of them entirely masked for some rows.
    monkeypatch.setitem(attention_triton.INTERPRETER_BLOCKS, "fwd", (32, 16))
    monkeypatch.setitem(attention_triton.INTERPRETER_BLOCKS, "dkdv", (16, 32))
    monkeypatch.setitem(attention_triton.INTERPRETER_BLOCKS, "dq", (32, 16))
    if DEVICE.type == "cuda":
        pytest.skip("INTERPRETER_BLOCKS only applies under the interpreter")
    check_against_float64(Case(2, 1, 64, doc_lengths=[40, 9, 23]), causal=True)
    check_against_float64(Case(2, 2, 64, batch=1, seq=45), causal=False, seed=1)


def test_non_default_eps_and_scale(poisoned_empty):
    # Inputs of RMS 0.05 make mean(x^2) = 2.5e-3 comparable to eps = 1e-2, so a kernel ignoring eps (or using
    # the default) is off by O(1); softmax_scale 0.3 instead of 1/sqrt(64) = 0.125 sharpens the softmax.
    check_against_float64(Case(2, 1, 64, batch=1, seq=33, input_scale=0.05), causal=True, eps=1e-2,
                          softmax_scale=0.3)


@pytest.mark.parametrize("packed", [False, True])
def test_single_token_sequences(packed, poisoned_empty):
    # A query that sees one key returns that key's value whatever q and k are, so dq, dk and the norm-weight
    # gradients are exactly 0 and only out and dv can be compared relatively.
    case = Case(2, 1, 64, doc_lengths=[1, 1, 1]) if packed else Case(2, 1, 64, batch=3, seq=1)
    _, (q, k, v, q_w, k_w, cos, sin, cu_seqlens) = case.make(seed=3)
    out = qknorm_rope_attention_triton(q, k, v, q_w, k_w, cos, sin, cu_seqlens=cu_seqlens)
    dout = torch.randn_like(out)
    dq, dk, dv, dqw, dkw = torch.autograd.grad(out, (q, k, v, q_w, k_w), dout)
    want = v.detach().repeat_interleave(2, dim=-2)
    assert rel_err(out, want) < RTOL[torch.float32]
    assert rel_err(dv, dout.view(*dout.shape[:-2], 1, 2, -1).sum(-2).view(v.shape)) < RTOL[torch.float32]
    # What remains is fp32 rounding of dp - delta (two sums of D products of unit-size terms): ~D * 2^-24 ~ 4e-6.
    for g in (dq, dk, dqw, dkw):
        assert torch.isfinite(g).all() and g.abs().max() < 1e-4


def test_empty_input():
    case = Case(2, 1, 64, doc_lengths=[0])
    _, (q, k, v, q_w, k_w, cos, sin, cu_seqlens) = case.make(seed=0)
    out = qknorm_rope_attention_triton(q, k, v, q_w, k_w, cos, sin, cu_seqlens=cu_seqlens)
    assert out.shape == (0, 2, 64)
    dq, dqw = torch.autograd.grad(out.sum(), (q, q_w))
    assert dq.shape == q.shape and torch.equal(dqw, torch.zeros_like(dqw))


def test_dispatcher_routes_to_triton(monkeypatch):
    called = []

    def spy(*args, **kwargs):
        called.append(kwargs)
        return args[0]

    monkeypatch.setenv("MEGASYNTH_KERNELS", "triton")
    monkeypatch.setattr(attention_triton, "qknorm_rope_attention_triton", spy)
    _, (q, k, v, q_w, k_w, cos, sin, cu_seqlens) = Case(2, 1, 64, batch=1, seq=4).make(seed=0)
    qknorm_rope_attention(q, k, v, q_w, k_w, cos, sin, causal=False, eps=1e-3)
    assert called == [dict(cu_seqlens=None, max_seqlen=None, causal=False, eps=1e-3, softmax_scale=None)]


def _bad_inputs():
    """(description, mutate(kwargs) -> None, expected message fragment)."""
    def setter(key, fn):
        return lambda kw: kw.__setitem__(key, fn(kw))

    return {
        "q rank": (setter("q", lambda kw: kw["q"][0]), "needs 4 dims"),
        "k and v differ": (setter("k", lambda kw: kw["k"].repeat(1, 1, 3, 1)[:, :, :3]), "do not match"),
        "gqa ratio": (lambda kw: kw.update(k=kw["k"].repeat(1, 1, 3, 1), v=kw["v"].repeat(1, 1, 3, 1)),
                      "not a multiple"),
        "odd head_dim": (lambda kw: kw.update({n: kw[n][..., :63] for n in ("q", "k", "v")}), "even head_dim"),
        "weight shape": (setter("q_norm_weight", lambda kw: kw["q_norm_weight"][:32]), "q_norm_weight has shape"),
        "cos shape": (setter("cos", lambda kw: kw["cos"][:, :5]), "cos has shape"),
        "dtype mix": (setter("v", lambda kw: kw["v"].double()), "share one dtype"),
        "integer q": (setter("q", lambda kw: kw["q"].long()), "floating point"),
        "cos needs grad": (setter("cos", lambda kw: kw["cos"].clone().requires_grad_()), "RoPE tables"),
        "cu int64": (lambda kw: kw.update(packed=True, cu_seqlens=torch.tensor([0, 8], dtype=torch.int64)),
                     "1-D int32"),
        "cu wrong end": (lambda kw: kw.update(packed=True, cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32)),
                         "end at the token count 8"),
        "cu decreasing": (lambda kw: kw.update(packed=True, cu_seqlens=torch.tensor([0, 5, 2, 8], dtype=torch.int32)),
                          "never decrease"),
        "max_seqlen": (lambda kw: kw.update(packed=True, max_seqlen=2.5), "max_seqlen"),
    }


@pytest.mark.parametrize("name", list(_bad_inputs()))
def test_bad_input_is_a_clear_error(name):
    if DEVICE.type == "cuda" and name.startswith("cu "):
        pytest.skip("on CUDA the cu_seqlens values are checked by a device-side assert (no host sync)")
    mutate, fragment = _bad_inputs()[name]
    _, (q, k, v, q_w, k_w, cos, sin, _) = Case(2, 1, 64, batch=1, seq=8).make(seed=0)
    kw = dict(q=q, k=k, v=v, q_norm_weight=q_w, k_norm_weight=k_w, cos=cos, sin=sin)
    mutate(kw)
    if kw.pop("packed", False):  # the packed form: drop the batch dim
        kw.update({n: kw[n][0] for n in ("q", "k", "v")})
        kw.setdefault("cu_seqlens", torch.tensor([0, 8], dtype=torch.int32))
    with pytest.raises(ValueError, match="qknorm_rope_attention: .*" + fragment):
        qknorm_rope_attention_triton(**kw)


# ------------------------------------------------------------------------------------------------ GPU only


@CUDA_ONLY
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_batched_parity(dtype, causal, poisoned_empty):
    check_against_float64(Case(8, 2, 128, dtype, batch=2, seq=1000, rope_per_batch=True), causal=causal)


@CUDA_ONLY
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_gpu_packed_parity_bf16(head_dim, poisoned_empty):
    check_against_float64(Case(4, 1, head_dim, torch.bfloat16, doc_lengths=[700, 1, 129, 1200, 63]), causal=True)


@CUDA_ONLY
def test_gpu_fp32_parity(poisoned_empty):
    check_against_float64(Case(4, 2, 64, batch=2, seq=300), causal=True)
