"""Far fields in a few terms: Hermite expansions of key boxes in the block plan.

This is the planner's half of the fast Gauss transform (Greengard and Strain,
"The fast Gauss transform", SIAM J. Sci. Stat. Comput. 12, 1991): where a box
of keys lies far enough from a box of queries, its keys' contribution to those
rows comes from a few moments of the keys instead of their pairs; the kernels
(``numba_fgt``, ``triton_fgt``) compute the moments and evaluate them. Only one
w for all keys (the expansion needs one scale), w > 0, finite data and d <=
MAX_DIM.

The expansion. With delta = sqrt(2 / w), every weight is exp(-||x - y||^2 /
delta^2). For keys y of a box with centre c, s = (y - c) / delta, and a target
x, t = (x - c) / delta, in one dimension

    exp(-(t - s)^2) = sum_{n >= 0} s^n / n! h_n(t),   h_n(t) = (-d/dt)^n exp(-t^2),

and in d dimensions the product of one such series per axis, truncated at
order p per axis (n_f < p for every f). A box's contribution to a row is then
sum_alpha A_alpha h_alpha(t) with the moments A_alpha = sum_j v_j s_j^alpha /
alpha!, one set per box.

The bound (per key of the box, relative to a weight of 1). Cramer's inequality
for the Hermite functions, |H_n(t)| exp(-t^2 / 2) <= K 2^(n/2) sqrt(n!) with
K = 1.086435 (Abramowitz and Stegun 22.14.17; Greengard and Strain's Lemma
2.1 uses the same), gives

    |s^n / n! h_{n+k}(t)| <= K exp(-t^2 / 2) tau_k(n),
    tau_k(n) = a^n 2^(k/2) sqrt((n + k)!) / n!,   a = sqrt(2) max |s|,

for the k-th derivative that the gradients need (k = 0 for the values). With
P_f = sum_{n < p} tau_{k_f}(n) and T_f = sum_{n >= p} tau_{k_f}(n) on axis f
(a_f from the box's half extent on that axis), the error of the truncated
product is at most

    E = K^d exp(-|t_min|^2 / 2) (prod_f (P_f + T_f) - prod_f P_f),

t_min the least |t| over the targets' box. This is the tensor-product bound
with the cross terms that Baxter and Roussos ("A new error estimate of the
fast Gauss transform", SIAM J. Sci. Comput. 24, 2002) showed Greengard and
Strain's d-dimensional estimate left out; it is the form the dual-tree
transforms of Lee, Gray and Moore (NIPS 2005) use, with the sums P_f and T_f
computed here term by term (the tail in closed form past the point where the
terms' ratio a sqrt(n + k + 1) / (n + 1) is below 1/2) rather than bounded by
a geometric series. For a sum weighted by v_j the error is at most E sum_j
|v_j|; the gradients' sums carry a factor (t - s) (from h_{n+1} / 2) or
|t - s|^2 (from (h_{n+2} + 2 h_n) / 4) per axis.

Local expansions. Each query box (half extent rho delta per axis, centre
c_M) adds the Hermite series of the nodes it expands into one Taylor series
in tau = (x - c_M) / delta, truncated at order p_L per axis: with t0 = (c_M
- c) / delta, h_n(t0 + tau) = sum_k (-tau)^k / k! h_{n+k}(t0) (Greengard and
Strain's Hermite-to-local translation), so that a query pays p_L^d terms
however many nodes its box expands. By Lagrange's form of the Taylor
remainder and Cramer's inequality, truncating h_n's series at p_L terms
errs by at most K exp(-t_min^2 / 2) rho^p_L / p_L! 2^((n + p_L)/2) sqrt((n +
p_L)!); summed over the retained Hermite terms and multiplied out over the
axes as above, with U_f = P_f and V_f = rho_f^p_L / p_L! sum_{n < p}
tau_{p_L}(n) (the k-th derivative's series, for the gradients, is truncated
at p_L - k terms: rho_f^(p_L - k) / (p_L - k)!), the local expansion adds at
most K^d exp(-|t_min|^2 / 2) (prod_f (U_f + V_f) - prod_f U_f) per key. The
Hermite truncation spends half of each key's allowance, the local one the
other half; a box whose expansions need a local order past MAX_LOCAL
evaluates each Hermite series at its queries instead.

The contract. Each query box walks the key tree. With floor0, a lower bound
of every row's softmax denominator in the box (leave-one-out rows less one
key), each key may spend eps = SAFETY * tolerance * floor0 / m: a node whose
nearest key weighs at most eps is skipped; a node whose expansion error per
key (E above, and the gradients' sums' likewise, for the queries' expansions
evaluated at the keys too) is at most eps at some order is expanded where
that costs fewer operations than its pairs; other nodes are opened, and the
key blocks reached are computed pair by pair. The skipped and expanded keys
together then stay within SAFETY * tolerance * floor0, and the lightest
computed blocks are dropped while the total stays within SAFETY * tolerance
times the final lower bound, as in ``blocks``. So for each row, what is
skipped or expanded changes its denominator and its weighted sum by at most
tolerance times the denominator (times max ||v_j|| for the sum), and the
output by at most 2 * tolerance * max_j ||v_j||.

Rows where that cannot be met are computed pair by pair: a box whose rows are
dominated by a few near keys has a small floor0 and no affordable order. A
leave-one-out row's expansion holds its own key, which the kernels subtract
exactly; a box whose floor (without that key) is too small for the rounding
of that subtraction (``cancels``) is planned without expansions.
"""

import math
from typing import NamedTuple

import numpy as np
import torch

from . import arrays, blocks
from .blocks import _box_bounds, _jit, _nearest_leaf
from .workers import parallel

