"""``loo_bandwidth``: the estimators' leave-one-out search over sharded training
data; the ring computes each pass, the ranks exchange a few numbers besides."""

import math
from typing import NamedTuple

import torch
import torch.distributed as dist

from nwfast._search import search_log_h
from nwfast.bandwidth import from_spread
from nwfast.distributed._consensus import (
    _DTYPES,
    _all_ranks,
    _collective_device,
    _gather_rows,
    _raise_refusals,
    _same_everywhere,
)
from nwfast.distributed._ring import nw_pool


class LooBandwidth(NamedTuple):
    """What ``loo_bandwidth`` found, the same on every rank."""

    bandwidth: object  # h: a float, or one h_f per feature, a (d,) tensor
    loo_mse: float  # the leave-one-out MSE at it, over every rank's points
    n_iter: int  # L-BFGS iterations


def loo_bandwidth(
    x, y, *, per_feature=False, group=None, max_iter=50, tol=1e-5, backend="auto", verbose=False
):
    """``NadarayaWatson(bandwidth="loo")``'s bandwidth for training data sharded over ranks.

    Every rank passes its own contiguous shard of the training points, x ``(n_r,)``
    or ``(n_r, d)`` and y ``(n_r,)`` or ``(n_r, c)`` (torch tensors; n_r may be 0), and
    gets back the same ``LooBandwidth(bandwidth, loo_mse, n_iter)``: the ``h`` that
    minimises the leave-one-out mean squared error over all ranks' points, as
    ``NadarayaWatson(bandwidth="loo", per_feature=..., max_iter=..., tol=...)``
    finds it on up to ``4 * nwfast.estimator.PILOT_POINTS`` gathered points (see its
    docstring): the same start (Silverman's rule, its quartiles found by
    bisection), walk by factors of 2 and L-BFGS on ``log h``; past that the
    estimator starts from a pilot on a subsample, and both find the minimum of the
    same criterion. Each leave-one-out pass runs on the ring (:func:`nw_pool` with
    ``exclude_self=True``); the ranks exchange nothing else but a few numbers per
    pass: sums, a maximum, counts and the loss with its gradient.
    """
    group = group or dist.group.WORLD
    try:
        X, Y = _training_shard(x, y)
        row = {"refused": 0, "n": X.shape[0], "d": X.shape[1], "c": Y.shape[1]}
        row["dtype"] = _DTYPES.index(X.dtype)
        device, error = X.device, None
    except (TypeError, ValueError) as caught:
        row = {"refused": 1, "n": 0, "d": 0, "c": 0, "dtype": 0}
        device, error = _collective_device(group), caught
    table = _gather_rows(row, group, device)
    _raise_refusals(table, error)
    for field, what in (("d", "features"), ("c", "outputs"), ("dtype", "dtypes")):
        _same_everywhere(table, field, what)
    n = sum(table["n"])
    if n < 2:
        raise ValueError(
            f"loo_bandwidth needs at least 2 points over all ranks, got n_r = {table['n']}"
        )
    rank = dist.get_rank(group)

    def total(t):
        return _all_ranks(t, group).sum(0)

    # The loss is the estimator's: squared errors of y scaled to at most 1, relative
    # to the variance of y (see NadarayaWatson._search_loo).
    c = Y.shape[1]
    tiny = torch.finfo(torch.float64).tiny
    top = (
        Y.abs().amax(dim=0).double()
        if len(Y)
        else torch.zeros(c, dtype=torch.float64, device=device)
    )
    y_scale = _all_ranks(top, group).amax(0).clamp_min(tiny)
    scaled = Y.double() / y_scale
    mean = total(scaled.sum(0)) / n
    var_y = float((total(((scaled - mean) ** 2).sum(0)) / n).mean())
    var_y = var_y if var_y > 0 else 1.0

    start = _silverman(X, n, group).to(X.dtype)
    if not per_feature:
        start = start.log().mean().exp()  # geometric mean: one h for all features

    def part_of_loss(log_h):
        pred = _leave_one_out(X, Y, log_h.exp(), group, backend)
        return (((pred - Y).double() / y_scale) ** 2).sum() / (n * c) / var_y, pred

    best = {"loss": math.inf}

    def keep_best(value, log_h, pred):
        if value < best["loss"]:
            best.update(loss=value, log_h=log_h.detach().clone(), pred=pred.detach())

    def say(message):
        if verbose and rank == 0:
            print(f"[nwfast.distributed loo] {message}")

    def loss_at(log_h):
        with torch.no_grad():
            part, pred = part_of_loss(log_h)
        value = float(total(part.reshape(1)))
        keep_best(value, log_h, pred)
        return value

    def loss_and_gradient(u, log_h):
        part, pred = part_of_loss(log_h)
        part.backward()
        # One message: this rank's part of the loss and of its gradient.
        both = total(torch.cat([part.detach().reshape(1), u.grad.double().reshape(-1)]))
        u.grad.copy_(both[1:].reshape(u.shape))
        keep_best(float(both[0]), log_h, pred)
        return both[0]

    n_iter = search_log_h(
        loss_at, loss_and_gradient, start.log(), math.log(2.0), max_iter, tol, say
    )
    residuals = (Y - best["pred"]).double()
    mse = float(total((residuals**2).sum().reshape(1))) / (n * c)
    h = best["log_h"].exp()
    return LooBandwidth(float(h) if h.dim() == 0 else h.cpu().double(), mse, n_iter)


