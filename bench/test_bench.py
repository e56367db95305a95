"""The benchmark command itself, at tiny sizes: ``pytest bench/test_bench.py``.

Not collected by the test run (testpaths = ["tests"]): it starts worker
processes and takes about a minute on 2 cores.
"""

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bench import check, schema  # noqa: E402
from bench.cases import POOL_OPS, PRESETS, Case, grad_leaves, make_inputs, plan  # noqa: E402
from bench.cases import family as schema_family  # noqa: E402
from bench.cli import parse_sizes  # noqa: E402
from bench.peers import PEERS  # noqa: E402
from bench.worker import timed_calls  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def _bench(*args, tmp_path):
    cmd = [sys.executable, "-m", "bench", *args, "--out", str(tmp_path)]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True, timeout=600)
    (path,) = tmp_path.glob("*.json")
    return schema.load(path)


def test_sweep_fit_report_plot(tmp_path):
    sweep = _bench(
        "sweep",
        "--sizes",
        "64,128",
        "--layouts",
        "shared,shared_loo,rows",
        "--modes",
        "forward,fwd+bwd",
        "--peers",
        "nwfast,torch-broadcast",
        tmp_path=tmp_path / "sweep",
    )
    rows = sweep["rows"]
    assert len(rows) == 3 * 2 * 2 * 2
    assert all(r["status"] == "ok" and r["check_ok"] for r in rows), rows
    assert all(set(r) == set(schema.empty_row()) for r in rows)
    ratios = [r["nwfast_speedup"] for r in rows if r["peer"] != "nwfast"]
    assert all(x > 0 for x in ratios)

    fit = _bench("fit", "--sizes", "200", "--peers", "nwfast,nwfast-f32", tmp_path=tmp_path / "fit")
    nw, f32 = fit["rows"]
    assert nw["status"] == f32["status"] == "ok"
    assert f32["loo_mse_vs_nwfast"] == pytest.approx(1.0, rel=1e-3)

    files = [str(p) for p in tmp_path.glob("*/*.json")]
    subprocess.run(
        [sys.executable, "-m", "bench", "report", *files], cwd=REPO, check=True, capture_output=True
    )
    out = tmp_path / "plots"
    subprocess.run(
        [sys.executable, "-m", "bench", "plot", *files, "--out", str(out)],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    names = {p.name for p in out.glob("*.png")}
    assert names == {
        f"bench_{k}_cpu_float32.png" for k in ("time", "speedup", "memory", "fwd_bwd")
    } | {"bench_bandwidth.png"}


@pytest.mark.parametrize("op", ["shared", "shared_loo", "rows"])
def test_a_wrong_result_is_flagged(op):
    """The check column is nwfast.testing's verdict: a wrong output fails it."""
    case = Case("nwfast", op, "fwd+bwd", "float32", "cpu", 2048, 2048)  # a subset is judged
    x = make_inputs(case)
    leaves = grad_leaves(case, x)
    for t in leaves.values():
        t.requires_grad_(True)
    fn = PEERS["nwfast"].build(case, x)
    verdicts, judged = check.judge(case, x, fn, leaves)
    assert judged < case.n and all(v.ok for v in verdicts), verdicts

    def off_by_a_bit():
        return fn() * (1 + 1e-3)

    verdicts, _ = check.judge(case, x, off_by_a_bit, leaves)
    assert not check.summary(verdicts, judged)["check_ok"]

    result = {}
    timed_calls(case, x, fn, leaves, result)  # forward keeps its output
    forward = Case("nwfast", op, "forward", "float32", "cpu", 2048, 2048)
    verdicts, _ = check.judge(forward, x, fn, {}, out=fn().detach() + 1e-2)
    assert not verdicts[0].ok


def test_presets_plan_and_sizes():
    quick = plan(PRESETS["quick"], list(PEERS), device="cpu", dtypes=("float32",))
    assert {(c.op, c.mode) for c in quick} == set(PRESETS["quick"].sizes)
    assert all(c.n == c.m for c in quick)
    fits = plan(PRESETS["fit"], ["nwfast"], device="cpu", dtypes=("float64",))
    assert [c.n for c in fits] == list(PRESETS["fit"].sizes[("fit", "local-constant")])
    assert parse_sizes("4096,16k,2^20,1e3") == (1000, 4096, 16384, 1 << 20)
    json.dumps([c.fields() for c in quick])  # what a worker's job carries


def _row(peer, op, mode, n, median_s, **extra):
    fields = {"dtype": "float32", "m": n, "d": 1, "status": "ok", **extra}
    return schema.empty_row(peer=peer, op=op, mode=mode, n=n, median_s=median_s, **fields)


def test_gpu_goals_from_rows():
    from bench.goals import GPU_N as GOAL_N
    from bench.goals import gpu as judge

    row = _row

    rows = [
        row("nwfast", "shared", "forward", GOAL_N, 0.02, bound_fraction=0.7),
        row("nwfast", "shared", "backward", GOAL_N, 0.04),
        row("torch-compile", "shared", "forward", GOAL_N, 0.2),
        row("nwfast", "rows", "forward", 65536, 0.01, bound_work=9e9),
    ]
    goals = judge(rows, {"copy_bytes_per_s": 1e12})
    assert [g["passed"] for g in goals] == [True, True, True, True]
    goals = judge(rows[:1], {})
    assert [g["passed"] for g in goals] == [True, None, None, None]


def test_sparse_plan_goals_and_skipping_goals():
    from bench.goals import SKIP_N, skipping

    sparse = plan(PRESETS["sparse"], ["nwfast", "nwfast-dense"], device="cpu", dtypes=("float32",))
    goal_cases = {(c.d, c.data, c.h_rule, c.mode) for c in sparse if c.n == SKIP_N}
    assert {(1, "uniform", "h=0.01", "forward"), (2, "unit", "h=0.01", "forward")} <= goal_cases
    assert all(c.n <= PRESETS["sparse"].max_n.get(c.d, c.n) for c in sparse)
    line = {"d": 1, "data": "uniform", "h_rule": "h=0.01"}
    square = {"d": 2, "data": "unit", "h_rule": "h=0.01"}
    rows = [
        _row("nwfast", "shared", "forward", SKIP_N, 1.0, check_error=1e-7, **line),
        _row("nwfast-dense", "shared", "forward", SKIP_N, 30.0, **line),
        _row("nwfast", "shared", "fwd+bwd", SKIP_N, 3.0, **line),
        _row("nwfast-dense", "shared", "fwd+bwd", SKIP_N, 20.0, **line),
        _row("nwfast", "shared", "forward", SKIP_N, 2.0, **square),
    ]
    goals = skipping(rows)
    assert [g["passed"] for g in goals] == [True, False, True, None]
    assert goals[0]["value"] == 30.0


def test_dist_strong_scaling(tmp_path):
    """Every configuration ran, was judged, and sent what the ring must send."""
    doc = _bench("dist", "--sizes", "256", "--rounds", "1", "--repeats", "2", tmp_path=tmp_path)
    rows = doc["rows"]
    assert doc["header"]["kind"] == "dist"
    assert [(r["mode"], r["peer"], r["ranks"]) for r in rows] == [
        (mode, peer, ranks)
        for mode in ("forward", "fwd+bwd")
        for peer, ranks in (("nwfast", 1), ("nwfast.distributed", 1), ("nwfast.distributed", 2))
    ]
    assert all(r["status"] == "ok" and r["check_ok"] and r["scaling_efficiency"] > 0 for r in rows)
    # Two ranks of 128 keys, float32 keys and values: the forward sends a shard on
    # once; fwd+bwd also sends it on again, and its key and value gradients twice
    # (the second hop brings them home).
    shard = 128 * 2 * 4
    sent = {r["mode"]: r["ring_bytes_per_rank"] for r in rows if r["ranks"] == 2}
    assert sent == {"forward": [shard, shard], "fwd+bwd": [4 * shard, 4 * shard]}
    ring_of_one = [r for r in rows if r["peer"] == "nwfast.distributed" and r["ranks"] == 1]
    assert all(r["ring_bytes_per_rank"] == [0] for r in ring_of_one)


def test_cold_start_rows(tmp_path):
    doc = _bench("cold", "--repeats", "1", "--n", "200", tmp_path=tmp_path)
    empty, warm = doc["rows"]
    assert (empty["mode"], warm["mode"]) == ("empty cache", "warm cache")
    for row in (empty, warm):
        phases = [row[p] for p in ("import_torch_s", "import_s", "first_forward_s")]
        assert all(t > 0 for t in phases) and row["median_s"] >= sum(phases)
    # The filled cache spares the compilation.
    assert warm["first_backward_s"] < empty["first_backward_s"]
    assert doc["header"]["goals"][0]["value"] == empty["median_s"]


def test_the_attention_peer_computes_the_same_softmax():
    """torch-sdpa (scale w, key bias -(w/2)||k||^2) against the float64
    reference, on CPU tensors though the sweep runs it on CUDA only."""
    from bench.peers import _sdpa
    from nwfast import reference, testing

    n, m, d = 40, 70, 32
    case = Case("torch-sdpa", "shared", "forward", "float32", "cpu", n, m, d, w_kind="scalar")
    x = {"query": torch.rand(n, d), "key": torch.rand(m, d), "value": torch.randn(m, 3)}
    x["w"] = torch.tensor([3.0])
    out = _sdpa(case, x)()
    ref = reference.nw_pool_broadcast(*(x[k].double() for k in ("query", "key", "value", "w")))
    assert testing.relative_error(out, ref) < 1e-5
    assert PEERS["torch-sdpa"].unsupported(case) == "the tensor-core route: CUDA only"


@pytest.mark.parametrize("name", [name for name, p in PEERS.items() if p.module == "nwfast"])
def test_nwfast_variants_run_every_operation_they_take(name):
    """A variant's options suit every operation it builds; the others say why not."""
    peer = PEERS[name]
    for op in POOL_OPS:
        case = Case(name, op, "forward", "float32", "cpu", 64, 64)
        why = peer.unsupported(case)
        if why:
            assert op not in peer.builds and why
            continue
        out = peer.build(case, make_inputs(case))()
        assert out.shape == (64,) and torch.isfinite(out).all()


def test_compare_against_head(tmp_path):
    """This tree against HEAD: both sides ran every round, their ratio is near 1, the
    table and the file have what they promise."""
    cases = ("forward-dense", "fwd+bwd")
    cmd = [sys.executable, "-m", "bench", "compare", "--base", "HEAD", "--cases", ",".join(cases)]
    cmd += ["--rounds", "3", "--size", "1024", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True, timeout=900)
    (path,) = tmp_path.glob("*_compare.json")
    doc = schema.load(path)
    head, rows = doc["header"], doc["rows"]
    head_commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert head["kind"] == "compare" and head["base"] == {"rev": "HEAD", "commit": head_commit}
    assert [(r["compare_case"], r["revision"]) for r in rows] == [
        (name, side) for name in cases for side in ("tree", head_commit)
    ]
    assert all(set(r) == set(schema.empty_row()) for r in rows)
    assert all(r["status"] == "ok" and len(r["round_medians_s"]) == 3 for r in rows), rows
    assert all(r["n"] == r["m"] == 1024 for r in rows)
    base_rows = [r for r in rows if r["revision"] != "tree"]
    # The same code on both sides: any ratio far from 1 is a bug of the command
    # (sides or cases mixed up), not noise.
    assert all(0.5 < r["nwfast_speedup"] < 2 for r in base_rows), base_rows
    assert all(0.5 < r["fastest_ratio"] < 2 for r in base_rows), base_rows
    assert all(len(r["round_ratios"]) == 3 and r["noise"] >= 1 for r in base_rows)
    assert [g["goal"].split(":")[0] for g in head["goals"]] == list(cases)
    assert "(<1: tree slower)" in done.stdout
    assert all(name in done.stdout for name in cases)


def _side(case, revision, rounds, status="ok", note=None):
    return schema.empty_row(
        compare_case=case, revision=revision, round_medians_s=rounds, status=status, note=note
    )


def test_guard_decision():
    """The guard fails on a slowdown past max(threshold, noise) and on a case that did
    not run; it passes a slowdown within the noise it measured."""
    from bench import compare

    base = [0.010, 0.011, 0.010, 0.0105, 0.010]

    def judged(tree, base=base, **tree_row):
        rows = [_side("forward", "tree", tree, **tree_row), _side("forward", "abc", base)]
        return compare.goals(rows, 1.3)

    slow = judged([t * 1.6 for t in base])
    assert [g["passed"] for g in slow] == [False] and compare.guard_code(slow) == 1
    assert slow[0]["value"] == pytest.approx(1.6)
    same = judged([t * 1.1 for t in base])
    assert [g["passed"] for g in same] == [True] and compare.guard_code(same) == 0
    # 1.4x slower, but the rounds' ratios spread by 1.5x: within the noise.
    noisy = judged([0.012, 0.018, 0.014, 0.014, 0.014], base=[0.010] * 5)
    assert noisy[0]["passed"] and noisy[0]["target"] == "≤ 1.5"
    broken = judged([], status="error", note="the process failed")
    assert broken[0]["passed"] is None and compare.guard_code(broken) == 1

    v = compare.verdict([0.02] * 3, [0.01] * 3, 1.3)
    assert v["faster"] and not v["slower"] and v["ratio"] == 2.0 and v["noise"] == 1.0
    # Rounds in two speed modes: the fastest rounds compare like with like.
    v = compare.verdict([0.010, 0.0112, 0.0112], [0.0112, 0.0112, 0.010], 1.3)
    assert v["ratio"] == 1.0 and v["fastest_ratio"] == 1.0
    v = compare.verdict([0.010, 0.0112, 0.0112], [0.011, 0.0112, 0.0112], 1.3)
    assert v["fastest_ratio"] == pytest.approx(10 / 11)


def test_compare_options_and_revisions():
    """A keyword an older nw_pool lacks is left out and named; an unknown base is a
    clear error; the baseline names a commit of this clone."""
    import nwfast
    from bench import compare

    def older(query, key, value, w, *, exclude_self=False, backend="auto"):
        return None

    assert compare.accepted(older, {"tolerance": 0.0}) == ({}, ["tolerance"])
    assert compare.accepted(nwfast.nw_pool, {"tolerance": 0.0}) == ({"tolerance": 0.0}, [])
    with pytest.raises(SystemExit, match="not a commit of this clone"):
        compare.resolve("0123456789abcdef0123")
    assert len(compare.resolve(compare.baseline())) == 40
    assert set(compare.GUARD_CASES) <= set(compare.CASES)
    # the benchmarks page lists the cases as they are
    page = (Path(__file__).parents[1] / "docs" / "benchmarks.md").read_text()
    listed = re.search(r"Its cases are the sweep's: (.*?)\s\(`--cases`", page, re.S).group(1)
    assert re.findall(r"`([^`]+)`", listed) == list(compare.CASES)


def test_fit_features_plan_and_tied_data():
    preset = PRESETS["fit-features"]
    peers = ["nwfast", "kernelsmooth", "statsmodels"]
    fits = plan(preset, peers, device="cpu", dtypes=("float64",))
    assert {c.d for c in fits} == {2, 3}
    assert {c.data for c in fits} == {"uniform", "clustered", "tied"}
    linear = Case("kernelsmooth", "fit", "local-linear", "float64", "cpu", 1000, 1000, 2)
    linear = dataclasses.replace(linear, w_kind=None, data="tied", h_rule=None)
    assert "Nadaraya-Watson fits only" in PEERS["kernelsmooth"].unsupported(linear)
    assert PEERS["statsmodels"].unsupported(dataclasses.replace(linear, peer="statsmodels")) is None
    X = make_inputs(linear)["X"]
    # heavy ties: a few values hold most points; a long tail: the largest far above the median
    for column in X.T:
        values, counts = np.unique(column, return_counts=True)
        assert counts.max() > len(column) / 5 and column.max() > 20 * max(np.median(column), 1)


def test_a_skipping_peer_is_predicted_from_its_plan():
    from bench.worker import predict_s

    case = Case("nwfast", "shared", "forward", "float32", "cpu", 1 << 20, 1 << 20)
    # the smaller size kept 10% of its pairs in 1 s
    smaller = dataclasses.replace(case, n=1 << 18, m=1 << 18)
    prev = {**smaller.fields(), "median_s": 1.0, "kept_fraction": 0.1}
    done = {schema_family(prev): prev}
    per_pair = 1.0 / (0.1 * prev["pairs"])
    assert predict_s(case, done, computed=10**9) == pytest.approx(1e9 * per_pair)
    assert predict_s(case, done) == pytest.approx(case.pairs * per_pair)  # n m: dense


def test_fgt_plan_goals_and_peers(tmp_path):
    """The far-field preset's goal cases (two forwards, two fits) run nwfast
    alone past the cap; its goals read them; and a tiny sweep runs every
    peer, the plan's measurements and the figure included."""
    from bench.goals import FGT_N, fgt

    cases = plan(PRESETS["fgt"], list(PRESETS["fgt"].peers), device="cpu", dtypes=("float32",))
    fits = {c.n for c in cases if c.op == "fit" and c.peer == "nwfast"}
    assert fits == {10**6, FGT_N} and all(c.dtype == "float64" for c in cases if c.op == "fit")
    assert PRESETS["fgt"].uncapped == ("nwfast",)
    line = {"h_rule": "silverman"}
    rows = [
        _row("nwfast", "shared", "forward", FGT_N, 4.0, data="uniform", **line),
        _row("nwfast", "shared", "forward", 10**6, 12.0, d=2, data="unit", **line),
        _row("nwfast", "fit", "local-constant", 10**6, 3.0, dtype="float64"),
    ]
    rows[0].update(expanded_fraction=0.2, check_ok=True)
    goals = fgt(rows)
    assert [g["passed"] for g in goals] == [True, True, None, False, True]

    doc = _bench(
        "sweep", "--fgt", "--sizes", "4096", "--data", "uniform", "--h-rules", "silverman",
        "--dims", "1", "--modes", "forward", tmp_path=tmp_path,
    )  # fmt: skip
    peers = {r["peer"]: r for r in doc["rows"]}
    assert set(peers) == {"nwfast", "nwfast-skip", "nwfast-dense", "kdepy-fft"}
    assert all(r["status"] == "ok" for r in peers.values())
    assert peers["nwfast"]["check_ok"] and peers["nwfast-skip"]["expanded_fraction"] is None
    subprocess.run(
        [sys.executable, "-m", "bench", "plot", *map(str, tmp_path.glob("*.json")), "--out",
         str(tmp_path)], cwd=REPO, check=True, capture_output=True,
    )  # fmt: skip
    assert list(tmp_path.glob("bench_fgt_cpu_float32.png"))


def test_the_gpu_suite_times_the_far_fields():
    """The GPU suite's far-field step: its cases, forward and fwd+bwd, with
    the expansions and with block skipping alone, on the GPU."""
    from bench import gpu

    cases = plan(PRESETS["fgt"], gpu.FAR_PEERS, device="cuda", **gpu.FAR_CASES)
    got = {(c.peer, c.mode, c.n, c.d, c.h_rule, c.device) for c in cases}
    want = {
        (peer, mode, 1 << 20, 1, "silverman", "cuda")
        for peer in ("nwfast", "nwfast-skip")
        for mode in ("forward", "fwd+bwd")
    }
    assert got == want
