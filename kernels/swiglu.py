"""SwiGLU activation, silu(gate) * up (the Llama MLP's elementwise part): `swiglu` (dispatches, _dispatch.py) and
its PyTorch reference `swiglu_ref`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import use_triton


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if use_triton(gate, up):
        from ._swiglu_triton import swiglu_triton  # noqa: PLC0415

        return swiglu_triton(gate, up)
    return swiglu_ref(gate, up)
