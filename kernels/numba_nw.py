"""Numba CPU kernels for Nadaraya-Watson attention pooling.

The contract (shapes, dtypes, what each function returns) is in
``kernels/__init__.py``; this file is the CPU implementation.

How the work is laid out:

- Work items. A work item is a run of query rows (forward, dq, tangent) or of
  keys (dk, dv, dw) with its own list of *spans* of the other side: [start,
  end) ranges of keys (or queries) that it sweeps. The dense pass gives every
  item one span covering everything; a block-sparse plan (``kernels.blocks``)
  gives each item the spans its bound keeps. Every output element is summed
  by one item in a fixed order, so results repeat bit for bit whatever the
  number of threads.
- One loop, specialised per d. For d <= FUSED_DIMS features and c <=
  FUSED_CHANNELS value channels every pass is a set of parts on the loop of
  ``numba_sweep`` (the backward's key side on a loop of its own, ``_key_grads``):
  its argument structure (``Pool``, ``Shift``, ``QueryGrad``, ``KeyGrad``,
  ``Tangent``) carries d and c in its type, so Numba compiles the
  pass once per (d, c, dtype) with the features and channels in registers and
  one fused sweep over the other side's points, no buffer of scores. Larger d or c take
  the general kernels, which build tiles of squared distances in buffers.
- Threads. Items run on a small pool of Python threads calling ``nogil``
  kernels (``workers.parallel``), not on Numba's OpenMP/TBB layer: a process that has
  called nwfast can fork (DataLoader workers), several Python threads can call
  at once, and the kernels compile as plain serial functions, which is several
  times faster than parallel ones. Their arrays come from ``arrays``: made by
  NumPy on the calling thread, never by a torch op whose OpenMP threads would
  then spin on the same cores.
- Scores in log2 units. With ``c2_j = -(w_j / 2) * log2(e)`` the weight
  ``exp(s_ij - shift)`` is ``2**(c2_j * d_ij^2 - shift)``, one polynomial
  ``exp2`` (``numba_exp``) per pair, which LLVM vectorises. Every pass
  computes a weight as ``numba_sweep.weight``: the score ``c2_j * d_ij^2``
  rounded once, then the shift subtracted, with operations (``numba_exp.mul``,
  ``sub``) the compiler may neither fuse into an FMA nor regroup. The row's
  largest score minus the row maximum is then exactly 0 even where
  ``|c2 d^2|`` is ~1e13 (a query far from every key; a fused ``c2 d^2 - max``
  would leave the product's rounding error, up to half an ulp of the score, in
  the exponent), and the backward's ``(score - lse_high) - lse_low``
  reproduces the forward's weights to rounding (``normalized_weight``: a
  weight below 2**-100 of its row is 0, so that its products are never
  subnormal: the Zen 4 machine measured here computes those slowly).
  ``d_ij^2`` is rounded alike everywhere too (``numba_sweep.sqdist`` and
  ``_tile_sq``: the first square, then one FMA a feature).
- The shift. With w >= 0 every score is <= 0, so a shift of 0 is safe from
  overflow and no row maximum is needed (one exp2 and ~6 flops a pair). A row
  whose sum comes out tiny (< 2**-60: a query far from all keys, a huge w) or
  NaN is redone against its maximum; negative w takes the maximum from the
  start.
- Inner loops run along the swept side's points on unit-stride rows, so that
  side is passed feature-major, (d, m) and (c, m). Sums over SUM_BLOCK points
  are in the input dtype (SIMD lanes) and go into float64, so float32 error
  does not grow with m.
- The backward recomputes ``p_ij = 2**(c2_j d_ij^2 - lse_i log2(e))`` with the
  lse as a (high, low) pair of the input dtype; where every row's lse lies in
  FOLD_WINDOW the fused passes fold 2**-lse_i into g_i and delta_i instead
  (``_row_fold``) and flush each row at its own cut. ``dk``, ``dv``, ``dw`` are a
  sweep over query spans per key (``_key_grads``); up to d = 3 it also adds
  each pair's share of ``dq`` into a tile of the queries, once a pair for every
  gradient. Otherwise (d = 4, dq alone, or dq shares that would not fit
  DQ_SHARES_BYTES) ``dq`` is a sweep over key spans per query.
"""

import functools
import math
from typing import NamedTuple

import numpy as np
import torch

from . import EXACT_SHIFT_ABOVE, UNDERFLOW, arrays, blocks, distance_shift, far, numba_fgt, per_key
from . import numba_sweep as sweep
from .numba_exp import FLUSH_EXPONENT, fma, fmax, mul
from .numba_sweep import (
    SUM_BLOCK,
    axpy,
    column,
    dot,
    folded_weight,
    minus,
    normalized_weight,
    part,
    put_column,
    row,
    splat,
    times,
    weight,
)
from .workers import parallel as _parallel

LN2 = 0.6931471805599453

# Queries and keys per block of a block-sparse plan. Small blocks bound
# tightly; the kernels sweep runs of adjacent kept blocks as one span.
BLOCK = 64
# The passes on ``numba_sweep``'s loop, compiled per (d, c): up to these.
FUSED_DIMS = 4
FUSED_CHANNELS = 8
# Keys per tile of the general kernels. Each tile pays ~25 cycles of loop
# set-up and reductions; at 2048 that is ~1% and a float32 score buffer (8 KiB)
# still sits in L1 next to the tile's keys and values.
TILE = 2048
# The backward's key-side pass sums dq too (one exp2 a pair for every
# gradient), into this many fixed chunks of work items, each with its own
# float64 dq of the queries (summed in order afterwards), where they take at
# most DQ_SHARES_BYTES; else dq is a pass of its own.
DQ_CHUNKS = 16
DQ_SHARES_BYTES = 256 << 20
# From this many keys (128 items of 64) a dense key-side work item holds 64
# keys rather than 8: each tile of the queries, and the chunk's float64 dq of
# it, is then read from L3 once per 64 keys (at n = 2^17, d = 3 the reads per 8
# keys cost the pass a fifth of its time).
DEEP_KEY_ITEMS_FROM = 8192
# ... for d up to this. Float32 forward + backward against two passes, 8192²
# dense, alternating in one process: 1.18-1.30x at d = 2 and 3 (1 to 8
# channels, float64 and leave-one-out alike), 0.89x at d = 4 with one channel,
# where the pass's d shares a pair (a load and a store each) cost more than the
# exp2 they save. (0.9x once measured at d = 2 and 3 was the first touch of the
# chunks' dq, which ``backward`` now zeroes before the threads start.)
DQ_FROM_KEYS_DIMS = 3
# The fused backward passes fold each row's 2**-lse into its g and delta
# (``_row_fold``) where every row's lse lies in FOLD_WINDOW (log2 units): the
# loop then weighs a pair by 2**(c2 d^2), flushed below the row's own cut
# (FLUSH_EXPONENT + lse, which stays above the dtype's exponent range from
# -24 up), with neither shift: two operations and two loads a pair fewer. The
# rows that need an exact shift lie outside it in both dtypes.
FOLD_WINDOW = (-24.0, 32.0)
# The rows-layout dw is summed over rows in this many fixed chunks (partials
# summed afterwards in order), independent of the thread count.
DW_CHUNKS = 32

_jit = sweep.jit

# Tile columns are indexed as A[r, _u(j)]: an unsigned index has no
# negative-index wraparound, so LLVM emits plain vector loads, and no array
# views are made per tile (each view costs atomic refcounts).
_u = np.uint64


@_jit
def _run(lo, hi, work, args):
    """Work items [lo, hi) of the pass ``args`` (``numba_sweep.run``),
    compiled and cached here, beside the parts it inlines."""
    sweep.run(lo, hi, work, args)


