"""Triton kernels for a plan's far fields (``kernels.far``): the fast Gauss
transform on the GPU, forward and backward.

The plan is the CPU planner's (``far.plan``) and so are its orders and bound;
this file computes what ``numba_fgt`` computes, in float64:

- ``_fgt_moments_kernel``: one program per (node, channel) sums the Hermite
  moments A[n_1, ..., n_d] = sum_j w_j prod_f s_jf^n_f / n_f! of the node's
  points, s_j = (x_j - centre) / delta: the key nodes' for the values'
  channels and a channel of ones; in the backward also the query boxes', for
  the upstream terms. A term is exp(n log|s| - log n!) with its sign: no
  recurrence across orders, so every order of a chunk of points is one tile.
- ``_fgt_locals_kernel``: one program per (query box, channel) translates the
  Hermite expansions of the nodes a box expands into its local (Taylor)
  expansion, where the plan gives it one: B_k = prod_f (-1)^k_f / k_f! sum_n
  A_n prod_f h_{n_f + k_f}(t0_f), t0 the box's centre seen from the node's.
- rows, one program per query block (``_row_sums``): the box's local
  expansion by Horner's rule, or else the Hermite series of every node the
  box expands (h_0 = exp(-t^2), h_1 = 2 t h_0, h_{n+1} = 2 t h_n - 2 n
  h_{n-1}), each row's left-out key subtracted exactly. The forward
  (``_fgt_fold_kernel``) folds the sums into the direct pass's out and lse:
  sum = exp(lse) + expanded, out = (out exp(lse) + expanded values) / sum, lse
  = log(sum). The backward (``_fgt_rows_kernel``) takes their first and
  second moments too, for dq and the shared w's gradient.
- columns, one program per key block (``_fgt_columns_kernel``, backward): the
  query boxes' expansions at the keys, for dk and dv.

The tangent computes the expanded pairs directly (``far.as_direct``), as on
the CPU.
"""

import math
from types import SimpleNamespace

import numpy as np
import torch
import triton
import triton.language as tl

from . import far, numba_fgt

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
    # (a grid of C + 1 channels: the keys') by 1. Pts (B, n_pts, D), Wts (B,
    # n_pts, C), row-major.
    u = tl.program_id(0)
    ch = tl.program_id(1)
    b = tl.load(Nodes + 3 * u)
    start = tl.load(Nodes + 3 * u + 1)
    end = tl.load(Nodes + 3 * u + 2)
    p = tl.load(Order + u).to(tl.int32)
    end = tl.where(p > 0, end, start)  # a node no pair expands has no terms
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
    D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, LARGEST: tl.constexpr,
):  # fmt: skip
    # Program (box x, channel ch): the box's local expansion, Coef[LOffset[x]
    # + ch * pl^D + ...], B_k = prod_f (-1)^k_f / k_f! sum_n A_n prod_f
    # h_{n_f + k_f}(t0_f), t0 = (box centre - node centre) / delta, from the
    # Hermite moments of every node the box expands (at its value order, or
    # the largest of its orders where ``LARGEST``: the backward's).
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
        if LARGEST:
            p = tl.maximum(p, tl.load(RowPairs + 4 * pair + 2).to(tl.int32))
            p = tl.maximum(p, tl.load(RowPairs + 4 * pair + 3).to(tl.int32))
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
def _series(
    S, F1, F2, Sec, Moments, at, p_node, p, t1, t2, chan_kept,
    D: tl.constexpr, FIRST: tl.constexpr, SECOND: tl.constexpr,
):  # fmt: skip
    # One Hermite expansion (moments Moments[at + ...], order p_node per axis,
    # truncated at p) at the targets t (scaled offsets from its centre), added
    # to the sums (targets, channels): S += sum_n A_n h_n(t); with FIRST the
    # first moments F_f += sum_j w_j (t - s_j)_f e_j = 1/2 the series of h_{n_f
    # + 1}; with SECOND, Sec += sum_j w_j |t - s_j|^2 e_j = 1/4 the series of
    # h_{n_f + 2} summed over f, plus d/2 of S's. For D == 1, t2 and F2 are
    # passed through.
    h0 = tl.exp(-t1 * t1)
    h1 = 2.0 * t1 * h0
    h2 = 2.0 * t1 * h1 - 2.0 * h0
    if D == 1:
        for k in range(0, p):
            a = tl.load(Moments + at + k, mask=chan_kept, other=0.0)[None, :]
            S += h0[:, None] * a
            if FIRST:
                F1 += 0.5 * h1[:, None] * a
            if SECOND:
                Sec += (0.25 * h2 + 0.5 * h0)[:, None] * a
            h0, h1, h2 = h1, h2, 2.0 * t1 * h2 - 2.0 * (k + 2) * h1
    else:
        g_start = tl.exp(-t2 * t2)
        for k1 in range(0, p):
            inner0 = tl.zeros_like(S)
            inner1 = tl.zeros_like(S)
            inner2 = tl.zeros_like(S)
            g0 = g_start
            g1 = 2.0 * t2 * g0
            g2 = 2.0 * t2 * g1 - 2.0 * g0
            for k2 in range(0, p):
                a = tl.load(Moments + at + k1 * p_node + k2, mask=chan_kept, other=0.0)[None, :]
                inner0 += g0[:, None] * a
                if FIRST:
                    inner1 += g1[:, None] * a
                if SECOND:
                    inner2 += g2[:, None] * a
                g0, g1, g2 = g1, g2, 2.0 * t2 * g2 - 2.0 * (k2 + 2) * g1
            S += h0[:, None] * inner0
            if FIRST:
                F1 += 0.5 * h1[:, None] * inner0
                F2 += 0.5 * h0[:, None] * inner1
            if SECOND:
                Sec += 0.25 * (h2[:, None] * inner0 + h0[:, None] * inner2) + h0[:, None] * inner0
            h0, h1, h2 = h1, h2, 2.0 * t1 * h2 - 2.0 * (k1 + 2) * h1
    return S, F1, F2, Sec


