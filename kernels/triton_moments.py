"""Triton kernels for the local-linear moments (GPU backend).

The same contract as ``numba_moments`` (read its docstring for the math and the
layout): ``forward(query (n, d), key (m, d), value (m, c), w (d,), diagonal,
tolerance) -> (moments (n, P) float64, lse (n,) float64, plan)`` and
``backward(grad, query, key, value, w, lse, second, tbar, diagonal, plan) -> (n, d)
float64``, on tensors of one device and dtype. These kernels compute every pair
(the plan is the dense one, empty) and leave out key i of row i (diagonal 0) or
none (None).

A program owns BLOCK_N queries (tile dim 1) and streams the keys in tiles of
BLOCK_M (dim 0), as ``triton_nw`` does: each thread owns whole query columns, so
the sums over keys stay inside a thread. The forward is an online softmax (running
max, rescale, running sum) whose accumulator holds the P moments of every owned
query, (BLOCK_P, BLOCK_N); the tile's sums are in the compute dtype (float32 for
float32 and half inputs) and the running sums in float64. Scores are in log2
units for float32 (one ``exp2`` per pair) and natural units for float64 (a float
literal for log2(e) would be rounded to float32); the host converts the lse.
A removed or padded key enters as exact zeros (its u and v are replaced, not only
its weight), so a NaN there reaches no sum.

A score is a chain of explicit ``tl.fma``, one a feature, so it is rounded once
at the end in the GPU's arithmetic as in the interpreter's (a GPU would fuse a
product and a following difference by itself, the interpreter does not): the
row maximum subtracted from the top key's score leaves exactly 0 however large
the score (a query far from every key, ~1e13), and the backward, which builds
the scores in the same way, recomputes the forward's. It recomputes the weights
as ``(s - high) - low`` with the lse split into a (high, low) pair, or, for rows
whose |lse| passes ``EXACT_SHIFT_ABOVE`` (a float64 lse cannot hold their
shift), with the forward's own maximum and log-sum; ``_moments_shift_kernel``
makes both.

Checked under ``TRITON_INTERPRET=1`` against the float64 reference; the block
sizes for a GPU are a first choice, not yet tuned on hardware.
"""

import os

import torch
import triton
import triton.language as tl

from . import EXACT_SHIFT_ABOVE, accumulator_dtype

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# (owned queries, streamed keys) per program; the interpreter's cost is per
# block step, so it takes one large tile.
GPU_BLOCKS = {"BLOCK_N": 128, "BLOCK_M": 16, "num_warps": 4}
INTERPRET_BLOCKS = {"BLOCK_N": 128, "BLOCK_M": 256}


@triton.jit
def _place_row(acc, row, k, BLOCK: tl.constexpr):
    # acc[k, :] += row without dynamic indexing into registers.
    offs = tl.arange(0, BLOCK)
    return acc + tl.where(offs[:, None] == k, row[None, :], 0.0)


@triton.jit
def _offset(k_ptr, q_ptr, k_rows, q_rows, keep, f, D: tl.constexpr, ACC: tl.constexpr):
    # u = k_j - q_i for feature f as a (keys, queries) tile, 0 where the pair is dropped.
    kf = tl.load(k_ptr + k_rows * D + f).to(ACC)
    qf = tl.load(q_ptr + q_rows * D + f).to(ACC)
    return tl.where(keep, kf[:, None] - qf[None, :], 0.0)


@triton.jit
def _tile(Q, K, C2, q_rows, offs_n, start_m, m, EXCLUDE_SELF: tl.constexpr, D: tl.constexpr,
          ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):  # fmt: skip
    # Key rows of the tile (clamped for the ragged tail), the pairs that take
    # part, and their scores (-inf for the others).
    offs_m = start_m + tl.arange(0, BLOCK_M)
    k_rows = tl.minimum(offs_m, m - 1).to(tl.int64)
    keep = (offs_m < m)[:, None] & (offs_n[None, :] >= 0)
    if EXCLUDE_SELF:
        keep = keep & (offs_m[:, None] != offs_n[None, :])
    s = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for f in tl.static_range(D):
        u = _offset(K, Q, k_rows, q_rows, keep, f, D, ACC)
        s = tl.fma(tl.load(C2 + f).to(ACC), u * u, s)
    return k_rows, keep, tl.where(keep, s, float("-inf"))


