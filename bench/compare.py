"""``python -m bench compare --base REV``: this tree against another revision, in one run.

Each side is installed apart, into a folder of its own under one temporary folder
(``pip install --no-deps --target``): the base from ``git archive REV``, this tree
from its files as they are (tracked and untracked; ignored ones left out). Each
measurement is a fresh process (bench.child) with one side's folder first on
sys.path and that side's own Numba cache, every thread pool at one count: it
warms up (a side's first call of a case compiles and fills its cache), times
calls for about TARGET_S and reports their median. The sides alternate, case
after case and round after round, the base first in even rounds and this tree
first in odd ones, so that a change in the machine's load reaches both alike.

Per case: each side's median over rounds; base / this tree, the ratio of those
medians (below 1: this tree is slower); the per-round ratios' min and max, and
their max / min as the noise measured; and the ratio of each side's fastest
round (a process runs the Numba kernels at one of two speeds, about 12% apart,
settled when it starts: bench/NOTES.md; the fastest rounds compare the sides at
the same speed, where the medians may mix the two). A case is slower when this
tree's time passes max(threshold, noise) x the base's. ``--guard`` (the CI speed
guard) compares with the commit named in bench/baseline.txt on GUARD_CASES and
exits 1 when a case is slower or could not be measured.

A base may lack a keyword that a case passes (``tolerance`` came with block
skipping): its calls leave it out, and its row says so.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from bench import child, schema
from bench.cases import Case

REPO = child.BENCH.parent
BASELINE = child.BENCH / "baseline.txt"
THRESHOLD = 1.3
ROUNDS = 5
THREADS = 2
TARGET_S = 0.25  # timed calls per measurement add up to about this
MIN_CALLS, MAX_CALLS = 5, 1000
TIMEOUT_S = 900  # one measurement, the first compilation of a side included
MARK = "@@bench-compare@@ "


@dataclass(frozen=True)
class Pick:
    """One compared call: the sweep's case (its inputs and mode) and keyword arguments."""

    case: Case
    options: dict = field(default_factory=dict)

    def sized(self, n: int | None) -> Pick:
        return self if n is None else replace(self, case=replace(self.case, n=n, m=n))

    def describe(self) -> str:
        c = self.case
        words = [c.op, c.mode, c.dtype, f"{c.n}²"] + ([f"d={c.d}"] if c.d != 1 else [])
        words += [f"{k}={v!r}" for k, v in self.options.items()]
        return " ".join(words)


def _pick(op: str, mode: str, dtype: str, n: int, d: int = 1, **options) -> Pick:
    peer = "nwfast-dense" if options.get("tolerance") == 0.0 else "nwfast"
    return Pick(Case(peer, op, mode, dtype, "cpu", n, n, d), options)


# The sweep's inputs (bench.cases.make_inputs: uniform on [0, 5), h = 0.5), calls of
# 10-100 ms on 2 cores.
CASES = {
    "forward-dense": _pick("shared", "forward", "float32", 16384, tolerance=0.0),
    "forward": _pick("shared", "forward", "float32", 16384),
    "fwd+bwd": _pick("shared", "fwd+bwd", "float32", 4096),
    "fwd+bwd-dense": _pick("shared", "fwd+bwd", "float32", 8192, tolerance=0.0),
    "fwd+bwd-d=3": _pick("shared", "fwd+bwd", "float32", 8192, d=3, tolerance=0.0),
    "float64": _pick("shared", "forward", "float64", 16384),
    "d=3": _pick("shared", "forward", "float32", 8192, d=3),
    "rows": _pick("rows", "forward", "float32", 4096),
    "loo": _pick("shared_loo", "forward", "float32", 16384),
}
GUARD_CASES = ("forward-dense", "forward", "fwd+bwd")


# --- the child: one case on one side -------------------------------------------------


def accepted(fn, options: dict) -> tuple[dict, list[str]]:
    """The options fn's signature takes, and the names of those it lacks."""
    import inspect

    params = inspect.signature(fn).parameters
    kept = {k: v for k, v in options.items() if k in params}
    return kept, sorted(set(options) - set(kept))


