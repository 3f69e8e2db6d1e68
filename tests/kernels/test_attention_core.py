"""The attention core chooser and runner (kernels/attention_core.py).

choose_core is pure, so its whole decision table is tested here on any machine with made-up machine facts; the
error messages say why a requested core cannot serve the inputs. run_core("triton") (our flash kernel, under the
interpreter on the CPU) must agree with run_core("reference"); on a GPU every installed core is compared too.

    pytest tests/kernels/test_attention_core.py -q
"""

from __future__ import annotations

import pytest
import torch
from megasynth.kernels.attention_core import CORES, available_backends, choose_core, run_core, select_core

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CUDA_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
FA2, FA3 = frozenset({"flash_attn"}), frozenset({"flash_attn_interface"})
NONE = frozenset()


def facts(**overrides):
    """An H100 with nothing optional installed, bf16, D 128, batched, MEGASYNTH_KERNELS=auto."""
    base = dict(device_type="cuda", capability=(9, 0), dtype=BF16, head_dim=128, varlen=False, available=NONE,
                mode="auto", interpreter=False)
    return {**base, **overrides}


# (requested, overrides of facts(), expected core)
DECISIONS = {
    "mode reference wins": ("auto", dict(available=FA2, mode="reference"), "reference"),
    "mode triton wins over flash-attn": ("auto", dict(available=FA2, mode="triton"), "triton"),
    "mode triton on the CPU": ("auto", dict(device_type="cpu", capability=None, mode="triton"), "triton"),
    "CPU": ("auto", dict(device_type="cpu", capability=None), "reference"),
    "CPU with flash-attn": ("auto", dict(device_type="cpu", capability=None, available=FA2), "reference"),
    "flash-attn 2 on H100": ("auto", dict(available=FA2), "flash_attn"),
    "flash-attn 2 varlen": ("auto", dict(available=FA2, varlen=True), "flash_attn"),
    "flash-attn 2 on A100 fp16": ("auto", dict(available=FA2, capability=(8, 0), dtype=FP16), "flash_attn"),
    "flash-attn 3 on H100": ("auto", dict(available=FA3), "flash_attn"),
    "flash-attn 3 only, on A100": ("auto", dict(available=FA3, capability=(8, 0)), "triton"),
    "flash-attn fp32 -> triton": ("auto", dict(available=FA2, dtype=FP32), "triton"),
    "flash-attn D 512 -> triton": ("auto", dict(available=FA2, head_dim=512), "triton"),
    "flash-attn on sm_75 -> triton": ("auto", dict(available=FA2, capability=(7, 5)), "triton"),
    "H100 batched bf16 -> cudnn": ("auto", dict(), "cudnn"),
    "H100 batched fp16 D 64 -> cudnn": ("auto", dict(dtype=FP16, head_dim=64), "cudnn"),
    "H100 varlen -> triton": ("auto", dict(varlen=True), "triton"),
    "H100 fp32 -> triton": ("auto", dict(dtype=FP32), "triton"),
    "H100 D 256 -> triton": ("auto", dict(head_dim=256), "triton"),
    "H100 D 72 -> cudnn": ("auto", dict(head_dim=72), "cudnn"),
    "H100 D 36 -> triton": ("auto", dict(head_dim=36), "triton"),
    "A100 batched -> triton": ("auto", dict(capability=(8, 0)), "triton"),
    "Blackwell batched -> triton": ("auto", dict(capability=(10, 0)), "triton"),
    "explicit reference on CUDA": ("reference", dict(available=FA2), "reference"),
    "explicit reference on CPU": ("reference", dict(device_type="cpu", capability=None), "reference"),
    "explicit triton on CUDA": ("triton", dict(available=FA2), "triton"),
    "explicit triton, interpreter": ("triton", dict(device_type="cpu", capability=None, interpreter=True), "triton"),
    "explicit flash_attn": ("flash_attn", dict(available=FA2, varlen=True), "flash_attn"),
    "explicit cudnn on A100": ("cudnn", dict(capability=(8, 0)), "cudnn"),
    "explicit flash D 256": ("flash", dict(head_dim=256, dtype=FP16), "flash"),
    "explicit cudnn despite flash-attn": ("cudnn", dict(available=FA2), "cudnn"),
}


