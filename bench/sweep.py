"""``python -m bench``: the sweep. Times nwfast beside its peers, writes JSON.

Cases run in worker processes (bench.worker), one per peer and (layout, mode,
dtype, d), sizes ascending: thread pools of torch, Numba and KeOps never share
a process with another peer's, JIT compiles once per worker, and a crash costs
one case (the worker restarts after it). Peak memory is still per case: Linux
resets the peak RSS on request (/proc/self/clear_refs) and CUDA's allocator
resets its own. Where the peak cannot be reset, each case gets its own process.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

from bench import schema
from bench.cases import (
    DTYPES,
    LAYOUTS,
    MODES,
    NOISE,
    SEED,
    W_KINDS,
    X_RANGE,
    Case,
    H,
    W,
    family,
    parse_bytes,
    parse_sizes,
    plan,
)
from bench.peers import PEERS, parse_peers
from bench.worker import ROW_MARK

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent

# How many timed calls: enough for p20/p80, no more than the time allows.
POLICY = {
    "quick": {"target_s": 0.5, "min_repeats": 3, "max_repeats": 15, "time_cap_s": 8.0},
    "full": {"target_s": 2.0, "min_repeats": 5, "max_repeats": 50, "time_cap_s": 30.0},
    "gpu": {"target_s": 0.3, "min_repeats": 5, "max_repeats": 100, "time_cap_s": 8.0},
}


def worker_env(threads: int) -> dict:
    """One thread count for every pool; allocator settings that make RSS honest."""
    env = dict(os.environ)
    t = str(threads)
    env.update(
        OMP_NUM_THREADS=t,
        MKL_NUM_THREADS=t,
        OPENBLAS_NUM_THREADS=t,
        NUMBA_NUM_THREADS=t,
        # Inductor compiles in-process: no worker pool fighting for the cores
        # or for the memory cap.
        TORCHINDUCTOR_COMPILE_THREADS="1",
        # A fixed mmap threshold returns every freed buffer above 64 KiB to
        # the OS at once, so the peak RSS of a timed call is its own and not
        # the warm-up's leftovers; two arenas bound the address space that
        # threads reserve.
        MALLOC_MMAP_THRESHOLD_="65536",
        MALLOC_ARENA_MAX="2",
        PYTHONUNBUFFERED="1",
        PYTHONWARNINGS="ignore",
    )
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


class Worker:
    """One worker process; yields rows as they come, with a time limit."""

    def __init__(self, job: dict, threads: int):
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            cwd=REPO,
            env=worker_env(threads),
        )
        self.proc.stdin.write(json.dumps(job))
        self.proc.stdin.close()
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.killed = False

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith(ROW_MARK):
                self.lines.put(json.loads(line[len(ROW_MARK) :]))
        self.lines.put(None)

    def next(self, timeout: float):
        """The next result, None at the end, or TimeoutError."""
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            self.proc.kill()
            self.killed = True
            raise TimeoutError from None

    def finish(self) -> tuple[int, str]:
        """Exit code and the tail of stderr."""
        code = self.proc.wait()
        self.stderr.seek(0)
        tail = self.stderr.read()[-2000:]
        self.stderr.close()
        return code, tail


def probe(device: str, threads: int, peers: list[str]) -> dict:
    w = Worker({"job": "probe", "device": device, "threads": threads, "peers": peers}, threads)
    try:
        out = w.next(timeout=600)
    except TimeoutError:
        out = None
    code, tail = w.finish()
    if out is None:
        raise RuntimeError(f"the probe worker failed (exit {code}):\n{tail}")
    return out


def _died(case: Case, code: int, tail: str, killed: bool, timeout: float) -> dict:
    row = schema.empty_row(**case.fields())
    if killed:
        row.update(status="timeout", note=f"killed after {timeout:.0f} s without a result")
    elif code == -9 or any(t in tail.lower() for t in ("bad_alloc", "cannot allocate")):
        # SIGKILL from the kernel's OOM killer, or an abort inside a library
        # that could not allocate: out of memory either way.
        row.update(status="oom", note=f"the process died (exit {code}) allocating memory")
    else:
        last = tail.strip().splitlines()[-1:] or [""]
        row.update(status="crash", note=f"the process died (exit {code}): {last[0][:300]}")
    return row


def batches(cases: list[Case], per_case: bool) -> list[list[Case]]:
    """Cases grouped by worker process: one family (all sizes of a peer's
    layout, mode, dtype and d) per worker, or one case per worker.

    nwfast's families run first, then torch.compile's float32 forward (the
    ratio everyone asks for): if a time budget runs out, it runs out on the
    slow peers.
    """
    groups: dict[tuple, list[Case]] = {}
    for c in cases:
        groups.setdefault((c,) if per_case else family(c), []).append(c)

    def first(group):
        c = group[0]
        return (
            c.peer != "nwfast",
            (c.peer, c.mode, c.dtype) != ("torch-compile", "forward", "float32"),
        )

    return sorted(groups.values(), key=first)


def run_cases(groups, settings, threads, on_row, deadline=None) -> list[dict]:
    """Run every group of cases; on_row(row) is called as each finishes.

    deadline (time.monotonic()) stops new cases, here and in the workers.
    """
    if deadline:
        settings = {**settings, "deadline": time.time() + deadline - time.monotonic()}
    done: dict[tuple, dict] = {}
    rows = []
    # A case may compile, warm up and time up to the cap several times over.
    timeout = 300 + 12 * settings["time_cap_s"]
    for group in groups:
        pending = list(group)
        while pending:
            if deadline and time.monotonic() > deadline:
                for c in pending:
                    row = schema.empty_row(**c.fields())
                    row.update(status="skipped", note="the run's time budget is spent")
                    rows.append(row)
                    on_row(row)
                break
            job = {
                "job": "cases",
                "threads": threads,
                "settings": settings,
                "cases": [asdict(c) for c in pending],
                "done": [[list(k), v] for k, v in done.items()],
            }
            w = Worker(job, threads)
            got = 0
            try:
                while (row := w.next(timeout)) is not None:
                    got += 1
                    rows.append(row)
                    if row["status"] == "ok":
                        done[family(pending[got - 1])] = row
                    on_row(row)
            except TimeoutError:
                pass
            code, tail = w.finish()
            if settings.get("verbose") and tail.strip():
                print(tail, file=sys.stderr)
            if got < len(pending):
                row = _died(pending[got], code, tail, w.killed, timeout)
                rows.append(row)
                on_row(row)
                got += 1
            pending = pending[got:]
    return rows


def settings_for(preset: str, args, limits: dict) -> dict:
    s = dict(POLICY[preset])
    if args.time_cap is not None:
        s["time_cap_s"] = args.time_cap
    s.update(
        mem_cap_bytes=parse_bytes(args.mem_cap) if args.device == "cpu" else None,
        limits=limits,
        check=not args.no_check,
        verbose=args.verbose,
        data={"x_range": X_RANGE, "h": H, "w": W, "noise": NOISE, "seed": SEED},
    )
    return s


def _drop_unsupported(cases, console) -> list[Case]:
    """Cases a peer cannot run leave the plan, one line per peer says why."""
    kept, why = [], {}
    for c in cases:
        reason = PEERS[c.peer].unsupported(c)
        if reason:
            why.setdefault(c.peer, set()).add(reason)
        else:
            kept.append(c)
    for peer, reasons in why.items():
        console.print(f"[dim]{peer}: some cases left out: {'; '.join(sorted(reasons))}[/dim]")
    return kept


def sweep(args, preset: str, console, out_dir: Path, tag: str = "", deadline=None):
    """The whole run: probe, plan, run, write. Returns (path, header, rows)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    from bench.report import format_row, summary_table

    peers = parse_peers(args.peers)
    threads = args.threads or schema.cpu_cores()
    console.print(f"[bold]nwfast bench[/bold]: {preset} sweep on {args.device}, {threads} threads")
    console.print("measuring the machine's limits and which peers import ...")
    probed = probe(args.device, threads, peers)
    if args.device == "cuda" and not probed["cuda_available"]:
        raise SystemExit("--device cuda: torch.cuda.is_available() is False on this machine")
    limits = probed["limits"]
    unavailable = probed["unavailable"]
    for name, reason in unavailable.items():
        console.print(f"[yellow]{name}: left out: {reason}[/yellow]")
    peers = [p for p in peers if p not in unavailable]

    cases = plan(
        preset=preset,
        device=args.device,
        layouts=args.layouts,
        modes=args.modes,
        dtypes=args.dtypes,
        dims=args.dims,
        peers=peers,
        sizes=args.sizes,
        w_kind=args.w,
    )
    cases = _drop_unsupported(cases, console)
    settings = settings_for(preset, args, limits)
    if probed.get("gpu"):
        settings["device_memory_bytes"] = probed["gpu"]["memory_bytes"]
    head = schema.header(
        "sweep",
        args.device,
        threads,
        limits=limits,
        settings={k: v for k, v in settings.items() if k not in ("limits", "verbose")},
        peers={name: PEERS[name].label for name in peers},
        peers_unavailable=unavailable,
        gpu=probed.get("gpu"),
    )
    if probed.get("gpu"):
        head["machine"] = probed["gpu"]["name"]
    _print_limits(console, limits)

    start = time.monotonic()
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )
    groups = batches(cases, per_case=args.device == "cpu" and not probed["peak_reset"])
    order = [c for g in groups for c in g]
    with progress:
        task = progress.add_task("starting", total=len(order))

        def on_row(row):
            progress.console.print(format_row(row))
            i = int(progress.tasks[0].completed) + 1
            nxt = order[i].label() if i < len(order) else "done"
            progress.update(task, advance=1, description=nxt)

        if order:
            progress.update(task, description=order[0].label())
        rows = run_cases(groups, settings, threads, on_row, deadline)
    # Back in plan order: all peers of one case together, nwfast first.
    fields = [f.name for f in dataclasses.fields(Case)]
    rank = {tuple(asdict(c).values()): i for i, c in enumerate(cases)}
    rows.sort(key=lambda r: rank.get(tuple(r[k] for k in fields), len(rank)))
    schema.finish_rows(rows)
    head["duration_s"] = round(time.monotonic() - start, 1)
    path = schema.write(schema.result_path(out_dir, head["machine"], tag), head, rows)
    console.print(summary_table(rows))
    console.print(f"{len(rows)} cases in {head['duration_s']:.0f} s -> {path}")
    return path, head, rows


