"""Numba kernels for a plan's far fields (``kernels.far``): the fast Gauss transform.

Two directions, one set of pieces:

- rows: each expanded key node gets Hermite moments of its keys, weighted by
  the values and by 1 (``_moments``); each block of queries evaluates the
  moments of the nodes its box expands (``_rows``). The forward needs the sums
  of the weights and of the weighted values; the backward also their first and
  second moments in the distance, for dq and the gradient of the shared w.
- columns (backward only): each query box gets moments of its queries,
  weighted by the upstream terms; each block of keys evaluates those of the
  boxes that expanded a node holding it (``_columns``), for dv and dk.

Everything here is float64: the Hermite series' terms are larger than their
sum (up to ~e^{a^2} times), and the sums of a float32 call are summed in
float64 anyway. A row that leaves its own key out gets that key's exact term
subtracted from the expansion that holds it. The direct pass computes the
rest of each row; ``forward`` folds its out and lse together with the far
sums. The order of every expansion comes from the plan, where the bound is
(``kernels.far``).
"""

import functools
import math

import numpy as np
import torch
from numba import njit

from . import arrays, numba_target
from .numba_exp import exp2
from .workers import parallel

LOG2E = 1.4426950408889634

_FLAGS = {"contract", "reassoc", "nsz", "arcp"}
_jit = functools.partial(
    njit, fastmath=_FLAGS, error_model="numpy", cache=True, nogil=True, _target=numba_target.NAME
)

# Keys per chunk of a moment sum: their powers sit in a buffer of this many
# lanes per order.
CHUNK = 128


# ------------------------------------------------------------------ moments


@_jit
def _moments(lo, hi, nodes, centre, delta, offset, order, pts, weights, ones, out):
    """Moments of nodes [lo, hi): node u holds points [s, e) of batch b
    (nodes[u] = b, s, e) about centre[u]; out[offset[u]:] gets, per weight
    channel, A[n_1, ..., n_d] = sum_j w_j prod_f s_jf^n_f / n_f!, s_j =
    (x_j - centre) / delta_b, n_f < order[u]. pts (B, d, size) and weights
    (B, C, size) feature-major; ``ones``: one more channel of weight 1."""
    d = pts.shape[1]
    C = weights.shape[1]
    p_top = max(order[lo:hi].max(), 1) if hi > lo else 1
    power = np.empty((d, p_top, CHUNK))
    for u in range(lo, hi):
        b, s, e = nodes[u, 0], nodes[u, 1], nodes[u, 2]
        p = order[u]
        if p == 0:  # expanded by no pair
            continue
        size = p**d
        base = offset[u]
        inv = 1.0 / delta[b]
        out[base : base + (C + ones) * size] = 0.0
        for j0 in range(s, e, CHUNK):
            nj = min(CHUNK, e - j0)
            for f in range(d):
                c = centre[u, f]
                for j in range(nj):
                    power[f, 0, j] = 1.0
                for n in range(1, p):
                    scale = inv / n
                    for j in range(nj):
                        power[f, n, j] = power[f, n - 1, j] * ((pts[b, f, j0 + j] - c) * scale)
            for ch in range(C + ones):
                at = base + ch * size
                if d == 1:
                    for n in range(p):
                        acc = 0.0
                        if ch < C:
                            for j in range(nj):
                                acc += weights[b, ch, j0 + j] * power[0, n, j]
                        else:
                            for j in range(nj):
                                acc += power[0, n, j]
                        out[at + n] += acc
                else:
                    for n1 in range(p):
                        for n2 in range(p):
                            acc = 0.0
                            if ch < C:
                                for j in range(nj):
                                    acc += (
                                        weights[b, ch, j0 + j] * power[0, n1, j] * power[1, n2, j]
                                    )
                            else:
                                for j in range(nj):
                                    acc += power[0, n1, j] * power[1, n2, j]
                            out[at + n1 * p + n2] += acc


def _moment_layout(orders, channels, d):
    """Offsets of each node's moments in one flat array, and its size."""
    sizes = channels * orders.astype(np.int64) ** d
    offset = np.zeros(len(orders) + 1, np.int64)
    np.cumsum(sizes, out=offset[1:])
    return offset[:-1], int(offset[-1])


# ------------------------------------------------------------------ evaluation


