"""The token layout of attention-shaped inputs, shared by the Triton host code of the pre-pass and the flash core."""

from __future__ import annotations

from dataclasses import dataclass

import torch

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256  # both kernels pad head_dim to a power of two; 256 is the widest whose tiles fit


@dataclass(frozen=True)
class TokenLayout:
    """What input checks learnt about q/k/v: batched [B, S, H, D], or packed [T, H, D] with cu_seqlens (then one
    row of T tokens). Kernels address a token as (batch row, position), so both layouts share one code path."""

    packed: bool
    batch: int  # B, or 1 when packed
    seq: int  # tokens per batch row: S, or T when packed
    heads_q: int
    heads_kv: int
    head_dim: int

    @property
    def n_tokens(self) -> int:
        return self.batch * self.seq

    @property
    def d_pad(self) -> int:
        """head_dim rounded up to a power of two of at least 16 (tl.arange needs a power of two, tl.dot depth 16)."""
        return max(16, 1 << (self.head_dim - 1).bit_length())

    def check_triton_limits(self, name: str, dtype: torch.dtype) -> None:
        """What the Triton pre-pass and flash kernels take beyond their contracts: fp16/bf16/fp32, D <= 256."""
        if dtype not in TRITON_DTYPES:
            raise ValueError(f"{name}: the Triton kernel takes fp16, bf16 or fp32, got {dtype}")
        if self.head_dim > MAX_HEAD_DIM:
            raise ValueError(f"{name}: head_dim {self.head_dim} exceeds the Triton kernel's {MAX_HEAD_DIM}")