@triton.jit
def _local_series(
    S, F1, F2, Sec, Coef, at, pl, tau1, tau2, chan_kept,
    D: tl.constexpr, SLOPES: tl.constexpr,
):  # fmt: skip
    # A box's local expansion F(tau) = sum_k B_k tau^k (Coef[at + ...], order
    # pl per axis) at its rows, by Horner's rule, added to the sums as
    # ``_series`` adds them: S += F; with SLOPES the first moments F_f -=
    # dF/dtau_f / 2 and the second Sec += sum_f d^2F/dtau_f^2 / 4 + d F / 2.
    # E0, E1, E2: F, dF/dtau_1, d^2F/dtau_1^2 / 2; in 2-D V1, V2: dF/dtau_2,
    # d^2F/dtau_2^2 / 2 (each row of coefficients along tau_2 first).
    E0 = tl.zeros_like(S)
    E1 = tl.zeros_like(S)
    E2 = tl.zeros_like(S)
    V1 = tl.zeros_like(S)
    V2 = tl.zeros_like(S)
    for step1 in range(0, pl):
        k1 = pl - 1 - step1
        if D == 1:
            g0 = tl.load(Coef + at + k1, mask=chan_kept, other=0.0)[None, :]
        else:
            g0 = tl.zeros_like(S)
            g1 = tl.zeros_like(S)
            g2 = tl.zeros_like(S)
            for step2 in range(0, pl):
                k2 = pl - 1 - step2
                c = tl.load(Coef + at + k1 * pl + k2, mask=chan_kept, other=0.0)[None, :]
                if SLOPES:
                    g2 = g2 * tau2[:, None] + g1
                    g1 = g1 * tau2[:, None] + g0
                g0 = g0 * tau2[:, None] + c
            if SLOPES:
                V1 = V1 * tau1[:, None] + g1
                V2 = V2 * tau1[:, None] + g2
        if SLOPES:
            E2 = E2 * tau1[:, None] + E1
            E1 = E1 * tau1[:, None] + E0
        E0 = E0 * tau1[:, None] + g0
    S += E0
    if SLOPES:
        F1 -= 0.5 * E1
        if D == 1:
            Sec += 0.5 * E2 + 0.5 * E0
        else:
            F2 -= 0.5 * V1
            Sec += 0.5 * (E2 + V2) + E0
    return S, F1, F2, Sec


