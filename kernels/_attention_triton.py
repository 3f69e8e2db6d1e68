"""Fused QK-norm + RoPE flash attention in Triton: `qknorm_rope_attention_triton`, forward and backward.

Same contract as `qknorm_rope_attention_ref` in attention.py (see there for the shapes): q and k are
RMS-normalised over head_dim, scaled by their norm weights and rotated inside the attention kernels, so the
normalised, rotated q and k never go through memory. Gradients flow to q, k, v and both norm weights; cos/sin
are treated as constants. This file is the host side: input checks, the tile schedule, launch configurations
and the autograd.Function. The kernels are in _attention_fwd_triton.py and _attention_bwd_triton.py.

One kernel family serves both layouts. Every tile is a (sequence, block of BLOCK rows) pair: batched inputs
[B, S, H, D] are B sequences of S tokens addressed through their batch stride; packed inputs [T, H, D] are one
row whose documents come from cu_seqlens, through a tile -> (document, block) map built on the device, sized by an
upper bound known on the host, so nothing waits on the GPU. max_seqlen is therefore not needed (accepted for the
flash-attention calling convention). Saved for the backward: q, k, v, out and an fp32 logsumexp per (row, head).

Runs on CUDA, or on the CPU under TRITON_INTERPRET=1 (how the tests run it):
    TRITON_INTERPRET=1 pytest tests/kernels/test_attention.py -q
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton

from ._attention_bwd_triton import _attn_bwd_delta_kernel, _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel
from ._attention_fwd_triton import _attn_fwd_kernel

_NAME = "qknorm_rope_attention"
MAX_HEAD_DIM = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, keyed by the padded head dim of 16-bit inputs (fp32 inputs
# use the row of twice their head dim: their tiles take twice the registers and shared memory). BLOCK_M counts
# query rows and BLOCK_N key rows in every kernel. Chosen for the H100 after the shapes that FlashAttention-2
# Triton ports use, and NOT yet tuned on hardware: bench/attention.py is the tool to revisit them.
#   fwd:  a large query tile amortises the q preparation and feeds the tensor cores; 8 warps at D=128 keep the
#         [128, 128] fp32 accumulator at 64 registers per thread.
#   dkdv: the key tile owns fp32 dK and dV accumulators ([BLOCK_N, D] each), so it is the large side; queries
#         stream through in small steps.
#   dq:   the mirror image: a large query tile owns dQ, keys stream through.
_GPU_CONFIGS = {
    "fwd": {32: (128, 64, 4, 3), 64: (128, 64, 4, 3), 128: (128, 64, 8, 3), 256: (64, 32, 4, 2), 512: (32, 16, 4, 1)},
    "dkdv": {32: (32, 128, 4, 3), 64: (32, 128, 4, 3), 128: (32, 64, 4, 2), 256: (16, 32, 4, 1), 512: (16, 16, 4, 1)},
    "dq": {32: (128, 32, 4, 3), 64: (128, 32, 4, 3), 128: (128, 32, 8, 2), 256: (64, 16, 4, 1), 512: (16, 16, 4, 1)},
}
# Under the interpreter (CPU) small tiles, so test sequences of tens of tokens span several tiles and every
# masking path runs. Tests may replace these (BLOCK_M, BLOCK_N) pairs to exercise unequal tiles.
INTERPRETER_BLOCKS = {"fwd": (16, 16), "dkdv": (16, 16), "dq": (16, 16)}
_DELTA_BLOCK = {True: 64, False: 16}  # tokens per delta program on CUDA / in the interpreter


@dataclass(frozen=True)
class _Layout:
    packed: bool
    batch: int  # B, or 1 for the packed layout
    seq: int  # tokens per batch row: S, or T for the packed layout
    heads_q: int
    heads_kv: int
    head_dim: int

    @property
    def n_tokens(self) -> int:
        return self.batch * self.seq

    @property
    def half_pad(self) -> int:
        return max(16, triton.next_power_of_2(self.head_dim // 2))


def _config(kernel: str, layout: _Layout, dtype: torch.dtype, device: torch.device) -> tuple[int, int, int, int]:
    if device.type == "cuda":
        key = max(32, 2 * layout.half_pad * (2 if dtype == torch.float32 else 1))
        block_m, block_n, warps, stages = _GPU_CONFIGS[kernel][min(key, 512)]
    else:
        (block_m, block_n), warps, stages = INTERPRETER_BLOCKS[kernel], 4, 1
    # The masking split (unmasked tiles, then the diagonal) needs the big tile to be a whole number of small ones.
    big, small = (block_n, block_m) if kernel == "dkdv" else (block_m, block_n)
    if big % small or min(block_m, block_n) < 16:
        raise ValueError(f"{_NAME}: {kernel} tiles {block_m}x{block_n}: need both >= 16 and {big} % {small} == 0")
    return block_m, block_n, warps, stages


def _tile_schedule(cu_seqlens: torch.Tensor | None, layout: _Layout, block: int):
    """-> (tile->document map, tile->block map, tiles to launch, blocks per sequence) for tiles of `block` rows.

    Batched: tile t is block t % blocks of row t // blocks; the maps are unused. Packed: tile t of the
    concatenated per-document tile lists; the launch uses the bound cdiv(T, block) + documents (each document
    wastes less than one tile), and tiles past the real count find a block past their document's end and exit.
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


