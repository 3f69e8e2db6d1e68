"""Case table for tests/kernels/test_kernel_resources.py: one toy Triton kernel whose pipelined tiles need more
shared memory than sm_80 / sm_86 allow with many stages, and fit with two. Loaded by
`bench/kernel_resources.py --cases tests/kernels/aot_toy_cases.py` (a process without TRITON_INTERPRET).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from megasynth.kernels._launch import launch
from megasynth.kernels.aot import Case

BLOCK = 128  # M and N tile
BLOCK_K = 64
K = 1024


@triton.jit
def _toy_matmul_kernel(A, B, C, K, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    # The software pipeliner keeps num_stages A and B tiles of BLOCK x BLOCK_K fp16 (16 KiB each) in shared memory.
    rows = tl.arange(0, BLOCK)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(A + rows[:, None] * K + (k + ks)[None, :])
        b = tl.load(B + (k + ks)[:, None] * BLOCK + rows[None, :])
        acc += tl.dot(a, b)
    tl.store(C + rows[:, None] * BLOCK + rows[None, :], acc)


def _run(stages: int):
    def run():
        a = torch.empty(BLOCK, K, dtype=torch.float16)
        b = torch.empty(K, BLOCK, dtype=torch.float16)
        c = torch.empty(BLOCK, BLOCK, dtype=torch.float32)
        launch(_toy_matmul_kernel, (1,), a, b, c, K, BLOCK=BLOCK, BLOCK_K=BLOCK_K, num_warps=4, num_stages=stages)

    return run


def cases(quick: bool = False) -> list[Case]:
    # 8 stages: 229,376 B of tiles, over both limits (166,912 B on sm_80, 101,376 B on sm_86). 2 stages: 32,768 B.
    return [Case("toy_matmul", (("stages", s),), _run(s), archs=(80, 86)) for s in (8, 2)]
