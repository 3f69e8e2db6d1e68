"""Triton flash-attention core: forward and dq/dk/dv against an independent float64 reference.

On machines without a GPU, tests/conftest.py sets TRITON_INTERPRET=1 and the kernels run on the CPU through the
interpreter with 16-row tiles (kernels/_flash_attn_triton.py INTERPRETER_BLOCKS), so the tens-of-token sequences
here cross several tiles and end mid-tile. The reference here is plain float64 torch math, one sequence / document
at a time (not flash_attention_ref, which is itself checked against torch SDPA). GPU-only tests (bf16, larger
shapes) are skipped on the CPU. Both backward modes are checked: the default single pass (dQ through fp32
atomics) on every shape, the deterministic two-kernel split on a representative subset.

    pytest tests/kernels/test_flash_attention.py -q
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import megasynth.kernels._flash_attn_triton as fa_triton
import pytest
import torch
import torch.nn.functional as F
from megasynth.kernels import _launch, flash_attention_ref, run_core, select_core
from megasynth.kernels._flash_attn_triton import flash_attention_triton

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CUDA_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bf16 / large shapes)")
INTERPRETER_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="INTERPRETER_BLOCKS apply to the interpreter")

# Relative error ||got - want|| / ||want|| against float64 on the same rounded inputs.
# fp32: dots of D <= 256 terms and softmax sums of tens of terms in fp32 (~sqrt(terms) * 2^-24; measured <= 3e-7
#   here); 1e-5 also covers the GPU's approximate exp2 and longer GPU sums, and sits 5 orders below a wrong formula.
# fp16: P and dS are rounded to fp16 (2^-11 ~ 4.9e-4 relative) before the tensor-core dots and outputs are rounded
#   once; measured <= 4e-4 here; 3e-3 leaves margin.
# bf16 (GPU only): the same roundings at 2^-8 ~ 3.9e-3; 2.5e-2 leaves margin for the longer GPU sequences.
RTOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert torch.isfinite(got).all(), "non-finite values (an unwritten NaN-poisoned element?)"
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()


def attention_float64(q, k, v, cu_seqlens, causal, scale):
    """Independent reference: float64 softmax attention, one batch row or document at a time, written out."""
    if cu_seqlens is None:
        return torch.stack([attention_float64(q[b], k[b], v[b], torch.tensor([0, q.shape[1]]), causal, scale)
                            for b in range(q.shape[0])])
    outs = []
    bounds = cu_seqlens.tolist()
    for lo, hi in itertools.pairwise(bounds):
        qs, ks, vs = q[lo:hi].double(), k[lo:hi].double(), v[lo:hi].double()  # [L, H, D]
        group = qs.shape[1] // ks.shape[1]
        ks, vs = ks.repeat_interleave(group, dim=1), vs.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", qs, ks) * scale
        if causal:
            future = torch.ones(hi - lo, hi - lo, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), vs))
    return torch.cat(outs) if outs else q.double() * 0


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
    fused_qkv: bool = False  # q, k, v as strided views of one projection output (token stride != heads * D)

    @property
    def packed(self) -> bool:
        return bool(self.doc_lengths)

    def make(self, seed: int):
        """-> (leaves, (q, k, v, cu_seqlens)) on DEVICE; leaves require grad."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        tokens = (sum(self.doc_lengths),) if self.packed else (self.batch, self.seq)
        heads = self.heads_q + 2 * self.heads_kv
        qkv = torch.randn(*tokens, heads, self.head_dim, generator=gen, dtype=torch.float64).to(DEVICE, self.dtype)
        split = [self.heads_q, self.heads_kv, self.heads_kv]
        if self.fused_qkv:
            leaves = (qkv.requires_grad_(),)
            q, k, v = qkv.split(split, dim=-2)
        else:
            q, k, v = (t.contiguous().requires_grad_() for t in qkv.split(split, dim=-2))
            leaves = (q, k, v)
        cu_seqlens = None
        if self.packed:
            cu_seqlens = torch.tensor([0] + self.doc_lengths).cumsum(0).to(DEVICE, torch.int32)
        return leaves, (q, k, v, cu_seqlens)


