"""Triton kernels for the local-linear moments (GPU backend).

The same contract as ``numba_moments`` (read its docstring for the math and the
layout): ``forward(query (n, d), key (m, d), value (m, c), w (d,), exclude_self)
-> (moments (n, P) float64, lse (n,) float64)`` and ``backward(grad, query, key,
value, w, lse, second, tbar, exclude_self) -> (n, d) float64``, on tensors of one
device and dtype.

A program owns BLOCK_N queries (tile dim 1) and streams the keys in tiles of
BLOCK_M (dim 0), as ``triton_nw`` does: each thread owns whole query columns, so
the sums over keys stay inside a thread. The forward is an online softmax (running
max, rescale, running sum) whose accumulator holds the P moments of every owned
query, (BLOCK_P, BLOCK_N); the tile's sums are in the compute dtype (float32 for
float32 and half inputs) and the running sums in float64. Scores are in log2
units for float32 (one ``exp2`` per pair) and natural units for float64 (a float
literal for log2(e) would be rounded to float32); the host converts the lse.
A removed or padded key enters as exact zeros (its u and v are replaced, not only
its weight), so a NaN there reaches no sum. The backward recomputes the weights
from the lse, split into a (high, low) pair by the host.

Checked under ``TRITON_INTERPRET=1`` against the float64 reference; the block
sizes for a GPU are a first choice, not yet tuned on hardware.
"""

import os

import torch
import triton
import triton.language as tl

from . import accumulator_dtype

LOG2E = 1.4426950408889634

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
        s += tl.load(C2 + f).to(ACC) * (u * u)
    return k_rows, keep, tl.where(keep, s, float("-inf"))


@triton.jit
def _exp(x, USE_EXP2: tl.constexpr):
    if USE_EXP2:
        y = tl.exp2(x)
    else:
        y = tl.exp(x)
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
    m_i = tl.full([BLOCK_N], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_N], tl.float64)
    acc = tl.zeros([BLOCK_P, BLOCK_N], tl.float64)
    for start_m in range(0, m, BLOCK_M):
        k_rows, keep, s = _tile(Q, K, C2, q_rows, offs_n, start_m, m, EXCLUDE_SELF, D, ACC,
                                BLOCK_N, BLOCK_M)  # fmt: skip
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        # While every score is -inf subtract 0: (-inf) - (-inf) would be NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = _exp(m_i - m_safe, USE_EXP2).to(tl.float64)
        p = _exp(s - m_safe[None, :], USE_EXP2)
        l_i = l_i * alpha + tl.sum(p, axis=0).to(tl.float64)
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

    rows = offs_n.to(tl.int64)
    offs_p = tl.arange(0, BLOCK_P)
    tl.store(
        Mom + rows[None, :] * P + offs_p[:, None],
        acc / l_i[None, :],
        mask=(offs_p[:, None] < P) & (offs_n < n)[None, :],
    )
    # In the scores' units (log2 for float32); the host converts.
    if USE_EXP2:
        lse = m_i.to(tl.float64) + tl.log2(l_i)
    else:
        lse = m_i + tl.log(l_i)
    tl.store(Lse + rows, lse, mask=offs_n < n)


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


def _blocks():
    return INTERPRET_BLOCKS if os.environ.get("TRITON_INTERPRET", "0") == "1" else GPU_BLOCKS


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


def forward(query, key, value, w, exclude_self):
    n, d = query.shape
    m, c = value.shape
    size = d + d * (d + 1) // 2 + c + d * c
    moments = torch.empty((n, size), dtype=torch.float64, device=query.device)
    lse = torch.empty(n, dtype=torch.float64, device=query.device)
    blocks = _blocks()
    _moments_fwd_kernel[(triton.cdiv(n, blocks["BLOCK_N"]),)](
        query, key, value, _c2(w, query.dtype), moments, lse, n, m,
        bool(exclude_self), d, c, size, **_meta(query.dtype),
        BLOCK_P=triton.next_power_of_2(size), **blocks,
    )  # fmt: skip
    return moments, lse / _scale(query.dtype)


def backward(grad, query, key, value, w, lse, second, tbar, exclude_self):
    n, d = query.shape
    m, c = value.shape
    acc = accumulator_dtype(query.dtype)
    scaled = lse * _scale(query.dtype)
    high = scaled.to(acc)
    grad_w = torch.empty((n, d), dtype=torch.float64, device=query.device)
    blocks = _blocks()
    _moments_bwd_kernel[(triton.cdiv(n, blocks["BLOCK_N"]),)](
        query, key, value, _c2(w, query.dtype), grad.to(acc).contiguous(),
        tbar.to(acc), second.to(acc), high, (scaled - high.double()).to(acc), grad_w, n, m,
        bool(exclude_self), d, c, grad.shape[1], **_meta(query.dtype),
        BLOCK_D=triton.next_power_of_2(d), **blocks,
    )  # fmt: skip
    return grad_w
