"""Numba CPU kernels for the local-linear moments.

For each query i and the keys j of its softmax, with u_ij = k_j - q_i and
p_ij = softmax_j(s_ij), s_ij = -(1/2) sum_f w_f u_ijf^2 (one w per feature):

    moments_i = sum_j p_ij * [u, upper(u u^T), v, u v^T]       (P numbers)

laid out as ``nwfast.local_linear.moment_layout`` says: the d first moments,
the d (d + 1) / 2 second moments f <= g row by row, the c values, then the
d * c products u_f v_ch feature by feature. Everything is centred at the query,
so a local-linear solve built on these sums cancels nothing the data do not.

The contract, on contiguous tensors of one float dtype (float32 or float64)::

    forward(query (n, d), key (m, d), value (m, c), w (d,), diagonal, tolerance)
        -> moments (n, P) float64, lse (n,) float64 (natural log), plan (packed)
    backward(grad (n, P) float64, query, key, value, w, lse, second (n, d) float64,
             tbar (n,) float64, diagonal, plan)
        -> (n, d) float64: row i holds d/dw_f of grad_i . moments_i
    make_plan(query, key, w, diagonal, tolerance) -> blocks.Plan or None

``diagonal`` and the packed plan are the pooling kernels' (``nwfast.kernels``):
None, or query i leaves key i + diagonal out (0, with n == m, is leave-one-out).

``tolerance`` is ``nw_pool``'s: each query may skip keys holding at most that
much of its softmax mass, by the bound of ``kernels.blocks`` on the points
scaled by sqrt(w_f) (where the scores are -(1/2) ||.||^2); the moments are sums
over the same weights, so they leave out that much mass too. With one feature
the plan may expand far key boxes instead (``kernels.far``): the series'
sums of the weights and values with their first and second moments in the
distance (``numba_fgt``, the backward's row side) are the moments' terms, each
within the planner's per-key allowance in units of delta = sqrt(2 / w), so a
moment with k factors of u and b of v moves by at most 2 bound_i max(max_j
|phi_ij|, delta^k max_j |v_j|^b), bound_i the row's skipped and expanded mass
(``far.row_bounds``). The backward sweeps the plan the forward made, its
expanded pairs one by one (``far.as_direct``): its sums hold u^3 and u^4,
which the expansions do not carry.

The backward is the derivative of the softmax in w_f:
d p_ij / d w_f = -(1/2) p_ij (u_ijf^2 - E_i[u_f^2]), where ``second`` holds the
E_i[u_f^2] the forward returned; the kernel also subtracts ``tbar`` =
grad_i . moments_i from grad_i . phi_ij (exact, since the centred weights sum to
0), so neither factor carries a large constant into the sum.

For d <= FUSED_DIMS and c <= FUSED_CHANNELS the passes run on ``numba_sweep``'s
loop, as ``numba_nw``'s do, with the P sums of a row in registers; the general
kernels below take the rest, dense. Both follow ``numba_nw``: scores in log2
units, built and shifted with operations the compiler may not fuse or regroup
(``numba_exp.mul``, ``sub``, ``fma``), so the row maximum's own weight is
exactly 1; the polynomial ``exp2``, float32 (or float64) lanes within a block of
keys and float64 across blocks, a shift of 0 when every w_f >= 0 (scores <= 0)
with a redo against the row's maximum when the sum underflows, the exact shift
recomputed for rows whose |lse| is too large to carry it, no fast-math flag
that assumes finite numbers, each query row summed by one work item in a fixed
order (results repeat bit for bit), and the key a row leaves out removed from
it (not weighted 0).
"""

import functools
import math
from typing import NamedTuple

import numpy as np
import torch

from . import EXACT_SHIFT_ABOVE, UNDERFLOW, arrays, blocks, far, numba_fgt
from . import numba_sweep as sweep
from .numba_exp import exp2, fma, fmax, mul, sub
from .numba_sweep import (
    SUM_BLOCK,
    axpy,
    column,
    dot,
    minus,
    outer,
    part,
    row,
    splat,
    times,
    upper,
    weighted_sqnorm,
)
from .workers import parallel

