"""Triton flash-attention core, host side: `flash_attention_triton`, forward and backward.

The `triton` core of attention_core.py: the kernel's own limits, the tile schedule, the per-architecture launch
configs (and optional autotuning) and the autograd.Function. Design and measurements: docs/kernels.md.
"""

from __future__ import annotations

import os

import torch
import triton

from ._flash_attn_bwd_triton import (_flash_attn_bwd_delta_kernel, _flash_attn_bwd_dkdv_kernel,
                                     _flash_attn_bwd_dq_convert_kernel, _flash_attn_bwd_dq_kernel)
from ._flash_attn_fwd_triton import _flash_attn_fwd_kernel
from ._launch import launch, max_shared_bytes, planning, target_arch
from ._layout import TokenLayout
from .attention_core import check_inputs

_NAME = "flash_attention"
_LOG2E = 1.4426950408889634


def _by_d_pad(small, d128, d256, d64=None) -> dict[int, tuple[int, int, int, int]]:
    """One kernel's row of a table: D_PAD 16 and 32 take `small`, so does 64 unless `d64` is given."""
    return {16: small, 32: small, 64: d64 or small, 128: d128, 256: d256}


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per architecture and kernel for 16-bit inputs, keyed by D_PAD; how
# the entries were chosen and measured: docs/kernels.md.
_CONFIGS: dict[int, dict[str, dict[int, tuple[int, int, int, int]]]] = {
    90: {  # H100 / H200: 232,448 B
        "fwd": _by_d_pad((128, 128, 8, 3), (128, 128, 8, 3), (128, 64, 8, 2)),
        "dkdv": _by_d_pad((32, 128, 8, 3), (16, 128, 8, 3), (16, 32, 8, 2)),
        "dq": _by_d_pad((128, 64, 8, 3), (128, 64, 8, 3), (64, 32, 8, 2)),
    },
    80: {  # A100: 166,912 B
        "fwd": _by_d_pad((128, 128, 8, 3), (128, 32, 8, 3), (64, 32, 8, 2)),
        "dkdv": _by_d_pad((32, 128, 8, 3), (32, 64, 8, 3), (16, 32, 8, 2)),
        "dkdv_atomic": _by_d_pad((32, 128, 8, 3), (16, 64, 8, 3), (16, 32, 8, 2), d64=(16, 128, 8, 3)),
        "dq": _by_d_pad((128, 64, 8, 3), (128, 32, 8, 2), (64, 32, 8, 2)),
    },
}
_CONFIGS[90]["dkdv_atomic"] = _CONFIGS[90]["dkdv"]
# RTX 30xx / A10 / A40 and (89) RTX 40xx / L4 / L40: 101,376 B.
_CONFIGS[86] = {**_CONFIGS[80], "fwd": _by_d_pad((128, 64, 8, 3), (128, 32, 8, 3), (64, 32, 8, 2)),
                "dq": {**_CONFIGS[80]["dq"], 256: (32, 32, 4, 2)}}
_FP32_CONFIGS = {  # every architecture; each fits the sm_86 limit by the estimate
    "fwd": _by_d_pad((64, 64, 8, 2), (64, 32, 8, 2), (32, 32, 8, 1), d64=(64, 32, 8, 2)),
    "dkdv": _by_d_pad((16, 64, 8, 2), (16, 32, 8, 2), (16, 16, 8, 1)),
    "dq": _by_d_pad((64, 32, 8, 2), (32, 32, 8, 2), (16, 32, 8, 1)),
}
_FP32_CONFIGS["dkdv_atomic"] = _FP32_CONFIGS["dkdv"]
# Under the interpreter (CPU): small tiles, so that short test sequences run every masking path.
INTERPRETER_BLOCKS = {"fwd": (16, 16), "dkdv": (16, 16), "dkdv_atomic": (16, 16), "dq": (16, 16)}
# The forward reads K/V through tensor descriptors (TMA) on these architectures; INTERPRETER_TMA lets the tests
# run that path under the interpreter.
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
    """Shared-memory estimate in bytes of one launch config (row = D_PAD * element size). dkdv_atomic also stages
    dS^T and, on sm_90, K twice (the A operand of K Q^T and the B operand of dS K: within 1 KB at D=128)."""
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


