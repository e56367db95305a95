"""Text views of result rows: a line per finished case, a table per run.

``python -m bench report RESULTS.json...`` prints saved runs' tables again.
"""

from __future__ import annotations

import contextlib
import math
import sys

from bench import schema


def human_bytes(b: float | None) -> str:
    if b is None or (isinstance(b, float) and math.isnan(b)):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(b) < 1024 or unit == "TiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return str(b)


def seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} µs"


def _times(x: float | None) -> str:
    """A ratio: two significant digits, whole numbers from 100 up."""
    if x is None:
        return ""
    return f"{x:.0f}×" if x >= 100 else f"{x:.2g}×"


def _share(x: float | None) -> str:
    """A fraction as a percentage, two significant digits below 10%."""
    if x is None:
        return "-"
    return f"{x:.0%}" if x >= 0.1 else f"{100 * x:.2g}%"


def _size(row: dict) -> str:
    return f"{row['n']}²" if row["n"] == row["m"] else f"{row['n']}x{row['m']}"


def _check(row: dict) -> str:
    if row["check_ok"] is None:
        return "-"
    mark = "ok" if row["check_ok"] else "[bold red]WRONG[/bold red]"
    return f"{mark} {row['check_error']:.0e}/{row['check_allowed']:.0e}"


def _status(row: dict) -> str:
    color = {"oom": "magenta", "skipped": "dim"}.get(row["status"], "red")
    return f"[{color}]{row['status']}[/{color}]"


def line(row: dict) -> str:
    """The line printed as a case finishes."""
    head = f"{row['op']} {row['mode']} {row['dtype']} {_size(row)} {row['peer']}"
    if row["status"] != "ok":
        return f"  {_status(row):>7} {head}: {row['note'] or ''}"
    if row["op"] == "fit":
        h = ", ".join(f"{v:.4g}" for v in row["bandwidth"])
        extra = f"h = {h}, LOO MSE {row['loo_mse']:.5g}" if row["loo_mse"] else f"h = {h}"
    else:
        extra = f"{row['ns_per_pair']:.3g} ns/pair, first call {seconds(row['first_call_s'])}"
    if row["check_ok"] is False:
        extra += f", [bold red]WRONG: {row['check_worst']}[/bold red]"
    return f"  [green]{'ok':>7}[/green] {head}: {seconds(row['median_s'])} ({extra})"