# The series work in d = 1 and 2; in d = 2 they pay only with more keys near
# each query than in d = 1 (MIN_NEAR_KEYS).
MAX_DIM = 2
CRAMER = 1.086435
# Query boxes are the largest query-tree nodes whose half extent on every axis
# is at most RHO * delta: their own expansions (evaluated at the keys, for the
# gradients) then converge within a few terms.
RHO = 0.5
# Highest order per axis; and no expansion where a = sqrt(2) * half extent /
# delta passes A_MAX: its terms grow for ~a^2 orders before they shrink.
MAX_ORDER = {1: 40, 2: 20}
A_MAX = 3.0
# The lower bound floor0 sums nodes within this many delta of the box, opened
# down to a half extent of delta.
FLOOR_REACH = 4.0
# Operations, in units of one pair computed directly (one exp and ~6 flops at
# the input's SIMD width): per target and expanded box (the exp and set-up),
# and per target and term (a Hermite recurrence step and a multiply-add in
# float64).
SETUP_COST = 4.0
TERM_COST = 0.5
# What planning one expansion and keeping it costs (~5 us of the walk).
PAIR_COST = 1e4
# Expansions pay where a query has many keys within delta of it, and a pass
# holds many such pairs: below these the planner's walk and the expansions'
# set-up cost more than the pairs they replace. Measured in d = 1, float32, 2
# threads: at 1250 near keys and 32768 points 15.6 ms against 21.4 ms for
# skipping alone; at 540 near keys and 65536 points 46 ms against 22 ms; at
# 1660 near keys and 8192 points (2^23.6 near pairs) 4.8 ms against 4.1 ms.
# In d = 2 (the unit square, Silverman's h): at 1892 near keys and 2^18 points
# 1.79 s against 0.83 s; at 3040 and 2^19 2.10 s against 2.38 s; at 5024 and
# 2^20 2.44 s against 9.30 s.
MIN_NEAR_KEYS = {1: 1024, 2: 2560}
MIN_NEAR_PAIRS = 1 << 24
# The walk keeps every key node's series where they fit in this many bytes.
CACHE_BYTES = 1 << 26
# A leave-one-out box is expanded only where its floor is at least this many
# roundings of the left-out key's own weight (<= 1) in float64 sums, relative
# to the part of the tolerance the bound leaves to rounding.
CANCEL_ROUNDINGS = 16.0
# The share of each key's allowance that the local expansions' truncation
# may spend (the Hermite series' truncation spends the rest), and their
# highest order per axis.
LOCAL_SHARE = 0.5
MAX_LOCAL = {1: 40, 2: 24}
# No expansions for a box whose nearest key weighs below exp(-MAX_SHIFT): the
# kernels' float64 weights of its expanded keys would underflow.
MAX_SHIFT = 500.0
SWITCH = {"enabled": True}  # the benchmark turns expansions off to time skipping alone


class Far(NamedTuple):
    """The expansions of a plan, int64 and float64 numpy arrays, points in the
    plan's order.

    Query boxes (rows): ``q_box`` (Q, 3) batch element, first and end row;
    ``q_centre``, ``q_half`` (Q, d); ``box_of_block`` (items,) the box of each
    query block (work item). Expanded key nodes: ``k_node`` (N, 3) batch
    element, first and end key; ``k_centre``, ``k_half`` (N, d). ``delta`` (B,)
    sqrt(2 / w) per batch element. Row side: box q's expansions are
    ``row_pairs[row_ptr[q]:row_ptr[q + 1]]``, columns (key node, order of the
    values, of their first derivatives, of their second derivatives). Column
    side (the queries' expansions evaluated at the keys, for the gradients of
    key and value): key node k's are ``col_pairs[col_ptr[k]:col_ptr[k + 1]]``,
    (query box, order of the values, of their first derivatives), and key
    block b lies in the nodes ``block_nodes[block_ptr[b]:block_ptr[b + 1]]``.
    ``q_local`` (Q,): the order per axis of each box's local expansion, into
    which its rows' expansions translate (0: the rows evaluate each Hermite
    series themselves). ``bound`` (Q,): what each box's rows skip and expand, relative to their
    denominator (at most SAFETY * tolerance). ``skipped`` and ``expanded``:
    (query, key) pairs skipped and expanded, over the batch.
    """

    delta: np.ndarray
    q_box: np.ndarray
    q_centre: np.ndarray
    q_half: np.ndarray
    box_of_block: np.ndarray
    k_node: np.ndarray
    k_centre: np.ndarray
    k_half: np.ndarray
    row_ptr: np.ndarray
    row_pairs: np.ndarray
    col_ptr: np.ndarray
    col_pairs: np.ndarray
    block_ptr: np.ndarray
    block_nodes: np.ndarray
    q_local: np.ndarray
    bound: np.ndarray
    skipped: int
    expanded: int

    def packed(self):
        """One int64 array (``unpacked`` reads it back; ``blocks.pack`` puts it
        after the plan): per field, an integer as (0, value), an array as (1
        for int64 or 2 for float64, ndim, shape..., its elements, float64 as
        their bits)."""
        parts = []
        for value in self:
            if isinstance(value, np.ndarray):
                kind = 2 if value.dtype == np.float64 else 1
                data = np.ascontiguousarray(value, np.float64 if kind == 2 else np.int64)
                parts += [
                    np.array([kind, data.ndim, *data.shape], np.int64),
                    data.view(np.int64).ravel(),
                ]
            else:
                parts.append(np.array([0, int(value)], np.int64))
        return np.concatenate(parts)

    @classmethod
    def unpacked(cls, a):
        values = []
        at = 0
        for _ in cls._fields:
            kind = int(a[at])
            if kind == 0:
                values.append(int(a[at + 1]))
                at += 2
                continue
            ndim = int(a[at + 1])
            shape = tuple(int(x) for x in a[at + 2 : at + 2 + ndim])
            at += 2 + ndim
            size = int(np.prod(shape))
            data = a[at : at + size].reshape(shape)
            values.append(data.view(np.float64) if kind == 2 else data)
            at += size
        return cls(*values)


def applies(query, key, w, tolerance, points=None):
    """Whether expansions may enter this call's plan: one w > 0 for all keys,
    finite points, d <= MAX_DIM, a tolerance, and enough keys near the queries
    (MIN_NEAR_KEYS, MIN_NEAR_PAIRS) for expansions to pay. ``points``: as
    ``blocks.plan`` takes it."""
    B, n, d = query.shape
    m = key.shape[1]
    if not SWITCH["enabled"] or w.shape[-1] != 1 or d > MAX_DIM or not tolerance > 0:
        return False
    if B * n * m < max(blocks.MIN_SAVED, MIN_NEAR_PAIRS):
        return False
    points = points() if points else blocks.survey(query, key, w)
    if not (points.finite and (points.w > 0).all()):
        return False
    near = m * blocks.fraction_within(points, np.sqrt(2.0 / points.w))
    return near >= MIN_NEAR_KEYS[d] and B * n * near >= MIN_NEAR_PAIRS


