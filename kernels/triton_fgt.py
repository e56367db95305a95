"""Triton kernels for a plan's far fields (``kernels.far``): the forward's half
of the fast Gauss transform on the GPU.

The plan is the CPU planner's (``far.plan``) and so are its orders and bound;
this file computes what ``numba_fgt.forward`` computes, in float64:

- ``_fgt_moments_kernel``: one program per (expanded key node, channel) sums the
  Hermite moments A[n_1, ..., n_d] = sum_j w_j prod_f s_jf^n_f / n_f! of the
  node's keys, s_j = (k_j - centre) / delta, for the values' channels and a
  channel of ones. A term is exp(n log|s| - log n!) with its sign: no
  recurrence across orders, so every order of a chunk of keys is one tile.
- ``_fgt_fold_kernel``: one program per query block evaluates the Hermite series
  of every node its box expands at its rows (h_0 = exp(-t^2), h_1 = 2 t h_0,
  h_{n+1} = 2 t h_n - 2 n h_{n-1}), subtracts each row's left-out key exactly,
  and folds the sums into the direct pass's out and lse: sum = exp(lse) +
  expanded, out = (out exp(lse) + expanded values) / sum, lse = log(sum).

A box whose plan has a local (Taylor) expansion evaluates each node's Hermite
series instead: the local expansion only adds truncation error, so the bound
the planner proved for the Hermite series holds. The backward's far shares
come from ``numba_fgt`` on the host, the tangent computes the expanded pairs
directly (``far.as_direct``), as on the CPU.
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
def _fgt_fold_kernel(
    Q, K, V, Out, Lse, Skip, BoxOfBlock, RowPtr, RowPairs, KNode, KCentre, Delta, Moments,
    MOffset, MOrder, n, m,
    D: tl.constexpr, C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    HAS_SKIP: tl.constexpr,
):  # fmt: skip
    # Query block ``item`` (batch b, rows [i0, i0 + BLOCK_R)): the sums of the
    # nodes its box expands, column ch < C the values', column C the weights',
    # folded into Out (B, n, C) and Lse (B, n).
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
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float64)
    for pair in range(first, last):
        u = tl.load(RowPairs + 4 * pair)
        p = tl.load(RowPairs + 4 * pair + 1).to(tl.int32)
        p_node = tl.load(MOrder + u).to(tl.int32)
        size = p_node * p_node if D == 2 else p_node
        at = tl.load(MOffset + u) + chans * size
        chan_kept = chans < C + 1
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
    top = far.MAX_ORDER[d]
    log_fact = torch.tensor([math.lgamma(i + 1.0) for i in range(top + 1)], dtype=torch.float64)
    nodes, delta = _device(expansions.k_node, device), _device(expansions.delta, device)
    # one tile width per d, for every order the planner may choose: one compile
    terms = triton.next_power_of_2(far.MAX_ORDER[d] ** d)
    _fgt_moments_kernel[(len(order), c + 1)](
        k, v, nodes, _device(expansions.k_centre, device), delta, _device(order, device),
        _device(offset, device), log_fact.to(device), moments, k.shape[1],
        D=d, C=c, BLOCK_K=MOMENT_KEYS[d], BLOCK_T=terms,
    )  # fmt: skip
    _fgt_fold_kernel[(len(expansions.box_of_block),)](
        q, k, v, out, lse, skip, _device(expansions.box_of_block, device),
        _device(expansions.row_ptr, device), _device(expansions.row_pairs, device), nodes,
        _device(expansions.k_centre, device), delta, moments, _device(offset, device),
        _device(order, device), n, k.shape[1],
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