def _training_shard(x, y):
    """x as (n_r, d) and y as (n_r, c), y in x's float dtype and on its device."""
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            kind = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"{name} must be a floating-point torch.Tensor, got {kind}")
    if x.dim() not in (1, 2) or y.dim() not in (1, 2) or len(x) != len(y):
        raise ValueError(
            f"x {tuple(x.shape)} and y {tuple(y.shape)}: expected (n_r,) or (n_r, d) and "
            "(n_r,) or (n_r, c), one row per point of this rank"
        )
    X = (x[:, None] if x.dim() == 1 else x).detach()
    Y = (y[:, None] if y.dim() == 1 else y).detach().to(dtype=X.dtype, device=X.device)
    if X.shape[1] == 0 or Y.shape[1] == 0:
        raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)}: no features or no outputs")
    for name, t in (("x", X), ("y", Y)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN or infinity (shape {tuple(t.shape)})")
    return X, Y


def _leave_one_out(X, Y, h, group, backend):
    """NadarayaWatson's leave-one-out predictions at h (0-d, or one per feature),
    differentiable in h: the points are scaled by the fixed h0 and w = (h0 / h)**2,
    which is 1, carries the gradient (per feature: the scaled points carry it)."""
    if h.dim() == 0:
        h0 = h.detach()
        scaled = X / h0
        return nw_pool(
            scaled, scaled, Y, (h0 / h) ** 2, exclude_self=True, group=group, backend=backend
        )
    scaled = X / h
    return nw_pool(scaled, scaled, Y, 1.0, exclude_self=True, group=group, backend=backend)


def _silverman(X, n, group):
    """``nwfast.bandwidth.rule_of_thumb(X, "silverman")`` of every rank's rows of X."""
    X = X.double()

    mean = _all_ranks(X.sum(0), group).sum(0) / n
    std = (_all_ranks(((X - mean) ** 2).sum(0), group).sum(0) / (n - 1)).sqrt()
    # Quartiles interpolated between order statistics, as NumPy's default does.
    positions = [q * (n - 1) for q in (0.25, 0.75)]
    below = [math.floor(p) for p in positions]
    above = [min(b + 1, n - 1) for b in below]
    order = _order_statistics(X, below + above, group)
    q25, q75 = (order[i] + (positions[i] - below[i]) * (order[i + 2] - order[i]) for i in range(2))
    return from_spread(std, q75 - q25, n, "silverman")


_MAGNITUDE = 0x7FFFFFFFFFFFFFFF  # the bits of a float64 below its sign


def _sortable(x):
    """float64 values as int64 keys in the same order: negative floats' magnitude
    bits are flipped so that larger magnitudes sort lower."""
    bits = x.contiguous().view(torch.int64)
    return torch.where(bits < 0, bits ^ _MAGNITUDE, bits)


def _order_statistics(X, ranks, group):
    """The ``ranks``-th smallest (0-based) of each column of every rank's rows of X
    (n_r, f) float64, as (len(ranks), f): a bisection on their int64 keys, each round
    sending one count per rank, order statistic and column."""
    keys = _sortable(X)
    limits = torch.iinfo(torch.int64)
    low = keys.amin(0) if len(keys) else torch.full(X.shape[1:], limits.max, device=X.device)
    high = keys.amax(0) if len(keys) else torch.full(X.shape[1:], limits.min, device=X.device)
    wanted = torch.tensor(ranks, device=X.device)[:, None]
    lo = _all_ranks(low, group).amin(0).expand(len(ranks), -1)
    hi = _all_ranks(high, group).amax(0).expand(len(ranks), -1)
    while bool((lo < hi).any()):
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without overflow
        at_most = (keys[None] <= mid[:, None, :]).sum(1)
        enough = _all_ranks(at_most, group).sum(0) > wanted
        lo, hi = torch.where(enough, lo, mid + 1), torch.where(enough, mid, hi)
    return _sortable(lo).view(torch.float64)
