"""The leave-one-out bandwidth search on log h, shared by the estimators and
``nwfast.distributed.loo_bandwidth``: a walk from a start while the loss falls, a
parabola through the best point and its neighbours, then L-BFGS on log h
rescaled by that curvature, so that its first step, the plain negative
gradient, is already a Newton step."""

import math

import numpy as np
import torch


def format_h(h):
    """A bandwidth for messages: one number, or one per feature."""
    h = h.detach().cpu().double()
    return f"{float(h):.5g}" if h.dim() == 0 else np.array2string(h.numpy(), precision=4)


def search_log_h(loss_at, loss_and_gradient, log_start, step, max_iter, tol, say):
    """Minimise a loss over log h; returns L-BFGS's iterations.

    ``loss_at(log_h)``: the loss as a float, no gradient. ``loss_and_gradient(u,
    log_h)``: the loss as a tensor, with its gradient left in ``u.grad``, log_h
    being a function of u. ``step``: the walk's step in log h. The callers keep
    the best point they were asked about. Raises ValueError if the loss is not
    finite at the start.
    """
    scanned = {}  # steps from the start -> loss

    def scan(k):
        scanned[k] = loss_at(log_start + k * step)
        say(f"scan h={format_h((log_start + k * step).exp())} loss={scanned[k]:.6g}")
        return scanned[k]

    if not math.isfinite(scan(0)):
        raise ValueError(
            f"the leave-one-out criterion is not finite at the starting bandwidth "
            f"h = {format_h(log_start.exp())} (loss {scanned[0]}); check the scale of X and y"
        )
    # Downwards first (a rule of thumb tends to oversmooth), upwards if that fails.
    for direction in (-1, 1):
        k = 0
        while abs(k) < 8 and scan(k + direction) < scanned[k]:
            k += direction
        if k != 0:
            break
    k = min(scanned, key=scanned.get)

    offset, scale = float(k), 1.0
    if k - 1 in scanned and k + 1 in scanned:
        below, here, above = scanned[k - 1], scanned[k], scanned[k + 1]
        curvature = below - 2 * here + above  # per step, squared
        if curvature > 1e-12:
            offset += 0.5 * (below - above) / curvature
            scale = math.sqrt(curvature) / step
    center = log_start + offset * step

    u = torch.zeros_like(center, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [u],
        lr=1.0,
        max_iter=max_iter,
        # The loss is relative to var(y) and near its minimum: an absolute
        # tolerance of tol * loss is the relative one.
        tolerance_change=tol * scanned[k],
        history_size=10,
        line_search_fn="strong_wolfe",
    )

    def closure():
        optimizer.zero_grad()
        log_h = center + u / scale
        loss = loss_and_gradient(u, log_h)
        say(f"L-BFGS h={format_h(log_h.exp())} loss={float(loss.detach()):.6g}")
        return loss

    if max_iter > 0:
        optimizer.step(closure)
    return optimizer.state[u].get("n_iter", 0)
