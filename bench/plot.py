"""``python -m bench plot RESULTS.json... [--out DIR]``: the figures.

Per device and dtype, from the pooling rows (d = 1, one w):

- ``bench_time_*``: time of one call vs n = m, log-log, one line per peer, the
  p20-p80 band around it, the machine's bound dashed, out-of-memory marked x;
- ``bench_speedup_*``: nwfast's speedup over each peer vs n;
- ``bench_memory_*``: peak extra memory vs n (forward), the memory cap, where
  each dense reference ran out of memory;
- ``bench_fwd_bwd_*``: forward, backward and fwd+bwd time per peer at one size.

From the sparse preset's rows (one w, shared keys, any d), ``bench_skipping_*``:
nwfast's fraction of pairs computed and its speedup over its dense pass and
over KeOps' block-sparse ranges, against the bandwidth h.

From the fgt preset's rows, ``bench_fgt_*``: per d and bandwidth rule, the
time of one forward and the error against float64 (bench.check's verdict
nearest to failing) against n, one line per peer and data family, and the
same against h.

The fit rows give ``bench_bandwidth.png``: the time of one fit vs n.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from bench import schema
from bench.cases import same_inputs
from bench.report import human_bytes

# One colour and marker per peer in every figure; nwfast stands out in black.
STYLE = {
    "nwfast": ("black", "o"),
    "nwfast-f32": ("dimgray", "o"),
    "nwfast-dense": ("dimgray", "o"),
    "torch-compile": ("tab:blue", "s"),
    "pykeops": ("tab:green", "D"),
    "pykeops-sparse": ("tab:olive", "d"),
    "torch-broadcast": ("tab:orange", "^"),
    "torch-repeat": ("tab:red", "v"),
    "kernelsmooth": ("tab:brown", "X"),
    "statsmodels": ("tab:purple", "P"),
    "nwfast-skip": ("tab:gray", "s"),
    "kdepy-fft": ("tab:cyan", "*"),
}
HATCH = {"forward": None, "backward": "//", "fwd+bwd": ".."}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "axes.titlesize": 11}
    )
    return plt


def _by(rows, *keys) -> dict:
    out = defaultdict(list)
    for r in rows:
        out[tuple(r[k] for k in keys)].append(r)
    return out


def _k(n: int) -> str:
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20}M"
    if n >= 1024 and n % 1024 == 0:
        return f"{n >> 10}k"
    return str(n)


def _y_format(ax, fmt, base=10) -> None:
    """A log axis labelled by fmt at 1, 2, 5 times each power (each power of 2)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log", base=base)
    ax.yaxis.set_major_locator(LogLocator(base, subs=(1.0, 2.0, 5.0) if base == 10 else (1.0,)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: fmt(v)))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _seconds(s: float) -> str:
    if s >= 1:
        return f"{s:g} s"
    return f"{s * 1e3:g} ms" if s >= 1e-3 else f"{s * 1e6:g} µs"