@_jit
def _hermite(t, p, H):
    """H[n, r] = h_n(t_r) for n < p: h_0 = exp(-t^2), h_1 = 2 t h_0,
    h_{n+1} = 2 t h_n - 2 n h_{n-1} (h_n = (-d/dt)^n exp(-t^2))."""
    R = t.size
    for r in range(R):
        H[0, r] = exp2(-(t[r] * t[r]) * LOG2E)
    if p > 1:
        for r in range(R):
            H[1, r] = 2.0 * t[r] * H[0, r]
    for n in range(1, p - 1):
        for r in range(R):
            H[n + 1, r] = 2.0 * t[r] * H[n, r] - 2.0 * n * H[n - 1, r]


@_jit
def _add_expansion(moments, at, p_m, channels, p, slots, H, R, inner, acc):
    """acc[ch, slot, :R] += one expansion's sums at R targets, from its
    moments (moments[at:], order p_m per axis, ``channels``) truncated at p,
    and the targets' Hermite functions H (d, orders, R). Slot 0: sum_j w_j
    e_j; with slots > 1, slots 1..d: sum_j w_j (t - s_j)_f e_j (= 1/2 of the
    first derivative's series along f), slot d + 1: sum_j w_j |t - s_j|^2 e_j
    (= the second derivatives' along every axis / 4 + d/2 of the value)."""
    d = H.shape[0]
    size = p_m**d
    for ch in range(channels):
        base = at + ch * size
        if d == 1:
            for n in range(p):
                a = moments[base + n]
                for r in range(R):
                    acc[ch, 0, r] += a * H[0, n, r]
                if slots > 1:
                    for r in range(R):
                        acc[ch, 1, r] += 0.5 * a * H[0, n + 1, r]
                        acc[ch, 2, r] += 0.25 * a * H[0, n + 2, r] + 0.5 * a * H[0, n, r]
        else:
            kinds = 3 if slots > 1 else 1
            for n1 in range(p):
                # inner[k, r] = sum_n2 A[n1, n2] h_{n2 + k}(t2_r)
                for k in range(kinds):
                    for r in range(R):
                        inner[k, r] = 0.0
                for n2 in range(p):
                    a = moments[base + n1 * p_m + n2]
                    for k in range(kinds):
                        for r in range(R):
                            inner[k, r] += a * H[1, n2 + k, r]
                for r in range(R):
                    acc[ch, 0, r] += H[0, n1, r] * inner[0, r]
                if slots > 1:
                    for r in range(R):
                        acc[ch, 1, r] += 0.5 * H[0, n1 + 1, r] * inner[0, r]
                        acc[ch, 2, r] += 0.5 * H[0, n1, r] * inner[1, r]
                        acc[ch, 3, r] += (
                            0.25 * (H[0, n1 + 2, r] * inner[0, r] + H[0, n1, r] * inner[2, r])
                            + H[0, n1, r] * inner[0, r]
                        )


@_jit
def _subtract(acc, r, diff2, diff, weights, b, j, ones, slots, channels):
    """acc[:, :, r] -= one source point's exact terms (the left-out key of a
    row, or the left-out query of a key): diff (d,) = (target - source) /
    delta, its weights weights[b, :, j] (and 1 where ``ones``)."""
    e = math.exp(-diff2)
    d = diff.size
    C = weights.shape[1]
    for ch in range(channels):
        wt = weights[b, ch, j] if ch < C else 1.0
        acc[ch, 0, r] -= wt * e
        if slots > 1:
            for f in range(d):
                acc[ch, 1 + f, r] -= wt * diff[f] * e
            acc[ch, 1 + d, r] -= wt * diff2 * e


@_jit
def _targets(pts, b, i0, R, centre, inv, t, H, need):
    """Scaled offsets of targets [i0, i0 + R) of batch b from an expansion's
    centre, and their Hermite functions up to ``need`` per axis."""
    d = pts.shape[1]
    for f in range(d):
        c = centre[f]
        for r in range(R):
            t[f, r] = (pts[b, f, i0 + r] - c) * inv
        _hermite(t[f, :R], need, H[f])