# ------------------------------------------------------------- tile pieces
# Each works on the tile [j0, j0 + nt) of feature-major arrays and a buffer x
# of at least nt; the ones that sum take a local range [ja, jb) of the tile,
# so that a key left out of a row (exclude_self) is left out of every sum,
# NaN or not, instead of being weighted 0 (0 * NaN is NaN).


@_jit
def _tile_sq(a, r, bT, j0, nt, x):
    """x[j] = ||a_r - b_(j0+j)||^2; a (rows, d), bT (d, cols)."""
    a0 = a[r, 0]
    for j in range(nt):
        diff = a0 - bT[0, _u(j0 + j)]
        x[j] = diff * diff
    for f in range(1, a.shape[1]):
        af = a[r, f]
        for j in range(nt):
            diff = af - bT[f, _u(j0 + j)]
            x[j] = fma(diff, diff, x[j])


@_jit
def _tile_max(x, c2, j0, ja, jb):
    """max of c2_(j0+j) x_j over j in [ja, jb)."""
    mx = x.dtype.type(-np.inf)
    for j in range(ja, jb):
        mx = fmax(mx, mul(c2[_u(j0 + j)], x[j]))
    return mx


@_jit
def _tile_exp2(x, c2, j0, ja, jb, shift):
    """x[j] <- 2**(c2_(j0+j) x_j - shift) in place over [ja, jb); returns the
    sum (float64, from blocked sums in the dtype)."""
    zero = x.dtype.type(0)
    total = 0.0
    for b0 in range(ja, jb, SUM_BLOCK):
        s = zero
        for j in range(b0, min(b0 + SUM_BLOCK, jb)):
            e = weight(c2[_u(j0 + j)], x[j], shift, zero)
            x[j] = e
            s += e
        total += s
    return total


@_jit
def _tile_dot(x, ja, jb, A, r, j0):
    """sum_j x[j] * A[r, j0 + j] over [ja, jb), float64 from blocked sums."""
    total = 0.0
    for b0 in range(ja, jb, SUM_BLOCK):
        s = x.dtype.type(0)
        for j in range(b0, min(b0 + SUM_BLOCK, jb)):
            s += x[j] * A[r, _u(j0 + j)]
        total += s
    return total


@_jit
def _tile_dot_diff(x, ja, jb, A, r, j0, a0):
    """sum_j x[j] * (A[r, j0 + j] - a0) over [ja, jb), float64 from blocked sums."""
    total = 0.0
    for b0 in range(ja, jb, SUM_BLOCK):
        s = x.dtype.type(0)
        for j in range(b0, min(b0 + SUM_BLOCK, jb)):
            s += x[j] * (A[r, _u(j0 + j)] - a0)
        total += s
    return total


@_jit
def _tile_gv(g, i, vT, j0, nt, out):
    """out[j] = g_i . v_(j0+j); vT is (c, cols)."""
    g0 = g[i, 0]
    for j in range(nt):
        out[j] = g0 * vT[0, _u(j0 + j)]
    for ch in range(1, g.shape[1]):
        gc = g[i, ch]
        for j in range(nt):
            out[j] = fma(gc, vT[ch, _u(j0 + j)], out[j])


@_jit
def _pieces(j0, nt, skip):
    """The tile's local ranges without the skipped point: ((0, nt), (nt, nt)),
    or the two sides of the skipped point where it lies in the tile."""
    if j0 <= skip < j0 + nt:
        return ((0, skip - j0), (skip - j0 + 1, nt))
    return ((0, nt), (nt, nt))


@_jit
def _sweep_11(q0, k0, v0, c2, ja, jb):
    """d = c = 1, zero shift, in one sweep over keys [ja, jb):
    (sum_j e_j, sum_j e_j v_j) with e_j = 2**(c2_j (q0 - k_j)^2)."""
    zero = k0.dtype.type(0)
    s = zero
    a = zero
    for j in range(ja, jb):
        jj = _u(j)
        diff = q0 - k0[jj]
        e = weight(c2[jj], diff * diff, zero, zero)
        s += e
        a += e * v0[jj]
    return s, a


# ------------------------------------------------------------------ one row


@_jit
def _row_sums(q, i, kT, vT, c2, skip, spans, s0, s1, x, acc, online):
    """Softmax sums of query q[i] over the keys of spans[s0:s1], key ``skip``
    left out (-1: none). Returns the shift M (log2 units) and total =
    sum_j 2**(x_j - M) in float64; acc (float64, c) gets sum_j 2**(x_j - M) v_j.

    online False: every score is known to be <= 0 (w >= 0), so M = 0 needs no
    maximum; the caller checks that the total did not underflow. online True:
    M is the running maximum.
    """
    c = acc.size
    zero = x.dtype.type(0)
    M = x.dtype.type(-np.inf) if online else zero
    total = 0.0
    acc[:] = 0.0
    for s in range(s0, s1):
        for j0 in range(spans[s, 0], spans[s, 1], TILE):
            nt = min(TILE, spans[s, 1] - j0)
            pieces = _pieces(j0, nt, skip)
            _tile_sq(q, i, kT, j0, nt, x)
            if online:
                mt = x.dtype.type(-np.inf)
                for ja, jb in pieces:
                    mt = fmax(mt, _tile_max(x, c2, j0, ja, jb))
                if mt > M:  # rescale what was summed against the old maximum
                    r = math.exp2(float(M) - float(mt))
                    total *= r
                    for ch in range(c):
                        acc[ch] *= r
                    M = mt
            # While every score so far is -inf, any finite shift gives weight 0
            # (and keeps 0 * v, so a NaN value still reaches the sum).
            shift = M if M > -np.inf else zero
            for ja, jb in pieces:
                total += _tile_exp2(x, c2, j0, ja, jb, shift)
                for ch in range(c):
                    acc[ch] += _tile_dot(x, ja, jb, vT, ch, j0)
    return M, total


@_jit
def _pool_row(q, i, kT, vT, c2, skip, spans, s0, s1, x, acc, nonpos, out, lse):
    """out[i] and lse[i] for one query."""
    M, total = _row_sums(q, i, kT, vT, c2, skip, spans, s0, s1, x, acc, not nonpos)
    if nonpos and not total >= UNDERFLOW:
        M, total = _row_sums(q, i, kT, vT, c2, skip, spans, s0, s1, x, acc, True)
    for ch in range(acc.size):
        out[i, ch] = acc[ch] / total
    lse[i] = (M + math.log2(total)) * LN2


@_jit
def _shift_row(q, i, kT, vT, c2, skip, spans, s0, s1, x, acc, high, low):
    """high[i] = row i's maximum score, exact, and low[i] = log2 of its sum of
    2**(s_ij - high[i]): the forward's own shift, which the lse rounds."""
    M, total = _row_sums(q, i, kT, vT, c2, skip, spans, s0, s1, x, acc, True)
    high[i] = M
    low[i] = math.log2(total)


# ------------------------------------------------- passes on numba_sweep's loop
# Arrays are batched: (B, rows, f) row-major for the side whose rows are the
# work, (B, f, points) feature-major for the swept side. ``dims`` and ``chans``
# are tuples of d and c zeros: their lengths are part of the type.


class Pool(NamedTuple):
    """The forward: out[b, i] = sum_j p_ij v_j, lse[b, i] (natural log)."""

    q: np.ndarray  # (B, n, d)
    kT: np.ndarray  # (B, d, m)
    vT: np.ndarray  # (B, c, m)
    c2: np.ndarray  # (B, m)
    nonpos: np.ndarray  # (B,) bool: every w >= 0, every score <= 0
    out: np.ndarray  # (B, n, c)
    lse: np.ndarray  # (B, n) float64
    dims: tuple
    chans: tuple


