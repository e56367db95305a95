"""Input checks: every public shape is turned into one canonical layout, or refused.

Canonical shared layout: query (B, n, d), key (B, m, d), value (B, m, c), and w
(B, m) for one w per key or (B, 1) for one w shared by all keys.
Canonical rows layout: query (n,), keys (n, m), values (n, m), w (m,) or (1,).
Canonical local-linear layout: query (n, d), key (m, d), value (m, c), and w
(d,), one weight per feature (the diagonal of the metric in the scores).
The reshapes are views or expands, so autograd carries gradients back to the
caller's own tensors (a scalar ``w`` expanded to every key sums its gradient).
"""

import numbers
from typing import NamedTuple

import numpy as np
import torch

# Half precision reaches only the GPU kernels; the CPU kernels compute in float32/64.
CPU_DTYPES = (torch.float32, torch.float64)
GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class Shared(NamedTuple):
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    w: torch.Tensor
    exclude_self: bool
    out_shape: tuple


class Rows(NamedTuple):
    q: torch.Tensor  # (n,)
    k: torch.Tensor  # (n, m)
    v: torch.Tensor  # (n, m)
    w: torch.Tensor


class LocalLinear(NamedTuple):
    q: torch.Tensor  # (n, d)
    k: torch.Tensor  # (m, d)
    v: torch.Tensor  # (m, c)
    w: torch.Tensor  # (d,)
    exclude_self: bool


def _tensor(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_nested or x.layout != torch.strided:
        kind = "a nested tensor" if x.is_nested else f"layout {x.layout}"
        raise TypeError(
            f"{name} must be a dense (strided) tensor, got {kind}; call .to_dense() first"
        )
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return x


def _same_dtype_and_device(named):
    (first_name, first), *rest = named
    for name, x in rest:
        if x.dtype != first.dtype:
            raise TypeError(
                f"{name} has dtype {x.dtype} but {first_name} has dtype {first.dtype}; "
                "all tensors must share one dtype"
            )
        if x.device != first.device:
            raise ValueError(
                f"{name} is on {x.device} but {first_name} is on {first.device}; "
                "all tensors must be on one device"
            )


def _bandwidth(w, like):
    """A Python number becomes a 0-d tensor of the data's dtype and device."""
    if isinstance(w, bool) or not isinstance(w, (numbers.Real, torch.Tensor)):
        raise TypeError(f"w must be a float or a floating-point tensor, got {type(w).__name__}")
    if isinstance(w, torch.Tensor):
        return _tensor("w", w)
    return torch.tensor(float(w), dtype=like.dtype, device=like.device)


def _is_scalar(w):
    return w.dim() == 0 or tuple(w.shape) == (1,)


# The default tolerance: what the dtype's own rounding loses anyway (half
# precision accumulates in float32).
DEFAULT_TOLERANCE = {torch.float64: 2.0**-53}


def resolve_tolerance(tolerance, dtype):
    """``tolerance`` checked, or the dtype's default for None."""
    if tolerance is None:
        return DEFAULT_TOLERANCE.get(dtype, 2.0**-24)
    if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real):
        raise TypeError(f"tolerance must be a number or None, got {type(tolerance).__name__}")
    if not 0.0 <= tolerance < 1.0:
        raise ValueError(f"tolerance must lie in [0, 1), got {tolerance!r}")
    return float(tolerance)


def _flag(name, value):
    # "no" is truthy: a flag must be a real bool, or leave-one-out runs silently.
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def _features(pair, d, d_key):
    if d_key != d:
        raise ValueError(f"feature dims differ: {pair} (d={d} and d={d_key})")
    if d == 0:
        raise ValueError(f"{pair}: no features (d=0)")


def _softmax_keys(pair, shape_k, n, m, exclude_self):
    """Every query's softmax must keep at least one key."""
    if m == 0:
        raise ValueError(f"key {shape_k} has no keys (m=0): the softmax is empty")
    if exclude_self and n != m:
        raise ValueError(f"exclude_self needs the queries to be the keys (n == m), got {pair}")
    if exclude_self and m == 1:
        raise ValueError(f"exclude_self with a single key (key {shape_k}) leaves nothing to pool")


def _value_mismatch(shape_v, shape_k, batch_shape, m):
    lead = ", ".join(str(size) for size in (*batch_shape, m))
    expected = f"({m},) or ({m}, c)" if not batch_shape else f"({lead}, c)"
    return ValueError(f"value {shape_v} does not match key {shape_k}: expected {expected}")