@_jit
def _local_sums(coef, at, p, channels, q, b, i0, R, centre, inv, slots, t, G, W, acc):
    """acc[ch, slot, :R] += a box's local expansion (coef[at:], order p per
    axis, ``channels``) at its rows [i0, i0 + R) of batch b: the value F and,
    with slots > 1, the first moments -dF/dtau_f / 2 and the second
    sum_f (d^2F/dtau_f^2 / 4 + F / 2) (``_add_expansion``'s slots), by Horner's
    rule with derivatives. tau = (q - centre) / delta; G (3, p, rows) and W
    (3, 3, rows) are scratch."""
    d = q.shape[1]
    size = p**d
    for f in range(d):
        for r in range(R):
            t[f, r] = (q[b, f, i0 + r] - centre[f]) * inv
    for ch in range(channels):
        base = at + ch * size
        if slots == 1:  # the values alone
            if d == 1:
                _horner_value(coef[base : base + p], p, t[0], R, W[0, 0])
            else:
                for k1 in range(p):
                    _horner_value(coef[base + k1 * p : base + k1 * p + p], p, t[1], R, G[0, k1])
                _horner_value(G[0], p, t[0], R, W[0, 0])
            for r in range(R):
                acc[ch, 0, r] += W[0, 0, r]
        elif d == 1:
            _horner(coef[base : base + p], p, t[0], R, W[0])
            for r in range(R):
                acc[ch, 0, r] += W[0, 0, r]
                acc[ch, 1, r] -= 0.5 * W[0, 1, r]
                acc[ch, 2, r] += 0.5 * W[0, 2, r] + 0.5 * W[0, 0, r]
        else:
            # along tau_2 for every k1: G[j, k1] = the j-th derivative (/ j! for j = 2)
            for k1 in range(p):
                _horner(coef[base + k1 * p : base + k1 * p + p], p, t[1], R, W[1])
                for j in range(3):
                    for r in range(R):
                        G[j, k1, r] = W[1, j, r]
            # then along tau_1: F with its derivatives from G[0]; d/dtau_2 from G[1], G[2]
            _horner(G[0], p, t[0], R, W[0])
            _horner(G[1], p, t[0], R, W[1])
            _horner(G[2], p, t[0], R, W[2])
            for r in range(R):
                acc[ch, 0, r] += W[0, 0, r]
                acc[ch, 1, r] -= 0.5 * W[0, 1, r]
                acc[ch, 2, r] -= 0.5 * W[1, 0, r]
                acc[ch, 3, r] += 0.5 * (W[0, 2, r] + W[2, 0, r]) + W[0, 0, r]


@_jit
def _horner_value(coef, p, t, R, out):
    """out[r] = sum_{k < p} c_k t_r^k: c_k = coef[k] (1-D), or row r's own coef[k, r]."""
    per_row = coef.ndim == 2
    for r in range(R):
        out[r] = coef[p - 1, r] if per_row else coef[p - 1]
    for k in range(p - 2, -1, -1):
        for r in range(R):
            out[r] = out[r] * t[r] + (coef[k, r] if per_row else coef[k])


@_jit
def _horner(coef, p, t, R, W):
    """W[0, r], W[1, r], W[2, r] = P(t_r), P'(t_r), P''(t_r) / 2 for P(t) =
    sum_{k < p} c_k t^k: c_k = coef[k] (1-D), or row r's own coef[k, r]."""
    per_row = coef.ndim == 2
    for r in range(R):
        W[0, r] = coef[p - 1, r] if per_row else coef[p - 1]
        W[1, r] = 0.0
        W[2, r] = 0.0
    for k in range(p - 2, -1, -1):
        for r in range(R):
            c = coef[k, r] if per_row else coef[k]
            W[2, r] = W[2, r] * t[r] + W[1, r]
            W[1, r] = W[1, r] * t[r] + W[0, r]
            W[0, r] = W[0, r] * t[r] + c


@_jit
def _scratch(q_local, rows):
    """Buffers of ``_local_sums``: G (3, largest local order, rows), W (3, 3, rows)."""
    p = max(q_local.max(), 1) if q_local.size else 1
    return np.empty((3, p, rows)), np.empty((3, 3, rows))


