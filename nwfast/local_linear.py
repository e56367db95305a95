"""Local-linear regression on the fused Gaussian softmax: ``local_linear_pool``.

Nadaraya-Watson fits a constant to each query's neighbourhood; local-linear fits
a line (a plane in d features) by weighted least squares with the same weights
``p_ij = softmax_j(s_ij)``, ``s_ij = -(1/2) sum_f w_f (q_if - k_jf)**2``, and
returns its value at the query. The line removes Nadaraya-Watson's bias where
the data are one-sided (the ends of the data) or their density slopes.

Here ``w`` holds one weight per feature, ``w_f = 1 / h_f**2``: the diagonal of
the metric the scores measure distances in (a number is the same weight for every
feature). ``nw_pool``'s ``w`` is one per key instead, and a per-feature bandwidth
reaches it as points scaled by ``sqrt(w_f)``; the moments kernels take the
per-feature weights themselves, so that their gradient comes out of one backward
pass. The input checks are ``nwfast._checks``' and the references
``nwfast.reference``'s, as for ``nw_pool``.

Centred at the query, u_ij = k_j - q_i, the normal equations need five weighted
sums per query, which one streaming pass of the kernel computes without any n x m
matrix::

    S1 = sum_j p_ij u_ij       S2 = sum_j p_ij u_ij u_ij^T
    Sv = sum_j p_ij v_j        Suv = sum_j p_ij u_ij v_j^T

With C = S2 - S1 S1^T (the weighted covariance of the keys around their mean),
the line's slope is ``b = C^-1 (Suv - S1 Sv^T)`` and its value at the query,
the prediction, is ``Sv - S1^T b``: a (d x d) solve per query in float64.

A neighbourhood too thin for a line, where the keys that carry weight do not
span every direction (fewer than d + 1 of them in general position, or a query
so far out that the weights sit on one key), has a singular C: there the
prediction is the local-constant value ``Sv``, Nadaraya-Watson's. The test is
scale-free: C is scaled by the second moments, R = C_fg / sqrt(S2_ff S2_gg),
whose diagonal is the fraction of each feature's mean squared offset that is
spread rather than distance, and its smallest eigenvalue lam says how well the
neighbourhood poses a line. Up to THIN the prediction is ``Sv``; from FULL on it
is the line's value; between them it is ``Sv + s (line - Sv)``, s rising from 0
to 1 as a smoothstep in log lam (``line_ramp``: 2^-33 to 2^-20 for float64 inputs,
2^-14 to 2^-7 otherwise). A sharp cut would make the prediction jump wherever a
row crossed it, and with it the leave-one-out criterion the bandwidth search
minimises; the ramp keeps both continuous. Lines just above float64's rounding
are also unreliable: on tied data they swing with the last digits of the weights.

Skipping keys (``tolerance``). The moments are sums over ``nw_pool``'s weights, so
the block plan's bound carries over: the keys S a query skips hold at most
eps = sum_{j in S} p_ij <= tolerance of its softmax mass, and the fit is the
weighted least-squares line through the kept keys K, with weights p_ij / (1 - eps).
How far that moves the fit follows from two facts. The exact line a + b^T u has
residuals r_j = v_j - a - b^T u_j that satisfy sum_j p_j r_j (1, u_j) = 0 (its
normal equations), and the kept fit reproduces any line exactly: its value is
sum_{j in K} l'_j v_j with weights l'_j = p'_j (1 + gamma'^T (u_j - S1')), which sum
to 1 and give sum_j l'_j u_j = 0 (gamma' = -C'^-1 S1', primes for the kept keys'
moments). So the kept fit is a + sum_{j in K} l'_j r_j, and the normal equations
turn that sum over the kept keys into one over the skipped ones::

    fit' - fit = -1 / (1 - eps) * sum_{j in S} p_j r_j (1 + gamma'^T (u_j - S1'))

By Cauchy-Schwarz in the metric of C'^-1, |gamma'^T (u_j - S1')| <= m_q m_j, with
m_q = ||S1'|| and m_j = ||u_j - S1'|| measured in C'^-1 (Mahalanobis distances of
the query and of key j from the kept keys' weighted mean, in their weighted
covariance). Hence, per query,

    |fit' - fit| <= eps / (1 - eps) * max_{j in S} |r_j| (1 + m_q m_j).

This is where the local design's conditioning enters: a query near the middle of
its neighbourhood (m_q ~ 0) moves as little as a Nadaraya-Watson value, while at
the edge of the data, or where the kept keys barely span a direction (C' near
singular, m large), the solve amplifies the skipped mass by m_q m_j. The bound
holds for rows fitted by the full line both ways (lam >= FULL); a row on the
ramp either way mixes this bound with ``nw_pool``'s and its share moves too (a row
thin both ways takes ``nw_pool``'s bound). With one feature the Numba kernels may
also expand far key boxes rather than skip them (``moments``): those keys' moments
are approximated within the planner's bound instead of dropped, and the fit moves
by what the solve makes of that.
"""

