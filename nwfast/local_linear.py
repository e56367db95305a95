"""Local-linear regression on the fused Gaussian softmax: ``local_linear_pool``.

Nadaraya-Watson fits a constant to each query's neighbourhood; local-linear fits
a line (a plane in d features) by weighted least squares with the same weights
``p_ij = softmax_j(s_ij)``, ``s_ij = -(1/2) sum_f w_f (q_if - k_jf)**2``, and
returns its value at the query. The line removes Nadaraya-Watson's bias where
the data are one-sided (the ends of the data) or their density slopes.

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
prediction falls back to the local-constant value ``Sv``, Nadaraya-Watson's. The
test is scale-free: C is scaled by the second moments, R = C_fg / sqrt(S2_ff
S2_gg), whose diagonal is the fraction of each feature's mean squared offset
that is spread rather than distance, and a row is thin when R's smallest
eigenvalue is at most ``thin_tolerance`` (1024 units of rounding of the kernel's dtype):
below it the sums cannot resolve a slope.

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
holds for rows fitted by a line both ways; a row that is thin one way and not the
other changes method (and a row thin both ways takes ``nw_pool``'s bound).
"""

import importlib
import numbers
from typing import NamedTuple

import torch
from torch import Tensor

from nwfast import ops
from nwfast._checks import _flag, resolve_tolerance

__all__ = [
    "LocalLinearFit",
    "local_linear_pool",
    "local_linear_reference",
    "moment_layout",
    "moments",
    "moments_reference",
    "solve_moments",
    "sum_squared_weights",
    "thin_tolerance",
]

# Smallest eigenvalue of the scaled covariance R below which a line is not fitted,
# 1024 units of rounding of the dtype the kernels sum in (float32 for half inputs).
THIN_FLOAT64, THIN_FLOAT32 = 2.0**-43, 2.0**-14


def thin_tolerance(dtype):
    return THIN_FLOAT64 if dtype == torch.float64 else THIN_FLOAT32


_KERNELS = {"numba": "nwfast.kernels.numba_moments", "triton": "nwfast.kernels.triton_moments"}


class Layout(NamedTuple):
    """Column ranges of the moments (n, P): u (d), upper(u u^T) (d (d+1) / 2,
    f <= g row by row), v (c), u v^T (d * c, feature by feature)."""

    first: slice
    second: slice
    values: slice
    products: slice
    size: int


def moment_layout(d, c):
    t = d * (d + 1) // 2
    return Layout(
        slice(0, d), slice(d, d + t), slice(d + t, d + t + c), slice(d + t + c, d + t + c + d * c),
        d + t + c + d * c,
    )  # fmt: skip


# --- input checks --------------------------------------------------------------------