def child_main() -> None:
    """In a fresh process whose sys.path starts with one side's folder."""
    job = json.load(sys.stdin)
    import torch

    from bench.cases import grad_leaves, make_inputs
    from bench.worker import timed_calls

    torch.set_num_threads(job["threads"])
    import nwfast

    where = Path(nwfast.__file__).resolve()
    if not where.is_relative_to(Path(job["site"]).resolve()):
        raise SystemExit(f"imported nwfast from {where}, not from {job['site']}")
    case = Case(**job["case"])
    x = make_inputs(case)
    leaves = grad_leaves(case, x)
    for t in leaves.values():
        t.requires_grad_(True)
    q, k, v, w = x["query"], x["key"], x["value"], x["w"]
    if case.op == "rows":
        options, dropped = accepted(nwfast.nw_pool_rows, job["options"])
        fn = lambda: nwfast.nw_pool_rows(q, k, v, w, **options)  # noqa: E731
    else:
        options, dropped = accepted(nwfast.nw_pool, job["options"])
        fn = lambda: nwfast.nw_pool(q, k, v, w, exclude_self=case.exclude_self, **options)  # noqa: E731
    before, call, first = timed_calls(case, x, fn, leaves, {})
    before()
    first()  # compiles, or loads this side's cache
    before()
    call()
    times = []
    while len(times) < MIN_CALLS or (sum(times) < TARGET_S and len(times) < MAX_CALLS):
        before()
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    out = {"times_s": times, "median_s": statistics.median(times), "dropped": dropped}
    sys.stdout.write(MARK + json.dumps(out) + "\n")


# --- the two sides ----------------------------------------------------------------


def _git(*args: str, **run) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, check=False, **run)


def resolve(rev: str, named_in: Path | None = None) -> str:
    """The full hash of a commit of this clone; a clear SystemExit otherwise."""
    done = _git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", text=True)
    if done.returncode != 0:
        where = f" (named in {named_in})" if named_in else ""
        raise SystemExit(
            f"bench compare: the base {rev!r}{where} is not a commit of this clone ({REPO}). "
            "A shallow clone lacks older commits: fetch the history (git fetch --unshallow) "
            "or the commit itself (git fetch origin <commit>)."
        )
    return done.stdout.strip()


def baseline() -> str:
    """The revision named on the first line of bench/baseline.txt."""
    words = BASELINE.read_text().split()
    if not words:
        raise SystemExit(f"{BASELINE}: empty; it names the release commit the guard compares with")
    return words[0]


def _base_source(sha: str, dest: Path) -> None:
    archive = _git("archive", "--format=tar", sha)
    if archive.returncode != 0:
        raise SystemExit(f"git archive {sha} failed: {archive.stderr.decode()[-2000:]}")
    dest.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)


def _tree_source(dest: Path) -> None:
    """This checkout's files as they are now, uncommitted changes included."""
    listed = _git("ls-files", "-z", "--cached", "--others", "--exclude-standard", text=True)
    if listed.returncode != 0:
        raise SystemExit(f"git ls-files failed in {REPO}: {listed.stderr[-2000:]}")
    for name in filter(None, listed.stdout.split("\0")):
        src = REPO / name
        if src.is_file():  # a tracked file deleted from the tree is not copied
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def install(source: Path, site: Path) -> None:
    """pip install --no-deps --target: this side's nwfast alone in its own folder."""
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target"]
    done = subprocess.run(
        [*cmd, str(site), str(source)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"installing {source} failed:\n{done.stderr[-3000:]}")


def measure(site: Path, pick: Pick, threads: int, folder: Path) -> dict:
    """One fresh process on one side: {median_s, times_s, dropped} or {error}."""
    job = {"site": str(site), "case": asdict(pick.case), "options": pick.options}
    job["threads"] = threads
    env = child.env(threads)
    env["NUMBA_CACHE_DIR"] = str(site.parent / "numba-cache")
    try:
        done = subprocess.run(
            child.command("from bench.compare import child_main\nchild_main()", first=site),
            input=json.dumps(job),
            capture_output=True,
            text=True,
            cwd=folder,
            env=env,
            timeout=TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"killed after {TIMEOUT_S} s without a result"}
    for line in done.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK) :])
    last = done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]
    return {"error": f"the process failed (exit {done.returncode}): {last[0][:300]}"}


# --- the verdict ------------------------------------------------------------------


def verdict(base_s: list[float], tree_s: list[float], threshold: float) -> dict:
    """From each round's median of both sides (round i of each measured back to back).

    ratio: base / this tree, medians over rounds (< 1: this tree slower);
    fastest_ratio: the same of each side's fastest round; noise: the per-round
    ratios' max / min; slower when this tree's time passes limit =
    max(threshold, noise) x the base's, faster the other way round.
    """
    rounds = min(len(base_s), len(tree_s))
    ratios = [b / t for b, t in zip(base_s[:rounds], tree_s[:rounds])]
    ratio = statistics.median(base_s) / statistics.median(tree_s)
    noise = max(ratios) / min(ratios)
    limit = max(threshold, noise)
    return {
        "ratio": ratio,
        "fastest_ratio": min(base_s) / min(tree_s),
        "ratios": ratios,
        "noise": noise,
        "limit": limit,
        "slower": 1 / ratio > limit,
        "faster": ratio > limit,
    }