def check_against_float64(case: Case, *, causal=True, seed=0, softmax_scale=None, deterministic=None) -> None:
    leaves, (q, k, v, cu_seqlens) = case.make(seed)
    out = flash_attention_triton(q, k, v, cu_seqlens=cu_seqlens, causal=causal, softmax_scale=softmax_scale,
                                 deterministic=deterministic)
    assert out.shape == q.shape and out.dtype == q.dtype
    dout = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    dout = dout.to(DEVICE, out.dtype)
    grads = torch.autograd.grad(out, leaves, dout)

    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    if case.fused_qkv:
        q64, k64, v64 = leaves64[0].split([case.heads_q, case.heads_kv, case.heads_kv], dim=-2)
    else:
        q64, k64, v64 = leaves64
    scale = softmax_scale if softmax_scale is not None else 1 / math.sqrt(case.head_dim)
    want = attention_float64(q64, k64, v64, cu_seqlens, causal, scale)
    want_grads = torch.autograd.grad(want, leaves64, dout.double())

    names = ["qkv"] if case.fused_qkv else ["q", "k", "v"]
    errors = {"out": rel_err(out, want)}
    for name, got, ref in zip(names, grads, want_grads):
        assert got.shape == ref.shape and got.dtype == case.dtype
        errors["d" + name] = rel_err(got, ref)
    tol = RTOL[case.dtype]
    bad = {name: f"{err:.2e}" for name, err in errors.items() if not err < tol}
    assert not bad, f"relative errors above {tol:g}: {bad} (all: { {n: f'{e:.1e}' for n, e in errors.items()} })"


# Each entry covers several axes at once so the set stays small under the interpreter: GQA ratios 1, 2, 4; causal
# and not; fp32 and fp16; head_dim 16 / 32 / 64 and 48 (not a power of two: padded to 64 with masked columns);
# lengths that are not multiples of the tiles.
BATCHED = {
    "gqa2-d64-causal-fp32": (Case(2, 1, 64, batch=2, seq=25), True),
    "gqa4-d32-full-fp16": (Case(4, 1, 32, torch.float16, seq=29), False),
    "gqa1-d48-causal-fp16": (Case(2, 2, 48, torch.float16, batch=2, seq=17), True),
    "gqa1-d16-full-fp32-fused_qkv": (Case(1, 1, 16, seq=45, fused_qkv=True), False),
    "gqa2-d48-full-fp32": (Case(2, 1, 48, seq=20), False),
}


@pytest.mark.parametrize("name", BATCHED)
def test_batched_matches_float64(name, poisoned_empty):
    case, causal = BATCHED[name]
    check_against_float64(case, causal=causal)


PACKED = {
    # Documents of length 1 and empty documents (repeated cu_seqlens values), at the start, middle and end.
    "gqa1-d64-causal-fp32": (Case(2, 2, 64, doc_lengths=[1, 33, 16, 0, 7]), True),
    "gqa4-d32-full-fp16": (Case(4, 1, 32, torch.float16, doc_lengths=[0, 20, 1, 19]), False),
    "gqa2-d48-causal-fp16": (Case(2, 1, 48, torch.float16, doc_lengths=[9, 0, 0, 40, 1]), True),
    "gqa2-d16-full-fp32": (Case(2, 1, 16, doc_lengths=[5, 18, 0]), False),
}


@pytest.mark.parametrize("name", PACKED)
def test_packed_matches_float64(name, poisoned_empty):
    case, causal = PACKED[name]
    check_against_float64(case, causal=causal)


# The tests above run the default backward (torch's deterministic flag is off: the atomic single pass); the
# deterministic split on a subset spanning GQA 1/2/4, batched and packed (empty and 1-token documents), causal
# and not, fp32 and fp16, head_dim 48 (masked columns).
@pytest.mark.parametrize(("table", "name"), [(BATCHED, "gqa2-d64-causal-fp32"), (BATCHED, "gqa1-d48-causal-fp16"),
                                             (PACKED, "gqa4-d32-full-fp16"), (PACKED, "gqa2-d48-causal-fp16")])
