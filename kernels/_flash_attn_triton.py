"""Triton flash-attention core, host side: `flash_attention_triton`, forward and backward.

Same contract as `flash_attention_ref` in flash_attention.py (shapes there). This file holds the input checks,
the tile schedule, the per-architecture launch configs (and optional autotuning) and the autograd.Function. The
kernels are in _flash_attn_fwd_triton.py and _flash_attn_bwd_triton.py.

One kernel family serves both layouts. Every tile is a (sequence, block of rows) pair: batched inputs [B, S, H, D]
are B sequences of S tokens addressed through their batch stride; packed inputs [T, H, D] are one row whose
documents come from cu_seqlens, through a tile -> (document, block) map built on the device and sized by an upper
bound known on the host, so nothing waits on the GPU (max_seqlen is not needed; it is accepted for the
flash-attn calling convention). Saved for the backward: q, k, v, out and an fp32 base-2 logsumexp per (row, head).

Launch configs come from `target_arch(device)` (kernels/_launch.py): one table per architecture; inside
`_launch.planning_for(arch)` the host code runs on CPU tensors and records exactly the launches a GPU would get.
Autotuning (MEGASYNTH_AUTOTUNE=1 or autotune=True) is off by default so launch configs are a pure function of the
shapes: when on, each (kernel, arch, head_dim, dtype, causal, layout, length bucket) times the table entry and a
few alternatives whose estimated shared memory fits the architecture, once per process, and keeps the fastest.

Schedules: forward and dq run one program per (query tile, q head), heads fastest (the q heads of a GQA group
share their K/V tiles in L2), the longest causal tiles first; dkdv runs one program per (key tile, kv head) and
loops over the group's q heads, so dK/dV need no cross-program reduction. The backward has two modes
(deterministic=): the single pass (5 matmuls per tile pair, dQ through fp32 atomics; the default) and the
bit-reproducible two-kernel split (7 matmuls): _flash_attn_bwd_triton.py. On sm_90/sm_100 the forward reads
K/V through TMA descriptors.

Runs on CUDA, or on the CPU under TRITON_INTERPRET=1 (how the tests run it):
    TRITON_INTERPRET=1 pytest tests/kernels/test_flash_attention.py -q
"""

from __future__ import annotations

import math
import os

import torch
import triton

from ._flash_attn_bwd_triton import (
    _flash_attn_bwd_delta_kernel,
    _flash_attn_bwd_dkdv_kernel,
    _flash_attn_bwd_dq_convert_kernel,
    _flash_attn_bwd_dq_kernel,
)
from ._flash_attn_fwd_triton import _flash_attn_fwd_kernel
from ._launch import launch, max_shared_bytes, planning, target_arch
from ._layout import TokenLayout

