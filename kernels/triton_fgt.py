"""Triton kernels for a plan's far fields (``kernels.far``): the forward's half
of the fast Gauss transform on the GPU.

The plan is the CPU planner's (``far.plan``) and so are its orders and bound;
this file computes what ``numba_fgt.forward`` computes, in float64:

- ``_fgt_moments_kernel``: one program per (expanded key node, channel) sums the
  Hermite moments A[n_1, ..., n_d] = sum_j w_j prod_f s_jf^n_f / n_f! of the
  node's keys, s_j = (k_j - centre) / delta, for the values' channels and a
  channel of ones. A term is exp(n log|s| - log n!) with its sign: no
  recurrence across orders, so every order of a chunk of keys is one tile.
- ``_fgt_locals_kernel``: one program per (query box, channel) translates the
  Hermite expansions of the nodes a box expands into its local (Taylor)
  expansion, where the plan gives it one: B_k = prod_f (-1)^k_f / k_f! sum_n
  A_n prod_f h_{n_f + k_f}(t0_f), t0 the box's centre seen from the node's.
- ``_fgt_fold_kernel``: one program per query block evaluates, at its rows,
  the box's local expansion by Horner's rule, or else the Hermite series of
  every node the box expands (h_0 = exp(-t^2), h_1 = 2 t h_0, h_{n+1} = 2 t
  h_n - 2 n h_{n-1}); subtracts each row's left-out key exactly; and folds the
  sums into the direct pass's out and lse: sum = exp(lse) + expanded, out =
  (out exp(lse) + expanded values) / sum, lse = log(sum).

The backward's far shares come from ``numba_fgt`` on the host, the tangent
computes the expanded pairs directly (``far.as_direct``), as on the CPU.
"""

import math

import numpy as np
import torch
import triton
import triton.language as tl

from . import blocks, far, numba_fgt

# Keys a moments program sums at once, for d = 1 and d = 2 (whose tile holds
# p^2 terms a key).
MOMENT_KEYS = {1: 32, 2: 8}