@contextlib.contextmanager
def progress(con, order: list):
    """A progress bar over the cases in run order; yields on_row(row)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=con,
    )
    with bar:
        task = bar.add_task(order[0].label() if order else "done", total=len(order))

        def on_row(row):
            bar.console.print(line(row))
            i = int(bar.tasks[0].completed) + 1
            bar.update(task, advance=1, description=order[i].label() if i < len(order) else "done")

        yield on_row


# (header, justify, cell) per column; a cell is shown for ok rows only.
POOL_COLUMNS = (
    ("median", "right", lambda r: seconds(r["median_s"])),
    ("p20-p80", "right", lambda r: f"{seconds(r['p20_s'])}-{seconds(r['p80_s'])}"),
    ("ns/pair", "right", lambda r: f"{r['ns_per_pair']:.3g}"),
    ("pairs/s", "right", lambda r: f"{r['pairs_per_s']:.2e}"),
    ("nwfast ×", "right", lambda r: _times(r["nwfast_speedup"])),
    ("h", "right", lambda r: "-" if r["h"] is None else f"{r['h']:.3g}"),
    ("kept", "right", lambda r: _share(r["kept_fraction"])),
    ("peak extra", "right", lambda r: human_bytes(r["peak_extra_bytes"])),
    (
        "of bound",
        "right",
        lambda r: (
            "-" if r["bound_fraction"] is None else f"{r['bound_fraction']:.0%} {r['bound_kind']}"
        ),
    ),
    ("check", "left", _check),
)
FIT_COLUMNS = (
    ("fit", "right", lambda r: seconds(r["median_s"])),
    ("p20-p80", "right", lambda r: f"{seconds(r['p20_s'])}-{seconds(r['p80_s'])}"),
    ("h", "right", lambda r: ", ".join(f"{h:.4g}" for h in r["bandwidth"])),
    ("LOO MSE", "right", lambda r: "-" if r["loo_mse"] is None else f"{r['loo_mse']:.5g}"),
    ("nwfast ×", "right", lambda r: _times(r["nwfast_speedup"])),
    (
        "MSE / nwfast's",
        "right",
        lambda r: "" if r["loo_mse_vs_nwfast"] is None else f"{r['loo_mse_vs_nwfast']:.5f}",
    ),
    ("peak extra", "right", lambda r: human_bytes(r["peak_extra_bytes"])),
)


DIST_COLUMNS = (
    ("ranks", "right", lambda r: str(r["ranks"])),
    ("median", "right", lambda r: seconds(r["median_s"])),
    ("p20-p80", "right", lambda r: f"{seconds(r['p20_s'])}-{seconds(r['p80_s'])}"),
    ("efficiency", "right", lambda r: f"{r['scaling_efficiency']:.1%}"),
    ("sent/rank", "right", lambda r: human_bytes(max(r["ring_bytes_per_rank"]))),
    ("load", "right", lambda r: ", ".join(f"{x:.1f}" for x in r["load_averages"])),
    ("check", "left", _check),
)


COLD_COLUMNS = (
    ("total", "right", lambda r: seconds(r["median_s"])),
    ("p20-p80", "right", lambda r: f"{seconds(r['p20_s'])}-{seconds(r['p80_s'])}"),
    ("import torch", "right", lambda r: seconds(r["import_torch_s"])),
    ("import nwfast", "right", lambda r: seconds(r["import_s"])),
    ("forward", "right", lambda r: seconds(r["first_forward_s"])),
    ("backward", "right", lambda r: seconds(r["first_backward_s"])),
    ("float64 forward", "right", lambda r: seconds(r["first_float64_s"])),
)


def _columns(row: dict):
    if row["op"] == "fit":
        return FIT_COLUMNS
    if row["op"] == "cold":
        return COLD_COLUMNS
    return DIST_COLUMNS if row["ranks"] is not None else POOL_COLUMNS


def table(rows: list[dict]):
    """One table per (op, mode, dtype, d, w, data, h rule), a section per size."""
    from rich.console import Group
    from rich.table import Table

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r["op"], r["mode"], r["dtype"], r["d"], r["w_kind"], r["data"], r["h_rule"])
        groups.setdefault(key, []).append(r)
    out = []
    for (op, mode, dtype, d, w_kind, data, h_rule), group in groups.items():
        title = " · ".join(
            [op, mode, dtype]
            + ([f"d={d}"] if d != 1 else [])
            + (["w per key"] if w_kind == "per_key" else [])
            + ([data] if data != "uniform" else [])
            + ([h_rule] if h_rule not in ("h=0.5", None) else [])
        )
        columns = _columns(group[0])
        t = Table(title=title, header_style="bold", title_justify="left")
        t.add_column("n" if op == "fit" else "n = m", justify="right")
        t.add_column("peer")
        for name, justify, _ in columns:
            t.add_column(name, justify=justify, no_wrap=True)
        t.add_column("note", overflow="fold")
        last = None
        for r in group:
            if last is not None and r["n"] != last:
                t.add_section()
            last = r["n"]
            size = str(r["n"]) if op == "fit" else _size(r)
            if r["status"] == "ok":
                cells = [cell(r) for _, _, cell in columns]
            else:
                cells = [_status(r), *[""] * (len(columns) - 1)]
            t.add_row(size, r["peer"], *cells, r["note"] or "")
        out.append(t)
    return Group(*out)


def console():
    """rich's console; full width when the output is a file, not a terminal."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 200)


def show(paths) -> None:
    con = console()
    from bench.goals import show as show_goals

    for path in paths:
        con.print(f"[bold]{path}[/bold]")
        doc = schema.load(path)
        if doc["header"]["kind"] == "sass":
            from bench import sass

            con.print(sass.table(doc["rows"]))
            continue
        con.print(table(doc["rows"]))
        if doc["header"].get("goals"):
            show_goals(con, doc["header"]["goals"], "Goals")
