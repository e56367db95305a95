"""Triton kernels for Nadaraya-Watson attention pooling (GPU backend).

Scores are ``s_ij = -(w_j / 2) * ||q_i - k_j||^2``; the output is the softmax
over keys applied to the values. The interface (four functions on canonical
tensors) is described in ``kernels/__init__.py``.

Shared keys follow FlashAttention: a program owns one (batch, query tile) and
streams key tiles through an online softmax (running max, rescale, running
sum, accumulator), then stores the log-sum-exp. The backward recomputes the
probabilities from that log-sum-exp in two passes, one program per query tile
for ``dq`` and one per key tile for ``dk``, ``dv`` and ``dw``. Every output
element is owned by exactly one program and summed in a fixed order, so there
are no atomics and results repeat bit for bit.

Why the tiles are the shape they are:

* Shared layout, compute-bound: one exp and a handful of FMAs per pair. For
  d < 16 there is no matrix product, so nothing forces FlashAttention's MMA
  layout; what matters is where the reductions fall. Every tile is laid out
  as (streamed points, owned points): dim 0 runs over the keys a query tile
  streams (or the queries a key tile streams), dim 1 over the points the
  program owns. Triton's default layout spreads threads along the last dim,
  so with ``BLOCK_owned >= 32 * num_warps`` each thread owns whole columns:
  the max and the sums over the streamed axis stay inside one thread (no
  shuffles), the running max/sum are one register a thread, and a streamed
  point is a warp-wide broadcast load serving 32 owned points at once.
* The streamed extent is the register budget: each live tile (squared
  distance, score/probability, and in the backward ``g.v`` and ``t``) costs
  ``BLOCK_streamed * BLOCK_owned / threads`` registers a thread, and every
  streamed point's coordinates, bandwidth and values sit in every thread. So
  it stays at 8-32 while the owned extent is 64-512 (1, 2 or 4 points a
  thread, which also shares each broadcast load among them); autotuning
  picks among those.
* Features and channels are looped over one at a time (a column of queries
  against a column of keys) rather than broadcast as a 3-D tile, which would
  multiply the register tile by d. With half-precision inputs and d >= 16 the
  cross term q.k runs on tensor cores; with c >= 16 so does p @ v.
* Rows layout, memory-bound: it reads ``2 n m`` numbers once, so its tiles
  are wide along the contiguous key axis (128-1024 elements, whole 128-byte
  transactions) and a few rows tall; reductions there cost nothing next to
  the memory traffic.
* Under ``TRITON_INTERPRET=1`` the cost is per program and per block step, not
  per element, so one large fixed tile is used there instead of autotuning.
"""

import os

import torch
import triton
import triton.language as tl

from . import distance_shift

LOG2E = 1.4426950408889634

# Columns of the rows-layout backward: fixed (not autotuned) because the number
# of per-column-block partial sums for dq, and so a buffer's shape, depends on
# it. Rows are split into groups whose partials for dw are summed afterwards;
# ROW_ALIGN is a multiple of every BLOCK_R so a row tile never straddles groups.
ROWS_BWD_BLOCK_M = 256
ROW_ALIGN = 64
# Aim for this many programs in the rows backward (a few waves of 132 SMs).
ROWS_BWD_TARGET_PROGRAMS = 1024

# One fixed large tile for the interpreter (cost is per block step there).
# BLOCK_N always counts queries and BLOCK_M keys. Tests may shrink these to
# exercise multi-tile paths.
INTERPRET_CONFIGS = {
    "fwd": {"BLOCK_N": 256, "BLOCK_M": 1024},
    "dq": {"BLOCK_N": 256, "BLOCK_M": 1024},
    "dkv": {"BLOCK_N": 1024, "BLOCK_M": 256},
    "rows_fwd": {"BLOCK_R": 64, "BLOCK_M": 1024},
    "rows_bwd": {"BLOCK_R": 64, "BLOCK_M": 1024},
}


def _cfg(warps, **blocks):
    return triton.Config(blocks, num_warps=warps, num_stages=2)


# Owned extent >= 32 * num_warps in every shared-layout config (see above):
# 1, 2 or 4 owned points a thread. The streamed step is what the registers
# allow: 32 for the forward at d = 1, 16 in general, 8 for the backward with
# a few features and channels (ptxas reports no spills for these on sm_90).
FWD_CONFIGS = [
    _cfg(4, BLOCK_N=128, BLOCK_M=32),
    _cfg(4, BLOCK_N=128, BLOCK_M=16),
    _cfg(4, BLOCK_N=256, BLOCK_M=32),
    _cfg(4, BLOCK_N=512, BLOCK_M=16),
    _cfg(8, BLOCK_N=256, BLOCK_M=16),
    _cfg(2, BLOCK_N=64, BLOCK_M=16),
]
DQ_CONFIGS = [
    _cfg(4, BLOCK_N=128, BLOCK_M=16),
    _cfg(4, BLOCK_N=128, BLOCK_M=8),
    _cfg(4, BLOCK_N=256, BLOCK_M=16),
    _cfg(8, BLOCK_N=256, BLOCK_M=8),
    _cfg(2, BLOCK_N=64, BLOCK_M=16),
]
DKV_CONFIGS = [
    _cfg(4, BLOCK_M=128, BLOCK_N=16),
    _cfg(4, BLOCK_M=128, BLOCK_N=8),
    _cfg(4, BLOCK_M=256, BLOCK_N=16),
    _cfg(8, BLOCK_M=256, BLOCK_N=8),
    _cfg(2, BLOCK_M=64, BLOCK_N=16),
]


