"""Case table for tests/kernels/test_kernel_resources.py: one toy Triton kernel whose shared memory is over every
architecture's limit, compiled once (sm_80). Loaded by `bench/kernel_resources.py --cases
tests/kernels/aot_toy_cases.py` (a process without TRITON_INTERPRET).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from megasynth.kernels._launch import launch
from megasynth.kernels.aot import Case

# A BLOCK x BLOCK fp32 tile: 256 KiB, over the largest opt-in limit (232,448 B on sm_90; 166,912 B on sm_80).
BLOCK = 256


@triton.jit
def _toy_transpose_kernel(X, Y, BLOCK: tl.constexpr):
    # The transposed store wants the tile in the other register layout; Triton converts it through a shared
    # memory buffer of the whole tile. No loop and no dot: a compile of about a second.
    idx = tl.arange(0, BLOCK)
    tile = tl.load(X + idx[:, None] * BLOCK + idx[None, :])
    tl.store(Y + idx[:, None] * BLOCK + idx[None, :], tl.trans(tile))


def _run() -> None:
    x = torch.empty(BLOCK, BLOCK, dtype=torch.float32)
    launch(_toy_transpose_kernel, (1,), x, torch.empty_like(x), BLOCK=BLOCK, num_warps=8, num_stages=1)


def cases(quick: bool = False) -> list[Case]:
    return [Case("toy_transpose", (("block", BLOCK),), _run, archs=(80,))]