_NAME = "flash_attention"
MAX_HEAD_DIM = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per architecture and kernel for 16-bit inputs, keyed by D_PAD (head_dim
# rounded up to a power of two >= 16, tl.dot's smallest depth); fp32 inputs have one small table for every
# architecture (their dots run on the FMA units with "ieee" precision: a correctness path, not a fast one).
# BLOCK_M counts query rows and BLOCK_N key rows in every kernel.
#   fwd:  the q tile stays resident; K and V tiles stream through a num_stages ring in shared memory.
#   dkdv: the key tile owns K, V and fp32 dK, dV ([BLOCK_N, D] each), so it is the large side; q / dO stream.
#   dq:   the mirror image: the query tile owns q, dO and fp32 dQ; K / V stream.
#   dkdv_atomic: dkdv of the single-pass backward (deterministic=False): also dQ_partial = dS K [BLOCK_M, D] fp32
#         per step, added atomically; one more matmul, that partial's registers, and dS^T staged in shared memory
#         for its transposed use. Its atomic traffic is BLOCK_M * D * 4 bytes per 10 * BLOCK_M * BLOCK_N * D
#         flops, so BLOCK_N (key rows) stays as large as for dkdv; where the extra registers spill, BLOCK_M
#         shrinks instead (A100/sm_86 at D=64/128). Compiled (batched/varlen x causal or not), the entries spill
#         only at sm_90 D=128 (32-112 B), sm_80 D=128 (52 B, batched causal) and sm_80/86 D=256 (16-388 B): in
#         cuobjdump -sass every spill store/load sits outside the tile loops (per program or per GQA q head), none
#         inside; the spill-free alternatives there need BLOCK_N 32 / 16 or num_stages 1 (4x the atomics at
#         D=128 on sm_90), which would cost more than these few scalar reloads.
# Shared-memory estimate (bytes; row = D_PAD * element size): the streamed operands are multi-buffered by the
# software pipeline, the resident ones staged once, plus 2 KB for barriers and layout-conversion scratch:
#   fwd  = stages * 2 * BLOCK_N * row + BLOCK_M * row + 2048
#   dkdv = stages * 2 * BLOCK_M * row + 2 * BLOCK_N * row + 2048
#   dq   = stages * 2 * BLOCK_N * row + 2 * BLOCK_M * row + 2048
#   dkdv_atomic = stages * 2 * BLOCK_M * row + 3 * BLOCK_N * row + 2 * BLOCK_M * BLOCK_N * elem + 2048
#         (on sm_90 K is staged twice, as the A operand of K Q^T and the B operand of dS K: within 1 KB at D=128)
# Compiled (Triton 3.9, bundled ptxas, kernels/aot.py) for sm_90 the real numbers land within ~1 KB of this
# estimate (wgmma reads the resident tiles from shared memory); for sm_80/86 (mma.sync keeps part of them in
# registers) at or below it in every entry measured, by up to a third: an upper bound, so sm_86's table is safe.
# Every entry fits max_shared_bytes(arch) by the estimate (checked by
# tests/kernels/test_flash_attention.py) and, compiled, by the AOT tests (`python bench/kernel_resources.py` prints
# the real shared memory, registers and spills). BLOCK_N is 128 where shared memory and registers allow; the
# smaller entries (A100 and sm_86 forward at D=128: 128x64 spills 48-92 B there in the varlen variant; every
# dkdv/dq at D=256, ...) are the largest tiles whose compiles did not spill registers, batched or varlen
# (8 warps everywhere: at 4 warps the fp32 accumulators spill).
_CONFIGS: dict[int, dict[str, dict[int, tuple[int, int, int, int]]]] = {
    90: {  # H100 / H200: 232,448 B
        "fwd": {16: (128, 128, 8, 3), 32: (128, 128, 8, 3), 64: (128, 128, 8, 3), 128: (128, 128, 8, 3),
                256: (128, 64, 8, 2)},
        "dkdv": {16: (32, 128, 8, 3), 32: (32, 128, 8, 3), 64: (32, 128, 8, 3), 128: (16, 128, 8, 3),
                 256: (16, 32, 8, 2)},
        "dkdv_atomic": {16: (32, 128, 8, 3), 32: (32, 128, 8, 3), 64: (32, 128, 8, 3), 128: (16, 128, 8, 3),
                        256: (16, 32, 8, 2)},
        "dq": {16: (128, 64, 8, 3), 32: (128, 64, 8, 3), 64: (128, 64, 8, 3), 128: (128, 64, 8, 3),
               256: (64, 32, 8, 2)},
    },
    80: {  # A100: 166,912 B
        "fwd": {16: (128, 128, 8, 3), 32: (128, 128, 8, 3), 64: (128, 128, 8, 3), 128: (128, 32, 8, 3),
                256: (64, 32, 8, 2)},
        "dkdv": {16: (32, 128, 8, 3), 32: (32, 128, 8, 3), 64: (32, 128, 8, 3), 128: (32, 64, 8, 3),
                 256: (16, 32, 8, 2)},
        "dkdv_atomic": {16: (32, 128, 8, 3), 32: (32, 128, 8, 3), 64: (16, 128, 8, 3), 128: (16, 64, 8, 3),
                        256: (16, 32, 8, 2)},
        "dq": {16: (128, 64, 8, 3), 32: (128, 64, 8, 3), 64: (128, 64, 8, 3), 128: (128, 32, 8, 2),
               256: (64, 32, 8, 2)},
    },
    86: {  # RTX 30xx / A10 / A40 and (89) RTX 40xx / L4 / L40: 101,376 B
        "fwd": {16: (128, 64, 8, 3), 32: (128, 64, 8, 3), 64: (128, 64, 8, 3), 128: (128, 32, 8, 3),
                256: (64, 32, 8, 2)},
        "dkdv": {16: (32, 128, 8, 3), 32: (32, 128, 8, 3), 64: (32, 128, 8, 3), 128: (32, 64, 8, 3),
                 256: (16, 32, 8, 2)},
        "dkdv_atomic": {16: (32, 128, 8, 3), 32: (32, 128, 8, 3), 64: (16, 128, 8, 3), 128: (16, 64, 8, 3),
                        256: (16, 32, 8, 2)},
        "dq": {16: (128, 64, 8, 3), 32: (128, 64, 8, 3), 64: (128, 64, 8, 3), 128: (128, 32, 8, 2),
               256: (32, 32, 4, 2)},
    },
}
_FP32_CONFIGS = {  # every architecture; each fits the sm_86 limit by the estimate
    "fwd": {16: (64, 64, 8, 2), 32: (64, 64, 8, 2), 64: (64, 32, 8, 2), 128: (64, 32, 8, 2), 256: (32, 32, 8, 1)},
    "dkdv": {16: (16, 64, 8, 2), 32: (16, 64, 8, 2), 64: (16, 64, 8, 2), 128: (16, 32, 8, 2), 256: (16, 16, 8, 1)},
    "dkdv_atomic": {16: (16, 64, 8, 2), 32: (16, 64, 8, 2), 64: (16, 64, 8, 2), 128: (16, 32, 8, 2),
                    256: (16, 16, 8, 1)},
    "dq": {16: (64, 32, 8, 2), 32: (64, 32, 8, 2), 64: (64, 32, 8, 2), 128: (32, 32, 8, 2), 256: (16, 32, 8, 1)},
}
# Under the interpreter (CPU) small tiles, so test sequences of tens of tokens span several tiles and every
# masking path runs. Tests may replace these (BLOCK_M, BLOCK_N) pairs to exercise unequal tiles.
INTERPRETER_BLOCKS = {"fwd": (16, 16), "dkdv": (16, 16), "dkdv_atomic": (16, 16), "dq": (16, 16)}
# The forward reads K/V through tensor descriptors (TMA) on these architectures (Hopper's and datacenter
# Blackwell's bulk copies; the sm_90 table's tiles were sized for it); INTERPRETER_TMA lets the tests run that path
# under the interpreter, which implements tensor descriptors.
_TMA_ARCHS = {90, 100}
INTERPRETER_TMA = False
_DELTA_BLOCK = {True: 64, False: 16}  # tokens per delta program on a GPU / in the interpreter
# Alternatives autotuning may try beside the table entry (each pruned by the shared-memory estimate).
_AUTOTUNE_CANDIDATES = {
    "fwd": [(128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 8, 2), (64, 128, 8, 3), (64, 64, 4, 3)],
    "dkdv": [(16, 128, 8, 3), (32, 128, 8, 3), (32, 128, 8, 2), (32, 64, 8, 3), (16, 64, 8, 3), (16, 32, 8, 2)],
    "dkdv_atomic": [(16, 128, 8, 3), (32, 128, 8, 3), (32, 128, 8, 2), (32, 64, 8, 3), (64, 64, 8, 2),
                    (16, 64, 8, 3), (16, 32, 8, 2)],
    "dq": [(128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (128, 32, 8, 3), (64, 64, 8, 3), (64, 32, 8, 2)],
}
_TUNED: dict[tuple, tuple[int, int, int, int]] = {}


def table_arch(arch: int) -> int:
    """The config table for `arch`: its own, or the nearest one that is safe: 90 for sm_90..sm_119 with Hopper's
    232,448 B of shared memory (H100/H200, B200/GB200); 80 for sm_80; 86, the smallest shared memory, for the
    rest: sm_86/87/89, the consumer Blackwell parts (sm_120+: 101,376 B), and any architecture whose limit
    _launch does not know (max_shared_bytes gives it the smallest, and the table must fit that)."""
    limit = max_shared_bytes(arch)
    if 90 <= arch < 120 and limit >= max_shared_bytes(90):
        return 90
    if arch == 80:
        return 80
    return 86


def estimate_shared(kernel: str, config: tuple[int, int, int, int], d_pad: int, elem: int) -> int:
    """Shared-memory estimate in bytes of one launch config (formulas above the config table)."""
    block_m, block_n, _, stages = config
    row = d_pad * elem
    if kernel == "fwd":
        return stages * 2 * block_n * row + block_m * row + 2048
    if kernel == "dkdv":
        return stages * 2 * block_m * row + 2 * block_n * row + 2048
    if kernel == "dkdv_atomic":
        return stages * 2 * block_m * row + 3 * block_n * row + 2 * block_m * block_n * elem + 2048
    return stages * 2 * block_n * row + 2 * block_m * row + 2048


def table_config(kernel: str, arch: int, d_pad: int, elem: int) -> tuple[int, int, int, int]:
    """The default (BLOCK_M, BLOCK_N, num_warps, num_stages) of `kernel` on `arch` for inputs of `elem` bytes."""
    table = _FP32_CONFIGS if elem == 4 else _CONFIGS[table_arch(arch)]
    return table[kernel][d_pad]


def _autotune_on(autotune: bool | None) -> bool:
    return bool(autotune) if autotune is not None else os.environ.get("MEGASYNTH_AUTOTUNE", "0") == "1"


def _config(kernel: str, layout: TokenLayout, dtype: torch.dtype, arch: int | None, causal: bool, autotune: bool,
            run) -> tuple[int, int, int, int]:
    """Launch config of `kernel`; `run(config)` launches it (used only when autotuning)."""
    if arch is None:
        block_m, block_n = INTERPRETER_BLOCKS[kernel]
        return block_m, block_n, 4, 1
    elem = dtype.itemsize
    default = table_config(kernel, arch, layout.d_pad, elem)
    if not autotune or planning():
        return default
    key = (kernel, arch, layout.d_pad, elem, causal, layout.packed, triton.next_power_of_2(layout.seq))
    if key not in _TUNED:
        from triton.testing import do_bench

        limit = max_shared_bytes(arch)
        candidates = [default] + [c for c in _AUTOTUNE_CANDIDATES[kernel]
                                  if c != default and estimate_shared(kernel, c, layout.d_pad, elem) <= limit]
        timings = {}
        for config in candidates:
            try:
                timings[config] = do_bench(lambda c=config: run(c), warmup=3, rep=10)
            except Exception:  # noqa: BLE001, S112 - a candidate that fails to compile or launch is not chosen
                continue
        _TUNED[key] = min(timings, key=timings.get) if timings else default
    return _TUNED[key]


def _tile_schedule(cu_seqlens: torch.Tensor | None, layout: TokenLayout, block: int):
    """-> (tile->document map, tile->block map, tiles to launch, blocks per sequence) for tiles of `block` rows.

    Batched: tile t is block t % blocks of row t // blocks; the maps are unused. Packed: tile t of the
    concatenated per-document tile lists; the launch uses the bound cdiv(T, block) + documents (each document
    wastes less than one tile), and tiles past the real count find a block past their document's end and exit.
    Built with device ops only (no host sync).
    """
    if not layout.packed:
        blocks = triton.cdiv(layout.seq, block)
        return None, None, layout.batch * blocks, blocks
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    tiles = (lengths + block - 1) // block
    ends = torch.cumsum(tiles, 0)
    n_tiles = triton.cdiv(layout.seq, block) + lengths.numel()
    ids = torch.arange(n_tiles, device=cu_seqlens.device)
    doc = torch.searchsorted(ends, ids, right=True).clamp_(max=lengths.numel() - 1)
    block_index = ids - (ends[doc] - tiles[doc])
    return doc.int(), block_index.int(), n_tiles, 0


def _strides(t: torch.Tensor, packed: bool) -> tuple[int, int, int]:
    """(batch, token, head) strides of a [B, S, H, D] or packed [T, H, D] tensor (batch stride 0 when packed)."""
    return (0, t.stride(0), t.stride(1)) if packed else (t.stride(0), t.stride(1), t.stride(2))


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    # The kernels address the head dim as contiguous; only inputs that are not (rare) pay for a copy.
    return t if t.stride(-1) == 1 or t.numel() == 0 else t.contiguous()


def _schedule_args(cu_seqlens, layout: TokenLayout, block: int, unused: torch.Tensor):
    doc_map, block_map, n_tiles, blocks_per_seq = _tile_schedule(cu_seqlens, layout, block)
    pointers = tuple(unused if t is None else t for t in (cu_seqlens, doc_map, block_map))
    return pointers, n_tiles, blocks_per_seq


def _use_tma(arch: int | None, k: torch.Tensor, v: torch.Tensor) -> bool:
    """TMA for the forward's K/V loads: on sm_90 / sm_100, when the copy engine's alignment rules hold (16-byte
    aligned base and row strides); decided from host metadata only."""
    if arch is None:
        return INTERPRETER_TMA
    elem = k.element_size()
    if arch not in _TMA_ARCHS or elem == 4:  # fp32 (FMA dots) spills with TMA tiles: plain loads
        return False
    return all(t.data_ptr() % 16 == 0 and all(st * elem % 16 == 0 for st in t.stride()[:-1]) for t in (k, v))


def _ensure_allocator() -> None:
    # Descriptors built inside a kernel need a small global scratch buffer per program, which Triton requests
    # through triton.set_allocator at launch. Set ours only when none is set (never replace a caller's).
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))


