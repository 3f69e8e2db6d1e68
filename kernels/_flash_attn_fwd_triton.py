"""Forward kernel of the Triton flash-attention core, and the tile-coordinate helpers the backward shares
(design: docs/kernels.md)."""

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
def _query_tile(pid, H_Q, N_TILES, TILE_DOC, TILE_BLOCK, CU_SEQLENS, SEQ, BLOCKS_PER_SEQ, IS_VARLEN: tl.constexpr):
    """Program id of a (query tile, q head) program (forward, dq) -> (q head, batch row, first token, sequence
    length, block index). Heads vary fastest (a GQA group's k/v tiles stay in L2); tiles run last-first (under
    causal masking the last query tiles have the most keys: starting them first shortens the launch's tail)."""
    head = pid % H_Q
    t = N_TILES - 1 - pid // H_Q
    batch, start, seq_len, block = _tile_coords(t, TILE_DOC, TILE_BLOCK, CU_SEQLENS, SEQ, BLOCKS_PER_SEQ, IS_VARLEN)
    return head, batch, start, seq_len, block


@triton.jit
def _key_ranges(block, seq_len, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """-> (full_hi, hi) for query tile `block`: keys [0, full_hi) are seen by every row of the tile (below its
    first row when causal, inside the sequence, rounded down to whole key tiles); [full_hi, hi) holds the diagonal
    and the ragged end. Works for any BLOCK_M / BLOCK_N ratio."""
    full_keys = (seq_len // BLOCK_N) * BLOCK_N
    if CAUSAL:
        full_hi = tl.minimum(((block * BLOCK_M) // BLOCK_N) * BLOCK_N, full_keys)
        hi = tl.minimum((block + 1) * BLOCK_M, seq_len)
    else:
        full_hi = full_keys
        hi = seq_len
    return full_hi, hi


@triton.jit
def _load_rows(PTRS, rows, seq_len, dcols, D: tl.constexpr, MASK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """Load a [rows, D_PAD] tile in its stored dtype; padded rows/columns read as 0. Without MASK_ROWS (every
    row inside the sequence) and with D == D_PAD the load carries no mask, so it vectorises fully."""
    if MASK_ROWS:
        x = tl.load(PTRS, mask=(rows < seq_len)[:, None] & (dcols < D)[None, :], other=0.0)
    elif EVEN_D:
        x = tl.load(PTRS)
    else:
        x = tl.load(PTRS, mask=(dcols < D)[None, :], other=0.0)
    return x


@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q, rows, K_BASE, V_BASE, K_DESC, V_DESC, start, seq_len, stride_ks, stride_vs, qk_scale, lo, hi,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, USE_TMA: tl.constexpr,
):
    """Online softmax over the key tiles [lo, hi) of one sequence. MASK=False: tiles that every row of the q tile
    fully sees; MASK=True: the causal diagonal and the ragged last tile."""
    dcols = tl.arange(0, D_PAD)
    for start_n in range(lo, hi, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        ktok = (start + keys).to(tl.int64)  # int64: token * stride passes 2^31 on long packed batches
        if USE_TMA:  # rows past the document's end and columns past D read as 0 (the descriptor's bounds)
            k = K_DESC.load([start + start_n, 0])
        else:
            k = _load_rows(K_BASE + ktok[:, None] * stride_ks + dcols[None, :], keys, seq_len, dcols, D, MASK, EVEN_D)
        # Operands in the stored dtype on the tensor cores, fp32 accumulation; "ieee" only matters for fp32
        # inputs (no silent TF32 rounding).
        qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        if MASK:
            valid = (keys < seq_len)[None, :]
            if CAUSAL:
                valid = valid & (rows[:, None] >= keys[None, :])
            qk = tl.where(valid, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, axis=1))
            qk = qk - m_new[:, None]
        else:
            # qk_scale > 0 (checked on the host), so max(qk) * scale = max(qk * scale) and the scaling fuses
            # with the subtraction into one FMA per score.
            m_new = tl.maximum(m_i, tl.max(qk, axis=1) * qk_scale)
            qk = qk * qk_scale - m_new[:, None]
        # Every row sees key 0 of its sequence in the first tile it visits, so m_new is finite from then on and
        # exp2(-inf - m_new) = 0 handles the masked entries (and alpha = 0 on the first tile).
        p = tl.exp2(qk)
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if USE_TMA:
            v = V_DESC.load([start + start_n, 0])
        else:
            v = _load_rows(V_BASE + ktok[:, None] * stride_vs + dcols[None, :], keys, seq_len, dcols, D, MASK,
                           EVEN_D)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _flash_attn_fwd_kernel(
    Q, K, V, OUT, LSE, CU_SEQLENS, TILE_DOC, TILE_BLOCK,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    SEQ, BLOCKS_PER_SEQ, N_TILES, N_TOKENS, H_Q, GROUP, qk_scale,
    D: tl.constexpr, D_PAD: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr, USE_TMA: tl.constexpr,
):
    head, batch, start, seq_len, block = _query_tile(tl.program_id(0), H_Q, N_TILES, TILE_DOC, TILE_BLOCK, CU_SEQLENS,
                                                     SEQ, BLOCKS_PER_SEQ, IS_VARLEN)
    if block * BLOCK_M >= seq_len:  # a padding tile of the packed schedule
        return
    # Inline, after the exit of padding tiles, in both query-tile kernels (fwd, dq): computed before it (in a
    # shared helper) they cost 2-25 registers more in the compiled kernels.
    kv_head = head // GROUP
    b64 = batch.to(tl.int64)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < seq_len
    tok = (start + rows).to(tl.int64)
    dcols = tl.arange(0, D_PAD)
    q = tl.load(Q + b64 * stride_qb + head * stride_qh + tok[:, None] * stride_qs + dcols[None, :],
                mask=row_mask[:, None] & (dcols < D)[None, :], other=0.0)

    k_base = K + b64 * stride_kb + kv_head * stride_kh
    v_base = V + b64 * stride_vb + kv_head * stride_vh
    if USE_TMA:
        # Hopper: K/V tiles through tensor descriptors (TMA): one bulk copy per tile instead of per-thread
        # addresses, bounded by the end of this sequence (documents never read their neighbours' keys).
        k_desc = tl.make_tensor_descriptor(k_base, shape=[start + seq_len, D], strides=[stride_ks, 1],
                                           block_shape=[BLOCK_N, D_PAD])
        v_desc = tl.make_tensor_descriptor(v_base, shape=[start + seq_len, D], strides=[stride_vs, 1],
                                           block_shape=[BLOCK_N, D_PAD])
    else:
        k_desc = k_base  # unused placeholders
        v_desc = v_base
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    full_hi, hi = _key_ranges(block, seq_len, BLOCK_M, BLOCK_N, CAUSAL)
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, rows, k_base, v_base, k_desc, v_desc, start, seq_len, stride_ks, stride_vs, qk_scale,
        0, full_hi, D, D_PAD, BLOCK_N, EVEN_D, False, CAUSAL, USE_TMA,
    )
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, rows, k_base, v_base, k_desc, v_desc, start, seq_len, stride_ks, stride_vs, qk_scale,
        full_hi, hi, D, D_PAD, BLOCK_N, EVEN_D, True, CAUSAL, USE_TMA,
    )

    out = acc / l_i[:, None]
    out_ptrs = OUT + b64 * stride_ob + head * stride_oh + tok[:, None] * stride_os + dcols[None, :]
    tl.store(out_ptrs, out.to(OUT.dtype.element_ty), mask=row_mask[:, None] & (dcols < D)[None, :])
    # LSE is [H_Q, N_TOKENS] over the flattened (batch, position) or packed token index, in base-2 units of the
    # scaled scores: p = exp2(q.k * qk_scale - lse).
    lse_ptrs = LSE + head.to(tl.int64) * N_TOKENS + b64 * SEQ + tok
    tl.store(lse_ptrs, m_i + tl.log2(l_i), mask=row_mask)