def plan(query, key, w, tolerance, leaves_one_out, q_block, k_block):
    """The block plan with expansions (``blocks.Plan`` whose ``far`` is a Far),
    or None for a dense pass (too small for blocks, or nothing saved)."""
    B, n, d = query.shape
    m = key.shape[1]
    if n < 2 * q_block or m < 2 * k_block:
        return None
    # one order and one tree where the queries are the keys (leave-one-out
    # passes often hold two tensors of the same points)
    same = blocks._same_points(query, key) or (
        query.shape == key.shape and q_block == k_block and arrays.equal(query, key)
    )
    points_k = arrays.float64(key)
    perm_k = blocks._order(points_k, k_block)
    k_sorted = np.empty_like(points_k)
    for b in range(B):
        k_sorted[b] = points_k[b][perm_k[b]]
    if same:
        perm_q, q_sorted = perm_k, k_sorted
    else:
        points_q = arrays.float64(query)
        perm_q = blocks._order(points_q, q_block)
        q_sorted = np.empty_like(points_q)
        for b in range(B):
            q_sorted[b] = points_q[b][perm_q[b]]
    w64 = arrays.float64(w)  # (B, 1)
    delta = np.sqrt(2.0 / w64[:, 0])

    k_tree = blocks._key_tree(k_sorted, w64, k_block)
    q_tree = k_tree if same else blocks._key_tree(q_sorted, w64, q_block)
    q_lo, q_hi, q_count, _, _, q_kids, q_top, n_qb = q_tree
    k_lo, k_hi, k_count, _, _, k_kids, k_top, n_kb = k_tree
    boxes = _query_boxes(q_lo, q_hi, q_kids, q_top, delta, n_qb)
    k_first, k_end = _leaf_ranges(k_kids[0], n_kb)

    budget = blocks.SAFETY * tolerance
    # Rounding of a left-out key's subtraction, u64 per unit weight in the
    # float64 sums, against what the tolerance leaves to rounding.
    cancels = CANCEL_ROUNDINGS * 2.0**-53 / ((1 - blocks.SAFETY) * tolerance)
    k_mu, k_s2 = _centroids(k_sorted, k_block, k_kids, k_count)
    chunks = parallel(
        _walk_boxes, len(boxes), B * n * m // 64, boxes, q_lo, q_hi, q_count, k_lo, k_hi,
        k_count, k_kids, k_top, n_kb, k_mu, k_s2, delta, budget, leaves_one_out, cancels,
        MAX_ORDER[d], MAX_LOCAL[d], np.full(B, m, np.int64),
        np.array([SETUP_COST, TERM_COST, PAIR_COST]),
    )  # fmt: skip
    n_exp = np.concatenate([c[0] for c in chunks])
    expansions = np.concatenate([c[1] for c in chunks])
    n_near = np.concatenate([c[2] for c in chunks])
    near = np.concatenate([c[3] for c in chunks])
    bound = np.concatenate([c[4] for c in chunks])
    skipped = int(sum(c[5] for c in chunks))
    local = np.concatenate([c[6] for c in chunks])

    # every query block of a box computes the box's near key blocks
    box_of_item = np.repeat(np.arange(len(boxes)), boxes[:, 3] - boxes[:, 2])
    counts = n_near[box_of_item]
    near_start = np.concatenate([[0], np.cumsum(n_near)])
    leaves = near[_ragged(near_start[box_of_item], counts)]
    spans = blocks._spans(counts, leaves.astype(np.int64), n_qb, n_kb, q_block, k_block, n, m)
    pairs = int(spans[-1])
    order = (torch.from_numpy(perm_q), torch.from_numpy(perm_k))
    if n_exp.sum() == 0:  # a plain block plan
        if pairs > blocks.MAX_KEPT * B * n * m:
            return None
        return blocks.Plan(q_block, k_block, *spans[:4], pairs, order)
    far = _tables(
        boxes, n_exp, expansions, bound, skipped, local, q_block, k_block, n, m, B, n_qb, n_kb,
        q_lo, q_hi, k_lo, k_hi, k_first, k_end, delta,
    )  # fmt: skip
    return blocks.Plan(q_block, k_block, *spans[:4], pairs, order, far)


# ------------------------------------------------------------------ boxes


def _ragged(starts, counts):
    """Indices start_i, ..., start_i + count_i - 1 for every i, concatenated."""
    total = int(counts.sum())
    ends = np.cumsum(counts)
    offset = np.repeat(starts - (ends - counts), counts)
    return np.arange(total, dtype=np.int64) + offset


@_jit
def _leaf_ranges(kids, leaves):
    """[first, end) key blocks of every node of a tree (leaves first, each
    parent after its children)."""
    nodes = kids.shape[0]
    first = np.arange(nodes)
    end = first + 1
    for y in range(leaves, nodes):
        left, right = kids[y, 0], kids[y, 1]
        first[y] = first[left]
        end[y] = end[right if right >= 0 else left]
    return first, end


def _query_boxes(q_lo, q_hi, kids, top, delta, n_qb):
    """(boxes, 4) int64: batch element, query-tree node, first and end query
    block, for the largest nodes with half extent <= RHO * delta per axis
    (leaves where none is), in block order."""
    B = q_lo.shape[0]
    first, end = _leaf_ranges(kids[0], n_qb)
    out = []
    for b in range(B):
        half = 0.5 * (q_hi[b] - q_lo[b]).max(axis=1)
        small = half <= RHO * delta[b]
        stack = list(range(q_lo.shape[1] - 1, top - 1, -1))
        while stack:
            y = stack.pop()
            if small[y] or kids[b, y, 0] < 0:
                out.append((b, y, first[y], end[y]))
            else:
                stack += [c for c in kids[b, y, ::-1] if c >= 0]
    boxes = np.array(out, np.int64).reshape(-1, 4)
    return boxes[np.lexsort((boxes[:, 2], boxes[:, 0]))]


# ------------------------------------------------------------------ the bound


