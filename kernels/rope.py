"""Rotary position embedding, rotate-half convention (Llama, Qwen3): the tables and the reference rotation.

For a head vector x = [x1, x2] (halves of size D/2) at position p, with inv_freq_i = theta^(-2i/D):
    rope(x) = [x1 * cos(p * inv_freq) - x2 * sin(p * inv_freq),  x2 * cos(p * inv_freq) + x1 * sin(p * inv_freq)]
"""

from __future__ import annotations

import torch


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float = 500000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [...] (integer) -> cos, sin [..., head_dim // 2] in fp32.

    Computed in float64 and rounded once: at positions in the hundreds of thousands fp32 angle products
    lose several digits, which would make long-context runs disagree with Hugging Face's tables.
    """
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim)
    angles = positions.to(torch.float64).unsqueeze(-1) * inv_freq
    return angles.cos().float(), angles.sin().float()


def apply_rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., S, H, D]; cos, sin broadcastable to [..., S, 1, D/2] after unsqueeze(-2). Math in fp32."""
    half = x.shape[-1] // 2
    x32 = x.float()
    x1, x2 = x32[..., :half], x32[..., half:]
    c, s = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)
