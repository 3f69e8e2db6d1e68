"""Backward kernels of the fused QK-norm + RoPE flash attention (FlashAttention-2 style, Dao 2023).

Three launches:
  _attn_bwd_delta_kernel  delta = rowsum(dO * O) per (token, q head), fp32 [H_Q, N_TOKENS];
  _attn_bwd_dkdv_kernel   one program per (key tile, kv head): computes k_hat for its tile once, loops over the
                          q heads of its GQA group and over their query tiles (recomputing each q_hat on the fly),
                          accumulates dK_hat and dV in fp32, then chains dK_hat back through RoPE and the k RMSNorm;
  _attn_bwd_dq_kernel     one program per (query tile, q head): accumulates dQ_hat over the key tiles
                          (recomputing k_hat on the fly), then chains it back through RoPE and the q RMSNorm.
The probabilities are recomputed from the forward's base-2 logsumexp: p = exp2(q_s . k_hat - lse), where
q_s = q_hat * softmax_scale * log2(e). The norm-weight gradients sum dN * x_unweighted over every row and head:
each program writes its fp32 partial sum to one row of a [programs, D] buffer, which the host folds with
torch.sum, so the result does not depend on scheduling (no atomics).

Host side: _attention_triton.py. Tests: pytest tests/kernels/test_attention.py -q
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._attention_fwd_triton import _load_rms_rope, _load_weight_halves, _tile_coords


@triton.jit
def _rms_rope_bwd(G1, G2, X_PTRS, COS_PTRS, SIN_PTRS, mask, w1, w2, eps, HALF: tl.constexpr):
    """Given g = dL/d rope(rms_norm(x) * w) on the halves (fp32) of the tile at X_PTRS, return dx halves and the
    weight-gradient sums over the tile's rows. The raw tile and its cos/sin are re-read here (L2 hits) rather
    than kept live in registers across the main loop."""
    x1 = tl.load(X_PTRS, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X_PTRS + HALF, mask=mask, other=0.0).to(tl.float32)
    cos = tl.load(COS_PTRS, mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(SIN_PTRS, mask=mask, other=0.0).to(tl.float32)
    # RoPE rotates each (x1_i, x2_i) pair by +angle; the transpose of a rotation rotates by -angle.
    dn1 = G1 * cos + G2 * sin
    dn2 = G2 * cos - G1 * sin
    rstd = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF) + eps)
    xu1 = x1 * rstd[:, None]  # the normalised, unweighted rows
    xu2 = x2 * rstd[:, None]
    gw1 = dn1 * w1[None, :]
    gw2 = dn2 * w2[None, :]
    # RMSNorm backward per row: dx = rstd * (w*g - xu * mean(w*g*xu)).
    mean = (tl.sum(gw1 * xu1, axis=1) + tl.sum(gw2 * xu2, axis=1)) / (2 * HALF)
    dx1 = rstd[:, None] * (gw1 - xu1 * mean[:, None])
    dx2 = rstd[:, None] * (gw2 - xu2 * mean[:, None])
    # Padded rows of a tile may carry large (even inf) gradients that are never stored; keep them out of the sums.
    dw1 = tl.sum(tl.where(mask, dn1 * xu1, 0.0), axis=0)
    dw2 = tl.sum(tl.where(mask, dn2 * xu2, 0.0), axis=0)
    return dx1, dx2, dw1, dw2


@triton.jit
def _attn_bwd_delta_kernel(
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
def _attn_bwd_dkdv_inner(
    dk1, dk2, dv, kr1, kr2, v, keys, Q_BASE, DO_BASE, LSE_BASE, DELTA_BASE, COS_BASE, SIN_BASE, qw1, qw2,
    start, seq_len, stride_qs, stride_dos, stride_cs, qk_scale, eps, lo, hi,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_M: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr,
):
    """Accumulate one q head's query tiles [lo, hi) into dK_hat (times 1/ln 2) and dV of one key tile.
    MASK=False: tiles whose rows are all inside the sequence and see every key of the tile."""
    cols = tl.arange(0, HALF_PAD)
    dcols = tl.arange(0, 2 * HALF_PAD)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        row_mask = rows < seq_len
        qtok = (start + rows).to(tl.int64)
        # q_hat recomputed per (key tile, query tile), as the forward does for k_hat: ~10 * BLOCK_M * D fp32 ops
        # next to the iteration's five dots (10 * BLOCK_M * BLOCK_N * D FLOPs), and no q_hat tensor is kept
        # between forward and backward or written by a pre-pass.
        rope_off = qtok[:, None] * stride_cs + cols[None, :]
        qr1, qr2 = _load_rms_rope(Q_BASE + qtok[:, None] * stride_qs + cols[None, :], COS_BASE + rope_off,
                                  SIN_BASE + rope_off, row_mask[:, None] & (cols < HALF)[None, :],
                                  qw1, qw2, eps, HALF)
        qs1 = (qr1 * qk_scale).to(kr1.dtype)
        qs2 = (qr2 * qk_scale).to(kr2.dtype)
        # Transposed scores [BLOCK_N, BLOCK_M] in base 2, so the accumulators keep the key tile's row layout.
        qk_t = tl.dot(kr1, tl.trans(qs1), input_precision="ieee")
        qk_t = tl.dot(kr2, tl.trans(qs2), qk_t, input_precision="ieee")
        lse = tl.load(LSE_BASE + rows, mask=row_mask, other=0.0)
        p_t = tl.exp2(qk_t - lse[None, :])
        if MASK:
            valid = row_mask[None, :]
            if CAUSAL:
                valid = valid & (rows[None, :] >= keys[:, None])
            p_t = tl.where(valid, p_t, 0.0)  # where, not multiply: exp2 of a masked score may overflow
        do = tl.load(DO_BASE + qtok[:, None] * stride_dos + dcols[None, :],
                     mask=row_mask[:, None] & (dcols < 2 * HALF)[None, :], other=0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision="ieee")
        delta = tl.load(DELTA_BASE + rows, mask=row_mask, other=0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision="ieee")
        ds_t = p_t * (dp_t - delta[None, :])
        dk1 = tl.dot(ds_t.to(qs1.dtype), qs1, dk1, input_precision="ieee")
        dk2 = tl.dot(ds_t.to(qs2.dtype), qs2, dk2, input_precision="ieee")
    return dk1, dk2, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, Q_W, K_W, COS, SIN, DOUT, LSE, DELTA, DK, DV, DKW_PARTIAL, CU_SEQLENS, TILE_DOC, TILE_BLOCK,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh, stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
    stride_cb, stride_cs,
    SEQ, BLOCKS_PER_SEQ, N_TOKENS, H_KV, GROUP, sm_scale, eps,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    pid = tl.program_id(0)
    # kv heads fastest; tiles first-to-last, which under causal masking is most-work-first for key tiles.
    kv_head = pid % H_KV
    t = pid // H_KV
    batch, start, seq_len, block = _tile_coords(t, TILE_DOC, TILE_BLOCK, CU_SEQLENS, SEQ, BLOCKS_PER_SEQ, IS_VARLEN)
    if block * BLOCK_N >= seq_len:
        return
    b64 = batch.to(tl.int64)
    keys = block * BLOCK_N + tl.arange(0, BLOCK_N)
    key_mask = keys < seq_len
    ktok = (start + keys).to(tl.int64)
    cols = tl.arange(0, HALF_PAD)
    dcols = tl.arange(0, 2 * HALF_PAD)
    half_mask = key_mask[:, None] & (cols < HALF)[None, :]

    k_ptrs = K + b64 * stride_kb + kv_head * stride_kh + ktok[:, None] * stride_ks + cols[None, :]
    cos_base = COS + b64 * stride_cb
    sin_base = SIN + b64 * stride_cb
    rope_off = ktok[:, None] * stride_cs + cols[None, :]
    kw1, kw2 = _load_weight_halves(K_W, cols, HALF)
    kr1, kr2 = _load_rms_rope(k_ptrs, cos_base + rope_off, sin_base + rope_off, half_mask, kw1, kw2, eps, HALF)
    kr1 = kr1.to(K.dtype.element_ty)
    kr2 = kr2.to(K.dtype.element_ty)
    v = tl.load(V + b64 * stride_vb + kv_head * stride_vh + ktok[:, None] * stride_vs + dcols[None, :],
                mask=key_mask[:, None] & (dcols < 2 * HALF)[None, :], other=0.0)
    qw1, qw2 = _load_weight_halves(Q_W, cols, HALF)
    qk_scale = sm_scale * 1.4426950408889634

    dk1 = tl.zeros([BLOCK_N, HALF_PAD], dtype=tl.float32)
    dk2 = tl.zeros([BLOCK_N, HALF_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, 2 * HALF_PAD], dtype=tl.float32)
    n0 = block * BLOCK_N
    full_rows = (seq_len // BLOCK_M) * BLOCK_M
    for g in range(0, GROUP):
        head = kv_head * GROUP + g
        q_base = Q + b64 * stride_qb + head * stride_qh
        do_base = DOUT + b64 * stride_dob + head * stride_doh
        row_base = head.to(tl.int64) * N_TOKENS + b64 * SEQ + start  # into the [H_Q, N_TOKENS] lse / delta
        # Query tiles: the causal diagonal [n0, n0 + BLOCK_N) masked (BLOCK_N is a multiple of BLOCK_M), then the
        # tiles fully inside the sequence unmasked, then the ragged last tile masked.
        if CAUSAL:
            dk1, dk2, dv = _attn_bwd_dkdv_inner(
                dk1, dk2, dv, kr1, kr2, v, keys, q_base, do_base, LSE + row_base, DELTA + row_base,
                cos_base, sin_base, qw1, qw2, start, seq_len, stride_qs, stride_dos, stride_cs, qk_scale, eps,
                n0, tl.minimum(n0 + BLOCK_N, seq_len), HALF, HALF_PAD, BLOCK_M, True, CAUSAL,
            )
            mid_lo = n0 + BLOCK_N
        else:
            mid_lo = 0
        dk1, dk2, dv = _attn_bwd_dkdv_inner(
            dk1, dk2, dv, kr1, kr2, v, keys, q_base, do_base, LSE + row_base, DELTA + row_base,
            cos_base, sin_base, qw1, qw2, start, seq_len, stride_qs, stride_dos, stride_cs, qk_scale, eps,
            mid_lo, full_rows, HALF, HALF_PAD, BLOCK_M, False, CAUSAL,
        )
        dk1, dk2, dv = _attn_bwd_dkdv_inner(
            dk1, dk2, dv, kr1, kr2, v, keys, q_base, do_base, LSE + row_base, DELTA + row_base,
            cos_base, sin_base, qw1, qw2, start, seq_len, stride_qs, stride_dos, stride_cs, qk_scale, eps,
            tl.maximum(mid_lo, full_rows), seq_len, HALF, HALF_PAD, BLOCK_M, True, CAUSAL,
        )

    # dk was accumulated against q_s = q_hat * scale * log2(e), and d loss / d k_hat = scale * dS^T q_hat.
    ln2 = 0.6931471805599453
    dk1, dk2, dw1, dw2 = _rms_rope_bwd(dk1 * ln2, dk2 * ln2, k_ptrs, cos_base + rope_off, sin_base + rope_off,
                                       half_mask, kw1, kw2, eps, HALF)
    dk_ptrs = DK + b64 * stride_dkb + kv_head * stride_dkh + ktok[:, None] * stride_dks + cols[None, :]
    tl.store(dk_ptrs, dk1.to(DK.dtype.element_ty), mask=half_mask)
    tl.store(dk_ptrs + HALF, dk2.to(DK.dtype.element_ty), mask=half_mask)
    dv_ptrs = DV + b64 * stride_dvb + kv_head * stride_dvh + ktok[:, None] * stride_dvs + dcols[None, :]
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=key_mask[:, None] & (dcols < 2 * HALF)[None, :])
    partial = DKW_PARTIAL + pid.to(tl.int64) * (2 * HALF)
    tl.store(partial + cols, dw1, mask=cols < HALF)
    tl.store(partial + HALF + cols, dw2, mask=cols < HALF)


@triton.jit
def _attn_bwd_dq_inner(
    dq1, dq2, qs1, qs2, do, lse, delta, rows, K_BASE, V_BASE, COS_BASE, SIN_BASE, kw1, kw2,
    start, seq_len, stride_ks, stride_vs, stride_cs, eps, lo, hi,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr,
):
    """Accumulate dS @ k_hat (dQ_hat without the softmax scale) of one query tile over the key tiles [lo, hi)."""
    cols = tl.arange(0, HALF_PAD)
    dcols = tl.arange(0, 2 * HALF_PAD)
    for start_n in range(lo, hi, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        key_mask = keys < seq_len
        ktok = (start + keys).to(tl.int64)
        rope_off = ktok[:, None] * stride_cs + cols[None, :]
        kr1, kr2 = _load_rms_rope(K_BASE + ktok[:, None] * stride_ks + cols[None, :], COS_BASE + rope_off,
                                  SIN_BASE + rope_off, key_mask[:, None] & (cols < HALF)[None, :],
                                  kw1, kw2, eps, HALF)
        kr1 = kr1.to(qs1.dtype)
        kr2 = kr2.to(qs2.dtype)
        qk = tl.dot(qs1, tl.trans(kr1), input_precision="ieee")
        qk = tl.dot(qs2, tl.trans(kr2), qk, input_precision="ieee")
        p = tl.exp2(qk - lse[:, None])
        if MASK:
            valid = key_mask[None, :]
            if CAUSAL:
                valid = valid & (rows[:, None] >= keys[None, :])
            p = tl.where(valid, p, 0.0)
        v = tl.load(V_BASE + ktok[:, None] * stride_vs + dcols[None, :],
                    mask=key_mask[:, None] & (dcols < 2 * HALF)[None, :], other=0.0)
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        ds = p * (dp - delta[:, None])
        dq1 = tl.dot(ds.to(kr1.dtype), kr1, dq1, input_precision="ieee")
        dq2 = tl.dot(ds.to(kr2.dtype), kr2, dq2, input_precision="ieee")
    return dq1, dq2


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, Q_W, K_W, COS, SIN, DOUT, LSE, DELTA, DQ, DQW_PARTIAL, CU_SEQLENS, TILE_DOC, TILE_BLOCK,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh, stride_dqb, stride_dqs, stride_dqh, stride_cb, stride_cs,
    SEQ, BLOCKS_PER_SEQ, N_TILES, N_TOKENS, H_Q, GROUP, sm_scale, eps,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    pid = tl.program_id(0)
    head = pid % H_Q  # same order as the forward: heads fastest, most-work tiles first
    t = N_TILES - 1 - pid // H_Q
    batch, start, seq_len, block = _tile_coords(t, TILE_DOC, TILE_BLOCK, CU_SEQLENS, SEQ, BLOCKS_PER_SEQ, IS_VARLEN)
    if block * BLOCK_M >= seq_len:
        return
    kv_head = head // GROUP
    b64 = batch.to(tl.int64)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < seq_len
    tok = (start + rows).to(tl.int64)
    cols = tl.arange(0, HALF_PAD)
    dcols = tl.arange(0, 2 * HALF_PAD)
    half_mask = row_mask[:, None] & (cols < HALF)[None, :]

    q_ptrs = Q + b64 * stride_qb + head * stride_qh + tok[:, None] * stride_qs + cols[None, :]
    cos_base = COS + b64 * stride_cb
    sin_base = SIN + b64 * stride_cb
    rope_off = tok[:, None] * stride_cs + cols[None, :]
    qw1, qw2 = _load_weight_halves(Q_W, cols, HALF)
    qr1, qr2 = _load_rms_rope(q_ptrs, cos_base + rope_off, sin_base + rope_off, half_mask, qw1, qw2, eps, HALF)
    qk_scale = sm_scale * 1.4426950408889634
    qs1 = (qr1 * qk_scale).to(Q.dtype.element_ty)
    qs2 = (qr2 * qk_scale).to(Q.dtype.element_ty)
    do = tl.load(DOUT + b64 * stride_dob + head * stride_doh + tok[:, None] * stride_dos + dcols[None, :],
                 mask=row_mask[:, None] & (dcols < 2 * HALF)[None, :], other=0.0)
    row_base = head.to(tl.int64) * N_TOKENS + b64 * SEQ + start
    lse = tl.load(LSE + row_base + rows, mask=row_mask, other=0.0)
    delta = tl.load(DELTA + row_base + rows, mask=row_mask, other=0.0)

    kw1, kw2 = _load_weight_halves(K_W, cols, HALF)
    k_base = K + b64 * stride_kb + kv_head * stride_kh
    v_base = V + b64 * stride_vb + kv_head * stride_vh
    dq1 = tl.zeros([BLOCK_M, HALF_PAD], dtype=tl.float32)
    dq2 = tl.zeros([BLOCK_M, HALF_PAD], dtype=tl.float32)
    full_keys = (seq_len // BLOCK_N) * BLOCK_N  # key-tile ranges exactly as in the forward
    if CAUSAL:
        full_hi = tl.minimum(block * BLOCK_M, full_keys)
        hi = tl.minimum((block + 1) * BLOCK_M, seq_len)
    else:
        full_hi = full_keys
        hi = seq_len
    dq1, dq2 = _attn_bwd_dq_inner(
        dq1, dq2, qs1, qs2, do, lse, delta, rows, k_base, v_base, cos_base, sin_base, kw1, kw2,
        start, seq_len, stride_ks, stride_vs, stride_cs, eps, 0, full_hi, HALF, HALF_PAD, BLOCK_N, False, CAUSAL,
    )
    dq1, dq2 = _attn_bwd_dq_inner(
        dq1, dq2, qs1, qs2, do, lse, delta, rows, k_base, v_base, cos_base, sin_base, kw1, kw2,
        start, seq_len, stride_ks, stride_vs, stride_cs, eps, full_hi, hi, HALF, HALF_PAD, BLOCK_N, True, CAUSAL,
    )

    # d loss / d q_hat = scale * dS @ k_hat.
    dq1, dq2, dw1, dw2 = _rms_rope_bwd(dq1 * sm_scale, dq2 * sm_scale, q_ptrs, cos_base + rope_off,
                                       sin_base + rope_off, half_mask, qw1, qw2, eps, HALF)
    dq_ptrs = DQ + b64 * stride_dqb + head * stride_dqh + tok[:, None] * stride_dqs + cols[None, :]
    tl.store(dq_ptrs, dq1.to(DQ.dtype.element_ty), mask=half_mask)
    tl.store(dq_ptrs + HALF, dq2.to(DQ.dtype.element_ty), mask=half_mask)
    partial = DQW_PARTIAL + pid.to(tl.int64) * (2 * HALF)
    tl.store(partial + cols, dw1, mask=cols < HALF)
    tl.store(partial + HALF + cols, dw2, mask=cols < HALF)
