"""Flash attention in Triton: forward, and a backward that never materialises the scores.

The math. For one query row q and the keys it sees (its window, see attention_contract.py):
``s_j = q·k_j · scale``, ``lse = log Σ_j exp(s_j)``, ``p_j = exp(s_j - lse)``,
``out = Σ_j p_j v_j``. The forward streams key blocks through an online softmax (running max
``m`` and sum ``l``, the accumulator rescaled by ``exp(m_old - m_new)`` when the max grows), so
memory is O(S), and saves only ``lse`` per row. In base 2 throughout: the scores are scaled
by ``scale · log2(e)`` once so every exponential is an ``exp2``.

Backward, with ``D_i = Σ_d dout_i·out_i = Σ_j p_ij dp_ij`` (one preprocessing pass):
``dp = dout vᵀ``, ``ds = p ⊙ (dp − D)``, ``dv = pᵀ dout``, ``dk = scale · dsᵀ q``,
``dq = scale · ds k``, with ``p`` recomputed from ``q``, ``k`` and the saved ``lse``.
Two kernels split the work so that no two programs ever add into the same element:

* ``attention_bwd_kv_kernel``: one program per (key block, key/value head), looping over the
  query blocks of every query head in its group — dK and dV of a grouped head are summed in
  registers, never through atomics or a repeated K/V;
* ``attention_bwd_q_kernel``: one program per (query block, query head), looping over keys.

Both recompute ``q kᵀ`` and ``dout vᵀ`` (7 block matmuls instead of the 5 of a backward that
adds dQ with atomics): the price of a backward that is bitwise deterministic by construction.

Masking. Query ``i`` of a sequence sits at key position ``p = i + Sk − Sq`` and sees keys
``p − left ≤ j ≤ p + right``. ``_visible_block_range`` turns that into the key blocks a query
block must visit — ``[start, full_lo)`` partly masked, ``[full_lo, full_hi)`` fully visible
(no mask arithmetic at all), ``[full_hi, end)`` partly masked — so causal and windowed
attention only cost the blocks they compute. ``_visible_query_range`` is the same from a key
block's side. A row that sees no key keeps ``l = 0``: its output is 0 and its lse ``-inf``,
which the backward turns into ``+inf`` so that its ``p`` is 0.

Layouts: every tensor is addressed through (batch, head, row) strides with a contiguous last
dimension; a packed (varlen) batch has a batch stride of 0 and finds its rows through
``cu_seqlens``, clamped to ``[0, T)`` so that malformed offsets never address memory outside
the tensors. Row offsets are formed in 64 bits.

Tile sizes: one fixed configuration per kernel under ``TRITON_INTERPRET=1``; on a GPU a
short autotuned list per head dim, pruned to what fits the device's shared memory.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from fusedops.triton_kernels.matmul import _on_device

LOG2_E = 1.4426950408889634
# The same constants as kernels may read them (a @triton.jit function sees only constexpr
# globals).
KERNEL_LOG2_E = tl.constexpr(LOG2_E)
KERNEL_LN_2 = tl.constexpr(0.6931471805599453)

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# --- the visible block ranges -----------------------------------------------------------


@triton.jit
def _visible_key_range(block_start, len_q, len_k, window_left, window_right,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key blocks for query rows [block_start, block_start + BLOCK_M) of a sequence.

    Returns (start, full_lo, full_hi, end): blocks in [start, full_lo) and [full_hi, end) need
    the mask, those in [full_lo, full_hi) are visible to every row and inside the sequence.
    """
    offset = len_k - len_q
    first = block_start + offset                                 # aligned position, first row
    last = tl.minimum(block_start + BLOCK_M, len_q) - 1 + offset  # last row inside the sequence
    lo = tl.maximum(first - window_left, 0)
    end = tl.minimum(last + window_right + 1, len_k)
    start = (lo // BLOCK_N) * BLOCK_N
    full_lo = tl.maximum(last - window_left, 0)
    full_lo = ((full_lo + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    full_hi = (tl.minimum(first + window_right + 1, len_k) // BLOCK_N) * BLOCK_N
    end = tl.maximum(end, start)
    full_lo = tl.minimum(tl.maximum(full_lo, start), end)
    full_hi = tl.maximum(tl.minimum(full_hi, end), full_lo)
    return start, full_lo, full_hi, end


@triton.jit
def _visible_query_range(block_start, len_q, len_k, window_left, window_right,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query blocks that see any key in [block_start, block_start + BLOCK_N) of a sequence.

    Returns (start, full_lo, full_hi, end) as _visible_key_range does, in query rows.
    """
    offset = len_k - len_q
    last_key = tl.minimum(block_start + BLOCK_N, len_k) - 1
    lo = tl.maximum(block_start - window_right - offset, 0)
    end = tl.minimum(last_key + window_left - offset + 1, len_q)
    start = (lo // BLOCK_M) * BLOCK_M
    full_lo = tl.maximum(last_key - window_right - offset, 0)
    full_lo = ((full_lo + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    full_hi = (tl.minimum(block_start + window_left - offset + 1, len_q) // BLOCK_M) * BLOCK_M
    if block_start + BLOCK_N > len_k:  # a ragged key block needs the mask everywhere
        full_hi = 0
    end = tl.maximum(end, start)
    full_lo = tl.minimum(tl.maximum(full_lo, start), end)
    full_hi = tl.maximum(tl.minimum(full_hi, end), full_lo)
    return start, full_lo, full_hi, end


@triton.jit
def _sequence(cu_seqlens_ptr, batch, fixed_len, total, VARLEN: tl.constexpr):
    """(first row, length) of sequence ``batch``: clamped to [0, total) when packed."""
    if VARLEN:
        first = tl.load(cu_seqlens_ptr + batch)
        last = tl.load(cu_seqlens_ptr + batch + 1)
        first = tl.minimum(tl.maximum(first, 0), total)
        last = tl.minimum(tl.maximum(last, first), total)
        length = last - first
    else:
        first = batch * 0
        length = fixed_len + batch * 0
    return first, length


@triton.jit
def _rows_base(ptr, batch, head, first_row, stride_batch, stride_head, stride_row):
    """Address of row ``first_row`` of (batch, head): the offsets in 64 bits, since a
    tensor may hold more than 2**31 elements."""
    return (ptr + batch.to(tl.int64) * stride_batch + head.to(tl.int64) * stride_head
            + first_row.to(tl.int64) * stride_row)


@triton.jit
def _visible_mask(rows, keys, len_q, len_k, window_left, window_right):
    position = rows + (len_k - len_q)
    return ((keys[None, :] < len_k) & (rows[:, None] < len_q)
            & (keys[None, :] >= position[:, None] - window_left)
            & (keys[None, :] <= position[:, None] + window_right))


@triton.jit
def _load_rows(base, rows, row_stride, offs_d, row_limit, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """A (rows, BLOCK_D) tile; rows past row_limit and columns past HEAD_DIM read as 0."""
    ptrs = base + rows[:, None].to(tl.int64) * row_stride + offs_d[None, :]
    if CHECK_ROWS:
        if BLOCK_D == HEAD_DIM:
            return tl.load(ptrs, mask=rows[:, None] < row_limit, other=0.0)
        return tl.load(ptrs, mask=(rows[:, None] < row_limit) & (offs_d[None, :] < HEAD_DIM),
                       other=0.0)
    if BLOCK_D == HEAD_DIM:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)


@triton.jit
def _store_rows(base, rows, row_stride, offs_d, row_limit, tile, HEAD_DIM: tl.constexpr):
    ptrs = base + rows[:, None].to(tl.int64) * row_stride + offs_d[None, :]
    tl.store(ptrs, tile, mask=(rows[:, None] < row_limit) & (offs_d[None, :] < HEAD_DIM))


# --- forward ----------------------------------------------------------------------------


@triton.jit
def _fwd_key_blocks(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, rows, offs_d,
                    key_start, key_end, len_q, len_k, scale_log2, window_left, window_right,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                    MASKED: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    for key_block in range(key_start, key_end, BLOCK_N):
        keys = key_block + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, keys, stride_ks, offs_d, len_k, HEAD_DIM, BLOCK_D, MASKED)
        scores = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * scale_log2
        if MASKED:
            visible = _visible_mask(rows, keys, len_q, len_k, window_left, window_right)
            scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        # A row that has seen no key yet keeps m = -inf; exp2(-inf - 0) = 0 keeps it at zero.
        m_base = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_base)
        p = tl.math.exp2(scores - m_base[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(v_base, keys, stride_vs, offs_d, len_k, HEAD_DIM, BLOCK_D, MASKED)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=INPUT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def attention_fwd_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr,
        stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
        stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os,
        stride_lb, stride_lh,
        seqlen_q, seqlen_k, group_size, scale_log2, window_left, window_right,
        tune_key_seqlen,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, VARLEN: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Grid (query blocks, Hq, B): one block of BLOCK_M query rows of one head."""
    # Longest rows first: under a causal mask the last query blocks do the most work.
    block_m = tl.num_programs(0) - 1 - tl.program_id(0)
    head = tl.program_id(1)
    batch = tl.program_id(2)
    q_first, len_q = _sequence(cu_seqlens_q_ptr, batch, seqlen_q, seqlen_q, VARLEN)
    k_first, len_k = _sequence(cu_seqlens_k_ptr, batch, seqlen_k, seqlen_k, VARLEN)
    block_start = block_m * BLOCK_M
    if block_start >= len_q:
        return
    head_kv = head // group_size
    q_base = _rows_base(q_ptr, batch, head, q_first, stride_qb, stride_qh, stride_qs)
    k_base = _rows_base(k_ptr, batch, head_kv, k_first, stride_kb, stride_kh, stride_ks)
    v_base = _rows_base(v_ptr, batch, head_kv, k_first, stride_vb, stride_vh, stride_vs)
    rows = block_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(q_base, rows, stride_qs, offs_d, len_q, HEAD_DIM, BLOCK_D, True)

    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    start, full_lo, full_hi, end = _visible_key_range(block_start, len_q, len_k, window_left,
                                                      window_right, BLOCK_M, BLOCK_N)
    acc, m_i, l_i = _fwd_key_blocks(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs,
                                    rows, offs_d, start, full_lo, len_q, len_k, scale_log2,
                                    window_left, window_right, HEAD_DIM, BLOCK_D, BLOCK_N,
                                    True, INPUT_PRECISION)
    acc, m_i, l_i = _fwd_key_blocks(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs,
                                    rows, offs_d, full_lo, full_hi, len_q, len_k, scale_log2,
                                    window_left, window_right, HEAD_DIM, BLOCK_D, BLOCK_N,
                                    False, INPUT_PRECISION)
    acc, m_i, l_i = _fwd_key_blocks(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs,
                                    rows, offs_d, full_hi, end, len_q, len_k, scale_log2,
                                    window_left, window_right, HEAD_DIM, BLOCK_D, BLOCK_N,
                                    True, INPUT_PRECISION)

    sees_keys = l_i > 0.0
    out = acc / tl.where(sees_keys, l_i, 1.0)[:, None]
    lse = tl.where(sees_keys, (m_i + tl.math.log2(tl.where(sees_keys, l_i, 1.0))) * KERNEL_LN_2,
                   float("-inf"))
    out_base = _rows_base(out_ptr, batch, head, q_first, stride_ob, stride_oh, stride_os)
    _store_rows(out_base, rows, stride_os, offs_d, len_q, out.to(out_ptr.dtype.element_ty),
                HEAD_DIM)
    lse_ptrs = (lse_ptr + batch.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh
                + q_first + rows)
    tl.store(lse_ptrs, lse, mask=rows < len_q)


# --- backward ---------------------------------------------------------------------------


@triton.jit
def attention_bwd_preprocess_kernel(
        out_ptr, grad_out_ptr, delta_ptr, cu_seqlens_q_ptr,
        stride_ob, stride_oh, stride_os, stride_gb, stride_gh, stride_gs,
        stride_lb, stride_lh, seqlen_q,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
        VARLEN: tl.constexpr):
    """delta = rowsum(grad_out * out) in float32, laid out like lse. Grid (blocks, Hq, B)."""
    block_start = tl.program_id(0) * BLOCK_M
    head = tl.program_id(1)
    batch = tl.program_id(2)
    q_first, len_q = _sequence(cu_seqlens_q_ptr, batch, seqlen_q, seqlen_q, VARLEN)
    if block_start >= len_q:
        return
    rows = block_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    out_base = _rows_base(out_ptr, batch, head, q_first, stride_ob, stride_oh, stride_os)
    grad_base = _rows_base(grad_out_ptr, batch, head, q_first, stride_gb, stride_gh, stride_gs)
    out = _load_rows(out_base, rows, stride_os, offs_d, len_q, HEAD_DIM, BLOCK_D, True)
    grad = _load_rows(grad_base, rows, stride_gs, offs_d, len_q, HEAD_DIM, BLOCK_D, True)
    delta = tl.sum(out.to(tl.float32) * grad.to(tl.float32), 1)
    delta_ptrs = (delta_ptr + batch.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh
                  + q_first + rows)
    tl.store(delta_ptrs, delta, mask=rows < len_q)


@triton.jit
def _load_row_stats(lse_base, delta_base, rows, len_q):
    """(lse in base 2, delta) of query rows; rows that see no key, or lie past the sequence,
    get lse = +inf so that their recomputed probabilities are exactly 0."""
    lse = tl.load(lse_base + rows, mask=rows < len_q, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * KERNEL_LOG2_E
    delta = tl.load(delta_base + rows, mask=rows < len_q, other=0.0)
    return lse, delta


@triton.jit
def _bwd_kv_query_blocks(grad_k, grad_v, k, v, q_base, dout_base, lse_base, delta_base,
                         grad_q_base, stride_qs, stride_gs, stride_aqs, keys, offs_d, row_start,
                         row_end, len_q, len_k, scale, scale_log2, window_left, window_right,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                         MASKED: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                         INPUT_PRECISION: tl.constexpr):
    for row_block in range(row_start, row_end, BLOCK_M):
        rows = row_block + tl.arange(0, BLOCK_M)
        q = _load_rows(q_base, rows, stride_qs, offs_d, len_q, HEAD_DIM, BLOCK_D, MASKED)
        dout = _load_rows(dout_base, rows, stride_gs, offs_d, len_q, HEAD_DIM, BLOCK_D, MASKED)
        lse, delta = _load_row_stats(lse_base, delta_base, rows, len_q)
        scores = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * scale_log2
        if MASKED:  # -inf before exp2: a hidden key's score may exceed the row's lse
            scores = tl.where(_visible_mask(rows, keys, len_q, len_k, window_left,
                                            window_right), scores, float("-inf"))
        p = tl.math.exp2(scores - lse[:, None])                       # (BLOCK_M, BLOCK_N)
        grad_v = tl.dot(tl.trans(p.to(dout.dtype)), dout, grad_v,
                        input_precision=INPUT_PRECISION)
        grad_p = tl.dot(dout, tl.trans(v), input_precision=INPUT_PRECISION)
        grad_s = p * (grad_p - delta[:, None])
        grad_k = tl.dot(tl.trans(grad_s.to(q.dtype)), q, grad_k, input_precision=INPUT_PRECISION)
        if ATOMIC_DQ:  # FlashAttention-2's scheme: this key block's share of dQ, added in fp32
            grad_q = tl.dot(grad_s.to(k.dtype), k, input_precision=INPUT_PRECISION) * scale
            grad_q_ptrs = (grad_q_base + rows[:, None].to(tl.int64) * stride_aqs
                           + offs_d[None, :])
            tl.atomic_add(grad_q_ptrs, grad_q,
                          mask=(rows[:, None] < len_q) & (offs_d[None, :] < HEAD_DIM),
                          sem="relaxed")
    return grad_k, grad_v


@triton.jit
def attention_bwd_kv_kernel(
        q_ptr, k_ptr, v_ptr, grad_out_ptr, lse_ptr, delta_ptr, grad_k_ptr, grad_v_ptr,
        grad_q_accum_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr,
        stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
        stride_vb, stride_vh, stride_vs, stride_gb, stride_gh, stride_gs,
        stride_dkb, stride_dkh, stride_dks, stride_dvb, stride_dvh, stride_dvs,
        stride_aqb, stride_aqh, stride_aqs, stride_lb, stride_lh,
        seqlen_q, seqlen_k, group_size, scale, scale_log2, window_left, window_right,
        tune_key_seqlen,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, VARLEN: tl.constexpr, ATOMIC_DQ: tl.constexpr,
        INPUT_PRECISION: tl.constexpr):
    """Grid (key blocks, Hkv, B): dK and dV of BLOCK_N keys, summed over the group's heads.

    With ATOMIC_DQ it also adds each tile's dQ share into the float32 ``grad_q_accum``
    (zeroed by the caller): 5 matmuls per tile instead of 7 with the separate dQ kernel, at
    the price of an order of float32 additions that varies from run to run.
    """
    block_start = tl.program_id(0) * BLOCK_N
    head_kv = tl.program_id(1)
    batch = tl.program_id(2)
    q_first, len_q = _sequence(cu_seqlens_q_ptr, batch, seqlen_q, seqlen_q, VARLEN)
    k_first, len_k = _sequence(cu_seqlens_k_ptr, batch, seqlen_k, seqlen_k, VARLEN)
    if block_start >= len_k:
        return
    keys = block_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k_base = _rows_base(k_ptr, batch, head_kv, k_first, stride_kb, stride_kh, stride_ks)
    v_base = _rows_base(v_ptr, batch, head_kv, k_first, stride_vb, stride_vh, stride_vs)
    k = _load_rows(k_base, keys, stride_ks, offs_d, len_k, HEAD_DIM, BLOCK_D, True)
    v = _load_rows(v_base, keys, stride_vs, offs_d, len_k, HEAD_DIM, BLOCK_D, True)
    grad_k = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    grad_v = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    start, full_lo, full_hi, end = _visible_query_range(block_start, len_q, len_k, window_left,
                                                        window_right, BLOCK_M, BLOCK_N)
    for member in range(group_size):
        head = head_kv * group_size + member
        q_base = _rows_base(q_ptr, batch, head, q_first, stride_qb, stride_qh, stride_qs)
        dout_base = _rows_base(grad_out_ptr, batch, head, q_first, stride_gb, stride_gh, stride_gs)
        stats_offset = batch.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh + q_first
        lse_base = lse_ptr + stats_offset
        delta_base = delta_ptr + stats_offset
        if ATOMIC_DQ:
            grad_q_base = _rows_base(grad_q_accum_ptr, batch, head, q_first,
                                     stride_aqb, stride_aqh, stride_aqs)
        else:
            grad_q_base = grad_q_accum_ptr
        grad_k, grad_v = _bwd_kv_query_blocks(
            grad_k, grad_v, k, v, q_base, dout_base, lse_base, delta_base, grad_q_base,
            stride_qs, stride_gs, stride_aqs, keys, offs_d, start, full_lo, len_q, len_k, scale,
            scale_log2, window_left, window_right, HEAD_DIM, BLOCK_D, BLOCK_M, True, ATOMIC_DQ,
            INPUT_PRECISION)
        grad_k, grad_v = _bwd_kv_query_blocks(
            grad_k, grad_v, k, v, q_base, dout_base, lse_base, delta_base, grad_q_base,
            stride_qs, stride_gs, stride_aqs, keys, offs_d, full_lo, full_hi, len_q, len_k,
            scale, scale_log2, window_left, window_right, HEAD_DIM, BLOCK_D, BLOCK_M, False,
            ATOMIC_DQ, INPUT_PRECISION)
        grad_k, grad_v = _bwd_kv_query_blocks(
            grad_k, grad_v, k, v, q_base, dout_base, lse_base, delta_base, grad_q_base,
            stride_qs, stride_gs, stride_aqs, keys, offs_d, full_hi, end, len_q, len_k, scale,
            scale_log2, window_left, window_right, HEAD_DIM, BLOCK_D, BLOCK_M, True, ATOMIC_DQ,
            INPUT_PRECISION)

    grad_k_base = _rows_base(grad_k_ptr, batch, head_kv, k_first,
                             stride_dkb, stride_dkh, stride_dks)
    grad_v_base = _rows_base(grad_v_ptr, batch, head_kv, k_first,
                             stride_dvb, stride_dvh, stride_dvs)
    _store_rows(grad_k_base, keys, stride_dks, offs_d, len_k,
                (grad_k * scale).to(grad_k_ptr.dtype.element_ty), HEAD_DIM)
    _store_rows(grad_v_base, keys, stride_dvs, offs_d, len_k,
                grad_v.to(grad_v_ptr.dtype.element_ty), HEAD_DIM)


@triton.jit
def _bwd_q_key_blocks(grad_q, q, dout, lse, delta, k_base, v_base, stride_ks, stride_vs, rows,
                      offs_d, key_start, key_end, len_q, len_k, scale_log2, window_left,
                      window_right, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                      INPUT_PRECISION: tl.constexpr):
    for key_block in range(key_start, key_end, BLOCK_N):
        keys = key_block + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, keys, stride_ks, offs_d, len_k, HEAD_DIM, BLOCK_D, MASKED)
        v = _load_rows(v_base, keys, stride_vs, offs_d, len_k, HEAD_DIM, BLOCK_D, MASKED)
        scores = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * scale_log2
        if MASKED:
            scores = tl.where(_visible_mask(rows, keys, len_q, len_k, window_left,
                                            window_right), scores, float("-inf"))
        p = tl.math.exp2(scores - lse[:, None])
        grad_p = tl.dot(dout, tl.trans(v), input_precision=INPUT_PRECISION)
        grad_s = p * (grad_p - delta[:, None])
        grad_q = tl.dot(grad_s.to(k.dtype), k, grad_q, input_precision=INPUT_PRECISION)
    return grad_q


@triton.jit
def attention_bwd_q_kernel(
        q_ptr, k_ptr, v_ptr, grad_out_ptr, lse_ptr, delta_ptr, grad_q_ptr,
        cu_seqlens_q_ptr, cu_seqlens_k_ptr,
        stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
        stride_vb, stride_vh, stride_vs, stride_gb, stride_gh, stride_gs,
        stride_dqb, stride_dqh, stride_dqs, stride_lb, stride_lh,
        seqlen_q, seqlen_k, group_size, scale, scale_log2, window_left, window_right,
        tune_key_seqlen,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, VARLEN: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Grid (query blocks, Hq, B): dQ of BLOCK_M query rows of one head."""
    block_m = tl.num_programs(0) - 1 - tl.program_id(0)
    head = tl.program_id(1)
    batch = tl.program_id(2)
    q_first, len_q = _sequence(cu_seqlens_q_ptr, batch, seqlen_q, seqlen_q, VARLEN)
    k_first, len_k = _sequence(cu_seqlens_k_ptr, batch, seqlen_k, seqlen_k, VARLEN)
    block_start = block_m * BLOCK_M
    if block_start >= len_q:
        return
    head_kv = head // group_size
    rows = block_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = _rows_base(q_ptr, batch, head, q_first, stride_qb, stride_qh, stride_qs)
    dout_base = _rows_base(grad_out_ptr, batch, head, q_first, stride_gb, stride_gh, stride_gs)
    k_base = _rows_base(k_ptr, batch, head_kv, k_first, stride_kb, stride_kh, stride_ks)
    v_base = _rows_base(v_ptr, batch, head_kv, k_first, stride_vb, stride_vh, stride_vs)
    stats_offset = batch.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh + q_first
    q = _load_rows(q_base, rows, stride_qs, offs_d, len_q, HEAD_DIM, BLOCK_D, True)
    dout = _load_rows(dout_base, rows, stride_gs, offs_d, len_q, HEAD_DIM, BLOCK_D, True)
    lse, delta = _load_row_stats(lse_ptr + stats_offset, delta_ptr + stats_offset, rows, len_q)
    grad_q = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    start, full_lo, full_hi, end = _visible_key_range(block_start, len_q, len_k, window_left,
                                                      window_right, BLOCK_M, BLOCK_N)
    grad_q = _bwd_q_key_blocks(grad_q, q, dout, lse, delta, k_base, v_base, stride_ks, stride_vs,
                               rows, offs_d, start, full_lo, len_q, len_k, scale_log2,
                               window_left, window_right, HEAD_DIM, BLOCK_D, BLOCK_N, True,
                               INPUT_PRECISION)
    grad_q = _bwd_q_key_blocks(grad_q, q, dout, lse, delta, k_base, v_base, stride_ks, stride_vs,
                               rows, offs_d, full_lo, full_hi, len_q, len_k, scale_log2,
                               window_left, window_right, HEAD_DIM, BLOCK_D, BLOCK_N, False,
                               INPUT_PRECISION)
    grad_q = _bwd_q_key_blocks(grad_q, q, dout, lse, delta, k_base, v_base, stride_ks, stride_vs,
                               rows, offs_d, full_hi, end, len_q, len_k, scale_log2,
                               window_left, window_right, HEAD_DIM, BLOCK_D, BLOCK_N, True,
                               INPUT_PRECISION)
    grad_q_base = _rows_base(grad_q_ptr, batch, head, q_first, stride_dqb, stride_dqh, stride_dqs)
    _store_rows(grad_q_base, rows, stride_dqs, offs_d, len_q,
                (grad_q * scale).to(grad_q_ptr.dtype.element_ty), HEAD_DIM)


# --- launchers --------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages). Under the interpreter one small configuration
# (it costs about as much per program as per block, so few larger blocks run fastest); on a
# GPU a short list per head dim, autotuned per power-of-two sequence length. Unmeasured so
# far: chosen from the tile shapes FlashAttention-2 and Triton's fused-attention tutorial use
# on A100/H100 (128x64 with 4-8 warps up to D=128, 64x64 at D=256), pending a GPU run.
_INTERPRETER_CONFIG = (32, 32, 4, 1)
_FWD_CONFIGS = {
    "small_d": [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4)],
    "medium_d": [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3)],
    "large_d": [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2)],
}
_BWD_KV_CONFIGS = {  # BLOCK_M is the query block of the inner loop, BLOCK_N the program's keys
    "small_d": [(32, 128, 4, 3), (64, 128, 8, 3), (64, 64, 4, 3)],
    "medium_d": [(32, 128, 8, 3), (64, 128, 8, 2), (64, 64, 4, 3), (32, 64, 4, 3)],
    "large_d": [(32, 64, 4, 2), (64, 64, 8, 2), (32, 32, 4, 2)],
}
_BWD_Q_CONFIGS = {  # BLOCK_M is the program's queries, BLOCK_N the key block of the loop
    "small_d": [(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3)],
    "medium_d": [(128, 32, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3)],
    "large_d": [(64, 32, 4, 2), (64, 64, 8, 2), (32, 32, 4, 2)],
}
_PREPROCESS_BLOCK_M = 64


def _head_dim_class(block_d: int) -> str:
    return "small_d" if block_d <= 64 else "medium_d" if block_d <= 128 else "large_d"


def _shared_memory_bytes(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_properties(index).shared_memory_per_block_optin


def _fits(config, block_d: int, tiles_per_stage: int, smem_bytes: int) -> bool:
    """Whether a config's pipelined 16-bit tiles fit shared memory (the compiler has the last
    word: a config that still does not fit is dropped by the autotuner as out of resources)."""
    block_m, block_n, _, stages = config
    resident = block_m * block_d * 2
    streamed = stages * tiles_per_stage * max(block_m, block_n) * block_d * 2
    return resident + streamed <= smem_bytes


@functools.cache
def _tuned(kernel, kind: str, block_d: int, smem_bytes: int):
    """``kernel`` autotuned over the configurations of its head-dim class that fit."""
    table = {"fwd": _FWD_CONFIGS, "bwd_kv": _BWD_KV_CONFIGS, "bwd_kv_atomic": _BWD_KV_CONFIGS,
             "bwd_q": _BWD_Q_CONFIGS}[kind]
    candidates = table[_head_dim_class(block_d)]
    fitting = [c for c in candidates if _fits(c, block_d, 2, smem_bytes)] or candidates[-1:]
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
               for m, n, w, s in fitting]
    # Every timed trial of the atomic dK/dV kernel adds into grad_q_accum: zero it before each.
    reset = ["grad_q_accum_ptr"] if kind == "bwd_kv_atomic" else None
    return triton.autotune(configs=configs, key=["tune_key_seqlen", "HEAD_DIM", "VARLEN",
                                                 "INPUT_PRECISION"], reset_to_zero=reset)(kernel)


def _launch(kernel, kind: str, grid, device: torch.device, block_d: int, *args, **kwargs):
    if _INTERPRET:
        block_m, block_n, warps, stages = _INTERPRETER_CONFIG
        kernel[grid](*args, **kwargs, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
                     num_stages=stages)
    else:
        _tuned(kernel, kind, block_d, _shared_memory_bytes(device))[grid](*args, **kwargs)


class _Layout:
    """Strides and sizes of one call, batched ``(B, H, S, D)`` or packed ``(T, H, D)``."""

    def __init__(self, q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k):
        self.packed = cu_seqlens_q is not None
        self.head_dim = q.shape[-1]
        self.block_d = max(16, triton.next_power_of_2(self.head_dim))
        self.heads_q, self.heads_kv = q.shape[-2 if self.packed else 1], k.shape[
            -2 if self.packed else 1]
        if self.packed:
            self.batch = cu_seqlens_q.numel() - 1
            self.seqlen_q, self.seqlen_k = q.shape[0], k.shape[0]  # totals, for clamping
            self.rows_q, self.rows_k = max_seqlen_q, max_seqlen_k  # what the grid covers
        else:
            self.batch = q.shape[0]
            self.seqlen_q, self.seqlen_k = q.shape[2], k.shape[2]
            self.rows_q, self.rows_k = self.seqlen_q, self.seqlen_k
        self.tune_key_seqlen = triton.next_power_of_2(max(self.rows_q, self.rows_k, 1))

    def strides(self, t):
        """(batch, head, row) strides of a q/k/v-shaped tensor."""
        if self.packed:
            return 0, t.stride(1), t.stride(0)
        return t.stride(0), t.stride(1), t.stride(2)

    def stat_strides(self, stats):
        """(batch, head) strides of an lse-shaped float32 tensor; rows are contiguous."""
        if self.packed:
            return 0, stats.stride(0)
        return stats.stride(0), stats.stride(1)


def _input_precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    return "tf32" if dtype == torch.float32 and allow_tf32 and not _INTERPRET else "ieee"


def attention_fwd_launch(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         scale, window_left, window_right, allow_tf32, out, lse):
    """Write ``out`` (like q) and ``lse`` (float32, lse-shaped); see attention_contract.py."""
    with _on_device(q):  # Triton launches on the current device; the tensors' is wanted
        _attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                       window_left, window_right, allow_tf32, out, lse)


def _attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                   window_left, window_right, allow_tf32, out, lse):
    layout = _Layout(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    if layout.batch == 0 or layout.heads_q == 0 or layout.rows_q == 0:
        return

    def grid(meta):
        return (triton.cdiv(layout.rows_q, meta["BLOCK_M"]), layout.heads_q, layout.batch)

    _launch(attention_fwd_kernel, "fwd", grid, q.device, layout.block_d,
            q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
            *layout.strides(q), *layout.strides(k), *layout.strides(v), *layout.strides(out),
            *layout.stat_strides(lse),
            layout.seqlen_q, layout.seqlen_k, layout.heads_q // layout.heads_kv,
            scale * LOG2_E, window_left, window_right, layout.tune_key_seqlen,
            HEAD_DIM=layout.head_dim, BLOCK_D=layout.block_d, VARLEN=layout.packed,
            INPUT_PRECISION=_input_precision(q.dtype, allow_tf32))


def attention_bwd_launch(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                         max_seqlen_k, scale, window_left, window_right, allow_tf32,
                         deterministic, grad_q, grad_k, grad_v):
    """Write ``grad_q``, ``grad_k`` and ``grad_v`` (each like its input).

    ``deterministic``: dQ from its own kernel (bitwise reproducible); otherwise added with
    float32 atomics inside the dK/dV kernel into a zeroed accumulator, then cast into grad_q.
    """
    with _on_device(q):
        _attention_bwd(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                       max_seqlen_k, scale, window_left, window_right, allow_tf32,
                       deterministic, grad_q, grad_k, grad_v)


def _attention_bwd(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                   max_seqlen_k, scale, window_left, window_right, allow_tf32, deterministic,
                   grad_q, grad_k, grad_v):
    layout = _Layout(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    if layout.batch == 0 or layout.heads_q == 0:
        return
    precision = _input_precision(q.dtype, allow_tf32)
    group_size = layout.heads_q // layout.heads_kv
    common = dict(HEAD_DIM=layout.head_dim, BLOCK_D=layout.block_d, VARLEN=layout.packed,
                  INPUT_PRECISION=precision)
    delta = torch.empty_like(lse)
    if layout.rows_q > 0:
        attention_bwd_preprocess_kernel[
            (triton.cdiv(layout.rows_q, _PREPROCESS_BLOCK_M), layout.heads_q, layout.batch)](
            out, grad_out, delta, cu_seqlens_q, *layout.strides(out), *layout.strides(grad_out),
            *layout.stat_strides(delta), layout.seqlen_q, HEAD_DIM=layout.head_dim,
            BLOCK_D=layout.block_d, BLOCK_M=_PREPROCESS_BLOCK_M, VARLEN=layout.packed)
    atomic_dq = not deterministic and layout.rows_k > 0
    grad_q_accum = torch.zeros(q.shape, dtype=torch.float32, device=q.device) if atomic_dq \
        else None
    if layout.rows_k > 0:
        def kv_grid(meta):
            return (triton.cdiv(layout.rows_k, meta["BLOCK_N"]), layout.heads_kv, layout.batch)

        accum_strides = layout.strides(grad_q_accum) if atomic_dq else (0, 0, 0)
        _launch(attention_bwd_kv_kernel, "bwd_kv_atomic" if atomic_dq else "bwd_kv", kv_grid,
                q.device, layout.block_d,
                q, k, v, grad_out, lse, delta, grad_k, grad_v, grad_q_accum, cu_seqlens_q,
                cu_seqlens_k, *layout.strides(q), *layout.strides(k), *layout.strides(v),
                *layout.strides(grad_out), *layout.strides(grad_k), *layout.strides(grad_v),
                *accum_strides, *layout.stat_strides(lse), layout.seqlen_q, layout.seqlen_k,
                group_size, scale, scale * LOG2_E, window_left, window_right,
                layout.tune_key_seqlen, ATOMIC_DQ=atomic_dq, **common)
    if atomic_dq:
        grad_q.copy_(grad_q_accum)
    elif layout.rows_q > 0:
        def q_grid(meta):
            return (triton.cdiv(layout.rows_q, meta["BLOCK_M"]), layout.heads_q, layout.batch)

        _launch(attention_bwd_q_kernel, "bwd_q", q_grid, q.device, layout.block_d,
                q, k, v, grad_out, lse, delta, grad_q, cu_seqlens_q, cu_seqlens_k,
                *layout.strides(q), *layout.strides(k), *layout.strides(v),
                *layout.strides(grad_out), *layout.strides(grad_q), *layout.stat_strides(lse),
                layout.seqlen_q, layout.seqlen_k, group_size, scale, scale * LOG2_E,
                window_left, window_right, layout.tune_key_seqlen, **common)


__all__ = ["attention_bwd_launch", "attention_fwd_launch", "attention_fwd_kernel",
           "attention_bwd_kv_kernel", "attention_bwd_q_kernel", "attention_bwd_preprocess_kernel"]