def _prune_for_dot(configs, named_args, **meta):
    # tl.dot needs every dimension >= 16, the streamed step included.
    if not (meta.get("USE_DOT_QK") or meta.get("USE_DOT_PV")):
        return configs
    return [c for c in configs if min(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_M"]) >= 16]


# Rows layout: 2-16 rows of 256-1024 contiguous keys a program. Taller
# tiles spill on sm_90: every element carries its own 64-bit address.
ROWS_FWD_CONFIGS = [
    _cfg(4, BLOCK_R=2, BLOCK_M=1024),
    _cfg(8, BLOCK_R=4, BLOCK_M=1024),
    _cfg(4, BLOCK_R=4, BLOCK_M=512),
    _cfg(4, BLOCK_R=8, BLOCK_M=256),
    _cfg(8, BLOCK_R=16, BLOCK_M=256),
]
ROWS_BWD_CONFIGS = [
    _cfg(4, BLOCK_R=2),
    _cfg(4, BLOCK_R=4),
    _cfg(4, BLOCK_R=8),
    _cfg(8, BLOCK_R=8),
]


# ---------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------


@triton.jit
def _exp(x, USE_EXP2: tl.constexpr):
    # float32 works in log2 units (log2(e) folded into the per-key constant)
    # so each pair costs one ex2.approx; float64 keeps natural units because a
    # float literal for log2(e) would be rounded to float32.
    if USE_EXP2:
        y = tl.exp2(x)
    else:
        y = tl.exp(x)
    return y


@triton.jit
def _split_lse(lse, SCALE: tl.constexpr, ACC: tl.constexpr):
    # The float64 lse in the scores' units as a (high, low) pair: (s - high) -
    # low keeps the weight of the nearest keys exact to rounding even where
    # |lse| is large (a query far from every key).
    scaled = lse * SCALE
    high = scaled.to(ACC)
    return high, (scaled - high.to(tl.float64)).to(ACC)


@triton.jit
def _load_tile(ptr, rows, WIDTH: tl.constexpr, BLOCK: tl.constexpr):
    # (len(rows), BLOCK) tile of a row-major (*, WIDTH) matrix. Rows are
    # already clamped in range; only the padded columns need a mask.
    offs = tl.arange(0, BLOCK)
    return tl.load(
        ptr + rows[:, None] * WIDTH + offs[None, :], mask=offs[None, :] < WIDTH, other=0.0
    )


@triton.jit
def _load_tile_t(ptr, rows, WIDTH: tl.constexpr, BLOCK: tl.constexpr):
    # The same tile transposed: (BLOCK, len(rows)).
    offs = tl.arange(0, BLOCK)
    return tl.load(
        ptr + rows[None, :] * WIDTH + offs[:, None], mask=offs[:, None] < WIDTH, other=0.0
    )


@triton.jit
def _stream_rows(offs, size, MASK_TAIL: tl.constexpr):
    # Row indices of a streamed tile. Only the ragged last tile clamps (its
    # padded points are dropped from the softmax by the caller), so full
    # tiles keep provably contiguous indices and vectorised loads.
    if MASK_TAIL:
        offs = tl.minimum(offs, size - 1)
    return offs.to(tl.int64)


@triton.jit
def _keep(offs_s, offs_o, size_s, MASK_TAIL: tl.constexpr, MASK_SELF: tl.constexpr):
    # (streamed, owned) pairs that take part in the softmax: the streamed
    # point exists (ragged last tile) and is not the owned point itself
    # (exclude_self, where queries and keys share indices).
    if MASK_TAIL:
        keep = (offs_s < size_s)[:, None]
        if MASK_SELF:
            keep = keep & (offs_s[:, None] != offs_o[None, :])
    else:
        keep = offs_s[:, None] != offs_o[None, :]
    return keep


@triton.jit
def _sq_dist_direct(a_ptr, b_ptr, a_rows, b_rows, D: tl.constexpr, ACC: tl.constexpr):
    # ||a_s - b_o||^2 as a (len(a_rows), len(b_rows)) tile, in the difference
    # form one feature at a time: exact to rounding whatever the norms of the
    # points, unlike ||a||^2 + ||b||^2 - 2 a.b. Also returns the first
    # feature's a - b, so d = 1 never recomputes it in the backward.
    af = tl.load(a_ptr + a_rows * D).to(ACC)
    bf = tl.load(b_ptr + b_rows * D).to(ACC)
    diff0 = af[:, None] - bf[None, :]
    dist2 = diff0 * diff0
    for f in range(1, D):
        af = tl.load(a_ptr + a_rows * D + f).to(ACC)
        bf = tl.load(b_ptr + b_rows * D + f).to(ACC)
        diff = af[:, None] - bf[None, :]
        dist2 += diff * diff
    return dist2, diff0


@triton.jit
def _sq_dist_dot(a, aa, b_t, bb, DOT_PREC: tl.constexpr):
    # Cross term on tensor cores (half-precision inputs, d >= 16): products of
    # half values are exact in float32 and accumulate in float32, far below
    # the half-precision tolerance. a is (S, BLOCK_D), b_t is (BLOCK_D, O).
    dist2 = aa[:, None] + bb[None, :] - 2.0 * tl.dot(a, b_t, input_precision=DOT_PREC)
    # Cancellation can leave tiny negatives; `where` (unlike maximum) keeps NaN.
    return tl.where(dist2 < 0.0, 0.0, dist2)


@triton.jit
def _sq_norm(x, AXIS: tl.constexpr, ACC: tl.constexpr):
    xf = x.to(ACC)
    return tl.sum(xf * xf, axis=AXIS)


@triton.jit
def _place_row(acc, row, j, BLOCK: tl.constexpr):
    # acc[j, :] += row for a (BLOCK, owned) accumulator, without dynamic
    # indexing into registers. Keeping the owned points on dim 1 here too
    # means row needs no layout change.
    offs = tl.arange(0, BLOCK)
    return acc + tl.where(offs[:, None] == j, row[None, :], 0.0)


# ---------------------------------------------------------------------------
# Shared keys: forward. Tiles are (BLOCK_M keys, BLOCK_N queries).
# ---------------------------------------------------------------------------


@triton.jit
def _fwd_tile(
    m_i,
    l_i,
    acc,
    q_ptr,
    k_ptr,
    v_ptr,
    w_ptr,
    q_rows,
    offs_n,
    q_t,
    qq,
    start_m,
    m,
    D: tl.constexpr,
    C: tl.constexpr,
    ACC: tl.constexpr,
    USE_EXP2: tl.constexpr,
    SCALE: tl.constexpr,
    USE_DOT_QK: tl.constexpr,
    USE_DOT_PV: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr,
    MASK_TAIL: tl.constexpr,
    MASK_SELF: tl.constexpr,
):
    offs_m = start_m + tl.arange(0, BLOCK_M)
    k_rows = _stream_rows(offs_m, m, MASK_TAIL)
    if USE_DOT_QK:
        k = _load_tile(k_ptr, k_rows, D, BLOCK_D)
        dist2 = _sq_dist_dot(k, _sq_norm(k, 1, ACC), q_t, qq, DOT_PREC)
    else:
        dist2, _ = _sq_dist_direct(k_ptr, q_ptr, k_rows, q_rows, D, ACC)
    # One constant per key: log2(e) * w_j / 2 (or w_j / 2 in float64).
    neg_c = tl.load(w_ptr + k_rows).to(ACC) * (-0.5 * SCALE)
    s = dist2 * neg_c[:, None]
    if MASK_TAIL or MASK_SELF:
        s = tl.where(_keep(offs_m, offs_n, m, MASK_TAIL, MASK_SELF), s, float("-inf"))

    m_new = tl.maximum(m_i, tl.max(s, axis=0))
    # A query whose keys are all masked so far keeps max -inf; subtracting 0
    # instead avoids (-inf) - (-inf) = NaN and leaves its sums at 0.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = _exp(m_i - m_safe, USE_EXP2)
    p = _exp(s - m_safe[None, :], USE_EXP2)
    l_i = l_i * alpha + tl.sum(p, axis=0)
    acc = acc * alpha[None, :]
    if USE_DOT_PV:
        v_t = _load_tile_t(v_ptr, k_rows, C, BLOCK_C).to(tl.float32)
        acc = tl.dot(v_t, p, acc, input_precision=DOT_PREC)
    else:
        for ch in range(C):
            vc = tl.load(v_ptr + k_rows * C + ch).to(ACC)
            acc = _place_row(acc, tl.sum(p * vc[:, None], axis=0), ch, BLOCK_C)
    return m_new, l_i, acc


@triton.jit
def _nw_fwd_kernel(
    Q,
    K,
    V,
    W,
    Out,
    Lse,
    n,
    m,
    D: tl.constexpr,
    C: tl.constexpr,
    EXCLUDE_SELF: tl.constexpr,
    ACC: tl.constexpr,
    USE_EXP2: tl.constexpr,
    SCALE: tl.constexpr,
    USE_DOT_QK: tl.constexpr,
    USE_DOT_PV: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    # Batch and query tile share grid axis 0 (no 65535 limit on batch).
    num_tiles = tl.cdiv(n, BLOCK_N)
    pid = tl.program_id(0)
    b = (pid // num_tiles).to(tl.int64)
    n0 = (pid % num_tiles) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    # Padded query rows read row n - 1 and are never stored.
    q_rows = tl.minimum(offs_n, n - 1).to(tl.int64)
    q_ptr = Q + b * n * D
    k_ptr = K + b * m * D
    v_ptr = V + b * m * C
    w_ptr = W + b * m

    if USE_DOT_QK:
        q_t = _load_tile_t(q_ptr, q_rows, D, BLOCK_D)
        qq = _sq_norm(q_t, 0, ACC)
    else:
        q_t = 0
        qq = 0

    m_i = tl.full([BLOCK_N], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_N], ACC)
    acc = tl.zeros([BLOCK_C, BLOCK_N], ACC)

    # Full key tiles run without masks; only the tiles that hold j == i
    # (exclude_self) and the ragged last tile pay for them.
    m_full = (m // BLOCK_M) * BLOCK_M
    if EXCLUDE_SELF:
        diag_lo = tl.minimum((n0 // BLOCK_M) * BLOCK_M, m_full)
        diag_hi = tl.minimum(tl.cdiv(n0 + BLOCK_N, BLOCK_M) * BLOCK_M, m_full)
    else:
        diag_lo = m_full
        diag_hi = m_full
    for start_m in range(0, diag_lo, BLOCK_M):
        m_i, l_i, acc = _fwd_tile(
            m_i, l_i, acc, q_ptr, k_ptr, v_ptr, w_ptr, q_rows, offs_n, q_t, qq, start_m, m,
            D, C, ACC, USE_EXP2, SCALE, USE_DOT_QK, USE_DOT_PV, DOT_PREC,
            BLOCK_M, BLOCK_D, BLOCK_C, False, False,
        )  # fmt: skip
    for start_m in range(diag_lo, diag_hi, BLOCK_M):
        m_i, l_i, acc = _fwd_tile(
            m_i, l_i, acc, q_ptr, k_ptr, v_ptr, w_ptr, q_rows, offs_n, q_t, qq, start_m, m,
            D, C, ACC, USE_EXP2, SCALE, USE_DOT_QK, USE_DOT_PV, DOT_PREC,
            BLOCK_M, BLOCK_D, BLOCK_C, False, True,
        )  # fmt: skip
    for start_m in range(diag_hi, m_full, BLOCK_M):
        m_i, l_i, acc = _fwd_tile(
            m_i, l_i, acc, q_ptr, k_ptr, v_ptr, w_ptr, q_rows, offs_n, q_t, qq, start_m, m,
            D, C, ACC, USE_EXP2, SCALE, USE_DOT_QK, USE_DOT_PV, DOT_PREC,
            BLOCK_M, BLOCK_D, BLOCK_C, False, False,
        )  # fmt: skip
    for start_m in range(m_full, m, BLOCK_M):
        m_i, l_i, acc = _fwd_tile(
            m_i, l_i, acc, q_ptr, k_ptr, v_ptr, w_ptr, q_rows, offs_n, q_t, qq, start_m, m,
            D, C, ACC, USE_EXP2, SCALE, USE_DOT_QK, USE_DOT_PV, DOT_PREC,
            BLOCK_M, BLOCK_D, BLOCK_C, True, EXCLUDE_SELF,
        )  # fmt: skip

    # l_i == 0 only if every score is -inf; 0 / 0 = NaN is what the reference
    # softmax gives there too.
    out = acc / l_i[None, :]
    # float64: the backward needs exp(s - lse) exact where |lse| is large.
    lse = m_i.to(tl.float64) * (1.0 / SCALE) + tl.log(l_i.to(tl.float64))

    n_mask = offs_n < n
    rows = offs_n.to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    tl.store(
        Out + b * n * C + rows[None, :] * C + offs_c[:, None],
        out,
        mask=(offs_c[:, None] < C) & n_mask[None, :],
    )
    tl.store(Lse + b * n + rows, lse, mask=n_mask)


# ---------------------------------------------------------------------------
# Shared keys: backward, dq. One program per query tile streams key tiles;
# tiles are (BLOCK_M keys, BLOCK_N queries).
# ---------------------------------------------------------------------------


@triton.jit
def _dq_tile(
    dq_t,
    a_sum,
    q_ptr,
    k_ptr,
    v_ptr,
    w_ptr,
    g_ptr,
    q_rows,
    offs_n,
    q_t,
    qq,
    g_t,
    lse_s,
    lse_lo,
    delta,
    start_m,
    m,
    D: tl.constexpr,
    C: tl.constexpr,
    ACC: tl.constexpr,
    USE_EXP2: tl.constexpr,
    SCALE: tl.constexpr,
    USE_DOT_QK: tl.constexpr,
    USE_DOT_PV: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr,
    MASK_TAIL: tl.constexpr,
    MASK_SELF: tl.constexpr,
):
    offs_m = start_m + tl.arange(0, BLOCK_M)
    k_rows = _stream_rows(offs_m, m, MASK_TAIL)
    if USE_DOT_QK:
        k = _load_tile(k_ptr, k_rows, D, BLOCK_D)
        dist2 = _sq_dist_dot(k, _sq_norm(k, 1, ACC), q_t, qq, DOT_PREC)
        diff0 = 0.0
    else:
        # diff0 = k_j - q_i (first feature)
        dist2, diff0 = _sq_dist_direct(k_ptr, q_ptr, k_rows, q_rows, D, ACC)
    w = tl.load(w_ptr + k_rows).to(ACC)
    p = _exp((dist2 * (w * (-0.5 * SCALE))[:, None] - lse_s[None, :]) - lse_lo[None, :], USE_EXP2)

    # g_i . v_j
    if USE_DOT_PV:
        v = _load_tile(v_ptr, k_rows, C, BLOCK_C)
        gv = tl.dot(v, g_t, input_precision=DOT_PREC)
    else:
        vc = tl.load(v_ptr + k_rows * C).to(ACC)
        gc = tl.load(g_ptr + q_rows * C).to(ACC)
        gv = vc[:, None] * gc[None, :]
        for ch in range(1, C):
            vc = tl.load(v_ptr + k_rows * C + ch).to(ACC)
            gc = tl.load(g_ptr + q_rows * C + ch).to(ACC)
            gv += vc[:, None] * gc[None, :]
    # t_ij = dL/ds_ij and dq_i = -sum_j t_ij w_j (q_i - k_j)
    #                          =  sum_j a_ij (k_j - q_i),  a_ij = t_ij w_j.
    a = p * (gv - delta[None, :]) * w[:, None]
    if MASK_TAIL or MASK_SELF:
        # Dropped pairs get exactly 0, even where lse or delta is NaN:
        # autograd through the reference's -inf mask gives 0 there.
        a = tl.where(_keep(offs_m, offs_n, m, MASK_TAIL, MASK_SELF), a, 0.0)

    if USE_DOT_QK:
        # sum_j a_ij k_j on tensor cores; -A_i q_i is applied once at the end.
        # tf32 keeps a's float32 range (a cast of a to half could overflow for
        # large w) at half precision's mantissa.
        dq_t = tl.dot(tl.trans(k).to(tl.float32), a, dq_t, input_precision=DOT_PREC)
        a_sum += tl.sum(a, axis=0)
    else:
        dq_t = _place_row(dq_t, tl.sum(a * diff0, axis=0), 0, BLOCK_D)
        for f in range(1, D):
            kf = tl.load(k_ptr + k_rows * D + f).to(ACC)
            qf = tl.load(q_ptr + q_rows * D + f).to(ACC)
            dq_t = _place_row(dq_t, tl.sum(a * (kf[:, None] - qf[None, :]), axis=0), f, BLOCK_D)
    return dq_t, a_sum


@triton.jit
def _nw_bwd_dq_kernel(
    Q,
    K,
    V,
    W,
    G,
    Lse,
    Delta,
    DQ,
    n,
    m,
    D: tl.constexpr,
    C: tl.constexpr,
    EXCLUDE_SELF: tl.constexpr,
    ACC: tl.constexpr,
    USE_EXP2: tl.constexpr,
    SCALE: tl.constexpr,
    USE_DOT_QK: tl.constexpr,
    USE_DOT_PV: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    num_tiles = tl.cdiv(n, BLOCK_N)
    pid = tl.program_id(0)
    b = (pid // num_tiles).to(tl.int64)
    n0 = (pid % num_tiles) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    q_rows = tl.minimum(offs_n, n - 1).to(tl.int64)
    q_ptr = Q + b * n * D
    k_ptr = K + b * m * D
    v_ptr = V + b * m * C
    w_ptr = W + b * m
    g_ptr = G + b * n * C

    lse_s, lse_lo = _split_lse(tl.load(Lse + b * n + q_rows), SCALE, ACC)
    delta = tl.load(Delta + b * n + q_rows).to(ACC)
    if USE_DOT_QK:
        q_t = _load_tile_t(q_ptr, q_rows, D, BLOCK_D)
        qq = _sq_norm(q_t, 0, ACC)
    else:
        q_t = 0
        qq = 0
    if USE_DOT_PV:
        g_t = _load_tile_t(g_ptr, q_rows, C, BLOCK_C)
    else:
        g_t = 0

    dq_t = tl.zeros([BLOCK_D, BLOCK_N], ACC)
    a_sum = tl.zeros([BLOCK_N], ACC)

    m_full = (m // BLOCK_M) * BLOCK_M
    if EXCLUDE_SELF:
        diag_lo = tl.minimum((n0 // BLOCK_M) * BLOCK_M, m_full)
        diag_hi = tl.minimum(tl.cdiv(n0 + BLOCK_N, BLOCK_M) * BLOCK_M, m_full)
    else:
        diag_lo = m_full
        diag_hi = m_full
    for start_m in range(0, diag_lo, BLOCK_M):
        dq_t, a_sum = _dq_tile(
            dq_t, a_sum, q_ptr, k_ptr, v_ptr, w_ptr, g_ptr, q_rows, offs_n, q_t, qq,
            g_t, lse_s, lse_lo, delta, start_m, m, D, C, ACC, USE_EXP2, SCALE, USE_DOT_QK,
            USE_DOT_PV, DOT_PREC, BLOCK_M, BLOCK_D, BLOCK_C, False, False,
        )  # fmt: skip
    for start_m in range(diag_lo, diag_hi, BLOCK_M):
        dq_t, a_sum = _dq_tile(
            dq_t, a_sum, q_ptr, k_ptr, v_ptr, w_ptr, g_ptr, q_rows, offs_n, q_t, qq,
            g_t, lse_s, lse_lo, delta, start_m, m, D, C, ACC, USE_EXP2, SCALE, USE_DOT_QK,
            USE_DOT_PV, DOT_PREC, BLOCK_M, BLOCK_D, BLOCK_C, False, True,
        )  # fmt: skip
    for start_m in range(diag_hi, m_full, BLOCK_M):
        dq_t, a_sum = _dq_tile(
            dq_t, a_sum, q_ptr, k_ptr, v_ptr, w_ptr, g_ptr, q_rows, offs_n, q_t, qq,
            g_t, lse_s, lse_lo, delta, start_m, m, D, C, ACC, USE_EXP2, SCALE, USE_DOT_QK,
            USE_DOT_PV, DOT_PREC, BLOCK_M, BLOCK_D, BLOCK_C, False, False,
        )  # fmt: skip
    for start_m in range(m_full, m, BLOCK_M):
        dq_t, a_sum = _dq_tile(
            dq_t, a_sum, q_ptr, k_ptr, v_ptr, w_ptr, g_ptr, q_rows, offs_n, q_t, qq,
            g_t, lse_s, lse_lo, delta, start_m, m, D, C, ACC, USE_EXP2, SCALE, USE_DOT_QK,
            USE_DOT_PV, DOT_PREC, BLOCK_M, BLOCK_D, BLOCK_C, True, EXCLUDE_SELF,
        )  # fmt: skip

    if USE_DOT_QK:
        dq_t -= a_sum[None, :] * q_t.to(ACC)
    offs_d = tl.arange(0, BLOCK_D)
    rows = offs_n.to(tl.int64)
    tl.store(
        DQ + b * n * D + rows[None, :] * D + offs_d[:, None],
        dq_t,
        mask=(offs_d[:, None] < D) & (offs_n < n)[None, :],
    )


# ---------------------------------------------------------------------------
# Shared keys: backward, dk / dv / dw. One program per key tile streams query
# tiles; tiles are (BLOCK_N queries, BLOCK_M keys).
# ---------------------------------------------------------------------------


@triton.jit
def _dkv_tile(
    dk_t,
    t_sum,
    dv_t,
    dw_acc,
    q_ptr,
    k_ptr,
    v_ptr,
    g_ptr,
    lse_ptr,
    delta_ptr,
    shift_ptr,
    k_rows,
    offs_m,
    neg_c,
    k_t,
    kk,
    v_t,
    start_n,
    n,
    D: tl.constexpr,
    C: tl.constexpr,
    ACC: tl.constexpr,
    USE_EXP2: tl.constexpr,
    SCALE: tl.constexpr,
    USE_DOT_QK: tl.constexpr,
    USE_DOT_PV: tl.constexpr,
    DOT_PREC: tl.constexpr,
    NEED_DK: tl.constexpr,
    NEED_DV: tl.constexpr,
    NEED_DW: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr,
    MASK_TAIL: tl.constexpr,
    MASK_SELF: tl.constexpr,
):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    q_rows = _stream_rows(offs_n, n, MASK_TAIL)
    lse_s, lse_lo = _split_lse(tl.load(lse_ptr + q_rows), SCALE, ACC)
    if USE_DOT_QK:
        q = _load_tile(q_ptr, q_rows, D, BLOCK_D)
        dist2 = _sq_dist_dot(q, _sq_norm(q, 1, ACC), k_t, kk, DOT_PREC)
        diff0 = 0.0
    else:
        # diff0 = q_i - k_j (first feature)
        dist2, diff0 = _sq_dist_direct(q_ptr, k_ptr, q_rows, k_rows, D, ACC)
    s = dist2 * neg_c[None, :]
    if MASK_SELF:
        # p_ii = exp(-inf - lse_i): 0, or NaN in a NaN row, which is what the
        # reference softmax holds there and so what reaches dv through p.
        s = tl.where(offs_n[:, None] != offs_m[None, :], s, float("-inf"))
    p = _exp((s - lse_s[:, None]) - lse_lo[:, None], USE_EXP2)
    if MASK_TAIL:
        p = tl.where((offs_n < n)[:, None], p, 0.0)

    # dv_j = sum_i p_ij g_i, and g_i . v_j for t (which dk and dw need).
    if USE_DOT_PV:
        g = _load_tile(g_ptr, q_rows, C, BLOCK_C)
        if NEED_DV:
            dv_t = tl.dot(tl.trans(g).to(tl.float32), p, dv_t, input_precision=DOT_PREC)
        if NEED_DK or NEED_DW:
            gv = tl.dot(g, v_t, input_precision=DOT_PREC)
    else:
        gc = tl.load(g_ptr + q_rows * C).to(ACC)
        if NEED_DV:
            dv_t = _place_row(dv_t, tl.sum(p * gc[:, None], axis=0), 0, BLOCK_C)
        if NEED_DK or NEED_DW:
            gv = gc[:, None] * tl.load(v_ptr + k_rows * C).to(ACC)[None, :]
        for ch in range(1, C):
            gc = tl.load(g_ptr + q_rows * C + ch).to(ACC)
            if NEED_DV:
                dv_t = _place_row(dv_t, tl.sum(p * gc[:, None], axis=0), ch, BLOCK_C)
            if NEED_DK or NEED_DW:
                gv += gc[:, None] * tl.load(v_ptr + k_rows * C + ch).to(ACC)[None, :]

    if NEED_DK or NEED_DW:
        delta = tl.load(delta_ptr + q_rows).to(ACC)
        t = p * (gv - delta[:, None])
        if MASK_TAIL or MASK_SELF:
            # Dropped pairs get exactly 0, even where lse or delta is NaN:
            # autograd through the reference's -inf mask gives 0 there.
            t = tl.where(_keep(offs_n, offs_m, n, MASK_TAIL, MASK_SELF), t, 0.0)
        if NEED_DW:
            shift = tl.load(shift_ptr + q_rows).to(ACC)
            dw_acc += tl.sum(t * (dist2 - shift[:, None]), axis=0)
        if NEED_DK:
            # dk_j = w_j sum_i t_ij (q_i - k_j); w_j is applied at the end.
            if USE_DOT_QK:
                dk_t = tl.dot(tl.trans(q).to(tl.float32), t, dk_t, input_precision=DOT_PREC)
                t_sum += tl.sum(t, axis=0)
            else:
                dk_t = _place_row(dk_t, tl.sum(t * diff0, axis=0), 0, BLOCK_D)
                for f in range(1, D):
                    qf = tl.load(q_ptr + q_rows * D + f).to(ACC)
                    kf = tl.load(k_ptr + k_rows * D + f).to(ACC)
                    dk_t = _place_row(
                        dk_t, tl.sum(t * (qf[:, None] - kf[None, :]), axis=0), f, BLOCK_D
                    )
    return dk_t, t_sum, dv_t, dw_acc


@triton.jit
def _nw_bwd_dkv_kernel(
    Q,
    K,
    V,
    W,
    G,
    Lse,
    Delta,
    Shift,
    DK,
    DV,
    DW,
    n,
    m,
    D: tl.constexpr,
    C: tl.constexpr,
    EXCLUDE_SELF: tl.constexpr,
    ACC: tl.constexpr,
    USE_EXP2: tl.constexpr,
    SCALE: tl.constexpr,
    USE_DOT_QK: tl.constexpr,
    USE_DOT_PV: tl.constexpr,
    DOT_PREC: tl.constexpr,
    NEED_DK: tl.constexpr,
    NEED_DV: tl.constexpr,
    NEED_DW: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    num_tiles = tl.cdiv(m, BLOCK_M)
    pid = tl.program_id(0)
    b = (pid // num_tiles).to(tl.int64)
    m0 = (pid % num_tiles) * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    # Padded key columns read key m - 1 and are never stored.
    k_rows = tl.minimum(offs_m, m - 1).to(tl.int64)
    q_ptr = Q + b * n * D
    k_ptr = K + b * m * D
    v_ptr = V + b * m * C
    g_ptr = G + b * n * C
    lse_ptr = Lse + b * n
    delta_ptr = Delta + b * n
    shift_ptr = Shift + b * n

    w = tl.load(W + b * m + k_rows).to(ACC)
    neg_c = w * (-0.5 * SCALE)
    if USE_DOT_QK:
        k_t = _load_tile_t(k_ptr, k_rows, D, BLOCK_D)
        kk = _sq_norm(k_t, 0, ACC)
    else:
        k_t = 0
        kk = 0
    if USE_DOT_PV:
        v_t = _load_tile_t(v_ptr, k_rows, C, BLOCK_C)
    else:
        v_t = 0

    dk_t = tl.zeros([BLOCK_D, BLOCK_M], ACC)
    t_sum = tl.zeros([BLOCK_M], ACC)
    dv_t = tl.zeros([BLOCK_C, BLOCK_M], ACC)
    dw_acc = tl.zeros([BLOCK_M], ACC)

    n_full = (n // BLOCK_N) * BLOCK_N
    if EXCLUDE_SELF:
        diag_lo = tl.minimum((m0 // BLOCK_N) * BLOCK_N, n_full)
        diag_hi = tl.minimum(tl.cdiv(m0 + BLOCK_M, BLOCK_N) * BLOCK_N, n_full)
    else:
        diag_lo = n_full
        diag_hi = n_full
    for start_n in range(0, diag_lo, BLOCK_N):
        dk_t, t_sum, dv_t, dw_acc = _dkv_tile(
            dk_t, t_sum, dv_t, dw_acc, q_ptr, k_ptr, v_ptr, g_ptr, lse_ptr, delta_ptr, shift_ptr,
            k_rows, offs_m, neg_c, k_t, kk, v_t, start_n, n, D, C, ACC, USE_EXP2,
            SCALE, USE_DOT_QK, USE_DOT_PV, DOT_PREC, NEED_DK, NEED_DV, NEED_DW,
            BLOCK_N, BLOCK_D, BLOCK_C, False, False,
        )  # fmt: skip
    for start_n in range(diag_lo, diag_hi, BLOCK_N):
        dk_t, t_sum, dv_t, dw_acc = _dkv_tile(
            dk_t, t_sum, dv_t, dw_acc, q_ptr, k_ptr, v_ptr, g_ptr, lse_ptr, delta_ptr, shift_ptr,
            k_rows, offs_m, neg_c, k_t, kk, v_t, start_n, n, D, C, ACC, USE_EXP2,
            SCALE, USE_DOT_QK, USE_DOT_PV, DOT_PREC, NEED_DK, NEED_DV, NEED_DW,
            BLOCK_N, BLOCK_D, BLOCK_C, False, True,
        )  # fmt: skip
    for start_n in range(diag_hi, n_full, BLOCK_N):
        dk_t, t_sum, dv_t, dw_acc = _dkv_tile(
            dk_t, t_sum, dv_t, dw_acc, q_ptr, k_ptr, v_ptr, g_ptr, lse_ptr, delta_ptr, shift_ptr,
            k_rows, offs_m, neg_c, k_t, kk, v_t, start_n, n, D, C, ACC, USE_EXP2,
            SCALE, USE_DOT_QK, USE_DOT_PV, DOT_PREC, NEED_DK, NEED_DV, NEED_DW,
            BLOCK_N, BLOCK_D, BLOCK_C, False, False,
        )  # fmt: skip
    for start_n in range(n_full, n, BLOCK_N):
        dk_t, t_sum, dv_t, dw_acc = _dkv_tile(
            dk_t, t_sum, dv_t, dw_acc, q_ptr, k_ptr, v_ptr, g_ptr, lse_ptr, delta_ptr, shift_ptr,
            k_rows, offs_m, neg_c, k_t, kk, v_t, start_n, n, D, C, ACC, USE_EXP2,
            SCALE, USE_DOT_QK, USE_DOT_PV, DOT_PREC, NEED_DK, NEED_DV, NEED_DW,
            BLOCK_N, BLOCK_D, BLOCK_C, True, EXCLUDE_SELF,
        )  # fmt: skip

    m_mask = offs_m < m
    cols = offs_m.to(tl.int64)
    if NEED_DK:
        if USE_DOT_QK:
            dk_t -= t_sum[None, :] * k_t.to(ACC)
        offs_d = tl.arange(0, BLOCK_D)
        tl.store(
            DK + b * m * D + cols[None, :] * D + offs_d[:, None],
            dk_t * w[None, :],
            mask=(offs_d[:, None] < D) & m_mask[None, :],
        )
    if NEED_DV:
        offs_c = tl.arange(0, BLOCK_C)
        tl.store(
            DV + b * m * C + cols[None, :] * C + offs_c[:, None],
            dv_t,
            mask=(offs_c[:, None] < C) & m_mask[None, :],
        )
    if NEED_DW:
        tl.store(DW + b * m + cols, -0.5 * dw_acc, mask=m_mask)


# ---------------------------------------------------------------------------
# Per-query rows: query (n,), keys (n, m), values (n, m), w (m,)
# ---------------------------------------------------------------------------


@triton.jit
def _nw_rows_fwd_kernel(
    Q,
    K,
    V,
    W,
    Out,
    Lse,
    n,
    m,
    ACC: tl.constexpr,
    USE_EXP2: tl.constexpr,
    SCALE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    # Padded rows read row n - 1 (finite work, never stored), so only the
    # ragged last column block needs a mask.
    rows = tl.minimum(offs_r, n - 1).to(tl.int64)
    q = tl.load(Q + rows).to(ACC)
    row_base = rows[:, None] * m  # int64: n * m may pass 2^31

    m_i = tl.full([BLOCK_R], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_R], ACC)
    acc = tl.zeros([BLOCK_R], ACC)
    for start in range(0, m, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        c_mask = offs_m < m
        mask = c_mask[None, :]
        k = tl.load(K + row_base + offs_m[None, :], mask=mask, other=0.0).to(ACC)
        v = tl.load(V + row_base + offs_m[None, :], mask=mask, other=0.0).to(ACC)
        neg_c = tl.load(W + offs_m, mask=c_mask, other=0.0).to(ACC) * (-0.5 * SCALE)
        diff = q[:, None] - k
        s = tl.where(mask, diff * diff * neg_c[None, :], float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = _exp(m_i - m_safe, USE_EXP2)
        p = _exp(s - m_safe[:, None], USE_EXP2)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha + tl.sum(p * v, axis=1)
        m_i = m_new
    r_mask = offs_r < n
    tl.store(Out + offs_r, acc / l_i, mask=r_mask)
    lse = m_i.to(tl.float64) * (1.0 / SCALE) + tl.log(l_i.to(tl.float64))
    tl.store(Lse + offs_r, lse, mask=r_mask)


@triton.jit
def _nw_rows_bwd_kernel(
    Q,
    K,
    V,
    W,
    G,
    Out,
    Lse,
    Shift,
    DK,
    DV,
    DQ_PART,
    DW_PART,
    n,
    m,
    rows_per_group,
    ACC: tl.constexpr,
    USE_EXP2: tl.constexpr,
    SCALE: tl.constexpr,
    NEED_DQ: tl.constexpr,
    NEED_DK: tl.constexpr,
    NEED_DV: tl.constexpr,
    NEED_DW: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    # A program owns one (row group, column block). The probabilities come
    # straight from the saved lse, so every element is independent; dq needs
    # a sum over columns (one partial per column block) and dw a sum over
    # rows (one partial per row group). Both partial buffers are summed on
    # the host side in a fixed order: no atomics.
    num_col_blocks = tl.cdiv(m, BLOCK_M)
    pid = tl.program_id(0)
    grp = (pid // num_col_blocks).to(tl.int64)
    cb = (pid % num_col_blocks).to(tl.int64)
    offs_m = cb * BLOCK_M + tl.arange(0, BLOCK_M)
    c_mask = offs_m < m
    w = tl.load(W + offs_m, mask=c_mask, other=0.0).to(ACC)
    neg_c = w * (-0.5 * SCALE)
    dw_acc = tl.zeros([BLOCK_M], ACC)

    row_lo = grp * rows_per_group
    row_hi = tl.minimum(row_lo + rows_per_group, n)
    for r0 in range(row_lo, row_hi, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < row_hi
        q = tl.load(Q + offs_r, mask=r_mask, other=0.0).to(ACC)
        g = tl.load(G + offs_r, mask=r_mask, other=0.0).to(ACC)
        y = tl.load(Out + offs_r, mask=r_mask, other=0.0).to(ACC)
        lse_s, lse_lo = _split_lse(tl.load(Lse + offs_r, mask=r_mask, other=0.0), SCALE, ACC)
        mask = r_mask[:, None] & c_mask[None, :]
        idx = offs_r[:, None] * m + offs_m[None, :]
        k = tl.load(K + idx, mask=mask, other=0.0).to(ACC)
        v = tl.load(V + idx, mask=mask, other=0.0).to(ACC)
        diff = q[:, None] - k
        dist2 = diff * diff
        s = tl.where(mask, dist2 * neg_c[None, :], float("-inf"))
        p = _exp((s - lse_s[:, None]) - lse_lo[:, None], USE_EXP2)
        gp = p * g[:, None]
        if NEED_DV:
            tl.store(DV + idx, gp, mask=mask)
        # t_ij = p_ij (g_i v_ij - g_i y_i)
        t = gp * (v - y[:, None])
        if NEED_DK or NEED_DQ:
            dk = t * w[None, :] * diff
            if NEED_DK:
                tl.store(DK + idx, dk, mask=mask)
            if NEED_DQ:
                tl.store(DQ_PART + cb * n + offs_r, -tl.sum(dk, axis=1), mask=r_mask)
        if NEED_DW:
            shift = tl.load(Shift + offs_r, mask=r_mask, other=0.0).to(ACC)
            dw_acc += tl.sum(t * (dist2 - shift[:, None]), axis=0)
    if NEED_DW:
        tl.store(DW_PART + grp * m + offs_m, -0.5 * dw_acc, mask=c_mask)


# Autotuned twins for the GPU; the interpreter calls the plain kernels with
# INTERPRET_CONFIGS.
_SHARED_TUNING = {
    "key": ["n", "m", "D", "C"],
    "prune_configs_by": {"early_config_prune": _prune_for_dot},
}
_nw_fwd_tuned = triton.autotune(FWD_CONFIGS, **_SHARED_TUNING)(_nw_fwd_kernel)
_nw_bwd_dq_tuned = triton.autotune(DQ_CONFIGS, **_SHARED_TUNING)(_nw_bwd_dq_kernel)
_nw_bwd_dkv_tuned = triton.autotune(DKV_CONFIGS, **_SHARED_TUNING)(_nw_bwd_dkv_kernel)
_nw_rows_fwd_tuned = triton.autotune(ROWS_FWD_CONFIGS, key=["n", "m"])(_nw_rows_fwd_kernel)
_nw_rows_bwd_tuned = triton.autotune(ROWS_BWD_CONFIGS, key=["n", "m"])(_nw_rows_bwd_kernel)


# ---------------------------------------------------------------------------
# Launch helpers
# ---------------------------------------------------------------------------


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _dot_policy(dtype, d, c):
    """Which products run through tl.dot: (cross term q.k, p @ v).

    q.k only for half-precision inputs: in float32 the expansion
    ||q||^2 + ||k||^2 - 2 q.k loses digits to cancellation when the points sit
    far from the origin relative to their spread, so float32/float64 keep the
    exact difference form. p @ v is a plain weighted sum and runs on tensor
    cores for any dtype but float64 (3xTF32 keeps float32 accuracy).
    """
    half = dtype in (torch.float16, torch.bfloat16)
    return half and d >= 16, dtype != torch.float64 and c >= 16


def _meta(dtype, d, c):
    is64 = dtype == torch.float64
    use_dot_qk, use_dot_pv = _dot_policy(dtype, d, c)
    return {
        "ACC": tl.float64 if is64 else tl.float32,
        "USE_EXP2": not is64,
        "SCALE": 1.0 if is64 else LOG2E,
        "USE_DOT_QK": use_dot_qk,
        "USE_DOT_PV": use_dot_pv,
        # Products with a computed float32 operand (p, t, a): TF32 for half
        # inputs (as precise as the inputs, with float32 range), 3xTF32 for
        # float32 inputs (about float32 accuracy).
        "DOT_PREC": "tf32" if dtype in (torch.float16, torch.bfloat16) else "tf32x3",
        "BLOCK_D": triton.next_power_of_2(d),
        "BLOCK_C": triton.next_power_of_2(c),
    }


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _launch(kernel, tuned, name, tiles, args, meta):
    """Run `kernel` with the interpreter's fixed config, else autotuned.

    `tiles(cfg)` gives the 1-D grid size for a config's block sizes.
    """
    if _interpreting():
        cfg = INTERPRET_CONFIGS[name]
        kernel[(tiles(cfg),)](*args, **{**meta, **cfg})
    else:
        tuned[lambda cfg: (tiles(cfg),)](*args, **meta)


def _per_key(w, m):
    """(..., 1) -> (..., m) contiguous: every kernel reads one w per key."""
    return w.expand(*w.shape[:-1], m).contiguous()


def _dw(dw_keys, w):
    """The per-key sums as w's gradient: summed over keys for a shared w."""
    if w.shape[-1] == 1:
        dw_keys = dw_keys.double().sum(-1, keepdim=True)
    return dw_keys.to(w.dtype)


def forward(query, key, value, w, exclude_self):
    B, n, d = query.shape
    m, c = key.shape[1], value.shape[2]
    w = _per_key(w, m)
    out = torch.empty((B, n, c), dtype=query.dtype, device=query.device)
    lse = torch.empty((B, n), dtype=torch.float64, device=query.device)
    if B * n == 0:
        return out, lse
    _launch(
        _nw_fwd_kernel,
        _nw_fwd_tuned,
        "fwd",
        lambda cfg: B * triton.cdiv(n, cfg["BLOCK_N"]),
        (query, key, value, w, out, lse, n, m, d, c, bool(exclude_self)),
        _meta(query.dtype, d, c),
    )
    return out, lse


def backward(grad_out, query, key, value, w, out, lse, exclude_self, needs):
    need_q, need_k, need_v, need_w = (bool(x) for x in needs)
    B, n, d = query.shape
    m, c = key.shape[1], value.shape[2]
    dtype = query.dtype
    w_keys = _per_key(w, m)
    dq = torch.empty_like(query) if need_q else None
    dk = torch.empty_like(key) if need_k else None
    dv = torch.empty_like(value) if need_v else None
    # float32 partial sums per key: summed in float64 for a shared w.
    dw = torch.empty(w_keys.shape, dtype=_acc_dtype(dtype), device=w.device) if need_w else None
    if B * n * m == 0 or not any((need_q, need_k, need_v, need_w)):
        for x in (dq, dk, dv, dw):
            if x is not None:
                x.zero_()
        return dq, dk, dv, None if dw is None else _dw(dw, w)

    acc = _acc_dtype(dtype)
    # delta_i = g_i . y_i, the per-query term of t_ij; O(n c), done once here
    # so neither pass has to rebuild it.
    delta = (grad_out.to(acc) * out.to(acc)).sum(-1).contiguous()
    meta = _meta(dtype, d, c)
    common = (n, m, d, c, bool(exclude_self))
    if need_q:
        _launch(
            _nw_bwd_dq_kernel,
            _nw_bwd_dq_tuned,
            "dq",
            lambda cfg: B * triton.cdiv(n, cfg["BLOCK_N"]),
            (query, key, value, w_keys, grad_out, lse, delta, dq) + common,
            meta,
        )
    if need_k or need_v or need_w:
        # Unneeded outputs get a stand-in pointer that the kernel never touches.
        _launch(
            _nw_bwd_dkv_kernel,
            _nw_bwd_dkv_tuned,
            "dkv",
            lambda cfg: B * triton.cdiv(m, cfg["BLOCK_M"]),
            (
                query,
                key,
                value,
                w_keys,
                grad_out,
                lse,
                delta,
                distance_shift(lse, w, m - bool(exclude_self)).to(acc),
            )
            + (dk if need_k else key, dv if need_v else value, dw if need_w else w_keys)
            + common,
            {**meta, "NEED_DK": need_k, "NEED_DV": need_v, "NEED_DW": need_w},
        )
    return dq, dk, dv, None if dw is None else _dw(dw, w)


def _rows_meta(dtype):
    is64 = dtype == torch.float64
    return {
        "ACC": tl.float64 if is64 else tl.float32,
        "USE_EXP2": not is64,
        "SCALE": 1.0 if is64 else LOG2E,
    }


def forward_rows(query, keys, values, w):
    n, m = keys.shape
    w = _per_key(w, m)
    out = torch.empty((n,), dtype=query.dtype, device=query.device)
    lse = torch.empty((n,), dtype=torch.float64, device=query.device)
    if n == 0:
        return out, lse
    _launch(
        _nw_rows_fwd_kernel,
        _nw_rows_fwd_tuned,
        "rows_fwd",
        lambda cfg: triton.cdiv(n, cfg["BLOCK_R"]),
        (query, keys, values, w, out, lse, n, m),
        _rows_meta(query.dtype),
    )
    return out, lse


def _rows_bwd_block_m():
    return INTERPRET_CONFIGS["rows_bwd"]["BLOCK_M"] if _interpreting() else ROWS_BWD_BLOCK_M


def _row_groups(n, m, block_m):
    """(groups, rows per group) for the rows backward, from the shape only.

    The count of dw partials must not depend on the autotuned config, so the
    buffers can be sized before launch and results repeat across configs.
    """
    col_blocks = triton.cdiv(m, block_m)
    groups = max(
        1, min(triton.cdiv(ROWS_BWD_TARGET_PROGRAMS, col_blocks), triton.cdiv(n, ROW_ALIGN))
    )
    rows_per_group = triton.cdiv(triton.cdiv(n, groups), ROW_ALIGN) * ROW_ALIGN
    return triton.cdiv(n, rows_per_group), rows_per_group


def backward_rows(grad_out, query, keys, values, w, out, lse, needs):
    need_q, need_k, need_v, need_w = (bool(x) for x in needs)
    n, m = keys.shape
    dtype, dev = query.dtype, query.device
    w_keys = _per_key(w, m)
    dk = torch.empty_like(keys) if need_k else None
    dv = torch.empty_like(values) if need_v else None
    if n * m == 0 or not any((need_q, need_k, need_v, need_w)):
        dq = torch.zeros_like(query) if need_q else None
        dw = torch.zeros_like(w) if need_w else None
        for x in (dk, dv):
            if x is not None:
                x.zero_()
        return dq, dk, dv, dw

    acc = _acc_dtype(dtype)
    block_m = _rows_bwd_block_m()
    col_blocks = triton.cdiv(m, block_m)
    groups, rows_per_group = _row_groups(n, m, block_m)
    dq_part = torch.empty((col_blocks, n), dtype=acc, device=dev) if need_q else lse
    dw_part = torch.empty((groups, m), dtype=acc, device=dev) if need_w else lse
    _launch(
        _nw_rows_bwd_kernel,
        _nw_rows_bwd_tuned,
        "rows_bwd",
        lambda cfg: groups * col_blocks,
        (query, keys, values, w_keys, grad_out, out, lse, distance_shift(lse, w, m).to(acc))
        + (dk if need_k else keys, dv if need_v else values, dq_part, dw_part)
        + (n, m, rows_per_group),
        {
            **_rows_meta(dtype),
            "NEED_DQ": need_q,
            "NEED_DK": need_k,
            "NEED_DV": need_v,
            "NEED_DW": need_w,
            "BLOCK_M": block_m,
        },
    )
    dq = dq_part.sum(0).to(dtype) if need_q else None
    dw = _dw(dw_part.double().sum(0), w) if need_w else None
    return dq, dk, dv, dw
