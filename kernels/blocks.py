"""Block-sparse plans: which keys each block of queries must see, proved by a bound.

With w >= 0 a key j weighs ``exp(s_ij) = exp(-w_j d_ij^2 / 2)`` in query i's
softmax. Points are put in an order where near points share blocks (sorted for
d = 1, the leaves of a kd-tree for d >= 2), and each block of ``q_block``
queries and each block of ``k_block`` keys gets a bounding box. For a query
block Q and a set of keys N (a block, or a node of the key tree: a run of
blocks) the boxes give, for every query i in Q,

    U(Q, N) = |N| exp(-min_w(N) dmin(Q, N)^2 / 2) >= sum_{j in N} exp(s_ij)
    L(Q, N) = |N| exp(-max_w(N) dmax(Q, N)^2 / 2) <= sum_{j in N} exp(s_ij)

dmin and dmax being the least and greatest distance between the two boxes.
Each query block walks the key tree best-first (largest U first, so nearest
first); the leaves it reaches sum to a lower bound L_Q of every row's softmax
denominator (less one key each where a row leaves one out). It stops once the
nodes it has not opened weigh at most ``tolerance / 2 * L_Q``, then drops the
lightest leaves it reached while everything dropped stays within
``tolerance * L_Q``. So the keys a row skips hold at most ``tolerance`` of its
softmax mass, and each output row moves by at most
``2 * tolerance * max_j ||v_j||``. The arithmetic is float64 and spends only
half of the tolerance (``SAFETY``), the rest covering rounding.

The plan is dense (every query sees every key) where skipping is not safe or
cannot pay: ``tolerance == 0``, a negative or non-finite w (scores are then
not bounded by distance), NaN or inf among the points, d > 4 (boxes separate
little), sizes too small for blocks, or a bound that keeps most pairs anyway.

A plan gives each work item (a block of queries of one batch element) the
[start, end) runs of keys it sweeps, and each block of keys the runs of
queries, as CSR arrays (``ptr``, ``spans``), in the points' new order. It is
computed on the CPU whatever the device; the kernels only read the spans.
"""

import functools
import math
from typing import NamedTuple

import numpy as np
import torch
from numba import njit

from . import arrays, numba_target
from .workers import parallel

_jit = functools.partial(
    njit, cache=True, nogil=True, error_model="numpy", _target=numba_target.NAME
)

MAX_DIM = 4
# A plan that keeps more than this fraction of the pairs runs dense.
MAX_KEPT = 0.75
# Sorting and planning cost about what this many pairs cost to compute (4096
# points: 0.6 ms of planning against 1.4 ms for all 2^24 pairs, 2 threads): a
# plan is made only where the forecast saves more pairs than this (and so never
# for fewer pairs in all).
MIN_SAVED = 3 << 22
# The forecasts sample this many queries and keys of up to SAMPLE_BATCH batch
# elements, evenly strided.
SAMPLE_QUERIES, SAMPLE_KEYS, SAMPLE_BATCH = 64, 1024, 4
# Fraction of the tolerance the bound spends; the rest covers rounding.
SAFETY = 0.5
# The key tree's top level has at most this many nodes (all opened at once).
TOP_NODES = 16


class Plan(NamedTuple):
    """Spans for the kernels (see the module doc), int64 numpy arrays.

    Work items are blocks of ``q_block`` queries (item b * ceil(n / q_block) + t
    for rows [t * q_block, ...) of batch element b) with their key spans
    ``key_spans[key_ptr[item]:key_ptr[item + 1]]``, and blocks of ``k_block``
    keys with their query spans likewise. ``pairs`` counts the (query, key)
    pairs computed, over the batch; ``order`` holds the permutations (B, n) and
    (B, m) that put queries and keys in the plan's order, or is None (the
    caller's order). ``far``: key boxes whose pairs come from expansions
    instead (``kernels.far``), or None.
    """

    q_block: int
    k_block: int
    key_ptr: np.ndarray
    key_spans: np.ndarray
    query_ptr: np.ndarray
    query_spans: np.ndarray
    pairs: int
    order: tuple = None
    far: object = None  # the expansions (``far.Far``), or None