@triton.jit
def _subtract_source(
    S, F1, F2, Sec, inside, y1, y2, Pts, j, Wts, CW, chans, inv,
    D: tl.constexpr, FIRST: tl.constexpr, SECOND: tl.constexpr,
):  # fmt: skip
    # Where ``inside``, the sums lose the exact terms of one source point j
    # (Pts (B, n_pts, D) row-major, j its flat row): a row's left-out key or a
    # key's left-out query, seen from the target y. Its weights Wts[j, ch] for
    # ch < CW, 1 beyond (the keys' channel of ones).
    diff1 = (y1 - tl.load(Pts + j * D, mask=inside, other=0.0).to(tl.float64)) * inv
    dist2 = diff1 * diff1
    if D == 2:
        diff2 = (y2 - tl.load(Pts + j * D + 1, mask=inside, other=0.0).to(tl.float64)) * inv
        dist2 += diff2 * diff2
    own = tl.where(inside, tl.exp(-dist2), 0.0)[:, None]
    mine = inside[:, None] & (chans[None, :] < CW)
    weight = tl.load(Wts + j[:, None] * CW + chans[None, :], mask=mine, other=1.0)
    term = own * tl.where(chans[None, :] < CW, weight.to(tl.float64), 1.0)
    S -= term
    if FIRST:
        F1 -= diff1[:, None] * term
        if D == 2:
            F2 -= diff2[:, None] * term
    if SECOND:
        Sec -= dist2[:, None] * term
    return S, F1, F2, Sec


@triton.jit
def _target_block(
    Pts, LeftOut, Delta, count,
    C: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    HAS_SKIP: tl.constexpr,
):  # fmt: skip
    # Block program_id(0) of the targets Pts (B, count, D) (a query block for
    # the rows, a key block for the columns): (its item, batch element, flat
    # indices, mask, the channel columns and their mask (C + 1 of them), 1 /
    # delta, the coordinates (y2 = y1 where D == 1), the source each target
    # leaves out (-1: none)).
    item = tl.program_id(0)
    blocks = tl.cdiv(count, BLOCK_R)
    b = item // blocks
    points = (item % blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
    kept = points < count
    flat = b.to(tl.int64) * count + points
    chans = tl.arange(0, BLOCK_C)
    inv = 1.0 / tl.load(Delta + b)
    y1 = tl.load(Pts + flat * D, mask=kept, other=0.0).to(tl.float64)
    y2 = y1
    if D == 2:
        y2 = tl.load(Pts + flat * D + 1, mask=kept, other=0.0).to(tl.float64)
    left_out = tl.full([BLOCK_R], -1, tl.int64)
    if HAS_SKIP:
        left_out = tl.load(LeftOut + flat, mask=kept, other=-1)
    return item, b, flat, kept, chans, chans < C + 1, inv, y1, y2, left_out


@triton.jit
def _offsets(y1, y2, Centre, x, inv, D: tl.constexpr):
    # The targets seen from centre x of Centre (N, D), in units of delta.
    t1 = (y1 - tl.load(Centre + D * x)) * inv
    t2 = t1
    if D == 2:
        t2 = (y2 - tl.load(Centre + D * x + 1)) * inv
    return t1, t2


@triton.jit
def _row_sums(
    Q, K, V, Skip, BoxOfBlock, RowPtr, RowPairs, KNode, KCentre, Delta, Moments, MOffset,
    MOrder, QCentre, QLocal, LOffset, Coef, n, m,
    D: tl.constexpr, C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    HAS_SKIP: tl.constexpr, GRAD: tl.constexpr,
):  # fmt: skip
    # Query block program_id(0) (batch b, rows [i0, i0 + BLOCK_R)): the sums
    # over the nodes its box expands (``_series``; with GRAD the first and
    # second moments too, each pair at its largest order), column ch < C the
    # values', column C the weights', each row's left-out key subtracted. A box
    # with a local expansion (QLocal > 0) evaluates it; one without evaluates
    # each node's Hermite series. Returns (b, the flat rows, kept, whether the
    # box expands anything, S, F1, F2, Sec).
    item, b, row, kept, chans, chan_kept, inv, x1, x2, left_out = _target_block(
        Q, Skip, Delta, n, C=C, D=D, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, HAS_SKIP=HAS_SKIP
    )
    box = tl.load(BoxOfBlock + item)
    first = tl.load(RowPtr + box)
    last = tl.load(RowPtr + box + 1)
    S = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float64)
    F1 = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float64)
    F2 = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float64)
    Sec = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float64)
    p_local = tl.load(QLocal + box).to(tl.int32)
    if p_local > 0:
        l_at = tl.load(LOffset + box) + chans * (p_local * p_local if D == 2 else p_local)
        tau1, tau2 = _offsets(x1, x2, QCentre, box, inv, D=D)
        S, F1, F2, Sec = _local_series(
            S, F1, F2, Sec, Coef, l_at, p_local, tau1, tau2, chan_kept, D=D, SLOPES=GRAD
        )
    for pair in range(first, last):
        u = tl.load(RowPairs + 4 * pair)
        p = tl.load(RowPairs + 4 * pair + 1).to(tl.int32)
        if GRAD:
            p = tl.maximum(p, tl.load(RowPairs + 4 * pair + 2).to(tl.int32))
            p = tl.maximum(p, tl.load(RowPairs + 4 * pair + 3).to(tl.int32))
        p = tl.where(p_local > 0, 0, p)  # the local expansion holds this node's sum
        p_node = tl.load(MOrder + u).to(tl.int32)
        at = tl.load(MOffset + u) + chans * (p_node * p_node if D == 2 else p_node)
        t1, t2 = _offsets(x1, x2, KCentre, u, inv, D=D)
        S, F1, F2, Sec = _series(
            S, F1, F2, Sec, Moments, at, p_node, p, t1, t2, chan_kept,
            D=D, FIRST=GRAD, SECOND=GRAD,
        )  # fmt: skip
        if HAS_SKIP:
            # the row's own key, if this node holds it, leaves the expansion exactly
            first_key = tl.load(KNode + 3 * u + 1)
            end_key = tl.load(KNode + 3 * u + 2)
            inside = kept & (left_out >= first_key) & (left_out < end_key)
            j = b.to(tl.int64) * m + tl.where(inside, left_out, 0)
            S, F1, F2, Sec = _subtract_source(
                S, F1, F2, Sec, inside, x1, x2, K, j, V, C, chans, inv,
                D=D, FIRST=GRAD, SECOND=GRAD,
            )  # fmt: skip
    # rows whose box expands something (as a tensor: a scalar mask term is
    # not a mask the interpreter takes)
    folded = kept & ((row * 0 + (last - first)) > 0)
    return b, row, kept, folded, S, F1, F2, Sec