from typing import NamedTuple

import torch
from torch import Tensor

from nwfast import ops
from nwfast._checks import prepare_local_linear, resolve_tolerance
from nwfast._moments import covariance, line_ramp, line_share, moment_layout, unpack
from nwfast.reference import local_linear_reference, moments_reference

__all__ = [
    "LocalLinearFit",
    "line_ramp",
    "local_linear_pool",
    "local_linear_reference",
    "moment_layout",
    "moments",
    "moments_reference",
    "solve_moments",
    "sum_squared_weights",
]

# --- the fused moments as a custom op ------------------------------------------------
# The ops take the canonical layout of ``prepare_local_linear`` and, as ``ops.pool``
# does, ``diagonal`` (None, or 0: query i leaves key i out) and the packed plan.


def _moments_kernel(q, k, v, w_per_feature, diagonal, tolerance, backend):
    q, k, v, w = (x.contiguous() for x in (q, k, v, w_per_feature))
    return ops.kernel_module(backend, "moments").forward(q, k, v, w, diagonal, tolerance)


_moments_op = ops.define(
    "local_linear_moments(Tensor q, Tensor k, Tensor v, Tensor w_per_feature, int? diagonal, "
    "float tolerance, str backend) -> (Tensor, Tensor, Tensor)",
    _moments_kernel,
)


@torch.library.register_fake("nwfast::local_linear_moments")
def _(q, k, v, w_per_feature, diagonal, tolerance, backend):
    size = moment_layout(q.shape[1], v.shape[1]).size
    plan_size = torch.library.get_ctx().new_dynamic_size()
    return (
        q.new_empty((q.shape[0], size), dtype=torch.float64),
        q.new_empty(q.shape[0], dtype=torch.float64),
        torch.empty(plan_size, dtype=torch.int64, device="cpu"),
    )


def _moments_backward_kernel(grad, q, k, v, w_per_feature, moments, lse, plan, diagonal, backend):
    q, k, v, w = (x.contiguous() for x in (q, k, v, w_per_feature))
    # What the kernel subtracts: each query's E[u_f^2] and grad . moments.
    second = unpack(moments, q.shape[1], v.shape[1])[1].diagonal(dim1=1, dim2=2)
    tbar = (grad * moments).sum(1)
    args = (grad.contiguous(), q, k, v, w, lse.contiguous(), second.contiguous(), tbar)
    # over the keys the forward's plan kept
    per_query = ops.kernel_module(backend, "moments").backward(*args, diagonal, plan)
    return per_query.sum(0).to(w.dtype)


_moments_backward_op = ops.define(
    "local_linear_moments_backward(Tensor grad, Tensor q, Tensor k, Tensor v, "
    "Tensor w_per_feature, Tensor moments, Tensor lse, Tensor plan, int? diagonal, "
    "str backend) -> Tensor",
    _moments_backward_kernel,
)