@_jit
def _locals(
    lo, hi, q_box, q_centre, q_local, row_ptr, row_pairs, k_centre, delta, moments, m_off,
    m_order, channels, largest, l_off, coef,
):  # fmt: skip
    """Boxes [lo, hi): the local expansion of box x, coef[l_off[x]:] (per
    channel, B[k_1, ..., k_d], k_f < q_local[x]), from the Hermite expansions
    of the key nodes it expands, each truncated at its values' order (or the
    largest of its orders where ``largest``): with t0 = (c_box - c_node) /
    delta, h_n(t0 + tau) = sum_k (-tau)^k / k! h_{n+k}(t0), so B_k = prod_f
    (-1)^k_f / k_f! sum_n A_n prod_f h_{n_f + k_f}(t0_f)."""
    d = q_centre.shape[1]
    p_top = (m_order.max() if m_order.size else 1) + (q_local.max() if q_local.size else 1)
    H = np.empty((d, p_top))
    inner = np.empty((p_top, p_top))
    t0 = np.empty(1)
    scale = np.empty(p_top)  # (-1)^k / k!
    for k in range(p_top):
        scale[k] = (-1.0) ** k / math.gamma(k + 1.0)
    for x in range(lo, hi):
        pl = q_local[x]
        if pl == 0:
            continue
        b = q_box[x, 0]
        size = pl**d
        out = coef[l_off[x] : l_off[x] + channels * size]
        out[:] = 0.0
        for pr in range(row_ptr[x], row_ptr[x + 1]):
            u = row_pairs[pr, 0]
            p = row_pairs[pr, 1]
            if largest:
                p = max(p, max(row_pairs[pr, 2], row_pairs[pr, 3]))
            pm = m_order[u]
            for f in range(d):
                t0[0] = (q_centre[x, f] - k_centre[u, f]) / delta[b]
                _hermite(t0, p + pl, H[f : f + 1].T)
            for ch in range(channels):
                a0 = m_off[u] + ch * pm**d
                o0 = ch * size
                if d == 1:
                    for k in range(pl):
                        acc = 0.0
                        for n in range(p):
                            acc += moments[a0 + n] * H[0, n + k]
                        out[o0 + k] += scale[k] * acc
                else:
                    for n1 in range(p):
                        for k2 in range(pl):
                            acc = 0.0
                            for n2 in range(p):
                                acc += moments[a0 + n1 * pm + n2] * H[1, n2 + k2]
                            inner[n1, k2] = acc
                    for k1 in range(pl):
                        for k2 in range(pl):
                            acc = 0.0
                            for n1 in range(p):
                                acc += H[0, n1 + k1] * inner[n1, k2]
                            out[o0 + k1 * pl + k2] += scale[k1] * scale[k2] * acc


@_jit
def _row_block(
    item, q, rows, box_of_block, row_ptr, row_pairs, k_node, k_centre, delta, moments, m_off,
    m_order, local, kT, wT, ones, skip, slots, H, t, inner, G, W, acc, diff,
):  # fmt: skip
    """acc[ch, slot, r] = the sums over the key nodes that query block
    ``item`` (b * blocks + t: rows [t * rows, ...) of batch b) expands,
    each row's left-out key subtracted: from the box's local expansion where
    it has one (``_local_sums``; local = (q_centre, q_local, l_off, coef)),
    else from each node's Hermite series (``_add_expansion``). Returns (b,
    first row, rows). slots 1: the forward (each pair's value order); more:
    the backward (each pair's largest order, two more Hermite functions)."""
    q_centre, q_local, l_off, coef = local
    d, n = q.shape[1], q.shape[2]
    channels = acc.shape[0]
    blocks = (n + rows - 1) // rows
    b = item // blocks
    i0 = (item % blocks) * rows
    R = min(rows, n - i0)
    box = box_of_block[item]
    acc[:] = 0.0
    inv = 1.0 / delta[b]
    p_loc = q_local[box]
    if p_loc > 0:
        _local_sums(
            coef, l_off[box], p_loc, channels, q, b, i0, R, q_centre[box], inv, slots, t, G, W,
            acc,
        )  # fmt: skip
    for pr in range(row_ptr[box], row_ptr[box + 1]):
        u = row_pairs[pr, 0]
        if p_loc == 0:
            if slots == 1:
                p = row_pairs[pr, 1]
            else:
                p = max(row_pairs[pr, 1], max(row_pairs[pr, 2], row_pairs[pr, 3]))
            _targets(q, b, i0, R, k_centre[u], inv, t, H, p + (2 if slots > 1 else 0))
            _add_expansion(moments, m_off[u], m_order[u], channels, p, slots, H, R, inner, acc)
        for r in range(R):
            j = skip[b, i0 + r]
            if k_node[u, 1] <= j < k_node[u, 2]:
                diff2 = 0.0
                for f in range(d):
                    diff[f] = (q[b, f, i0 + r] - kT[b, f, j]) * inv
                    diff2 += diff[f] * diff[f]
                _subtract(acc, r, diff2, diff, wT, b, j, ones, slots, channels)
    return b, i0, R