def goals(rows: list[dict], threshold: float) -> list[dict]:
    """One goal per case: this tree's time / the base's at most max(threshold, noise).

    A case that failed on either side is "not measured" (passed None).
    """
    from bench.goals import goal

    out = []
    for name, (tree, base) in _pairs(rows).items():
        text = f"{name}: this tree's time / the base's"
        if tree["status"] != "ok" or base["status"] != "ok":
            why = next(r["note"] for r in (tree, base) if r["status"] != "ok")
            out.append(goal(text, None, threshold, "<=", why))
            continue
        v = verdict(base["round_medians_s"], tree["round_medians_s"], threshold)
        limit = float(f"{v['limit']:.3g}")
        out.append(goal(text, 1 / v["ratio"], limit, "<=", f"noise {v['noise']:.3g}"))
    return out


def guard_code(judged: list[dict]) -> int:
    """The guard's exit status: 1 when a case is slower or was not measured."""
    return 0 if all(g["passed"] for g in judged) else 1


def _pairs(rows: list[dict]) -> dict[str, tuple[dict, dict]]:
    """Case name -> (this tree's row, the base's row)."""
    tree = {r["compare_case"]: r for r in rows if r["revision"] == "tree"}
    return {
        r["compare_case"]: (tree[r["compare_case"]], r)
        for r in rows
        if r["revision"] != "tree" and r["compare_case"] in tree
    }


# --- the run ------------------------------------------------------------------------


def _row(name: str, pick: Pick, side: str, results: list[dict], loads: list) -> dict:
    from bench.worker import quantile

    case = pick.case
    row = schema.empty_row(**case.fields())
    label = "tree" if side == "tree" else side[:9]
    row.update(
        peer=case.peer if side == "tree" else f"{case.peer}@{label}",
        compare_case=name,
        revision=side,
        load_averages=loads[: len(results)],
    )
    failed = [r["error"] for r in results if "error" in r]
    if failed:
        return {**row, "status": "error", "note": failed[0]}
    times = [t for r in results for t in r["times_s"]]
    medians = [r["median_s"] for r in results]
    median = statistics.median(medians)
    row.update(
        status="ok",
        times_s=times,
        repeats=len(times),
        round_medians_s=medians,
        median_s=median,
        p20_s=quantile(times, 0.2),
        p80_s=quantile(times, 0.8),
        pairs_per_s=case.pairs / median,
        ns_per_pair=median / case.pairs * 1e9,
    )
    dropped = results[0]["dropped"]
    if dropped:
        keywords = ", ".join(f"{k}=" for k in dropped)
        op = "nw_pool_rows" if case.op == "rows" else "nw_pool"
        row["note"] = f"{op} takes no {keywords}: called without it"
    return row


def _finish(rows: list[dict], threshold: float) -> None:
    """The ratio, per-round ratios and noise on each base row."""
    for tree, base in _pairs(rows).values():
        if tree["status"] == "ok" and base["status"] == "ok":
            v = verdict(base["round_medians_s"], tree["round_medians_s"], threshold)
            base.update(
                nwfast_speedup=v["ratio"],
                fastest_ratio=v["fastest_ratio"],
                round_ratios=v["ratios"],
                noise=v["noise"],
            )


