"""Public operators: Nadaraya-Watson pooling with Gaussian scores.

    s_ij = -(w_j / 2) * ||q_i - k_j||^2,   p_ij = softmax_j(s_ij),   y_i = sum_j p_ij v_j

A per-feature bandwidth is not a kernel feature: scale ``query`` and ``key`` by
``sqrt(w_f)`` before the call and autograd carries the gradient to ``w_f``.
"""

from typing import NamedTuple

import numpy as np
import torch

from nwfast import ops, reference
from nwfast._checks import prepare_rows, prepare_shared, resolve_tolerance

__all__ = [
    "PlanSummary",
    "nw_pool",
    "nw_pool_rows",
    "nw_pool_with_lse",
    "nw_weights",
    "pairs_computed",
    "plan_summary",
]


def nw_pool(query, key, value, w, *, exclude_self=False, backend="auto", tolerance=None):
    """Pool ``value`` with softmax weights of Gaussian scores between queries and keys.

    Args:
        query: ``(n,)`` (one feature) or ``(B..., n, d)``.
        key: ``(m,)`` or ``(B..., m, d)``, the same d and batch dims as ``query``.
        value: ``(m,)`` (output ``(n,)``) or ``(B..., m, c)`` (output ``(B..., n, c)``).
        w: bandwidth weight: a float, a 0-d or 1-element tensor (one for all keys),
            or one per key, ``(m,)`` or ``(B..., m)``. Any finite value is legal.
        exclude_self: leave-one-out: the queries are the keys (n == m) and key i is
            left out of query i's softmax.
        backend: ``"auto"`` (Numba on CPU, Triton on CUDA), ``"numba"``,
            ``"triton"`` or ``"torch"`` (the plain PyTorch reference).
        tolerance: the most softmax mass a query may skip, by a bound the
            kernels compute: each output row is then within
            ``2 * tolerance * max_j ||v_j||`` of the exact one, and gradients
            likewise. ``None`` is the dtype's rounding (2**-24 for float32 and
            half precision, 2**-53 for float64); ``0.0`` computes every pair.
            Skipping applies where it is safe and pays (``w >= 0``, finite
            data, d <= 4, large enough sizes); elsewhere, and on the torch
            backend, every pair is computed.

    Returns:
        The pooled values, float dtype of the inputs. Gradients flow to query, key,
        value and w (reverse and forward mode); no n x m matrix is built on the
        fused backends.
    """
    args = prepare_shared(query, key, value, w, exclude_self)
    tolerance = resolve_tolerance(tolerance, args.q.dtype)
    if _reference_path(backend, args, args.q.numel() == 0 or args.v.shape[-1] == 0):
        return reference.pool_and_lse(query, key, value, w, exclude_self)[0]
    out, _ = _pool(args, tolerance, backend)
    return out.reshape(args.out_shape)


def nw_pool_with_lse(query, key, value, w, *, exclude_self=False, backend="auto", tolerance=None):
    """``nw_pool`` and the log-sum-exp of each query's scores, ``(B..., n)`` float64.

    For estimators that need more than the pooled value: for instance the sum of
    squared weights, ``sum_j p_ij**2 = exp(lse_i(2 w) - 2 lse_i(w))``. The lse
    carries no gradient.
    """
    args = prepare_shared(query, key, value, w, exclude_self)
    tolerance = resolve_tolerance(tolerance, args.q.dtype)
    if _reference_path(backend, args, args.q.numel() == 0 or args.v.shape[-1] == 0):
        out, lse = reference.pool_and_lse(query, key, value, w, exclude_self)
        return out, lse.detach().double()
    out, lse = _pool(args, tolerance, backend)
    lse_shape = query.shape[:-1] if query.dim() > 1 else query.shape
    return out.reshape(args.out_shape), lse.reshape(lse_shape)


def _reference_path(backend, args, empty):
    """Whether the call runs the torch reference: asked for (it runs wherever
    torch runs, any device and dtype), or nothing to compute; a fused backend
    asked for is still checked, so an empty call fails as a full one would."""
    if backend == "torch":
        return True
    ops.resolve_backend(backend, args.q.device, args.q.dtype)
    return empty