class Shift(NamedTuple):
    """The forward's exact shift of the rows with only[b, i]: high[b, i] = the
    row's largest score, low[b, i] = log2 of its sum of 2**(s_ij - high)."""

    q: np.ndarray
    kT: np.ndarray
    vT: np.ndarray
    c2: np.ndarray
    only: np.ndarray  # (B, n) uint8
    high: np.ndarray  # (B, n), the input dtype
    low: np.ndarray
    dims: tuple
    chans: tuple


def _pool_begin(args, b, r):
    return row(args.q, b, r, args.dims), args.q.dtype.type(0)


def _pool_sweep(args, b, row, ja, jb):
    """(sum_j e_j, sum_j e_j v_j...) with e_j = 2**(c2_j d_j^2 - shift)."""
    q, shift = row
    if shift == 0:  # the common case, with the subtraction of 0 compiled away
        return _pool_sums(args, b, q, args.q.dtype.type(0), ja, jb)
    return _pool_sums(args, b, q, shift, ja, jb)


@sweep.inner(inline="always")
def _pool_sums(args, b, q, shift, ja, jb):
    zero = args.q.dtype.type(0)
    total = 0.0
    values = splat(0.0, args.chans)
    for j0 in range(ja, jb, SUM_BLOCK):
        s = zero
        acc = splat(zero, args.chans)
        for j in range(j0, min(j0 + SUM_BLOCK, jb)):
            jj = _u(j)
            sq = sweep.sqdist(q, column(args.kT, b, jj, args.dims))
            e = weight(args.c2[b, jj], sq, shift, zero)
            s += e
            acc = axpy(acc, e, column(args.vT, b, jj, args.chans))
        total += s
        values = sweep.add(values, acc)
    return (total,) + values


def _pool_peak(args, b, row, ja, jb):
    q, _ = row
    top = args.q.dtype.type(-np.inf)
    for j in range(ja, jb):
        jj = _u(j)
        top = fmax(top, mul(args.c2[b, jj], sweep.sqdist(q, column(args.kT, b, jj, args.dims))))
    return top


def _pool_rebase(args, b, row, shift):
    return row[0], args.q.dtype.type(shift)


for _cls in (Pool, Shift):
    part(sweep.begin, _cls)(_pool_begin)
    part(sweep.sweep, _cls)(_pool_sweep)
    part(sweep.peak, _cls)(_pool_peak)
    part(sweep.rebase, _cls)(_pool_rebase)


@part(sweep.start_at_peak, Pool)
def _(args, b):
    return not args.nonpos[b]


@part(sweep.redo, Pool)
def _(args, b, row, sums):
    return args.nonpos[b] and not sums[0] >= UNDERFLOW


@part(sweep.finish, Pool)
def _(args, b, r, row, sums):
    for ch in range(len(args.chans)):
        args.out[b, r, ch] = sums[1 + ch] / sums[0]
    args.lse[b, r] = (row[1] + math.log2(sums[0])) * LN2


@part(sweep.wanted, Shift)
def _(args, b, r):
    return args.only[b, r] != 0


@part(sweep.start_at_peak, Shift)
def _(args, b):
    return True


@part(sweep.finish, Shift)
def _(args, b, r, row, sums):
    args.high[b, r] = row[1]
    args.low[b, r] = math.log2(sums[0])


class QueryGrad(NamedTuple):
    """dq_i = sum_j t_ij w_j (k_j - q_i), t_ij = p_ij (g_i . v_j - delta_i)."""

    q: np.ndarray  # (B, n, d)
    g: np.ndarray  # (B, n, c)
    delta: np.ndarray  # (B, n), and the lse pair (log2 units) below
    high: np.ndarray
    low: np.ndarray
    kT: np.ndarray  # (B, d, m)
    vT: np.ndarray  # (B, c, m)
    w: np.ndarray  # (B, m)
    c2: np.ndarray
    dq: np.ndarray  # (B, n, d)
    dims: tuple
    chans: tuple
    folded: tuple  # (0,): g and delta carry 2**-lse, low the flush cut (``_row_fold``)


@part(sweep.begin, QueryGrad)
def _(args, b, r):
    g = row(args.g, b, r, args.chans)
    return row(args.q, b, r, args.dims), g, args.delta[b, r], args.high[b, r], args.low[b, r]


@part(sweep.sweep, QueryGrad)
def _(args, b, row, ja, jb):
    q, g, delta, high, low = row
    zero = args.q.dtype.type(0)
    total = splat(0.0, args.dims)
    for j0 in range(ja, jb, SUM_BLOCK):
        acc = splat(zero, args.dims)
        for j in range(j0, min(j0 + SUM_BLOCK, jb)):
            jj = _u(j)
            diff = minus(column(args.kT, b, jj, args.dims), q)
            if len(args.folded):
                p = folded_weight(args.c2[b, jj], dot(diff, diff), low)
            else:
                p = normalized_weight(args.c2[b, jj], dot(diff, diff), high, low)
            t = p * (dot(g, column(args.vT, b, jj, args.chans)) - delta) * args.w[b, jj]
            acc = axpy(acc, t, diff)
        total = sweep.add(total, acc)
    return total


@part(sweep.finish, QueryGrad)
def _(args, b, r, row, sums):
    for f in range(len(args.dims)):
        args.dq[b, r, f] = sums[f]


class KeyGrad(NamedTuple):
    """Per key j: dv_j = sum_i p_ij g_i, dk_j = w_j sum_i t_ij (q_i - k_j),
    dw_j = -1/2 sum_i t_ij (||q_i - k_j||^2 - shift_i); and, where ``with_dq``
    is (0,), each query's share of dq_i = sum_j w_j t_ij (k_j - q_i) from the
    same pairs, into dq[chunk] (``_key_grads``)."""

    k: np.ndarray  # (B, m, d)
    v: np.ndarray  # (B, m, c)
    w: np.ndarray  # (B, m)
    c2: np.ndarray
    qT: np.ndarray  # (B, d, n)
    gT: np.ndarray  # (B, c, n)
    delta: np.ndarray  # (B, n), the lse pair and the distance shift below
    high: np.ndarray
    low: np.ndarray
    shift: np.ndarray
    dk: np.ndarray  # (B, m, d)
    dv: np.ndarray  # (B, m, c)
    dw: np.ndarray  # (B, m) float64
    dq: np.ndarray  # (chunks, B, d, n) float64, zeros; (1, 1, 1, 1) without dq
    dims: tuple
    chans: tuple
    with_dq: tuple  # () or (0,): whether the pass sums dq, in its type
    folded: tuple  # (0,): gT and delta carry 2**-lse, low the flush cut (``_row_fold``)


@sweep.inner(inline="always")
def _key_sums(args, b, k, v, c2, w, ja, jb, share, t0):
    """Key k's sums over queries [ja, jb): (dv..., dk / w..., -2 dw), and,
    with dq, share[0, :, i - t0] += w t_ij (k - q_i)."""
    zero = args.k.dtype.type(0)
    sums_v, sums_k, sum_w = splat(0.0, args.chans), splat(0.0, args.dims), 0.0
    for i0 in range(ja, jb, SUM_BLOCK):
        acc_v, acc_k, acc_w = splat(zero, args.chans), splat(zero, args.dims), zero
        for i in range(i0, min(i0 + SUM_BLOCK, jb)):
            ii = _u(i)
            diff = minus(column(args.qT, b, ii, args.dims), k)
            sq = dot(diff, diff)
            if len(args.folded):
                p = folded_weight(c2, sq, args.low[b, ii])
            else:
                p = normalized_weight(c2, sq, args.high[b, ii], args.low[b, ii])
            g = column(args.gT, b, ii, args.chans)
            t = p * (dot(g, v) - args.delta[b, ii])
            acc_v = axpy(acc_v, p, g)
            acc_w += t * (sq - args.shift[b, ii])
            if len(args.with_dq):  # t (q - k) once, for dk and for dq
                moment = times(splat(t, args.dims), diff)
                acc_k = sweep.add(acc_k, moment)
                slot = _u(i - t0)
                put_column(share, 0, slot, axpy(column(share, 0, slot, args.dims), -w, moment))
            else:
                acc_k = axpy(acc_k, t, diff)
        sums_v, sums_k, sum_w = sweep.add(sums_v, acc_v), sweep.add(sums_k, acc_k), sum_w + acc_w
    return sums_v + sums_k + (sum_w,)