def test_deterministic_backward_matches_float64(table, name, poisoned_empty):
    case, causal = table[name]
    check_against_float64(case, causal=causal, deterministic=True)


@INTERPRETER_ONLY
@pytest.mark.parametrize("blocks", [
    # Query tiles twice the key tiles in fwd/dq and key tiles twice the query steps in dkdv (the GPU shapes):
    # the causal diagonal spans several inner tiles, some entirely masked for some rows.
    {"fwd": (32, 16), "dkdv": (16, 32), "dkdv_atomic": (16, 32), "dq": (32, 16)},
    # The other way round: key tiles larger than query tiles in fwd/dq, query steps larger in dkdv.
    {"fwd": (16, 32), "dkdv": (32, 16), "dkdv_atomic": (32, 16), "dq": (16, 32)},
])
def test_unequal_tiles(blocks, monkeypatch, poisoned_empty):
    for kernel, pair in blocks.items():
        monkeypatch.setitem(fa_triton.INTERPRETER_BLOCKS, kernel, pair)
    for deterministic in (False, True):
        check_against_float64(Case(2, 1, 32, doc_lengths=[40, 9, 23]), causal=True, deterministic=deterministic)
    check_against_float64(Case(2, 2, 32, seq=45), causal=False, seed=1)


@INTERPRETER_ONLY
@pytest.mark.parametrize("case", [Case(4, 2, 48, torch.float16, doc_lengths=[1, 30, 0, 17]),
                                  Case(2, 1, 32, batch=2, seq=37)])
def test_tma_forward(case, monkeypatch, poisoned_empty):
    # The Hopper path reads K/V through tensor descriptors bounded at each sequence's end; the interpreter
    # implements them, so the same kernel runs here with INTERPRETER_TMA (head_dim 48: columns 48..63 out of bounds).
    monkeypatch.setattr(fa_triton, "INTERPRETER_TMA", True)
    _, (q, k, v, cu_seqlens) = case.make(seed=5)
    out = flash_attention_triton(q, k, v, cu_seqlens=cu_seqlens)
    want = attention_float64(q.detach(), k.detach(), v.detach(), cu_seqlens, True, case.head_dim**-0.5)
    assert rel_err(out, want) < RTOL[case.dtype]


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy exp2 (masked)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # dK of padded keys (never stored)
@pytest.mark.parametrize("deterministic", [False, True])
def test_very_negative_scores_give_finite_gradients(deterministic):
    # Every score of every row near -100 (natural units; base-2 logsumexp ~ -144): the padded keys of the ragged
    # last key tile (k = 0) get p = exp2(-lse) = inf, which must not reach dQ through the atomic single pass.
    gen = torch.Generator().manual_seed(3)
    tokens, head_dim = 21, 16
    q = (5 + 0.3 * torch.randn(tokens, 2, head_dim, generator=gen)).to(DEVICE).requires_grad_()
    k = (-5 + 0.3 * torch.randn(tokens, 1, head_dim, generator=gen)).to(DEVICE).requires_grad_()
    v = torch.randn(tokens, 1, head_dim, generator=gen).to(DEVICE).requires_grad_()
    cu_seqlens = torch.tensor([0, tokens], dtype=torch.int32, device=DEVICE)
    out = flash_attention_triton(q, k, v, cu_seqlens=cu_seqlens, causal=False, deterministic=deterministic)
    dout = torch.randn(out.shape, generator=gen).to(DEVICE)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = attention_float64(*leaves64, cu_seqlens, False, head_dim**-0.5)
    for got, ref in zip(grads, torch.autograd.grad(want, leaves64, dout.double())):
        assert rel_err(got, ref) < 1e-4  # scores of magnitude 100 in fp32: ~1e-5 absolute error in each