@triton.jit
def _fgt_moments_kernel(
    Pts, Wts, Nodes, Centre, Delta, Order, Offset, LogFact, Out, n_pts,
    D: tl.constexpr, C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    # Program (node u, channel ch): Out[Offset[u] + ch * p^D + t] for the
    # node's terms t < p^D, channel ch < C weighted by Wts[b, j, ch], ch == C
    # by 1. Pts (B, n_pts, D), Wts (B, n_pts, C), row-major.
    u = tl.program_id(0)
    ch = tl.program_id(1)
    b = tl.load(Nodes + 3 * u)
    start = tl.load(Nodes + 3 * u + 1)
    end = tl.load(Nodes + 3 * u + 2)
    p = tl.load(Order + u).to(tl.int32)
    inv = 1.0 / tl.load(Delta + b)
    t = tl.arange(0, BLOCK_T)
    if D == 1:
        n1 = t
        valid = t < p
    else:
        n1 = t // tl.maximum(p, 1)
        n2 = t % tl.maximum(p, 1)
        valid = t < p * p
        lf2 = tl.load(LogFact + n2, mask=valid, other=0.0)
    lf1 = tl.load(LogFact + n1, mask=valid, other=0.0)
    acc = tl.zeros([BLOCK_T], dtype=tl.float64)
    c1 = tl.load(Centre + D * u)
    for j0 in range(start, end, BLOCK_K):
        j = j0 + tl.arange(0, BLOCK_K)
        kept = j < end
        row = b.to(tl.int64) * n_pts + j
        # a key past the node's end sits at its centre (s = 0): its terms stay
        # finite for the zero weight to cancel
        s1 = (tl.load(Pts + row * D, mask=kept, other=0.0).to(tl.float64) - c1) * inv
        s1 = tl.where(kept, s1, 0.0)
        log_term = _log_power(s1, n1, lf1)
        odd = _odd_power(s1, n1)
        if D == 2:
            c2 = tl.load(Centre + D * u + 1)
            s2 = (tl.load(Pts + row * D + 1, mask=kept, other=0.0).to(tl.float64) - c2) * inv
            s2 = tl.where(kept, s2, 0.0)
            log_term += _log_power(s2, n2, lf2)
            odd = odd ^ _odd_power(s2, n2)
        term = tl.where(valid[None, :], tl.exp(log_term), 0.0)
        term = tl.where(odd, -term, term)
        weight = tl.load(Wts + row * C + tl.minimum(ch, C - 1), mask=kept, other=0.0)
        # the ones channel (ch == C) takes 1
        weight = tl.where(kept, tl.where(ch < C, weight.to(tl.float64), 1.0), 0.0)
        acc += tl.sum(term * weight[:, None], axis=0)
    size = p * p if D == 2 else p
    base = tl.load(Offset + u)
    tl.store(Out + base + ch * size + t, acc, mask=valid)


@triton.jit
def _log_power(s, n, log_fact):
    # log(|s|^n / n!) per (key, term); n = 0 gives -log 0! = 0 even where s = 0.
    log_s = tl.log(tl.abs(s))
    return tl.where(n[None, :] == 0, 0.0, n[None, :] * log_s[:, None]) - log_fact[None, :]


@triton.jit
def _odd_power(s, n):
    # whether s^n is negative
    return (s[:, None] < 0) & ((n[None, :] % 2) == 1)


@triton.jit
def _shifted_hermite(t0, count, n, k):
    # T[n, k] = h_{n + k}(t0) for n + k < count (0 beyond): the recurrence
    # along n + k, each value placed where the index meets it.
    j = n[:, None] + k[None, :]
    h_prev = tl.exp(-t0 * t0)
    h = 2.0 * t0 * h_prev
    T = tl.where(j == 0, h_prev, 0.0)
    T = tl.where(j == 1, h, T)  # count >= 2: a Hermite order and a local one
    for i in range(1, count - 1):
        h_prev, h = h, 2.0 * t0 * h - 2.0 * i * h_prev
        T = tl.where(j == i + 1, h, T)
    return T


@triton.jit
def _fgt_locals_kernel(
    QBox, QCentre, QLocal, RowPtr, RowPairs, KCentre, Delta, Moments, MOffset, MOrder,
    LogFact, LOffset, Coef,
    D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
):  # fmt: skip
    # Program (box x, channel ch): the box's local expansion, Coef[LOffset[x]
    # + ch * pl^D + ...], B_k = prod_f (-1)^k_f / k_f! sum_n A_n prod_f
    # h_{n_f + k_f}(t0_f), t0 = (box centre - node centre) / delta, from the
    # Hermite moments of every node the box expands (at its value order).
    x = tl.program_id(0)
    ch = tl.program_id(1)
    pl = tl.load(QLocal + x).to(tl.int32)
    b = tl.load(QBox + 3 * x)
    inv = 1.0 / tl.load(Delta + b)
    first = tl.load(RowPtr + x)
    last = tl.load(RowPtr + x + 1)
    n = tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_L)
    # (-1)^k / k!
    scale = tl.exp(-tl.load(LogFact + k, mask=k < pl, other=0.0))
    scale = tl.where(k % 2 == 1, -scale, scale)
    if D == 1:
        acc = tl.zeros([BLOCK_L], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_L, BLOCK_L], dtype=tl.float64)
    for pair in range(first, last):
        u = tl.load(RowPairs + 4 * pair)
        p = tl.load(RowPairs + 4 * pair + 1).to(tl.int32)
        p_node = tl.load(MOrder + u).to(tl.int32)
        size = p_node * p_node if D == 2 else p_node
        at = tl.load(MOffset + u) + ch * size
        t01 = (tl.load(QCentre + D * x) - tl.load(KCentre + D * u)) * inv
        T1 = _shifted_hermite(t01, p + pl, n, k)
        if D == 1:
            a = tl.load(Moments + at + n, mask=n < p, other=0.0)
            acc += tl.sum(a[:, None] * T1, axis=0)
        else:
            t02 = (tl.load(QCentre + D * x + 1) - tl.load(KCentre + D * u + 1)) * inv
            T2 = _shifted_hermite(t02, p + pl, n, k)
            for n1 in range(0, p):
                a = tl.load(Moments + at + n1 * p_node + n, mask=n < p, other=0.0)
                inner = tl.sum(a[:, None] * T2, axis=0)  # over k2
                outer = tl.sum(tl.where(n[:, None] == n1, T1, 0.0), axis=0)  # h_{n1+k1}
                acc += outer[:, None] * inner[None, :]
    base = tl.load(LOffset + x)
    if D == 1:
        tl.store(Coef + base + ch * pl + k, acc * scale, mask=k < pl)
    else:
        coef = acc * scale[:, None] * scale[None, :]
        at = base + ch * pl * pl + k[:, None] * pl + k[None, :]
        tl.store(Coef + at, coef, mask=(k[:, None] < pl) & (k[None, :] < pl))