def _forward(q, k, v, cu_seqlens, layout: TokenLayout, causal: bool, scale: float, autotune: bool):
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((layout.heads_q, layout.n_tokens), dtype=torch.float32, device=q.device)
    if layout.n_tokens == 0 or layout.heads_q == 0:
        return out, lse
    arch = target_arch(q.device)
    use_tma = _use_tma(arch, k, v)
    if use_tma and arch is not None and not planning():
        _ensure_allocator()

    def run(config):
        block_m, block_n, warps, stages = config
        pointers, n_tiles, blocks_per_seq = _schedule_args(cu_seqlens, layout, block_m, lse)
        launch(
            _flash_attn_fwd_kernel, (n_tiles * layout.heads_q,),
            q, k, v, out, lse, *pointers,
            *_strides(q, layout.packed), *_strides(k, layout.packed), *_strides(v, layout.packed),
            *_strides(out, layout.packed),
            layout.seq, blocks_per_seq, n_tiles, layout.n_tokens, layout.heads_q, layout.heads_q // layout.heads_kv,
            scale * _LOG2E,
            D=layout.head_dim, D_PAD=layout.d_pad, EVEN_D=layout.head_dim == layout.d_pad,
            BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal, IS_VARLEN=layout.packed, USE_TMA=use_tma,
            num_warps=warps, num_stages=stages,
        )

    run(_config("fwd", layout, q.dtype, arch, causal, autotune, run))
    return out, lse