@_jit
def _rows(
    lo, hi, q, rows, box_of_block, row_ptr, row_pairs, k_node, k_centre, delta, moments, m_off,
    m_order, local, kT, vT, skip, g, delta_i, inv_s, shift, wd, dq, dw_rows,
):  # fmt: skip
    """The backward's row side, query blocks [lo, hi): with the sums of
    ``_row_block`` (values and 1), sum_j t_ij X_j = e^-lse_i (g_i . sum_j
    v_j X_j - delta_i sum_j X_j) for X the weight, the first and the second
    moments; dq[b, i] = -w delta (first moments) and dw_rows[b, i] = -1/2
    (delta^2 second - r_i weight), r_i the distance shift. q (B, d, n), kT
    (B, d, m), vT (B, c, m); g (B, n, c); inv_s = e^-lse; wd (B,) w delta."""
    d = q.shape[1]
    c = vT.shape[1]
    slots = d + 2
    p_top = m_order.max() + 3 if m_order.size else 3
    H = np.empty((d, p_top, rows))
    t = np.empty((d, rows))
    inner = np.empty((3, rows))
    acc = np.empty((c + 1, slots, rows))
    diff = np.empty(d)
    ts = np.empty(slots)
    G, W = _scratch(local[1], rows)
    for item in range(lo, hi):
        box = box_of_block[item]
        if row_ptr[box] == row_ptr[box + 1]:  # nothing expanded (its rows' e^-lse may be inf)
            continue
        b, i0, R = _row_block(
            item, q, rows, box_of_block, row_ptr, row_pairs, k_node, k_centre, delta, moments,
            m_off, m_order, local, kT, vT, 1, skip, slots, H, t, inner, G, W, acc, diff,
        )  # fmt: skip
        for r in range(R):
            i = i0 + r
            for s in range(slots):
                total = 0.0
                for ch in range(c):
                    total += g[b, i, ch] * acc[ch, s, r]
                ts[s] = inv_s[b, i] * (total - delta_i[b, i] * acc[c, s, r])
            for f in range(d):
                dq[b, i, f] = -wd[b] * ts[1 + f]
            dw_rows[b, i] = -0.5 * (delta[b] * delta[b] * ts[1 + d] - shift[b, i] * ts[0])


@_jit
def _fold_rows(
    lo, hi, q, rows, box_of_block, row_ptr, row_pairs, k_node, k_centre, delta, moments, m_off,
    m_order, local, kT, vT, skip, out, lse,
):  # fmt: skip
    """The forward: query blocks [lo, hi) whose box expands something get
    the expanded sums of the values and weights folded into the direct
    pass's out (B, n, c) and lse (B, n): sum = exp(lse) + expanded, weighted
    sum = out exp(lse) + expanded (nothing where the row had no direct key,
    lse -inf), then out = weighted / sum, lse = log(sum)."""
    d = q.shape[1]
    c = vT.shape[1]
    p_top = m_order.max() + 3 if m_order.size else 3
    H = np.empty((d, p_top, rows))
    t = np.empty((d, rows))
    inner = np.empty((3, rows))
    acc = np.empty((c + 1, 1, rows))
    diff = np.empty(d)
    G, W = _scratch(local[1], rows)
    for item in range(lo, hi):
        box = box_of_block[item]
        if row_ptr[box] == row_ptr[box + 1]:
            continue
        b, i0, R = _row_block(
            item, q, rows, box_of_block, row_ptr, row_pairs, k_node, k_centre, delta, moments,
            m_off, m_order, local, kT, vT, 1, skip, 1, H, t, inner, G, W, acc, diff,
        )  # fmt: skip
        for r in range(R):
            i = i0 + r
            direct = math.exp(lse[b, i])
            total = direct + acc[c, 0, r]
            for ch in range(c):
                weighted = out[b, i, ch] * direct if direct > 0.0 else 0.0
                out[b, i, ch] = (weighted + acc[ch, 0, r]) / total
            lse[b, i] = math.log(total)