@triton.jit
def _exp(x, USE_EXP2: tl.constexpr):
    if USE_EXP2:
        y = tl.exp2(x)
    else:
        y = tl.exp(x)
    return y


@triton.jit
def _moments_sums(
    Q, K, V, C2, q_rows, offs_n, m, active,
    EXCLUDE_SELF: tl.constexpr, D: tl.constexpr, C: tl.constexpr, P: tl.constexpr,
    ACC: tl.constexpr, USE_EXP2: tl.constexpr, MOMENTS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    # The online softmax of the owned queries: their maximum score m_i, sum of
    # weights l_i and (if MOMENTS) weighted moments acc; no keys where not
    # ``active``.
    m_i = tl.full([BLOCK_N], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_N], tl.float64)
    acc = tl.zeros([BLOCK_P, BLOCK_N], tl.float64)
    for start_m in range(0, tl.where(active, m, 0), BLOCK_M):
        k_rows, keep, s = _tile(Q, K, C2, q_rows, offs_n, start_m, m, EXCLUDE_SELF, D, ACC,
                                BLOCK_N, BLOCK_M)  # fmt: skip
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        # While every score is -inf subtract 0: (-inf) - (-inf) would be NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = _exp(m_i - m_safe, USE_EXP2).to(tl.float64)
        p = _exp(s - m_safe[None, :], USE_EXP2)
        l_i = l_i * alpha + tl.sum(p, axis=0).to(tl.float64)
        if MOMENTS:
            acc = acc * alpha[None, :]
            for f in tl.static_range(D):
                uf = _offset(K, Q, k_rows, q_rows, keep, f, D, ACC)
                pu = p * uf
                acc = _place_row(acc, tl.sum(pu, axis=0).to(tl.float64), f, BLOCK_P)
                for g in tl.static_range(f, D):
                    ug = _offset(K, Q, k_rows, q_rows, keep, g, D, ACC)
                    k2 = D + f * D - f * (f - 1) // 2 + (g - f)
                    acc = _place_row(acc, tl.sum(pu * ug, axis=0).to(tl.float64), k2, BLOCK_P)
                for ch in tl.static_range(C):
                    vc = tl.where(keep, tl.load(V + k_rows * C + ch).to(ACC)[:, None], 0.0)
                    kv = P - D * C + f * C + ch
                    acc = _place_row(acc, tl.sum(pu * vc, axis=0).to(tl.float64), kv, BLOCK_P)
            for ch in tl.static_range(C):
                vc = tl.where(keep, tl.load(V + k_rows * C + ch).to(ACC)[:, None], 0.0)
                k1 = P - D * C - C + ch
                acc = _place_row(acc, tl.sum(p * vc, axis=0).to(tl.float64), k1, BLOCK_P)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _log(x, USE_EXP2: tl.constexpr):
    if USE_EXP2:
        y = tl.log2(x)
    else:
        y = tl.log(x)
    return y


