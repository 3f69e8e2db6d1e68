"""Dispatch between Triton kernels and PyTorch references (MEGASYNTH_KERNELS, device, problem size).

    pytest tests/kernels/test_dispatch.py -q
"""

from __future__ import annotations

import importlib

import pytest
import torch
from megasynth.kernels import linear_cross_entropy, rms_norm, swiglu
from megasynth.kernels._dispatch import kernel_mode, use_triton


def module(name: str):
    # `megasynth.kernels.rms_norm` as an attribute is the function (re-exported by __init__), not the module.
    return importlib.import_module(f"megasynth.kernels.{name}")


@pytest.fixture
def routes(monkeypatch):
    """Replace every implementation behind the public functions by a spy that records its name."""
    called: list[str] = []

    def spy(name):
        def fn(*args, **kwargs):
            called.append(name)
            return torch.zeros(())

        return fn

    for mod, attr in [
        ("rms_norm", "rms_norm_ref"),
        ("_rms_norm_triton", "rms_norm_triton"),
        ("swiglu", "swiglu_ref"),
        ("_swiglu_triton", "swiglu_triton"),
        ("cross_entropy", "linear_cross_entropy_ref"),
        ("cross_entropy", "linear_cross_entropy_chunked"),
        ("_cross_entropy_triton", "linear_cross_entropy_triton"),
    ]:
        monkeypatch.setattr(module(mod), attr, spy(attr))
    return called


def call_all(ce_rows: int = 4) -> None:
    rms_norm(torch.randn(2, 8), torch.ones(8))
    swiglu(torch.randn(2, 8), torch.randn(2, 8))
    linear_cross_entropy(torch.randn(ce_rows, 8), torch.randn(5, 8), torch.zeros(ce_rows, dtype=torch.long))


def test_mode_defaults_to_auto_and_is_normalised(monkeypatch):
    monkeypatch.delenv("MEGASYNTH_KERNELS", raising=False)
    assert kernel_mode() == "auto"
    monkeypatch.setenv("MEGASYNTH_KERNELS", " Triton ")
    assert kernel_mode() == "triton"


def test_bad_mode_names_the_variable_and_choices(monkeypatch):
    monkeypatch.setenv("MEGASYNTH_KERNELS", "cuda")
    with pytest.raises(ValueError, match=r"MEGASYNTH_KERNELS='cuda': expected one of auto, triton, reference"):
        rms_norm(torch.randn(2, 8), torch.ones(8))


def test_use_triton_follows_mode_and_device(monkeypatch):
    cpu = torch.randn(3)
    monkeypatch.setenv("MEGASYNTH_KERNELS", "auto")
    assert not use_triton(cpu, None)  # CPU tensors take the reference under auto
    monkeypatch.setenv("MEGASYNTH_KERNELS", "triton")
    assert use_triton(cpu)
    monkeypatch.setenv("MEGASYNTH_KERNELS", "reference")
    assert not use_triton(cpu)


def test_auto_on_cpu_uses_references(monkeypatch, routes):
    monkeypatch.setenv("MEGASYNTH_KERNELS", "auto")
    call_all()
    assert routes == ["rms_norm_ref", "swiglu_ref", "linear_cross_entropy_ref"]


def test_forced_triton(monkeypatch, routes):
    monkeypatch.setenv("MEGASYNTH_KERNELS", "triton")
    call_all()
    assert routes == ["rms_norm_triton", "swiglu_triton", "linear_cross_entropy_triton"]


def test_auto_on_cpu_chunks_large_cross_entropy(monkeypatch, routes):
    # 4 rows x 5 classes = 20 logits: above a threshold of 19 the chunked path runs, at 20 the reference does.
    monkeypatch.setenv("MEGASYNTH_KERNELS", "auto")
    monkeypatch.setattr(module("cross_entropy"), "CHUNKED_ABOVE_ELEMENTS", 19)
    call_all(ce_rows=4)
    monkeypatch.setattr(module("cross_entropy"), "CHUNKED_ABOVE_ELEMENTS", 20)
    call_all(ce_rows=4)
    assert routes[2] == "linear_cross_entropy_chunked" and routes[5] == "linear_cross_entropy_ref"


def test_forced_reference_never_chunks(monkeypatch, routes):
    monkeypatch.setenv("MEGASYNTH_KERNELS", "reference")
    monkeypatch.setattr(module("cross_entropy"), "CHUNKED_ABOVE_ELEMENTS", 0)
    call_all()
    assert routes == ["rms_norm_ref", "swiglu_ref", "linear_cross_entropy_ref"]


def test_forced_triton_end_to_end_matches_reference(monkeypatch):
    # Through the public functions (lazy imports included), forward and gradients against the references in fp32.
    # Both sides compute in fp32 from the same inputs; 1e-5 covers reduction-order differences.
    monkeypatch.setenv("MEGASYNTH_KERNELS", "triton")
    torch.manual_seed(0)
    # CUDA tensors on a GPU machine, CPU tensors (Triton interpreter) elsewhere.
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        x, w = torch.randn(3, 10, requires_grad=True), torch.randn(10, requires_grad=True)
        g, u = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True)
        h, lm = torch.randn(5, 10, requires_grad=True), torch.randn(13, 10, requires_grad=True)
        t = torch.tensor([1, -100, 12, 0, 7])
    cases = [
        (rms_norm, module("rms_norm").rms_norm_ref, (x, w)),
        (swiglu, module("swiglu").swiglu_ref, (g, u)),
        (linear_cross_entropy, module("cross_entropy").linear_cross_entropy_ref, (h, lm, t)),
    ]
    for public, ref, args in cases:
        leaves = [a for a in args if a.requires_grad]
        got = public(*args)
        got_grads = torch.autograd.grad(got.sum(), leaves)
        want = ref(*args)
        want_grads = torch.autograd.grad(want.sum(), leaves)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
