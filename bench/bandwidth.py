"""``python -m bench.bandwidth``: leave-one-out bandwidth selection, timed.

nwfast's ``NadarayaWatson(bandwidth="loo").fit`` against statsmodels'
``KernelReg(bw="cv_ls")`` and kernelsmooth's ``lscv``, on the textbook's data
for n = 1000 ... 100000. Each fit runs in a fresh process (threads set, a hard
time limit); a peer whose next size is predicted past the time cap (fits cost
O(n^2): the time of the last size times (n / n_last)^2) is skipped with the
reason. The chosen bandwidths are compared by one function, the LOO MSE
computed with ``nwfast.nw_pool(..., exclude_self=True)``, so a fast fit that
picks a poor bandwidth shows.

kernelsmooth's search is bounded: 10 L-BFGS iterations within a factor 5 of
Silverman's h. statsmodels' search evaluates the criterion in Python loops.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import schema
from bench.cases import NOISE, SEED, X_RANGE, parse_sizes
from bench.worker import ROW_MARK

PEERS = ("nwfast", "nwfast-f32", "statsmodels", "kernelsmooth")
SIZES = (1000, 3000, 10000, 30000, 100000)
QUICK_SIZES = (1000, 3000, 10000)
# Seconds per fit at n = 1000 on the project's 2-core machine, to predict the
# first size before any fit of the peer has run.
PRIOR_S_AT_1000 = {"statsmodels": 1.5, "kernelsmooth": 0.1}


def data(n: int, d: int):
    import numpy as np

    rng = np.random.default_rng(SEED)
    X = rng.uniform(0, X_RANGE, size=(n, d))
    y = 2 * np.sin(X[:, 0]) + X[:, 0] ** 0.8 + rng.normal(0, NOISE, n)
    return X, y


def _estimator():
    import nwfast

    try:
        return nwfast.NadarayaWatson
    except AttributeError:  # exported from its own module until wired
        from nwfast.estimator import NadarayaWatson

        return NadarayaWatson


def _fit(peer: str, X, y):
    """One fit; returns the chosen h per feature in the data's units."""
    import numpy as np

    if peer.startswith("nwfast"):
        dtype = "float32" if peer == "nwfast-f32" else None
        model = _estimator()("loo", per_feature=X.shape[1] > 1, dtype=dtype)
        model.fit(X, y)
        return np.atleast_1d(model.bandwidth_).astype(float)
    if peer == "statsmodels":
        from statsmodels.nonparametric.kernel_regression import KernelReg

        reg = KernelReg(y, X, var_type="c" * X.shape[1], reg_type="lc", bw="cv_ls")
        return np.asarray(reg.bw, dtype=float)
    if peer == "kernelsmooth":
        from kernelsmooth import NadarayaWatsonRegression

        # diag_cov=True: each feature divided by its std, so h_f = bw_f * std_f.
        model = NadarayaWatsonRegression(bandwidth="lscv", diag_cov=True).fit(X, y)
        return np.asarray(model.bandwidth * model.L, dtype=float)
    raise ValueError(f"unknown peer {peer!r}")


def loo_mse(X, y, h) -> float:
    """Leave-one-out MSE at bandwidth h (per feature), by the fused operator."""
    import torch

    import nwfast

    xs = torch.from_numpy(X / h)  # per-feature h: scale, then w = 1
    yt = torch.from_numpy(y)[:, None]
    with torch.no_grad():
        pred = nwfast.nw_pool(xs, xs, yt, 1.0, exclude_self=True)
    return float(((pred - yt) ** 2).mean())


