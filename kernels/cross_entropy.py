"""Cross-entropy of a linear head: mean over non-ignored tokens of CE(hidden @ weight.T, targets).

`linear_cross_entropy_ref` materialises the [tokens, vocab] logits; `linear_cross_entropy` dispatches to an
implementation that never does (see _dispatch.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import use_triton


def linear_cross_entropy_ref(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """hidden [N, H], weight [V, H], targets [N] -> scalar mean loss over targets != ignore_index (fp32)."""
    logits = (hidden @ weight.t()).float()
    return F.cross_entropy(logits, targets, ignore_index=ignore_index)


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    if use_triton(hidden, weight, targets):
        from ._cross_entropy_triton import linear_cross_entropy_triton  # noqa: PLC0415

        return linear_cross_entropy_triton(hidden, weight, targets, ignore_index)
    return linear_cross_entropy_ref(hidden, weight, targets, ignore_index)
