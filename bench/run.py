"""One run: measure the machine, plan the cases, run them in workers, write one file.

Each peer's cases of one dtype run in one worker process (bench.worker), in plan
order, sizes ascending: the thread pools of torch, Numba and KeOps never share a
process with another peer's, each JIT compiles once per worker, and a crash
costs one case (the worker restarts after it). Peak memory is still per case: Linux
resets the peak RSS on request and CUDA's allocator resets its own; where the
peak cannot be reset, each case gets its own process.

Workers import the *installed* nwfast: bench.child says how they start.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

from bench import child, schema
from bench.cases import CASE_FIELDS, NOISE, PRESETS, SEED, Case, family, is_goal, plan
from bench.peers import PEERS
from bench.worker import ROW_MARK, is_oom, oom_note

POLICY = ("target_s", "min_repeats", "max_repeats", "time_cap_s")  # what workers need


class Worker:
    """One worker process; yields rows as they come, with a time limit."""

    def __init__(self, job: dict, threads: int):
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            child.command("from bench.worker import main\nmain()"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            cwd=tempfile.gettempdir(),
            env=child.env(threads),
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


def probe(device: str, threads: int, peers: list[str], limits: bool) -> dict:
    job = {"job": "probe", "device": device, "peers": peers, "limits": limits}
    w = Worker({**job, "threads": threads}, threads)
    try:
        out = w.next(timeout=600)
    except TimeoutError:
        out = None
    code, tail = w.finish()
    if out is None:
        raise RuntimeError(f"the probe worker failed (exit {code}):\n{tail}")
    return out


def _died(case: Case, code: int, tail: str, killed: bool, timeout: float, cap) -> dict:
    row = schema.empty_row(**case.fields())
    if killed:
        row.update(status="timeout", note=f"killed after {timeout:.0f} s without a result")
    elif code == -9 or is_oom(tail):
        # SIGKILL from the kernel's OOM killer, or an abort inside a library
        # that could not allocate: out of memory either way.
        row.update(status="oom", note=f"the process died (exit {code}): {oom_note(tail, cap)}")
    else:
        last = tail.strip().splitlines()[-1:] or [""]
        row.update(status="crash", note=f"the process died (exit {code}): {last[0][:300]}")
    return row


def run_cases(groups: list[list[Case]], settings: dict, threads: int, on_row) -> list[dict]:
    """Every group of cases in its own worker; on_row(row) as each finishes."""
    done: dict[tuple, dict] = {}
    rows = []
    # A case may compile, warm up and time up to the cap several times over
    # (at most a week: a larger wait overflows the platform's timestamps).
    timeout = min(300 + 12 * settings["policy"]["time_cap_s"], 7 * 86400.0)
    for group in groups:
        pending = list(group)
        while pending:
            job = {
                "job": "cases",
                "threads": threads,
                "settings": settings,
                "cases": [asdict(c) for c in pending],
                "done": [[list(k), v] for k, v in done.items()],
            }
            w = Worker(job, threads)
            got = []
            try:
                while (row := w.next(timeout)) is not None:
                    got.append(row)
                    if row["status"] == "ok":
                        done[family(row)] = row
                    on_row(row)
            except TimeoutError:
                pass
            code, tail = w.finish()
            if settings["verbose"] and tail.strip():
                print(tail, file=sys.stderr)
            if len(got) < len(pending):  # the worker died in the next case
                cap = settings["mem_cap_bytes"]
                got.append(_died(pending[len(got)], code, tail, w.killed, timeout, cap))
                on_row(got[-1])
            rows += got
            pending = pending[len(got) :]
    return rows


def run(
    con,
    *,
    kind: str,
    preset: str,
    device: str,
    peers: list[str],
    out_dir: Path,
    threads: int | None = None,
    mem_cap: int | None = None,
    time_cap: float | None = None,
    check: bool = True,
    verbose: bool = False,
    deadline: float | None = None,
    **selection,
) -> tuple[Path, dict, list[dict]]:
    """The whole run: probe, plan, run, write. Returns (path, header, rows).

    ``selection``: bench.cases.plan's filters (ops, modes, dtypes, dims, sizes,
    w_kind). ``deadline`` (time.time()) stops starting new cases.
    """
    from bench.report import progress, table

    threads = threads or schema.cpu_cores()
    con.print(f"[bold]nwfast bench {kind}[/bold]: {preset} on {device}, {threads} threads")
    con.print("measuring the machine and which peers import ...")
    probed = probe(device, threads, peers, limits=kind != "fit")
    if device == "cuda" and not probed["cuda_available"]:
        raise SystemExit("--device cuda: torch.cuda.is_available() is False on this machine")
    for name, reason in probed["unavailable"].items():
        con.print(f"[yellow]{name}: left out: {reason}[/yellow]")
    peers = [p for p in peers if p not in probed["unavailable"]]

    policy = {k: getattr(PRESETS[preset], k) for k in POLICY}
    if time_cap is not None:
        policy["time_cap_s"] = time_cap
    settings = {
        "policy": policy,
        "mem_cap_bytes": mem_cap if device == "cpu" else None,
        "device_memory_bytes": (probed["gpu"] or {}).get("memory_bytes"),
        "limits": probed["limits"],
        "check": check,
        "verbose": verbose,
        "deadline": deadline,
        "data": {"seed": SEED, "noise": NOISE},
    }
    cases = plan(PRESETS[preset], peers, device=device, **selection)
    cases = _supported(cases, PRESETS[preset].leave_out, con)
    # The goals compare nwfast with its own dense pass: those cases run past the cap.
    uncapped = PRESETS[preset].uncapped
    goals = [
        c
        for c in cases
        if is_goal(c, PRESETS[preset])
        and (c.peer in uncapped if uncapped is not None else c.peer.startswith("nwfast"))
    ]
    settings["uncapped"] = [c.key() for c in goals]
    head = schema.header(
        kind,
        preset,
        device,
        threads,
        limits=probed["limits"],
        settings={k: v for k, v in settings.items() if k not in ("limits", "verbose", "uncapped")},
        peers={name: PEERS[name].label for name in peers},
        peers_unavailable=probed["unavailable"],
        gpu=probed["gpu"],
    )
    if probed["gpu"]:
        head["machine"] = probed["gpu"]["name"]
    _print_limits(con, probed["limits"])

    start = time.monotonic()
    # One worker per peer and dtype, the run's first dtype for every peer first
    # (the order of the plan); one per case where the peak RSS cannot be reset.
    per_case = device == "cpu" and not probed["peak_reset"]
    groups: dict[object, list[Case]] = {}
    for c in cases:
        groups.setdefault(c if per_case else (c.peer, c.dtype), []).append(c)
    path = schema.result_path(out_dir, head["machine"], preset)
    # Back in plan order: all peers of one case together, nwfast first.
    rank = {tuple(asdict(c).values()): i for i, c in enumerate(cases)}

    def write(rows):
        rows.sort(key=lambda r: rank.get(tuple(r[k] for k in CASE_FIELDS), len(rank)))
        schema.finish_rows(rows)
        schema.write(path, head, rows)

    measured = []
    with progress(con, [c for g in groups.values() for c in g]) as show:

        def on_row(row):
            show(row)
            measured.append(row)
            write(list(measured))  # a run stopped early keeps what it measured

        rows = run_cases(list(groups.values()), settings, threads, on_row)
    head["duration_s"] = round(time.monotonic() - start, 1)
    write(rows)
    con.print(table(rows))
    con.print(f"{len(rows)} cases in {head['duration_s']:.0f} s -> {path}")
    return path, head, rows


def _supported(cases: list[Case], leave_out: dict, con) -> list[Case]:
    """Cases a peer cannot run, or the preset leaves out, leave the plan; one line
    per peer says why."""
    kept, why = [], {}
    for c in cases:
        reason = PEERS[c.peer].unsupported(c) or leave_out.get((c.op, c.mode), {}).get(c.peer)
        if reason:
            why.setdefault(c.peer, set()).add(reason)
        else:
            kept.append(c)
    for peer, reasons in why.items():
        con.print(f"[dim]{peer}: some cases left out: {'; '.join(sorted(reasons))}[/dim]")
    return kept


def _print_limits(con, limits: dict | None) -> None:
    limits = limits or {}
    if limits.get("exp_per_s"):
        con.print(f"exp limit: {limits['exp_per_s']:.3g}/s ({limits['exp_source']})")
    if limits.get("exp_probe_per_s"):
        con.print(f"exp probe: {limits['exp_probe_per_s']:.3g}/s")
    if limits.get("mem_bytes_per_s"):
        con.print(
            f"memory bandwidth: copy {limits['copy_bytes_per_s'] / 1e9:.1f} GB/s, "
            f"read {limits['read_bytes_per_s'] / 1e9:.1f} GB/s"
        )