@_jit
def _key_grads(lo, hi, bounds, work, args):
    """Chunks [lo, hi) of the key-side backward: chunk h runs the work items
    bounds[h] .. bounds[h + 1] (runs of keys, each sweeping its spans of
    queries; ``numba_sweep.Work``) in order and adds their dq shares to
    args.dq[h]. Every key's sums and every chunk's dq are summed in a fixed
    order: results repeat bit for bit whatever the number of threads.

    An item's keys take turns over a tile of queries, whose dq shares sum in
    the input dtype (as deep as the item has keys, at most 64) before they go
    into the chunk's float64 dq."""
    c, d = len(args.chans), len(args.dims)
    rows = work.skip.shape[1]
    per_batch = (rows + work.block - 1) // work.block
    share = np.zeros((1, d, sweep.TILE), args.k.dtype)
    for h in range(lo, hi):
        for item in range(bounds[h], bounds[h + 1]):
            b = item // per_batch
            r0 = (item % per_batch) * work.block
            r1 = min(r0 + work.block, rows)
            sums = np.zeros((r1 - r0, c + d + 1))
            for s in range(work.ptr[item], work.ptr[item + 1]):
                for t0 in range(work.spans[s, 0], work.spans[s, 1], sweep.TILE):
                    t1 = min(t0 + sweep.TILE, work.spans[s, 1])
                    if len(args.with_dq):
                        share[0, :, : t1 - t0] = 0
                    for r in range(r0, r1):
                        k, v = row(args.k, b, r, args.dims), row(args.v, b, r, args.chans)
                        skip = work.skip[b, r]
                        ja, jb = t0, (skip if t0 <= skip < t1 else t1)
                        while ja < t1:
                            part = _key_sums(
                                args, b, k, v, args.c2[b, r], args.w[b, r], ja, jb, share, t0
                            )
                            for x in range(c + d + 1):
                                sums[r - r0, x] += part[x]
                            ja, jb = jb + 1, t1
                    if len(args.with_dq):
                        for f in range(d):
                            for i in range(t0, t1):
                                args.dq[h, b, f, _u(i)] += share[0, f, _u(i - t0)]
            for r in range(r0, r1):
                for ch in range(c):
                    args.dv[b, r, ch] = sums[r - r0, ch]
                for f in range(d):
                    args.dk[b, r, f] = args.w[b, r] * sums[r - r0, c + f]
                args.dw[b, r] = -0.5 * sums[r - r0, c + d]


class Tangent(NamedTuple):
    """Forward mode: dy_i = sum_j p_ij (dv_j + ds_ij (v_j - y_i)), ds_ij =
    -(dw_j / 2) d_ij^2 - w_j (q_i - k_j) . (dq_i - dk_j)."""

    q: np.ndarray  # (B, n, d)
    dq: np.ndarray
    y: np.ndarray  # (B, n, c)
    high: np.ndarray  # (B, n)
    low: np.ndarray
    kT: np.ndarray  # (B, d, m)
    dkT: np.ndarray
    vT: np.ndarray  # (B, c, m)
    dvT: np.ndarray
    w: np.ndarray  # (B, m)
    dw: np.ndarray
    c2: np.ndarray
    dy: np.ndarray  # (B, n, c)
    dims: tuple
    chans: tuple


@part(sweep.begin, Tangent)
def _(args, b, r):
    q, dq = row(args.q, b, r, args.dims), row(args.dq, b, r, args.dims)
    return q, dq, row(args.y, b, r, args.chans), args.high[b, r], args.low[b, r]


@part(sweep.sweep, Tangent)
def _(args, b, row, ja, jb):
    q, dq, y, high, low = row
    zero = args.q.dtype.type(0)
    total = splat(0.0, args.chans)
    for j0 in range(ja, jb, SUM_BLOCK):
        acc = splat(zero, args.chans)
        for j in range(j0, min(j0 + SUM_BLOCK, jb)):
            jj = _u(j)
            diff = minus(q, column(args.kT, b, jj, args.dims))
            sq = dot(diff, diff)
            ddiff = minus(dq, column(args.dkT, b, jj, args.dims))
            ds = -0.5 * args.dw[b, jj] * sq - args.w[b, jj] * dot(diff, ddiff)
            p = normalized_weight(args.c2[b, jj], sq, high, low)
            v = column(args.vT, b, jj, args.chans)
            acc = axpy(acc, p, axpy(column(args.dvT, b, jj, args.chans), ds, minus(v, y)))
        total = sweep.add(total, acc)
    return total


@part(sweep.finish, Tangent)
def _(args, b, r, row, sums):
    for ch in range(len(args.chans)):
        args.dy[b, r, ch] = sums[ch]


# --------------------------------------------------------- the general kernels


@_jit
def _forward_general(lo, hi, q, kT, vT, c2, nonpos, skip, ptr, spans, rows, out, lse):
    """Any d and c: tiles of squared distances in a buffer, shift 0 where
    nonpos[b] (every c2[b] <= 0) with a redo against the running maximum for
    rows that underflow, the running maximum from the start otherwise."""
    n = q.shape[1]
    items = (n + rows - 1) // rows
    x = np.empty(TILE, q.dtype)
    acc = np.empty(vT.shape[1], np.float64)
    for item in range(lo, hi):
        b = item // items
        i0 = (item % items) * rows
        qb, kTb, vTb, c2b, skipb, outb, lseb = q[b], kT[b], vT[b], c2[b], skip[b], out[b], lse[b]
        s0, s1 = ptr[item], ptr[item + 1]
        for i in range(i0, min(i0 + rows, n)):
            _pool_row(qb, i, kTb, vTb, c2b, skipb[i], spans, s0, s1, x, acc, nonpos[b], outb, lseb)


@_jit
def _exact_shift_items(lo, hi, q, kT, vT, c2, skip, ptr, spans, rows, only, high, low):
    """``_shift_row`` for the rows with only[b, i] != 0."""
    n = q.shape[1]
    items = (n + rows - 1) // rows
    x = np.empty(TILE, q.dtype)
    acc = np.empty(vT.shape[1], np.float64)
    for item in range(lo, hi):
        b = item // items
        i0 = (item % items) * rows
        s0, s1 = ptr[item], ptr[item + 1]
        for i in range(i0, min(i0 + rows, n)):
            if only[b, i]:
                _shift_row(
                    q[b], i, kT[b], vT[b], c2[b], skip[b, i], spans, s0, s1, x, acc, high[b], low[b]
                )