def one(job: dict) -> dict:
    """In the child: time fits of one peer at one size."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(job["threads"])
    peer, n, d = job["peer"], job["n"], job["d"]
    row = schema.empty_row(schema.BANDWIDTH_ROW_FIELDS, peer=peer, n=n, d=d)
    X, y = data(n, d)
    if peer.startswith("nwfast"):
        _fit(peer, *data(300, d))  # JIT compile, untimed
    times, h = [], None
    start = time.perf_counter()
    # Fits are long: up to three, while they stay within a few seconds.
    while len(times) < 3 and (not times or time.perf_counter() - start < 5):
        t = time.perf_counter()
        h = _fit(peer, X, y)
        times.append(time.perf_counter() - t)
    row.update(status="ok", times_s=times, fits=len(times), fit_s=statistics.median(times))
    row["bandwidth"] = h.tolist()
    try:
        row["loo_mse"] = loo_mse(X, y, h)
    except Exception as exc:  # the timing stands without it
        row["note"] = f"LOO MSE not computed: {type(exc).__name__}: {exc}"
    return row


def _run_child(job: dict, timeout: float) -> dict:
    from bench.sweep import REPO, worker_env

    row = schema.empty_row(schema.BANDWIDTH_ROW_FIELDS, peer=job["peer"], n=job["n"], d=job["d"])
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "bench.bandwidth", "--child"],
            input=json.dumps(job),
            capture_output=True,
            text=True,
            cwd=REPO,
            env=worker_env(job["threads"]),
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {**row, "status": "error", "note": f"killed after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(ROW_MARK):
            return json.loads(line[len(ROW_MARK) :])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
    return {**row, "status": "error", "note": f"exit {proc.returncode}: {tail}"}


def _available(peer: str) -> str | None:
    """Why the peer cannot run here, or None."""
    import importlib

    module = {
        "statsmodels": "statsmodels.nonparametric.kernel_regression",
        "kernelsmooth": "kernelsmooth",
    }.get(peer)
    try:
        if module:
            importlib.import_module(module)
        else:
            _estimator()
    except Exception as exc:  # any import failure skips the peer
        return f"not importable: {type(exc).__name__}: {exc}"
    return None


def run(args, console) -> tuple[Path, list[dict]]:
    from bench.report import bandwidth_table

    threads = args.threads or schema.cpu_cores()
    sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)
    peers = [p.strip() for p in args.peers.split(",")] if args.peers else list(PEERS)
    rows, last = [], {}
    why_not = {p: _available(p) for p in peers}
    for peer, reason in why_not.items():
        if reason:
            console.print(f"[yellow]{peer}: skipped: {reason}[/yellow]")
    start = time.monotonic()
    for n in sizes:
        for peer in peers:
            row = schema.empty_row(schema.BANDWIDTH_ROW_FIELDS, peer=peer, n=n, d=args.d)
            predicted = None
            if peer in last:
                n0, t0 = last[peer]
                predicted = t0 * (n / n0) ** 2
            elif peer in PRIOR_S_AT_1000:
                predicted = PRIOR_S_AT_1000[peer] * (n / 1000) ** 2
            if why_not[peer]:
                row.update(status="skipped", note=why_not[peer])
            elif predicted and predicted > args.time_cap:
                row.update(
                    status="skipped",
                    note=f"one fit predicted at {predicted:.0f} s > {args.time_cap:g} s cap",
                )
            else:
                job = {"peer": peer, "n": n, "d": args.d, "threads": threads}
                console.print(f"  fitting {peer} n={n} ...")
                row = _run_child(job, timeout=max(60.0, 4 * args.time_cap))
                if row["status"] == "ok":
                    last[peer] = (n, row["fit_s"])
            rows.append(row)
            _print_row(console, row)
    _finish(rows)
    head = schema.header(
        "bandwidth",
        "cpu",
        threads,
        settings={"time_cap_s": args.time_cap, "sizes": list(sizes), "d": args.d},
        peers_unavailable={p: r for p, r in why_not.items() if r},
    )
    head["duration_s"] = round(time.monotonic() - start, 1)
    path = schema.write(schema.result_path(args.out, head["machine"], "bandwidth"), head, rows)
    console.print(bandwidth_table(rows))
    console.print(f"-> {path}")
    return path, rows


def _finish(rows: list[dict]) -> None:
    ref = {r["n"]: r for r in rows if r["peer"] == "nwfast" and r["status"] == "ok"}
    for r in rows:
        base = ref.get(r["n"])
        if r["status"] != "ok" or base is None or r is base:
            continue
        r["nwfast_speedup"] = r["fit_s"] / base["fit_s"]
        if r["loo_mse"] is not None and base["loo_mse"]:
            r["loo_mse_vs_nwfast"] = r["loo_mse"] / base["loo_mse"]


def _print_row(console, row: dict) -> None:
    if row["status"] != "ok":
        console.print(f"  [dim]{row['status']:>7} {row['peer']} n={row['n']}: {row['note']}[/dim]")
        return
    h = ", ".join(f"{v:.4g}" for v in row["bandwidth"])
    mse = "-" if row["loo_mse"] is None else f"{row['loo_mse']:.5g}"
    console.print(
        f"  [green]{'ok':>7}[/green] {row['peer']} n={row['n']}: {row['fit_s']:.3g} s, "
        f"h = {h}, LOO MSE {mse}"
    )


def main(argv=None) -> int:
    from bench.sweep import console

    p = argparse.ArgumentParser(
        prog="python -m bench.bandwidth",
        description="Time leave-one-out bandwidth selection: nwfast vs statsmodels, kernelsmooth.",
    )
    p.add_argument("--sizes", type=parse_sizes, help=f"n, default {','.join(map(str, SIZES))}")
    p.add_argument("--quick", action="store_true", help=f"n = {QUICK_SIZES}, 20 s cap")
    p.add_argument("--peers", help=f"of {','.join(PEERS)}")
    p.add_argument("--d", type=int, default=1, help="features (default 1)")
    p.add_argument("--time-cap", type=float, help="skip fits predicted longer (s), default 60")
    p.add_argument("--threads", type=int)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        row = one(json.load(sys.stdin))
        sys.stdout.write(ROW_MARK + json.dumps(row) + "\n")
        return 0
    if args.time_cap is None:
        args.time_cap = 20.0 if args.quick else 60.0
    run(args, console())
    return 0


if __name__ == "__main__":
    sys.exit(main())