LN2 = 0.6931471805599453

# Queries and keys per block of a plan (as numba_nw's).
BLOCK = 64
# The passes on numba_sweep's loop: up to these; P = d + d (d + 1) / 2 + c + d c
# sums a row, 27 at d = c = 4.
FUSED_DIMS = 4
FUSED_CHANNELS = 4
# Keys per tile of the general kernels. The tile keeps d + 2 rows of buffers (u
# per feature, scores, weighted u) in L1 for small d; 256 keys leave the ~30
# cycles of set-up per tile and buffer pass below 10% of the work, and bound the
# depth of every float32 sum (16 to 32 terms a SIMD lane) before it goes into
# float64.
TILE = 256

_jit = sweep.jit
_ijit = functools.partial(sweep.inner, inline="always")
_u = np.uint64


@_jit
def _run(lo, hi, work, args):
    """Work items [lo, hi) of the pass ``args`` (``numba_sweep.run``),
    compiled and cached here, beside the parts it inlines."""
    sweep.run(lo, hi, work, args)


# ------------------------------------------------- passes on numba_sweep's loop
# Arrays have a batch dimension of one: (1, rows, f) for the queries, (1, f, m)
# feature-major for the keys and values, c2 (1, 1, d). ``dims``, ``chans`` and
# ``phis`` are tuples of d, c and P zeros: their lengths are part of the type.


class Moments(NamedTuple):
    """moments[0, i] = sum_j p_ij phi_ij, lse[0, i] (natural log)."""

    q: np.ndarray  # (1, n, d)
    kT: np.ndarray  # (1, d, m)
    vT: np.ndarray  # (1, c, m)
    c2: np.ndarray  # (1, 1, d): c2_f = -(w_f / 2) log2(e)
    nonpos: bool  # every w_f >= 0: every score <= 0
    moments: np.ndarray  # (1, n, P) float64
    lse: np.ndarray  # (1, n) float64
    dims: tuple
    chans: tuple
    phis: tuple


class MomentsShift(NamedTuple):
    """The forward's exact shift of the rows with only[0, i] (as ``numba_nw.Shift``)."""

    q: np.ndarray
    kT: np.ndarray
    vT: np.ndarray
    c2: np.ndarray
    only: np.ndarray  # (1, n) uint8
    high: np.ndarray  # (1, n), the input dtype
    low: np.ndarray
    dims: tuple
    chans: tuple
    phis: tuple


@sweep.inner(inline="always")
def _phi(u, v):
    """[u, upper(u u^T), v, u v^T] of one key, in the layout's order."""
    return u + upper(u) + v + outer(u, v)


def _moments_begin(args, b, r):
    c2 = row(args.c2, 0, 0, args.dims)
    return row(args.q, 0, r, args.dims), c2, args.q.dtype.type(0)


def _moments_sweep(args, b, row, ja, jb):
    q, c2, shift = row
    if shift == 0:  # the common case, with the subtraction of 0 compiled away
        return _moment_sums(args, q, c2, args.q.dtype.type(0), ja, jb)
    return _moment_sums(args, q, c2, shift, ja, jb)


@sweep.inner(inline="always")
def _moment_sums(args, q, c2, shift, ja, jb):
    """(sum_j e_j, sum_j e_j phi_j...) with e_j = 2**(s_j - shift), s_j the score
    in log2 units."""
    zero = args.q.dtype.type(0)
    total = 0.0
    sums = splat(0.0, args.phis)
    for j0 in range(ja, jb, SUM_BLOCK):
        s = zero
        acc = splat(zero, args.phis)
        for j in range(j0, min(j0 + SUM_BLOCK, jb)):
            jj = _u(j)
            u = minus(column(args.kT, 0, jj, args.dims), q)
            e = exp2(sub(sub(weighted_sqnorm(c2, u), shift), zero))
            s += e
            acc = axpy(acc, e, _phi(u, column(args.vT, 0, jj, args.chans)))
        total += s
        sums = sweep.add(sums, acc)
    return (total,) + sums