def _size_axis(ax, rows, label="n = m", fmt=_k) -> None:
    sizes = sorted({r["n"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.margins(x=0.08)  # room for the out-of-memory marks at the last size
    ax.set_xticks(sizes, [fmt(s) for s in sizes])
    ax.minorticks_off()
    ax.set_xlabel(label)


def _panels(plt, count: int, width: float = 5.2):
    cols = 2 if count == 4 else min(count, 3)
    rows = (count + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, 4.0 * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:count])


def _lines(ax, rows, y, band=None) -> list:
    """One line per peer of y(row) over the ok rows; returns each line's end."""
    ends = []
    for (peer,), prs in _by(rows, "peer").items():
        ok = sorted(
            (r for r in prs if r["status"] == "ok" and y(r) is not None), key=lambda r: r["n"]
        )
        if not ok:
            continue
        color, marker = STYLE.get(peer, ("tab:gray", "."))
        xs = [r["n"] for r in ok]
        ax.plot(xs, [y(r) for r in ok], marker=marker, color=color, label=peer)
        if band:
            ax.fill_between(xs, *zip(*(band(r) for r in ok)), color=color, alpha=0.15)
        ends.append((xs[-1], y(ok[-1]), color))
    return ends


def _oom(ax, rows, height: float) -> None:
    """An x at the given height where a peer ran out of memory; peers out at the
    same size are spread sideways, a few percent of an octave each."""
    for k, (peer, (color, _)) in enumerate(STYLE.items()):
        xs = [r["n"] for r in rows if r["peer"] == peer and r["status"] == "oom"]
        if xs:
            shift = 2 ** (0.06 * (k - 4))
            ax.scatter(
                [x * shift for x in xs], [height] * len(xs), marker="x", s=60, color=color, zorder=5
            )
            ax.oom = True  # read by _finish


def _finish(
    plt, fig, axes, head: dict, what: str, dtype: str, path: Path, seen=None, scope="d = 1"
) -> Path:
    """Title, one legend below the panels (each label once), save."""
    from matplotlib.lines import Line2D

    where = head.get("machine") or head["device"]
    if head["device"] == "cpu":
        where += f", {head['threads']} threads"
    fig.suptitle(f"nwfast {what} — {dtype}, {scope}, {where}", fontsize=12)
    seen = seen or {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    if any(getattr(ax, "oom", False) for ax in axes):
        seen["out of memory"] = Line2D([], [], ls="", marker="x", color="gray", markersize=8)
    ncol = min(len(seen), 4) or 1
    fig.legend(seen.values(), seen.keys(), loc="lower center", ncol=ncol, frameon=False)
    fig.tight_layout(rect=(0, 0.04 + 0.035 * math.ceil(len(seen) / ncol), 1, 0.95))
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_time(plt, rows, head, dtype, path: Path) -> Path:
    panels = _by(rows, "op", "mode")
    fig, axes = _panels(plt, len(panels))
    for ax, ((op, mode), group) in zip(axes, panels.items(), strict=True):
        _lines(ax, group, lambda r: r["median_s"], band=lambda r: (r["p20_s"], r["p80_s"]))
        _oom(ax, group, 3 * max([r["median_s"] or 0 for r in group] + [1e-6]))
        bound = sorted({r["n"]: r["bound_s"] for r in group if r["bound_s"]}.items())
        if bound:
            ax.plot(*zip(*bound), "--", color="gray", lw=1, label="machine bound")
        _y_format(ax, _seconds)
        _size_axis(ax, group)
        ax.set_ylabel("time per call (median)")
        ax.set_title(f"{op} · {mode}")
    return _finish(plt, fig, axes, head, "time per call", dtype, path)


def plot_speedup(plt, rows, head, dtype, path: Path) -> Path | None:
    panels = {
        k: g for k, g in _by(rows, "op", "mode").items() if any(r["nwfast_speedup"] for r in g)
    }
    if not panels:
        return None
    fig, axes = _panels(plt, len(panels))
    for ax, ((op, mode), group) in zip(axes, panels.items(), strict=True):
        ends = _lines(ax, group, lambda r: r["nwfast_speedup"])
        # '12×' beside each line's last point, nudged apart (in decades) where
        # two lines end close together.
        last = {}
        for x, y, color in sorted(ends, key=lambda e: (e[0], e[1])):
            pos = max(math.log10(y), last.get(x, -math.inf) + 0.12)
            last[x] = pos
            ax.annotate(
                f"{y:.0f}×" if y >= 10 else f"{y:.1f}×",
                (x, 10**pos),
                xytext=(8, 0),
                textcoords="offset points",
                va="center",
                fontsize=8,
                color=color,
            )
        ax.axhline(1, color="gray", lw=1)
        _y_format(ax, lambda v: f"{v:g}×")
        _size_axis(ax, group)
        ax.set_ylabel("peer's time / nwfast's time")
        ax.set_title(f"{op} · {mode}: nwfast is N× faster")
    return _finish(plt, fig, axes, head, "speedup over each peer", dtype, path)


def _peak(row) -> int | None:
    """RSS moves in 4 KiB pages: less than one reads as one."""
    peak = row["peak_extra_bytes"]
    return None if peak is None else max(peak, 4096)


def plot_memory(plt, rows, head, dtype, path: Path) -> Path | None:
    panels = _by([r for r in rows if r["mode"] == "forward"], "op")
    if not panels:
        return None
    cap = (head["gpu"] or {}).get("memory_bytes") or head["settings"].get("mem_cap_bytes")
    fig, axes = _panels(plt, len(panels))
    for ax, ((op,), group) in zip(axes, panels.items(), strict=True):
        _lines(ax, group, _peak)
        if cap:
            _oom(ax, group, cap * 1.5)
            ax.axhline(cap, color="magenta", lw=1, ls="--", label="memory cap")
        _y_format(ax, lambda v: human_bytes(v).replace(".0 ", " "), base=2)
        _size_axis(ax, group)
        ax.set_ylabel("peak extra memory, forward (≥ 4 KiB)")
        ax.set_title(op)
    return _finish(plt, fig, axes, head, "peak memory beyond the inputs", dtype, path)


def plot_fwd_bwd(plt, rows, head, dtype, path: Path) -> Path | None:
    """Bars per peer at one size: forward and the backward modes side by side."""
    panels = {}
    for (op,), group in _by([r for r in rows if r["status"] == "ok"], "op").items():
        times = defaultdict(dict)  # (peer, n) -> mode -> median
        for r in group:
            times[(r["peer"], r["n"])][r["mode"]] = r["median_s"]
        both = {k: t for k, t in times.items() if "forward" in t and len(t) > 1}
        if both:  # the size where most peers ran both, the largest of those
            count = defaultdict(int)
            for _, size in both:
                count[size] += 1
            n = max(count, key=lambda size: (count[size], size))
            panels[op] = (n, {p: t for (p, size), t in both.items() if size == n})
    if not panels:
        return None
    fig, axes = _panels(plt, len(panels), width=6.0)
    modes = [m for m in HATCH if any(m in t for _, ts in panels.values() for t in ts.values())]
    for ax, (op, (n, times)) in zip(axes, panels.items(), strict=True):
        peers = list(times)
        width = 0.8 / len(modes)
        for j, mode in enumerate(modes):
            xs = [i + (j - (len(modes) - 1) / 2) * width for i in range(len(peers))]
            colors = [STYLE.get(p, ("tab:gray",))[0] for p in peers]
            ax.bar(
                xs,
                [times[p].get(mode, 0) for p in peers],
                width,
                color=colors,
                alpha=0.85,
                hatch=HATCH[mode],
                edgecolor="white",
            )
        for i, p in enumerate(peers):
            if "backward" in times[p]:
                ratio = times[p]["backward"] / times[p]["forward"]
                ax.annotate(
                    f"bwd/fwd\n{ratio:.1f}",
                    (i, max(times[p].values())),
                    xytext=(0, 4),
                    textcoords="offset points",
                    ha="center",
                    fontsize=8,
                )
        ax.set_xticks(range(len(peers)), peers, rotation=20, ha="right")
        ax.margins(y=0.25)
        _y_format(ax, _seconds)
        ax.set_ylabel("time per call (median)")
        ax.set_title(f"{op} · n = m = {_k(n)}")
    # The bar colours are the peers; the legend tells the modes by hatch.
    from matplotlib.patches import Patch

    hatches = {m: Patch(facecolor="lightgray", hatch=HATCH[m], edgecolor="white") for m in modes}
    return _finish(plt, fig, axes, head, "forward / backward split", dtype, path, hatches)


def plot_bandwidth(plt, rows, head, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    _lines(ax, rows, lambda r: r["median_s"], band=lambda r: (r["p20_s"], r["p80_s"]))
    _size_axis(ax, rows, "training points n", fmt="{:,}".format)
    _y_format(ax, _seconds)
    ax.set_ylabel("one fit, bandwidth search included")
    ax.set_title(f"Leave-one-out bandwidth selection — {head['machine']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# Skipping figures: a colour per d, a marker per data family.
DIM_COLOURS = {1: "black", 2: "tab:blue", 3: "tab:red", 4: "tab:green"}
DATA_MARKERS = {"uniform": "o", "unit": "s", "normal": "^", "clustered": "D"}


def plot_skipping(plt, rows, head, dtype, path: Path) -> Path | None:
    """nwfast's forward against h: the fraction of pairs it computed, and its
    speedup over its own dense pass (tolerance=0) and over KeOps' ranges; a
    line joins the bandwidth rules of one (d, data, n)."""
    from matplotlib.lines import Line2D

    mine = [r for r in rows if r["peer"] == "nwfast" and r["mode"] == "forward"]
    mine = [r for r in mine if r["status"] == "ok" and r["kept_fraction"] is not None]
    if not mine:
        return None
    others = {(r["peer"], same_inputs(r)): r for r in rows if r["status"] == "ok"}

    def over(peer):
        def speedup(r):
            other = others.get((peer, same_inputs(r)))
            return other["median_s"] / r["median_s"] if other else None

        return speedup

    panels = (
        ("pairs computed / n m", lambda r: r["kept_fraction"]),
        ("speedup over tolerance=0 (dotted: n m / pairs)", over("nwfast-dense")),
        ("speedup over pykeops-sparse", over("pykeops-sparse")),
    )
    fig, axes = _panels(plt, len(panels))
    for ax, (title, y) in zip(axes, panels, strict=True):
        for (d, data, _size), group in sorted(_by(mine, "d", "data", "n").items()):
            points = sorted((r["h"], y(r)) for r in group if y(r) is not None)
            if not points:
                continue
            colour, marker = DIM_COLOURS.get(d, "tab:gray"), DATA_MARKERS.get(data, ".")
            ax.plot(*zip(*points), color=colour, marker=marker, lw=0.8, alpha=0.6)
            if ax is axes[1]:  # what skipping could give: the pairs it left out
                ideal = sorted((r["h"], 1 / r["kept_fraction"]) for r in group if y(r))
                ax.plot(*zip(*ideal), ls=":", color=colour, lw=0.8)
        ax.set_xscale("log")
        _y_format(ax, (lambda v: f"{v:g}") if ax is axes[0] else (lambda v: f"{v:g}×"))
        ax.set_xlabel("bandwidth h (w = 1 / h²)")
        ax.set_title(title)
    axes[1].axhline(1, color="gray", lw=1)
    axes[2].axhline(1, color="gray", lw=1)
    dims = sorted({r["d"] for r in mine})
    seen = {f"d = {d}": Line2D([], [], color=DIM_COLOURS.get(d, "tab:gray")) for d in dims}
    for data, marker in DATA_MARKERS.items():
        if any(r["data"] == data for r in mine):
            seen[data] = Line2D([], [], ls="", marker=marker, color="gray")
    sizes = ", ".join(_k(n) for n in sorted({r["n"] for r in mine}))
    scope = f"n = m = {sizes}"
    return _finish(plt, fig, axes, head, "block skipping", dtype, path, seen, scope)


def plot_fgt(plt, rows, head, dtype, path: Path) -> Path | None:
    """Far fields: time and error of each peer's forward against n (one panel
    pair per d and bandwidth rule) and against h; a line per (peer, data)."""
    from matplotlib.lines import Line2D

    ok = [r for r in rows if r["status"] == "ok" and r["mode"] == "forward"]
    ok = [r for r in ok if r["op"] == "shared" and r["median_s"]]
    if not ok:
        return None
    panels = sorted({(r["d"], r["h_rule"]) for r in ok})
    fig, axes = _panels(plt, 2 * len(panels) + 2)
    what = (("time per call (median)", "median_s"), ("error vs float64", "check_error"))
    for i, (d, rule) in enumerate(panels):
        for j, (label, field) in enumerate(what):
            ax = axes[2 * i + j]
            mine = [r for r in ok if (r["d"], r["h_rule"]) == (d, rule)]
            for (peer, data), group in sorted(_by(mine, "peer", "data").items()):
                points = sorted((r["n"], r[field]) for r in group if r[field])
                if points:
                    colour, _ = STYLE.get(peer, ("tab:gray", "."))
                    marker = DATA_MARKERS.get(data, ".")
                    ax.plot(*zip(*points), color=colour, marker=marker, lw=0.8)
            _size_axis(ax, mine)
            _y_format(ax, _seconds if j == 0 else (lambda v: f"{v:.0e}"))
            ax.set_ylabel(label)
            ax.set_title(f"d = {d} · h: {rule}")
    for j, (label, field) in enumerate(what):  # against h, every size
        ax = axes[2 * len(panels) + j]
        for (peer, _d, data, _n), group in sorted(_by(ok, "peer", "d", "data", "n").items()):
            points = sorted((r["h"], r[field]) for r in group if r[field] and r["h"])
            if points:
                colour, _ = STYLE.get(peer, ("tab:gray", "."))
                ax.plot(*zip(*points), color=colour, marker=DATA_MARKERS.get(data, "."),
                        lw=0.6, alpha=0.6)  # fmt: skip
        ax.set_xscale("log")
        _y_format(ax, _seconds if j == 0 else (lambda v: f"{v:.0e}"))
        ax.set_xlabel("bandwidth h")
        ax.set_ylabel(label)
        ax.set_title(f"{label} against h")
    seen = {p: Line2D([], [], color=STYLE.get(p, ("tab:gray",))[0]) for p in _by(ok, "peer")}
    seen = {p[0]: line for p, line in seen.items()}
    for data, marker in DATA_MARKERS.items():
        if any(r["data"] == data for r in ok):
            seen[data] = Line2D([], [], ls="", marker=marker, color="gray")
    scope = "d = " + ", ".join(str(d) for d in sorted({r["d"] for r in ok}))
    return _finish(plt, fig, axes, head, "far fields", dtype, path, seen, scope)


def _figure_group(row: dict, preset: str | None = None):
    """Which figures a row belongs to: the fits', the sweep's (d = 1, one w,
    h = 0.5), the skipping one (one w, shared keys) or the far fields' (the
    fgt preset's), per device and dtype."""
    if row["op"] == "fit":
        return "fit"
    if preset == "fgt":
        return "fgt", row["device"], row["dtype"]
    if row["w_kind"] != "scalar":
        return None
    if row["h_rule"] == "h=0.5" and row["d"] == 1:
        return row["device"], row["dtype"]
    if row["op"] == "shared":
        return "skipping", row["device"], row["dtype"]
    return None


def plot_files(paths, out_dir: Path) -> list[Path]:
    """Every figure the files' rows make; returns the paths written."""
    plt = _plt()
    out_dir.mkdir(parents=True, exist_ok=True)
    latest, heads = {}, {}  # a case run in several files: the last file's row
    for p in paths:
        doc = schema.load(p)
        if doc["header"]["kind"] in ("dist", "cold"):  # tables, not these figures
            continue
        preset = doc["header"].get("preset")
        for r in doc["rows"]:
            group = _figure_group(r, preset)
            if group is not None:
                latest[(r["peer"], same_inputs(r))] = (r, group)
                heads[group] = doc["header"]
    groups = defaultdict(list)
    for r, group in latest.values():
        groups[group].append(r)
    made = []
    for group, rows in groups.items():
        if group == "fit":
            made.append(plot_bandwidth(plt, rows, heads["fit"], out_dir / "bench_bandwidth.png"))
            continue
        *kind, device, dtype = group
        figures = {
            (): (plot_time, plot_speedup, plot_memory, plot_fwd_bwd),
            ("skipping",): (plot_skipping,),
            ("fgt",): (plot_fgt,),
        }[tuple(kind)]
        for fn in figures:
            name = fn.__name__.removeprefix("plot_")
            path = out_dir / f"bench_{name}_{device}_{dtype}.png"
            made.append(fn(plt, rows, heads[group], dtype, path))
    return [p for p in made if p]
