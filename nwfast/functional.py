"""Public operators: Nadaraya-Watson pooling with Gaussian scores.

    s_ij = -(w_j / 2) * ||q_i - k_j||^2,   p_ij = softmax_j(s_ij),   y_i = sum_j p_ij v_j

A per-feature bandwidth is not a kernel feature: scale ``query`` and ``key`` by
``sqrt(w_f)`` before the call and autograd carries the gradient to ``w_f``.
"""

import torch

from nwfast import ops, reference
from nwfast._checks import prepare_rows, prepare_shared

__all__ = ["nw_pool", "nw_pool_rows", "nw_pool_with_lse", "nw_weights"]


def nw_pool(query, key, value, w, *, exclude_self=False, backend="auto"):
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

    Returns:
        The pooled values, float dtype of the inputs. Gradients flow to query, key,
        value and w; no n x m matrix is built on the fused backends.
    """
    if backend == "torch":
        return reference.nw_pool_broadcast(query, key, value, w, exclude_self=exclude_self)
    args = prepare_shared(query, key, value, w, exclude_self)
    backend = ops.resolve_backend(backend, args.q.device, args.q.dtype)
    if args.q.numel() == 0 or args.v.shape[-1] == 0:
        return args.q.new_zeros(args.out_shape)
    out, _ = ops.pool(args.q, args.k, args.v, args.w, args.exclude_self, backend)
    return out.reshape(args.out_shape)


def nw_pool_with_lse(query, key, value, w, *, exclude_self=False, backend="auto"):
    """``nw_pool`` and the log-sum-exp of each query's scores, ``(B..., n)`` float64.

    For estimators that need more than the pooled value: for instance the sum of
    squared weights, ``sum_j p_ij**2 = exp(lse_i(2 w) - 2 lse_i(w))``. The lse
    carries no gradient.
    """
    if backend == "torch":
        prepare_shared(query, key, value, w, exclude_self)
        out, lse = reference.pool_and_lse(query, key, value, w, exclude_self)
        return out, lse.double()
    args = prepare_shared(query, key, value, w, exclude_self)
    backend = ops.resolve_backend(backend, args.q.device, args.q.dtype)
    lse_shape = query.shape[:-1] if query.dim() > 1 else query.shape
    if args.q.numel() == 0 or args.v.shape[-1] == 0:
        empty = torch.zeros(lse_shape, dtype=torch.float64, device=args.q.device)
        return args.q.new_zeros(args.out_shape), empty
    out, lse = ops.pool(args.q, args.k, args.v, args.w, args.exclude_self, backend)
    return out.reshape(args.out_shape), lse.detach().reshape(lse_shape)


def nw_pool_rows(query, keys, values, w, *, backend="auto"):
    """Pool with per-query keys: row i of ``keys`` and ``values`` belongs to ``query[i]``.

    This is the textbook's own layout, query ``(n,)``, keys and values ``(n, m)``,
    w a scalar or ``(m,)``; the result is ``(n,)``. Its cost is reading 2·n·m
    numbers, so it is memory-bound where the shared layout is compute-bound.
    """
    if backend == "torch":
        return reference.nw_pool_rows_broadcast(query, keys, values, w)
    args = prepare_rows(query, keys, values, w)
    backend = ops.resolve_backend(backend, args.query.device, args.query.dtype)
    if args.query.numel() == 0:
        return args.query.new_zeros(args.query.shape)
    out, _ = ops.pool_rows(args.query, args.keys, args.values, args.w, backend)
    return out


def nw_weights(query, key, w, *, exclude_self=False):
    """The attention weights ``p_ij`` as a dense ``(B..., n, m)`` tensor.

    Built with the reference formula, for plots and small sizes: it holds n·m numbers.
    """
    value = key[..., :1] if key.dim() > 1 else key  # shapes only: weights need no values
    prepare_shared(query, key, value, w, exclude_self)
    return reference.attention_weights(query, key, w, exclude_self)