def _backward(dout, q, k, v, out, lse, cu_seqlens, layout: TokenLayout, causal: bool, scale: float, autotune: bool,
              deterministic: bool):
    """deterministic: the two-kernel split (7 matmuls per tile pair, bit-reproducible); otherwise the single pass
    (5 matmuls; dQ summed with fp32 atomics, so its rounding varies run to run)."""
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if layout.n_tokens == 0 or layout.heads_q == 0:
        return dq, dk, dv
    packed, arch = layout.packed, target_arch(q.device)
    group = layout.heads_q // layout.heads_kv
    const = {"D": layout.head_dim, "D_PAD": layout.d_pad, "EVEN_D": layout.head_dim == layout.d_pad,
             "CAUSAL": causal, "IS_VARLEN": packed}
    strides_in = (*_strides(q, packed), *_strides(k, packed), *_strides(v, packed), *_strides(dout, packed))

    delta = torch.empty_like(lse)
    delta_block = _DELTA_BLOCK[arch is not None]
    launch(
        _flash_attn_bwd_delta_kernel, (triton.cdiv(layout.n_tokens, delta_block), layout.heads_q),
        out, dout, delta, *_strides(out, packed), *_strides(dout, packed), layout.seq, layout.n_tokens,
        D=layout.head_dim, D_PAD=layout.d_pad, BLOCK=delta_block,
    )

    # Single pass: dQ's fp32 accumulator [N_TOKENS, H_Q, D], zeroed before every dkdv launch (autotuning runs the
    # kernel repeatedly); deterministic: an unused placeholder.
    dq_acc = lse if deterministic else torch.empty((layout.n_tokens, layout.heads_q, layout.head_dim),
                                                   dtype=torch.float32, device=q.device)

    def run_dkdv(config):
        block_m, block_n, warps, stages = config
        pointers, n_tiles, blocks_per_seq = _schedule_args(cu_seqlens, layout, block_n, lse)
        if not deterministic:
            dq_acc.zero_()
        launch(
            _flash_attn_bwd_dkdv_kernel, (n_tiles * layout.heads_kv,),
            q, k, v, dout, lse, delta, dk, dv, dq_acc, *pointers,
            *strides_in, *_strides(dk, packed), *_strides(dv, packed),
            layout.seq, blocks_per_seq, layout.n_tokens, layout.heads_kv, group, scale, scale * _LOG2E,
            BLOCK_M=block_m, BLOCK_N=block_n, ATOMIC_DQ=not deterministic, num_warps=warps, num_stages=stages,
            **const,
        )

    def run_dq(config):
        block_m, block_n, warps, stages = config
        pointers, n_tiles, blocks_per_seq = _schedule_args(cu_seqlens, layout, block_m, lse)
        launch(
            _flash_attn_bwd_dq_kernel, (n_tiles * layout.heads_q,),
            q, k, v, dout, lse, delta, dq, *pointers,
            *strides_in, *_strides(dq, packed),
            layout.seq, blocks_per_seq, n_tiles, layout.n_tokens, layout.heads_q, group, scale, scale * _LOG2E,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **const,
        )

    if deterministic:
        run_dkdv(_config("dkdv", layout, q.dtype, arch, causal, autotune, run_dkdv))
        run_dq(_config("dq", layout, q.dtype, arch, causal, autotune, run_dq))
        return dq, dk, dv
    run_dkdv(_config("dkdv_atomic", layout, q.dtype, arch, causal, autotune, run_dkdv))
    # 4096 fp32 elements per program on a GPU: 32 registers a thread at 4 warps, whatever the head_dim.
    convert_block = delta_block if arch is None else max(16, 4096 // layout.d_pad)
    launch(
        _flash_attn_bwd_dq_convert_kernel, (triton.cdiv(layout.n_tokens, convert_block), layout.heads_q),
        dq_acc, dq, *_strides(dq, packed), layout.seq, layout.n_tokens, layout.heads_q, scale,
        D=layout.head_dim, D_PAD=layout.d_pad, BLOCK=convert_block,
    )
    return dq, dk, dv


class _FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, layout, causal, scale, autotune, deterministic):
        out, lse = _forward(q, k, v, cu_seqlens, layout, causal, scale, autotune)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.args = (layout, causal, scale, autotune, deterministic)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = _backward(_unit_last_stride(dout), q, k, v, out, lse, cu_seqlens, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None


def _check_cu_seqlens(cu_seqlens, n_tokens: int, device: torch.device) -> None:
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
        got = f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}" if isinstance(cu_seqlens, torch.Tensor) else cu_seqlens
        raise ValueError(f"{_NAME}: cu_seqlens must be a 1-D int32 tensor [documents + 1], got {got}")
    if cu_seqlens.numel() < 2:
        raise ValueError(f"{_NAME}: cu_seqlens needs at least 2 entries (0 and the token count), "
                         f"got {cu_seqlens.numel()}")
    if cu_seqlens.device != device:
        raise ValueError(f"{_NAME}: cu_seqlens on {cu_seqlens.device} but q on {device}")
    if planning():  # ahead-of-time planning: the values may be placeholders and nothing reads them
        return
    ok = (cu_seqlens[0] == 0) & (cu_seqlens[-1] == n_tokens) & (cu_seqlens[1:] >= cu_seqlens[:-1]).all()
    message = f"{_NAME}: cu_seqlens must start at 0, never decrease and end at the token count {n_tokens}"
    if cu_seqlens.is_cuda:
        # Reading the values on the host would stall the CPU on every layer; a device-side assert costs nothing
        # when the offsets are valid and stops the run (instead of reading out of bounds) when they are not.
        torch._assert_async(ok, message)
    elif not bool(ok):
        shown = cu_seqlens[:8].tolist()
        raise ValueError(f"{message}; got {shown}{' ...' if cu_seqlens.numel() > 8 else ''}")


