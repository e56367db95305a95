"""How results are judged: pooling outputs and gradients by ``nwfast.testing``, fits by LOO MSE.

The verdicts are the test suite's: the float64 reference on the same inputs and
the project's one tolerance policy. Past a few million pairs a fixed random
subset of query rows is judged, exactly: ``check_pool`` takes those rows of the
query and the output (and their own indices as the keys to leave out in
shared_loo), and an upstream gradient that is zero outside the subset makes
every gradient, of key, value and w too, depend on those rows alone.
"""

from __future__ import annotations

import math

CHECK_PAIRS = 1 << 19  # every row up to 724², beyond it as many rows as make this
MIN_ROWS = 8


def rows_to_check(case):
    """All query rows, or a fixed random subset; a sorted LongTensor either way."""
    import torch

    if case.pairs <= CHECK_PAIRS:
        return torch.arange(case.n)
    count = max(MIN_ROWS, CHECK_PAIRS // case.m)
    return torch.randperm(case.n, generator=torch.Generator().manual_seed(1))[:count].sort().values


def judge(case, x: dict, call, leaves: dict, out=None, tolerance=0.0) -> tuple[list, int]:
    """Judge a forward's output ``out``; in the gradient modes, run the peer's
    call once more, backward with a zero upstream outside the judged rows.
    ``tolerance``: the share of each row's weight the peer may leave out
    (``nwfast.testing.check_pool``). Returns (verdicts, rows judged)."""
    import torch

    rows = rows_to_check(case)
    if case.mode == "forward":
        return _outputs(case, x, out, rows, tolerance), len(rows)
    for t in leaves.values():
        t.grad = None
    out = call()
    verdicts = _outputs(case, x, out, rows, tolerance)
    upstream = torch.zeros_like(x["grad_out"])
    idx = rows.to(upstream.device)
    upstream[idx] = x["grad_out"][idx]
    out.backward(upstream)
    grads = {name: t.grad for name, t in leaves.items()}
    return verdicts + _gradients(case, x, grads, upstream[idx], rows, tolerance), len(rows)


def _outputs(case, x: dict, out, rows, tolerance) -> list:
    import torch

    from nwfast import testing

    q, k, v, w = x["query"], x["key"], x["value"], x["w"]
    # NumPy peers compute in float64: judged in the case's dtype, like the rest.
    shape = (case.n,) if case.op == "rows" else (case.n, *v.shape[1:])
    out = torch.as_tensor(out).to(v.device, v.dtype).reshape(shape)
    idx = rows.to(v.device)
    if case.op == "rows":
        return [testing.check_rows(out[idx], q[idx], k[idx], v[idx], w)]
    leave_out = rows if case.exclude_self else False
    return [
        testing.check_pool(out[idx], q[idx], k, v, w, exclude_self=leave_out, tolerance=tolerance)
    ]


def _gradients(case, x: dict, grads: dict, upstream, rows, tolerance) -> list:
    import torch

    from nwfast import testing

    q, k, v, w = x["query"], x["key"], x["value"], x["w"]
    idx = rows.to(v.device)
    if case.op == "rows":
        got = [grads["query"][idx], grads["key"][idx], grads["value"][idx], grads["w"]]
        verdicts = testing.check_rows_gradients(got, q[idx], k[idx], v[idx], w, upstream)
        per_row = ("query", "key", "value")
    else:
        got = [grads["query"][idx], grads["key"], grads["value"], grads["w"]]
        leave_out = rows if case.exclude_self else False
        verdicts = testing.check_pool_gradients(
            got, q[idx], k, v, w, upstream, exclude_self=leave_out, tolerance=tolerance
        )
        per_row = ("query",)
    # Per-row gradients of the rows not judged had a zero upstream: exact zeros.
    outside = torch.ones(case.n, dtype=torch.bool)
    outside[rows] = False
    for name in per_row if outside.any() else ():
        g = grads[name][outside.to(v.device)]
        verdicts.append(testing.compare(g, torch.zeros_like(g), 0.0, f"grad of {name} (rest)"))
    return verdicts


def summary(verdicts: list, rows: int) -> dict:
    """The row's check fields: ok, and the verdict nearest to failing."""

    def margin(v):
        if v.allowed:
            return v.error / v.allowed
        return math.inf if v.error > 0 else 0.0

    worst = max(verdicts, key=margin)
    return {
        "check_ok": all(v.ok for v in verdicts),
        "check_error": worst.error,
        "check_allowed": worst.allowed,
        "check_worst": f"{worst.name} {worst.detail}".strip(),
        "check_rows": rows,
    }


def loo_mse(X, y, h, estimator="local-constant") -> float:
    """Leave-one-out MSE of the estimator (a fit's mode) at the bandwidth h (one,
    or one per feature) a fit chose.

    Every peer's choice is measured by this one function, so a fast fit that
    picks a poor bandwidth shows.
    """
    import torch

    import nwfast

    X, y, h = torch.from_numpy(X), torch.from_numpy(y)[:, None], torch.as_tensor(h).double()
    # one h per feature: scale each feature by it, then w = 1
    Xs, w = (X, 1 / h**2) if h.numel() == 1 else (X / h, torch.tensor(1.0, dtype=X.dtype))
    with torch.no_grad():
        if estimator == "local-linear":
            pred = nwfast.local_linear_pool(Xs, Xs, y, w, exclude_self=True)
        else:
            pred = nwfast.nw_pool(Xs, Xs, y, w, exclude_self=True)
    return float(((pred - y) ** 2).mean())