def prepare_shared(query, key, value, w, exclude_self=False):
    """Check ``nw_pool``'s arguments and return them in the canonical layout."""
    exclude_self = _flag("exclude_self", exclude_self)
    for name, x in (("query", query), ("key", key), ("value", value)):
        _tensor(name, x)
    w = _bandwidth(w, query)
    _same_dtype_and_device([("query", query), ("key", key), ("value", value), ("w", w)])
    # Messages quote the caller's shapes, not the canonical ones.
    shape_q, shape_k, shape_v = tuple(query.shape), tuple(key.shape), tuple(value.shape)
    pair = f"query {shape_q} and key {shape_k}"

    if query.dim() == 1 or key.dim() == 1:
        if query.dim() != 1 or key.dim() != 1:
            raise ValueError(
                f"{pair}: a 1-D query (n,) needs a 1-D key (m,), and (..., n, d) needs (..., m, d)"
            )
        query, key = query[:, None], key[:, None]
    if query.dim() != key.dim():
        raise ValueError(f"{pair} must have the same number of dimensions (equal batch dims)")
    batch_shape, (n, d) = tuple(query.shape[:-2]), tuple(query.shape[-2:])
    m = key.shape[-2]
    if tuple(key.shape[:-2]) != batch_shape:
        raise ValueError(f"batch dims differ: {pair}")
    _features(pair, d, key.shape[-1])
    _softmax_keys(pair, shape_k, n, m, exclude_self)

    if value.dim() == 1 and not batch_shape:
        out_shape = (n,)
        value = value[:, None]
    else:
        out_shape = (*batch_shape, n, value.shape[-1])
    if value.dim() != key.dim() or tuple(value.shape[:-1]) != (*batch_shape, m):
        raise _value_mismatch(shape_v, shape_k, batch_shape, m)

    batch = 1
    for size in batch_shape:
        batch *= size
    if _is_scalar(w):
        w = w.reshape(1, 1).expand(batch, 1)
    elif tuple(w.shape) == (m,):
        w = w.reshape(1, m).expand(batch, m)
    elif tuple(w.shape) == (*batch_shape, m):
        w = w.reshape(batch, m)
    else:
        raise ValueError(
            f"w {tuple(w.shape)} does not match key {shape_k}: expected a scalar, "
            f"({m},) or {(*batch_shape, m)}"
        )
    return Shared(
        query.reshape(batch, n, d),
        key.reshape(batch, m, d),
        value.reshape(batch, m, value.shape[-1]),
        w,
        bool(exclude_self),
        out_shape,
    )


def prepare_rows(query, keys, values, w):
    """Check ``nw_pool_rows``'s arguments: query (n,), keys and values (n, m)."""
    for name, x in (("query", query), ("keys", keys), ("values", values)):
        _tensor(name, x)
    w = _bandwidth(w, query)
    _same_dtype_and_device([("query", query), ("keys", keys), ("values", values), ("w", w)])
    if query.dim() != 1 or keys.dim() != 2 or keys.shape[0] != query.shape[0]:
        raise ValueError(
            f"query {tuple(query.shape)} and keys {tuple(keys.shape)}: expected (n,) and "
            "(n, m), row i of keys belonging to query i"
        )
    if values.shape != keys.shape:
        raise ValueError(
            f"values {tuple(values.shape)} must have the shape of keys {tuple(keys.shape)}"
        )
    m = keys.shape[1]
    if m == 0:
        raise ValueError(f"keys {tuple(keys.shape)} has no keys (m=0): the softmax is empty")
    if _is_scalar(w):
        w = w.reshape(1)
    elif tuple(w.shape) != (m,):
        raise ValueError(
            f"w {tuple(w.shape)} does not match keys {tuple(keys.shape)}: expected a "
            f"scalar or ({m},)"
        )
    return Rows(query, keys, values, w)


_POINTS = {"query": "(n,) or (n, d)", "key": "(m,) or (m, d)", "value": "(m,) or (m, c)"}


def prepare_local_linear(query, key, value, w, exclude_self=False, fused=True):
    """Check ``local_linear_pool``'s arguments: query (n,) or (n, d), key (m,) or
    (m, d), value (m,) or (m, c), w a scalar or one weight per feature (d,).

    ``fused``: the fused kernels differentiate with respect to w only, so a
    gradient wanted for another input is refused rather than silently dropped.
    """
    exclude_self = _flag("exclude_self", exclude_self)
    named = (("query", query), ("key", key), ("value", value))
    for name, x in named:
        _tensor(name, x)
        if x.dim() not in (1, 2):
            raise ValueError(f"{name} must be {_POINTS[name]}, got shape {tuple(x.shape)}")
    w = _bandwidth(w, query)
    _same_dtype_and_device([*named, ("w", w)])
    shape_q, shape_k, shape_v = tuple(query.shape), tuple(key.shape), tuple(value.shape)
    pair = f"query {shape_q} and key {shape_k}"
    q, k, v = (x[:, None] if x.dim() == 1 else x for x in (query, key, value))
    (n, d), m = q.shape, k.shape[0]
    _features(pair, d, k.shape[1])
    _softmax_keys(pair, shape_k, n, m, exclude_self)
    if v.shape[0] != m:
        raise _value_mismatch(shape_v, shape_k, (), m)
    if w.numel() == 1:
        w = w.reshape(1).expand(d)
    elif tuple(w.shape) != (d,):
        raise ValueError(
            f"w {tuple(w.shape)} does not match {pair}: expected a scalar or one weight "
            f"per feature, ({d},)"
        )
    for name, x in named:
        if fused and x.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                f"{name} requires grad, but local_linear_pool differentiates with respect "
                "to w only; detach it, or use backend='torch' for gradients to every input"
            )
    return LocalLinear(q, k, v, w, exclude_self)