@triton.jit
def _fgt_fold_kernel(
    Q, K, V, Out, Lse, Skip, BoxOfBlock, RowPtr, RowPairs, KNode, KCentre, Delta, Moments,
    MOffset, MOrder, QCentre, QLocal, LOffset, Coef, n, m,
    D: tl.constexpr, C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    HAS_SKIP: tl.constexpr,
):  # fmt: skip
    # Query block ``item`` (batch b, rows [i0, i0 + BLOCK_R)): the sums of the
    # nodes its box expands, column ch < C the values', column C the weights',
    # folded into Out (B, n, C) and Lse (B, n). A box with a local expansion
    # (QLocal > 0) evaluates it by Horner's rule; one without evaluates each
    # node's Hermite series.
    item = tl.program_id(0)
    blocks = tl.cdiv(n, BLOCK_R)
    b = item // blocks
    rows = (item % blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
    kept = rows < n
    row = b.to(tl.int64) * n + rows
    chans = tl.arange(0, BLOCK_C)
    box = tl.load(BoxOfBlock + item)
    first = tl.load(RowPtr + box)
    last = tl.load(RowPtr + box + 1)
    inv = 1.0 / tl.load(Delta + b)
    x1 = tl.load(Q + row * D, mask=kept, other=0.0).to(tl.float64)
    if D == 2:
        x2 = tl.load(Q + row * D + 1, mask=kept, other=0.0).to(tl.float64)
    if HAS_SKIP:
        left_out = tl.load(Skip + row, mask=kept, other=-1)
    chan_kept = chans < C + 1
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float64)
    p_local = tl.load(QLocal + box).to(tl.int32)
    if p_local > 0:
        at = tl.load(LOffset + box) + chans * (p_local * p_local if D == 2 else p_local)
        tau1 = (x1 - tl.load(QCentre + D * box)) * inv
        if D == 2:
            tau2 = (x2 - tl.load(QCentre + D * box + 1)) * inv
        for step1 in range(0, p_local):
            k1 = p_local - 1 - step1
            if D == 1:
                c = tl.load(Coef + at + k1, mask=chan_kept, other=0.0)
                acc = acc * tau1[:, None] + c[None, :]
            else:
                inner = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float64)
                for step2 in range(0, p_local):
                    k2 = p_local - 1 - step2
                    c = tl.load(Coef + at + k1 * p_local + k2, mask=chan_kept, other=0.0)
                    inner = inner * tau2[:, None] + c[None, :]
                acc = acc * tau1[:, None] + inner
    for pair in range(first, last):
        u = tl.load(RowPairs + 4 * pair)
        p = tl.load(RowPairs + 4 * pair + 1).to(tl.int32)
        p = tl.where(p_local > 0, 0, p)  # the local expansion holds this node's sum
        p_node = tl.load(MOrder + u).to(tl.int32)
        size = p_node * p_node if D == 2 else p_node
        at = tl.load(MOffset + u) + chans * size
        t1 = (x1 - tl.load(KCentre + D * u)) * inv
        h_prev = tl.exp(-t1 * t1)
        h = 2.0 * t1 * h_prev
        if D == 1:
            for k in range(0, p):
                a = tl.load(Moments + at + k, mask=chan_kept, other=0.0)
                acc += h_prev[:, None] * a[None, :]
                h_prev, h = h, 2.0 * t1 * h - 2.0 * (k + 1) * h_prev
        else:
            t2 = (x2 - tl.load(KCentre + D * u + 1)) * inv
            g0 = tl.exp(-t2 * t2)
            for k1 in range(0, p):
                inner = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float64)
                g_prev = g0
                g = 2.0 * t2 * g0
                for k2 in range(0, p):
                    a = tl.load(Moments + at + k1 * p_node + k2, mask=chan_kept, other=0.0)
                    inner += g_prev[:, None] * a[None, :]
                    g_prev, g = g, 2.0 * t2 * g - 2.0 * (k2 + 1) * g_prev
                acc += h_prev[:, None] * inner
                h_prev, h = h, 2.0 * t1 * h - 2.0 * (k1 + 1) * h_prev
        if HAS_SKIP:
            # the row's own key, if this node holds it, leaves the expansion exactly
            first_key = tl.load(KNode + 3 * u + 1)
            end_key = tl.load(KNode + 3 * u + 2)
            inside = kept & (left_out >= first_key) & (left_out < end_key)
            j = b.to(tl.int64) * m + tl.where(inside, left_out, 0)
            diff = (x1 - tl.load(K + j * D, mask=inside, other=0.0).to(tl.float64)) * inv
            dist2 = diff * diff
            if D == 2:
                diff = (x2 - tl.load(K + j * D + 1, mask=inside, other=0.0).to(tl.float64)) * inv
                dist2 += diff * diff
            own = tl.where(inside, tl.exp(-dist2), 0.0)
            v = tl.load(
                V + j[:, None] * C + chans[None, :],
                mask=inside[:, None] & (chans[None, :] < C),
                other=1.0,
            ).to(tl.float64)
            acc -= own[:, None] * tl.where(chans[None, :] < C, v, 1.0)
    # rows whose box expands something (as a tensor: a scalar mask term is
    # not a mask the interpreter takes)
    folded = kept & ((rows * 0 + (last - first)) > 0)
    lse = tl.load(Lse + row, mask=kept, other=0.0)
    direct = tl.exp(lse)
    total = direct + tl.sum(tl.where(chans[None, :] == C, acc, 0.0), axis=1)
    out_mask = folded[:, None] & (chans[None, :] < C)
    out_at = row[:, None] * C + chans[None, :]
    out = tl.load(Out + out_at, mask=out_mask, other=0.0).to(tl.float64)
    weighted = tl.where(direct[:, None] > 0.0, out * direct[:, None], 0.0) + acc
    tl.store(Out + out_at, (weighted / total[:, None]).to(Out.dtype.element_ty), mask=out_mask)
    tl.store(Lse + row, tl.log(total), mask=folded)