def run(
    con,
    *,
    base: str | None,
    names: list[str],
    rounds: int,
    threshold: float,
    threads: int,
    size: int | None,
    out_dir: Path,
    guard: bool,
) -> int:
    """Install both sides, time them alternately, print the table, write the file.
    No base: the commit bench/baseline.txt names."""
    from bench.report import seconds

    named_in = None
    if base is None:
        base, named_in = baseline(), BASELINE
    sha = resolve(base, named_in)
    picks = {name: CASES[name].sized(size) for name in names}
    head = schema.header(
        "compare",
        "guard" if guard else "compare",
        "cpu",
        threads,
        base={"rev": base, "commit": sha},
        settings={
            "rounds": rounds,
            "threshold": threshold,
            "target_s": TARGET_S,
            "cases": {name: pick.describe() for name, pick in picks.items()},
        },
    )
    con.print(
        f"[bold]nwfast bench compare[/bold]: this tree against {base} ({sha[:9]}), "
        f"{len(names)} cases x {rounds} rounds, {threads} threads, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    if os.getloadavg()[0] > schema.cpu_cores() / 2:
        con.print(
            "[yellow]other processes share the cores: the noise measured will be large, and "
            "only slowdowns beyond it count[/yellow]"
        )
    start = time.monotonic()
    results: dict[tuple[str, str], list[dict]] = {}
    loads: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="nwfast-compare-") as tmp:
        folder = Path(tmp)
        sites = {"tree": folder / "tree" / "site", sha: folder / "base" / "site"}
        con.print("installing both sides ...")
        _tree_source(folder / "tree" / "src")
        _base_source(sha, folder / "base" / "src")
        for site in sites.values():
            install(site.parent / "src", site)
        for r in range(rounds):
            order = [sha, "tree"] if r % 2 == 0 else ["tree", sha]
            for name, pick in picks.items():
                load = os.getloadavg()[0]
                loads.setdefault(name, []).append(load)
                for side in order:
                    got = results.setdefault((name, side), [])
                    if got and "error" in got[-1]:
                        continue  # failed once: the row reports it
                    got.append(measure(sites[side], pick, threads, folder))
                    shown = got[-1].get("error") or seconds(got[-1]["median_s"])
                    who = "this tree" if side == "tree" else base
                    con.print(f"  round {r + 1}/{rounds} {name} {who}: {shown} (load {load:.2f})")
    rows = [
        _row(name, pick, side, results[(name, side)], loads[name])
        for name, pick in picks.items()
        for side in ("tree", sha)
    ]
    _finish(rows, threshold)
    head["goals"] = goals(rows, threshold)
    head["duration_s"] = round(time.monotonic() - start, 1)
    path = schema.write(schema.result_path(out_dir, head["machine"], head["preset"]), head, rows)
    con.print(table(head, rows))
    con.print(f"{len(rows)} rows in {head['duration_s']:.0f} s -> {path}")
    if not guard:
        return 0
    code = guard_code(head["goals"])
    if code:
        con.print(
            f"[bold red]speed guard: this tree is slower than {base} beyond "
            f"max({threshold:g}, the noise), or a case did not run[/bold red]"
        )
    else:
        con.print(f"[green]speed guard: no case slower than {base} beyond the noise[/green]")
    return code


def table(head: dict, rows: list[dict]):
    """One line per case: both medians, base / this tree, its spread and the verdict."""
    from rich.table import Table

    from bench.report import seconds

    base = head["base"]
    threshold = head["settings"]["threshold"]
    t = Table(
        title=f"this tree ({(head['git_revision'] or '?')[:9]}"
        f"{' + changes' if head['git_dirty'] else ''}) against {base['rev']} "
        f"({base['commit'][:9]}), {head['threads']} threads; "
        "base / tree below 1: this tree is slower",
        title_justify="left",
        header_style="bold",
    )
    for col in ("case", "call", "base", "this tree", "ns/pair base", "ns/pair tree"):
        t.add_column(col, justify="left" if col in ("case", "call") else "right")
    t.add_column("base / tree\n(<1: tree slower)", justify="right")
    t.add_column("fastest rounds\nbase / tree", justify="right")
    t.add_column("per round\nmin-max", justify="right")
    t.add_column("noise", justify="right")
    t.add_column("verdict")
    t.add_column("note", overflow="fold")
    for name, (tree, other) in _pairs(rows).items():
        call = head["settings"]["cases"][name]
        note = "; ".join(
            f"{who}: {r['note']}" for who, r in (("tree", tree), ("base", other)) if r["note"]
        )
        if tree["status"] != "ok" or other["status"] != "ok":
            t.add_row(name, call, *[""] * 8, "[red]not measured[/red]", note)
            continue
        v = verdict(other["round_medians_s"], tree["round_medians_s"], threshold)
        if v["slower"]:
            word = f"[bold red]SLOWER[/bold red] (> {v['limit']:.2g}×)"
        elif v["faster"]:
            word = f"[green]faster[/green] (> {v['limit']:.2g}×)"
        else:
            word = f"within {v['limit']:.2g}×"
        t.add_row(
            name,
            call,
            seconds(other["median_s"]),
            seconds(tree["median_s"]),
            f"{other['ns_per_pair']:.3g}",
            f"{tree['ns_per_pair']:.3g}",
            f"{v['ratio']:.3f}",
            f"{v['fastest_ratio']:.3f}",
            f"{min(v['ratios']):.2f}-{max(v['ratios']):.2f}",
            f"{v['noise']:.2f}",
            word,
            note,
        )
    return t
