"""Goals judged on a run's rows: each a measured value, a target and pass/fail.

A goal whose rows are missing or failed is "not measured" (passed None), with
the reason. ``gpu`` judges the GPU suite's sweep, ``skipping`` the sparse
preset's (``python -m bench sweep --sparse``); both are written into the
results header.
"""

from __future__ import annotations

GPU_N = 262144
SKIP_N = 1 << 18
FGT_N = 10**7


def _find(rows, **want):
    for r in rows:
        if all(r[k] == v for k, v in want.items()):
            return r
    return None


def _ok(row) -> bool:
    return row is not None and row["status"] == "ok"


def _why(row) -> str:
    if row is None:
        return "a case it needs did not run"
    return f"{row['peer']} {row['mode']}: {row['status']}: {row['note']}"


def goal(text, value, target, better, detail="") -> dict:
    passed = None if value is None else (value >= target if better == ">=" else value <= target)
    return {
        "goal": text,
        "value": value,
        "target": f"{'≥' if better == '>=' else '≤'} {target:g}",
        "passed": passed,
        "detail": detail,
    }


def _ratio(text, slow, fast, target, better=">=") -> dict:
    """slow's median / fast's median against a target (nwfast's row is fast)."""
    if _ok(slow) and _ok(fast):
        return goal(text, slow["median_s"] / fast["median_s"], target, better)
    return goal(text, None, target, better, _why(fast if not _ok(fast) else slow))


def gpu(rows: list[dict], limits: dict) -> list[dict]:
    """The GPU goals, shared keys and d = 1 unless said:

    1. float32 forward at n = m = 262144 reaches at least 60% of the exp-unit
       bound (SMs x 16 exp/clock x max SM clock; H100 SXM ~4e12 exp/s);
    2. and runs at least 5x faster than torch.compile of the broadcast form;
    3. the backward takes at most 2.5x the forward's time (same size);
    4. the rows layout (float32 forward, largest n that fits) reads its inputs
       at at least 80% of the card's measured copy bandwidth (read + write
       bytes of a 1 GiB Tensor.copy_ per second).
    """
    shared = {"op": "shared", "dtype": "float32", "n": GPU_N, "m": GPU_N, "d": 1}
    fwd = _find(rows, peer="nwfast", mode="forward", **shared)
    bwd = _find(rows, peer="nwfast", mode="backward", **shared)
    comp = _find(rows, peer="torch-compile", mode="forward", **shared)
    size = f"{GPU_N}²"
    out = [
        goal(
            f"forward float32 {size}: fraction of the exp-unit bound",
            fwd["bound_fraction"] if _ok(fwd) else None,
            0.60,
            ">=",
            "" if _ok(fwd) else _why(fwd),
        ),
        _ratio(f"forward float32 {size}: speedup over torch.compile", comp, fwd, 5.0),
        _ratio(f"backward / forward time, float32 {size}", bwd, fwd, 2.5, "<="),
    ]
    rows_ok = [
        r
        for r in rows
        if r["peer"] == "nwfast"
        and r["op"] == "rows"
        and r["mode"] == "forward"
        and r["dtype"] == "float32"
        and r["status"] == "ok"
    ]
    big = max(rows_ok, key=lambda r: r["n"], default=None)
    copy = limits.get("copy_bytes_per_s")
    out.append(
        goal(
            "rows layout float32 forward: bytes read / s over the copy probe's"
            + (f", {big['n']}²" if big else ""),
            big["bound_work"] / big["median_s"] / copy if big and copy else None,
            0.80,
            ">=",
            "" if big else "no rows case of nwfast ran",
        )
    )
    return out


