"""Every peer's output and gradients against ``nwfast.reference`` in float64.

At sizes where the float64 reference itself would be slow or large, the check
takes a random subset of query rows. The backward check stays exact on a
subset too: an upstream gradient that is zero outside the subset makes every
gradient (dkey, dvalue and dw included) depend on the subset's rows alone.
"""

from __future__ import annotations

import math

# DESIGN 4: relative error ||out - ref|| / ||ref|| per dtype.
TOL = {"float64": 1e-12, "float32": 1e-5, "bfloat16": 1e-2, "float16": 1e-2}
FULL_CHECK_PAIRS = 1 << 24  # up to 4096 x 4096 every row is compared
SUBSET_ROWS = 128
CHUNK_ELEMENTS = 1 << 24  # float64 reference work per chunk of rows


def rows_to_check(case):
    """All rows, or a fixed random subset; a sorted LongTensor either way."""
    import torch

    if case.pairs <= FULL_CHECK_PAIRS:
        return torch.arange(case.n)
    gen = torch.Generator().manual_seed(1)
    return torch.randperm(case.n, generator=gen)[:SUBSET_ROWS].sort().values


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref||; inf when NaN/inf sit in different places."""
    import torch

    out = torch.as_tensor(out).detach().to("cpu", torch.float64).reshape(ref.shape)
    ref = ref.detach().to("cpu", torch.float64)
    inf_o, inf_r = out.isinf(), ref.isinf()
    if not torch.equal(out.isnan(), ref.isnan()) or not torch.equal(inf_o, inf_r):
        return math.inf
    if not torch.equal(out[inf_o], ref[inf_r]):
        return math.inf  # +inf where the reference has -inf
    fin = torch.isfinite(ref)
    diff = (out[fin] - ref[fin]).norm().item()
    norm = ref[fin].norm().item()
    return diff / norm if norm > 0 else diff


def _leaves(case, x: dict, rows, grad: bool):
    """float64 copies of the inputs on the case's device, as autograd leaves.

    In the rows layout only the checked rows of keys and values are copied:
    their other rows play no part in the checked outputs.
    """
    import torch

    def leaf(t):
        return t.detach().to(torch.float64).requires_grad_(grad)

    if case.layout == "rows":
        idx = rows.to(x["key"].device)
        out = {name: leaf(x[name][idx]) for name in ("query", "key", "value")}
        out["w"] = leaf(x["w"])
        return out
    out = {name: leaf(x[name]) for name in ("key", "value", "w")}
    out["query"] = out["key"] if case.exclude_self else leaf(x["query"])
    return out


def _reference_rows(case, r: dict, rows):
    """Reference outputs for the given query rows (a list of per-chunk tensors)."""
    import torch

    from nwfast import reference

    q, k, v, w = r["query"], r["key"], r["value"], r["w"]
    if case.layout == "rows":  # r holds the checked rows only
        step = max(1, CHUNK_ELEMENTS // case.m)
        return [
            reference.nw_pool_rows_broadcast(q[i : i + step], k[i : i + step], v[i : i + step], w)
            for i in range(0, len(rows), step)
        ]
    if case.exclude_self and len(rows) == case.n:
        return [reference.nw_pool_broadcast(q, k, v, w, exclude_self=True)]
    if case.exclude_self:
        # The textbook's way: drop key i for query i. Done row by row, it is
        # independent of how nwfast masks the diagonal.
        outs = []
        for i in rows.tolist():
            keep = torch.cat([torch.arange(i), torch.arange(i + 1, case.m)]).to(k.device)
            wi = w[keep] if case.w_kind == "per_key" else w
            outs.append(reference.nw_pool_broadcast(q[i : i + 1], k[keep], v[keep], wi))
        return outs
    step = max(1, CHUNK_ELEMENTS // (case.m * case.d))
    return [reference.nw_pool_broadcast(q[idx], k, v, w) for idx in rows.to(q.device).split(step)]


def reference_output(case, x: dict, rows):
    import torch

    r = _leaves(case, x, rows, grad=False)
    with torch.no_grad():
        return torch.cat(_reference_rows(case, r, rows))


def check_output(case, out, x: dict, rows) -> float:
    import torch

    out = torch.as_tensor(out).detach()
    return rel_err(out[rows.to(out.device)], reference_output(case, x, rows))


def subset_grad_out(case, x: dict, rows):
    """The timed upstream gradient, zero outside the checked rows."""
    import torch

    g = torch.zeros_like(x["grad_out"])
    idx = rows.to(g.device)
    g[idx] = x["grad_out"][idx]
    return g


def check_grads(case, grads: dict, x: dict, rows, g_subset) -> float:
    """Worst relative error over the gradients the peer produced."""
    import torch

    r = _leaves(case, x, rows, grad=True)
    g = g_subset.detach().to(torch.float64)[rows.to(g_subset.device)]
    outs = torch.cat(_reference_rows(case, r, rows))
    (outs * g.reshape(outs.shape)).sum().backward()
    names = ("key", "value", "w") if case.exclude_self else ("query", "key", "value", "w")
    worst = 0.0
    for name in names:
        got = grads.get(name)
        if got is None:
            return math.inf  # the peer dropped a gradient it owes
        ref = r[name].grad
        if case.layout == "rows" and name != "w":
            # Rows outside the subset must hold exact zeros.
            idx = rows.to(got.device)
            if torch.count_nonzero(got).item() != torch.count_nonzero(got[idx]).item():
                return math.inf
            got = got[idx]
        worst = max(worst, rel_err(got, ref))
    return worst