@_jit
def _terms(a, k, p_max, partial, tail):
    """partial[p] = sum_{n < p} tau_k(n) and tail[p] = sum_{n >= p} tau_k(n)
    for p in [0, p_max], tau_k(n) = a^n 2^(k/2) sqrt((n + k)!) / n!."""
    taus = np.empty(p_max + 200)
    tau = 2.0 ** (0.5 * k) * math.sqrt(math.gamma(k + 1.0))
    total = 0.0
    n = 0
    # The ratio tau(n + 1) / tau(n) = a sqrt(n + k + 1) / (n + 1) falls with n:
    # once it is below 1/2 and the terms are negligible, the rest is at most
    # tau(n) / (1 - ratio).
    while True:
        ratio = a * math.sqrt(n + k + 1.0) / (n + 1.0)
        if n > p_max and ratio < 0.5 and (tau <= 1e-20 * total or n + 1 == taus.size):
            break
        taus[n] = tau
        total += tau
        tau *= ratio
        n += 1
    rest = tau / (1.0 - ratio)
    # tails summed from the far end, so that a small tail is no difference
    acc = rest
    for i in range(n - 1, -1, -1):
        acc += taus[i]
        if i <= p_max:
            tail[i] = acc
    acc = 0.0
    for i in range(p_max + 1):
        partial[i] = acc
        acc += taus[i]


@_jit
def _series(half, delta, p_max, P, T):
    """P[f, k], T[f, k] (``_terms``) of a box with half extents ``half`` for
    k = 0, 1, 2; False where the box is too wide for any order (A_MAX)."""
    for f in range(half.size):
        a = math.sqrt(2.0) * half[f] / delta
        if a > A_MAX:
            return False
        for k in range(3):
            _terms(a, k, p_max, P[f, k], T[f, k])
    return True


@_jit
def _pattern(P, T, ks, p):
    """prod_f (P_f + T_f) - prod_f P_f at order p for per-axis derivative
    orders ks, as the sum over the non-empty sets of axes that take the tail
    (no cancellation where the tails are tiny)."""
    d = ks.size
    cross = 0.0
    for mask in range(1, 1 << d):
        term = 1.0
        for f in range(d):
            term *= T[f, ks[f], p] if mask >> f & 1 else P[f, ks[f], p]
        cross += term
    return cross


@_jit
def _error(P, T, base, kind, p, ks):
    """The bound at order p, per key, on one of the sums the kernels expand:
    kind 0 the values (sum_j v_j e_j), 1 the first moments along each axis
    (sum_j v_j (t - s_j)_f e_j = 1/2 of the first derivative's series; the
    largest over the axes), 2 the second moments (sum_j v_j |t - s_j|^2 e_j =
    sum_f (second derivative along f + 2 e) / 4)."""
    d = P.shape[0]
    ks[:] = 0
    value = _pattern(P, T, ks, p)
    if kind == 0:
        return base * value
    err = 0.0
    for f in range(d):
        ks[:] = 0
        ks[f] = kind
        if kind == 1:
            err = max(err, 0.5 * _pattern(P, T, ks, p))
        else:
            err += 0.25 * _pattern(P, T, ks, p) + 0.5 * value
    return base * err


@_jit
def _least_order(P, T, base, kind, allowance, p_max, ks):
    """(p, its error) for the least order p <= p_max whose ``_error`` is at
    most ``allowance``; (-1, inf) if none. The error falls with p (prod_f
    (P_f + T_f) is the full sum, prod_f P_f grows), so a bisection finds it."""
    err = _error(P, T, base, kind, p_max, ks)
    if not err <= allowance:
        return -1, np.inf
    lo, hi = 0, p_max  # the error at hi meets the allowance, at lo it does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        e = _error(P, T, base, kind, mid, ks)
        if e <= allowance:
            hi, err = mid, e
        else:
            lo = mid
    return hi, err


@_jit
def _local_terms(a, rho, p_n, p_max, V):
    """V[k, p] for k = 0, 1, 2 and local orders p <= p_max: the Taylor
    remainder's factor rho^(p - k) / (p - k)! sum_{n < p_n} tau_p(n) of a
    Hermite expansion truncated at p_n (source spread a = sqrt(2) max|s|),
    its local expansion in tau (|tau| <= rho) truncated at p terms, and its
    k-th derivative's (whose Taylor series is truncated at p - k terms)."""
    # sums[p] = sum_{n < p_n} tau_p(n), tau_p(n) = a^n 2^(p/2) sqrt((n + p)!) / n!:
    # along p each term grows by sqrt(2 (n + p + 1))
    sums = np.zeros(p_max + 1)
    lead = 1.0  # a^n sqrt(n!) / n! = tau_0(n)
    for n in range(p_n):
        if n > 0:
            lead *= a / math.sqrt(n)
        if lead == 0.0:
            break
        term = lead
        for p in range(p_max + 1):
            sums[p] += term
            term *= math.sqrt(2.0 * (n + p + 1))
    for k in range(3):
        # rho^(p - k) / (p - k)!, along p
        factor = 1.0
        for p in range(p_max + 1):
            if p < k:
                V[k, p] = np.inf
                continue
            if p > k:
                factor *= rho / (p - k)
            V[k, p] = sums[p] * factor


@_jit
def _local_error(P, V, base, kind, p_n, p_loc, ks):
    """The bound, per key, on what the local expansion (truncated at p_loc per
    axis) of a Hermite expansion (truncated at p_n) adds to the error of one
    of the sums ``_error`` names: prod_f (U_f + V_f) - prod_f U_f, U_f =
    P[f, k_f, p_n] (the retained Hermite terms' Cramer bound) and V_f =
    V[f, k_f, p_loc] (``_local_terms``), over the same derivative patterns."""
    d = P.shape[0]
    err = 0.0
    value = 0.0
    for row in range(1 + d):  # the value's pattern, then the first axis's 1 or 2, ...
        ks[:] = 0
        if row > 0:
            if kind == 0:
                break
            ks[row - 1] = kind
        cross = 0.0
        for mask in range(1, 1 << d):
            term = 1.0
            for f in range(d):
                term *= V[f, ks[f], p_loc] if mask >> f & 1 else P[f, ks[f], p_n]
            cross += term
        if row == 0:
            value = cross
            if kind == 0:
                err = cross
        elif kind == 1:
            err = max(err, 0.5 * cross)
        else:
            err += 0.25 * cross + 0.5 * value
    return base * err