def _moments_peak(args, b, row, ja, jb):
    q, c2, _ = row
    top = args.q.dtype.type(-np.inf)
    for j in range(ja, jb):
        top = fmax(top, weighted_sqnorm(c2, minus(column(args.kT, 0, _u(j), args.dims), q)))
    return top


def _moments_rebase(args, b, row, shift):
    return row[0], row[1], args.q.dtype.type(shift)


for _cls in (Moments, MomentsShift):
    part(sweep.begin, _cls)(_moments_begin)
    part(sweep.sweep, _cls)(_moments_sweep)
    part(sweep.peak, _cls)(_moments_peak)
    part(sweep.rebase, _cls)(_moments_rebase)


@part(sweep.start_at_peak, Moments)
def _(args, b):
    return not args.nonpos


@part(sweep.redo, Moments)
def _(args, b, row, sums):
    return args.nonpos and not sums[0] >= UNDERFLOW


@part(sweep.finish, Moments)
def _(args, b, r, row, sums):
    for k in range(len(args.phis)):
        args.moments[0, r, k] = sums[1 + k] / sums[0]
    args.lse[0, r] = (row[2] + math.log2(sums[0])) * LN2


@part(sweep.wanted, MomentsShift)
def _(args, b, r):
    return args.only[0, r] != 0


@part(sweep.start_at_peak, MomentsShift)
def _(args, b):
    return True


@part(sweep.finish, MomentsShift)
def _(args, b, r, row, sums):
    args.high[0, r] = row[2]
    args.low[0, r] = math.log2(sums[0])


class MomentsGrad(NamedTuple):
    """grad_w[0, i, f] = -(1/2) sum_j p_ij (u_ijf^2 - r_if) (G_i . phi_ij - tbar_i)."""

    q: np.ndarray  # (1, n, d)
    kT: np.ndarray  # (1, d, m)
    vT: np.ndarray  # (1, c, m)
    c2: np.ndarray  # (1, 1, d)
    G: np.ndarray  # (1, n, P)
    tbar: np.ndarray  # (1, n)
    r: np.ndarray  # (1, n, d)
    high: np.ndarray  # (1, n): the lse pair, log2 units
    low: np.ndarray
    grad_w: np.ndarray  # (1, n, d) float64
    dims: tuple
    chans: tuple
    phis: tuple


@part(sweep.begin, MomentsGrad)
def _(args, b, r):
    q, c2 = row(args.q, 0, r, args.dims), row(args.c2, 0, 0, args.dims)
    G, second = row(args.G, 0, r, args.phis), row(args.r, 0, r, args.dims)
    return q, c2, G, args.tbar[0, r], second, args.high[0, r], args.low[0, r]


@part(sweep.sweep, MomentsGrad)
def _(args, b, row, ja, jb):
    q, c2, G, tbar, second, high, low = row
    zero = args.q.dtype.type(0)
    total = splat(0.0, args.dims)
    for j0 in range(ja, jb, SUM_BLOCK):
        acc = splat(zero, args.dims)
        for j in range(j0, min(j0 + SUM_BLOCK, jb)):
            jj = _u(j)
            u = minus(column(args.kT, 0, jj, args.dims), q)
            p = exp2(sub(sub(weighted_sqnorm(c2, u), high), low))
            # p times the rest first, never reassociated: where p underflows to 0 the
            # rest's product with u^2 may overflow (far keys), and 0 * inf is NaN
            t = mul(p, dot(G, _phi(u, column(args.vT, 0, jj, args.chans))) - tbar)
            acc = axpy(acc, t, minus(times(u, u), second))
        total = sweep.add(total, acc)
    return total


@part(sweep.finish, MomentsGrad)
def _(args, b, r, row, sums):
    for f in range(len(args.dims)):
        args.grad_w[0, r, f] = -0.5 * sums[f]