def check_inputs(q, k, v, cu_seqlens, max_seqlen, softmax_scale) -> tuple[TokenLayout, float]:
    """Validate the flash_attention arguments -> (layout, softmax scale); ValueError naming what is wrong."""
    packed = cu_seqlens is not None
    form = "packed [T, H, D]" if packed else "batched [B, S, H, D]"
    rank = 3 if packed else 4
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{_NAME}: {name} must be a tensor, got {type(t).__name__}")  # noqa: TRY004
        if t.device != q.device:
            raise ValueError(f"{_NAME}: {name} on {t.device} but q on {q.device}")
        if t.dim() != rank:
            raise ValueError(f"{_NAME}: {name} has shape {tuple(t.shape)}; the {form} form needs {rank} dims")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{_NAME}: q, k, v must share one dtype of fp16/bf16/fp32, "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape or k.shape[:-2] != q.shape[:-2] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"{_NAME}: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match "
                         f"({form}: same tokens and head_dim; k and v identical)")
    heads_q, heads_kv, head_dim = q.shape[-2], k.shape[-2], q.shape[-1]
    if heads_kv == 0 or heads_q % heads_kv:
        raise ValueError(f"{_NAME}: {heads_q} q heads is not a multiple of {heads_kv} kv heads (GQA)")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"{_NAME}: head_dim {head_dim}: the Triton kernel needs 1 <= head_dim <= {MAX_HEAD_DIM}")
    if packed:
        _check_cu_seqlens(cu_seqlens, q.shape[0], q.device)
    if max_seqlen is not None and (isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0):
        raise ValueError(f"{_NAME}: max_seqlen must be a non-negative int or None, got {max_seqlen!r}")
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    if not (math.isfinite(scale) and scale > 0):
        # > 0: the kernels scale the row maximum instead of every score (max(x) * s = max(x * s) needs s > 0).
        raise ValueError(f"{_NAME}: softmax_scale must be a positive finite number, got {softmax_scale!r}")
    if packed:
        return TokenLayout(True, 1, q.shape[0], heads_q, heads_kv, head_dim), scale
    return TokenLayout(False, q.shape[0], q.shape[1], heads_q, heads_kv, head_dim), scale