def _device(array, device):
    return torch.from_numpy(np.ascontiguousarray(array)).to(device)


def forward(plan, q, k, v, skip, has_skip, out, lse):
    """Fold the plan's expansions into the direct pass's out (B, n, c) and lse
    (B, n) float64, in place; every tensor on the device, in the plan's order.
    skip (B, n) int64: the key each row leaves out (``has_skip``)."""
    expansions = plan.far
    B, n, d = q.shape
    c = v.shape[2]
    device = q.device
    # each node's moments to the largest value order its pairs ask for
    order = np.zeros(len(expansions.k_node), np.int64)
    np.maximum.at(order, expansions.row_pairs[:, 0], expansions.row_pairs[:, 1])
    offset, total = numba_fgt._moment_layout(order, c + 1, d)
    moments = torch.empty(max(total, 1), dtype=torch.float64, device=device)
    top = max(far.MAX_ORDER[d], far.MAX_LOCAL[d])
    log_fact = torch.tensor([math.lgamma(i + 1.0) for i in range(2 * top)], dtype=torch.float64)
    nodes, delta = _device(expansions.k_node, device), _device(expansions.delta, device)
    # one tile width per d, for every order the planner may choose: one compile
    terms = triton.next_power_of_2(far.MAX_ORDER[d] ** d)
    _fgt_moments_kernel[(len(order), c + 1)](
        k, v, nodes, _device(expansions.k_centre, device), delta, _device(order, device),
        _device(offset, device), log_fact.to(device), moments, k.shape[1],
        D=d, C=c, BLOCK_K=MOMENT_KEYS[d], BLOCK_T=terms,
    )  # fmt: skip
    row_ptr, row_pairs = _device(expansions.row_ptr, device), _device(expansions.row_pairs, device)
    k_centre, q_centre = _device(expansions.k_centre, device), _device(expansions.q_centre, device)
    m_offset, m_order = _device(offset, device), _device(order, device)
    # the boxes' local expansions, from the moments of the nodes they expand
    q_local = expansions.q_local
    l_offset, l_total = numba_fgt._moment_layout(q_local, c + 1, d)
    coef = torch.empty(max(l_total, 1), dtype=torch.float64, device=device)
    l_offset, q_local = _device(l_offset, device), _device(q_local, device)
    if l_total:
        _fgt_locals_kernel[(len(expansions.q_local), c + 1)](
            _device(expansions.q_box, device), q_centre, q_local, row_ptr, row_pairs, k_centre,
            delta, moments, m_offset, m_order, log_fact.to(device), l_offset, coef,
            D=d, BLOCK_N=triton.next_power_of_2(far.MAX_ORDER[d]),
            BLOCK_L=triton.next_power_of_2(far.MAX_LOCAL[d]),
        )  # fmt: skip
    _fgt_fold_kernel[(len(expansions.box_of_block),)](
        q, k, v, out, lse, skip, _device(expansions.box_of_block, device), row_ptr, row_pairs,
        nodes, k_centre, delta, moments, m_offset, m_order, q_centre, q_local, l_offset, coef,
        n, k.shape[1],
        D=d, C=c, BLOCK_R=plan.q_block, BLOCK_C=triton.next_power_of_2(c + 1),
        HAS_SKIP=has_skip,
    )  # fmt: skip


def backward_shares(plan, needs, q, g, k, v, w, out, lse, shift, diagonal):
    """The expanded pairs' shares of (dq, dk, dv, dw), float64 on the device
    (``numba_fgt.backward_shares`` on host copies), or Nones."""
    B, n, _ = q.shape
    m = k.shape[1]
    skip, skipped_by = blocks.skips(plan, diagonal, B, n, m)
    host = [x.detach().cpu() for x in (q, g, k, v, w, out, lse, shift)]
    shares = numba_fgt.backward_shares(plan, needs, *host, skip, skipped_by)
    return tuple(None if x is None else x.to(q.device) for x in shares)