@_jit
def _gap2(centre, lo, hi):
    """Squared least distance from a point to a box."""
    total = 0.0
    for f in range(centre.size):
        g = max(lo[f] - centre[f], centre[f] - hi[f], 0.0)
        total += g * g
    return total


@_jit
def _expansion(
    ql, qh, qc, P_c, T_c, box_ok, nl, nh, y, inv2, shift, eps, p_max, P_r, T_r, ks, orders,
    b, cache, cached,
):  # fmt: skip
    """Whether key node y may be expanded for the query box [ql, qh] (centre
    qc; P_c, T_c its series, box_ok whether it has them): the least orders
    meeting ``eps`` per key (errors times exp(shift)) go into orders[:5]
    (rows: values, first, second moments; columns: values, first moments);
    returns the largest error per key among them, or -1.0 where some order
    would pass p_max. The node's series are kept in cache[y] (batch element
    b's, cached[y] = b + 1; -(b + 1) where it is too wide) where the cache
    has room for every node."""
    if not box_ok:
        return -1.0
    d = ql.size
    centre = np.empty(d)
    half = np.empty(d)
    for f in range(d):
        centre[f] = 0.5 * (nl[y, f] + nh[y, f])
        half[f] = 0.5 * (nh[y, f] - nl[y, f])
    if cached.size and abs(cached[y]) == b + 1:
        if cached[y] < 0:
            return -1.0
        P_r[:] = cache[y, 0]
        T_r[:] = cache[y, 1]
    else:
        wide = not _series(half, 1.0 / math.sqrt(inv2), p_max, P_r, T_r)
        if cached.size:
            cached[y] = -(b + 1) if wide else b + 1
            cache[y, 0] = P_r
            cache[y, 1] = T_r
        if wide:
            return -1.0
    base_r = CRAMER**d * math.exp(shift - 0.5 * _gap2(centre, ql, qh) * inv2)
    base_c = CRAMER**d * math.exp(shift - 0.5 * _gap2(qc, nl[y], nh[y]) * inv2)
    worst = 0.0
    for i in range(5):
        P, T, base = (P_r, T_r, base_r) if i < 3 else (P_c, T_c, base_c)
        p, err = _least_order(P, T, base, i if i < 3 else i - 3, eps, p_max, ks)
        if p < 0:
            return -1.0
        orders[i] = p
        worst = max(worst, err)
    return worst


@_jit
def _expansion_memo(
    ql, qh, qc, P_c, T_c, box_ok, nl, nh, y, inv2, shift, eps, p_max, P_r, T_r, ks, orders,
    item, memo_item, memo_err, memo_orders, b, cache, cached,
):  # fmt: skip
    """``_expansion``, remembered per node for the current box ``item``: the
    walk looks at children one level ahead and visits them again when it
    opens their parent."""
    if memo_item[y] != item:
        memo_err[y] = _expansion(
            ql, qh, qc, P_c, T_c, box_ok, nl, nh, y, inv2, shift, eps, p_max, P_r, T_r, ks,
            memo_orders[y], b, cache, cached,
        )  # fmt: skip
        memo_item[y] = item
    orders[:] = memo_orders[y]
    return memo_err[y]


@_jit
def _cost(nq, nk, orders, d, costs):
    """Operations of an expansion (costs: SETUP_COST, TERM_COST, PAIR_COST) against nq
    * nk for its pairs: its translation into the box's local expansion (about
    2 p^(d + 1) terms, the local order taken as p), a share of its node's
    moments (nk p^d, shared by a few boxes), for the backward the box's series
    evaluated at its nk keys, and PAIR_COST for planning and keeping it. The
    rows' local expansion costs the same however many nodes it holds: it
    counts for none of them."""
    setup, term, pair = costs[0], costs[1], costs[2]
    p, p_col = orders[0], orders[3]
    return pair + term * (2.0 * p ** (d + 1) + 0.25 * nk * p**d) + nk * (setup + term * p_col**d)


# ------------------------------------------------------------------ the walk


@_jit
def _centroids(points, block, kids, count):
    """Per tree node, the mean mu (B, N, d) of its points and their spread
    s2 = mean |x - mu|^2 (B, N): each leaf's from its points (two passes),
    a parent's from its children's by the parallel-axis theorem, so that a
    small spread far from the origin is not a difference of large numbers."""
    B, n, d = points.shape
    nodes = kids.shape[1]
    mu = np.zeros((B, nodes, d))
    s2 = np.zeros((B, nodes))
    leaves = (n + block - 1) // block
    for b in range(B):
        for y in range(leaves):
            i0, i1 = y * block, min((y + 1) * block, n)
            for f in range(d):
                mu[b, y, f] = points[b, i0:i1, f].mean()
            acc = 0.0
            for i in range(i0, i1):
                for f in range(d):
                    acc += (points[b, i, f] - mu[b, y, f]) ** 2
            s2[b, y] = acc / (i1 - i0)
        for y in range(leaves, nodes):
            left, right = kids[b, y, 0], kids[b, y, 1]
            if right < 0:
                mu[b, y] = mu[b, left]
                s2[b, y] = s2[b, left]
                continue
            n1, n2 = count[b, left], count[b, right]
            for f in range(d):
                mu[b, y, f] = (n1 * mu[b, left, f] + n2 * mu[b, right, f]) / (n1 + n2)
            acc = n1 * s2[b, left] + n2 * s2[b, right]
            for f in range(d):
                acc += n1 * (mu[b, left, f] - mu[b, y, f]) ** 2
                acc += n2 * (mu[b, right, f] - mu[b, y, f]) ** 2
            s2[b, y] = acc / (n1 + n2)
    # a margin for the rounding of these sums: the bound below must not overstate
    return mu, s2 * (1.0 + 1e-9)


