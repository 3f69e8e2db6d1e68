"""qknorm_rope_attention (the QK-norm + RoPE pre-pass, then the attention core): forward and every gradient.

The composition is compared with a float64 reference written here from plain torch ops, one sequence at a time
(no shared code with the kernels or kernels/attention.py), so a bug common to the reference chain and a kernel
cannot hide. On the CPU MEGASYNTH_KERNELS=triton runs both steps through the Triton interpreter
(tests/conftest.py sets TRITON_INTERPRET=1); on a GPU the same tests run whichever core `auto` picks there, plus
bf16 and every installed core at larger shapes.

    pytest tests/kernels/test_attention.py -q
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
from megasynth.kernels import qknorm_rope_attention, qknorm_rope_attention_ref, rope_cos_sin
from megasynth.kernels.attention_core import CORES, available_backends, choose_core

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CUDA_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bf16, larger shapes)")

# Relative error ||got - want|| / ||want|| against float64 on the same rounded inputs.
# fp32: fp32 accumulation over D <= 128 and tens of keys: <= 4e-7 measured under the interpreter; 2e-5 leaves
#   margin for the GPU's approximate exp2/rsqrt and stays orders below a wrong formula.
# fp16: q_hat/k_hat (the pre-pass output), P and dS are rounded to fp16 (2^-11 ~ 4.9e-4) before the dots:
#   <= 7.2e-4 measured; 4e-3.
# bf16 (GPU only): the same roundings at 2^-8 ~ 3.9e-3; 3e-2.
RTOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def triton_everywhere(monkeypatch):
    """On the CPU run both steps through the Triton interpreter; on a GPU leave the choice to `auto`."""
    if DEVICE.type == "cpu":
        monkeypatch.setenv("MEGASYNTH_KERNELS", "triton")


def reference_float64(q, k, v, q_w, k_w, cos, sin, *, cu_seqlens, causal, eps, scale):
    """Plain float64 torch, one sequence (batch row or document) at a time: RMSNorm, rotate-half RoPE, softmax."""
    q, k, v, q_w, k_w, cos, sin = (t.double() for t in (q, k, v, q_w, k_w, cos, sin))
    if cu_seqlens is None:  # batched: row b is a sequence; cos/sin [S, D/2] shared or [B, S, D/2] per row
        seqs = [(q[b], k[b], v[b], cos if cos.dim() == 2 else cos[b], sin if sin.dim() == 2 else sin[b])
                for b in range(q.shape[0])]
    else:
        bounds = cu_seqlens.tolist()
        seqs = [(q[a:b], k[a:b], v[a:b], cos[a:b], sin[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    outs = []
    for qs, ks, vs, c, s in seqs:
        def prepare(x, w):
            x = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w
            half = x.shape[-1] // 2
            x1, x2 = x[..., :half], x[..., half:]
            cc, ss = c[:, None, :], s[:, None, :]
            return torch.cat([x1 * cc - x2 * ss, x2 * cc + x1 * ss], dim=-1)

        qh, kh = prepare(qs, q_w), prepare(ks, k_w)  # [L, H, D]
        group = qh.shape[1] // kh.shape[1]
        kh, vv = kh.repeat_interleave(group, dim=1), vs.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", qh, kh) * scale
        n = qs.shape[0]
        if causal:
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), -math.inf)
        outs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), vv))
    if cu_seqlens is None:
        return torch.stack(outs)
    return torch.cat(outs) if outs else q.new_zeros(q.shape)


@dataclass
class Case:
    """One problem: batched (batch, seq) or packed (doc_lengths), GQA heads, head_dim, dtype."""

    heads_q: int
    heads_kv: int
    head_dim: int
    dtype: torch.dtype = torch.float32
    batch: int = 1
    seq: int = 0
    doc_lengths: list[int] = field(default_factory=list)
    rope_per_batch: bool = False  # cos/sin [B, S, D/2], positions restarting mid-row
    input_scale: float = 1.0
    zero_rows: bool = False  # some (token, head) vectors of q and k exactly 0, as padding would be

    def make(self, seed: int):
        gen = torch.Generator().manual_seed(seed)
        packed = bool(self.doc_lengths)
        tokens = (sum(self.doc_lengths),) if packed else (self.batch, self.seq)
        q, k, v = (torch.randn(*tokens, h, self.head_dim, generator=gen, dtype=torch.float64) * self.input_scale
                   for h in (self.heads_q, self.heads_kv, self.heads_kv))
        if self.zero_rows:
            q[..., ::3, 0, :] = 0
            k[..., 1::2, :, :] = 0
        q, k, v = (t.to(DEVICE, self.dtype).requires_grad_() for t in (q, k, v))
        q_w, k_w = ((1 + 0.5 * torch.randn(self.head_dim, generator=gen, dtype=torch.float64))
                    .to(DEVICE, self.dtype).requires_grad_() for _ in range(2))
        cu_seqlens = None
        if packed:
            positions = torch.cat([torch.arange(n) for n in self.doc_lengths] or [torch.zeros(0, dtype=torch.long)])
            cu_seqlens = torch.tensor([0, *self.doc_lengths]).cumsum(0).to(DEVICE, torch.int32)
        elif self.rope_per_batch:
            positions = torch.stack([torch.cat([torch.arange(3 + 5 * b), torch.arange(self.seq - 3 - 5 * b)])
                                     for b in range(self.batch)])
        else:
            positions = torch.arange(self.seq)
        cos, sin = rope_cos_sin(positions.to(DEVICE), self.head_dim, theta=10000.0)
        return (q, k, v, q_w, k_w, cos, sin), cu_seqlens


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert torch.isfinite(got).all(), "non-finite values (an unwritten NaN-poisoned element?)"
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()


def check(case: Case, *, causal=True, seed=0, eps=1e-6, softmax_scale=None, core="auto", fn=qknorm_rope_attention):
    (q, k, v, q_w, k_w, cos, sin), cu = case.make(seed)
    out = fn(q, k, v, q_w, k_w, cos, sin, cu_seqlens=cu, causal=causal, eps=eps, softmax_scale=softmax_scale,
             core=core)
    assert out.shape == q.shape and out.dtype == q.dtype
    dout = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    leaves = (q, k, v, q_w, k_w)
    grads = torch.autograd.grad(out, leaves, dout.to(DEVICE, out.dtype))

    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    scale = softmax_scale if softmax_scale is not None else 1 / math.sqrt(case.head_dim)
    want = reference_float64(*ref_leaves, cos, sin, cu_seqlens=cu, causal=causal, eps=eps, scale=scale)
    want_grads = torch.autograd.grad(want, ref_leaves, dout.to(DEVICE))
    names = ("out", "q", "k", "v", "q_norm_weight", "k_norm_weight")
    errors = {n: rel_err(g, w) for n, g, w in zip(names, (out, *grads), (want, *want_grads))}
    bad = {n: f"{e:.2e}" for n, e in errors.items() if not e < RTOL[case.dtype]}
    assert not bad, f"above {RTOL[case.dtype]:g}: {bad} (all: { {n: f'{e:.1e}' for n, e in errors.items()} })"


# Each case covers several axes at once, so the set stays small under the interpreter: GQA ratios 1, 2, 4,
# head_dim 32/64/128, causal and not, fp32 and fp16, lengths that are not multiples of the tiles.
BATCHED = {
    "gqa2-d64-causal-fp32": (Case(2, 1, 64, batch=2, seq=33), True),
    "gqa4-d128-full-fp16-rope_per_batch": (Case(4, 1, 128, torch.float16, batch=1, seq=29, rope_per_batch=True),
                                           False),
    "gqa1-d32-causal-fp16": (Case(2, 2, 32, torch.float16, batch=2, seq=17, rope_per_batch=True), True),
    "gqa2-d32-full-fp32-odd": (Case(2, 1, 32, batch=1, seq=19), False),
}


@pytest.mark.parametrize("name", BATCHED)
def test_batched_matches_float64(name, poisoned_empty):
    case, causal = BATCHED[name]
    check(case, causal=causal)


PACKED = {
    # empty documents first, in the middle and last; length-1 documents (a query that sees only itself)
    "gqa1-d64-causal-fp32-empty_and_single": (Case(2, 2, 64, doc_lengths=[0, 1, 33, 0, 16, 1, 0]), True),
    "gqa4-d32-full-fp16": (Case(4, 1, 32, torch.float16, doc_lengths=[20, 1, 0, 11]), False),
    "gqa2-d128-causal-fp16": (Case(2, 1, 128, torch.float16, doc_lengths=[9, 0, 23]), True),
}


@pytest.mark.parametrize("name", PACKED)
def test_packed_matches_float64(name, poisoned_empty):
    case, causal = PACKED[name]
    check(case, causal=causal)


def test_non_default_eps_and_scale(poisoned_empty):
    # Inputs of RMS 0.05 make mean(x^2) = 2.5e-3 comparable to eps = 1e-2, so ignoring eps is off by O(1);
    # softmax_scale 0.3 instead of 1/sqrt(32) sharpens the softmax.
    check(Case(2, 1, 32, batch=1, seq=21, input_scale=0.05), eps=1e-2, softmax_scale=0.3)


@pytest.mark.parametrize("packed", [False, True])
def test_zero_rows_stay_finite(packed, poisoned_empty):
    # All-zero head vectors (padding) normalise to 0 with eps > 0: no NaN in the output or any gradient.
    case = (Case(2, 1, 32, doc_lengths=[5, 0, 12], zero_rows=True) if packed
            else Case(2, 1, 32, batch=2, seq=11, zero_rows=True))
    check(case, causal=True)


@pytest.mark.parametrize("eps", [0, 0.0, -1e-6, float("nan"), float("inf")])
@pytest.mark.parametrize("fn", [qknorm_rope_attention, qknorm_rope_attention_ref])
def test_eps_must_be_positive(fn, eps):
    (q, k, v, q_w, k_w, cos, sin), _ = Case(2, 1, 16, batch=1, seq=3).make(0)
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        fn(q, k, v, q_w, k_w, cos, sin, eps=eps)


def test_reference_chain_matches_float64():
    # The public reference (the unfused chain: rms_norm_ref -> apply_rope_ref -> dense mask) against this file's.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEGASYNTH_KERNELS", "reference")
        check(Case(4, 2, 32, doc_lengths=[6, 0, 1, 13]), causal=True, fn=qknorm_rope_attention_ref)
        check(Case(2, 1, 32, batch=2, seq=9, rope_per_batch=True), causal=False, fn=qknorm_rope_attention_ref)


def test_reference_core_on_cpu(monkeypatch):
    # MEGASYNTH_KERNELS=auto on CPU tensors: reference pre-pass and reference core, same numbers.
    if DEVICE.type == "cuda":
        pytest.skip("checks the CPU dispatch")
    monkeypatch.setenv("MEGASYNTH_KERNELS", "auto")
    check(Case(2, 1, 32, doc_lengths=[7, 0, 10]), causal=True)


def test_empty_input():
    (q, k, v, q_w, k_w, cos, sin), cu = Case(2, 1, 32, doc_lengths=[0]).make(0)
    out = qknorm_rope_attention(q, k, v, q_w, k_w, cos, sin, cu_seqlens=cu)
    assert out.shape == (0, 2, 32)
    dq, dqw = torch.autograd.grad(out.sum(), (q, q_w), allow_unused=True)
    assert dq.shape == q.shape and (dqw is None or not dqw.any())


def test_packed_input_refused_by_sdpa_core_before_any_work():
    (q, k, v, q_w, k_w, cos, sin), cu = Case(2, 1, 32, doc_lengths=[3, 4]).make(0)
    with pytest.raises(ValueError, match="batched inputs only|needs CUDA"):
        qknorm_rope_attention(q, k, v, q_w, k_w, cos, sin, cu_seqlens=cu, core="cudnn")


def test_bad_core_name():
    (q, k, v, q_w, k_w, cos, sin), _ = Case(2, 1, 16, batch=1, seq=3).make(0)
    with pytest.raises(ValueError, match="core='fast'"):
        qknorm_rope_attention(q, k, v, q_w, k_w, cos, sin, core="fast")


# ------------------------------------------------------------------------------------------------ GPU only


def _gpu_cores(packed: bool) -> list[str]:
    if not torch.cuda.is_available():
        return ["auto"]
    cap = torch.cuda.get_device_capability()
    usable = ["auto"]
    for name in CORES:
        try:
            choose_core(name, device_type="cuda", capability=cap, dtype=torch.bfloat16, head_dim=128, varlen=packed,
                        available=available_backends())
        except ValueError:
            continue
        usable.append(name)
    return usable


@CUDA_ONLY
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("core", _gpu_cores(packed=False))
def test_gpu_batched_every_core(core, causal, dtype, poisoned_empty):
    check(Case(8, 2, 128, dtype, batch=2, seq=700, rope_per_batch=True), causal=causal, core=core)


@CUDA_ONLY
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("core", _gpu_cores(packed=True))
def test_gpu_packed_every_core_bf16(core, head_dim, poisoned_empty):
    check(Case(4, 1, head_dim, torch.bfloat16, doc_lengths=[700, 1, 0, 129, 1200, 63]), causal=True, core=core)


@CUDA_ONLY
def test_gpu_fp32_triton(poisoned_empty):
    check(Case(4, 2, 64, batch=2, seq=300), causal=True, core="triton")