def _seq_strides(t: torch.Tensor, packed: bool) -> tuple[int, int, int]:
    """(batch, token, head) strides of a [B, S, H, D] or packed [T, H, D] tensor (batch stride 0 when packed)."""
    return (0, t.stride(0), t.stride(1)) if packed else (t.stride(0), t.stride(1), t.stride(2))


def _rope_strides(cos: torch.Tensor) -> tuple[int, int]:
    """(batch, token) strides of cos/sin: [S|T, D/2] is shared by every batch row, [B, S, D/2] is per row."""
    return (0, cos.stride(0)) if cos.dim() == 2 else (cos.stride(0), cos.stride(1))


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    # The kernels address the head dim as contiguous; only inputs that are not (rare) pay for a copy.
    return t if t.stride(-1) == 1 or t.numel() == 0 else t.contiguous()


def _forward(q, k, v, q_w, k_w, cos, sin, cu_seqlens, layout: _Layout, causal: bool, eps: float, scale: float):
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((layout.heads_q, layout.n_tokens), dtype=torch.float32, device=q.device)
    if layout.n_tokens == 0:
        return out, lse
    block_m, block_n, warps, stages = _config("fwd", layout, q.dtype, q.device)
    doc_map, block_map, n_tiles, blocks_per_seq = _tile_schedule(cu_seqlens, layout, block_m)
    unused = lse  # placeholder for the packed-only pointers in the batched layout (never dereferenced)
    _attn_fwd_kernel[(n_tiles * layout.heads_q,)](
        q, k, v, q_w, k_w, cos, sin, out, lse,
        unused if cu_seqlens is None else cu_seqlens, unused if doc_map is None else doc_map,
        unused if block_map is None else block_map,
        *_seq_strides(q, layout.packed), *_seq_strides(k, layout.packed), *_seq_strides(v, layout.packed),
        *_seq_strides(out, layout.packed), *_rope_strides(cos),
        layout.seq, blocks_per_seq, n_tiles, layout.n_tokens, layout.heads_q, layout.heads_q // layout.heads_kv,
        scale, eps,
        HALF=layout.head_dim // 2, HALF_PAD=layout.half_pad, BLOCK_M=block_m, BLOCK_N=block_n,
        CAUSAL=causal, IS_VARLEN=layout.packed, num_warps=warps, num_stages=stages,
    )
    return out, lse