@triton.jit
def _column_of(T, chans, C: tl.constexpr):
    # column C of a (targets, channels) tile
    return tl.sum(tl.where(chans[None, :] == C, T, 0.0), axis=1)


@triton.jit
def _weighted(T, u, z, chans, C: tl.constexpr):
    # per target: u . T[:, :C] - z T[:, C] (u zero from column C on)
    return tl.sum(u * T, axis=1) - z * _column_of(T, chans, C)


@triton.jit
def _fgt_fold_kernel(
    Q, K, V, Out, Lse, Skip, BoxOfBlock, RowPtr, RowPairs, KNode, KCentre, Delta, Moments,
    MOffset, MOrder, QCentre, QLocal, LOffset, Coef, n, m,
    D: tl.constexpr, C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    HAS_SKIP: tl.constexpr,
):  # fmt: skip
    # The forward: a query block's expanded sums (``_row_sums``) folded into
    # Out (B, n, C) and Lse (B, n).
    b, row, kept, folded, S, F1, F2, Sec = _row_sums(
        Q, K, V, Skip, BoxOfBlock, RowPtr, RowPairs, KNode, KCentre, Delta, Moments, MOffset,
        MOrder, QCentre, QLocal, LOffset, Coef, n, m,
        D=D, C=C, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, HAS_SKIP=HAS_SKIP, GRAD=False,
    )  # fmt: skip
    chans = tl.arange(0, BLOCK_C)
    lse = tl.load(Lse + row, mask=kept, other=0.0)
    direct = tl.exp(lse)
    total = direct + _column_of(S, chans, C)
    out_mask = folded[:, None] & (chans[None, :] < C)
    out_at = row[:, None] * C + chans[None, :]
    out = tl.load(Out + out_at, mask=out_mask, other=0.0).to(tl.float64)
    weighted = tl.where(direct[:, None] > 0.0, out * direct[:, None], 0.0) + S
    tl.store(Out + out_at, (weighted / total[:, None]).to(Out.dtype.element_ty), mask=out_mask)
    tl.store(Lse + row, tl.log(total), mask=folded)