@_jit
def _lower(ql, qh, far, mu, s2, cnt, inv2, shift):
    """Two lower bounds of sum_{j in N} exp(-w |q - k_j|^2 / 2), the larger
    (times exp(shift)), for every q in the box [ql, qh], and how much less it
    is without one of N's keys: (bound, bound less one key). The box's: |N|
    exp(-w dmax^2 / 2). Jensen's (exp is convex): |N| exp(-w (|q - mu|^2 + s2)
    / 2), |q - mu|^2 at its largest over the box; without a key at distance
    >= 0 the mean of the others' squared distances is at most |N| / (|N| - 1)
    of it."""
    reach = s2
    for f in range(ql.size):
        g = max(mu[f] - ql[f], qh[f] - mu[f])
        reach += g * g
    box = math.exp(shift - far * inv2)
    full = max(cnt * box, cnt * math.exp(shift - reach * inv2))
    less = (cnt - 1.0) * box
    if cnt > 1.0:
        less = max(less, (cnt - 1.0) * math.exp(shift - reach * inv2 * cnt / (cnt - 1.0)))
    return full, less


@_jit
def _floor(ql, qh, nl, nh, cnt, kids, top, inv2, shift, one_out, mu, s2, stack):
    """A lower bound of the softmax denominator of every row in the query box,
    times exp(shift): the nodes within FLOOR_REACH delta of the nearest key,
    opened down to a half extent of delta, each |N| exp(-w dmax^2 / 2), less
    one key's largest such weight for leave-one-out rows (one of them may be
    the row's own); at least the nearest leaf's."""
    lower = 0.0
    single = 0.0
    size = 0
    for y in range(nl.shape[0] - 1, top - 1, -1):
        stack[size] = y
        size += 1
    reach2 = (math.sqrt(shift) + FLOOR_REACH) ** 2
    while size > 0:
        size -= 1
        y = stack[size]
        near, far = _box_bounds(ql, qh, nl, nh, y)
        if near * inv2 > reach2:
            continue
        half = 0.0
        for f in range(ql.size):
            half = max(half, 0.5 * (nh[y, f] - nl[y, f]))
        if kids[y, 0] < 0 or half * half * inv2 <= 1.0:
            full, less = _lower(ql, qh, far, mu[y], s2[y], cnt[y], inv2, shift)
            lower += full
            single = max(single, full - less)
        else:
            for c in range(1, -1, -1):
                if kids[y, c] >= 0:
                    stack[size] = kids[y, c]
                    size += 1
    floor = lower - single if one_out else lower
    if floor <= 0.0:
        x = _nearest_leaf(ql, qh, nl, nh, kids, top)
        _, far = _box_bounds(ql, qh, nl, nh, x)
        floor = (cnt[x] - (1.0 if one_out else 0.0)) * math.exp(shift - far * inv2)
    return floor