def _points(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() not in (1, 2):
        raise ValueError(f"{name} must be (n,) or (n, d), got shape {tuple(x.shape)}")
    return x[:, None] if x.dim() == 1 else x


def _prepare(query, key, value, w, exclude_self, fused=True):
    """Canonical (n, d), (m, d), (m, c), w (d,) tensors, or a clear error. ``fused``:
    the kernels differentiate with respect to w only, so a gradient wanted for
    another input is refused rather than silently dropped."""
    exclude_self = _flag("exclude_self", exclude_self)
    q, k, v = _points("query", query), _points("key", key), _points("value", value)
    pair = f"query {tuple(query.shape)} and key {tuple(key.shape)}"
    for name, x in (("key", k), ("value", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but query has dtype {q.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but query is on {q.device}")
    n, d = q.shape
    m = k.shape[0]
    if k.shape[1] != d:
        raise ValueError(f"feature dims differ: {pair}")
    if m == 0:
        raise ValueError(f"key {tuple(key.shape)} has no keys (m=0): the softmax is empty")
    if v.shape[0] != m:
        raise ValueError(
            f"value {tuple(value.shape)} does not match key {tuple(key.shape)}: "
            f"expected ({m},) or ({m}, c)"
        )
    if exclude_self and n != m:
        raise ValueError(f"exclude_self needs the queries to be the keys (n == m), got {pair}")
    if exclude_self and m == 1:
        raise ValueError(f"exclude_self with a single key (key {tuple(key.shape)}) leaves none")
    if isinstance(w, bool) or not isinstance(w, (numbers.Real, torch.Tensor)):
        raise TypeError(f"w must be a float or a floating-point tensor, got {type(w).__name__}")
    w = torch.as_tensor(w, dtype=q.dtype, device=q.device)
    if w.numel() == 1:
        w = w.reshape(1).expand(d)
    elif tuple(w.shape) != (d,):
        raise ValueError(
            f"w {tuple(w.shape)} does not match {pair}: expected a scalar or one per feature ({d},)"
        )
    for name, x in (("query", query), ("key", key), ("value", value)):
        if fused and x.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                f"{name} requires grad, but local_linear_pool differentiates with respect "
                "to w only; detach it, or use backend='torch' for gradients to every input"
            )
    return q, k, v, w


def _kernels(backend):
    try:
        return importlib.import_module(_KERNELS[backend])
    except ImportError as error:
        raise RuntimeError(
            f"backend={backend!r} has no local-linear kernel here: {error}. Install "
            f"{backend}, or pass backend='torch' for the reference path"
        ) from error


# --- the fused moments as a custom op ------------------------------------------------


def _moments_kernel(q, k, v, w, exclude_self, tolerance, backend):
    q, k, v, w = (x.contiguous() for x in (q, k, v, w))
    if backend == "numba":
        return _kernels(backend).forward(q, k, v, w, exclude_self, tolerance)
    # Triton's moments compute every pair: no plan to pass on.
    moments_, lse = _kernels(backend).forward(q, k, v, w, exclude_self)
    return moments_, lse, torch.zeros(0, dtype=torch.int64)


_moments_op = ops.define(
    "local_linear_moments(Tensor q, Tensor k, Tensor v, Tensor w, bool exclude_self, "
    "float tolerance, str backend) -> (Tensor, Tensor, Tensor)",
    _moments_kernel,
)


@torch.library.register_fake("nwfast::local_linear_moments")
def _(q, k, v, w, exclude_self, tolerance, backend):
    size = moment_layout(q.shape[1], v.shape[1]).size
    plan_size = torch.library.get_ctx().new_dynamic_size()
    return (
        q.new_empty((q.shape[0], size), dtype=torch.float64),
        q.new_empty(q.shape[0], dtype=torch.float64),
        torch.empty(plan_size, dtype=torch.int64, device="cpu"),
    )


def _moments_backward_kernel(grad, q, k, v, w, moments, lse, plan, exclude_self, backend):
    q, k, v, w = (x.contiguous() for x in (q, k, v, w))
    # What the kernel subtracts: each query's E[u_f^2] and grad . moments.
    second = _unpack(moments, q.shape[1], v.shape[1])[1].diagonal(dim1=1, dim2=2)
    tbar = (grad * moments).sum(1)
    args = (grad.contiguous(), q, k, v, w, lse.contiguous(), second.contiguous(), tbar)
    if backend == "numba":  # over the keys the forward's plan kept
        per_query = _kernels(backend).backward(*args, exclude_self, plan)
    else:
        per_query = _kernels(backend).backward(*args, exclude_self)
    return per_query.sum(0).to(w.dtype)


_moments_backward_op = ops.define(
    "local_linear_moments_backward(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor w, "
    "Tensor moments, Tensor lse, Tensor plan, bool exclude_self, str backend) -> Tensor",
    _moments_backward_kernel,
)


@torch.library.register_fake("nwfast::local_linear_moments_backward")
def _(grad, q, k, v, w, moments, lse, plan, exclude_self, backend):
    return torch.empty_like(w)


def _setup_context(ctx, inputs, output):
    q, k, v, w, exclude_self, tolerance, backend = inputs
    moments, lse, plan = output
    ctx.save_for_backward(q, k, v, w, moments, lse, plan)
    ctx.exclude_self, ctx.backend = exclude_self, backend
    ctx.mark_non_differentiable(lse, plan)


def _backward(ctx, grad, _grad_lse, _grad_plan):
    q, k, v, w, moments, lse, plan = ctx.saved_tensors
    grad_w = None
    if ctx.needs_input_grad[3]:
        grad_w = _moments_backward_op(
            grad.double(), q, k, v, w, moments, lse, plan, ctx.exclude_self, ctx.backend
        )
    return None, None, None, grad_w, None, None, None


torch.library.register_autograd(
    "nwfast::local_linear_moments", _backward, setup_context=_setup_context
)


def moments(query, key, value, w, *, exclude_self=False, backend="auto", tolerance=None):
    """The weighted moments of every query, ``(n, P)`` float64, and its log-sum-exp.

    Shapes and ``tolerance`` as :func:`local_linear_pool` (the keys a query skips
    hold at most ``tolerance`` of its softmax mass, so each moment moves by at most
    ``2 * tolerance * max_j |phi_ij|``); the columns follow :func:`moment_layout`.
    Differentiable with respect to ``w`` (one pass more in the backward).
    """
    q, k, v, w = _prepare(query, key, value, w, exclude_self)
    tolerance = resolve_tolerance(tolerance, q.dtype)
    if backend == "torch":
        return moments_reference(q, k, v, w, exclude_self)
    backend = ops.resolve_backend(backend, q.device, q.dtype)
    if q.shape[0] == 0:
        size = moment_layout(q.shape[1], v.shape[1]).size
        return q.new_zeros((0, size), dtype=torch.float64), q.new_zeros(0, dtype=torch.float64)
    moments_, lse, _ = _moments_op(q, k, v, w, exclude_self, tolerance, backend)
    return moments_, lse


# --- from moments to the local-linear value ------------------------------------------


class LocalLinearFit(NamedTuple):
    """Per query: the fitted value (n, c) and gamma (n, d), such that the fit's weight
    on key j is p_ij (1 + gamma_i . (u_ij - S1_i)); gamma is 0 where the fit fell back."""

    value: Tensor
    gamma: Tensor


def _unpack(moments, d, c):
    """S1 (n, d), S2 (n, d, d), Sv (n, c), Suv (n, d, c) from the layout."""
    layout = moment_layout(d, c)
    n = moments.shape[0]
    # column of (f, g) in the upper triangle, for f <= g and, mirrored, f > g
    f, g = torch.meshgrid(torch.arange(d), torch.arange(d), indexing="ij")
    low, high = torch.minimum(f, g), torch.maximum(f, g)
    column = layout.second.start + low * d - low * (low - 1) // 2 + (high - low)
    return (
        moments[:, layout.first],
        moments[:, column.to(moments.device)],
        moments[:, layout.values],
        moments[:, layout.products].reshape(n, d, c),
    )


def _covariance(S1, S2):
    """C = S2 - S1 S1^T, its scaled form R and the scales sqrt(diag S2)."""
    C = S2 - S1[:, :, None] * S1[:, None, :]
    diagonal = S2.diagonal(dim1=1, dim2=2)
    scale = torch.where(diagonal > 0, diagonal, 1.0).sqrt()
    return C / (scale[:, :, None] * scale[:, None, :]), scale


def _is_thin(R, tol):
    """Rows whose scaled covariance has an eigenvalue <= tol (not NaN rows: those
    propagate their NaN through the solve)."""
    with torch.no_grad():
        finite = torch.isfinite(R).flatten(1).all(1)
        eye = torch.eye(R.shape[1], dtype=R.dtype, device=R.device)
        smallest = torch.linalg.eigvalsh(torch.where(finite[:, None, None], R, eye))[:, 0]
        return finite & ~(smallest > tol)


def solve_moments(moments, d, c, tol):
    """The local-linear fit of every query from its moments (float64, differentiable)."""
    S1, S2, Sv, Suv = _unpack(moments, d, c)
    R, scale = _covariance(S1, S2)
    thin = _is_thin(R, tol)
    eye = torch.eye(d, dtype=R.dtype, device=R.device)
    R = torch.where(thin[:, None, None], eye, R)  # any regular matrix: those rows are replaced
    # C^-1 B = S^-1 R^-1 S^-1 B with S = diag(scale): solved on the scaled system.
    rhs = torch.cat([Suv - S1[:, :, None] * Sv[:, None, :], S1[:, :, None]], dim=2)
    solved = torch.linalg.solve_ex(R, rhs / scale[:, :, None]).result / scale[:, :, None]
    slope, gamma = solved[:, :, :c], -solved[:, :, c]
    value = Sv - (S1[:, :, None] * slope).sum(1)
    return LocalLinearFit(
        torch.where(thin[:, None], Sv, value), torch.where(thin[:, None], 0.0, gamma)
    )


def sum_squared_weights(fit, S1, moments_2w, lse_w, lse_2w, d):
    """sum_j l_ij^2 of the local-linear weights l_ij = p_ij (1 + gamma . (u_ij - S1)).

    ``moments_2w``, ``lse_2w`` come from a pass at 2 w: p_ij^2 = P2_i p'_ij with p'
    the softmax at 2 w and P2_i = sum_j p_ij^2 = exp(lse_i(2 w) - 2 lse_i(w)), so
    sum_j l_ij^2 = P2_i E'[(1 + gamma . (u - S1))^2], the mean and covariance of u
    under p' giving the expectation without cancellation.
    """
    m2, S2_2w, _, _ = _unpack(moments_2w, d, 0)
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
        w: ``s_ij = -(1/2) sum_f w_f (q_if - k_jf)**2``: a float or a 0-d or
            1-element tensor (one for every feature), or ``(d,)``, one per feature.
        exclude_self: leave-one-out, n == m: key i is removed from query i's fit.
        backend: ``"auto"`` (Numba on CPU, Triton on CUDA), ``"numba"``,
            ``"triton"`` or ``"torch"`` (:func:`local_linear_reference`).
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
        for a line (see the module doc) the local-constant value is returned.
    """
    if backend == "torch":
        q, k, v, w_f = _prepare(query, key, value, w, exclude_self, fused=False)
        fit = local_linear_reference(q, k, v, w_f, exclude_self=exclude_self)
    else:
        mom, _ = moments(
            query, key, value, w, exclude_self=exclude_self, backend=backend, tolerance=tolerance
        )
        q, v = _points("query", query), _points("value", value)
        fit = solve_moments(mom, q.shape[1], v.shape[1], thin_tolerance(q.dtype)).value
    fit = fit.to(query.dtype)
    return fit[:, 0] if value.dim() == 1 else fit


# --- plain PyTorch references --------------------------------------------------------


def _reference_weights(q, k, w, exclude_self):
    """(u (n, m, d), scores (n, m), removed (n, m) or None)."""
    u = k[None, :, :] - q[:, None, :]
    scores = -0.5 * (u * u * w).sum(-1)
    removed = None
    if exclude_self:
        removed = torch.eye(q.shape[0], dtype=torch.bool, device=q.device)
        scores = scores.masked_fill(removed, float("-inf"))
    return u, scores, removed


def _reference_terms(u, value):
    """phi_ij (n, m, P), the layout's terms of each pair, whose weighted sums are
    the moments; u (n, m, d), value (m, c)."""
    n, m, d = u.shape
    rows, cols = torch.triu_indices(d, d, device=u.device)
    v = value[None].expand(n, m, -1)
    return torch.cat(
        [u, u[..., rows] * u[..., cols], v, (u[..., :, None] * v[..., None, :]).flatten(2)], -1
    )


def moments_reference(query, key, value, w, exclude_self=False):
    """The moments of the layout and the lse by dense broadcasting, for the tests.

    query (n, d), key (m, d), value (m, c), w (d,); computed in their dtype.
    """
    u, scores, removed = _reference_weights(query, key, w, exclude_self)
    p = torch.softmax(scores, dim=-1)
    terms = p[..., None] * _reference_terms(u, value)
    if removed is not None:  # remove key i from row i (a NaN there must not reach it)
        terms = torch.where(removed[..., None], 0.0, terms)
    return terms.sum(1).double(), torch.logsumexp(scores, dim=-1).double()


def local_linear_reference(query, key, value, w, *, exclude_self=False):
    """The local-linear fit by weighted least squares per query, in float64.

    ``torch.linalg.lstsq`` on the dense design [1, k_j - q_i] scaled by sqrt(p_ij),
    an independent route to the same numbers as the moments; rows that are thin
    (module doc) take the local-constant value, as the fused path does.
    query (n, d), key (m, d), value (m, c), w (d,); returns (n, c) float64.
    """
    q, k, v, w = (x.double() for x in (query, key, value, w))
    u, scores, removed = _reference_weights(q, k, w, exclude_self)
    design = torch.cat([torch.ones_like(u[..., :1]), u], dim=-1)
    # sqrt(p) as exp(log p / 2): finite gradients where a key is removed (p = 0)
    root = torch.exp(0.5 * torch.log_softmax(scores, dim=-1))[..., None]
    target = v[None].expand(u.shape[0], -1, -1)
    if removed is not None:
        design = torch.where(removed[..., None], 0.0, design)
        target = torch.where(removed[..., None], 0.0, target)
    line = torch.linalg.lstsq(root * design, root * target, driver="gelsd").solution[:, 0]
    mom, _ = moments_reference(q, k, v, w, exclude_self)
    S1, S2, Sv, _ = _unpack(mom, q.shape[1], v.shape[1])
    thin = _is_thin(_covariance(S1, S2)[0], thin_tolerance(query.dtype))
    return torch.where(thin[:, None], Sv, line)
