"""Text views of result rows: one line per finished case, tables per run.

``python -m bench.report RESULTS.json`` prints a saved run's table again.
"""

from __future__ import annotations

import sys

from bench.cases import human_bytes


def _ms(s: float | None) -> str:
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


def _size(row: dict) -> str:
    return f"{row['n']}²" if row["n"] == row["m"] else f"{row['n']}x{row['m']}"


def _check(row: dict) -> str:
    if row["check_ok"] is None:
        return "-"
    err = row["check_rel_err"]
    mark = "ok" if row["check_ok"] else "[bold red]WRONG[/bold red]"
    return f"{mark} {err:.0e}"


def format_row(row: dict) -> str:
    """The line printed as a case finishes."""
    head = f"{row['layout']} {row['mode']} {row['dtype']} {_size(row)} {row['peer']}"
    if row["status"] != "ok":
        color = {"oom": "magenta", "skipped": "dim"}.get(row["status"], "red")
        return f"  [{color}]{row['status']:>7}[/{color}] {head}: {row['note'] or ''}"
    extra = f"first call {_ms(row['first_call_s'])}"
    if row["check_ok"] is False:
        extra += f", [bold red]disagrees with the reference ({row['check_rel_err']:.1e})[/bold red]"
    return (
        f"  [green]{'ok':>7}[/green] {head}: {_ms(row['median_s'])} "
        f"({row['ns_per_pair']:.3g} ns/pair), {extra}"
    )


COLUMNS = (
    ("n = m", "right"),
    ("peer", "left"),
    ("median", "right"),
    ("p20-p80", "right"),
    ("ns/pair", "right"),
    ("pairs/s", "right"),
    ("nwfast ×", "right"),
    ("peak extra", "right"),
    ("of bound", "right"),
    ("check", "left"),
    ("note", "left"),
)


def _cells(r: dict) -> list[str]:
    if r["status"] != "ok":
        color = {"oom": "magenta", "skipped": "dim"}.get(r["status"], "red")
        status = f"[{color}]{r['status']}[/{color}]"
        return [_size(r), r["peer"], status, *[""] * 7, r["note"] or ""]
    speed, frac = r["nwfast_speedup"], r["bound_fraction"]
    return [
        _size(r),
        r["peer"],
        _ms(r["median_s"]),
        f"{_ms(r['p20_s'])}-{_ms(r['p80_s'])}",
        f"{r['ns_per_pair']:.3g}",
        f"{r['pairs_per_s']:.2e}",
        _times(speed),
        human_bytes(r["peak_extra_bytes"]),
        "-" if frac is None else f"{100 * frac:.0f}% {r['bound_kind']}",
        _check(r),
        r["note"] or "",
    ]


def summary_table(rows: list[dict]):
    """One table per (layout, mode, dtype, d, w), one section per size."""
    from rich.console import Group
    from rich.table import Table

    tables: dict[tuple, list[dict]] = {}
    for r in rows:
        tables.setdefault((r["layout"], r["mode"], r["dtype"], r["d"], r["w_kind"]), []).append(r)
    out = []
    for (layout, mode, dtype, d, w_kind), group in tables.items():
        title = f"{layout} · {mode} · {dtype}" + (f" · d={d}" if d != 1 else "")
        title += " · w per key" if w_kind == "per_key" else ""
        t = Table(title=title, header_style="bold", title_justify="left")
        for name, justify in COLUMNS:
            t.add_column(name, justify=justify, no_wrap=name != "note", overflow="fold")
        last = None
        for r in group:
            if last is not None and (r["n"], r["m"]) != last:
                t.add_section()
            last = (r["n"], r["m"])
            t.add_row(*_cells(r))
        out.append(t)
    return Group(*out)


def bandwidth_table(rows: list[dict]):
    """The bandwidth-selection run: one row per (n, peer)."""
    from rich.table import Table

    t = Table(title="leave-one-out bandwidth selection", title_justify="left", header_style="bold")
    for name in ("n", "peer", "fit", "h", "LOO MSE", "nwfast ×", "MSE / nwfast's", "note"):
        t.add_column(name, justify="left" if name in ("peer", "note") else "right")
    last = None
    for r in rows:
        if last is not None and r["n"] != last:
            t.add_section()
        last = r["n"]
        if r["status"] != "ok":
            t.add_row(
                str(r["n"]), r["peer"], f"[dim]{r['status']}[/dim]", *[""] * 4, r["note"] or ""
            )
            continue
        speed, ratio = r["nwfast_speedup"], r["loo_mse_vs_nwfast"]
        t.add_row(
            str(r["n"]),
            r["peer"],
            _ms(r["fit_s"]),
            ", ".join(f"{h:.4g}" for h in r["bandwidth"]),
            "-" if r["loo_mse"] is None else f"{r['loo_mse']:.5g}",
            _times(speed),
            "" if ratio is None else f"{ratio:.4f}",
            r["note"] or "",
        )
    return t


def main(argv=None) -> int:
    from rich.console import Console

    from bench import schema

    console = Console(width=None if sys.stdout.isatty() else 200)
    for path in argv if argv is not None else sys.argv[1:]:
        doc = schema.load(path)
        console.print(f"[bold]{path}[/bold]")
        if doc["header"].get("kind") == "bandwidth":
            console.print(bandwidth_table(doc["rows"]))
        else:
            console.print(summary_table(doc["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