def _pool(args, tolerance, backend):
    backend = ops.resolve_backend(backend, args.q.device, args.q.dtype)
    # torch.compile cannot trace a custom forward-mode rule: it gets the
    # reverse-mode function alone.
    function = _Pool if torch.compiler.is_compiling() else _PoolForwardMode
    diagonal = 0 if args.exclude_self else None
    out, lse, _ = function.apply(args.q, args.k, args.v, args.w, diagonal, tolerance, backend)
    return out, lse


def nw_pool_rows(query, keys, values, w, *, backend="auto"):
    """Pool with per-query keys: row i of ``keys`` and ``values`` belongs to ``query[i]``.

    This is the textbook's own layout, query ``(n,)``, keys and values ``(n, m)``,
    w a scalar or ``(m,)``; the result is ``(n,)``. Its cost is reading 2·n·m
    numbers, so it is memory-bound where the shared layout is compute-bound.
    """
    args = prepare_rows(query, keys, values, w)
    if _reference_path(backend, args, args.q.numel() == 0):
        return reference.rows_and_lse(query, keys, values, w)[0]
    backend = ops.resolve_backend(backend, args.q.device, args.q.dtype)
    function = _Rows if torch.compiler.is_compiling() else _RowsForwardMode
    out, _ = function.apply(args.q, args.k, args.v, args.w, backend)
    return out


def nw_weights(query, key, w, *, exclude_self=False):
    """The attention weights ``p_ij`` as a dense ``(B..., n, m)`` tensor.

    Built with the reference formula, for plots and small sizes: it holds n·m numbers.
    """
    value = key[..., :1] if key.dim() > 1 else key  # shapes only: weights need no values
    prepare_shared(query, key, value, w, exclude_self)
    return reference.attention_weights(query, key, w, exclude_self)


def pairs_computed(query, key, w, *, exclude_self=False, backend="auto", tolerance=None):
    """How many (query, key) pairs ``nw_pool`` computes for these arguments.

    ``B·n·m`` (over the batch) for a dense pass; fewer where the block bound
    lets ``tolerance`` skip pairs, or where far key boxes come from expansions
    (``plan_summary`` says how many of each). The arguments are ``nw_pool``'s,
    without the values; the count is that of the forward (the backward sweeps
    the same pairs) and comes from the same planner, without pooling anything.
    """
    return plan_summary(
        query, key, w, exclude_self=exclude_self, backend=backend, tolerance=tolerance
    ).computed


class PlanSummary(NamedTuple):
    """What ``nw_pool`` does with the ``pairs`` (query, key) pairs of a call.

    ``computed``: pairs computed one by one (``pairs_computed``); ``expanded``:
    pairs whose share of a row comes from a Hermite expansion of their key
    box instead; ``skipped``: pairs left out by the bound. ``expansions``: how
    many (query box, key box) expansions of each order (terms per axis) the
    plan holds. ``bound``: the most that any row skips and expands, relative
    to its softmax denominator (at most ``tolerance / 2``; each output row is
    then within ``2 * bound * max_j ||v_j||`` of the exact one), or None
    where the plan does not state it per row (block skipping alone).
    """

    pairs: int
    computed: int
    expanded: int
    skipped: int
    expansions: dict
    bound: float | None


def plan_summary(query, key, w, *, exclude_self=False, backend="auto", tolerance=None):
    """The plan ``nw_pool`` makes for these arguments, in numbers (``PlanSummary``).

    The arguments are ``pairs_computed``'s. Expansions of far key boxes (the
    fast Gauss transform) enter plans of either backend with one w > 0 for all
    keys and d <= 2, where enough keys lie near the queries; block skipping as
    ``nw_pool`` describes.
    """
    value = key[..., :1] if key.dim() > 1 else key  # shapes only
    args = prepare_shared(query, key, value, w, exclude_self)
    tolerance = resolve_tolerance(tolerance, args.q.dtype)
    B, n, m = args.q.shape[0], args.q.shape[1], args.k.shape[1]
    plan = None
    if not _reference_path(backend, args, args.q.numel() == 0):
        kernels = ops.kernel_module(ops.resolve_backend(backend, args.q.device, args.q.dtype))
        diagonal = 0 if args.exclude_self else None
        q, k, w = (x.detach().contiguous() for x in (args.q, args.k, args.w))
        plan = kernels.make_plan(q, k, w, diagonal, tolerance)
    if plan is None:
        return PlanSummary(B * n * m, B * n * m, 0, 0, {}, 0.0)
    expanded = 0 if plan.far is None else plan.far.expanded
    orders = {}
    bound = None
    if plan.far is not None:
        order, count = np.unique(plan.far.row_pairs[:, 1], return_counts=True)
        orders = {int(p): int(c) for p, c in zip(order, count)}
        bound = float(plan.far.bound.max())
    skipped = B * n * m - plan.pairs - expanded
    return PlanSummary(B * n * m, plan.pairs, expanded, skipped, orders, bound)