@triton.jit
def _fgt_rows_kernel(
    Q, K, V, G, Out, Lse, Shift, Skip, BoxOfBlock, RowPtr, RowPairs, KNode, KCentre, Delta,
    Wd, Moments, MOffset, MOrder, QCentre, QLocal, LOffset, Coef, DQ, DWRows, n, m,
    D: tl.constexpr, C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    HAS_SKIP: tl.constexpr,
):  # fmt: skip
    # The backward's row side: with a query block's sums of values and 1 and
    # their moments, sum_j t_ij X_j = e^-lse_i (g_i . sum_j v_j X_j - delta_i
    # sum_j X_j) for X the weight, the first and the second moments, delta_i =
    # g_i . y_i; DQ[b, i] = -w delta (first moments), DWRows[b, i] = -1/2
    # (delta^2 second - r_i weight), r_i the distance shift. Rows whose box
    # expands nothing keep their zeros (their e^-lse may be inf).
    b, row, kept, folded, S, F1, F2, Sec = _row_sums(
        Q, K, V, Skip, BoxOfBlock, RowPtr, RowPairs, KNode, KCentre, Delta, Moments, MOffset,
        MOrder, QCentre, QLocal, LOffset, Coef, n, m,
        D=D, C=C, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, HAS_SKIP=HAS_SKIP, GRAD=True,
    )  # fmt: skip
    chans = tl.arange(0, BLOCK_C)
    mine = folded[:, None] & (chans[None, :] < C)
    at = row[:, None] * C + chans[None, :]
    g = tl.load(G + at, mask=mine, other=0.0).to(tl.float64)
    y = tl.load(Out + at, mask=mine, other=0.0).to(tl.float64)
    delta_i = tl.sum(g * y, axis=1)
    inv_s = tl.exp(-tl.load(Lse + row, mask=folded, other=0.0))
    t0 = inv_s * _weighted(S, g, delta_i, chans, C)
    t1 = inv_s * _weighted(F1, g, delta_i, chans, C)
    t_sec = inv_s * _weighted(Sec, g, delta_i, chans, C)
    wd = tl.load(Wd + b)
    scale = tl.load(Delta + b)
    tl.store(DQ + row * D, -wd * t1, mask=folded)
    if D == 2:
        t2 = inv_s * _weighted(F2, g, delta_i, chans, C)
        tl.store(DQ + row * D + 1, -wd * t2, mask=folded)
    shift = tl.load(Shift + row, mask=folded, other=0.0)
    tl.store(DWRows + row, -0.5 * (scale * scale * t_sec - shift * t0), mask=folded)


@triton.jit
def _fgt_columns_kernel(
    K, Q, V, Wts, SkippedBy, BlockPtr, BlockNodes, ColPtr, ColPairs, QBox, QCentre, Delta, Wd,
    Moments, MOffset, MOrder, DK, DV, n, m,
    D: tl.constexpr, C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    HAS_SKIP: tl.constexpr,
):  # fmt: skip
    # The backward's column side, key block program_id(0) (batch b, keys [j0,
    # j0 + BLOCK_R)): the value and first-moment sums of the expansions of the
    # query boxes that expanded a node holding the block (each key's left-out
    # query subtracted), weighted by u_i = g_i e^-lse_i (channels < C) and z_i
    # = delta_i e^-lse_i (channel C) (Wts (B, n, C + 1)): DV[b, j] = sum_i u_i
    # e_ij and DK[b, j] = -w delta (v_j . sum_i u_i (t - s_i) e_ij - sum_i z_i
    # (t - s_i) e_ij).
    item, b, key, kept, chans, chan_kept, inv, y1, y2, left_out = _target_block(
        K, SkippedBy, Delta, m, C=C, D=D, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, HAS_SKIP=HAS_SKIP
    )
    S = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float64)
    F1 = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float64)
    F2 = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float64)
    for slot in range(tl.load(BlockPtr + item), tl.load(BlockPtr + item + 1)):
        node = tl.load(BlockNodes + slot)
        for pair in range(tl.load(ColPtr + node), tl.load(ColPtr + node + 1)):
            x = tl.load(ColPairs + 3 * pair)
            p = tl.load(ColPairs + 3 * pair + 1).to(tl.int32)
            p = tl.maximum(p, tl.load(ColPairs + 3 * pair + 2).to(tl.int32))
            p_box = tl.load(MOrder + x).to(tl.int32)
            at = tl.load(MOffset + x) + chans * (p_box * p_box if D == 2 else p_box)
            t1, t2 = _offsets(y1, y2, QCentre, x, inv, D=D)
            S, F1, F2, _ = _series(
                S, F1, F2, S, Moments, at, p_box, p, t1, t2, chan_kept,
                D=D, FIRST=True, SECOND=False,
            )  # fmt: skip
            if HAS_SKIP:
                first_row = tl.load(QBox + 3 * x + 1)
                end_row = tl.load(QBox + 3 * x + 2)
                inside = kept & (left_out >= first_row) & (left_out < end_row)
                i = b.to(tl.int64) * n + tl.where(inside, left_out, 0)
                S, F1, F2, _ = _subtract_source(
                    S, F1, F2, S, inside, y1, y2, Q, i, Wts, C + 1, chans, inv,
                    D=D, FIRST=True, SECOND=False,
                )  # fmt: skip
    mine = kept[:, None] & (chans[None, :] < C)
    at = key[:, None] * C + chans[None, :]
    tl.store(DV + at, S, mask=mine)
    v = tl.load(V + at, mask=mine, other=0.0).to(tl.float64)
    wd = tl.load(Wd + b)
    tl.store(DK + key * D, -wd * _weighted(F1, v, 1.0, chans, C), mask=kept)
    if D == 2:
        tl.store(DK + key * D + 1, -wd * _weighted(F2, v, 1.0, chans, C), mask=kept)