def resolve_deterministic(deterministic: bool | None) -> bool:
    """PyTorch's convention: None follows torch.use_deterministic_algorithms (read when the forward runs)."""
    if deterministic is None:
        return torch.are_deterministic_algorithms_enabled()
    if not isinstance(deterministic, bool):
        raise ValueError(f"{_NAME}: deterministic must be True, False or None, got {deterministic!r}")  # noqa: TRY004
    return deterministic


def flash_attention_triton(q, k, v, *, cu_seqlens=None, max_seqlen=None, causal=True, softmax_scale=None,
                           deterministic=None, autotune=None):
    """softmax(q k^T * scale [causal, per document]) v with the Triton flash kernels; differentiable in q, k, v.

    Batched: q [B, S, Hq, D], k/v [B, S, Hkv, D] -> [B, S, Hq, D]. Packed: q [T, Hq, D], k/v [T, Hkv, D],
    cu_seqlens int32 [N+1] -> [T, Hq, D]; attention stays inside each document. Hq % Hkv == 0, D <= 256, dtype
    fp16/bf16/fp32 (output in that dtype). autotune: None reads MEGASYNTH_AUTOTUNE (default off).
    deterministic (the backward; decided when the forward runs): None follows
    torch.are_deterministic_algorithms_enabled(); False runs the single-pass backward (5 matmuls per tile pair,
    dQ summed with fp32 atomics into a 4 * T * Hq * D-byte buffer: not bit-reproducible on a GPU); True the
    two-kernel backward (7 matmuls per tile pair, about 1.4x the backward matmul work, bit-reproducible).
    """
    layout, scale = check_inputs(q, k, v, cu_seqlens, max_seqlen, softmax_scale)
    mode = resolve_deterministic(deterministic)
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    return _FlashAttentionFunction.apply(q, k, v, cu_seqlens, layout, bool(causal), scale, _autotune_on(autotune),
                                         mode)