def test_softmax_scale(poisoned_empty):
    # 0.4 instead of 1/sqrt(32) ~ 0.18 sharpens the softmax; a kernel ignoring the argument is off by O(1).
    check_against_float64(Case(2, 1, 32, seq=33), causal=True, softmax_scale=0.4)


@pytest.fixture
def torch_deterministic():
    """torch.use_deterministic_algorithms(True) for the test; the previous setting restored afterwards."""
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before, warn_only=warn_only)


@pytest.mark.parametrize("how", ["argument", "torch_flag"])
def test_deterministic_backward_is_bit_reproducible(how, request):
    # The deterministic split has no atomics: two backwards of one problem are bit-identical. (The interpreter
    # runs atomics in a fixed order too, so this holds for both modes here; which kernels each mode launches is
    # test_backward_mode_follows_torch_flag's business.)
    if how == "torch_flag":
        request.getfixturevalue("torch_deterministic")
    _, (q, k, v, cu_seqlens) = Case(4, 2, 32, doc_lengths=[19, 1, 27]).make(seed=2)
    out = flash_attention_triton(q, k, v, cu_seqlens=cu_seqlens, deterministic=True if how == "argument" else None)
    dout = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    second = torch.autograd.grad(out, (q, k, v), dout)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def _planned_backward_kernels(arch: int, deterministic, flag_at_backward=None) -> list[str]:
    """Kernel names a forward+backward launches on `arch` (planned on CPU tensors: nothing runs)."""
    q = torch.empty(40, 4, 64, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.empty(40, 2, 64, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    with _launch.planning_for(arch) as launches:
        out = flash_attention_triton(q, k, v, cu_seqlens=torch.tensor([0, 40], dtype=torch.int32),
                                     deterministic=deterministic)
        if flag_at_backward is not None:
            torch.use_deterministic_algorithms(flag_at_backward)
        out.backward(torch.empty_like(out))
    return [launch.name.removeprefix("_flash_attn_") for launch in launches]


SINGLE_PASS = ["fwd_kernel", "bwd_delta_kernel", "bwd_dkdv_kernel", "bwd_dq_convert_kernel"]
SPLIT = ["fwd_kernel", "bwd_delta_kernel", "bwd_dkdv_kernel", "bwd_dq_kernel"]


def test_backward_mode_follows_torch_flag(torch_deterministic):
    # deterministic=None reads torch's flag when the forward runs; True / False override it either way.
    assert _planned_backward_kernels(90, None) == SPLIT
    assert _planned_backward_kernels(90, False) == SINGLE_PASS
    torch.use_deterministic_algorithms(False)
    assert _planned_backward_kernels(90, None) == SINGLE_PASS
    assert _planned_backward_kernels(90, True) == SPLIT
    # Decided at forward time: switching the flag between forward and backward changes nothing.
    assert _planned_backward_kernels(90, None, flag_at_backward=True) == SINGLE_PASS  # off at forward, then on
    assert _planned_backward_kernels(90, None, flag_at_backward=False) == SPLIT  # on at forward, then off
    with pytest.raises(ValueError, match="deterministic must be"):
        flash_attention_triton(*(torch.empty(1, 4, 1, 8) for _ in range(3)), deterministic=1)


def test_empty_input_and_max_seqlen():
    _, (q, k, v, cu_seqlens) = Case(2, 1, 32, doc_lengths=[0]).make(seed=0)
    out = flash_attention_triton(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=0)
    assert out.shape == (0, 2, 32)
    dq, dk = torch.autograd.grad(out.sum(), (q, k))
    assert dq.shape == q.shape and dk.shape == k.shape


def test_ref_matches_torch_sdpa_float64():
    # flash_attention_ref (the reference core, the CPU path of run_core) against torch's own attention in float64.
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 13, h, 24, generator=gen, dtype=torch.float64) for h in (4, 2, 2))
    for causal in (True, False):
        want = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=causal, enable_gqa=True).transpose(1, 2)
        assert torch.allclose(flash_attention_ref(q, k, v, causal=causal), want, rtol=1e-12, atol=1e-12)
    # Packed: each document attends only within itself, as SDPA on that document alone.
    cu_seqlens = torch.tensor([0, 5, 5, 13], dtype=torch.int32)
    got = flash_attention_ref(q[0], k[0], v[0], cu_seqlens=cu_seqlens, softmax_scale=0.3)
    for lo, hi in ((0, 5), (5, 13)):
        want = F.scaled_dot_product_attention(*(t[0, lo:hi].transpose(0, 1) for t in (q, k, v)), is_causal=True,
                                              scale=0.3, enable_gqa=True).transpose(0, 1)
        assert torch.allclose(got[lo:hi], want, rtol=1e-12, atol=1e-12)


