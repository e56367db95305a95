"""Numba CPU kernels for Nadaraya-Watson attention pooling.

The contract (shapes, dtypes, what each function returns) is in
``kernels/__init__.py``; this file is the CPU implementation.

How the loops are laid out:

- Scores are kept in log2 units. With ``c2_j = -(w_j / 2) * log2(e)`` the
  weight ``exp(s_ij)`` is ``2**(c2_j * ||q_i - k_j||^2)``: one polynomial
  ``exp2`` (``numba_exp``) per pair, which LLVM vectorises.
- One query row at a time walks over the keys in tiles of ``TILE``. Inner
  loops run along keys on unit-stride rows, so keys and values are passed
  feature-major, ``(d, m)`` and ``(c, m)``; for d = c = 1 each pass is one
  fused sweep with no buffer.
- The softmax shift: with w >= 0 every score is <= 0, so a shift of 0 is
  safe from overflow and no row maximum is needed (the forward costs one exp2
  and ~6 flops per pair). If a row's sum then comes out tiny (a query far
  from all keys, a huge w) or NaN, that row is redone with the running
  maximum (online softmax: the tile's scores go into an L1 buffer, the tile
  max updates the running max and rescales the sums so far). Negative w
  always takes the running-max path.
- Sums inside a tile are in the input dtype (SIMD lanes); tile sums go into
  float64, so float32 error does not grow with m.
- The backward recomputes ``p_ij = 2**(x_ij - lse_i * log2(e))`` from the saved
  log-sum-exp. ``dq`` is a pass over key tiles per query; ``dk``, ``dv``,
  ``dw`` a pass over query tiles per key. Every output element is summed by
  one thread in a fixed order, so results repeat bit for bit.
"""

import functools
import math

import numpy as np
import torch
from numba import njit, prange

from . import distance_shift
from .numba_exp import exp2, fmax

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# Keys per tile. Each tile pays ~25 cycles of loop set-up and reductions;
# at 2048 that is ~1% and a float32 score buffer (8 KiB) still sits in L1
# next to the tile's keys and values.
TILE = 2048
# A parallel work item is a run of query (or key) rows worth about this many
# pairs: enough to amortise its buffer allocations, few enough rows that a
# handful of queries over many keys still spreads over the cores.
ITEM_PAIRS = 1 << 15
# The rows-layout dw is summed over rows in this many fixed chunks (partials
# summed afterwards in order), independent of the thread count.
DW_CHUNKS = 32