def _device(array, device):
    return torch.from_numpy(np.ascontiguousarray(array)).to(device)


def _on_device(expansions, device):
    """The plan's expansions (``far.Far``): its arrays on the device, by name."""
    return SimpleNamespace(
        **{
            name: _device(value, device)
            for name, value in expansions._asdict().items()
            if isinstance(value, np.ndarray)
        }
    )


def _log_factorials(d, device):
    top = max(far.MAX_ORDER[d], far.MAX_LOCAL[d])
    values = [math.lgamma(i + 1.0) for i in range(2 * top)]
    return torch.tensor(values, dtype=torch.float64, device=device)


def _moments(points, weights, nodes, centre, delta, order, channels, log_fact):
    """Hermite moments (``_fgt_moments_kernel``) of the nodes (N, 3) (key nodes
    or query boxes) about their centres, to order[u] (numpy) per axis, of the
    weights' channels (B, n_pts, C) and, where channels > C, a channel of
    ones: (moments, offsets, orders), on the device."""
    d = points.shape[2]
    offset, total = numba_fgt._moment_layout(order, channels, d)
    moments = torch.empty(max(total, 1), dtype=torch.float64, device=points.device)
    offset, order = _device(offset, points.device), _device(order, points.device)
    # one tile width per d, for every order the planner may choose: one compile
    terms = triton.next_power_of_2(far.MAX_ORDER[d] ** d)
    _fgt_moments_kernel[(len(order), channels)](
        points, weights, nodes, centre, delta, order, offset, log_fact, moments, points.shape[1],
        D=d, C=weights.shape[2], BLOCK_K=MOMENT_KEYS[d], BLOCK_T=terms,
    )  # fmt: skip
    return moments, offset, order


def _key_series(expansions, arrays, k, v, largest, log_fact):
    """The key nodes' moments of the values and 1, each to the largest order
    its pairs ask for (of the values, or of any of their derivatives where
    ``largest``), and the boxes' local expansions built from them: (moments,
    offsets, orders) and (coefficients, offsets)."""
    d, c = k.shape[2], v.shape[2]
    order = numba_fgt.key_orders(expansions, largest)
    moments = _moments(k, v, arrays.k_node, arrays.k_centre, arrays.delta, order, c + 1, log_fact)
    l_offset, l_total = numba_fgt._moment_layout(expansions.q_local, c + 1, d)
    coef = torch.empty(max(l_total, 1), dtype=torch.float64, device=k.device)
    l_offset = _device(l_offset, k.device)
    if l_total:
        _fgt_locals_kernel[(len(expansions.q_local), c + 1)](
            arrays.q_box, arrays.q_centre, arrays.q_local, arrays.row_ptr, arrays.row_pairs,
            arrays.k_centre, arrays.delta, *moments, log_fact, l_offset, coef,
            D=d, BLOCK_N=triton.next_power_of_2(far.MAX_ORDER[d]),
            BLOCK_L=triton.next_power_of_2(far.MAX_LOCAL[d]), LARGEST=largest,
        )  # fmt: skip
    return moments, (coef, l_offset)