def _backward(dout, q, k, v, q_w, k_w, cos, sin, out, lse, cu_seqlens, layout: _Layout, causal, eps, scale):
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if layout.n_tokens == 0:
        zeros = (torch.zeros(layout.head_dim, dtype=torch.float32, device=q.device),) * 2
        return dq, dk, dv, *zeros
    packed, half, half_pad = layout.packed, layout.head_dim // 2, layout.half_pad
    group = layout.heads_q // layout.heads_kv
    const = dict(HALF=half, HALF_PAD=half_pad, CAUSAL=causal, IS_VARLEN=packed)
    unused = lse

    delta = torch.empty_like(lse)
    delta_block = _DELTA_BLOCK[q.is_cuda]
    _attn_bwd_delta_kernel[(triton.cdiv(layout.n_tokens, delta_block), layout.heads_q)](
        out, dout, delta, *_seq_strides(out, packed), *_seq_strides(dout, packed), layout.seq, layout.n_tokens,
        D=layout.head_dim, D_PAD=2 * half_pad, BLOCK=delta_block,
    )

    block_m, block_n, warps, stages = _config("dkdv", layout, q.dtype, q.device)
    doc_map, block_map, n_tiles, blocks_per_seq = _tile_schedule(cu_seqlens, layout, block_n)
    programs = n_tiles * layout.heads_kv
    # Zero-filled: padding tiles of the packed schedule exit without writing their row.
    dkw_partial = torch.zeros((programs, layout.head_dim), dtype=torch.float32, device=q.device)
    _attn_bwd_dkdv_kernel[(programs,)](
        q, k, v, q_w, k_w, cos, sin, dout, lse, delta, dk, dv, dkw_partial,
        unused if cu_seqlens is None else cu_seqlens, unused if doc_map is None else doc_map,
        unused if block_map is None else block_map,
        *_seq_strides(q, packed), *_seq_strides(k, packed), *_seq_strides(v, packed), *_seq_strides(dout, packed),
        *_seq_strides(dk, packed), *_seq_strides(dv, packed), *_rope_strides(cos),
        layout.seq, blocks_per_seq, layout.n_tokens, layout.heads_kv, group, scale, eps,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **const,
    )

    block_m, block_n, warps, stages = _config("dq", layout, q.dtype, q.device)
    doc_map, block_map, n_tiles, blocks_per_seq = _tile_schedule(cu_seqlens, layout, block_m)
    programs = n_tiles * layout.heads_q
    dqw_partial = torch.zeros((programs, layout.head_dim), dtype=torch.float32, device=q.device)
    _attn_bwd_dq_kernel[(programs,)](
        q, k, v, q_w, k_w, cos, sin, dout, lse, delta, dq, dqw_partial,
        unused if cu_seqlens is None else cu_seqlens, unused if doc_map is None else doc_map,
        unused if block_map is None else block_map,
        *_seq_strides(q, packed), *_seq_strides(k, packed), *_seq_strides(v, packed), *_seq_strides(dout, packed),
        *_seq_strides(dq, packed), *_rope_strides(cos),
        layout.seq, blocks_per_seq, n_tiles, layout.n_tokens, layout.heads_q, group, scale, eps,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **const,
    )
    return dq, dk, dv, dqw_partial.sum(dim=0), dkw_partial.sum(dim=0)


class _QKNormRopeAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, q_w, k_w, cos, sin, cu_seqlens, layout, causal, eps, scale):
        out, lse = _forward(q, k, v, q_w, k_w, cos, sin, cu_seqlens, layout, causal, eps, scale)
        ctx.save_for_backward(q, k, v, q_w, k_w, cos, sin, out, lse, cu_seqlens)
        ctx.args = (layout, causal, eps, scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, q_w, k_w, cos, sin, out, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv, dqw, dkw = _backward(
            _unit_last_stride(dout), q, k, v, q_w, k_w, cos, sin, out, lse, cu_seqlens, *ctx.args
        )
        return dq, dk, dv, dqw.to(q_w.dtype), dkw.to(k_w.dtype), None, None, None, None, None, None, None


def _check_cu_seqlens(cu_seqlens, n_tokens: int, device: torch.device) -> None:
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
        got = f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}" if isinstance(cu_seqlens, torch.Tensor) else cu_seqlens
        raise ValueError(f"{_NAME}: cu_seqlens must be a 1-D int32 tensor [documents + 1], got {got}")
    if cu_seqlens.numel() < 2:
        raise ValueError(f"{_NAME}: cu_seqlens needs at least 2 entries (0 and the token count), "
                         f"got {cu_seqlens.numel()}")
    if cu_seqlens.device != device:
        raise ValueError(f"{_NAME}: cu_seqlens on {cu_seqlens.device} but q on {device}")
    ok = (cu_seqlens[0] == 0) & (cu_seqlens[-1] == n_tokens) & (cu_seqlens[1:] >= cu_seqlens[:-1]).all()
    message = f"{_NAME}: cu_seqlens must start at 0, never decrease and end at the token count {n_tokens}"
    if cu_seqlens.is_cuda:
        # Reading the values on the host would stall the CPU on every layer; a device-side assert costs nothing
        # when the offsets are valid and stops the run (instead of reading out of bounds) when they are not.
        torch._assert_async(ok, message)
    elif not bool(ok):
        shown = cu_seqlens[:8].tolist()
        raise ValueError(f"{message}; got {shown}{' ...' if cu_seqlens.numel() > 8 else ''}")