# ------------------------------------------------------ the general kernels
# Any d and c, every pair (no plan): tiles of keys in buffers.
#
# A span is keys [ja, jb) of a tile; buffers are indexed from 0. A row's keys are
# its tiles, and the tile holding the key a row leaves out is two spans around it.


@_ijit
def _span_scores(q, i, kT, c2, ja, jb, U, x):
    """U[f, j] = k_(ja+j),f - q_i,f and x[j] = sum_f c2_f U[f, j]^2 (log2 units)."""
    nt = jb - ja
    q0 = q[i, 0]
    c0 = c2[0]
    for j in range(nt):
        diff = kT[0, _u(ja + j)] - q0
        U[0, j] = diff
        x[j] = mul(c0, diff * diff)
    # mul and fma: each rounded once whatever the fast-math flags, so that the
    # max, the forward and the backward all see the same scores to the bit
    for f in range(1, q.shape[1]):
        qf = q[i, f]
        cf = c2[f]
        for j in range(nt):
            diff = kT[f, _u(ja + j)] - qf
            U[f, j] = diff
            x[j] = fma(cf, diff * diff, x[j])


@_ijit
def _span_max(q, i, kT, c2, ja, jb, U, x, mx):
    _span_scores(q, i, kT, c2, ja, jb, U, x)
    for j in range(jb - ja):
        mx = fmax(mx, x[j])
    return mx


@_ijit
def _dot(a, ra, b, rb, nt):
    """sum_j a[ra, j] * b[rb, j] over the span's buffers."""
    s = a.dtype.type(0)
    for j in range(nt):
        s += a[ra, j] * b[rb, j]
    return s


@_ijit
def _dot_values(a, ra, vT, ch, ja, nt):
    """sum_j a[ra, j] * v_(ja+j),ch."""
    s = a.dtype.type(0)
    for j in range(nt):
        s += a[ra, j] * vT[ch, _u(ja + j)]
    return s


@_ijit
def _span_moments(q, i, kT, vT, c2, ja, jb, shift, U, x, eu, acc):
    """acc += sum over the span of e_j [1, u, upper(u u^T), v, u v^T] with
    e_j = 2**(x_j - shift); acc is float64, the span's sums are in the data's
    dtype."""
    d = q.shape[1]
    c = vT.shape[0]
    nt = jb - ja
    _span_scores(q, i, kT, c2, ja, jb, U, x)
    total = x.dtype.type(0)
    for j in range(nt):
        e = exp2(sub(x[j], shift))
        x[j] = e
        total += e
    acc[0] += total
    for f in range(d):
        s = x.dtype.type(0)
        for j in range(nt):
            p = x[j] * U[f, j]
            eu[f, j] = p
            s += p
        acc[1 + f] += s
    k = 1 + d
    for f in range(d):
        for g in range(f, d):
            acc[k] += _dot(eu, f, U, g, nt)
            k += 1
    for ch in range(c):
        s = x.dtype.type(0)
        for j in range(nt):
            s += x[j] * vT[ch, _u(ja + j)]
        acc[k] += s
        k += 1
    for f in range(d):
        for ch in range(c):
            acc[k] += _dot_values(eu, f, vT, ch, ja, nt)
            k += 1


# ------------------------------------------------------------------ one row


@_ijit
def _row_max(q, i, kT, c2, skip, U, x):
    """The largest score of row i (log2 units), key ``skip`` left out (-1: none);
    NaN if any score is NaN."""
    m = kT.shape[1]
    mx = x.dtype.type(-np.inf)
    for j0 in range(0, m, TILE):
        j1 = min(j0 + TILE, m)
        if j0 <= skip < j1:
            mx = _span_max(q, i, kT, c2, j0, skip, U, x, mx)
            mx = _span_max(q, i, kT, c2, skip + 1, j1, U, x, mx)
        else:
            mx = _span_max(q, i, kT, c2, j0, j1, U, x, mx)
    return mx