@_jit
def _dq_general(lo, hi, q, g, delta, L2h, L2l, kT, vT, w, c2, skip, ptr, spans, rows, dq):
    """Any d and c: dq as ``_dq_fused``, through tile buffers."""
    n, d = q.shape[1], q.shape[2]
    items = (n + rows - 1) // rows
    x = np.empty(TILE, q.dtype)
    t = np.empty(TILE, q.dtype)
    acc = np.empty(d, np.float64)
    for item in range(lo, hi):
        b = item // items
        i0 = (item % items) * rows
        qb, gb, kTb, vTb, wb, c2b = q[b], g[b], kT[b], vT[b], w[b], c2[b]
        s0, s1 = ptr[item], ptr[item + 1]
        for i in range(i0, min(i0 + rows, n)):
            acc[:] = 0.0
            di, Lh, Ll = delta[b, i], L2h[b, i], L2l[b, i]
            for s in range(s0, s1):
                for j0 in range(spans[s, 0], spans[s, 1], TILE):
                    nt = min(TILE, spans[s, 1] - j0)
                    _tile_sq(qb, i, kTb, j0, nt, x)
                    _tile_gv(gb, i, vTb, j0, nt, t)
                    for j in range(nt):  # t_ij w_j
                        jj = _u(j0 + j)
                        t[j] = normalized_weight(c2b[jj], x[j], Lh, Ll) * (t[j] - di) * wb[jj]
                    for ja, jb in _pieces(j0, nt, skip[b, i]):
                        for f in range(d):
                            acc[f] += _tile_dot_diff(t, ja, jb, kTb, f, j0, qb[i, f])
            for f in range(d):
                dq[b, i, f] = acc[f]


@_jit
def _dkv_general(
    lo, hi, k, v, w, c2, qT, gT, delta, L2h, L2l, shift, skipped_by, ptr, spans, rows, dk, dv, dw
):
    """Any d and c: dk, dv, dw as ``_dkv_fused``, through tile buffers."""
    m, d = k.shape[1], k.shape[2]
    c = v.shape[2]
    items = (m + rows - 1) // rows
    sq = np.empty((1, TILE), k.dtype)  # 2-D so that _tile_dot can read it
    p = np.empty(TILE, k.dtype)
    t = np.empty(TILE, k.dtype)
    acc = np.empty(c + d + 1, np.float64)  # sums for dv, dk, dw
    for item in range(lo, hi):
        b = item // items
        j0 = (item % items) * rows
        kb, vb, qTb, gTb, deltab = k[b], v[b], qT[b], gT[b], delta[b]
        L2hb, L2lb, shiftb = L2h[b], L2l[b], shift[b]
        s0, s1 = ptr[item], ptr[item + 1]
        for j in range(j0, min(j0 + rows, m)):
            acc[:] = 0.0
            cj = c2[b, j]
            for s in range(s0, s1):
                for i0 in range(spans[s, 0], spans[s, 1], TILE):
                    nt = min(TILE, spans[s, 1] - i0)
                    _tile_sq(kb, j, qTb, i0, nt, sq[0])
                    _tile_gv(vb, j, gTb, i0, nt, t)
                    for i in range(nt):
                        ii = _u(i0 + i)
                        pi = normalized_weight(cj, sq[0, i], L2hb[ii], L2lb[ii])
                        p[i] = pi
                        t[i] = pi * (t[i] - deltab[ii])
                        sq[0, i] -= shiftb[ii]
                    for ia, ib in _pieces(i0, nt, skipped_by[b, j]):
                        for ch in range(c):
                            acc[ch] += _tile_dot(p, ia, ib, gTb, ch, i0)
                        for f in range(d):
                            acc[c + f] += _tile_dot_diff(t, ia, ib, qTb, f, i0, kb[j, f])
                        acc[c + d] += _tile_dot(t, ia, ib, sq, 0, 0)
            for ch in range(c):
                dv[b, j, ch] = acc[ch]
            for f in range(d):
                dk[b, j, f] = w[b, j] * acc[c + f]
            dw[b, j] = -0.5 * acc[c + d]


@_jit
def _tangent_items(
    lo, hi, q, dq, kT, dkT, vT, dvT, w, dw, c2, y, L2h, L2l, skip, ptr, spans, rows, dy
):
    """Forward mode: dy_i = sum_j p_ij (dv_j + ds_ij (v_j - y_i)) with
    ds_ij = -(dw_j / 2) d_ij^2 - w_j (q_i - k_j) . (dq_i - dk_j), over the key
    spans of each query. Tangents that are zero arrive as zeros."""
    n, d = q.shape[1], q.shape[2]
    c = vT.shape[1]
    items = (n + rows - 1) // rows
    x = np.empty(TILE, q.dtype)
    ds = np.empty(TILE, q.dtype)
    acc = np.empty(c, np.float64)
    for item in range(lo, hi):
        b = item // items
        i0 = (item % items) * rows
        qb, dqb, kTb, dkTb, vTb, dvTb, wb, dwb, c2b = (
            q[b],
            dq[b],
            kT[b],
            dkT[b],
            vT[b],
            dvT[b],
            w[b],
            dw[b],
            c2[b],
        )
        s0, s1 = ptr[item], ptr[item + 1]
        for i in range(i0, min(i0 + rows, n)):
            acc[:] = 0.0
            Lh, Ll = L2h[b, i], L2l[b, i]
            for s in range(s0, s1):
                for j0 in range(spans[s, 0], spans[s, 1], TILE):
                    nt = min(TILE, spans[s, 1] - j0)
                    _tile_sq(qb, i, kTb, j0, nt, x)
                    for j in range(nt):
                        ds[j] = -0.5 * dwb[_u(j0 + j)] * x[j]
                    for f in range(d):
                        qf, dqf = qb[i, f], dqb[i, f]
                        for j in range(nt):
                            jj = _u(j0 + j)
                            ds[j] -= wb[jj] * (qf - kTb[f, jj]) * (dqf - dkTb[f, jj])
                    for j in range(nt):
                        x[j] = normalized_weight(c2b[_u(j0 + j)], x[j], Lh, Ll)
                    for ja, jb in _pieces(j0, nt, skip[b, i]):
                        for ch in range(c):
                            yc = y[b, i, ch]
                            for b0 in range(ja, jb, SUM_BLOCK):
                                t = x.dtype.type(0)
                                for j in range(b0, min(b0 + SUM_BLOCK, jb)):
                                    jj = _u(j0 + j)
                                    t += x[j] * (dvTb[ch, jj] + ds[j] * (vTb[ch, jj] - yc))
                                acc[ch] += t
            for ch in range(c):
                dy[b, i, ch] = acc[ch]


# ---------------------------------------------------------- per-query rows


@_jit
def _forward_rows_fused(lo, hi, q, K, V, c2, rows, out, lse, redo):
    """Every w >= 0: one sweep per row with shift 0 (q (n, 1), K and V (n, m),
    c2 (m,)); a row whose sum underflows is left to ``_forward_rows_general``:
    redo[i] = 1."""
    n, m = K.shape
    for item in range(lo, hi):
        for i in range(item * rows, min(item * rows + rows, n)):
            total = 0.0
            acc = 0.0
            for j0 in range(0, m, SUM_BLOCK):
                st, at = _sweep_11(q[i, 0], K[i], V[i], c2, j0, min(j0 + SUM_BLOCK, m))
                total += st
                acc += at
            if total >= UNDERFLOW:
                out[i, 0] = acc / total
                lse[i] = math.log(total)
            else:
                redo[i] = 1


@_jit
def _forward_rows_general(lo, hi, q, K, V, c2, nonpos, rows, only, out, lse):
    """Any w, through tile buffers (the rows of ``only``, or all if it is empty)."""
    n, m = K.shape
    x = np.empty(TILE, q.dtype)
    acc = np.empty(1, np.float64)
    spans = np.empty((1, 2), np.int64)
    spans[0, 0] = 0
    spans[0, 1] = m
    for item in range(lo, hi):
        for i in range(item * rows, min(item * rows + rows, n)):
            if only.size == 0 or only[i]:
                # row i's keys and values as (1, m): the shared-key row, d = c = 1
                _pool_row(
                    q, i, K[i : i + 1], V[i : i + 1], c2, -1, spans, 0, 1, x, acc, nonpos, out, lse
                )


