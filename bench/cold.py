"""``python -m bench cold``: what a new process pays before its first result.

Each repeat runs two fresh interpreters on one new, empty ``NUMBA_CACHE_DIR``:
the first compiles everything its calls need (a new container, a CI job), the
second finds it cached (every later process on the machine). Each times, in order:

- ``import torch`` (not nwfast's cost, shown so the rest reads against it);
- ``import nwfast``;
- the textbook's first call: a float32 forward of n = m = 1000 points with
  ``exclude_self=True`` and a trainable scalar w;
- its first backward (the gradient to w);
- a first float64 forward of the same points (one more specialisation).

The goal is the empty cache's import torch + import nwfast + first forward +
first backward within 6 s on the 2-core machine.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap

from bench import schema

GOAL_S = 6.0
PHASES = ("import_torch_s", "import_s", "first_forward_s", "first_backward_s", "first_float64_s")

_CHILD = textwrap.dedent(
    """
    import json, time
    t0 = time.perf_counter()
    import torch
    t1 = time.perf_counter()
    import nwfast
    t2 = time.perf_counter()
    torch.manual_seed(0)
    x = torch.rand({n}) * 5
    y = torch.sin(x)
    w = torch.ones(1, requires_grad=True)
    out = nwfast.nw_pool(x, x, y, w, exclude_self=True)
    t3 = time.perf_counter()
    out.sum().backward()
    t4 = time.perf_counter()
    nwfast.nw_pool(x.double(), x.double(), y.double(), 1.0, exclude_self=True)
    t5 = time.perf_counter()
    print(json.dumps([t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4]))
    """
)


def _child(n: int, cache: str, threads: int | None) -> dict:
    env = {**os.environ, "NUMBA_CACHE_DIR": cache}
    if threads:
        env.update(NUMBA_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    # Run from the cache folder: the installed nwfast, never a source tree in the cwd.
    done = subprocess.run(
        [sys.executable, "-c", _CHILD.format(n=n)],
        cwd=cache,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"cold-start child failed:\n{done.stderr[-2000:]}")
    return dict(zip(PHASES, json.loads(done.stdout.strip().splitlines()[-1]), strict=True))


def _row(cache: str, n: int, runs: list[dict]) -> dict:
    totals = sorted(
        r["import_torch_s"] + r["import_s"] + r["first_forward_s"] + r["first_backward_s"]
        for r in runs
    )
    row = schema.empty_row(
        peer="nwfast",
        op="cold",
        mode=f"{cache} cache",
        dtype="float32",
        device="cpu",
        n=n,
        m=n,
        d=1,
        w_kind="scalar",
        data="uniform",
        h_rule=None,
        status="ok",
        repeats=len(runs),
        median_s=statistics.median(totals),
        p20_s=totals[int(0.2 * (len(totals) - 1))],
        p80_s=totals[round(0.8 * (len(totals) - 1))],
    )
    row.update({p: statistics.median(r[p] for r in runs) for p in PHASES})
    return row


def run(con, *, repeats: int, n: int, threads: int | None, out_dir) -> list[dict]:
    from bench.goals import goal, show
    from bench.report import table

    head = schema.header("cold", "cold", "cpu", threads or schema.cpu_cores())
    con.print(f"[bold]nwfast bench cold[/bold]: {repeats} x (empty cache, then warm), n = {n}")
    empty, warm = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="nwfast-cold-") as cache:
            empty.append(_child(n, cache, threads))
            warm.append(_child(n, cache, threads))
    rows = [_row("empty", n, empty), _row("warm", n, warm)]
    cold = rows[0]["median_s"]
    text = f"empty cache: import + first float32 forward + first backward, n = {n}"
    head["goals"] = [goal(text, cold, GOAL_S, "<=")]
    path = schema.write(schema.result_path(out_dir, schema.cpu_model(), "cold"), head, rows)
    con.print(table(rows))
    show(con, head["goals"], "Goal")
    con.print(f"-> {path}")
    return rows