@_jit
def _walk_boxes(
    lo, hi, boxes, q_lo, q_hi, q_count, k_lo, k_hi, k_count, k_kids, k_top, n_kb, k_mu, k_s2,
    delta, budget, one_out, cancels, p_max, p_local, m_b, costs,
):  # fmt: skip
    """Query boxes [lo, hi): (expansions per box, their rows (key node and the
    five orders), near key blocks per box, the blocks (ascending), each box's
    bound relative to its floor, pairs skipped). See the module doc."""
    nodes = k_lo.shape[1]
    d = k_lo.shape[2]
    stack = np.empty(nodes, np.int64)
    P_c = np.zeros((d, 3, p_max + 1))
    T_c = np.zeros((d, 3, p_max + 1))
    P_r = np.zeros((d, 3, p_max + 1))
    T_r = np.zeros((d, 3, p_max + 1))
    P_k = np.zeros((d, 3, p_max + 1))
    T_k = np.zeros((d, 3, p_max + 1))
    ks = np.zeros(d, np.int64)
    orders = np.zeros(5, np.int64)
    kid_orders = np.zeros(5, np.int64)
    qc = np.empty(d)
    q_half = np.empty(d)
    # per box: the near leaves, with their U, lower bound and one key's
    leaf = np.empty(n_kb, np.int64)
    leaf_u = np.empty(n_kb)
    n_exp = np.zeros(hi - lo, np.int64)
    local = np.zeros(hi - lo, np.int64)
    n_near = np.zeros(hi - lo, np.int64)
    V = np.zeros((d, 3, p_local + 1))
    V_ok = np.zeros(p_local + 1, np.bool_)
    memo_item = np.full(nodes, -1, np.int64)
    memo_err = np.empty(nodes)
    memo_orders = np.empty((nodes, 5), np.int64)
    room = nodes * 2 * d * 3 * (p_max + 1) * 8 <= CACHE_BYTES
    cache = np.empty((nodes if room else 0, 2, d, 3, p_max + 1))
    cached = np.zeros(nodes if room else 0, np.int64)
    bound = np.zeros(hi - lo)
    exp_out = np.empty((max(16, 8 * (hi - lo)), 6), np.int64)
    near_out = np.empty(max(16, 8 * (hi - lo)), np.int64)
    used_exp = 0
    used_near = 0
    skipped = 0
    for item in range(lo, hi):
        b, yq = boxes[item, 0], boxes[item, 1]
        ql, qh, nq = q_lo[b, yq], q_hi[b, yq], q_count[b, yq]
        nl, nh, cnt, kids = k_lo[b], k_hi[b], k_count[b], k_kids[b]
        inv2 = 0.5 * 2.0 / (delta[b] * delta[b])  # w / 2
        for f in range(d):
            qc[f] = 0.5 * (ql[f] + qh[f])
            q_half[f] = 0.5 * (qh[f] - ql[f])
        # Weights are taken relative to the nearest key's, exp(-shift), so
        # that a box far from every key neither underflows nor loses its
        # skipping; expansions need absolute weights that do not underflow.
        x = _nearest_leaf(ql, qh, nl, nh, kids, k_top)
        shift = _box_bounds(ql, qh, nl, nh, x)[0] * inv2
        box_ok = shift <= MAX_SHIFT and _series(q_half, delta[b], p_max, P_c, T_c)
        mu, s2 = k_mu[b], k_s2[b]
        floor0 = _floor(ql, qh, nl, nh, cnt, kids, k_top, inv2, shift, one_out, mu, s2, stack)
        eps = budget * floor0 / m_b[b]
        # the Hermite series' truncation may spend this much of it, their
        # local expansions the rest
        eps_hermite = (1.0 - LOCAL_SHARE) * eps

        allow = box_ok and eps > 0.0
        while True:
            start_exp = used_exp
            n_leaf = 0
            pruned = 0.0
            expanded = 0.0
            lower = 0.0
            single = 0.0
            box_skipped = 0
            size = 0
            for y in range(nodes - 1, k_top - 1, -1):
                stack[size] = y
                size += 1
            while size > 0:
                size -= 1
                y = stack[size]
                near, far = _box_bounds(ql, qh, nl, nh, y)
                u_key = math.exp(shift - near * inv2)
                if eps > 0.0 and u_key <= eps:
                    pruned += cnt[y] * u_key
                    box_skipped += nq * cnt[y]
                    continue
                full, less = _lower(ql, qh, far, mu[y], s2[y], cnt[y], inv2, shift)
                # no expansion can cost less than PAIR_COST: not worth bounding below it
                if allow and nq * cnt[y] > costs[2]:
                    err = _expansion_memo(
                        ql, qh, qc, P_c, T_c, box_ok, nl, nh, y, inv2, shift, eps_hermite,
                        p_max, P_r, T_r, ks, orders, item, memo_item, memo_err, memo_orders, b,
                        cache, cached,
                    )  # fmt: skip
                    direct = nq * cnt[y]
                    if err >= 0.0 and _cost(nq, cnt[y], orders, d, costs) < direct:
                        # open instead where the children cost less (one level ahead)
                        kids_cost = 0.0
                        if kids[y, 0] >= 0:
                            for c in range(2):
                                z = kids[y, c]
                                if z < 0:
                                    continue
                                nz, _ = _box_bounds(ql, qh, nl, nh, z)
                                if eps > 0.0 and math.exp(shift - nz * inv2) <= eps:
                                    continue
                                ez = _expansion_memo(
                                    ql, qh, qc, P_c, T_c, box_ok, nl, nh, z, inv2, shift,
                                    eps_hermite, p_max, P_k, T_k, ks, kid_orders, item,
                                    memo_item, memo_err, memo_orders, b, cache, cached,
                                )  # fmt: skip
                                cz = nq * cnt[z]
                                if ez >= 0.0:
                                    cz = min(cz, _cost(nq, cnt[z], kid_orders, d, costs))
                                kids_cost += cz
                        if kids[y, 0] < 0 or kids_cost >= _cost(nq, cnt[y], orders, d, costs):
                            if used_exp == exp_out.shape[0]:
                                grown = np.empty((2 * used_exp, 6), np.int64)
                                grown[:used_exp] = exp_out
                                exp_out = grown
                            exp_out[used_exp, 0] = y
                            exp_out[used_exp, 1:] = orders
                            used_exp += 1
                            expanded += cnt[y] * err
                            lower += full
                            single = max(single, full - less)
                            continue
                if kids[y, 0] >= 0:
                    for c in range(1, -1, -1):
                        if kids[y, c] >= 0:
                            stack[size] = kids[y, c]
                            size += 1
                else:
                    leaf[n_leaf] = y
                    leaf_u[n_leaf] = cnt[y] * u_key
                    lower += full
                    single = max(single, full - less)
                    n_leaf += 1
            floor = max(floor0, lower - single if one_out else lower)
            # the left-out key weighs at most exp(shift) in these units
            if allow and one_out and used_exp > start_exp and floor < cancels * math.exp(shift):
                used_exp = start_exp  # the own key's subtraction would cancel
                allow = False
                continue
            break

        p_loc, added = _local_order(
            exp_out, start_exp, used_exp, ql, qh, q_half, nl, nh, cnt, inv2, shift,
            LOCAL_SHARE * eps, p_local, P_r, T_r, V, V_ok, ks,
        )  # fmt: skip
        local[item - lo] = p_loc
        expanded += added

        # Drop the lightest near leaves within what is left (keep one at least
        # where nothing else holds the row).
        spare = budget * floor - pruned - expanded
        dropped = 0.0
        keep_one = used_exp == start_exp
        order = np.argsort(leaf_u[:n_leaf])
        gone = np.zeros(n_leaf, np.bool_)
        for r in order[: n_leaf - 1 if keep_one else n_leaf]:
            if not leaf_u[r] < spare:  # with nothing to spare, an underflow is no zero
                break
            spare -= leaf_u[r]
            dropped += leaf_u[r]
            gone[r] = True
            box_skipped += nq * cnt[leaf[r]]
        kept = np.sort(leaf[:n_leaf][~gone])
        if used_near + kept.size > near_out.size:
            grown1 = np.empty(2 * (used_near + kept.size), np.int64)
            grown1[:used_near] = near_out[:used_near]
            near_out = grown1
        near_out[used_near : used_near + kept.size] = kept
        used_near += kept.size
        n_near[item - lo] = kept.size
        n_exp[item - lo] = used_exp - start_exp
        lost = pruned + dropped + expanded
        bound[item - lo] = lost / floor if floor > 0.0 else (0.0 if lost == 0.0 else np.inf)
        skipped += box_skipped
    return n_exp, exp_out[:used_exp], n_near, near_out[:used_near], bound, skipped, local


@_jit
def _local_order(
    pairs, start, end, ql, qh, q_half, nl, nh, cnt, inv2, shift, eps, p_local, P, T, V, ok, ks
):  # fmt: skip
    """The least order p <= p_local of a local expansion of the query box
    [ql, qh] (half extents q_half) into which every expansion pairs[start:end]
    (key node, Hermite orders) translates within ``eps`` per key for the
    values, first and second moments (``_local_error``); 0 where none does
    (the queries then evaluate the Hermite series themselves). Returns (p, the
    keys' errors summed at p)."""
    if end == start:
        return 0, 0.0
    d = ql.size
    delta = 1.0 / math.sqrt(inv2)
    ok[:] = True
    ok[0] = False
    added = np.zeros(p_local + 1)
    half = np.empty(d)
    centre = np.empty(d)
    for e in range(start, end):
        y = pairs[e, 0]
        for f in range(d):
            centre[f] = 0.5 * (nl[y, f] + nh[y, f])
            half[f] = 0.5 * (nh[y, f] - nl[y, f])
        _series(half, delta, P.shape[2] - 1, P, T)
        base = CRAMER**d * math.exp(shift - 0.5 * _gap2(centre, ql, qh) * inv2)
        # translated at the largest of the pair's orders (the backward's)
        p_n = max(pairs[e, 1], max(pairs[e, 2], pairs[e, 3]))
        for f in range(d):
            _local_terms(math.sqrt(2.0) * half[f] / delta, q_half[f] / delta, p_n, p_local, V[f])
        for p in range(1, p_local + 1):
            if ok[p]:
                worst = 0.0
                for kind in range(3):
                    worst = max(worst, _local_error(P, V, base, kind, p_n, p, ks))
                ok[p] = worst <= eps
                added[p] += cnt[y] * worst
    for p in range(1, p_local + 1):
        if ok[p]:
            return p, added[p]
    return 0, 0.0