def _print_limits(console, limits: dict) -> None:
    if limits.get("exp_per_s"):
        console.print(f"exp limit: {limits['exp_per_s']:.3g}/s ({limits['exp_source']})")
    if limits.get("exp_probe_per_s"):
        console.print(f"exp probe: {limits['exp_probe_per_s']:.3g}/s")
    if limits.get("mem_bytes_per_s"):
        console.print(
            f"memory bandwidth: copy {limits['copy_bytes_per_s'] / 1e9:.1f} GB/s, "
            f"read {limits['read_bytes_per_s'] / 1e9:.1f} GB/s"
        )


def _csv(choices):
    def parse(text):
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"{bad}: choose from {list(choices)}")
        return tuple(items)

    return parse


def _sizes(text):
    try:
        return parse_sizes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Time nwfast beside its peers on the same inputs; write JSON.",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--quick",
        action="store_true",
        help="the short sweep (< 5 min on 2 cores): 16384^2 forward with every "
        "peer, one size per layout past the dense reference's memory",
    )
    p.add_argument("--sizes", type=_sizes, help="n = m, e.g. 1024,4096,16k,2^20")
    p.add_argument("--modes", type=_csv(MODES), help=f"of {','.join(MODES)}")
    p.add_argument("--layouts", type=_csv(tuple(LAYOUTS)), help=f"of {','.join(LAYOUTS)}")
    p.add_argument("--peers", help=f"of {','.join(PEERS)} (default: all that import)")
    p.add_argument(
        "--dtypes",
        type=_csv(DTYPES),
        default=("float32",),
        help="of float32,float64,bfloat16,float16 (default float32)",
    )
    p.add_argument(
        "--dims",
        type=lambda t: tuple(int(v) for v in t.split(",")),
        default=(1,),
        help="features d of query and key, e.g. 1,3 (default 1)",
    )
    p.add_argument(
        "--w",
        choices=W_KINDS,
        default="scalar",
        help="one bandwidth weight, or one per key (default scalar)",
    )
    p.add_argument(
        "--mem-cap",
        default="4GiB",
        help="CPU: memory a case may allocate, inputs included (default 4GiB)",
    )
    p.add_argument("--time-cap", type=float, help="skip calls predicted to take longer (s)")
    p.add_argument("--threads", type=int, help="threads for torch and Numba (default: all cores)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    p.add_argument("--no-check", action="store_true", help="skip the float64 checks")
    p.add_argument("--verbose", action="store_true", help="tracebacks of failing cases")
    return p


def parse(argv=None) -> tuple[argparse.Namespace, str]:
    """Arguments with the preset's defaults filled in, and the preset's name."""
    args = parser().parse_args(argv)
    if args.quick:
        preset = "quick"
    else:
        preset = "gpu" if args.device == "cuda" else "full"
    if args.modes is None:
        args.modes = ("forward", "fwd+bwd") if preset == "quick" else MODES
    if args.layouts is None:
        args.layouts = ("shared", "rows") if preset == "gpu" else tuple(LAYOUTS)
    return args, preset


def console():
    """rich's console; full width when the output is a file, not a terminal."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 200)


def main(argv=None) -> int:
    args, preset = parse(argv)
    sweep(args, preset, console(), args.out, tag=preset)
    return 0


if __name__ == "__main__":
    sys.exit(main())
