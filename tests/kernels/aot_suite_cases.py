"""Case table for tests/kernels/test_kernel_resources.py: the suite's representative subset of the full AOT matrix
(megasynth.kernels._aot_cases, compiled whole by `python bench/kernel_resources.py`). Loaded by
`bench/kernel_resources.py --cases tests/kernels/aot_suite_cases.py` (a process without TRITON_INTERPRET).

Every @triton.jit kernel compiles at least once, at its largest config (the one that can fail to fit), the
families split between sm_80 and sm_90 (flash attention on both: its config tables are per architecture). The cases are picked by name from the full table, so they are exactly the launches bench/ checks.
The two flash-attention cases run the two backward modes (the atomic single pass: dK/dV with ATOMIC_DQ and the dQ
convert kernel; the deterministic split: dK/dV and the dQ kernel) at opposite dtype / layout / causal points.
What each pick compiles, from the full matrix (limits: sm_80 166,912 B, sm_90 232,448 B):
- sm_90, head_dim 128, atomic: the forward at 231,424 B (the tightest fit of the matrix) and the atomic dK/dV at
  132,352 B (the largest dK/dV; 255 registers, spills);
- sm_80, head_dim 256, deterministic: the dQ kernel at 102,400 B (the largest launch on sm_80), the forward (its
  sm_80 table differs from sm_90's) and the dK/dV at 233 / 246 registers;
- rms_norm at the widest row (hidden 65,536: the most registers spilled), linear cross-entropy at the largest
  vocabulary, the pre-pass at head_dim 256, swiglu (one config).
"""

from __future__ import annotations

import dataclasses

from megasynth.kernels._aot_cases import cases as full_cases
from megasynth.kernels.aot import Case

SUITE: tuple[tuple[str, int], ...] = (
    ("flash_attention[dtype=fp16,head_dim=128,layout=batched,causal=False,deterministic=False]", 90),
    ("flash_attention[dtype=bf16,head_dim=256,layout=varlen,causal=True,deterministic=True]", 80),
    ("rms_norm[dtype=bf16,hidden=65536]", 90),
    ("linear_cross_entropy[dtype=fp16,vocab=128256]", 80),
    ("qknorm_rope[dtype=bf16,head_dim=256,layout=varlen]", 90),
    ("swiglu[dtype=fp16]", 80),
)


def cases(quick: bool = False) -> list[Case]:
    by_name = {c.name: c for c in full_cases(quick=False)}
    missing = [name for name, _ in SUITE if name not in by_name]
    if missing:
        raise KeyError(f"tests/kernels/aot_suite_cases.py: SUITE names cases that megasynth.kernels._aot_cases "
                       f"no longer has: {missing}")
    return [dataclasses.replace(by_name[name], archs=(arch,)) for name, arch in SUITE]