@_jit
def _fold_moment_rows(
    lo, hi, q, rows, box_of_block, row_ptr, row_pairs, k_node, k_centre, delta, moments, m_off,
    m_order, local, kT, vT, skip, sigma, out, lse,
):  # fmt: skip
    """Local-linear's moments in one dimension: as ``_fold_rows``, the
    expanded sums of the weights and the values, with their first and second
    moments in the distance (``_rows``' slots, (t - s) in units of delta),
    folded into the direct pass's moments out (B, n, P: u, u^2, the c values,
    u times each) and lse (B, n); u = k - q = -sigma (t - s)."""
    c = vT.shape[1]
    slots = 3
    p_top = m_order.max() + 3 if m_order.size else 3
    H = np.empty((1, p_top, rows))
    t = np.empty((1, rows))
    inner = np.empty((3, rows))
    acc = np.empty((c + 1, slots, rows))
    diff = np.empty(1)
    expanded = np.empty(2 + 2 * c)
    G, W = _scratch(local[1], rows)
    for item in range(lo, hi):
        box = box_of_block[item]
        if row_ptr[box] == row_ptr[box + 1]:
            continue
        b, i0, R = _row_block(
            item, q, rows, box_of_block, row_ptr, row_pairs, k_node, k_centre, delta, moments,
            m_off, m_order, local, kT, vT, 1, skip, slots, H, t, inner, G, W, acc, diff,
        )  # fmt: skip
        for r in range(R):
            i = i0 + r
            expanded[0] = -sigma * acc[c, 1, r]
            expanded[1] = sigma * sigma * acc[c, 2, r]
            for ch in range(c):
                expanded[2 + ch] = acc[ch, 0, r]
                expanded[2 + c + ch] = -sigma * acc[ch, 1, r]
            direct = math.exp(lse[b, i])
            total = direct + acc[c, 0, r]
            for k in range(2 + 2 * c):
                # a row with no direct key has NaN moments there (0 / 0), and weight 0
                weighted = out[b, i, k] * direct if direct > 0.0 else 0.0
                out[b, i, k] = (weighted + expanded[k]) / total
            lse[b, i] = math.log(total)


@_jit
def _columns(
    lo, hi, k, rows, block_ptr, block_nodes, col_ptr, col_pairs, q_box, q_centre, delta, moments,
    m_off, m_order, qT, wT, skipped_by, v, wd, dv, dk,
):  # fmt: skip
    """The backward's column side, key blocks [lo, hi) (item b * blocks + t):
    the value and first-moment sums of the expansions of the query boxes that
    expanded a key node holding the block (the key's left-out query
    subtracted), weighted by u_i = g_i e^-lse_i (channels) and z_i = delta_i
    e^-lse_i (wT (B, c + 1, n)): dv[b, j] = sum_i u_i e_ij and dk[b, j] = -w
    delta (v_j . sum_i u_i (t - s_i) e_ij - sum_i z_i (t - s_i) e_ij). k (B,
    d, m), qT (B, d, n) feature-major; v (B, m, c); wd (B,) w delta."""
    B, d, m = k.shape
    c = v.shape[2]
    channels = c + 1
    blocks = (m + rows - 1) // rows
    p_top = m_order.max() + 3 if m_order.size else 3
    H = np.empty((d, p_top, rows))
    t = np.empty((d, rows))
    inner = np.empty((3, rows))
    acc = np.empty((channels, d + 2, rows))
    diff = np.empty(d)
    for item in range(lo, hi):
        b = item // blocks
        j0 = (item % blocks) * rows
        R = min(rows, m - j0)
        acc[:] = 0.0
        inv = 1.0 / delta[b]
        for at in range(block_ptr[item], block_ptr[item + 1]):
            node = block_nodes[at]
            for pc in range(col_ptr[node], col_ptr[node + 1]):
                x = col_pairs[pc, 0]
                p = max(col_pairs[pc, 1], col_pairs[pc, 2])
                _targets(k, b, j0, R, q_centre[x], inv, t, H, p + 2)
                _add_expansion(moments, m_off[x], m_order[x], channels, p, d + 2, H, R, inner, acc)
                for r in range(R):
                    i = skipped_by[b, j0 + r]
                    if q_box[x, 1] <= i < q_box[x, 2]:
                        diff2 = 0.0
                        for f in range(d):
                            diff[f] = (k[b, f, j0 + r] - qT[b, f, i]) * inv
                            diff2 += diff[f] * diff[f]
                        _subtract(acc, r, diff2, diff, wT, b, i, 0, d + 2, channels)
        for r in range(R):
            j = j0 + r
            for ch in range(c):
                dv[b, j, ch] = acc[ch, 0, r]
            for f in range(d):
                first = -acc[c, 1 + f, r]
                for ch in range(c):
                    first += v[b, j, ch] * acc[ch, 1 + f, r]
                dk[b, j, f] = -wd[b] * first