@torch.library.register_fake("nwfast::local_linear_moments_backward")
def _(grad, q, k, v, w_per_feature, moments, lse, plan, diagonal, backend):
    return torch.empty_like(w_per_feature)


def _setup_context(ctx, inputs, output):
    q, k, v, w, diagonal, tolerance, backend = inputs
    moments, lse, plan = output
    ctx.save_for_backward(q, k, v, w, moments, lse, plan)
    ctx.diagonal, ctx.backend = diagonal, backend
    ctx.mark_non_differentiable(lse, plan)


def _backward(ctx, grad, _grad_lse, _grad_plan):
    q, k, v, w, moments, lse, plan = ctx.saved_tensors
    grad_w = None
    if ctx.needs_input_grad[3]:
        grad_w = _moments_backward_op(
            grad.double(), q, k, v, w, moments, lse, plan, ctx.diagonal, ctx.backend
        )
    return None, None, None, grad_w, None, None, None


torch.library.register_autograd(
    "nwfast::local_linear_moments", _backward, setup_context=_setup_context
)


def moments(query, key, value, w, *, exclude_self=False, backend="auto", tolerance=None):
    """The weighted moments of every query, ``(n, P)`` float64, and its log-sum-exp.

    Shapes, ``w`` and ``tolerance`` as :func:`local_linear_pool` (the keys a query
    skips hold at most ``tolerance`` of its softmax mass, so each moment moves by
    at most ``2 * tolerance * max_j |phi_ij|``; with one feature, far keys the
    Numba kernels expand move a moment with k factors of u and b of v by at most
    ``2 * tolerance * max(max_j |phi_ij|, (sqrt(2) h)**k max_j |v_j|**b)``); the
    columns follow :func:`moment_layout`. Differentiable with respect to ``w`` (one pass more in
    the backward).
    """
    q, k, v, w, exclude_self = prepare_local_linear(query, key, value, w, exclude_self)
    tolerance = resolve_tolerance(tolerance, q.dtype)
    if backend == "torch":
        return moments_reference(q, k, v, w, exclude_self)
    backend = ops.resolve_backend(backend, q.device, q.dtype)
    if q.shape[0] == 0:
        size = moment_layout(q.shape[1], v.shape[1]).size
        return q.new_zeros((0, size), dtype=torch.float64), q.new_zeros(0, dtype=torch.float64)
    diagonal = 0 if exclude_self else None
    moments_, lse, _ = _moments_op(q, k, v, w, diagonal, tolerance, backend)
    return moments_, lse


# --- from moments to the local-linear value ------------------------------------------


class LocalLinearFit(NamedTuple):
    """Per query: the fitted value (n, c) and gamma (n, d), such that the fit's weight
    on key j is p_ij (1 + gamma_i . (u_ij - S1_i)); gamma carries the line's share
    (0 where the fit is the local-constant one)."""

    value: Tensor
    gamma: Tensor


def solve_moments(moments, d, c, dtype):
    """The local-linear fit of every query from its moments (float64, differentiable);
    ``dtype``, the inputs', sets the ramp from the local-constant value to the line."""
    S1, S2, Sv, Suv = unpack(moments, d, c)
    R, scale = covariance(S1, S2)
    share = line_share(R, dtype)
    thin = share == 0.0
    eye = torch.eye(d, dtype=R.dtype, device=R.device)
    R = torch.where(thin[:, None, None], eye, R)  # any regular matrix: those rows take Sv
    # C^-1 B = S^-1 R^-1 S^-1 B with S = diag(scale): solved on the scaled system.
    rhs = torch.cat([Suv - S1[:, :, None] * Sv[:, None, :], S1[:, :, None]], dim=2)
    solved = torch.linalg.solve_ex(R, rhs / scale[:, :, None]).result / scale[:, :, None]
    slope, gamma = solved[:, :, :c], -solved[:, :, c]
    # the line's value at the query is Sv - S1 . slope: the share scales its step from Sv
    step = -(S1[:, :, None] * slope).sum(1)
    return LocalLinearFit(
        torch.where(thin[:, None], Sv, Sv + share[:, None] * step),
        torch.where(thin[:, None], 0.0, share[:, None] * gamma),
    )