def forward(plan, q, k, v, skip, has_skip, out, lse):
    """Fold the plan's expansions into the direct pass's out (B, n, c) and lse
    (B, n) float64, in place; every tensor on the device, in the plan's order.
    skip (B, n) int64: the key each row leaves out (``has_skip``)."""
    expansions = plan.far
    n, d = q.shape[1:]
    c = v.shape[2]
    arrays = _on_device(expansions, q.device)
    moments, (coef, l_offset) = _key_series(
        expansions, arrays, k, v, False, _log_factorials(d, q.device)
    )
    _fgt_fold_kernel[(len(expansions.box_of_block),)](
        q, k, v, out, lse, skip, arrays.box_of_block, arrays.row_ptr, arrays.row_pairs,
        arrays.k_node, arrays.k_centre, arrays.delta, *moments, arrays.q_centre, arrays.q_local,
        l_offset, coef, n, k.shape[1],
        D=d, C=c, BLOCK_R=plan.q_block, BLOCK_C=triton.next_power_of_2(c + 1),
        HAS_SKIP=has_skip,
    )  # fmt: skip


def backward_shares(plan, needs, q, g, k, v, w, out, lse, shift, skip, skipped_by, has_skip):
    """The expanded pairs' shares of (dq, dk, dv, dw), float64 on the device
    (dw (B,) for the shared w), or Nones where the plan expands nothing or the
    gradient is not needed; what ``numba_fgt.backward_shares`` computes. In
    the plan's order: q (B, n, d), g and out (B, n, c), k (B, m, d), v (B, m,
    c), w (B, 1), lse and the distance shift (B, n); skip (B, n) and
    skipped_by (B, m) int64, the key each row leaves out and the row that
    leaves each key out (``has_skip``)."""
    if plan.far is None:
        return None, None, None, None
    need_q, need_k, need_v, need_w = needs
    expansions = plan.far
    B, n, d = q.shape
    m, c = k.shape[1], v.shape[2]
    device = q.device
    arrays = _on_device(expansions, device)
    log_fact = _log_factorials(d, device)
    wd = w.detach().double()[:, 0] * arrays.delta  # w delta (B,)
    f64 = dict(dtype=torch.float64, device=device)
    block_c = triton.next_power_of_2(c + 1)
    dq = dk = dv = dw = None
    if need_q or need_w:
        moments, (coef, l_offset) = _key_series(expansions, arrays, k, v, True, log_fact)
        dq = torch.zeros((B, n, d), **f64)
        dw_rows = torch.zeros((B, n), **f64)
        _fgt_rows_kernel[(len(expansions.box_of_block),)](
            q, k, v, g.contiguous(), out.contiguous(), lse, shift.double().contiguous(), skip,
            arrays.box_of_block, arrays.row_ptr, arrays.row_pairs, arrays.k_node,
            arrays.k_centre, arrays.delta, wd, *moments, arrays.q_centre, arrays.q_local,
            l_offset, coef, dq, dw_rows, n, m,
            D=d, C=c, BLOCK_R=plan.q_block, BLOCK_C=block_c, HAS_SKIP=has_skip,
        )  # fmt: skip
        dw = dw_rows.sum(1)
    if need_k or need_v:
        # the queries' weights: u_i = g_i e^-lse_i per channel and z_i = delta_i
        # e^-lse_i (inf for far rows, whose boxes expand nothing)
        inv_s = torch.exp(-lse)[..., None]
        g64 = g.double()
        delta_i = (g64 * out.double()).sum(-1, keepdim=True)
        weights = torch.cat([g64 * inv_s, delta_i * inv_s], dim=2).contiguous()
        order = numba_fgt.query_orders(expansions)
        moments = _moments(
            q, weights, arrays.q_box, arrays.q_centre, arrays.delta, order, c + 1, log_fact
        )
        dk = torch.zeros((B, m, d), **f64)
        dv = torch.zeros((B, m, c), **f64)
        _fgt_columns_kernel[(len(expansions.block_ptr) - 1,)](
            k, q, v, weights, skipped_by, arrays.block_ptr, arrays.block_nodes, arrays.col_ptr,
            arrays.col_pairs, arrays.q_box, arrays.q_centre, arrays.delta, wd, *moments, dk, dv,
            n, m,
            D=d, C=c, BLOCK_R=plan.k_block, BLOCK_C=block_c, HAS_SKIP=has_skip,
        )  # fmt: skip
    return (
        dq if need_q else None,
        dk if need_k else None,
        dv if need_v else None,
        dw if need_w else None,
    )