# A dense work item is a run of rows (or keys) worth about ITEM_PAIRS pairs:
# enough to amortise its set-up, few enough rows that a handful of queries over
# many keys still spreads over the cores. At least ITEM_ROWS[0], which share
# each tile of the points they sweep, and at most ITEM_ROWS[1].
ITEM_PAIRS = 1 << 15
ITEM_ROWS = (8, 64)


def rows_per_item(length):
    """Rows (or keys) per dense work item when each sweeps ``length`` points."""
    fewest, most = ITEM_ROWS
    return max(fewest, min(most, ITEM_PAIRS // max(length, 1)))


def dense(batch, n, m, q_block, k_block):
    """Every block of queries sees all m keys, every block of keys all n queries."""
    key_ptr, key_spans = _everything(batch * -(-n // q_block), m)
    query_ptr, query_spans = _everything(batch * -(-m // k_block), n)
    return Plan(q_block, k_block, key_ptr, key_spans, query_ptr, query_spans, batch * n * m)


def _everything(items, size):
    spans = np.zeros((items, 2), np.int64)
    spans[:, 1] = size
    return np.arange(items + 1, dtype=np.int64), spans


def plan(query, key, w, tolerance, leaves_one_out, q_block, k_block, points=None):
    """The plan for query (B, n, d), key (B, m, d), w (B, m) or (B, 1), or
    None where the module doc says the pass should be dense.

    ``leaves_one_out``: a query may leave one key out of its softmax (its
    lower bound loses that key). ``points``: a function that returns the
    ``Survey`` of these points, for a caller that shares one (default: survey
    them here, where the forecast needs it).
    """
    B, n, d = query.shape
    m = key.shape[1]
    points = points or (lambda: survey(query, key, w))
    if not _worth_planning(query, key, tolerance, q_block, k_block, points):
        return None
    points_k = arrays.float64(key)
    if _same_points(query, key):
        points_q, perm_q = points_k, _order(points_k, k_block)
        perm_k = perm_q
    else:
        points_q = arrays.float64(query)
        perm_q, perm_k = _order(points_q, q_block), _order(points_k, k_block)
    w64 = arrays.float64(w)
    w_sorted = w64 if w64.shape[1] == 1 else np.take_along_axis(w64, perm_k, axis=1)
    q_sorted = np.take_along_axis(points_q, perm_q[..., None], axis=1)
    k_sorted = np.take_along_axis(points_k, perm_k[..., None], axis=1)

    q_lo, q_hi = _boxes(q_sorted, q_block)
    tree = _key_tree(k_sorted, w_sorted, k_block)
    n_qb, n_kb = q_lo.shape[1], tree[-1]
    budget = SAFETY * tolerance
    chunks = parallel(_walk, B * n_qb, B * n * m // 64, q_lo, q_hi, *tree, budget, leaves_one_out)
    counts = np.concatenate([c for c, _ in chunks])
    leaves = np.concatenate([lv for _, lv in chunks])
    spans = _spans(counts, leaves, n_qb, n_kb, q_block, k_block, n, m)
    pairs = int(spans[-1])
    if pairs > MAX_KEPT * B * n * m:
        return None
    order = (torch.from_numpy(perm_q), torch.from_numpy(perm_k))
    return Plan(q_block, k_block, *spans[:4], pairs, order)


def _worth_planning(query, key, tolerance, q_block, k_block, points):
    B, n, d = query.shape
    m = key.shape[1]
    if not tolerance > 0 or d > MAX_DIM or B * n * m < MIN_SAVED:
        return False
    if n < 2 * q_block or m < 4 * k_block:
        return False
    points = points()
    if not points.finite or (points.w < 0).any():
        return False
    return (1 - _reach(points, tolerance, k_block)) * B * n * m >= MIN_SAVED


class Survey(NamedTuple):
    """The points as the forecasts read them: host arrays (no copy of CPU
    float32 or float64 tensors) and what one pass over them finds."""

    q: np.ndarray  # (B, n, d)
    k: np.ndarray  # (B, m, d)
    w: np.ndarray  # (B, m) or (B, 1) float64
    finite: bool  # every point and w finite
    extent: np.ndarray  # (d,) float64: each feature's largest range over the batch


def survey(query, key, w):
    q, k = _host(query), _host(key)
    w = arrays.float64(w)
    finite_q, lo_q, hi_q = _bounds(q)
    finite_k, lo_k, hi_k = _bounds(k)
    extent = (np.maximum(hi_q, hi_k) - np.minimum(lo_q, lo_k)).max(axis=0)
    finite = finite_q and finite_k and bool(np.isfinite(w).all())
    return Survey(q, k, w, finite, extent)


def _host(t):
    t = t.detach()
    if t.dtype not in (torch.float32, torch.float64):
        t = t.float()
    return t.cpu().numpy()


@_jit
def _bounds(points):
    """(all finite, (B, d) least, (B, d) largest) of points (B, n, d)."""
    B, n, d = points.shape
    lo = np.full((B, d), np.inf)
    hi = np.full((B, d), -np.inf)
    finite = True
    for b in range(B):
        for i in range(n):
            for f in range(d):
                x = points[b, i, f]
                finite = finite and np.isfinite(x)
                lo[b, f] = min(lo[b, f], x)
                hi[b, f] = max(hi[b, f], x)
    return finite, lo, hi


def _reach(points, tolerance, k_block):
    """A cheap forecast, before any sorting, of the fraction of pairs a plan
    would keep, from a ``Survey`` of finite points with w >= 0. Key j is
    needed within r_j of a query, r_j where a block of such keys weighs
    tolerance * SAFETY of a row's denominator, that denominator taken as
    uniform density of the narrowest kernel over the points' extent D, m *
    prod_f min(1, h sqrt(2 pi) / D_f), a quarter of it to be safe. The
    forecast is the larger of two fractions: the mean over keys of prod_f
    min(1, 2 r_j / D_f) (boxes: a plan keeps whole blocks, which in d > 1 reach
    well past r_j) and the fraction of sampled pairs closer than r_j (which sees
    where the points crowd, as the extent does not). At 1 every block of
    queries would reach every key and the planning would be spent for nothing.
    It only decides whether to plan: the plan itself is proven, whatever the
    data."""
    w, extent = points.w, points.extent
    if not (extent > 0).all() or not (w > 0).all():
        return 1.0
    h = math.sqrt(2 * math.pi / float(w.max()))
    denominator = max(1.0, 0.25 * points.k.shape[1] * float(np.minimum(h / extent, 1.0).prod()))
    room = k_block / (tolerance * SAFETY * denominator)
    if room <= 1:
        return 0.0
    r = np.sqrt(2 * math.log(room) / w)
    boxes = float(np.minimum(2 * r.reshape(-1, 1) / extent, 1.0).prod(axis=-1).mean())
    if boxes >= 1.0:  # every key reaches across the extent: no sample can lower it
        return 1.0
    return max(boxes, fraction_within(points, r))


def fraction_within(points, radius):
    """The fraction of (query, key) pairs of a ``Survey`` closer than
    ``radius`` ((B, m) per key or (B, 1)), from strided samples of the
    queries and keys."""
    B, n, _ = points.q.shape
    m = points.k.shape[1]
    batch = np.unique(np.linspace(0, B - 1, min(B, SAMPLE_BATCH)).round().astype(np.int64))
    step_q, step_k = max(1, n // SAMPLE_QUERIES), max(1, m // SAMPLE_KEYS)
    radius = np.broadcast_to(radius, (B, m))
    samples = (step_q, SAMPLE_QUERIES, step_k, SAMPLE_KEYS)
    return _fraction_within(points.q, points.k, radius, batch, *samples)


@_jit
def _fraction_within(q, k, r, batch, step_q, count_q, step_k, count_k):
    d = q.shape[2]
    rows = np.arange(0, min(q.shape[1], step_q * count_q), step_q)
    cols = np.arange(0, min(k.shape[1], step_k * count_k), step_k)
    near = 0
    for b in batch:
        keys = np.empty((d, cols.size))  # feature-major, so the sums below vectorise
        for f in range(d):
            for t in range(cols.size):
                keys[f, t] = k[b, cols[t], f]
        reach = np.empty(cols.size)
        for t in range(cols.size):
            reach[t] = r[b, cols[t]] ** 2
        sq = np.empty(cols.size)
        for i in rows:
            sq[:] = 0.0
            for f in range(d):
                x = float(q[b, i, f])
                for t in range(cols.size):
                    sq[t] += (x - keys[f, t]) ** 2
            for t in range(cols.size):
                near += sq[t] <= reach[t]
    return near / max(1, batch.size * rows.size * cols.size)


def _same_points(query, key):
    """One tensor passed as both (leave-one-out): one order serves both."""
    return (
        query.data_ptr() == key.data_ptr()
        and query.shape == key.shape
        and query.stride() == key.stride()
    )


# ------------------------------------------------------------------ order


def _order(points, leaf):
    """(B, n) int64: d = 1 sorted, else the leaves of a kd-tree in tree order."""
    B, n, d = points.shape
    perm = np.empty((B, n), np.int64)
    if d == 1:
        for b in range(B):
            perm[b] = _radix_argsort(points[b, :, 0].astype(np.float32))
        return perm
    for b in range(B):
        perm[b] = np.arange(n)
        _kd_order(points[b].copy(), leaf, perm[b])
    return perm


@_jit
def _radix_argsort(x):
    """argsort of float32 x by three passes of an 11-bit radix sort on its
    bits mapped to unsigned integers of the same order."""
    n = x.size
    bits = x.view(np.uint32)
    keys = np.where(bits >> 31 == 1, ~bits, bits | np.uint32(0x80000000))
    perm = np.arange(n)
    scratch = np.empty(n, np.int64)
    for shift in (0, 11, 22):
        counts = np.zeros(2049, np.int64)
        for i in range(n):
            counts[((keys[perm[i]] >> shift) & 2047) + 1] += 1
        for r in range(2048):
            counts[r + 1] += counts[r]
        for i in range(n):
            digit = (keys[perm[i]] >> shift) & 2047
            scratch[counts[digit]] = perm[i]
            counts[digit] += 1
        perm, scratch = scratch, perm
    return perm


@_jit
def _kd_order(points, leaf, perm):
    """Reorder perm (n,) in place into kd-tree order with leaves of ``leaf``;
    points (n, d) is a scratch copy reordered along with it.

    A node of L leaves splits at its widest side into a left child of the
    largest power of two below L leaves and the rest, so every node covers an
    aligned run of blocks: the same runs that ``_key_tree`` pairs up.
    """
    d = points.shape[1]
    stack = np.empty((130, 2), np.int64)
    stack[0, 0], stack[0, 1] = 0, perm.size
    top = 1
    while top > 0:
        top -= 1
        a, b = stack[top, 0], stack[top, 1]
        leaves = (b - a + leaf - 1) // leaf
        if leaves <= 1:
            continue
        left = 1
        while 2 * left < leaves:
            left *= 2
        split = a + left * leaf
        # the widest side, from a sample of some 256 points: it only picks
        # the direction of the split
        step = max(1, (b - a) // 256)
        widest, extent = 0, -1.0
        for f in range(d):
            lo, hi = np.inf, -np.inf
            for i in range(a, b, step):
                lo, hi = min(lo, points[i, f]), max(hi, points[i, f])
            if hi - lo > extent:
                widest, extent = f, hi - lo
        _select(perm, points, widest, a, b, split)
        stack[top, 0], stack[top, 1] = split, b
        stack[top + 1, 0], stack[top + 1, 1] = a, split
        top += 2


@_jit
def _select(perm, points, f, a, b, k):
    """Partition rows [a, b) of points (and perm with them) so that rows
    [a, k) hold the smallest coordinates f (Hoare's selection, median-of-three
    pivots)."""
    d = points.shape[1]
    lo, hi = a, b - 1
    while lo < hi:
        mid = (lo + hi) // 2
        x, y, z = points[lo, f], points[mid, f], points[hi, f]
        pivot = max(min(x, y), min(max(x, y), z))
        i, j = lo, hi
        while i <= j:
            while points[i, f] < pivot:
                i += 1
            while points[j, f] > pivot:
                j -= 1
            if i <= j:
                perm[i], perm[j] = perm[j], perm[i]
                for g in range(d):
                    points[i, g], points[j, g] = points[j, g], points[i, g]
                i += 1
                j -= 1
        if k <= j:
            hi = j
        elif k >= i:
            lo = i
        else:
            break


# ------------------------------------------------------------------ boxes


def _boxes(points, block):
    """Bounding boxes (B, blocks, d) of consecutive runs of ``block`` points."""
    B, n, d = points.shape
    blocks = -(-n // block)
    padded = np.concatenate(
        [points, np.repeat(points[:, -1:], blocks * block - n, axis=1)], axis=1
    ).reshape(B, blocks, block, d)
    return padded.min(axis=2), padded.max(axis=2)


def _key_tree(keys, w, block):
    """Nodes of the key tree, leaves (the blocks) first, then each level up to
    TOP_NODES nodes: (lo, hi) boxes (B, N, d), key counts, smallest and
    largest w (B, N), children (B, N, 2) (-1 for a leaf), the first top
    node's index and the number of leaves."""
    B, m, _ = keys.shape
    lo, hi = _boxes(keys, block)
    blocks = lo.shape[1]
    count = np.minimum(block, m - np.arange(blocks) * block).astype(np.float64)
    if w.shape[1] == 1:
        w_lo = np.broadcast_to(w, (B, blocks)).copy()
        w_hi = w_lo.copy()
    else:
        padded = np.concatenate([w, np.repeat(w[:, -1:], blocks * block - m, axis=1)], axis=1)
        w_lo = padded.reshape(B, blocks, block).min(axis=2)
        w_hi = padded.reshape(B, blocks, block).max(axis=2)
    levels = [(lo, hi, np.broadcast_to(count, (B, blocks)), w_lo, w_hi)]
    children = [np.full((blocks, 2), -1, np.int64)]
    first = 0
    while levels[-1][0].shape[1] > TOP_NODES:
        size = levels[-1][0].shape[1]
        pairs = -(-size // 2)
        left = np.arange(pairs) * 2
        right = np.minimum(left + 1, size - 1)
        lo_, hi_, count_, w_lo_, w_hi_ = levels[-1]
        lone = (left == right)[None, :, None]
        levels.append(
            (
                np.minimum(lo_[:, left], lo_[:, right]),
                np.maximum(hi_[:, left], hi_[:, right]),
                count_[:, left] + np.where(lone[..., 0], 0.0, count_[:, right]),
                np.minimum(w_lo_[:, left], w_lo_[:, right]),
                np.maximum(w_hi_[:, left], w_hi_[:, right]),
            )
        )
        kids = np.stack([left + first, np.where(left == right, -1, right + first)], axis=1)
        first += size
        children.append(kids)
    nodes = [np.concatenate([level[i] for level in levels], axis=1) for i in range(5)]
    kids = np.broadcast_to(np.concatenate(children), (B, nodes[0].shape[1], 2))
    return (*(np.ascontiguousarray(x) for x in nodes), np.ascontiguousarray(kids), first, blocks)


# ------------------------------------------------------------------ walk


@_jit
def _box_bounds(ql, qh, nl, nh, y):
    """Squared least and greatest distances between the query box and node
    y's box (rows of nl, nh: indexed, not sliced, to make no array views)."""
    near = 0.0
    far = 0.0
    for f in range(ql.size):
        gap = max(nl[y, f] - qh[f], ql[f] - nh[y, f], 0.0)
        span = max(qh[f] - nl[y, f], nh[y, f] - ql[f])
        near += gap * gap
        far += span * span
    return near, far


@_jit
def _closer(ql, qh, nl, nh, x, y):
    """Whichever of nodes x and y has its box closer to the query box (by the
    least distance, then the greatest)."""
    near_x, far_x = _box_bounds(ql, qh, nl, nh, x)
    near_y, far_y = _box_bounds(ql, qh, nl, nh, y)
    return y if near_y < near_x or (near_y == near_x and far_y < far_x) else x


@_jit
def _nearest_leaf(ql, qh, nl, nh, kids, top):
    x = top
    for y in range(top + 1, nl.shape[0]):
        x = _closer(ql, qh, nl, nh, x, y)
    while kids[x, 0] >= 0:
        y = kids[x, 0]
        if kids[x, 1] >= 0:
            y = _closer(ql, qh, nl, nh, y, kids[x, 1])
        x = y
    return x


@_jit
def _walk(lo, hi, q_lo, q_hi, n_lo, n_hi, count, w_lo, w_hi, kids, top, leaves, budget, one_out):
    """Kept key blocks of query blocks [lo, hi) (item = b * blocks + t):
    (per-item counts, the blocks in ascending order, concatenated).

    Per query block: a first lower bound L0 from the key leaf nearest to it;
    every node whose U is at most ``budget / 2 * L0 / leaves`` is pruned
    unopened (all of them together stay within budget / 2 * L0); the leaves
    left give the lower bound L, and the lightest of them are dropped while
    the pruned and dropped mass stays within budget * L. The walk keeps logs;
    the sums are taken against the largest of them, so nothing overflows.
    """
    n_qb = q_lo.shape[1]
    nodes = n_lo.shape[1]
    log_count = np.log(count)
    stack = np.empty(nodes, np.int64)
    found = np.empty(leaves, np.int64)
    log_weight = np.empty(leaves, np.float64)  # log U of each leaf reached
    log_lower = np.empty(leaves, np.float64)  # log L of each, and one key's
    log_single = np.empty(leaves, np.float64)
    log_pruned = np.empty(nodes, np.float64)
    weight = np.empty(leaves, np.float64)
    counts = np.zeros(hi - lo, np.int64)
    out = np.empty(max(16, 4 * (hi - lo)), np.int64)
    used = 0
    for item in range(lo, hi):
        b, t = item // n_qb, item % n_qb
        ql, qh = q_lo[b, t], q_hi[b, t]
        nl, nh, wl, wh, kb = n_lo[b], n_hi[b], w_lo[b], w_hi[b], kids[b]

        # L0: a lower bound from one leaf near the block (any leaf gives one)
        x = _nearest_leaf(ql, qh, nl, nh, kb, top)
        _, far = _box_bounds(ql, qh, nl, nh, x)
        keys0 = count[b, x] - (1.0 if one_out else 0.0)  # one may be the row's own
        log_prune = -np.inf
        if keys0 > 0:
            log_prune = math.log(0.5 * budget * keys0 / leaves) - 0.5 * wh[x] * far

        n_found = 0
        n_pruned = 0
        # pushed in reverse so that leaves are found in ascending order
        size = nodes - top
        stack[:size] = np.arange(nodes - 1, top - 1, -1)
        while size > 0:
            size -= 1
            y = stack[size]
            near, far = _box_bounds(ql, qh, nl, nh, y)
            log_u = log_count[b, y] - 0.5 * wl[y] * near
            if log_u <= log_prune:
                log_pruned[n_pruned] = log_u
                n_pruned += 1
            elif kb[y, 0] < 0:
                found[n_found] = y
                log_weight[n_found] = log_u
                log_single[n_found] = -0.5 * wh[y] * far
                log_lower[n_found] = log_count[b, y] + log_single[n_found]
                n_found += 1
            else:
                for c in range(1, -1, -1):
                    if kb[y, c] >= 0:
                        stack[size] = kb[y, c]
                        size += 1

        ref = -np.inf
        for r in range(n_found):
            ref = max(ref, log_weight[r], log_lower[r])
        pruned = 0.0
        for r in range(n_pruned):
            pruned += math.exp(log_pruned[r] - ref)
        lower = 0.0
        one_key = 0.0
        for r in range(n_found):
            weight[r] = math.exp(log_weight[r] - ref)
            lower += math.exp(log_lower[r] - ref)
            one_key = max(one_key, math.exp(log_single[r] - ref))
        floor = lower - one_key if one_out else lower
        spare = budget * floor - pruned

        # Drop the lightest leaves within what is left (keep one at least).
        # Only leaves lighter than all that is left can go: sort those alone.
        # (strictly: with nothing to spare, a weight that underflows is no zero)
        light = np.nonzero(weight[:n_found] < spare)[0]
        light = light[np.argsort(weight[light])]
        dropped = 0
        for r in light[: n_found - 1]:
            if not weight[r] < spare:
                break
            spare -= weight[r]
            found[r] = -1
            dropped += 1
        kept = n_found - dropped
        if used + kept > out.size:
            grown = np.empty(2 * (used + kept), np.int64)
            grown[:used] = out[:used]
            out = grown
        for r in range(n_found):
            if found[r] >= 0:
                out[used] = found[r]
                used += 1
        counts[item - lo] = kept
    return counts, out[:used]


@_jit
def _spans(counts, leaves, n_qb, n_kb, q_block, k_block, n, m):
    """CSR spans both ways from the kept key blocks of each query block
    (``counts`` per item, ``leaves`` ascending within each): consecutive
    blocks merge into one [start, end) run. Returns (key_ptr, key_spans,
    query_ptr, query_spans, pairs)."""
    items = counts.size
    batch = items // n_qb
    key_ptr = np.zeros(items + 1, np.int64)
    key_spans = np.empty((leaves.size, 2), np.int64)
    key_items = batch * n_kb
    per_key = np.zeros(key_items + 1, np.int64)
    start = 0
    runs = 0
    pairs = 0
    for item in range(items):
        rows = min(q_block, n - (item % n_qb) * q_block)
        for r in range(start, start + counts[item]):
            per_key[(item // n_qb) * n_kb + leaves[r] + 1] += 1
            if r == start or leaves[r] != leaves[r - 1] + 1:
                key_spans[runs, 0] = leaves[r] * k_block
                runs += 1
            key_spans[runs - 1, 1] = min((leaves[r] + 1) * k_block, m)
            pairs += rows * (min((leaves[r] + 1) * k_block, m) - leaves[r] * k_block)
        start += counts[item]
        key_ptr[item + 1] = runs
    # the transpose, by a counting sort on the key block: query blocks come
    # out in ascending order within each
    for kb in range(key_items):
        per_key[kb + 1] += per_key[kb]
    fill = per_key[:-1].copy()
    queries = np.empty(leaves.size, np.int64)
    start = 0
    for item in range(items):
        for r in range(start, start + counts[item]):
            kb = (item // n_qb) * n_kb + leaves[r]
            queries[fill[kb]] = item % n_qb
            fill[kb] += 1
        start += counts[item]
    query_ptr = np.zeros(key_items + 1, np.int64)
    query_spans = np.empty((leaves.size, 2), np.int64)
    runs = 0
    for kb in range(key_items):
        for r in range(per_key[kb], per_key[kb + 1]):
            if r == per_key[kb] or queries[r] != queries[r - 1] + 1:
                query_spans[runs, 0] = queries[r] * q_block
                runs += 1
            query_spans[runs - 1, 1] = min((queries[r] + 1) * q_block, n)
        query_ptr[kb + 1] = runs
    return key_ptr, key_spans[: key_ptr[-1]], query_ptr, query_spans[:runs], pairs


# ------------------------------------------------------------- using a plan


def _gather(x, perm):
    """x (B, r, ...) with its rows in the order perm (B, r)."""
    if arrays.numpy_can_hold(x):  # by NumPy (``arrays``)
        a, rows = x.detach().numpy(), perm.numpy()
        out = arrays.empty(a.shape, a.dtype)
        for b in range(len(a)):
            np.take(a[b], rows[b], axis=0, out=out[b], mode="clip")
        return torch.from_numpy(out)
    index = perm.to(x.device).reshape(*perm.shape, *([1] * (x.dim() - 2)))
    return x.gather(1, index.expand(*perm.shape, *x.shape[2:]))


def _scatter(x, perm):
    """The inverse of _gather: row i of x goes back to row perm[i]."""
    if arrays.numpy_can_hold(x):
        a, rows = x.detach().numpy(), perm.numpy()
        out = arrays.empty(a.shape, a.dtype)
        for b in range(len(a)):
            out[b][rows[b]] = a[b]
        return torch.from_numpy(out)
    index = perm.to(x.device).reshape(*perm.shape, *([1] * (x.dim() - 2)))
    return torch.empty_like(x).scatter_(1, index.expand(*perm.shape, *x.shape[2:]), x)


def queries_in_order(plan, *tensors):
    """Query-side tensors (B, n, ...) in the plan's order (a plan of None, or
    without an order, keeps the caller's)."""
    if plan is None or plan.order is None:
        return tensors
    return tuple(_gather(x, plan.order[0]) for x in tensors)


def keys_in_order(plan, *tensors):
    """Key-side tensors (B, m, ...) in the plan's order; a shared w (B, 1) stays."""
    if plan is None or plan.order is None:
        return tensors
    return tuple(x if x.shape[1] == 1 else _gather(x, plan.order[1]) for x in tensors)


def queries_back(plan, *tensors):
    """Query-side results in the caller's order."""
    if plan is None or plan.order is None:
        return tensors
    return tuple(_scatter(x, plan.order[0]) for x in tensors)


def keys_back(plan, *tensors):
    """Key-side results in the caller's order; a shared w's (B, 1) stays."""
    if plan is None or plan.order is None:
        return tensors
    return tuple(x if x.shape[1] == 1 else _scatter(x, plan.order[1]) for x in tensors)


def skips(plan, diagonal, B, n, m):
    """In the plan's order, the key each query leaves out, skip (B, n), and the
    query that leaves each key out, skipped_by (B, m); -1 for none. int64."""
    skip = np.full((B, n), -1, np.int64)
    skipped_by = np.full((B, m), -1, np.int64)
    if diagonal is None:
        return skip, skipped_by
    rows = np.arange(n)
    target = rows + diagonal
    valid = (target >= 0) & (target < m)
    if plan is None or plan.order is None:
        skip[:, valid] = target[valid]
        skipped_by[:, target[valid]] = rows[valid]
        return skip, skipped_by
    _permuted_skips(plan.order[0].numpy(), plan.order[1].numpy(), diagonal, skip, skipped_by)
    return skip, skipped_by


@_jit
def _permuted_skips(perm_q, perm_k, diagonal, skip, skipped_by):
    """``skips`` for points in the orders perm_q (B, n) and perm_k (B, m)."""
    B, m = perm_k.shape
    inverse_k = np.empty(m, np.int64)
    for b in range(B):
        if diagonal == 0 and perm_q.shape[1] == m and (perm_q[b] == perm_k[b]).all():
            # one order for the points (leave-one-out): each leaves out its own place
            for i in range(m):
                skip[b, i] = i
                skipped_by[b, i] = i
            continue
        for j in range(m):
            inverse_k[perm_k[b, j]] = j
        for i in range(perm_q.shape[1]):
            original = perm_q[b, i] + diagonal
            if 0 <= original < m:
                key = inverse_k[original]
                skip[b, i] = key
                skipped_by[b, key] = i


# ------------------------------------------------------------------ packing

_HEADER = 8


def pack(plan, batch, n, m):
    """The plan as one int64 CPU tensor, for an operator to return and take; a
    dense pass (None) is the empty tensor: nothing to reuse, and nothing that
    depends on the batch, so vmap can fold it into a larger one."""
    if plan is None:
        return torch.zeros(0, dtype=torch.int64)
    ordered = plan.order is not None
    header = [
        plan.q_block,
        plan.k_block,
        batch,
        n,
        m,
        int(ordered),
        len(plan.key_spans),
        plan.pairs,
    ]
    parts = [np.array(header, np.int64)]
    if ordered:
        parts += [plan.order[0].numpy().ravel(), plan.order[1].numpy().ravel()]
    parts += [plan.key_ptr, plan.key_spans.ravel(), plan.query_ptr, plan.query_spans.ravel()]
    if plan.far is not None:
        parts.append(plan.far.packed())
    return torch.from_numpy(np.concatenate(parts))


def unpack(packed, far=None):
    """The Plan that ``pack`` packed (None for a dense pass). ``far``: the
    class of the plan's expansions (``kernels.far.Far``), for the kernels
    whose plans may hold them."""
    if packed.numel() == 0:
        return None
    a = packed.numpy()
    q_block, k_block, batch, n, m, ordered, key_runs, pairs = (int(x) for x in a[:_HEADER])
    at = _HEADER
    order = None
    if ordered:
        perm_q = a[at : at + batch * n].reshape(batch, n)
        perm_k = a[at + batch * n : at + batch * (n + m)].reshape(batch, m)
        order = (torch.from_numpy(perm_q), torch.from_numpy(perm_k))
        at += batch * (n + m)
    items = batch * -(-n // q_block)
    key_ptr = a[at : at + items + 1]
    at += items + 1
    key_spans = a[at : at + 2 * key_runs].reshape(key_runs, 2)
    at += 2 * key_runs
    key_items = batch * -(-m // k_block)
    query_ptr = a[at : at + key_items + 1]
    at += key_items + 1
    query_spans = a[at : at + 2 * int(query_ptr[-1])].reshape(-1, 2)
    at += query_spans.size
    expansions = None
    if at < a.size:
        if far is None:
            raise ValueError("this plan holds expansions: unpack it with their class")
        expansions = far.unpacked(a[at:])
    return Plan(
        q_block, k_block, key_ptr, key_spans, query_ptr, query_spans, pairs, order, expansions
    )