# ------------------------------------------------------------------ tables


def _tables(
    boxes, n_exp, expansions, bound, skipped, local, q_block, k_block, n, m, B, n_qb, n_kb, q_lo,
    q_hi, k_lo, k_hi, k_first, k_end, delta,
):  # fmt: skip
    """The Far of a plan from the walk's expansions (see Far)."""
    batch = np.repeat(boxes[:, 0], n_exp)
    key_nodes = expansions[:, 0]
    # one row per expanded key node (batch element, node), in order
    nodes_total = k_lo.shape[1]
    flat = batch * nodes_total + key_nodes
    used, which = np.unique(flat, return_inverse=True)
    u_batch, u_node = used // nodes_total, used % nodes_total
    k_node = np.stack(
        [u_batch, k_first[u_node] * k_block, np.minimum(k_end[u_node] * k_block, m)], axis=1
    )
    k_centre = 0.5 * (k_lo[u_batch, u_node] + k_hi[u_batch, u_node])
    k_half = 0.5 * (k_hi[u_batch, u_node] - k_lo[u_batch, u_node])
    qb, qy = boxes[:, 0], boxes[:, 1]
    q_box = np.stack(
        [qb, boxes[:, 2] * q_block, np.minimum(boxes[:, 3] * q_block, n)], axis=1
    ).astype(np.int64)
    q_centre = 0.5 * (q_lo[qb, qy] + q_hi[qb, qy])
    q_half = 0.5 * (q_hi[qb, qy] - q_lo[qb, qy])
    box_of_block = np.empty(B * n_qb, np.int64)
    for x, (b, _, first, end) in enumerate(boxes):
        box_of_block[b * n_qb + first : b * n_qb + end] = x
    row_ptr = np.concatenate([[0], np.cumsum(n_exp)]).astype(np.int64)
    row_pairs = np.concatenate([which[:, None], expansions[:, 1:4]], axis=1).astype(np.int64)
    # column side: per key node, the boxes that expand it (in box order)
    box_of_pair = np.repeat(np.arange(len(boxes)), n_exp)
    by_node = np.argsort(which, kind="stable")
    col_ptr = np.concatenate([[0], np.cumsum(np.bincount(which, minlength=len(used)))])
    col_pairs = np.stack(
        [box_of_pair[by_node], expansions[by_node, 4], expansions[by_node, 5]], axis=1
    ).astype(np.int64)
    # key block -> the expanded nodes that hold it
    spans_of = k_end[u_node] - k_first[u_node]
    block_ids = _ragged(u_batch * n_kb + k_first[u_node], spans_of)
    node_ids = np.repeat(np.arange(len(used)), spans_of)
    by_block = np.argsort(block_ids, kind="stable")
    block_ptr = np.concatenate([[0], np.cumsum(np.bincount(block_ids, minlength=B * n_kb))])
    rows_of_pair = np.repeat(q_box[:, 2] - q_box[:, 1], n_exp)
    keys_of_pair = k_node[row_pairs[:, 0], 2] - k_node[row_pairs[:, 0], 1]
    expanded = int((rows_of_pair * keys_of_pair).sum())
    return Far(
        delta.astype(np.float64), q_box, q_centre, q_half, box_of_block, k_node.astype(np.int64),
        k_centre, k_half, row_ptr, row_pairs, col_ptr.astype(np.int64), col_pairs,
        block_ptr.astype(np.int64), node_ids[by_block].astype(np.int64), local.astype(np.int64),
        bound, skipped, expanded,
    )  # fmt: skip


# ------------------------------------------------------------------ using the expansions


def as_direct(plan, n, m):
    """The same plan with every expanded pair computed pair by pair instead:
    for the passes that have no expansion of their own (forward mode)."""
    if plan is None or plan.far is None:
        return plan
    far = plan.far
    items = len(plan.key_ptr) - 1
    n_qb = -(-n // plan.q_block)
    n_kb = -(-m // plan.k_block)
    counts = np.zeros(items, np.int64)
    leaves = []
    for item in range(items):
        box = far.box_of_block[item]
        runs = np.concatenate(
            [
                plan.key_spans[plan.key_ptr[item] : plan.key_ptr[item + 1]],
                far.k_node[far.row_pairs[far.row_ptr[box] : far.row_ptr[box + 1], 0], 1:],
            ]
        )
        chosen = np.zeros(n_kb, np.bool_)
        for start, end in runs:
            chosen[start // plan.k_block : -(-end // plan.k_block)] = True
        kept = np.flatnonzero(chosen)
        counts[item] = kept.size
        leaves.append(kept)
    leaves = np.concatenate(leaves).astype(np.int64)
    spans = blocks._spans(counts, leaves, n_qb, n_kb, plan.q_block, plan.k_block, n, m)
    return plan._replace(
        key_ptr=spans[0], key_spans=spans[1], query_ptr=spans[2], query_spans=spans[3],
        pairs=int(spans[4]), far=None,
    )  # fmt: skip


def row_bounds(plan, n):
    """(B, n) float64 in the caller's order: for each row, what its plan skips
    and expands relative to its softmax denominator, by the bound (at most
    SAFETY * tolerance); None for a plan without expansions."""
    if plan is None or plan.far is None:
        return None
    far = plan.far
    B = len(far.delta)
    bound = np.repeat(far.bound[far.box_of_block], plan.q_block).reshape(B, -1)[:, :n]
    return blocks.queries_back(plan, torch.from_numpy(np.ascontiguousarray(bound)))[0]
