"""Forward kernel of the fused QK-norm + RoPE flash attention, and the device helpers the backward shares.

One program computes one query tile (BLOCK_M rows of one batch row or packed document) for one query head. It
loads the q tile, RMS-normalises each row over head_dim in fp32, scales by the q-norm weight, rotates it
(rotate-half RoPE) and folds in softmax_scale * log2(e), once; then it walks the key tiles of the same sequence,
normalising and rotating each k tile on the fly, with an online softmax in fp32 (exp2). It writes the output in
the input dtype and, per row, the logsumexp of the scaled scores in base 2, which the backward reuses.

Rotate-half layout: every q/k row is handled as its two halves [rows, HALF_PAD] (columns 0..D/2 and D/2..D), so
the rotation is elementwise and q.k^T is two dots of depth D/2. HALF_PAD is D/2 rounded up to a power of two of
at least 16 (tl.dot's smallest depth); the padded columns load as 0 and add nothing to any dot product. Masks
always include the column test: when HALF_PAD == HALF the compiler sees it is constant along the row and still
vectorises the loads.

Loads are plain pointer arithmetic with masks (no block pointers) and the q/k tiles are converted to fp32 right
after loading, so the same code runs under TRITON_INTERPRET=1. Inner loops call as few @triton.jit helpers as
possible: the interpreter re-patches triton.language on every device-function call, which dominates its run time.

Host side, autograd and launch configs: _attention_triton.py. Tests (interpreter on machines without a GPU):
    pytest tests/kernels/test_attention.py -q
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile_coords(t, TILE_DOC, TILE_BLOCK, CU_SEQLENS, SEQ, BLOCKS_PER_SEQ, IS_VARLEN: tl.constexpr):
    """Tile index -> (batch row, index of the sequence's first token, sequence length, block index in it)."""
    if IS_VARLEN:
        doc = tl.load(TILE_DOC + t)
        block = tl.load(TILE_BLOCK + t)
        start = tl.load(CU_SEQLENS + doc)
        seq_len = tl.load(CU_SEQLENS + doc + 1) - start
        batch = doc * 0  # packed: a single row; documents are located through cu_seqlens
    else:
        batch = t // BLOCKS_PER_SEQ
        block = t % BLOCKS_PER_SEQ
        start = 0
        seq_len = SEQ
    return batch, start, seq_len, block


@triton.jit
def _load_rms_rope(X_PTRS, COS_PTRS, SIN_PTRS, mask, w1, w2, eps, HALF: tl.constexpr):
    """Load a tile of head vectors (the pointers address the first-half columns) and its cos/sin; return
    rope(rms_norm(x) * w) as two fp32 halves, in the reference's order: (x * rstd) * w, then the rotation."""
    x1 = tl.load(X_PTRS, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X_PTRS + HALF, mask=mask, other=0.0).to(tl.float32)
    cos = tl.load(COS_PTRS, mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(SIN_PTRS, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF) + eps)
    n1 = x1 * rstd[:, None] * w1[None, :]
    n2 = x2 * rstd[:, None] * w2[None, :]
    return n1 * cos - n2 * sin, n2 * cos + n1 * sin


@triton.jit
def _load_weight_halves(W, cols, HALF: tl.constexpr):
    mask = cols < HALF
    w1 = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    w2 = tl.load(W + HALF + cols, mask=mask, other=0.0).to(tl.float32)
    return w1, w2


@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, qs1, qs2, rows, K_BASE, V_BASE, COS_BASE, SIN_BASE, kw1, kw2,
    start, seq_len, stride_ks, stride_vs, stride_cs, eps, lo, hi,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr,
):
    """Online softmax over the key tiles [lo, hi) of one sequence. MASK=False: tiles that every row of the q tile
    fully sees (no causal or end-of-sequence masking needed); MASK=True: the diagonal and the ragged last tile."""
    cols = tl.arange(0, HALF_PAD)
    dcols = tl.arange(0, 2 * HALF_PAD)
    for start_n in range(lo, hi, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        key_mask = keys < seq_len
        ktok = (start + keys).to(tl.int64)
        # The k tile is normalised and rotated here, once per (query tile, key tile) pair, instead of by a
        # pre-pass that writes k_hat: the tile is loaded here anyway, and a pre-pass would add a launch, a
        # [T, Hkv, D] scratch tensor and its HBM write + read. The price is ~10 fp32 ops per k element, i.e.
        # 10 * BLOCK_N * D next to the tile's 4 * BLOCK_M * BLOCK_N * D tensor-core FLOPs (BLOCK_M = 128: 2%
        # of the FLOPs, though on the slower CUDA cores, alongside the softmax): if the forward misses its
        # target in bench/attention.py, this is the first trade to measure. The q tile is prepared once, above.
        half_mask = key_mask[:, None] & (cols < HALF)[None, :]
        rope_off = ktok[:, None] * stride_cs + cols[None, :]
        kr1, kr2 = _load_rms_rope(K_BASE + ktok[:, None] * stride_ks + cols[None, :], COS_BASE + rope_off,
                                  SIN_BASE + rope_off, half_mask, kw1, kw2, eps, HALF)
        # Scores in base-2 units (the scale and log2(e) are folded into q); operands in the input dtype on the
        # tensor cores, accumulation in fp32. "ieee" only matters for fp32 inputs: no silent TF32 rounding.
        qk = tl.dot(qs1, tl.trans(kr1.to(qs1.dtype)), input_precision="ieee")
        qk = tl.dot(qs2, tl.trans(kr2.to(qs2.dtype)), qk, input_precision="ieee")
        if MASK:
            valid = key_mask[None, :]
            if CAUSAL:
                valid = valid & (rows[:, None] >= keys[None, :])
            qk = tl.where(valid, qk, float("-inf"))
        # Every row sees key 0 of its sequence in the first tile visited, so m_new is finite from then on and
        # exp2(-inf - m_new) = 0 handles the masked entries.
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        # v goes to the tensor cores in its stored dtype (no fp32 round trip); padded keys load as 0.
        v_mask = key_mask[:, None] & (dcols < 2 * HALF)[None, :]
        v = tl.load(V_BASE + ktok[:, None] * stride_vs + dcols[None, :], mask=v_mask, other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Q_W, K_W, COS, SIN, OUT, LSE, CU_SEQLENS, TILE_DOC, TILE_BLOCK,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh, stride_cb, stride_cs,
    SEQ, BLOCKS_PER_SEQ, N_TILES, N_TOKENS, H_Q, GROUP, sm_scale, eps,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    pid = tl.program_id(0)
    # Heads vary fastest, so the q heads sharing a kv head run side by side (their k/v tiles stay in L2), and
    # tiles run last-first: under causal masking the last query tiles of a sequence have the most keys, and
    # starting them first shortens the tail of the launch.
    head = pid % H_Q
    t = N_TILES - 1 - pid // H_Q
    batch, start, seq_len, block = _tile_coords(t, TILE_DOC, TILE_BLOCK, CU_SEQLENS, SEQ, BLOCKS_PER_SEQ, IS_VARLEN)
    if block * BLOCK_M >= seq_len:  # a padding tile of the packed schedule
        return
    kv_head = head // GROUP
    b64 = batch.to(tl.int64)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < seq_len
    tok = (start + rows).to(tl.int64)  # int64: token * stride passes 2^31 on long packed batches
    cols = tl.arange(0, HALF_PAD)
    dcols = tl.arange(0, 2 * HALF_PAD)

    cos_base = COS + b64 * stride_cb
    sin_base = SIN + b64 * stride_cb
    rope_off = tok[:, None] * stride_cs + cols[None, :]
    qw1, qw2 = _load_weight_halves(Q_W, cols, HALF)
    qr1, qr2 = _load_rms_rope(Q + b64 * stride_qb + head * stride_qh + tok[:, None] * stride_qs + cols[None, :],
                              cos_base + rope_off, sin_base + rope_off,
                              row_mask[:, None] & (cols < HALF)[None, :], qw1, qw2, eps, HALF)
    qk_scale = sm_scale * 1.4426950408889634  # log2(e): exp2 replaces exp
    dtype = Q.dtype.element_ty
    qs1 = (qr1 * qk_scale).to(dtype)
    qs2 = (qr2 * qk_scale).to(dtype)

    kw1, kw2 = _load_weight_halves(K_W, cols, HALF)
    k_base = K + b64 * stride_kb + kv_head * stride_kh
    v_base = V + b64 * stride_vb + kv_head * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, 2 * HALF_PAD], dtype=tl.float32)
    # Key tiles [0, full_hi) need no mask (BLOCK_M is a multiple of BLOCK_N, so block * BLOCK_M is tile-aligned);
    # [full_hi, hi) holds the causal diagonal and the ragged end of the sequence.
    full_keys = (seq_len // BLOCK_N) * BLOCK_N
    if CAUSAL:
        full_hi = tl.minimum(block * BLOCK_M, full_keys)
        hi = tl.minimum((block + 1) * BLOCK_M, seq_len)
    else:
        full_hi = full_keys
        hi = seq_len
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, qs1, qs2, rows, k_base, v_base, cos_base, sin_base, kw1, kw2,
        start, seq_len, stride_ks, stride_vs, stride_cs, eps, 0, full_hi,
        HALF, HALF_PAD, BLOCK_N, False, CAUSAL,
    )
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, qs1, qs2, rows, k_base, v_base, cos_base, sin_base, kw1, kw2,
        start, seq_len, stride_ks, stride_vs, stride_cs, eps, full_hi, hi,
        HALF, HALF_PAD, BLOCK_N, True, CAUSAL,
    )

    out = acc / l_i[:, None]
    out_ptrs = OUT + b64 * stride_ob + head * stride_oh + tok[:, None] * stride_os + dcols[None, :]
    tl.store(out_ptrs, out.to(OUT.dtype.element_ty), mask=row_mask[:, None] & (dcols < 2 * HALF)[None, :])
    # LSE is [H_Q, N_TOKENS] over the flattened (batch, position) or packed token index.
    lse_ptrs = LSE + head.to(tl.int64) * N_TOKENS + b64 * SEQ + tok
    tl.store(lse_ptrs, m_i + tl.log2(l_i), mask=row_mask)