def _check_inputs(q, k, v, q_w, k_w, cos, sin, cu_seqlens, max_seqlen) -> _Layout:
    packed = cu_seqlens is not None
    form = "packed [T, H, D]" if packed else "batched [B, S, H, D]"
    rank = 3 if packed else 4
    for name, t in (("q", q), ("k", k), ("v", v), ("q_norm_weight", q_w), ("k_norm_weight", k_w),
                    ("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{_NAME}: {name} must be a tensor, got {type(t).__name__}")
        if t.device != q.device:
            raise ValueError(f"{_NAME}: {name} on {t.device} but q on {q.device}")
        if not t.is_floating_point():
            raise ValueError(f"{_NAME}: {name} must be floating point, got {t.dtype}")
    for name, t in (("q", q), ("k", k), ("v", v)):
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
    if head_dim % 2 or not 2 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"{_NAME}: head_dim {head_dim}: the Triton kernel needs an even head_dim <= {MAX_HEAD_DIM}")
    for name, w in (("q_norm_weight", q_w), ("k_norm_weight", k_w)):
        if w.shape != (head_dim,):
            raise ValueError(f"{_NAME}: {name} has shape {tuple(w.shape)}, expected ({head_dim},) = head_dim")
    tokens = tuple(q.shape[:-2])
    allowed = [tokens + (head_dim // 2,)] if packed else [tokens[1:] + (head_dim // 2,), tokens + (head_dim // 2,)]
    for name, t in (("cos", cos), ("sin", sin)):
        if tuple(t.shape) not in allowed:
            raise ValueError(f"{_NAME}: {name} has shape {tuple(t.shape)}, expected "
                             f"{' or '.join(str(list(a)) for a in allowed)} for {form} q {tuple(q.shape)}")
        if t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{_NAME}: {name} requires grad, but the fused kernel treats the RoPE tables as "
                             "constants; detach them or use qknorm_rope_attention_ref")
    if packed:
        _check_cu_seqlens(cu_seqlens, q.shape[0], q.device)
    if max_seqlen is not None and (isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0):
        raise ValueError(f"{_NAME}: max_seqlen must be a non-negative int or None, got {max_seqlen!r}")
    if packed:
        return _Layout(True, 1, q.shape[0], heads_q, heads_kv, head_dim)
    return _Layout(False, q.shape[0], q.shape[1], heads_q, heads_kv, head_dim)


def qknorm_rope_attention_triton(
    q, k, v, q_norm_weight, k_norm_weight, cos, sin, *,
    cu_seqlens=None, max_seqlen=None, causal=True, eps=1e-6, softmax_scale=None,
):
    """Attention over rope(rms_norm(q) * q_norm_weight) and rope(rms_norm(k) * k_norm_weight), fused.

    Batched: q [B, S, Hq, D], k/v [B, S, Hkv, D], cos/sin [S, D/2] or [B, S, D/2] -> [B, S, Hq, D].
    Packed: q [T, Hq, D], k/v [T, Hkv, D], cos/sin [T, D/2], cu_seqlens int32 [N+1] -> [T, Hq, D]; attention
    stays inside each document. Hq % Hkv == 0, even D <= 256, dtype fp16/bf16/fp32 (output in that dtype).
    """
    layout = _check_inputs(q, k, v, q_norm_weight, k_norm_weight, cos, sin, cu_seqlens, max_seqlen)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(layout.head_dim)
    if not math.isfinite(scale) or not math.isfinite(float(eps)) or float(eps) < 0:
        raise ValueError(f"{_NAME}: softmax_scale {softmax_scale!r} and eps {eps!r} must be finite, eps >= 0")
    q, k, v, cos, sin = (_unit_last_stride(t) for t in (q, k, v, cos, sin))
    if cos.stride() != sin.stride():  # the kernels address both tables with one set of strides
        cos, sin = cos.contiguous(), sin.contiguous()
    return _QKNormRopeAttentionFunction.apply(
        q, k, v, q_norm_weight, k_norm_weight, cos, sin, cu_seqlens, layout, bool(causal), float(eps), scale
    )