def _tile_schedule(cu_seqlens: torch.Tensor | None, layout: TokenLayout, block: int, unused: torch.Tensor):
    """-> ((cu_seqlens, tile->document map, tile->block map), tiles to launch, blocks per sequence) for tiles of
    `block` rows; `unused` stands in for the pointers a batched launch does not read.

    Batched: tile t is block t % blocks of row t // blocks. Packed: tile t of the concatenated per-document tile
    lists, built with device ops only (no host sync); the launch uses the bound cdiv(T, block) + documents (each
    document wastes less than one tile), and tiles past the real count find a block past their document's end
    and exit."""
    if not layout.packed:
        blocks = triton.cdiv(layout.seq, block)
        return (unused, unused, unused), layout.batch * blocks, blocks
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    tiles = (lengths + block - 1) // block
    ends = torch.cumsum(tiles, 0)
    n_tiles = triton.cdiv(layout.seq, block) + lengths.numel()
    ids = torch.arange(n_tiles, device=cu_seqlens.device)
    doc = torch.searchsorted(ends, ids, right=True).clamp_(max=lengths.numel() - 1)
    block_index = ids - (ends[doc] - tiles[doc])
    return (cu_seqlens, doc.int(), block_index.int()), n_tiles, 0


def _strides(t: torch.Tensor, packed: bool) -> tuple[int, int, int]:
    """(batch, token, head) strides of a [B, S, H, D] or packed [T, H, D] tensor (batch stride 0 when packed)."""
    return (0, t.stride(0), t.stride(1)) if packed else (t.stride(0), t.stride(1), t.stride(2))


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    # The kernels address the head dim as contiguous; only inputs that are not (rare) pay for a copy.
    return t if t.stride(-1) == 1 or t.numel() == 0 else t.contiguous()


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
        pointers, n_tiles, blocks_per_seq = _tile_schedule(cu_seqlens, layout, block_m, lse)
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
    """deterministic: the two-kernel split; otherwise the single pass with dQ atomics (docs/kernels.md)."""
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
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
        pointers, n_tiles, blocks_per_seq = _tile_schedule(cu_seqlens, layout, block_n, lse)
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
        pointers, n_tiles, blocks_per_seq = _tile_schedule(cu_seqlens, layout, block_m, lse)
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


def flash_attention_triton(q, k, v, *, cu_seqlens=None, max_seqlen=None, causal=True, softmax_scale=None,
                           deterministic=None, autotune=None):
    """The `triton` attention core (contract and checks: attention_core.py) for D <= 256 and fp16/bf16/fp32 (output
    in that dtype); differentiable in q, k, v. autotune: None reads MEGASYNTH_AUTOTUNE (default off).
    deterministic (the backward, decided when the forward runs): None follows
    torch.are_deterministic_algorithms_enabled(); False runs the single pass with dQ atomics (not bit-reproducible
    on a GPU), True the two-kernel split (bit-reproducible; both modes: docs/kernels.md)."""
    layout, scale = check_inputs(q, k, v, cu_seqlens, max_seqlen, softmax_scale)
    layout.check_triton_limits(_NAME, q.dtype)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    elif not isinstance(deterministic, bool):
        raise ValueError(f"{_NAME}: deterministic must be True, False or None, got {deterministic!r}")  # noqa: TRY004
    autotune = bool(autotune) if autotune is not None else os.environ.get("MEGASYNTH_AUTOTUNE", "0") == "1"
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    return _FlashAttentionFunction.apply(q, k, v, cu_seqlens, layout, bool(causal), scale, autotune, deterministic)