# ------------------------------------------------------------------ entry points


def key_orders(far, largest):
    """Each expanded key node's moment order per axis: the largest its row
    pairs ask for, of the values or, where ``largest`` (the backward's), of
    any of their derivatives."""
    need = far.row_pairs[:, 1:4].max(axis=1) if largest else far.row_pairs[:, 1]
    order = np.zeros(len(far.k_node), np.int64)
    np.maximum.at(order, far.row_pairs[:, 0], need)
    return order


def query_orders(far):
    """Each query box's moment order per axis: the largest its column pairs ask for."""
    order = np.zeros(len(far.q_box), np.int64)
    np.maximum.at(order, far.col_pairs[:, 0], far.col_pairs[:, 1:3].max(axis=1))
    return order


def _key_moments(far, kT, vT, largest, d):
    """Moments of the expanded key nodes to their orders (``key_orders``),
    weights the values and 1: (moments, offsets, orders)."""
    order = key_orders(far, largest)
    channels = vT.shape[1] + 1
    offset, total = _moment_layout(order, channels, d)
    moments = np.empty(total)
    work = int((order.astype(np.int64) ** d * (far.k_node[:, 2] - far.k_node[:, 1])).sum())
    parallel(
        _moments, len(order), work * channels, far.k_node, far.k_centre, far.delta, offset, order,
        kT, vT, 1, moments,
    )  # fmt: skip
    return moments, offset, order


def _local_coefficients(far, moments, channels, largest, d):
    """The boxes' local expansions (``_locals``): the tuple ``_row_block`` takes."""
    order = far.q_local
    offset, total = _moment_layout(order, channels, d)
    coef = np.empty(max(total, 1))
    work = int((np.diff(far.row_ptr) * order.astype(np.int64) ** (2 * d)).sum())
    parallel(
        _locals, len(order), work * channels, far.q_box, far.q_centre, order, far.row_ptr,
        far.row_pairs, far.k_centre, far.delta, *moments, channels, largest, offset, coef,
    )  # fmt: skip
    return far.q_centre, order, offset, coef


def _query_moments(far, qT, wT, d):
    """Moments of the query boxes, weights wT (B, C, n), to their orders
    (``query_orders``): (moments, offsets, orders)."""
    order = query_orders(far)
    offset, total = _moment_layout(order, wT.shape[1], d)
    moments = np.empty(total)
    work = int((order.astype(np.int64) ** d * (far.q_box[:, 2] - far.q_box[:, 1])).sum())
    parallel(
        _moments, len(order), work * wT.shape[1], far.q_box, far.q_centre, far.delta, offset,
        order, qT, wT, 0, moments,
    )  # fmt: skip
    return moments, offset, order


def _fold(kernel, largest, far, q_block, q, kT, vT, skip, *outputs):
    """The row side of a forward: the expanded key nodes' moments (to the
    values' orders, or ``largest``: to their derivatives'), the boxes' local
    expansions, then ``kernel`` over the query blocks into ``outputs``."""
    B, n, d = q.shape
    qT = np.ascontiguousarray(q.transpose(0, 2, 1))
    moments = _key_moments(far, kT, vT, largest, d)
    local = _local_coefficients(far, moments, vT.shape[1] + 1, largest, d)
    parallel(
        kernel, len(far.box_of_block), n * B * 64, qT, q_block, far.box_of_block, far.row_ptr,
        far.row_pairs, far.k_node, far.k_centre, far.delta, *moments, local, kT, vT, skip,
        *outputs,
    )  # fmt: skip


def forward(far, q_block, q, kT, vT, skip, out, lse):
    """Fold the plan's expansions into the direct pass's out (B, n, c) and lse
    (B, n) (numpy, the plan's order, in place; ``_fold_rows``). q (B, n, d),
    kT (B, d, m), vT (B, c, m)."""
    _fold(_fold_rows, False, far, q_block, q, kT, vT, skip, out, lse)