@_jit
def _exact_shift_rows_items(lo, hi, q, K, V, c2, rows, only, high, low):
    """``_shift_row`` of the rows layout, for the rows with only[i] != 0."""
    n, m = K.shape
    x = np.empty(TILE, q.dtype)
    acc = np.empty(1, np.float64)
    spans = np.empty((1, 2), np.int64)
    spans[0, 0] = 0
    spans[0, 1] = m
    for item in range(lo, hi):
        for i in range(item * rows, min(item * rows + rows, n)):
            if only[i]:
                _shift_row(q, i, K[i : i + 1], V[i : i + 1], c2, -1, spans, 0, 1, x, acc, high, low)


@_jit
def _backward_rows_items(lo, hi, q, K, V, w, c2, g, delta, L2h, L2l, shift, dq, dK, dV, dw_part):
    """Chunks [lo, hi) of rows: one sweep per row gives dq_i = -sum_j dK_ij
    and, where dK / dV have rows (they are (n, 0) when not wanted), the dK and
    dV rows; the sums for dw, t_ij (d_ij^2 - shift_i), go into dw_part[chunk]
    (float64), one fixed chunk of rows per item."""
    n, m = K.shape
    write_k = dK.shape[1] == m
    write_v = dV.shape[1] == m
    per = (n + dw_part.shape[0] - 1) // dw_part.shape[0]
    for chunk in range(lo, hi):
        part = dw_part[chunk]
        part[:] = 0.0
        for i in range(chunk * per, min(chunk * per + per, n)):
            qi, gi, di, Lh, Ll, ri = q[i], g[i], delta[i], L2h[i], L2l[i], shift[i]
            Ki, Vi, dKi, dVi = K[i], V[i], dK[i], dV[i]
            acc = 0.0
            for j0 in range(0, m, SUM_BLOCK):
                s = q.dtype.type(0)
                for j in range(min(SUM_BLOCK, m - j0)):
                    jj = _u(j0 + j)
                    diff = qi - Ki[jj]
                    sq = diff * diff
                    p = normalized_weight(c2[jj], sq, Lh, Ll)
                    t = p * (gi * Vi[jj] - di)
                    dkj = t * w[jj] * diff
                    s += dkj
                    part[jj] += t * (sq - ri)
                    # loop-invariant branches: LLVM compiles one loop per case
                    if write_k:
                        dKi[jj] = dkj
                    if write_v:
                        dVi[jj] = p * gi
                acc += s
            dq[i] = -acc


@_jit
def _tangent_rows_items(lo, hi, q, dq, K, dK, V, dV, w, dw, c2, y, L2h, L2l, rows, dy):
    """Forward mode of the rows layout: dy_i = sum_j p_ij (dV_ij + ds_ij
    (V_ij - y_i)), ds_ij = -(dw_j / 2) d_ij^2 - w_j (q_i - K_ij)(dq_i - dK_ij)."""
    n, m = K.shape
    for item in range(lo, hi):
        for i in range(item * rows, min(item * rows + rows, n)):
            qi, dqi, yi, Lh, Ll = q[i], dq[i], y[i], L2h[i], L2l[i]
            acc = 0.0
            for j0 in range(0, m, SUM_BLOCK):
                t = q.dtype.type(0)
                for j in range(min(SUM_BLOCK, m - j0)):
                    jj = _u(j0 + j)
                    diff = qi - K[i, jj]
                    sq = diff * diff
                    p = normalized_weight(c2[jj], sq, Lh, Ll)
                    ds = -0.5 * dw[jj] * sq - w[jj] * diff * (dqi - dK[i, jj])
                    t += p * (dV[i, jj] + ds * (V[i, jj] - yi))
                acc += t
            dy[i] = acc


# ------------------------------------------------------------ torch entry
# Every array the kernels read comes from ``arrays``: made by NumPy on the
# calling thread, each starting on a cache line.


def _lse_log2(lse, dtype, exact):
    """lse in log2 units as a (high, low) pair of dtype arrays: the backward's
    2**((s - high) - low) keeps the weights of the nearest keys exact to
    rounding. Rows past EXACT_SHIFT_ABOVE get theirs from
    ``exact(rows, high, low)``, rows a (..., n) uint8 mask, unless ``exact``
    is None (a shard of a larger softmax: the split lse is all there is)."""
    lse2, high, low = arrays.lse_pair(lse, dtype)
    far = np.abs(lse2) > EXACT_SHIFT_ABOVE[dtype]
    if exact is not None and far.any():
        exact(far.astype(np.uint8), high, low)
    return high, low


def _exact_shifts(plan, q, k, v, c2, skip):
    """``_lse_log2``'s ``exact`` for shared keys: q, k, v in the plan's order."""

    def exact(rows, high, low):
        d, c = q.shape[-1], v.shape[-1]
        direct = far.as_direct(plan, q.shape[1], k.shape[1])  # every pair the row holds
        inputs = (arrays.of(q), arrays.feature_major(k), arrays.feature_major(v), c2)
        items = len(direct.key_ptr) - 1
        if _fused(d, c):
            args = Shift(*inputs, rows, high, low, *_markers(d, c))
            _parallel(_run, items, direct.pairs, _query_work(direct, skip), args)
        else:
            _parallel(
                _exact_shift_items, items, direct.pairs, *inputs, skip, direct.key_ptr,
                direct.key_spans, direct.q_block, rows, high, low,
            )  # fmt: skip

    return exact


