"""Fused partition attention kernels (Triton): forward, and backward for dQ and dK/dV.

Everything works in the *group-sorted* index space of each sequence: sorted index
``i`` is memory row ``perm[b, i]``, the group-0 positions first (``i < n0[b]``), then
group 1. Same-group attention is then two diagonal blocks and cross-group attention
two off-diagonal blocks, so a tile of queries that lies in one group visits only the
key tiles of the range it may see; only tiles that straddle ``n0`` are masked. Rows
are read and written through ``perm`` (no permuted copies), so tensors stay in their
original order in memory. Online softmax with fp32 accumulation; a query with no
visible key yields zero output and zero gradients (its logsumexp is stored as +inf).

Imported lazily (by ``triton_backend``) because ``TRITON_INTERPRET`` is read when a
kernel is defined.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _program(N0, n_heads, stride_b, stride_h):
    """(batch-head program id, sequence, split point n0, offset of this head's rows)."""
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    return pid_bh, b, tl.load(N0 + b), b * stride_b + h * stride_h


@triton.jit
def _load_rows(PTR, base, rows, stride_l, offs_d, ok):
    """A [rows, HEAD_DIM] tile read through the permutation (zeros where not ``ok``)."""
    return tl.load(PTR + base + rows[:, None] * stride_l + offs_d[None, :], mask=ok[:, None], other=0.0)


@triton.jit
def _tile_rows(PERM, b, seq_len, start, BLOCK: tl.constexpr, lo, hi):
    """Sorted indices of one tile, which of them lie in [lo, hi), and their memory rows."""
    offs = start + tl.arange(0, BLOCK)
    ok = (offs >= lo) & (offs < hi)
    return offs, ok, tl.load(PERM + b * seq_len + offs, mask=ok, other=0)


@triton.jit
def _store_rows(PTR, base, rows, stride_l, offs_d, ok, values):
    tl.store(PTR + base + rows[:, None] * stride_l + offs_d[None, :], values.to(PTR.dtype.element_ty),
             mask=ok[:, None])


@triton.jit
def _backward_tile(q, k, v, do, lse, delta, allowed, scale):
    """Recomputed probabilities P and score gradients dS = P * (dO V^T - delta) of one tile."""
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    p = tl.where(allowed, tl.exp(s - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision="ieee")
    return p, p * (dp - delta[:, None])


@triton.jit
def _key_range(start_m, n0, seq_len, BLOCK_M: tl.constexpr, SAME: tl.constexpr):
    """[lo, hi) of sorted key indices a query tile may see; the whole row if it straddles n0."""
    end_m = start_m + BLOCK_M
    all_g0 = end_m <= n0
    all_g1 = start_m >= n0
    if SAME:
        lo = tl.where(all_g1, n0, 0)
        hi = tl.where(all_g0, n0, seq_len)
    else:
        lo = tl.where(all_g0, n0, 0)
        hi = tl.where(all_g1, n0, seq_len)
    return lo, hi


@triton.jit
def _scores_mask(offs_m, offs_n, n0, hi, seq_len, SAME: tl.constexpr):
    q_g1 = offs_m >= n0
    k_g1 = offs_n >= n0
    if SAME:
        allowed = q_g1[:, None] == k_g1[None, :]
    else:
        allowed = q_g1[:, None] != k_g1[None, :]
    valid = (offs_m[:, None] < seq_len) & (offs_n[None, :] < hi) & (offs_n[None, :] < seq_len)
    return allowed & valid


@triton.jit
def _partition_fwd(Q, K, V, O, LSE, PERM, N0,
                   stride_b, stride_h, stride_l, lse_stride_bh,
                   seq_len, n_heads, scale,
                   SAME: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    pid_bh, b, n0, base = _program(N0, n_heads, stride_b, stride_h)
    start_m = tl.program_id(0) * BLOCK_M
    offs_m, row_ok, q_rows = _tile_rows(PERM, b, seq_len, start_m, BLOCK_M, 0, seq_len)
    offs_d = tl.arange(0, HEAD_DIM)
    q = _load_rows(Q, base, q_rows, stride_l, offs_d, row_ok)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    lo, hi = _key_range(start_m, n0, seq_len, BLOCK_M, SAME)
    for start_n in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
        offs_n, in_range, k_rows = _tile_rows(PERM, b, seq_len, start_n, BLOCK_N, lo, hi)
        k = _load_rows(K, base, k_rows, stride_l, offs_d, in_range)
        v = _load_rows(V, base, k_rows, stride_l, offs_d, in_range)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        allowed = _scores_mask(offs_m, offs_n, n0, hi, seq_len, SAME) & in_range[None, :]
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
    has_key = l_i > 0.0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    lse = tl.where(has_key, m_i + tl.log(tl.where(has_key, l_i, 1.0)), float("inf"))
    _store_rows(O, base, q_rows, stride_l, offs_d, row_ok, out)
    tl.store(LSE + pid_bh * lse_stride_bh + q_rows, lse, mask=row_ok)


@triton.jit
def _partition_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA, PERM, N0,
                      stride_b, stride_h, stride_l, lse_stride_bh,
                      seq_len, n_heads, scale,
                      SAME: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    pid_bh, b, n0, base = _program(N0, n_heads, stride_b, stride_h)
    start_m = tl.program_id(0) * BLOCK_M
    offs_m, row_ok, q_rows = _tile_rows(PERM, b, seq_len, start_m, BLOCK_M, 0, seq_len)
    offs_d = tl.arange(0, HEAD_DIM)
    q = _load_rows(Q, base, q_rows, stride_l, offs_d, row_ok)
    do = _load_rows(DO, base, q_rows, stride_l, offs_d, row_ok)
    lse = tl.load(LSE + pid_bh * lse_stride_bh + q_rows, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + pid_bh * lse_stride_bh + q_rows, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    lo, hi = _key_range(start_m, n0, seq_len, BLOCK_M, SAME)
    for start_n in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
        offs_n, in_range, k_rows = _tile_rows(PERM, b, seq_len, start_n, BLOCK_N, lo, hi)
        k = _load_rows(K, base, k_rows, stride_l, offs_d, in_range)
        v = _load_rows(V, base, k_rows, stride_l, offs_d, in_range)
        allowed = _scores_mask(offs_m, offs_n, n0, hi, seq_len, SAME) & in_range[None, :]
        _, ds = _backward_tile(q, k, v, do, lse, delta, allowed, scale)
        dq += tl.dot(ds.to(k.dtype), k, input_precision="ieee")
    _store_rows(DQ, base, q_rows, stride_l, offs_d, row_ok, dq * scale)


@triton.jit
def _partition_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, PERM, N0,
                        stride_b, stride_h, stride_l, lse_stride_bh,
                        seq_len, n_heads, scale,
                        SAME: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    pid_bh, b, n0, base = _program(N0, n_heads, stride_b, stride_h)
    start_n = tl.program_id(0) * BLOCK_N
    offs_n, col_ok, k_rows = _tile_rows(PERM, b, seq_len, start_n, BLOCK_N, 0, seq_len)
    offs_d = tl.arange(0, HEAD_DIM)
    k = _load_rows(K, base, k_rows, stride_l, offs_d, col_ok)
    v = _load_rows(V, base, k_rows, stride_l, offs_d, col_ok)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    # The masks are symmetric: the queries that may see this key tile are found like the
    # keys a query tile may see.
    lo, hi = _key_range(start_n, n0, seq_len, BLOCK_N, SAME)
    for start_m in range((lo // BLOCK_M) * BLOCK_M, hi, BLOCK_M):
        offs_m, in_range, q_rows = _tile_rows(PERM, b, seq_len, start_m, BLOCK_M, lo, hi)
        q = _load_rows(Q, base, q_rows, stride_l, offs_d, in_range)
        do = _load_rows(DO, base, q_rows, stride_l, offs_d, in_range)
        lse = tl.load(LSE + pid_bh * lse_stride_bh + q_rows, mask=in_range, other=float("inf"))
        delta = tl.load(DELTA + pid_bh * lse_stride_bh + q_rows, mask=in_range, other=0.0)
        allowed = _scores_mask(offs_m, offs_n, n0, seq_len, seq_len, SAME) & in_range[:, None] & col_ok[None, :]
        p, ds = _backward_tile(q, k, v, do, lse, delta, allowed, scale)  # [BLOCK_M, BLOCK_N]
        dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision="ieee")
        dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision="ieee")
    _store_rows(DK, base, k_rows, stride_l, offs_d, col_ok, dk * scale)
    _store_rows(DV, base, k_rows, stride_l, offs_d, col_ok, dv)