def skipping(rows: list[dict]) -> list[dict]:
    """The block-skipping goals, float32, n = m = 2^18, one w, same run:

    1. d = 1, uniform on [0, 5), h = 0.01: the default forward at least 20x
       faster than ``tolerance=0`` (nwfast-dense);
    2. forward + backward at least 10x;
    3. the forward's error: ||out - float64 reference|| over the judged rows
       (bench.check), at most 1e-5;
    4. d = 2 in the unit square, h = 0.01: the forward at least 20x.
    """
    case = {"op": "shared", "dtype": "float32", "n": SKIP_N, "m": SKIP_N, "h_rule": "h=0.01"}
    line = {"d": 1, "data": "uniform", **case}
    square = {"d": 2, "data": "unit", **case}
    fwd = _find(rows, peer="nwfast", mode="forward", **line)
    both = _find(rows, peer="nwfast", mode="fwd+bwd", **line)
    flat = _find(rows, peer="nwfast", mode="forward", **square)

    def dense(mode, **want):
        return _find(rows, peer="nwfast-dense", mode=mode, **want)

    size = f"{SKIP_N}²"
    return [
        _ratio(
            f"d=1 h=0.01 forward {size}: speedup over tolerance=0",
            dense("forward", **line),
            fwd,
            20.0,
        ),
        _ratio(
            f"d=1 h=0.01 fwd+bwd {size}: speedup over tolerance=0",
            dense("fwd+bwd", **line),
            both,
            10.0,
        ),
        goal(
            f"d=1 h=0.01 forward {size}: error against float64",
            fwd["check_error"] if _ok(fwd) else None,
            1e-5,
            "<=",
            "" if _ok(fwd) else _why(fwd),
        ),
        _ratio(
            f"d=2 unit square h=0.01 forward {size}: speedup over tolerance=0",
            dense("forward", **square),
            flat,
            20.0,
        ),
    ]


def fgt(rows: list[dict]) -> list[dict]:
    """The far-field goals, nwfast's default call, same run (wall time: on a
    shared machine, read the load average in the header beside it):

    1. d = 1, n = m = 10^7, uniform on [0, 5), Silverman's h, float32
       forward: at most 5 s;
    2. NadarayaWatson("loo").fit, 1-D, n = 10^6: at most 5 s;
    3. the same at n = 10^7: at most 60 s;
    4. d = 2, n = m = 10^6, the unit square, Silverman's h, float32 forward:
       at most 10 s;
    5. every nwfast row of the run that expanded something within the test
       suite's tolerances of the float64 reference (bench.check), counted
       as the rows that fail (0 to meet it).
    """
    line = {"op": "shared", "mode": "forward", "dtype": "float32", "h_rule": "silverman"}
    big = _find(rows, peer="nwfast", n=FGT_N, d=1, data="uniform", **line)
    square = _find(rows, peer="nwfast", n=10**6, d=2, data="unit", **line)

    def fit(n):
        return _find(rows, peer="nwfast", op="fit", n=n)

    def seconds(text, row, target):
        return goal(text, row["median_s"] if _ok(row) else None, target, "<=",
                    "" if _ok(row) else _why(row))  # fmt: skip

    expanded = [
        r
        for r in rows
        if r["peer"] == "nwfast" and _ok(r) and (r.get("expanded_fraction") or 0) > 0
    ]
    judged = [r for r in expanded if r["check_ok"] is not None]
    failed = sum(not r["check_ok"] for r in judged)
    return [
        seconds("d=1 n=m=1e7 silverman forward float32: seconds", big, 5.0),
        seconds('NadarayaWatson("loo").fit n=1e6: seconds', fit(10**6), 5.0),
        seconds('NadarayaWatson("loo").fit n=1e7: seconds', fit(FGT_N), 60.0),
        seconds("d=2 n=m=1e6 unit square silverman forward float32: seconds", square, 10.0),
        goal(
            "rows with expansions off the float64 reference's tolerance",
            failed if judged else None,
            0,
            "<=",
            f"{len(judged)} judged" if judged else "no row with expansions was judged",
        ),
    ]


def show(con, goals: list[dict], title: str) -> None:
    from rich.table import Table

    t = Table(title=title, title_justify="left", header_style="bold")
    for col in ("goal", "measured", "target", "result"):
        t.add_column(col)
    for g in goals:
        value = "-" if g["value"] is None else f"{g['value']:.3g}"
        if g["passed"] is None:
            result = f"[yellow]not measured[/yellow] {g['detail']}"
        else:
            result = "[green]met[/green]" if g["passed"] else "[bold red]missed[/bold red]"
        t.add_row(g["goal"], value, g["target"], result)
    con.print(t)