@njit(cache=True)
def _rows_per_item(length):
    """Rows per work item when each row sweeps ``length`` keys (or queries)."""
    return max(1, min(64, ITEM_PAIRS // max(length, 1)))


# Fast math without nnan/ninf, so NaN and inf propagate as in the reference;
# reassoc lets LLVM vectorise the sums. error_model="numpy": x / 0 is inf/NaN.
_FLAGS = {"contract", "reassoc", "nsz", "arcp"}
_jit = functools.partial(njit, fastmath=_FLAGS, error_model="numpy", cache=True)
_pjit = functools.partial(_jit, parallel=True)
_ijit = functools.partial(_jit, inline="always")


# ---------------------------------------------------------------- tile pieces
# Each works on one tile [j0, j0 + nt) of a feature-major array and a buffer
# of at least nt. Tile columns are indexed as A[r, _u(j0 + j)]: an unsigned
# index has no negative-index wraparound, so LLVM emits plain vector loads,
# and no array views are made per tile (each view costs atomic refcounts).
# inline="always" lets Numba drop the refcounts of the arguments too.

_u = np.uint64


@_ijit
def _sq_dist(a, r, BT, j0, nt, out):
    """out[j] = ||a[r] - b_(j0+j)||^2 over the tile; BT is (d, m)."""
    a0 = a[r, 0]
    for j in range(nt):
        diff = a0 - BT[0, _u(j0 + j)]
        out[j] = diff * diff
    for f in range(1, a.shape[1]):
        af = a[r, f]
        for j in range(nt):
            diff = af - BT[f, _u(j0 + j)]
            out[j] += diff * diff


@_ijit
def _scores(q, i, kT, c2, j0, nt, x):
    """x[j] = c2_(j0+j) * ||q_i - k_(j0+j)||^2, the score in log2 units;
    returns the tile max."""
    mx = x.dtype.type(-np.inf)
    if q.shape[1] == 1:  # one sweep for the common d = 1
        q0 = q[i, 0]
        for j in range(nt):
            jj = _u(j0 + j)
            diff = q0 - kT[0, jj]
            s = c2[jj] * (diff * diff)
            x[j] = s
            mx = fmax(mx, s)
    else:
        _sq_dist(q, i, kT, j0, nt, x)
        for j in range(nt):
            s = x[j] * c2[_u(j0 + j)]
            x[j] = s
            mx = fmax(mx, s)
    return mx


@_ijit
def _tile_max(x, nt):
    mx = x.dtype.type(-np.inf)
    for j in range(nt):
        mx = fmax(mx, x[j])
    return mx


@_ijit
def _exp2_shifted(x, nt, shift):
    """x[j] <- 2**(x[j] - shift) in place; returns the sum."""
    s = x.dtype.type(0)
    for j in range(nt):
        e = exp2(x[j] - shift)
        x[j] = e
        s += e
    return s


@_ijit
def _exp2_dot(x, nt, shift, vT, j0):
    """(sum_j e_j, sum_j e_j vT[0, j0+j]) with e_j = 2**(x[j] - shift): the
    single-channel forward in one sweep, without storing e."""
    s = x.dtype.type(0)
    a = x.dtype.type(0)
    for j in range(nt):
        e = exp2(x[j] - shift)
        s += e
        a += e * vT[0, _u(j0 + j)]
    return s, a


@_ijit
def _dot(x, nt, A, r, j0):
    """sum_j x[j] * A[r, j0 + j]."""
    s = x.dtype.type(0)
    for j in range(nt):
        s += x[j] * A[r, _u(j0 + j)]
    return s


@_ijit
def _dot_diff(x, nt, A, r, j0, a0):
    """sum_j x[j] * (A[r, j0 + j] - a0)."""
    s = x.dtype.type(0)
    for j in range(nt):
        s += x[j] * (A[r, _u(j0 + j)] - a0)
    return s


@_ijit
def _dot_cols(g, i, AT, j0, nt, out):
    """out[j] = g[i] . AT[:, j0 + j] (AT is (c, m))."""
    g0 = g[i, 0]
    for j in range(nt):
        out[j] = g0 * AT[0, _u(j0 + j)]
    for ch in range(1, g.shape[1]):
        gc = g[i, ch]
        for j in range(nt):
            out[j] += gc * AT[ch, _u(j0 + j)]


# ------------------------------------------------------------------ one row


@_ijit
def _exp2_sums_11(q0, kT, vT, c2, ja, jb, acc):
    """d = c = 1 in one sweep over keys [ja, jb), scores known to be <= 0 so
    no shift: returns sum_j 2**x_j and adds sum_j 2**x_j v_j to acc[0]."""
    s = kT.dtype.type(0)
    a = kT.dtype.type(0)
    for j in range(ja, jb):
        jj = _u(j)
        diff = q0 - kT[0, jj]
        e = exp2(c2[jj] * (diff * diff))
        s += e
        a += e * vT[0, jj]
    acc[0] += a
    return s


@_ijit
def _softmax_row(q, i, kT, vT, c2, skip, x, acc, zero_shift):
    """Softmax sums of query q[i] over all keys, key ``skip`` left out (-1:
    none). Returns the shift M (log2 units) and total = sum_j 2**(x_j - M)
    in float64; acc (float64, c) gets sum_j 2**(x_j - M) v_j.

    zero_shift: every score is known to be <= 0 (w >= 0), so M = 0 needs no
    max at all and d = c = 1 runs in one sweep; the caller checks that the
    total did not underflow. Otherwise M is the running max (online softmax).
    """
    m = c2.size
    c = acc.size
    ninf = x.dtype.type(-np.inf)
    M = x.dtype.type(0) if zero_shift else ninf
    total = 0.0
    acc[:] = 0.0
    for j0 in range(0, m, TILE):
        nt = min(TILE, m - j0)
        if zero_shift and q.shape[1] == 1 and c == 1:  # no buffer
            ja = j0
            if ja <= skip < j0 + nt:  # the skipped key splits the span
                total += _exp2_sums_11(q[i, 0], kT, vT, c2, ja, skip, acc)
                ja = skip + 1
            total += _exp2_sums_11(q[i, 0], kT, vT, c2, ja, j0 + nt, acc)
            continue
        mt = _scores(q, i, kT, c2, j0, nt, x)
        if j0 <= skip < j0 + nt:
            x[skip - j0] = ninf
            mt = _tile_max(x, nt)
        if mt > M and not zero_shift:  # rescale what was summed against the old max
            r = math.exp2(float(M) - float(mt))
            total *= r
            for ch in range(c):
                acc[ch] *= r
            M = mt
        # While every score so far is -inf, any finite shift gives weight 0
        # (and keeps 0 * v, so a NaN value still reaches the sum).
        shift = M if M > ninf else x.dtype.type(0)
        if c == 1:
            lt, at = _exp2_dot(x, nt, shift, vT, j0)
            total += lt
            acc[0] += at
        else:
            total += _exp2_shifted(x, nt, shift)
            for ch in range(c):
                acc[ch] += _dot(x, nt, vT, ch, j0)
    return M, total


@_ijit
def _pool_row(q, i, kT, vT, c2, skip, x, acc, scores_nonpositive, out, lse):
    """out[i] and lse[i] for one query."""
    M, total = _softmax_row(q, i, kT, vT, c2, skip, x, acc, scores_nonpositive)
    # With shift 0 the largest weight is >= total / m. Above 2**-60 the weights
    # flushed to zero (each < 2**-126) cannot matter; below it (a query far from
    # every key, a huge w) or NaN, redo the row against its running max.
    if scores_nonpositive and not total >= 2.0**-60:
        M, total = _softmax_row(q, i, kT, vT, c2, skip, x, acc, False)
    for ch in range(acc.size):
        out[i, ch] = acc[ch] / total
    lse[i] = (M + math.log2(total)) * LN2


# ---------------------------------------------------------- shared keys


@_pjit
def _forward_kernel(q, kT, vT, c2, nonpos, exclude_self, out, lse):
    """q (B, n, d), kT (B, d, m), vT (B, c, m), c2 (B, m) -> out (B, n, c),
    lse (B, n). nonpos[b]: every c2[b] <= 0."""
    B, n, _ = q.shape
    c = vT.shape[1]
    rows = _rows_per_item(c2.shape[1])
    nblk = (n + rows - 1) // rows
    for item in prange(B * nblk):
        b = item // nblk
        i0 = (item % nblk) * rows
        qb, kTb, vTb, c2b, outb, lseb = q[b], kT[b], vT[b], c2[b], out[b], lse[b]
        x = np.empty(TILE, q.dtype)
        acc = np.empty(c, np.float64)
        for i in range(i0, min(i0 + rows, n)):
            skip = i if exclude_self else -1
            _pool_row(qb, i, kTb, vTb, c2b, skip, x, acc, nonpos[b], outb, lseb)


@_ijit
def _dq_span_11(q0, g0, di, Lh, Ll, k, v, w, c2, ja, jb):
    """d = c = 1 in one sweep: sum_j t_j w_j (k_j - q0) over keys [ja, jb)."""
    s = k.dtype.type(0)
    for j in range(ja, jb):
        jj = _u(j)
        diff = k[jj] - q0
        p = exp2((c2[jj] * (diff * diff) - Lh) - Ll)
        s += p * (g0 * v[jj] - di) * w[jj] * diff
    return s


@_ijit
def _dkv_span_11(k0, v0, cj, q, g, delta, L2h, L2l, shift, ia, ib, acc):
    """d = c = 1 in one sweep over queries [ia, ib): adds the sums of p_i g_i,
    t_i (q_i - k0) and t_i (||q_i - k0||^2 - shift_i) to acc[0], acc[1], acc[2]."""
    sv = q.dtype.type(0)
    sw = q.dtype.type(0)
    sk = q.dtype.type(0)
    for i in range(ia, ib):
        ii = _u(i)
        diff = q[ii] - k0
        sq = diff * diff
        p = exp2((cj * sq - L2h[ii]) - L2l[ii])
        gi = g[ii]
        t = p * (gi * v0 - delta[ii])
        sv += p * gi
        sw += t * (sq - shift[ii])
        sk += t * diff
    acc[0] += sv
    acc[1] += sk
    acc[2] += sw


@_pjit
def _dq_kernel(q, g, delta, L2h, L2l, kT, vT, w, c2, exclude_self, dq):
    """dq_i = sum_j t_ij w_j (k_j - q_i), t_ij = p_ij (g_i . v_j - delta_i):
    one sweep over key tiles per query."""
    B, n, d = q.shape
    c = g.shape[2]
    m = c2.shape[1]
    rows = _rows_per_item(m)
    nblk = (n + rows - 1) // rows
    for item in prange(B * nblk):
        b = item // nblk
        i0 = (item % nblk) * rows
        qb, gb, kTb, vTb, wb, c2b = q[b], g[b], kT[b], vT[b], w[b], c2[b]
        k0, v0 = kTb[0], vTb[0]
        x = np.empty(TILE, q.dtype)
        t = np.empty(TILE, q.dtype)
        acc = np.empty(d, np.float64)
        for i in range(i0, min(i0 + rows, n)):
            acc[:] = 0.0
            di, Lh, Ll = delta[b, i], L2h[b, i], L2l[b, i]
            skip = i if exclude_self else -1
            for j0 in range(0, m, TILE):
                nt = min(TILE, m - j0)
                if d == 1 and c == 1:  # no buffers
                    q0, g0, ja = qb[i, 0], gb[i, 0], j0
                    if ja <= skip < j0 + nt:  # the skipped key splits the span
                        acc[0] += _dq_span_11(q0, g0, di, Lh, Ll, k0, v0, wb, c2b, ja, skip)
                        ja = skip + 1
                    acc[0] += _dq_span_11(q0, g0, di, Lh, Ll, k0, v0, wb, c2b, ja, j0 + nt)
                    continue
                _scores(qb, i, kTb, c2b, j0, nt, x)
                _dot_cols(gb, i, vTb, j0, nt, t)
                for j in range(nt):  # t_ij w_j
                    t[j] = exp2((x[j] - Lh) - Ll) * (t[j] - di) * wb[_u(j0 + j)]
                if j0 <= skip < j0 + nt:
                    t[skip - j0] = 0
                for f in range(d):
                    acc[f] += _dot_diff(t, nt, kTb, f, j0, qb[i, f])
            for f in range(d):
                dq[b, i, f] = acc[f]


@_pjit
def _dkv_kernel(k, v, w, c2, qT, gT, delta, L2h, L2l, shift, exclude_self, dk, dv, dw):
    """dv_j = sum_i p_ij g_i, dk_j = w_j sum_i t_ij (q_i - k_j),
    dw_j = -1/2 sum_i t_ij (||q_i - k_j||^2 - shift_i): one sweep over query
    tiles per key."""
    B, m, d = k.shape
    c = v.shape[2]
    n = L2h.shape[1]
    rows = _rows_per_item(n)
    nblk = (m + rows - 1) // rows
    for item in prange(B * nblk):
        b = item // nblk
        j0 = (item % nblk) * rows
        kb, vb, qTb, gTb, deltab = k[b], v[b], qT[b], gT[b], delta[b]
        L2hb, L2lb, shiftb = L2h[b], L2l[b], shift[b]
        q0, g0 = qTb[0], gTb[0]
        sq = np.empty((1, TILE), k.dtype)  # 2-D so that _dot can read it
        p = np.empty(TILE, k.dtype)
        t = np.empty(TILE, k.dtype)
        acc = np.empty(c + d + 1, np.float64)  # sums for dv, dk, dw
        for j in range(j0, min(j0 + rows, m)):
            acc[:] = 0.0
            cj = c2[b, j]
            skip = j if exclude_self else -1
            for i0 in range(0, n, TILE):
                nt = min(TILE, n - i0)
                if d == 1 and c == 1:  # no buffers
                    k00, v00, ia = kb[j, 0], vb[j, 0], i0
                    if ia <= skip < i0 + nt:  # the skipped query splits the span
                        _dkv_span_11(
                            k00, v00, cj, q0, g0, deltab, L2hb, L2lb, shiftb, ia, skip, acc
                        )
                        ia = skip + 1
                    _dkv_span_11(k00, v00, cj, q0, g0, deltab, L2hb, L2lb, shiftb, ia, i0 + nt, acc)
                    continue
                _sq_dist(kb, j, qTb, i0, nt, sq[0])
                _dot_cols(vb, j, gTb, i0, nt, t)
                for i in range(nt):
                    ii = _u(i0 + i)
                    pi = exp2((cj * sq[0, i] - L2hb[ii]) - L2lb[ii])
                    p[i] = pi
                    t[i] = pi * (t[i] - deltab[ii])
                    sq[0, i] -= shiftb[ii]
                if i0 <= skip < i0 + nt:
                    p[skip - i0] = 0
                    t[skip - i0] = 0
                for ch in range(c):
                    acc[ch] += _dot(p, nt, gTb, ch, i0)
                for f in range(d):
                    acc[c + f] += _dot_diff(t, nt, qTb, f, i0, kb[j, f])
                acc[c + d] += _dot(t, nt, sq, 0, 0)
            for ch in range(c):
                dv[b, j, ch] = acc[ch]
            for f in range(d):
                dk[b, j, f] = w[b, j] * acc[c + f]
            dw[b, j] = -0.5 * acc[c + d]


# ---------------------------------------------------------- per-query rows


@_pjit
def _forward_rows_kernel(q, K, V, c2, nonpos, out, lse):
    """q (n, 1), K and V (n, m), c2 (m,) -> out (n, 1), lse (n,)."""
    n = q.shape[0]
    rows = _rows_per_item(c2.size)
    nblk = (n + rows - 1) // rows
    for item in prange(nblk):
        x = np.empty(TILE, q.dtype)
        acc = np.empty(1, np.float64)
        for i in range(item * rows, min(item * rows + rows, n)):
            # row i's keys and values as (1, m): the shared-key row with d = c = 1
            _pool_row(q, i, K[i : i + 1], V[i : i + 1], c2, -1, x, acc, nonpos, out, lse)


@_pjit
def _backward_rows_kernel(q, K, V, w, c2, g, delta, L2h, L2l, shift, dq, dK, dV, dw_part):
    """One sweep per row gives dq_i = -sum_j dK_ij and, where dK / dV have
    rows (they are (n, 0) when not wanted), the dK and dV rows; the sums for
    dw, t_ij (d_ij^2 - shift_i), go into dw_part[chunk] (float64), one fixed
    chunk of rows per work item."""
    n, m = K.shape
    write_k = dK.shape[1] == m
    write_v = dV.shape[1] == m
    nchunk = dw_part.shape[0]
    per = (n + nchunk - 1) // nchunk
    for chunk in prange(nchunk):
        part = dw_part[chunk]
        part[:] = 0.0
        for i in range(chunk * per, min(chunk * per + per, n)):
            qi, gi, di, Lh, Ll, ri = q[i], g[i], delta[i], L2h[i], L2l[i], shift[i]
            Ki, Vi, dKi, dVi = K[i], V[i], dK[i], dV[i]
            acc = 0.0
            for j0 in range(0, m, TILE):
                s = q.dtype.type(0)
                for j in range(min(TILE, m - j0)):
                    jj = _u(j0 + j)
                    diff = qi - Ki[jj]
                    sq = diff * diff
                    p = exp2((c2[jj] * sq - Lh) - Ll)
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


# ------------------------------------------------------------ torch entry


def _np(t):
    return t.detach().contiguous().numpy()


def _feature_major(t):
    """(B, r, f) -> (B, f, r) contiguous: unit-stride rows for the inner loops."""
    return _np(t.transpose(-1, -2))


def _log2_scale(w):
    """c2 = -(w / 2) * log2(e), computed in float64 and rounded once."""
    return _np((w.double() * (-0.5 * LOG2E)).to(w.dtype))


def _lse_log2(lse, dtype):
    """lse in log2 units as a (high, low) pair of dtype arrays: the backward's
    exp2((x - high) - low) keeps the weight of the nearest keys exact to
    rounding even where |lse| is large (a query far from every key)."""
    L2 = lse.double() * LOG2E
    high = L2.to(dtype)
    return _np(high), _np((L2 - high.double()).to(dtype))


def _delta(grad_out, out):
    """delta_i = g_i . y_i, in float64 then rounded to the input dtype."""
    return _np((grad_out.double() * out.double()).sum(-1).to(out.dtype))


def _per_key(w, m):
    """(..., 1) -> (..., m) contiguous: every kernel reads one w per key."""
    return w.expand(*w.shape[:-1], m).contiguous()


def _dw(dw_keys, w, dtype):
    """The per-key sums as w's gradient: summed over keys for a shared w."""
    if w.shape[-1] == 1:
        dw_keys = dw_keys.sum(-1, keepdims=True)
    return torch.from_numpy(dw_keys).to(dtype)


def forward(query, key, value, w, exclude_self):
    B, n, _ = query.shape
    m, c = key.shape[1], value.shape[-1]
    w = _per_key(w, m)
    out = torch.empty((B, n, c), dtype=query.dtype)
    lse = torch.empty((B, n), dtype=torch.float64)
    _forward_kernel(
        _np(query),
        _feature_major(key),
        _feature_major(value),
        _log2_scale(w),
        _np((w >= 0).all(dim=-1)),
        bool(exclude_self),
        out.numpy(),
        lse.numpy(),
    )
    return out, lse


def backward(grad_out, query, key, value, w, out, lse, exclude_self, needs):
    need_q, need_k, need_v, need_w = (bool(x) for x in needs)
    dtype = query.dtype
    w_keys = _per_key(w, key.shape[1])
    c2 = _log2_scale(w_keys)
    L2h, L2l = _lse_log2(lse, dtype)
    delta = _delta(grad_out, out)
    wn = _np(w_keys)
    dq = dk = dv = dw = None
    if need_q:
        dq = torch.empty(query.shape, dtype=dtype)
        _dq_kernel(
            _np(query),
            _np(grad_out),
            delta,
            L2h,
            L2l,
            _feature_major(key),
            _feature_major(value),
            wn,
            c2,
            bool(exclude_self),
            dq.numpy(),
        )
    if need_k or need_v or need_w:
        dk = torch.empty(key.shape, dtype=dtype)
        dv = torch.empty(value.shape, dtype=dtype)
        dw_keys = np.empty(w_keys.shape, np.float64)
        _dkv_kernel(
            _np(key),
            _np(value),
            wn,
            c2,
            _feature_major(query),
            _feature_major(grad_out),
            delta,
            L2h,
            L2l,
            _np(distance_shift(lse, w, key.shape[1] - bool(exclude_self)).to(dtype)),
            bool(exclude_self),
            dk.numpy(),
            dv.numpy(),
            dw_keys,
        )
        dw = _dw(dw_keys, w, dtype)
    return (
        dq,
        dk if need_k else None,
        dv if need_v else None,
        dw if need_w else None,
    )


def forward_rows(query, keys, values, w):
    n, m = keys.shape
    w = _per_key(w, m)
    out = torch.empty(n, dtype=query.dtype)
    lse = torch.empty(n, dtype=torch.float64)
    _forward_rows_kernel(
        _np(query[:, None]),
        _np(keys),
        _np(values),
        _log2_scale(w),
        bool((w >= 0).all()),
        out.numpy()[:, None],
        lse.numpy(),
    )
    return out, lse


def backward_rows(grad_out, query, keys, values, w, out, lse, needs):
    need_q, need_k, need_v, need_w = (bool(x) for x in needs)
    n, m = keys.shape
    dtype = query.dtype
    w_keys = _per_key(w, m)
    # Gradients of the (n, m) inputs are only written when asked for: the
    # sweep is memory-bound, and training w alone needs none of them.
    dq = torch.empty(n, dtype=dtype)
    dK = torch.empty((n, m if need_k else 0), dtype=dtype)
    dV = torch.empty((n, m if need_v else 0), dtype=dtype)
    dw_part = np.empty((min(n, DW_CHUNKS), m), np.float64)
    _backward_rows_kernel(
        _np(query),
        _np(keys),
        _np(values),
        _np(w_keys),
        _log2_scale(w_keys),
        _np(grad_out),
        _delta(grad_out[:, None], out[:, None]),
        *_lse_log2(lse, dtype),
        _np(distance_shift(lse, w, m).to(dtype)),
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
