"""Numba CPU kernels for the local-linear moments.

For each query i and the keys j of its softmax, with u_ij = k_j - q_i and
p_ij = softmax_j(s_ij), s_ij = -(1/2) sum_f w_f u_ijf^2 (one w per feature):

    moments_i = sum_j p_ij * [u, upper(u u^T), v, u v^T]       (P numbers)

laid out as ``nwfast.local_linear.moment_layout`` says: the d first moments,
the d (d + 1) / 2 second moments f <= g row by row, the c values, then the
d * c products u_f v_ch feature by feature. Everything is centred at the query,
so a local-linear solve built on these sums cancels nothing the data do not.

The contract, on contiguous tensors of one float dtype (float32 or float64)::

    forward(query (n, d), key (m, d), value (m, c), w (d,), exclude_self)
        -> moments (n, P) float64, lse (n,) float64 (natural log)
    backward(grad (n, P) float64, query, key, value, w, lse, second (n, d) float64,
             tbar (n,) float64, exclude_self)
        -> (n, d) float64: row i holds d/dw_f of grad_i . moments_i

The backward is the derivative of the softmax in w_f:
d p_ij / d w_f = -(1/2) p_ij (u_ijf^2 - E_i[u_f^2]), where ``second`` holds the
E_i[u_f^2] the forward returned; the kernel also subtracts ``tbar`` =
grad_i . moments_i from grad_i . phi_ij (exact, since the centred weights sum to
0), so neither factor carries a large constant into the sum.

The loops follow ``numba_nw``: scores in log2 units, built and shifted with
operations the compiler may not fuse or regroup (``numba_exp.mul``, ``sub``,
``fma``), so the row maximum's own weight is exactly 1; the polynomial ``exp2``,
float32 (or float64) lanes within a tile of keys and float64 across tiles, a
shift of 0 when every w_f >= 0 (scores <= 0) with a redo against the row's
maximum when the sum underflows, no fast-math flag that assumes finite
numbers, one thread per query row in a fixed order (results repeat bit for
bit), and key i removed from row i (not weighted 0) with exclude_self.
"""

import functools
import math

import numpy as np
import torch
from numba import njit

from . import UNDERFLOW
from .numba_exp import exp2, fma, fmax, mul, sub
from .workers import parallel

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# Keys per tile. The tile keeps d + 2 rows of buffers (u per feature, scores,
# weighted u) in L1 for small d; 256 keys leave the ~30 cycles of set-up per
# tile and buffer pass below 10% of the work, and bound the depth of every
# float32 sum (16 to 32 terms a SIMD lane) before it goes into float64.
TILE = 256
# A parallel work item is a run of query rows worth about this many pairs.
ITEM_PAIRS = 1 << 15

_FLAGS = {"contract", "reassoc", "nsz", "arcp"}
_jit = functools.partial(njit, fastmath=_FLAGS, error_model="numpy", cache=True, nogil=True)
_ijit = functools.partial(_jit, inline="always")

# Unsigned tile indices: no negative-index wraparound, plain vector loads.
_u = np.uint64