def sum_squared_weights(fit, S1, moments_2w, lse_w, lse_2w, d):
    """sum_j l_ij^2 of the local-linear weights l_ij = p_ij (1 + gamma . (u_ij - S1)).

    ``moments_2w``, ``lse_2w`` come from a pass at 2 w: p_ij^2 = P2_i p'_ij with p'
    the softmax at 2 w and P2_i = sum_j p_ij^2 = exp(lse_i(2 w) - 2 lse_i(w)), so
    sum_j l_ij^2 = P2_i E'[(1 + gamma . (u - S1))^2], the mean and covariance of u
    under p' giving the expectation without cancellation.
    """
    m2, S2_2w, _, _ = unpack(moments_2w, d, 0)
    cov2 = S2_2w - m2[:, :, None] * m2[:, None, :]
    gamma = fit.gamma
    mean = 1.0 + (gamma * (m2 - S1)).sum(1)
    spread = torch.einsum("nf,nfg,ng->n", gamma, cov2, gamma).clamp_min(0.0)
    return torch.exp(lse_2w - 2.0 * lse_w) * (mean * mean + spread)


def local_linear_pool(query, key, value, w, *, exclude_self=False, backend="auto", tolerance=None):
    """Local-linear regression at each query: the value of the weighted least-squares
    line through the keys and values, weighted by the Gaussian softmax of ``nw_pool``.

    Args:
        query: ``(n,)`` (one feature) or ``(n, d)``.
        key: ``(m,)`` or ``(m, d)``.
        value: ``(m,)`` (output ``(n,)``) or ``(m, c)`` (output ``(n, c)``).
        w: one weight per feature, ``w_f = 1 / h_f**2`` (the diagonal of the metric:
            ``s_ij = -(1/2) sum_f w_f (q_if - k_jf)**2``): ``(d,)``, or a float or a
            0-d or 1-element tensor, the same weight for every feature. Unlike
            ``nw_pool``'s ``w`` (one per key), it carries a per-feature bandwidth
            itself, and the kernels give its gradient.
        exclude_self: leave-one-out, n == m: key i is removed from query i's fit.
        backend: ``"auto"`` (Numba on CPU, Triton on CUDA), ``"numba"``,
            ``"triton"`` or ``"torch"`` (``nwfast.reference.local_linear_reference``).
        tolerance: the most softmax mass a query may skip, as ``nw_pool``'s: by a
            bound the kernel computes, the keys a query leaves out hold at most
            ``tolerance`` of its weights (``None``: the dtype's rounding; ``0.0``
            computes every pair; the Numba kernels skip, d <= 4, c <= 4). Each fit
            then moves by at most ``tolerance / (1 - tolerance) * max_j |r_j| (1 +
            m_q m_j)`` over the keys j it skipped (see the module doc: r_j is key
            j's residual from the exact line, m_q and m_j the Mahalanobis distances
            of the query and of key j from the kept keys' weighted mean).

    Returns:
        The fits in the dtype of the inputs. The fused backends differentiate with
        respect to ``w`` only (the bandwidth search needs no more); the reference
        path differentiates everything. Where a query's neighbourhood is too thin
        for a line (see the module doc) the local-constant value is returned, and
        near that the prediction moves smoothly from one to the other.
    """
    if backend == "torch":
        args = prepare_local_linear(query, key, value, w, exclude_self, fused=False)
        fit = local_linear_reference(args.q, args.k, args.v, args.w, exclude_self=args.exclude_self)
    else:
        mom, _ = moments(
            query, key, value, w, exclude_self=exclude_self, backend=backend, tolerance=tolerance
        )
        d, c = (1 if x.dim() == 1 else x.shape[1] for x in (query, value))
        fit = solve_moments(mom, d, c, query.dtype).value
    fit = fit.to(query.dtype)
    return fit[:, 0] if value.dim() == 1 else fit