@triton.jit
def _moments_fwd_kernel(
    Q, K, V, C2, Mom, Lse, n, m,
    EXCLUDE_SELF: tl.constexpr, D: tl.constexpr, C: tl.constexpr, P: tl.constexpr,
    ACC: tl.constexpr, USE_EXP2: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    q_rows = tl.minimum(offs_n, n - 1).to(tl.int64)  # padded rows are never stored
    m_i, l_i, acc = _moments_sums(
        Q, K, V, C2, q_rows, offs_n, m, True, EXCLUDE_SELF, D, C, P, ACC, USE_EXP2, True,
        BLOCK_P, BLOCK_N, BLOCK_M,
    )  # fmt: skip
    rows = offs_n.to(tl.int64)
    offs_p = tl.arange(0, BLOCK_P)
    tl.store(
        Mom + rows[None, :] * P + offs_p[:, None],
        acc / l_i[None, :],
        mask=(offs_p[:, None] < P) & (offs_n < n)[None, :],
    )
    # In the scores' units (log2 for float32); the host converts.
    tl.store(Lse + rows, m_i.to(tl.float64) + _log(l_i, USE_EXP2), mask=offs_n < n)


@triton.jit
def _moments_shift_kernel(
    Q, K, C2, Lse, Lh, Ll, n, m,
    EXCLUDE_SELF: tl.constexpr, D: tl.constexpr, ACC: tl.constexpr, USE_EXP2: tl.constexpr,
    SCALE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    EXACT_ABOVE: tl.constexpr,
):  # fmt: skip
    # The backward's shift (Lh, Ll) in the scores' units: the lse (natural
    # log) split in two, or, for the rows whose |lse| passes EXACT_ABOVE, the
    # forward's own, Lh = its maximum score and Ll = log(its sum of weights),
    # recomputed as the forward computes them.
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    q_rows = tl.minimum(offs_n, n - 1).to(tl.int64)
    lse = tl.load(Lse + q_rows)
    far = (offs_n < n) & (tl.abs(lse) > EXACT_ABOVE)
    active = tl.max(far.to(tl.int32), axis=0) > 0
    m_i, l_i, _ = _moments_sums(
        Q, K, K, C2, q_rows, offs_n, m, active, EXCLUDE_SELF, D, 1, 1, ACC, USE_EXP2, False,
        1, BLOCK_N, BLOCK_M,
    )  # fmt: skip
    high = (lse * SCALE).to(ACC)
    low = (lse * SCALE - high.to(tl.float64)).to(ACC)
    log_sum = _log(tl.where(far, l_i, 1.0), USE_EXP2).to(ACC)
    tl.store(Lh + q_rows, tl.where(far, m_i, high), mask=offs_n < n)
    tl.store(Ll + q_rows, tl.where(far, log_sum, low), mask=offs_n < n)


@triton.jit
def _moments_bwd_kernel(
    Q, K, V, C2, G, Tbar, R, Lh, Ll, GradW, n, m,
    EXCLUDE_SELF: tl.constexpr, D: tl.constexpr, C: tl.constexpr, P: tl.constexpr,
    ACC: tl.constexpr, USE_EXP2: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    # grad_w[i, f] = -1/2 sum_j p_ij (u_ijf^2 - r_if) (G_i . phi_ij - tbar_i)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    q_rows = tl.minimum(offs_n, n - 1).to(tl.int64)
    lse_high = tl.load(Lh + q_rows).to(ACC)
    lse_low = tl.load(Ll + q_rows).to(ACC)
    tbar = tl.load(Tbar + q_rows).to(ACC)
    acc = tl.zeros([BLOCK_D, BLOCK_N], tl.float64)
    for start_m in range(0, m, BLOCK_M):
        k_rows, keep, s = _tile(Q, K, C2, q_rows, offs_n, start_m, m, EXCLUDE_SELF, D, ACC,
                                BLOCK_N, BLOCK_M)  # fmt: skip
        p = _exp((s - lse_high[None, :]) - lse_low[None, :], USE_EXP2)
        t = tl.zeros([BLOCK_M, BLOCK_N], ACC) - tbar[None, :]
        for f in tl.static_range(D):
            uf = _offset(K, Q, k_rows, q_rows, keep, f, D, ACC)
            t += tl.load(G + q_rows * P + f).to(ACC)[None, :] * uf
            for g in tl.static_range(f, D):
                ug = _offset(K, Q, k_rows, q_rows, keep, g, D, ACC)
                k2 = D + f * D - f * (f - 1) // 2 + (g - f)
                t += tl.load(G + q_rows * P + k2).to(ACC)[None, :] * (uf * ug)
            for ch in tl.static_range(C):
                vc = tl.where(keep, tl.load(V + k_rows * C + ch).to(ACC)[:, None], 0.0)
                kv = P - D * C + f * C + ch
                t += tl.load(G + q_rows * P + kv).to(ACC)[None, :] * (uf * vc)
        for ch in tl.static_range(C):
            vc = tl.where(keep, tl.load(V + k_rows * C + ch).to(ACC)[:, None], 0.0)
            k1 = P - D * C - C + ch
            t += tl.load(G + q_rows * P + k1).to(ACC)[None, :] * vc
        t = tl.where(keep, p * t, 0.0)
        for f in tl.static_range(D):
            uf = _offset(K, Q, k_rows, q_rows, keep, f, D, ACC)
            rf = tl.load(R + q_rows * D + f).to(ACC)
            part = tl.sum(t * (uf * uf - rf[None, :]), axis=0).to(tl.float64)
            acc = _place_row(acc, part, f, BLOCK_D)

    rows = offs_n.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    tl.store(
        GradW + rows[None, :] * D + offs_d[:, None],
        -0.5 * acc,
        mask=(offs_d[:, None] < D) & (offs_n < n)[None, :],
    )


# ---------------------------------------------------------------------------
# Launch helpers
# ---------------------------------------------------------------------------


def _blocks(dtype):
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return INTERPRET_BLOCKS
    if dtype == torch.float64:
        # Two registers an element: half the streamed extent, or d = 3 spills.
        return {**GPU_BLOCKS, "BLOCK_M": GPU_BLOCKS["BLOCK_M"] // 2}
    return GPU_BLOCKS


def _meta(dtype):
    is64 = dtype == torch.float64
    return {"ACC": tl.float64 if is64 else tl.float32, "USE_EXP2": not is64}


def _scale(dtype):
    """Scores' units per natural unit: log2(e) where the kernel uses exp2."""
    return 1.0 if dtype == torch.float64 else LOG2E


def _c2(w, dtype):
    """c2_f = -(w_f / 2) in the scores' units, in float64 rounded once."""
    acc = accumulator_dtype(dtype)
    return (w.double() * (-0.5 * _scale(dtype))).to(acc).contiguous()


def _exclude_self(diagonal):
    if diagonal not in (None, 0):
        raise ValueError(f"the Triton moments kernels take diagonal None or 0, got {diagonal}")
    return diagonal == 0


def forward(query, key, value, w, diagonal, tolerance=0.0):
    n, d = query.shape
    m, c = value.shape
    size = d + d * (d + 1) // 2 + c + d * c
    moments = torch.empty((n, size), dtype=torch.float64, device=query.device)
    lse = torch.empty(n, dtype=torch.float64, device=query.device)
    blocks = _blocks(query.dtype)
    _moments_fwd_kernel[(triton.cdiv(n, blocks["BLOCK_N"]),)](
        query, key, value, _c2(w, query.dtype), moments, lse, n, m,
        _exclude_self(diagonal), d, c, size, **_meta(query.dtype),
        BLOCK_P=triton.next_power_of_2(size), **blocks,
    )  # fmt: skip
    return moments, lse / _scale(query.dtype), torch.zeros(0, dtype=torch.int64)


def backward(grad, query, key, value, w, lse, second, tbar, diagonal, packed=None):
    n, d = query.shape
    m, c = value.shape
    acc = accumulator_dtype(query.dtype)
    c2 = _c2(w, query.dtype)
    blocks = _blocks(query.dtype)
    grid = (triton.cdiv(n, blocks["BLOCK_N"]),)
    # The weights 2**((s - high) - low).
    high, low = (torch.empty(n, dtype=acc, device=query.device) for _ in range(2))
    _moments_shift_kernel[grid](
        query, key, c2, lse.contiguous(), high, low, n, m, _exclude_self(diagonal), d,
        **_meta(query.dtype), SCALE=_scale(query.dtype),
        EXACT_ABOVE=EXACT_SHIFT_ABOVE[acc] * LN2, **blocks,
    )  # fmt: skip
    grad_w = torch.empty((n, d), dtype=torch.float64, device=query.device)
    _moments_bwd_kernel[grid](
        query, key, value, c2, grad.to(acc).contiguous(), tbar.to(acc), second.to(acc),
        high, low, grad_w, n, m, _exclude_self(diagonal), d, c, grad.shape[1],
        **_meta(query.dtype), BLOCK_D=triton.next_power_of_2(d), **blocks,
    )  # fmt: skip
    return grad_w