@_ijit
def _row_sums(q, i, kT, vT, c2, skip, shift, U, x, eu, acc):
    m = kT.shape[1]
    acc[:] = 0.0
    for j0 in range(0, m, TILE):
        j1 = min(j0 + TILE, m)
        if j0 <= skip < j1:
            _span_moments(q, i, kT, vT, c2, j0, skip, shift, U, x, eu, acc)
            _span_moments(q, i, kT, vT, c2, skip + 1, j1, shift, U, x, eu, acc)
        else:
            _span_moments(q, i, kT, vT, c2, j0, j1, shift, U, x, eu, acc)


@_jit
def _forward_general(lo, hi, q, kT, vT, c2, scores_nonpositive, left_out, rows, moments, lse):
    """Items [lo, hi) of ``rows`` queries: q (n, d), kT (d, m), vT (c, m), c2 (d,),
    left_out (n,) the key each row leaves out (-1: none) -> moments (n, P), lse (n,)."""
    n, d = q.shape
    U = np.empty((d, TILE), q.dtype)
    eu = np.empty((d, TILE), q.dtype)
    x = np.empty(TILE, q.dtype)
    acc = np.empty(moments.shape[1] + 1, np.float64)
    for item in range(lo, hi):
        for i in range(item * rows, min(item * rows + rows, n)):
            skip = left_out[i]
            shift = q.dtype.type(0)
            if not scores_nonpositive:
                shift = _row_max(q, i, kT, c2, skip, U, x)
            _row_sums(q, i, kT, vT, c2, skip, shift, U, x, eu, acc)
            if scores_nonpositive and not acc[0] >= UNDERFLOW:
                shift = _row_max(q, i, kT, c2, skip, U, x)
                # While every score is -inf any finite shift gives weight 0.
                shift = shift if shift > -np.inf else q.dtype.type(0)
                _row_sums(q, i, kT, vT, c2, skip, shift, U, x, eu, acc)
            for k in range(moments.shape[1]):
                moments[i, k] = acc[k + 1] / acc[0]
            lse[i] = (shift + math.log2(acc[0])) * LN2


# ------------------------------------------------------------------ backward


@_ijit
def _span_grad(q, i, kT, vT, c2, L2h, L2l, G, tbar, r, ja, jb, U, x, t, acc):
    """acc[f] += sum over the span of p_j (u_jf^2 - r_f) (G . phi_j - tbar)."""
    d = q.shape[1]
    c = vT.shape[0]
    nt = jb - ja
    _span_scores(q, i, kT, c2, ja, jb, U, x)
    for j in range(nt):
        x[j] = exp2(sub(sub(x[j], L2h), L2l))
        t[j] = -tbar
    k = 0
    for f in range(d):
        gk = G[k]
        for j in range(nt):
            t[j] += gk * U[f, j]
        k += 1
    for f in range(d):
        for g in range(f, d):
            gk = G[k]
            for j in range(nt):
                t[j] += gk * (U[f, j] * U[g, j])
            k += 1
    for ch in range(c):
        gk = G[k]
        for j in range(nt):
            t[j] += gk * vT[ch, _u(ja + j)]
        k += 1
    for f in range(d):
        for ch in range(c):
            gk = G[k]
            for j in range(nt):
                t[j] += gk * (U[f, j] * vT[ch, _u(ja + j)])
            k += 1
    for j in range(nt):
        t[j] *= x[j]
    for f in range(d):
        rf = r[f]
        s = x.dtype.type(0)
        for j in range(nt):
            s += t[j] * (U[f, j] * U[f, j] - rf)
        acc[f] += s


