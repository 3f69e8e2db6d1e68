"""Fixtures shared by the kernel tests.

GPU machines run the compiled kernels on CUDA tensors; elsewhere tests/conftest.py sets TRITON_INTERPRET=1 and
the same kernels run on the CPU through the interpreter.
"""

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def on_device():
    with torch.device(DEVICE):  # tensor factories without an explicit device allocate on DEVICE
        yield


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty / empty_like return NaN-filled float tensors, so an element a kernel forgets to write fails."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))