def test_dispatcher_runs_triton(monkeypatch):
    # The dispatcher the model uses (select_core + run_core) reaches this kernel under MEGASYNTH_KERNELS=triton.
    monkeypatch.setenv("MEGASYNTH_KERNELS", "triton")
    _, (q, k, v, cu_seqlens) = Case(2, 1, 32, doc_lengths=[7, 10]).make(seed=4)
    core = select_core("auto", q, varlen=True)
    assert core == "triton"
    got = run_core(core, q, k, v, cu_seqlens=cu_seqlens, max_seqlen=10, causal=False)
    want = flash_attention_ref(q, k, v, cu_seqlens=cu_seqlens, causal=False)
    assert rel_err(got, want.double()) < RTOL[torch.float32]


KERNELS = ("fwd", "dkdv", "dkdv_atomic", "dq")


def test_every_architecture_gets_tables_that_fit():
    # Whatever the compute capability (listed in _launch or not: an unknown one gets the smallest limit), every
    # entry of the table it maps to fits its shared memory by the estimate.
    for arch in range(70, 130):
        limit = _launch.max_shared_bytes(arch)
        for kernel, d_pad, elem in itertools.product(KERNELS, (16, 32, 64, 128, 256), (2, 4)):
            config = fa_triton.table_config(kernel, arch, d_pad, elem)
            assert fa_triton.estimate_shared(kernel, config, d_pad, elem) <= limit, (arch, kernel, d_pad, elem, config)
    # Datacenter Blackwell has Hopper's shared memory (and TMA), consumer Blackwell the sm_86 parts'.
    assert [fa_triton.table_arch(a) for a in (80, 86, 89, 90, 100, 120)] == [80, 86, 86, 90, 90, 86]


@pytest.mark.parametrize("arch", [80, 86, 89, 90, 100, 120])
@pytest.mark.parametrize("deterministic", [False, True])
def test_launch_configs_fit_each_architecture(arch, deterministic):
    # Every table entry (all head_dims and dtypes) fits the architecture by the shared-memory estimate, and the
    # host code plans for `arch` on CPU tensors (nothing runs) with exactly the table's configs. The AOT tests
    # (kernels/aot.py) compile these launches and check the real shared memory.
    limit = _launch.max_shared_bytes(arch)
    for kernel, d_pad, elem in itertools.product(KERNELS, (16, 32, 64, 128, 256), (2, 4)):
        config = fa_triton.table_config(kernel, arch, d_pad, elem)
        assert fa_triton.estimate_shared(kernel, config, d_pad, elem) <= limit, (kernel, d_pad, elem, config)
    q = torch.empty(40, 4, 128, dtype=torch.bfloat16, device="cpu", requires_grad=True)
    k, v = (torch.empty(40, 2, 128, dtype=torch.bfloat16, device="cpu", requires_grad=True) for _ in range(2))
    cu_seqlens = torch.tensor([0, 40], dtype=torch.int32)
    with _launch.planning_for(arch) as launches:
        out = flash_attention_triton(q, k, v, cu_seqlens=cu_seqlens, deterministic=deterministic)
        out.backward(torch.empty(40, 4, 128, dtype=q.dtype))
    planned = {launch.name.removeprefix("_flash_attn_"): launch.meta for launch in launches}
    assert list(planned) == (SPLIT if deterministic else SINGLE_PASS)
    assert planned["fwd_kernel"]["USE_TMA"] == (arch in (90, 100))
    assert planned["bwd_dkdv_kernel"]["ATOMIC_DQ"] == (not deterministic)
    pairs = [("fwd", "fwd"), ("bwd_dkdv", "dkdv"), ("bwd_dq", "dq")] if deterministic else [
        ("fwd", "fwd"), ("bwd_dkdv", "dkdv_atomic")]
    for name, kernel in pairs:
        meta = planned[f"{name}_kernel"]
        got = (meta["BLOCK_M"], meta["BLOCK_N"], meta["num_warps"], meta["num_stages"])
        assert got == fa_triton.table_config(kernel, arch, 128, 2)