@_jit
def _backward_general(lo, hi, q, kT, vT, c2, G, tbar, r, L2h, L2l, left_out, rows, grad_w):
    """grad_w[i, f] = -(1/2) sum_j p_ij (u_ijf^2 - r_if) (G_i . phi_ij - tbar_i),
    items [lo, hi) of ``rows`` queries."""
    n, d = q.shape
    m = kT.shape[1]
    U = np.empty((d, TILE), q.dtype)
    x = np.empty(TILE, q.dtype)
    t = np.empty(TILE, q.dtype)
    acc = np.empty(d, np.float64)
    for item in range(lo, hi):
        for i in range(item * rows, min(item * rows + rows, n)):
            skip = left_out[i]
            acc[:] = 0.0
            Gi, ri, ti, Lh, Ll = G[i], r[i], tbar[i], L2h[i], L2l[i]
            for j0 in range(0, m, TILE):
                j1 = min(j0 + TILE, m)
                if j0 <= skip < j1:
                    _span_grad(q, i, kT, vT, c2, Lh, Ll, Gi, ti, ri, j0, skip, U, x, t, acc)
                    _span_grad(q, i, kT, vT, c2, Lh, Ll, Gi, ti, ri, skip + 1, j1, U, x, t, acc)
                else:
                    _span_grad(q, i, kT, vT, c2, Lh, Ll, Gi, ti, ri, j0, j1, U, x, t, acc)
            for f in range(d):
                grad_w[i, f] = -0.5 * acc[f]


# ------------------------------------------------------------ torch entry


def _fused(d, c):
    return d <= FUSED_DIMS and c <= FUSED_CHANNELS


