"""Backward kernels of the Triton flash-attention core: the single pass with dQ atomics, or the deterministic
split (design: docs/kernels.md)."""

from __future__ import annotations

import triton
import triton.language as tl

from ._flash_attn_fwd_triton import _key_ranges, _load_rows, _query_tile, _tile_coords


@triton.jit
def _flash_attn_bwd_delta_kernel(
    OUT, DOUT, DELTA, stride_ob, stride_os, stride_oh, stride_db, stride_ds, stride_dh, SEQ, N_TOKENS,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    head = tl.program_id(1)
    tok = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # flattened (batch, position) or packed
    row_mask = tok < N_TOKENS
    b = tok // SEQ
    s = tok % SEQ
    cols = tl.arange(0, D_PAD)
    mask = row_mask[:, None] & (cols < D)[None, :]
    o = tl.load(OUT + (b * stride_ob + s * stride_os + head * stride_oh)[:, None] + cols[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DOUT + (b * stride_db + s * stride_ds + head * stride_dh)[:, None] + cols[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + head.to(tl.int64) * N_TOKENS + tok, tl.sum(o * do, axis=1), mask=row_mask)


@triton.jit
def _flash_attn_bwd_dq_convert_kernel(
    DQ_ACC, DQ, stride_qb, stride_qs, stride_qh, SEQ, N_TOKENS, H_Q, sm_scale,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    """dQ = sm_scale * the fp32 [N_TOKENS, H_Q, D] accumulator of the single-pass backward, in dQ's dtype."""
    head = tl.program_id(1)
    tok = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    row_mask = tok < N_TOKENS
    b = tok // SEQ
    s = tok % SEQ
    cols = tl.arange(0, D_PAD)
    mask = row_mask[:, None] & (cols < D)[None, :]
    acc = tl.load(DQ_ACC + ((tok * H_Q + head) * D)[:, None] + cols[None, :], mask=mask, other=0.0)
    tl.store(DQ + (b * stride_qb + s * stride_qs + head * stride_qh)[:, None] + cols[None, :],
             (acc * sm_scale).to(DQ.dtype.element_ty), mask=mask)


@triton.jit
def _dkdv_inner(
    dk, dv, k, v, keys, Q_BASE, DO_BASE, LSE_BASE, DELTA_BASE, DQ_BASE, start, seq_len, stride_qs, stride_dos,
    stride_dqs, qk_scale, lo, hi, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, EVEN_D: tl.constexpr,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, ATOMIC_DQ: tl.constexpr,
):
    """Accumulate one q head's query tiles [lo, hi) into dK (without the softmax scale) and dV of one key tile;
    with ATOMIC_DQ also add each query tile's dS K (dQ without the scale) into the fp32 accumulator at DQ_BASE.
    MASK=False: query tiles whose rows are all inside the sequence and see every key of the tile."""
    dcols = tl.arange(0, D_PAD)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        qtok = (start + rows).to(tl.int64)
        q = _load_rows(Q_BASE + qtok[:, None] * stride_qs + dcols[None, :], rows, seq_len, dcols, D, MASK, EVEN_D)
        do = _load_rows(DO_BASE + qtok[:, None] * stride_dos + dcols[None, :], rows, seq_len, dcols, D, MASK,
                        EVEN_D)
        if MASK:
            lse = tl.load(LSE_BASE + rows, mask=rows < seq_len, other=0.0)
            delta = tl.load(DELTA_BASE + rows, mask=rows < seq_len, other=0.0)
        else:
            lse = tl.load(LSE_BASE + rows)
            delta = tl.load(DELTA_BASE + rows)
        # Transposed scores [BLOCK_N, BLOCK_M], so the accumulators keep the key tile's row layout.
        qk_t = tl.dot(k, tl.trans(q), input_precision="ieee")
        p_t = tl.exp2(qk_t * qk_scale - lse[None, :])
        # Keys past the sequence's end (the ragged last key tile) read k = 0, so p = exp2(-lse): it overflows to
        # inf when every score of a row is below -128 (base 2). dK/dV of those keys are never stored, but their
        # dS reaches dQ (inf * k = 0 * inf = NaN) in the single pass, which therefore masks them too.
        if MASK:
            valid = (rows < seq_len)[None, :]
            if CAUSAL:
                valid = valid & (rows[None, :] >= keys[:, None])
            if ATOMIC_DQ:
                valid = valid & (keys < seq_len)[:, None]
            p_t = tl.where(valid, p_t, 0.0)  # where, not multiply: exp2 of a masked score may overflow
        elif ATOMIC_DQ:
            p_t = tl.where((keys < seq_len)[:, None], p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision="ieee")
        dp_t = tl.dot(v, tl.trans(do), input_precision="ieee")
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
        dk = tl.dot(ds_t, q, dk, input_precision="ieee")
        if ATOMIC_DQ:
            # The 5th matmul: this key tile's share of dQ for these query rows. Relaxed atomics: only the sum
            # matters, and it is read by a later launch.
            dq = tl.dot(tl.trans(ds_t), k, input_precision="ieee")
            dq_ptrs = DQ_BASE + qtok[:, None] * stride_dqs + dcols[None, :]
            if MASK:
                tl.atomic_add(dq_ptrs, dq, mask=(rows < seq_len)[:, None] & (dcols < D)[None, :], sem="relaxed")
            elif EVEN_D:
                tl.atomic_add(dq_ptrs, dq, sem="relaxed")
            else:
                tl.atomic_add(dq_ptrs, dq, mask=(dcols < D)[None, :], sem="relaxed")
    return dk, dv


@triton.jit
def _flash_attn_bwd_dkdv_kernel(
    Q, K, V, DOUT, LSE, DELTA, DK, DV, DQ_ACC, CU_SEQLENS, TILE_DOC, TILE_BLOCK,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh, stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
    SEQ, BLOCKS_PER_SEQ, N_TOKENS, H_KV, GROUP, sm_scale, qk_scale,
    D: tl.constexpr, D_PAD: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr, ATOMIC_DQ: tl.constexpr,
):
    """dK, dV of one (key tile, kv head); with ATOMIC_DQ also the dQ shares (DQ_ACC: fp32 [N_TOKENS, H_Q, D],
    zeroed; unused otherwise)."""
    pid = tl.program_id(0)
    # kv heads fastest; tiles first-to-last, which under causal masking is most-work-first for key tiles.
    kv_head = pid % H_KV
    t = pid // H_KV
    batch, start, seq_len, block = _tile_coords(t, TILE_DOC, TILE_BLOCK, CU_SEQLENS, SEQ, BLOCKS_PER_SEQ, IS_VARLEN)
    if block * BLOCK_N >= seq_len:  # a padding tile of the packed schedule
        return
    b64 = batch.to(tl.int64)
    keys = block * BLOCK_N + tl.arange(0, BLOCK_N)
    ktok = (start + keys).to(tl.int64)
    dcols = tl.arange(0, D_PAD)
    kv_mask = (keys < seq_len)[:, None] & (dcols < D)[None, :]
    k = tl.load(K + b64 * stride_kb + kv_head * stride_kh + ktok[:, None] * stride_ks + dcols[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(V + b64 * stride_vb + kv_head * stride_vh + ktok[:, None] * stride_vs + dcols[None, :],
                mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)

    # Query rows below the key tile's first key see none of it (causal): start at the query tile holding that
    # key. Query tiles reaching into [n0, n0 + BLOCK_N) are masked (the diagonal); from mid_lo on every row sees
    # every key, up to the last whole query tile; the ragged last query tile is masked again.
    n0 = block * BLOCK_N
    if CAUSAL:
        diag_lo = (n0 // BLOCK_M) * BLOCK_M
        mid_lo = tl.cdiv(n0 + BLOCK_N, BLOCK_M) * BLOCK_M
    else:
        diag_lo = 0
        mid_lo = 0
    full_rows = (seq_len // BLOCK_M) * BLOCK_M
    for g in range(GROUP):
        head = kv_head * GROUP + g
        q_base = Q + b64 * stride_qb + head * stride_qh
        do_base = DOUT + b64 * stride_dob + head * stride_doh
        row_base = head.to(tl.int64) * N_TOKENS + b64 * SEQ + start  # into the [H_Q, N_TOKENS] lse / delta
        # This batch row's q head in the [N_TOKENS, H_Q, D] accumulator (token stride H_Q * D).
        dq_base = DQ_ACC + (b64 * SEQ * (GROUP * H_KV) + head) * D
        if CAUSAL:
            dk, dv = _dkdv_inner(
                dk, dv, k, v, keys, q_base, do_base, LSE + row_base, DELTA + row_base, dq_base, start, seq_len,
                stride_qs, stride_dos, GROUP * H_KV * D, qk_scale, diag_lo, tl.minimum(mid_lo, seq_len),
                D, D_PAD, BLOCK_M, EVEN_D, True, CAUSAL, ATOMIC_DQ,
            )
        dk, dv = _dkdv_inner(
            dk, dv, k, v, keys, q_base, do_base, LSE + row_base, DELTA + row_base, dq_base, start, seq_len,
            stride_qs, stride_dos, GROUP * H_KV * D, qk_scale, mid_lo, full_rows, D, D_PAD, BLOCK_M, EVEN_D,
            False, CAUSAL, ATOMIC_DQ,
        )
        dk, dv = _dkdv_inner(
            dk, dv, k, v, keys, q_base, do_base, LSE + row_base, DELTA + row_base, dq_base, start, seq_len,
            stride_qs, stride_dos, GROUP * H_KV * D, qk_scale, tl.maximum(mid_lo, full_rows), seq_len,
            D, D_PAD, BLOCK_M, EVEN_D, True, CAUSAL, ATOMIC_DQ,
        )

    dk_ptrs = DK + b64 * stride_dkb + kv_head * stride_dkh + ktok[:, None] * stride_dks + dcols[None, :]
    tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    dv_ptrs = DV + b64 * stride_dvb + kv_head * stride_dvh + ktok[:, None] * stride_dvs + dcols[None, :]
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_inner(
    dq, q, do, lse, delta, rows, K_BASE, V_BASE, start, seq_len, stride_ks, stride_vs, qk_scale, lo, hi,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr,
    MASK: tl.constexpr, CAUSAL: tl.constexpr,
):
    """Accumulate dS K (dQ without the softmax scale) of one query tile over the key tiles [lo, hi)."""
    dcols = tl.arange(0, D_PAD)
    for start_n in range(lo, hi, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        ktok = (start + keys).to(tl.int64)
        k = _load_rows(K_BASE + ktok[:, None] * stride_ks + dcols[None, :], keys, seq_len, dcols, D, MASK, EVEN_D)
        v = _load_rows(V_BASE + ktok[:, None] * stride_vs + dcols[None, :], keys, seq_len, dcols, D, MASK, EVEN_D)
        qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        p = tl.exp2(qk * qk_scale - lse[:, None])
        if MASK:
            valid = (keys < seq_len)[None, :]
            if CAUSAL:
                valid = valid & (rows[:, None] >= keys[None, :])
            p = tl.where(valid, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision="ieee")
    return dq


@triton.jit
def _flash_attn_bwd_dq_kernel(
    Q, K, V, DOUT, LSE, DELTA, DQ, CU_SEQLENS, TILE_DOC, TILE_BLOCK,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh, stride_dqb, stride_dqs, stride_dqh,
    SEQ, BLOCKS_PER_SEQ, N_TILES, N_TOKENS, H_Q, GROUP, sm_scale, qk_scale,
    D: tl.constexpr, D_PAD: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    head, batch, start, seq_len, block = _query_tile(tl.program_id(0), H_Q, N_TILES, TILE_DOC, TILE_BLOCK, CU_SEQLENS,
                                                     SEQ, BLOCKS_PER_SEQ, IS_VARLEN)
    if block * BLOCK_M >= seq_len:
        return
    kv_head = head // GROUP  # inline as in the forward (see there)
    b64 = batch.to(tl.int64)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < seq_len
    tok = (start + rows).to(tl.int64)
    dcols = tl.arange(0, D_PAD)
    mask = row_mask[:, None] & (dcols < D)[None, :]
    q = tl.load(Q + b64 * stride_qb + head * stride_qh + tok[:, None] * stride_qs + dcols[None, :],
                mask=mask, other=0.0)
    do = tl.load(DOUT + b64 * stride_dob + head * stride_doh + tok[:, None] * stride_dos + dcols[None, :],
                 mask=mask, other=0.0)
    row_base = head.to(tl.int64) * N_TOKENS + b64 * SEQ + start
    # Padded rows read lse = delta = 0 with q = dO = 0: p = 1 and dS = 0 there, finite and never stored.
    lse = tl.load(LSE + row_base + rows, mask=row_mask, other=0.0)
    delta = tl.load(DELTA + row_base + rows, mask=row_mask, other=0.0)

    k_base = K + b64 * stride_kb + kv_head * stride_kh
    v_base = V + b64 * stride_vb + kv_head * stride_vh
    dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    full_hi, hi = _key_ranges(block, seq_len, BLOCK_M, BLOCK_N, CAUSAL)  # key-tile ranges exactly as in the forward
    dq = _dq_inner(dq, q, do, lse, delta, rows, k_base, v_base, start, seq_len, stride_ks, stride_vs, qk_scale,
                   0, full_hi, D, D_PAD, BLOCK_N, EVEN_D, False, CAUSAL)
    dq = _dq_inner(dq, q, do, lse, delta, rows, k_base, v_base, start, seq_len, stride_ks, stride_vs, qk_scale,
                   full_hi, hi, D, D_PAD, BLOCK_N, EVEN_D, True, CAUSAL)

    dq_ptrs = DQ + b64 * stride_dqb + head * stride_dqh + tok[:, None] * stride_dqs + dcols[None, :]
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=mask)
