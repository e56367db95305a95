"""Public operators: Nadaraya-Watson pooling with Gaussian scores.

    s_ij = -(w_j / 2) * ||q_i - k_j||^2,   p_ij = softmax_j(s_ij),   y_i = sum_j p_ij v_j

A per-feature bandwidth is not a kernel feature: scale ``query`` and ``key`` by
``sqrt(w_f)`` before the call and autograd carries the gradient to ``w_f``.
"""

from nwfast import ops, reference
from nwfast._checks import prepare_rows, prepare_shared

__all__ = ["nw_pool", "nw_pool_rows", "nw_weights"]


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