@pytest.mark.parametrize("name", DECISIONS)
def test_choose_core_decision_table(name):
    requested, overrides, expected = DECISIONS[name]
    assert choose_core(requested, **facts(**overrides)) == expected


# (requested, overrides, fragment of the ValueError)
REFUSALS = {
    "unknown core": ("fast", dict(), "expected 'auto' or one of"),
    "cudnn varlen": ("cudnn", dict(varlen=True), "batched inputs only"),
    "flash varlen": ("flash", dict(varlen=True), "batched inputs only"),
    "flash on CPU": ("flash", dict(device_type="cpu", capability=None), "needs CUDA tensors, got cpu"),
    "cudnn fp32": ("cudnn", dict(dtype=FP32), "needs bf16 or fp16"),
    "flash sm_75": ("flash", dict(capability=(7, 5)), "needs sm_80 or newer, got sm_75"),
    "cudnn D 36": ("cudnn", dict(head_dim=36), "multiple of 8"),
    "flash D 512": ("flash", dict(head_dim=512), "<= 256"),
    "flash_attn not installed": ("flash_attn", dict(), "not installed"),
    "flash_attn 3 only on A100": ("flash_attn", dict(available=FA3, capability=(8, 0)), "not installed"),
    "flash_attn fp32": ("flash_attn", dict(available=FA2, dtype=FP32), "needs bf16 or fp16"),
    "flash_attn D 512": ("flash_attn", dict(available=FA2, head_dim=512), "head_dim <= 256"),
    "flash_attn on CPU": ("flash_attn", dict(available=FA2, device_type="cpu", capability=None), "CUDA tensors"),
    "triton on CPU, no interpreter": ("triton", dict(device_type="cpu", capability=None), "TRITON_INTERPRET=1"),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_choose_core_refuses_with_the_reason(name):
    requested, overrides, fragment = REFUSALS[name]
    with pytest.raises(ValueError, match=r"^attention core: core=.*" + fragment):
        choose_core(requested, **facts(**overrides))


def test_available_backends_is_detected_once():
    found = available_backends()
    assert found <= {"flash_attn", "flash_attn_interface"} and available_backends() is found


def test_select_core_reads_the_environment(monkeypatch):
    q = torch.zeros(1, 4, 2, 16, device=DEVICE)
    monkeypatch.setenv("MEGASYNTH_KERNELS", "reference")
    assert select_core("auto", q, varlen=False) == "reference"
    monkeypatch.setenv("MEGASYNTH_KERNELS", "triton")
    assert select_core("auto", q, varlen=True) == "triton"
    monkeypatch.setenv("MEGASYNTH_KERNELS", "auto")
    if DEVICE.type == "cpu":
        assert select_core("auto", q, varlen=False) == "reference"


# ------------------------------------------------------------------------------------------------ run_core


def make(batch_or_docs, heads_q, heads_kv, head_dim, dtype, seed=0):
    """Batched (int batch, seq) or packed (list of document lengths) q, k, v leaves and cu_seqlens."""
    gen = torch.Generator().manual_seed(seed)
    if isinstance(batch_or_docs, list):
        tokens, cu = (sum(batch_or_docs),), torch.tensor([0, *batch_or_docs]).cumsum(0).to(DEVICE, torch.int32)
    else:
        tokens, cu = batch_or_docs, None
    q, k, v = (torch.randn(*tokens, h, head_dim, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
               .requires_grad_() for h in (heads_q, heads_kv, heads_kv))
    return q, k, v, cu


def run_with_grads(name, q, k, v, cu, causal, seed=1):
    out = run_core(name, q, k, v, cu_seqlens=cu, causal=causal)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v), dout.to(DEVICE, out.dtype))
    return [out, *grads]


def rel_err(got, want) -> float:
    assert torch.isfinite(got).all()
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


# fp32: both accumulate in fp32 (measured <= 1e-6); fp16: the Triton core rounds P and dS to fp16 before its
# tensor-core dots (2^-11), the reference computes in fp32 from the same fp16 inputs.
CORE_RTOL = {FP32: 2e-5, FP16: 3e-3, BF16: 2.5e-2}
TRITON_CASES = {
    "batched-gqa2-causal-fp32": ((2, 33), 2, 1, 64, FP32, True),
    "batched-gqa1-full-fp16": ((1, 20), 2, 2, 32, FP16, False),
    "packed-gqa4-causal-fp32": ([7, 0, 1, 25], 4, 1, 32, FP32, True),
}