def _rows_per_item(length):
    return max(1, min(64, ITEM_PAIRS // max(length, 1)))


# ------------------------------------------------------------- one span of keys
# A span is keys [ja, jb) of a tile; buffers are indexed from 0. A row's keys are
# its tiles, and with exclude_self the tile holding key i is two spans around it.


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
def _span_moments_11(q0, kT, vT, c0, ja, jb, shift, acc):
    """d = c = 1 in one sweep, no buffers: acc += sums of e_j [1, u, u^2, v, u v]."""
    s0 = kT.dtype.type(0)
    s1 = kT.dtype.type(0)
    s2 = kT.dtype.type(0)
    sv = kT.dtype.type(0)
    suv = kT.dtype.type(0)
    for j in range(ja, jb):
        jj = _u(j)
        u = kT[0, jj] - q0
        e = exp2(sub(mul(c0, u * u), shift))
        eu = e * u
        v = vT[0, jj]
        s0 += e
        s1 += eu
        s2 += eu * u
        sv += e * v
        suv += eu * v
    acc[0] += s0
    acc[1] += s1
    acc[2] += s2
    acc[3] += sv
    acc[4] += suv


@_ijit
def _span_moments(q, i, kT, vT, c2, ja, jb, shift, U, x, eu, acc):
    """acc += sum over the span of e_j [1, u, upper(u u^T), v, u v^T] with
    e_j = 2**(x_j - shift); acc is float64, the span's sums are in the data's
    dtype."""
    d = q.shape[1]
    c = vT.shape[0]
    if d == 1 and c == 1:
        _span_moments_11(q[i, 0], kT, vT, c2[0], ja, jb, shift, acc)
        return
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
def _forward_kernel(lo, hi, q, kT, vT, c2, scores_nonpositive, exclude_self, rows, moments, lse):
    """Items [lo, hi) of ``rows`` queries: q (n, d), kT (d, m), vT (c, m), c2 (d,)
    -> moments (n, P), lse (n,)."""
    n, d = q.shape
    U = np.empty((d, TILE), q.dtype)
    eu = np.empty((d, TILE), q.dtype)
    x = np.empty(TILE, q.dtype)
    acc = np.empty(moments.shape[1] + 1, np.float64)
    for item in range(lo, hi):
        for i in range(item * rows, min(item * rows + rows, n)):
            skip = i if exclude_self else -1
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
def _span_grad_11(q0, kT, vT, c0, L2h, L2l, G, tbar, r0, ja, jb, acc):
    """d = c = 1 in one sweep, no buffers."""
    g0, g1, g2, g3 = G[0], G[1], G[2], G[3]
    s = kT.dtype.type(0)
    for j in range(ja, jb):
        jj = _u(j)
        u = kT[0, jj] - q0
        uu = u * u
        v = vT[0, jj]
        p = exp2(sub(sub(mul(c0, uu), L2h), L2l))
        s += p * ((g0 * u + g1 * uu + g2 * v + g3 * (u * v)) - tbar) * (uu - r0)
    acc[0] += s


@_ijit
def _span_grad(q, i, kT, vT, c2, L2h, L2l, G, tbar, r, ja, jb, U, x, t, acc):
    """acc[f] += sum over the span of p_j (u_jf^2 - r_f) (G . phi_j - tbar)."""
    d = q.shape[1]
    c = vT.shape[0]
    if d == 1 and c == 1:
        _span_grad_11(q[i, 0], kT, vT, c2[0], L2h, L2l, G, tbar, r[0], ja, jb, acc)
        return
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
def _backward_kernel(lo, hi, q, kT, vT, c2, G, tbar, r, L2h, L2l, exclude_self, rows, grad_w):
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
            skip = i if exclude_self else -1
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


def _np(t):
    return t.detach().contiguous().numpy()


def _log2_scale(w):
    """c2_f = -(w_f / 2) log2(e), computed in float64 and rounded once."""
    return _np((w.double() * (-0.5 * LOG2E)).to(w.dtype))


def forward(query, key, value, w, exclude_self):
    n, d = query.shape
    c = value.shape[1]
    moments = torch.empty((n, d + d * (d + 1) // 2 + c + d * c), dtype=torch.float64)
    lse = torch.empty(n, dtype=torch.float64)
    rows = _rows_per_item(key.shape[0])
    parallel(
        _forward_kernel,
        -(-n // rows),
        n * key.shape[0],
        _np(query),
        _np(key.T),
        _np(value.T),
        _log2_scale(w),
        bool((w >= 0).all()),
        bool(exclude_self),
        rows,
        moments.numpy(),
        lse.numpy(),
    )
    return moments, lse


def backward(grad, query, key, value, w, lse, second, tbar, exclude_self):
    dtype = query.dtype
    lse2 = lse * LOG2E
    L2h = lse2.to(dtype)
    grad_w = torch.empty(query.shape, dtype=torch.float64)
    n, m = query.shape[0], key.shape[0]
    rows = _rows_per_item(m)
    parallel(
        _backward_kernel,
        -(-n // rows),
        n * m,
        _np(query),
        _np(key.T),
        _np(value.T),
        _log2_scale(w),
        _np(grad.to(dtype)),
        _np(tbar.to(dtype)),
        _np(second.to(dtype)),
        _np(L2h),
        _np((lse2 - L2h.double()).to(dtype)),
        bool(exclude_self),
        rows,
        grad_w.numpy(),
    )
    return grad_w
