"""``bench/gpu_suite.sh OUTDIR`` (``python -m bench gpu OUTDIR``): the GPU in one command.

The GPU goal, shared keys and d = 1 unless said:

1. float32 forward at n = m = 262144 reaches at least 60% of the exp-unit
   bound (SMs x 16 exp/clock x max SM clock; H100 SXM ~4e12 exp/s);
2. and runs at least 5x faster than torch.compile of the broadcast form;
3. the backward takes at most 2.5x the forward's time (same size);
4. the rows layout (float32 forward, largest n that fits) reads its inputs at
   at least 80% of the card's measured copy bandwidth (read + write bytes of
   a 1 GiB Tensor.copy_ per second).

Steps: (1) the whole test suite natively, the gpu-marked tests included,
``python -m pytest -m "gpu or not gpu"``; (2) the GPU sweep:
forward and backward, float32 and bfloat16, shared keys n = m = 4096 ... 2^20,
rows layout 4096 ... 65536 (as far as memory goes), beside torch eager (both
forms), torch.compile and pykeops where it imports; (3) the goals, judged on
the sweep's rows; (4) the plots. OUTDIR gets the JSON (its header holds the
goals), the test log and the PNGs.

Budget: 9 minutes in all, the tests capped at 240 s. A peer stops where a call
is predicted past the gpu preset's time cap or memory runs out; the sweep as a
whole stops starting new cases when its share of the budget is spent.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from bench import schema
from bench.report import console

# The whole suite fits in a 10-minute slot on a GPU machine.
BUDGET_S = 9 * 60
TEST_BUDGET_S = 240
GOAL_N = 262144
PEERS = ["nwfast", "torch-compile", "pykeops", "torch-broadcast", "torch-repeat"]
REPO = Path(__file__).resolve().parent.parent


def _find(rows, **want):
    for r in rows:
        if all(r[k] == v for k, v in want.items()):
            return r
    return None


def _goal(text, value, target, better, detail=""):
    passed = None if value is None else (value >= target if better == ">=" else value <= target)
    return {
        "goal": text,
        "value": value,
        "target": f"{'≥' if better == '>=' else '≤'} {target:g}",
        "passed": passed,
        "detail": detail,
    }


def judge(rows: list[dict], limits: dict) -> list[dict]:
    """The four goals, each with its measured value and pass/fail (None: not measured)."""
    shared = {"op": "shared", "dtype": "float32", "n": GOAL_N, "m": GOAL_N, "d": 1}
    fwd = _find(rows, peer="nwfast", mode="forward", **shared)
    bwd = _find(rows, peer="nwfast", mode="backward", **shared)
    comp = _find(rows, peer="torch-compile", mode="forward", **shared)

    def ok(r):
        return r is not None and r["status"] == "ok"

    def why(r, name):
        return f"{name}: " + ("not run" if r is None else f"{r['status']}: {r['note']}")

    size = f"{GOAL_N}²"
    goals = [
        _goal(
            f"forward float32 {size}: fraction of the exp-unit bound",
            fwd["bound_fraction"] if ok(fwd) else None,
            0.60,
            ">=",
            "" if ok(fwd) else why(fwd, "nwfast forward"),
        ),
        _goal(
            f"forward float32 {size}: speedup over torch.compile",
            comp["median_s"] / fwd["median_s"] if ok(fwd) and ok(comp) else None,
            5.0,
            ">=",
            "" if ok(comp) else why(comp, "torch.compile"),
        ),
        _goal(
            f"backward / forward time, float32 {size}",
            bwd["median_s"] / fwd["median_s"] if ok(fwd) and ok(bwd) else None,
            2.5,
            "<=",
            "" if ok(bwd) else why(bwd, "nwfast backward"),
        ),
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
    goals.append(
        _goal(
            "rows layout float32 forward: bytes read / s over the copy probe's"
            + (f", {big['n']}²" if big else ""),
            big["bound_work"] / big["median_s"] / copy if big and copy else None,
            0.80,
            ">=",
            "" if big else "no rows case of nwfast ran",
        )
    )
    return goals


def print_goals(con, goals: list[dict]) -> None:
    from rich.table import Table

    t = Table(title="GPU goals", title_justify="left", header_style="bold")
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


def run_tests(out: Path, con) -> int:
    """The whole test suite on the GPU, the gpu-marked tests included."""
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu or not gpu", "-q", "-rs"]
    con.rule(f"1. tests: {' '.join(cmd[1:])}")
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=TEST_BUDGET_S)
        text, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        text = exc.stdout or ""
        text = text.decode(errors="replace") if isinstance(text, bytes) else text
        text += f"\nstopped after {TEST_BUDGET_S} s\n"
        code = 124
    (out / "gpu_tests.log").write_text(text)
    con.print(text[-4000:], markup=False, highlight=False)
    return code


def suite(out: Path, skip_tests: bool = False) -> int:
    con = console()
    start = time.monotonic()
    con.print(__doc__.split("\n\n", 1)[1].split("Steps:")[0].strip(), markup=False)

    import torch

    if not torch.cuda.is_available():
        built = torch.version.cuda or "no CUDA (a CPU-only build)"
        con.print(
            "[bold red]The GPU suite needs a CUDA GPU, and torch sees none here[/bold red] "
            f"(torch {torch.__version__}, built with {built}). Nothing was run."
        )
        return 2
    out.mkdir(parents=True, exist_ok=True)
    con.print(f"GPU: {torch.cuda.get_device_name(0)}; results -> {out}")
    test_code = 0 if skip_tests else run_tests(out, con)

    con.rule("2. GPU sweep")
    from bench.run import run

    # Leave a minute for the goals and the plots.
    path, head, rows = run(
        con,
        kind="gpu",
        preset="gpu",
        device="cuda",
        peers=PEERS,
        out_dir=out,
        ops=("shared", "rows"),
        modes=("forward", "backward"),
        dtypes=("float32", "bfloat16"),
        deadline=time.time() + BUDGET_S - 60 - (time.monotonic() - start),
    )

    con.rule("3. Goals")
    head["goals"] = judge(rows, head["limits"])
    schema.write(path, head, rows)
    print_goals(con, head["goals"])

    con.rule("4. Plots")
    from bench.plot import plot_files

    for made in plot_files([path], out):
        con.print(str(made))
    con.print(f"done in {time.monotonic() - start:.0f} s")
    if test_code != 0:
        log = out / "gpu_tests.log"
        con.print(f"[bold red]the tests failed (exit {test_code}): see {log}[/bold red]")
        return 1
    return 0