def _markers(d, c):
    """The (dims, chans, phis) tuples that carry d, c and P in a pass's type."""
    return (0,) * d, (0,) * c, (0,) * (d + d * (d + 1) // 2 + c + d * c)


def make_plan(query, key, w, diagonal, tolerance):
    """The block-sparse plan of the softmax with scores -(1/2) sum_f w_f u_f^2,
    or None for a dense pass: the plan of ``kernels.blocks`` for the points
    scaled by sqrt(w_f) and w = 1, with expansions of far key boxes (``far``)
    where they apply and d = 1 (the expansions' second moment is the squared
    distance: the whole of u u^T in one feature only). Where rows leave a key
    out the queries are often the keys (leave-one-out): one order then serves
    both."""
    d, c = query.shape[1], 0
    if not _fused(d, c) or not bool((w >= 0).all()):
        return None
    scale = np.sqrt(arrays.float64(w))
    q = torch.from_numpy(arrays.float64(query) * scale)
    same = diagonal is not None and arrays.equal(query, key)
    k = q if same else torch.from_numpy(arrays.float64(key) * scale)
    ones = torch.ones(1, 1, dtype=torch.float64)
    loo = diagonal is not None
    # (w = 0 leaves no scale to carry the expansions' distances back)
    if d == 1 and float(w[0]) > 0 and far.applies(q[None], k[None], ones, tolerance):
        return far.plan(q[None], k[None], ones, tolerance, loo, BLOCK, BLOCK)
    return blocks.plan(q[None], k[None], ones, tolerance, loo, BLOCK, BLOCK)


def _fold_far(plan, q, kT, vT, w, skip, moments, lse):
    """The expanded key boxes' shares of the moments (``numba_fgt``), on the
    points scaled by sqrt(w) as the plan saw them."""
    scale = math.sqrt(float(w[0]))
    qs, ks = (np.asarray(x, np.float64) * scale for x in (q, kT))
    vT = np.ascontiguousarray(vT, np.float64)
    sigma = float(plan.far.delta[0]) / scale  # delta in the caller's units
    numba_fgt.fold_moments(plan.far, plan.q_block, qs, ks, vT, skip, sigma, moments, lse)


def _or_dense(plan, n, m):
    return plan or blocks.dense(1, n, m, blocks.rows_per_item(m), blocks.rows_per_item(n))


def _ordered(plan, query, key, value, diagonal):
    """q (1, n, d), kT (1, d, m), vT (1, c, m) in the plan's order, and the work
    items over query rows."""
    n, m = query.shape[0], key.shape[0]
    (q,) = blocks.queries_in_order(plan, query[None])
    k, v = blocks.keys_in_order(plan, key[None], value[None])
    skip, _ = blocks.skips(plan, diagonal, 1, n, m)
    work = sweep.Work(plan.key_ptr, plan.key_spans, plan.q_block, skip)
    return arrays.of(q), arrays.feature_major(k), arrays.feature_major(v), work


def _left_out(diagonal, n, m):
    """(n,) int64: the key each row of the general kernels leaves out, -1 for none."""
    return blocks.skips(None, diagonal, 1, n, m)[0][0]


def forward(query, key, value, w, diagonal, tolerance=0.0):
    n, d = query.shape
    m, c = key.shape[0], value.shape[1]
    moments = torch.empty((n, d + d * (d + 1) // 2 + c + d * c), dtype=torch.float64)
    lse = torch.empty(n, dtype=torch.float64)
    if not _fused(d, c):
        rows = blocks.rows_per_item(m)
        parallel(
            _forward_general, -(-n // rows), n * m, arrays.of(query), arrays.feature_major(key),
            arrays.feature_major(value), arrays.log2_scale(w), bool((w >= 0).all()),
            _left_out(diagonal, n, m), rows, moments.numpy(), lse.numpy(),
        )  # fmt: skip
        return moments, lse, blocks.pack(None, 1, n, m)
    found = make_plan(query, key, w, diagonal, tolerance)
    plan = _or_dense(found, n, m)
    q, kT, vT, work = _ordered(plan, query, key, value, diagonal)
    c2 = arrays.log2_scale(w)[None, None]
    args = Moments(
        q, kT, vT, c2, bool((w >= 0).all()), moments.numpy()[None], lse.numpy()[None],
        *_markers(d, c),
    )  # fmt: skip
    parallel(_run, len(plan.key_ptr) - 1, plan.pairs, work, args)
    if plan.far is not None:
        _fold_far(plan, q, kT, vT, w, work.skip, args.moments, args.lse)
    moments, lse = blocks.queries_back(plan, moments[None], lse[None])
    return moments[0], lse[0], blocks.pack(found, 1, n, m)


def backward(grad, query, key, value, w, lse, second, tbar, diagonal, packed=None):
    dtype = query.dtype
    n, d = query.shape
    m, c = key.shape[0], value.shape[1]
    lse2, high, low = arrays.lse_pair(lse, dtype)
    G, tbar, second = (arrays.copy(x.detach().numpy(), high.dtype) for x in (grad, tbar, second))
    if not _fused(d, c):
        rows = blocks.rows_per_item(m)
        grad_w = torch.empty(query.shape, dtype=torch.float64)
        parallel(
            _backward_general, -(-n // rows), n * m, arrays.of(query), arrays.feature_major(key),
            arrays.feature_major(value), arrays.log2_scale(w), G, tbar, second, high, low,
            _left_out(diagonal, n, m), rows, grad_w.numpy(),
        )  # fmt: skip
        return grad_w
    # the forward's expanded pairs, computed pair by pair
    found = None if packed is None else far.as_direct(blocks.unpack(packed, far.Far), n, m)
    plan = _or_dense(found, n, m)
    q, kT, vT, work = _ordered(plan, query, key, value, diagonal)
    shifted = np.abs(lse2) > EXACT_SHIFT_ABOVE[dtype]
    G, tbar, second, high, low, shifted = (
        arrays.of(x)
        for x in blocks.queries_in_order(
            plan, *(torch.from_numpy(x[None]) for x in (G, tbar, second, high, low, shifted))
        )
    )
    c2 = arrays.log2_scale(w)[None, None]
    if shifted.any():  # the forward's exact shift for rows whose lse cannot carry it
        args = MomentsShift(q, kT, vT, c2, shifted.astype(np.uint8), high, low, *_markers(d, c))
        parallel(_run, len(plan.key_ptr) - 1, plan.pairs, work, args)
    out = torch.empty((1, n, d), dtype=torch.float64)
    args = MomentsGrad(q, kT, vT, c2, G, tbar, second, high, low, out.numpy(), *_markers(d, c))
    parallel(_run, len(plan.key_ptr) - 1, plan.pairs, work, args)
    (out,) = blocks.queries_back(plan, out)
    return out[0]