def _bad_inputs():
    """name -> (mutate(kwargs), expected message fragment)."""
    def setter(key, fn):
        return lambda kw: kw.__setitem__(key, fn(kw))

    return {
        "q rank": (setter("q", lambda kw: kw["q"][0]), "needs 4 dims"),
        "k and v differ": (setter("k", lambda kw: kw["k"][:, :7]), "do not match"),
        "gqa ratio": (lambda kw: kw.update(k=kw["k"].repeat(1, 1, 3, 1), v=kw["v"].repeat(1, 1, 3, 1)),
                      "not a multiple"),
        "head_dim too big": (lambda kw: kw.update({n: kw[n].repeat(1, 1, 1, 9) for n in ("q", "k", "v")}),
                             "head_dim 288"),
        "dtype mix": (setter("v", lambda kw: kw["v"].double()), "share one dtype"),
        "integer q": (setter("q", lambda kw: kw["q"].long()), "share one dtype"),
        "scale": (lambda kw: kw.update(softmax_scale=-1.0), "softmax_scale"),
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
    _, (q, k, v, _) = Case(2, 1, 32, seq=8).make(seed=0)
    kw = {"q": q, "k": k, "v": v}
    mutate(kw)
    if kw.pop("packed", False):  # the packed form: drop the batch dim
        kw.update({n: kw[n][0] for n in ("q", "k", "v")})
        kw.setdefault("cu_seqlens", torch.tensor([0, 8], dtype=torch.int32))
    # The shared checks (attention_core.check_inputs) speak for every core; the kernel's own limits for itself.
    with pytest.raises(ValueError, match="^(attention core|flash_attention): .*" + fragment):
        flash_attention_triton(**kw)


# ------------------------------------------------------------------------------------------------ GPU only


@CUDA_ONLY
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("deterministic", [False, True])
def test_gpu_batched_parity(dtype, causal, deterministic, poisoned_empty):
    check_against_float64(Case(8, 2, 128, dtype, batch=2, seq=1000), causal=causal, deterministic=deterministic)


@CUDA_ONLY
@pytest.mark.parametrize("head_dim", [64, 96, 128, 256])
def test_gpu_packed_parity_bf16(head_dim, poisoned_empty):
    check_against_float64(Case(4, 1, head_dim, torch.bfloat16, doc_lengths=[700, 1, 129, 0, 1200, 63]), causal=True)


@CUDA_ONLY
def test_gpu_autotune_matches_table(poisoned_empty):
    # Autotuning only changes tile shapes: the same problem gives results equal within fp16 rounding.
    _, (q, k, v, cu_seqlens) = Case(8, 2, 128, torch.float16, doc_lengths=[900, 3, 1100]).make(seed=6)
    tuned = flash_attention_triton(q, k, v, cu_seqlens=cu_seqlens, autotune=True)
    default = flash_attention_triton(q, k, v, cu_seqlens=cu_seqlens, autotune=False)
    assert rel_err(tuned, default.double()) < RTOL[torch.float16]


@CUDA_ONLY
def test_gpu_fp32_parity(poisoned_empty):
    check_against_float64(Case(4, 2, 64, batch=2, seq=300), causal=True)