def fold_moments(far, q_block, q, kT, vT, skip, sigma, out, lse):
    """Fold the plan's expansions into local-linear's one-feature moments out
    (B, n, 2 + 2 c) and lse (B, n) (numpy, the plan's order, in place;
    ``_fold_moment_rows``). q (B, n, 1), kT (B, 1, m), vT (B, c, m) float64 in
    the plan's metric; sigma: the distance in the caller's units per unit of
    (t - s)."""
    # the backward's orders: they bound the first and second moments' series too
    _fold(_fold_moment_rows, True, far, q_block, q, kT, vT, skip, sigma, out, lse)


def backward_shares(plan, needs, q, g, k, v, w, out, lse, shift, skip, skipped_by):
    """The expanded pairs' shares of (dq, dk, dv, dw) for the backward, float64
    torch tensors in the plan's order (dw (B,) for the shared w), or Nones
    where the plan expands nothing or the gradient is not needed. Tensors as
    ``numba_nw.backward`` holds them, in the plan's order: q (B, n, d), g and
    out (B, n, c), k (B, m, d), v (B, m, c), w (B, 1), lse and the distance
    shift (B, n) (``kernels.distance_shift``)."""
    if plan.far is None:
        return None, None, None, None
    f64 = [arrays.float64(x) for x in (q, g, out, lse, shift)]
    # feature-major float64, converted in the one copy
    kT, vT = (arrays.copy(np.swapaxes(x.detach().numpy(), 1, 2), np.float64) for x in (k, v))
    delta_i = (f64[1] * f64[2]).sum(-1)  # g_i . y_i
    w = arrays.float64(w)[:, 0]
    shares = _backward(
        plan.far, plan, f64[0], f64[1], kT, vT, w, f64[3], delta_i, f64[4], skip, skipped_by, needs
    )
    return tuple(None if x is None else torch.from_numpy(x) for x in shares)


def _backward(far, plan, q, g, kT, vT, w, lse, delta_i, shift, skip, skipped_by, needs):
    """``backward_shares`` on float64 numpy arrays (kT, vT feature-major)."""
    need_q, need_k, need_v, need_w = needs
    B, n, d = q.shape
    m = kT.shape[2]
    with np.errstate(over="ignore"):  # inf for far rows, whose boxes expand nothing
        inv_s = np.exp(-lse)  # 1 / the row's denominator
    wd = w * far.delta
    dq = dk = dv = dw = None
    qT = np.ascontiguousarray(q.transpose(0, 2, 1))
    if need_q or need_w:
        moments = _key_moments(far, kT, vT, True, d)
        local = _local_coefficients(far, moments, vT.shape[1] + 1, True, d)
        dq = np.zeros((B, n, d))
        dw_rows = np.zeros((B, n))
        parallel(
            _rows, len(far.box_of_block), n * B * 64, qT, plan.q_block, far.box_of_block,
            far.row_ptr, far.row_pairs, far.k_node, far.k_centre, far.delta, *moments, local, kT,
            vT, skip, g, delta_i, inv_s, shift, wd, dq, dw_rows,
        )  # fmt: skip
        dw = dw_rows.sum(axis=1)
    if need_k or need_v:
        # the queries' weights: u_i = g_i e^-lse_i per channel and z_i = delta_i e^-lse_i
        weights = np.concatenate([g * inv_s[..., None], (delta_i * inv_s)[..., None]], axis=2)
        wT = np.ascontiguousarray(weights.transpose(0, 2, 1))
        moments = _query_moments(far, qT, wT, d)
        dv = np.zeros((B, m, vT.shape[1]))
        dk = np.zeros((B, m, d))
        v = np.ascontiguousarray(vT.transpose(0, 2, 1))
        parallel(
            _columns, len(far.block_ptr) - 1, m * B * 64, kT, plan.k_block, far.block_ptr,
            far.block_nodes, far.col_ptr, far.col_pairs, far.q_box, far.q_centre, far.delta,
            *moments, qT, wT, skipped_by, v, wd, dv, dk,
        )  # fmt: skip
    return (
        dq if need_q else None,
        dk if need_k else None,
        dv if need_v else None,
        dw if need_w else None,
    )


def rows_with_keys(plan, only, lse):
    """The rows the direct pass's general kernel must compute: those of
    ``only`` (every row where it is empty) whose block has key spans of its
    own. The others, left with expansions alone, get lse -inf here, their
    sums from ``forward``."""
    B, n = lse.shape
    has = np.diff(plan.key_ptr) > 0
    rows = np.repeat(has, plan.q_block).reshape(B, -1)[:, :n]
    lse[~rows] = -np.inf
    return rows.astype(np.uint8) if not only.size else only & rows
