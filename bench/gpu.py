"""``bench/gpu_suite.sh OUTDIR`` (``python -m bench gpu OUTDIR``): the GPU in one command.

The goals it judges are ``bench.goals.gpu``'s and ``bench.goals.skipping``'s.

Steps: (1) the whole test suite natively, the gpu-marked tests included,
``python -m pytest -m "gpu or not gpu"``; (2) the GPU sweep: forward and
backward, float32 and bfloat16, shared keys n = m = 4096 ... 2^20, rows layout
4096 ... 65536 (as far as memory goes), beside torch eager (both forms),
torch.compile and pykeops where it imports; (3) block skipping: the sparse
preset's goal cases (n = m = 2^18, h = 0.01, d = 1 and 2, forward and fwd+bwd)
beside tolerance=0; (3b) the tensor-core route: d = 32 in bfloat16 beside
``scaled_dot_product_attention`` with the key bias (the same softmax); (3c) far
fields: the fgt preset's 2^20 points at Silverman's h (d = 1, forward and
fwd+bwd), the expansions beside block skipping alone; (4) the goals, judged on
their rows; (5) the plots.
OUTDIR gets the two JSON files (their headers hold the goals), the test log
and the PNGs.

Budget: 9 minutes in all, the tests capped at 240 s. A peer stops where a call
is predicted past the gpu preset's time cap or memory runs out; the sweep as a
whole stops starting new cases when its share of the budget is spent.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from bench import goals, schema
from bench.report import console

# The whole suite fits in a 10-minute slot on a GPU machine.
BUDGET_S = 9 * 60
TEST_BUDGET_S = 240
SASS_BUDGET_S = 60
FAR_BUDGET_S = 45
# The far fields on the GPU: the fgt preset's cases at 2^20 points (forward and
# fwd+bwd), the expansions beside block skipping alone.
FAR_PEERS = ["nwfast", "nwfast-skip"]
FAR_CASES = {
    "ops": ("shared",),
    "sizes": (1 << 20,),
    "dims": (1,),
    "data": ("uniform",),
    "h_rules": ("silverman",),
    "dtypes": ("float32",),
}
PEERS = ["nwfast", "torch-compile", "pykeops", "torch-broadcast", "torch-repeat"]
REPO = Path(__file__).resolve().parent.parent


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


def sass_report(out: Path, con) -> tuple[int, Path | None]:
    """``python -m bench sass`` for this card's arch (the representative set, every
    config of the sweep's variants among it): the exit code and the JSON."""
    import os

    import torch

    major, minor = torch.cuda.get_device_capability(0)
    cmd = [sys.executable, "-m", "bench", "sass", "--arch", f"{major}{minor}"]
    cmd += ["--representative", "--jobs", str(os.cpu_count() or 2), "--out", str(out)]
    con.rule(f"6. {' '.join(cmd[1:])}")
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=SASS_BUDGET_S)
        text, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired:
        text, code = f"stopped after {SASS_BUDGET_S} s\n", 124
    (out / "gpu_sass.log").write_text(text)
    con.print(text[-3000:], markup=False, highlight=False)
    made = sorted(out.glob("*_sass-representative.json"), key=lambda p: p.stat().st_mtime)
    return code, made[-1] if made else None


def measured_beside_predicted(out: Path, sweep_path: Path, sass_path: Path, con) -> Path | None:
    """The sweep's nwfast cases beside the sass model's times for this card."""
    from bench import sass

    sweep = schema.load(sweep_path)
    gpu = sweep["header"]["gpu"]
    if not gpu.get("max_sm_clock_mhz"):
        con.print("no SM clock read from the card: no predicted times")
        return None
    lines = sass.beside(sweep["rows"], schema.load(sass_path)["rows"], gpu)
    con.print(sass.beside_table(lines))
    path = out / "gpu_beside_prediction.json"
    path.write_text(json.dumps({"sweep": str(sweep_path), "sass": str(sass_path), "rows": lines}))
    return path


def suite(out: Path, skip_tests: bool = False) -> int:
    con = console()
    start = time.monotonic()
    con.print(goals.gpu.__doc__.strip(), markup=False)

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

    def deadline(reserve_s):
        """When a step must stop starting cases: reserve_s and the sass report's
        budget before the suite's end."""
        return time.time() + BUDGET_S - reserve_s - SASS_BUDGET_S - (time.monotonic() - start)

    # Leave a minute and a half for block skipping, 45 s for the far fields, a minute for
    # the goals and plots, one for the sass report.
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
        deadline=deadline(150 + FAR_BUDGET_S),
    )

    con.rule("3. Block skipping: the sparse preset's goal cases")
    sparse_path, sparse_head, sparse_rows = run(
        con,
        kind="gpu",
        preset="sparse",
        device="cuda",
        peers=["nwfast", "nwfast-dense"],
        out_dir=out,
        ops=("shared",),
        sizes=(goals.SKIP_N,),
        dims=(1, 2),
        data=("uniform", "unit"),
        h_rules=("h=0.01",),
        dtypes=("float32",),
        deadline=deadline(60 + FAR_BUDGET_S),
    )

    con.rule("3b. The tensor-core route: d = 32, bfloat16, beside dot-product attention")
    tensor_path, _, _ = run(
        con,
        kind="gpu",
        preset="gpu",
        device="cuda",
        peers=["nwfast", "torch-sdpa", "torch-compile"],
        out_dir=out,
        ops=("shared",),
        modes=("forward",),
        sizes=(1 << 14, 1 << 16),
        dims=(32,),
        dtypes=("bfloat16",),
        deadline=deadline(75 + FAR_BUDGET_S),
    )

    con.rule("3c. Far fields: 2^20 points, d = 1, Silverman's h, beside skipping alone")
    far_path, _, _ = run(
        con,
        kind="gpu",
        preset="fgt",
        device="cuda",
        peers=FAR_PEERS,
        out_dir=out,
        **FAR_CASES,
        deadline=deadline(60),
    )

    con.rule("4. Goals")
    head["goals"] = goals.gpu(rows, head["limits"])
    schema.write(path, head, rows)
    goals.show(con, head["goals"], "GPU goals")
    sparse_head["goals"] = goals.skipping(sparse_rows)
    schema.write(sparse_path, sparse_head, sparse_rows)
    goals.show(con, sparse_head["goals"], "Block-skipping goals")

    con.rule("5. Plots")
    from bench.plot import plot_files

    for made in plot_files([path, sparse_path, tensor_path, far_path], out):
        con.print(str(made))
    sass_code, sass_path = sass_report(out, con)
    beside = sass_path and measured_beside_predicted(out, path, sass_path, con)
    if beside:
        con.print(str(beside))
    con.print(f"done in {time.monotonic() - start:.0f} s")
    if test_code != 0:
        log = out / "gpu_tests.log"
        con.print(f"[bold red]the tests failed (exit {test_code}): see {log}[/bold red]")
        return 1
    if sass_code != 0:
        log = out / "gpu_sass.log"
        con.print(f"[bold red]the sass report failed (exit {sass_code}): see {log}[/bold red]")
        return 1
    return 0