def _exact_row_shifts(query, keys, values, c2):
    """``_lse_log2``'s ``exact`` for the rows layout."""
    n, m = keys.shape
    rows = blocks.rows_per_item(m)

    def exact(only, high, low):
        inputs = (arrays.of(query[:, None]), arrays.of(keys), arrays.of(values), c2)
        _parallel(_exact_shift_rows_items, -(-n // rows), n * m, *inputs, rows, only, high, low)

    return exact


def _delta_of(grad_out, out):
    """delta_i = g_i . y_i, in float64 then rounded to the input dtype."""
    y = out.detach().numpy()
    return arrays.copy((arrays.float64(grad_out) * y).sum(-1), y.dtype)


def _row_fold(lse, g, out):
    """(g, delta, cut) for the fused backward passes' fold (``FOLD_WINDOW``):
    g (B, n, c) times its rows' 2**-lse, computed in float64 and rounded once
    to its dtype (torch), delta computed from that g as ``_delta_of`` does,
    and each row's flush cut FLUSH_EXPONENT + lse (log2 units) in the dtype;
    None where a row's lse lies outside FOLD_WINDOW or a scaled g is not
    finite or falls below the dtype's smallest normal number."""
    lse2 = arrays.float64(lse) * arrays.LOG2E
    lowest, highest = FOLD_WINDOW
    if not np.all((lse2 >= lowest) & (lse2 <= highest)):  # NaN fails too
        return None
    g64 = arrays.float64(g)
    scaled = g64 * np.exp2(-lse2)[..., None]
    dtype = arrays.numpy_dtype(g.dtype)
    info = np.finfo(dtype)
    if not np.all(np.abs(scaled) <= info.max) or np.any((g64 != 0) & (np.abs(scaled) < info.tiny)):
        return None
    g = torch.from_numpy(arrays.copy(scaled, dtype))
    return g, _delta_of(g, out), arrays.copy(lse2 + FLUSH_EXPONENT[str(info.dtype)], dtype)


def _dw(dw_keys, w, dtype):
    """The per-key sums (float64 NumPy) as w's gradient: summed over keys for a
    shared w."""
    if w.shape[-1] == 1:
        dw_keys = dw_keys.sum(-1, keepdims=True)
    return torch.from_numpy(dw_keys.astype(arrays.numpy_dtype(dtype)))


def _keys_per_item(n, m):
    """Keys per dense key-side work item: the most an item holds from
    DEEP_KEY_ITEMS_FROM keys on, else as many as ``blocks.rows_per_item``."""
    return blocks.ITEM_ROWS[1] if m >= DEEP_KEY_ITEMS_FROM else blocks.rows_per_item(n)


def _fused(d, c):
    """Whether the passes on ``numba_sweep``'s loop serve d features, c channels."""
    return d <= FUSED_DIMS and c <= FUSED_CHANNELS


def _markers(d, c):
    """The (dims, chans) tuples that carry d and c in a pass's type."""
    return (0,) * d, (0,) * c


def _query_work(plan, skip):
    return sweep.Work(plan.key_ptr, plan.key_spans, plan.q_block, skip)


def _key_work(plan, skipped_by):
    return sweep.Work(plan.query_ptr, plan.query_spans, plan.k_block, skipped_by)


def _dq_shares_fit(B, n, d):
    """Whether the key-side pass's per-chunk dq (float64) fits DQ_SHARES_BYTES."""
    return DQ_CHUNKS * B * n * d * 8 <= DQ_SHARES_BYTES


def _chunk_bounds(work, count):
    """The first item of each of ``count`` chunks of ``work`` (and the item
    count), split where the pairs swept so far cross a multiple of 1/count of
    them: a function of the plan alone, never of the threads. Items after the
    last pair (keys whose pairs are all expanded) go to the last chunk."""
    items = len(work.ptr) - 1
    rows = work.skip.shape[1]
    per_batch = -(-rows // work.block)
    first_row = (np.arange(items) % per_batch) * work.block
    swept = np.concatenate(([0], np.cumsum(work.spans[:, 1] - work.spans[:, 0])))[work.ptr]
    pairs = np.diff(swept) * np.minimum(work.block, rows - first_row)
    before = np.cumsum(pairs) - pairs
    chunk = np.minimum(before * count // max(int(pairs.sum()), 1), count - 1)
    return np.searchsorted(chunk, np.arange(count + 1)).astype(np.int64)


def make_plan(query, key, w, diagonal, tolerance):
    """The block-sparse plan (with expansions of far key boxes where they
    apply, ``far``), or None for a dense pass."""
    points = functools.cache(lambda: blocks.survey(query, key, w))  # read once, if at all
    if far.applies(query, key, w, tolerance, points):
        return far.plan(query, key, w, tolerance, diagonal is not None, BLOCK, BLOCK)
    return blocks.plan(query, key, w, tolerance, diagonal is not None, BLOCK, BLOCK, points)


def _or_dense(plan, B, n, m):
    """The spans to sweep: the plan's, or everything."""
    return plan or blocks.dense(B, n, m, blocks.rows_per_item(m), _keys_per_item(n, m))


def _per_row_keys(skip, m):
    """How many keys each row's softmax holds."""
    return torch.from_numpy(m - (skip >= 0).astype(np.int64))


def forward(query, key, value, w, diagonal, tolerance):
    B, n, d = query.shape
    m, c = key.shape[1], value.shape[-1]
    found = make_plan(query, key, w, diagonal, tolerance)
    plan = _or_dense(found, B, n, m)
    (q,) = blocks.queries_in_order(plan, query)
    k, v, w = blocks.keys_in_order(plan, key, value, per_key(w, m))
    skip, _ = blocks.skips(plan, diagonal, B, n, m)
    nonpos = (arrays.of(w) >= 0).all(axis=-1)
    out = torch.empty((B, n, c), dtype=query.dtype)
    lse = torch.empty((B, n), dtype=torch.float64)
    q, c2 = arrays.of(q), arrays.log2_scale(w)
    kT, vT = arrays.feature_major(k), arrays.feature_major(v)
    items = len(plan.key_ptr) - 1
    if _fused(d, c):
        args = Pool(q, kT, vT, c2, nonpos, out.numpy(), lse.numpy(), *_markers(d, c))
        _parallel(_run, items, plan.pairs, _query_work(plan, skip), args)
    else:
        _parallel(
            _forward_general, items, plan.pairs, q, kT, vT, c2, nonpos, skip, plan.key_ptr,
            plan.key_spans, plan.q_block, out.numpy(), lse.numpy(),
        )  # fmt: skip
    if plan.far is not None:
        numba_fgt.forward(plan.far, plan.q_block, q, kT, vT, skip, out.numpy(), lse.numpy())
    out, lse = blocks.queries_back(plan, out, lse)
    return out, lse, blocks.pack(found, B, n, m)


def backward(grad_out, query, key, value, w, out, lse, diagonal, packed, needs, keys=None):
    need_q, need_k, need_v, need_w = (bool(x) for x in needs)
    B, n, d = query.shape
    m, c = key.shape[1], value.shape[-1]
    dtype = query.dtype
    plan = _or_dense(blocks.unpack(packed, far.Far), B, n, m)
    q, g, out, lse = blocks.queries_in_order(plan, query, grad_out, out, lse)
    k, v, w_keys = blocks.keys_in_order(plan, key, value, per_key(w, m))
    skip, skipped_by = blocks.skips(plan, diagonal, B, n, m)
    fused = _fused(d, c)
    c2, wn = arrays.log2_scale(w_keys), arrays.of(w_keys)
    # per-query terms of every pass: delta_i = g_i . y_i and the lse pair. A
    # shard's lse is the whole problem's: its keys cannot recompute that shift.
    exact = _exact_shifts(plan, q, k, v, c2, skip) if keys is None else None
    high, low = _lse_log2(lse, dtype, exact)
    delta = _delta_of(g, out)
    fold = _row_fold(lse, g, out) if fused else None
    shift = distance_shift(lse, w, _per_row_keys(skip, m) if keys is None else keys)
    # the expanded pairs' shares (float64, plan order), None where there are none
    far_dq, far_dk, far_dv, far_dw = numba_fgt.backward_shares(
        plan, (need_q, need_k, need_v, need_w), q, g, k, v, w, out, lse, shift, skip, skipped_by
    )
    need_kvw = need_k or need_v or need_w
    direct = plan.pairs > 0  # or expansions alone
    # dq from the key-side pass's pairs where its chunks' shares fit
    together = fused and d <= DQ_FROM_KEYS_DIMS and direct and need_q and need_kvw
    together = together and _dq_shares_fit(B, n, d)
    dq = dk = dv = dw = None
    if need_kvw:
        dk = (torch.empty if direct else torch.zeros)(k.shape, dtype=dtype)
        dv = (torch.empty if direct else torch.zeros)(v.shape, dtype=dtype)
        dw_keys = (torch.empty if direct else torch.zeros)(w_keys.shape, dtype=torch.float64)
        kn, vn = arrays.of(k), arrays.of(v)
        qT, gT = arrays.feature_major(q), arrays.feature_major(g)
        outputs = (dk.numpy(), dv.numpy(), dw_keys.numpy())
        key_shift = arrays.copy(shift.numpy(), arrays.numpy_dtype(dtype))
        if direct and fused:
            work = _key_work(plan, skipped_by)
            # Zeroed here, not left to calloc: fresh pages first touched by the
            # pass's reads of dq, from the threads, took 9 ms against 1.3 ms
            # here (8192², d = 3, every buffer fresh from mmap).
            shares = arrays.empty((DQ_CHUNKS, B, d, n) if together else (1, 1, 1, 1), np.float64)
            shares.fill(0.0)
            key_g, key_delta, key_low = (
                (gT, delta, low) if fold is None else (arrays.feature_major(fold[0]), *fold[1:])
            )
            args = KeyGrad(
                kn, vn, wn, c2, qT, key_g, key_delta, high, key_low, key_shift, *outputs,
                shares, *_markers(d, c), (0,) if together else (), () if fold is None else (0,),
            )  # fmt: skip
            # without dq every item is a chunk: each key's sums are its own
            bounds = _chunk_bounds(work, DQ_CHUNKS) if together else np.arange(len(work.ptr))
            _parallel(_key_grads, len(bounds) - 1, plan.pairs, bounds, work, args)
            if together:
                dq = arrays.copy(shares.sum(axis=0).transpose(0, 2, 1), arrays.numpy_dtype(dtype))
                dq = torch.from_numpy(dq)
        elif direct:
            _parallel(
                _dkv_general, len(plan.query_ptr) - 1, plan.pairs, kn, vn, wn, c2, qT, gT, delta,
                high, low, key_shift, skipped_by, plan.query_ptr, plan.query_spans, plan.k_block,
                *outputs,
            )  # fmt: skip
        if far_dk is not None:
            dk = (dk + far_dk).to(dtype)
        if far_dv is not None:
            dv = (dv + far_dv).to(dtype)
        dk, dv, dw_keys = blocks.keys_back(plan, dk, dv, dw_keys)
        dw = _dw(arrays.of(dw_keys), w, torch.float64 if far_dw is not None else dtype)
        if far_dw is not None:
            dw = (dw + far_dw[:, None]).to(dtype)
    if need_q and plan.pairs == 0:  # expansions alone
        dq = torch.zeros(q.shape, dtype=dtype)
    elif need_q and dq is None:
        dq = torch.empty(q.shape, dtype=dtype)
        qn, gn = arrays.of(q), arrays.of(g)
        kT, vT = arrays.feature_major(k), arrays.feature_major(v)
        if fused:
            row_g, row_delta, row_low = (
                (gn, delta, low) if fold is None else (arrays.of(fold[0]), *fold[1:])
            )
            args = QueryGrad(
                qn, row_g, row_delta, high, row_low, kT, vT, wn, c2, dq.numpy(), *_markers(d, c),
                () if fold is None else (0,),
            )  # fmt: skip
            _parallel(_run, len(plan.key_ptr) - 1, plan.pairs, _query_work(plan, skip), args)
        else:
            _parallel(
                _dq_general, len(plan.key_ptr) - 1, plan.pairs, qn, gn, delta, high, low, kT, vT,
                wn, c2, skip, plan.key_ptr, plan.key_spans, plan.q_block, dq.numpy(),
            )  # fmt: skip
    if need_q:
        if far_dq is not None:
            dq = dq + far_dq
        (dq,) = blocks.queries_back(plan, dq.to(dtype))
    return (
        dq,
        dk if need_k else None,
        dv if need_v else None,
        dw if need_w else None,
    )


def _or_zeros(tangent, like):
    return torch.zeros_like(like) if tangent is None else tangent.to(like.dtype)


def tangent(query, key, value, w, tangents, out, lse, diagonal, packed):
    B, n, d = query.shape
    m, c = key.shape[1], value.shape[-1]
    dq, dk, dv, dw = (_or_zeros(t, x) for t, x in zip(tangents, (query, key, value, w)))
    # forward mode computes expanded pairs pair by pair
    plan = far.as_direct(_or_dense(blocks.unpack(packed, far.Far), B, n, m), n, m)
    q, dq, y, lse = blocks.queries_in_order(plan, query, dq, out, lse)
    k, dk, v, dv, w, dw = blocks.keys_in_order(
        plan, key, dk, value, dv, per_key(w, m), per_key(dw, m)
    )
    skip, _ = blocks.skips(plan, diagonal, B, n, m)
    c2 = arrays.log2_scale(w)
    high, low = _lse_log2(lse, query.dtype, _exact_shifts(plan, q, k, v, c2, skip))
    dy = torch.empty(y.shape, dtype=query.dtype)
    inputs = (
        arrays.of(q), arrays.of(dq), arrays.feature_major(k), arrays.feature_major(dk),
        arrays.feature_major(v), arrays.feature_major(dv), arrays.of(w), arrays.of(dw), c2,
        arrays.of(y), high, low,
    )  # fmt: skip
    if _fused(d, c):
        qn, dqn, kT, dkT, vT, dvT, wn, dwn, c2, yn, high, low = inputs
        args = Tangent(
            qn, dqn, yn, high, low, kT, dkT, vT, dvT, wn, dwn, c2, dy.numpy(), *_markers(d, c)
        )
        _parallel(_run, len(plan.key_ptr) - 1, plan.pairs, _query_work(plan, skip), args)
    else:
        _parallel(
            _tangent_items, len(plan.key_ptr) - 1, plan.pairs, *inputs, skip, plan.key_ptr,
            plan.key_spans, plan.q_block, dy.numpy(),
        )  # fmt: skip
    return blocks.queries_back(plan, dy)[0]


def forward_rows(query, keys, values, w):
    n, m = keys.shape
    w = per_key(w, m)
    out = torch.empty(n, dtype=query.dtype)
    lse = torch.empty(n, dtype=torch.float64)
    rows = blocks.rows_per_item(m)
    items = -(-n // rows)
    nonpos = bool((w >= 0).all())
    args = (arrays.of(query[:, None]), arrays.of(keys), arrays.of(values), arrays.log2_scale(w))
    only = np.empty(0, np.uint8)  # every row
    if nonpos:
        only = np.zeros(n, np.uint8)
        _parallel(
            _forward_rows_fused, items, n * m, *args, rows, out.numpy()[:, None], lse.numpy(), only
        )
    if not only.size or only.any():
        _parallel(
            _forward_rows_general, items, n * m, *args, nonpos, rows, only, out.numpy()[:, None],
            lse.numpy(),
        )  # fmt: skip
    return out, lse


def backward_rows(grad_out, query, keys, values, w, out, lse, needs):
    need_q, need_k, need_v, need_w = (bool(x) for x in needs)
    n, m = keys.shape
    dtype = query.dtype
    w_keys = per_key(w, m)
    # Gradients of the (n, m) inputs are only written when asked for: the
    # sweep is memory-bound, and training w alone needs none of them.
    dq = torch.empty(n, dtype=dtype)
    dK = torch.empty((n, m if need_k else 0), dtype=dtype)
    dV = torch.empty((n, m if need_v else 0), dtype=dtype)
    dw_part = torch.empty((min(n, DW_CHUNKS), m), dtype=torch.float64).numpy()
    c2 = arrays.log2_scale(w_keys)
    _parallel(
        _backward_rows_items,
        dw_part.shape[0],
        n * m,
        arrays.of(query),
        arrays.of(keys),
        arrays.of(values),
        arrays.of(w_keys),
        c2,
        arrays.of(grad_out),
        _delta_of(grad_out[:, None], out[:, None]),
        *_lse_log2(lse, dtype, _exact_row_shifts(query, keys, values, c2)),
        arrays.copy(distance_shift(lse, w, m).numpy(), arrays.numpy_dtype(dtype)),
        dq.numpy(),
        dK.numpy(),
        dV.numpy(),
        dw_part,
    )
    dw = _dw(-0.5 * dw_part.sum(axis=0), w, dtype)
    return (
        dq if need_q else None,
        dK if need_k else None,
        dV if need_v else None,
        dw if need_w else None,
    )


def tangent_rows(query, keys, values, w, tangents, out, lse):
    n, m = keys.shape
    dq, dK, dV, dw = (_or_zeros(t, x) for t, x in zip(tangents, (query, keys, values, w)))
    w_keys, dw_keys = per_key(w, m), per_key(dw, m)
    dy = torch.empty(n, dtype=query.dtype)
    rows = blocks.rows_per_item(m)
    c2 = arrays.log2_scale(w_keys)
    shifts = _lse_log2(lse, query.dtype, _exact_row_shifts(query, keys, values, c2))
    _parallel(
        _tangent_rows_items,
        -(-n // rows),
        n * m,
        arrays.of(query),
        arrays.of(dq),
        arrays.of(keys),
        arrays.of(dK),
        arrays.of(values),
        arrays.of(dV),
        arrays.of(w_keys),
        arrays.of(dw_keys),
        c2,
        arrays.of(out),
        *shifts,
        rows,
        dy.numpy(),
    )
    return dy