# --- autograd ------------------------------------------------------------------
# The ops carry reverse mode themselves (nwfast.ops); these functions add
# forward mode (the tangent is one more fused pass) and, through the ops'
# vmap rules, torch.func's transforms. The gradients are first derivatives
# only: differentiating them again stops with an error saying so.


class _FirstOrder(torch.autograd.Function):
    """The gradients as they are, with a derivative that refuses to be taken."""

    generate_vmap_rule = True

    @staticmethod
    def forward(_anchor, *grads):
        return tuple(g.view_as(g) for g in grads)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(_SECOND_ORDER)

    @staticmethod
    def jvp(ctx, *_):
        raise RuntimeError(_SECOND_ORDER)


_SECOND_ORDER = (
    "nw_pool's derivatives are first derivatives: nwfast does not differentiate them "
    "again (double backward, a Hessian, jacfwd of jacfwd); use backend='torch' for that"
)


def _first_order(grads, inputs, forward_mode=False):
    """``grads`` (None where not needed), refusing a second derivative where one
    could be asked for: under create_graph with inputs that require grad, or
    (``forward_mode``) inside another forward-mode transform."""
    anchor = next((x for x in inputs if x.requires_grad), inputs[0] if forward_mode else None)
    if anchor is None or not (forward_mode or torch.is_grad_enabled()):
        return grads
    present = _FirstOrder.apply(anchor, *(g for g in grads if g is not None))
    it = iter(present)
    return tuple(None if g is None else next(it) for g in grads)


class _Pool(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(query, key, value, w, diagonal, tolerance, backend):
        return ops.pool(query, key, value, w, diagonal, tolerance, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ops.save_pool_context(ctx, inputs, output)
        ctx.mark_non_differentiable(*output[1:])

    @staticmethod
    def backward(ctx, grad_out, _grad_lse, _grad_plan):
        with torch.no_grad():
            grads = ops.pool_gradients(ctx, grad_out)
        return (*_first_order(grads, ctx.saved_tensors[:4]), None, None, None)


class _PoolForwardMode(_Pool):
    @staticmethod
    def setup_context(ctx, inputs, output):
        _Pool.setup_context(ctx, inputs, output)
        ctx.save_for_forward(*inputs[:4], *output)

    @staticmethod
    def jvp(ctx, dquery, dkey, dvalue, dw, *_):
        query, key, value, w, out, lse, plan = ctx.saved_tensors
        tangent = ops.pool_tangent(
            query,
            key,
            value,
            w,
            dquery,
            dkey,
            dvalue,
            dw,
            out,
            lse,
            ctx.diagonal,
            plan,
            ctx.backend,
        )
        return *_first_order((tangent,), (query,), forward_mode=True), None, None


class _Rows(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(query, keys, values, w, backend):
        return ops.pool_rows(query, keys, values, w, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ops.save_rows_context(ctx, inputs, output)
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        with torch.no_grad():
            grads = ops.rows_gradients(ctx, grad_out)
        return (*_first_order(grads, ctx.saved_tensors[:4]), None)


class _RowsForwardMode(_Rows):
    @staticmethod
    def setup_context(ctx, inputs, output):
        _Rows.setup_context(ctx, inputs, output)
        ctx.save_for_forward(*inputs[:4], *output)

    @staticmethod
    def jvp(ctx, dquery, dkeys, dvalues, dw, _backend):
        query, keys, values, w, out, lse = ctx.saved_tensors
        tangent = ops.pool_rows_tangent(
            query, keys, values, w, dquery, dkeys, dvalues, dw, out, lse, ctx.backend
        )
        return *_first_order((tangent,), (query,), forward_mode=True), None