@pytest.mark.parametrize("name", TRITON_CASES)
def test_triton_core_agrees_with_reference(name, monkeypatch, poisoned_empty):
    shape, hq, hkv, d, dtype, causal = TRITON_CASES[name]
    monkeypatch.setenv("MEGASYNTH_KERNELS", "triton")
    q, k, v, cu = make(list(shape) if isinstance(shape, list) else shape, hq, hkv, d, dtype)
    got = run_with_grads("triton", q, k, v, cu, causal)
    want = run_with_grads("reference", q, k, v, cu, causal)
    errors = {n: rel_err(g, w) for n, g, w in zip(("out", "dq", "dk", "dv"), got, want)}
    assert max(errors.values()) < CORE_RTOL[dtype], errors


@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_flash_core_layout(causal):
    # run_core("flash") (the SDPA wrapper: [B, S, H, D] <-> [B, H, S, D] views, GQA through enable_gqa, scale)
    # also runs on CPU tensors, where SDPBackend.FLASH_ATTENTION is PyTorch's CPU flash kernel; choose_core
    # never picks it there, but this checks the wrapper on every machine.
    if DEVICE.type == "cuda":
        pytest.skip("fp32 has no SDPA flash kernel on CUDA; test_gpu_core_agrees_with_reference covers the GPU")
    q, k, v, _ = make((2, 19), 4, 2, 16, FP32)
    out = run_core("flash", q, k, v, causal=causal, scale=0.3)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    want = run_core("reference", q, k, v, causal=causal, scale=0.3)
    want_grads = torch.autograd.grad(want, (q, k, v), torch.ones_like(want))
    assert out.shape == q.shape and rel_err(out, want) < CORE_RTOL[FP32]
    for got, ref in zip(grads, want_grads):
        assert rel_err(got, ref) < CORE_RTOL[FP32]


def test_sdpa_cores_refuse_packed_inputs():
    q, k, v, cu = make([3, 4], 2, 1, 16, FP32)
    for name in ("cudnn", "flash"):
        with pytest.raises(ValueError, match="batched inputs only"):
            run_core(name, q, k, v, cu_seqlens=cu)


def test_run_core_checks_shapes():
    q, k, v, _ = make((1, 5), 3, 2, 16, FP32)
    with pytest.raises(ValueError, match="not a multiple"):
        run_core("reference", q, k, v)
    with pytest.raises(ValueError, match="unknown core"):
        run_core("fast", q, k, v)


@pytest.mark.parametrize("name", ["reference", "triton", "flash"])
def test_one_validator_for_every_core(name):
    # attention_core.check_inputs speaks for every core, before any of them computes.
    q, k, v, cu = make([3, 4], 2, 1, 16, FP32)
    with pytest.raises(ValueError, match="^attention core: softmax_scale must be a positive finite number"):
        run_core(name, q[None], k[None], v[None], scale=-1.0)
    with pytest.raises(ValueError, match="^attention core: cu_seqlens must be a non-empty 1-D int32 tensor"):
        run_core(name, q, k, v, cu_seqlens=cu.long())


@CUDA_ONLY
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", [BF16, FP16])
@pytest.mark.parametrize("name", [c for c in CORES if c != "reference"])
def test_gpu_core_agrees_with_reference(name, dtype, packed, causal):
    cap = torch.cuda.get_device_capability()
    facts_here = dict(device_type="cuda", capability=cap, dtype=dtype, head_dim=128, varlen=packed,
                      available=available_backends())
    try:
        choose_core(name, **facts_here)
    except ValueError as exc:
        pytest.skip(str(exc))
    q, k, v, cu = make([300, 1, 0, 517] if packed else (2, 400), 8, 2, 128, dtype)
    got = run_with_grads(name, q, k, v, cu, causal)
    want = run_with_grads("reference", q, k, v, cu, causal)
    errors = {n: rel_err(g, w) for n, g, w in zip(("out", "dq", "dk", "dv"), got, want)}
    assert max(errors.values()) < CORE_RTOL[dtype], errors
