"""``python -m bench.plot RESULTS.json... [--out DIR]``: the sweep's figures.

Per device and dtype, four PNGs:

- ``bench_time_*``: time of one call vs n = m, log-log, one line per peer, the
  p20-p80 band around it, the machine's bound dashed, out-of-memory marked x;
- ``bench_speedup_*``: nwfast's speedup over each peer vs n;
- ``bench_memory_*``: peak extra memory vs n, the memory cap, where each dense
  reference ran out of memory;
- ``bench_fwd_bwd_*``: forward, backward and fwd+bwd time per peer at one size.

A bandwidth-selection file gives ``bench_bandwidth.png``: fit time vs n.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path

from bench import schema

# One colour and marker per peer in every figure; nwfast stands out in black.
STYLE = {
    "nwfast": ("black", "o"),
    "nwfast-f32": ("dimgray", "o"),
    "torch-repeat": ("tab:red", "v"),
    "torch-broadcast": ("tab:orange", "^"),
    "torch-compile": ("tab:blue", "s"),
    "pykeops": ("tab:green", "D"),
    "statsmodels": ("tab:purple", "P"),
    "kernelsmooth": ("tab:brown", "X"),
}
MODE_STYLE = {"forward": "-", "backward": "--", "fwd+bwd": ":"}


def _style(peer: str):
    return STYLE.get(peer, ("tab:gray", "."))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "figure.dpi": 110,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.titlesize": 11,
            "legend.fontsize": 9,
        }
    )
    return plt


def _size_axis(ax, sizes) -> None:
    ax.set_xscale("log", base=2)
    ax.margins(x=0.08)  # room for the out-of-memory marks at the last size
    ax.set_xticks(sorted(sizes))
    ax.set_xticklabels([_k(s) for s in sorted(sizes)], rotation=0)
    ax.minorticks_off()
    ax.set_xlabel("n = m")


def _k(n: int) -> str:
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20}M"
    if n >= 1024 and n % 1024 == 0:
        return f"{n >> 10}k"
    return str(n)


def _seconds(ax) -> None:
    from matplotlib.ticker import FuncFormatter

    def fmt(s, _pos):
        if s >= 1:
            return f"{s:g} s"
        if s >= 1e-3:
            return f"{s * 1e3:g} ms"
        return f"{s * 1e6:g} µs"

    ax.yaxis.set_major_formatter(FuncFormatter(fmt))


def _by(rows, *keys):
    out = defaultdict(list)
    for r in rows:
        out[tuple(r[k] for k in keys)].append(r)
    return out


def _panels(plt, count: int, width: float = 5.2, height: float = 4.0):
    cols = 2 if count == 4 else min(count, 3)
    rows = (count + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[count:]:
        ax.set_visible(False)
    return fig, flat[:count]


def _oom(ax, rows, y: float, color) -> None:
    """Mark the sizes where a peer ran out of memory with an x at height y.

    Peers that ran out at the same size are spread sideways, a few percent
    of an octave each, so that every x shows.
    """
    xs = [r["n"] for r in rows if r["status"] == "oom"]
    if not xs:
        return
    k = list(STYLE).index(rows[0]["peer"]) if rows[0]["peer"] in STYLE else 0
    shift = 2 ** (0.06 * (k - 3))
    ax.scatter([x * shift for x in xs], [y] * len(xs), marker="x", s=60, color=color, zorder=5)
    ax.oom = True  # read by _legend


def _legend(fig, axes) -> None:
    """One legend for the figure, below the panels, each label once."""
    from matplotlib.lines import Line2D

    seen = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    if any(getattr(ax, "oom", False) for ax in axes):
        seen["out of memory"] = Line2D([], [], ls="", marker="x", color="gray", markersize=8)
    ncol = min(len(seen), 4)
    fig.legend(seen.values(), seen.keys(), loc="lower center", ncol=ncol, frameon=False)
    rows = (len(seen) + ncol - 1) // max(ncol, 1)
    fig.tight_layout(rect=(0, 0.04 + 0.035 * rows, 1, 0.95))


def _title(fig, head: dict, what: str, dtype: str) -> None:
    machine = head.get("machine") or head.get("device")
    threads = head.get("threads")
    where = f"{machine}, {threads} threads" if head.get("device") == "cpu" else machine
    fig.suptitle(f"nwfast {what} — {dtype}, d = 1, {where}", fontsize=12)


def plot_time(plt, rows, head, dtype, path: Path) -> Path:
    panels = _by(rows, "layout", "mode")
    fig, axes = _panels(plt, len(panels))
    for ax, ((layout, mode), group) in zip(axes, panels.items(), strict=True):
        sizes = {r["n"] for r in group}
        bound = {r["n"]: r["bound_s"] for r in group if r["bound_s"]}
        top = max([r["median_s"] for r in group if r["median_s"]] + [1e-6])
        for peer, prs in _by(group, "peer").items():
            color, marker = _style(peer[0])
            ok = sorted((r for r in prs if r["status"] == "ok"), key=lambda r: r["n"])
            if ok:
                xs = [r["n"] for r in ok]
                ax.plot(xs, [r["median_s"] for r in ok], marker=marker, color=color, label=peer[0])
                ax.fill_between(
                    xs, [r["p20_s"] for r in ok], [r["p80_s"] for r in ok], color=color, alpha=0.15
                )
            _oom(ax, prs, top * 3, color)
        if bound:
            xs = sorted(bound)
            ax.plot(xs, [bound[x] for x in xs], "--", color="gray", lw=1, label="machine bound")
        ax.set_yscale("log")
        _seconds(ax)
        _size_axis(ax, sizes)
        ax.set_ylabel("time per call (median)")
        ax.set_title(f"{layout} · {mode}")
    _title(fig, head, "time per call", dtype)
    _legend(fig, axes)
    fig.savefig(path)
    plt.close(fig)
    return path


def _end_labels(ax, ends, gap: float = 0.12) -> None:
    """'12×' beside the last point of each line, nudged apart (in decades) where
    two lines end close together."""
    at_x = defaultdict(list)
    for x, y, color in ends:
        at_x[x].append((y, color))
    for x, items in at_x.items():
        last = None
        for y, color in sorted(items):
            pos = math.log10(y)
            if last is not None and pos - last < gap:
                pos = last + gap
            last = pos
            ax.annotate(
                f"{y:.0f}×" if y >= 10 else f"{y:.1f}×",
                (x, 10**pos),
                textcoords="offset points",
                xytext=(8, 0),
                va="center",
                fontsize=8,
                color=color,
            )


def plot_speedup(plt, rows, head, dtype, path: Path) -> Path | None:
    panels = {
        k: g for k, g in _by(rows, "layout", "mode").items() if any(r["nwfast_speedup"] for r in g)
    }
    if not panels:
        return None
    fig, axes = _panels(plt, len(panels))
    for ax, ((layout, mode), group) in zip(axes, panels.items(), strict=True):
        ends = []
        for peer, prs in _by(group, "peer").items():
            ok = sorted((r for r in prs if r["nwfast_speedup"]), key=lambda r: r["n"])
            if not ok:
                continue
            color, marker = _style(peer[0])
            xs, ys = [r["n"] for r in ok], [r["nwfast_speedup"] for r in ok]
            ax.plot(xs, ys, marker=marker, color=color, label=peer[0])
            ends.append((xs[-1], ys[-1], color))
        _end_labels(ax, ends)
        ax.axhline(1, color="gray", lw=1)
        ax.set_yscale("log")
        from matplotlib.ticker import FuncFormatter

        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:g}×"))
        _size_axis(ax, {r["n"] for r in group})
        ax.set_ylabel("peer's time / nwfast's time")
        ax.set_title(f"{layout} · {mode}: nwfast is N× faster")
    _title(fig, head, "speedup over each peer", dtype)
    _legend(fig, axes)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_memory(plt, rows, head, dtype, path: Path) -> Path | None:
    group_rows = [r for r in rows if r["mode"] == "forward"]
    panels = _by(group_rows, "layout")
    if not panels:
        return None
    cap = (head.get("settings") or {}).get("mem_cap_bytes")
    if head.get("gpu"):
        cap = head["gpu"].get("memory_bytes")
    fig, axes = _panels(plt, len(panels))
    floor = 4 << 10  # RSS moves in 4 KiB pages: less than one reads as one
    for ax, ((layout,), group) in zip(axes, panels.items(), strict=True):
        for peer, prs in _by(group, "peer").items():
            color, marker = _style(peer[0])
            ok = sorted(
                (r for r in prs if r["status"] == "ok" and r["peak_extra_bytes"] is not None),
                key=lambda r: r["n"],
            )
            if ok:
                ys = [max(r["peak_extra_bytes"], floor) for r in ok]
                ax.plot([r["n"] for r in ok], ys, marker=marker, color=color, label=peer[0])
            if cap:
                _oom(ax, prs, cap * 1.5, color)
        if cap:
            ax.axhline(cap, color="magenta", lw=1, ls="--", label="memory cap")
        ax.set_yscale("log", base=2)
        from matplotlib.ticker import FuncFormatter

        from bench.cases import human_bytes

        ax.yaxis.set_major_formatter(
            FuncFormatter(lambda v, _p: human_bytes(v).replace(".0 ", " "))
        )
        _size_axis(ax, {r["n"] for r in group})
        ax.set_ylabel("peak extra memory, forward (≥ 4 KiB)")
        ax.set_title(f"{layout}")
    _title(fig, head, "peak memory beyond the inputs", dtype)
    _legend(fig, axes)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_fwd_bwd(plt, rows, head, dtype, path: Path) -> Path | None:
    """Bars per peer at the largest size where its forward and backward both ran."""
    panels = {}
    for (layout,), group in _by(rows, "layout").items():
        ok = [r for r in group if r["status"] == "ok"]
        modes = {r["mode"] for r in ok}
        if "forward" in modes and len(modes) > 1:
            panels[layout] = ok
    if not panels:
        return None
    fig, axes = _panels(plt, len(panels), width=6.0)
    for ax, (layout, ok) in zip(axes, panels.items(), strict=True):
        both = defaultdict(dict)
        for r in ok:
            both[(r["peer"], r["n"])][r["mode"]] = r["median_s"]
        sizes = [n for (_p, n), m in both.items() if "forward" in m and len(m) > 1]
        n = max(sizes)
        peers = [p for (p, s) in both if s == n and len(both[(p, s)]) > 1]
        modes = [
            m for m in ("forward", "backward", "fwd+bwd") if any(m in both[(p, n)] for p in peers)
        ]
        width = 0.8 / len(modes)
        for j, mode in enumerate(modes):
            xs = [i + (j - (len(modes) - 1) / 2) * width for i in range(len(peers))]
            ys = [both[(p, n)].get(mode, 0) for p in peers]
            hatch = {"forward": None, "backward": "//", "fwd+bwd": ".."}[mode]
            ax.bar(
                xs,
                ys,
                width,
                label=mode,
                color=[_style(p)[0] for p in peers],
                alpha=0.85,
                hatch=hatch,
                edgecolor="white",
            )
        for i, p in enumerate(peers):
            f, b = both[(p, n)].get("forward"), both[(p, n)].get("backward")
            if f and b:
                top = max(both[(p, n)].values())
                ax.annotate(
                    f"bwd/fwd\n{b / f:.1f}",
                    (i, top),
                    textcoords="offset points",
                    xytext=(0, 4),
                    ha="center",
                    fontsize=8,
                )
        ax.set_xticks(range(len(peers)))
        ax.set_xticklabels(peers, rotation=20, ha="right")
        ax.set_yscale("log")
        ax.margins(y=0.25)
        _seconds(ax)
        ax.set_ylabel("time per call (median)")
        ax.set_title(f"{layout} · n = m = {_k(n)}")
    _title(fig, head, "forward / backward split", dtype)
    # The bar colours are the peers; the legend tells the modes by hatch.
    from matplotlib.patches import Patch

    handles = [
        Patch(
            facecolor="lightgray",
            hatch={"forward": None, "backward": "//", "fwd+bwd": ".."}[m],
            edgecolor="white",
            label=m,
        )
        for m in ("forward", "backward", "fwd+bwd")
        if any(m in {r["mode"] for r in g} for g in panels.values())
    ]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_bandwidth(plt, rows, head, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for peer, prs in _by(rows, "peer").items():
        ok = sorted((r for r in prs if r["status"] == "ok"), key=lambda r: r["n"])
        if not ok:
            continue
        color, marker = _style(peer[0])
        ax.plot(
            [r["n"] for r in ok],
            [r["fit_s"] for r in ok],
            marker=marker,
            color=color,
            label=peer[0],
        )
    sizes = sorted({r["n"] for r in rows})
    ax.set_xscale("log")
    ax.set_xticks(sizes)
    ax.set_xticklabels([f"{n:,}" for n in sizes])
    ax.minorticks_off()
    ax.margins(x=0.08)
    ax.set_yscale("log")
    _seconds(ax)
    ax.set_xlabel("training points n")
    ax.set_ylabel("one fit, bandwidth search included")
    ax.set_title(f"Leave-one-out bandwidth selection — {head.get('machine')}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_files(paths, out_dir: Path) -> list[Path]:
    plt = _plt()
    out_dir.mkdir(parents=True, exist_ok=True)
    made = []
    sweeps = defaultdict(list)
    heads = {}
    for p in paths:
        doc = schema.load(p)
        head = doc["header"]
        if head.get("kind") == "bandwidth":
            made.append(plot_bandwidth(plt, doc["rows"], head, out_dir / "bench_bandwidth.png"))
            continue
        for r in doc["rows"]:
            if r["d"] == 1 and r["w_kind"] == "scalar":
                sweeps[(r["device"], r["dtype"])].append(r)
                heads[(r["device"], r["dtype"])] = head
    for (device, dtype), rows in sweeps.items():
        head = heads[(device, dtype)]
        tag = f"{device}_{dtype}"
        made.append(plot_time(plt, rows, head, dtype, out_dir / f"bench_time_{tag}.png"))
        for fn, name in (
            (plot_speedup, "speedup"),
            (plot_memory, "memory"),
            (plot_fwd_bwd, "fwd_bwd"),
        ):
            p = fn(plt, rows, head, dtype, out_dir / f"bench_{name}_{tag}.png")
            if p:
                made.append(p)
    return made


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.plot",
        description="PNG figures from the JSON files of python -m bench and bench.bandwidth.",
    )
    p.add_argument("results", nargs="+", type=Path, help="JSON files from python -m bench")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    for path in plot_files(args.results, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
