"""Runs cases in this process: ``python -m bench.worker < job.json``.

The sweep starts a fresh worker for each peer's family of cases (bench.sweep
says why). The job arrives as JSON on stdin; each result leaves as one stdout
line that starts with ROW_MARK (libraries print to stdout too).

CPU memory cap: before the inputs are made, the address space may grow by at
most the cap (plus slack for thread stacks, allocator arenas and JIT code).
An allocation past it fails at once and the case is reported "oom", as it
would be on a machine with that much free memory.
"""

from __future__ import annotations

import json
import math
import re
import resource
import sys
import time
import traceback

from bench import check
from bench.cases import Case, family, human_bytes, input_bytes, make_inputs, predict_s, work
from bench.peers import PEERS
from bench.schema import empty_row

ROW_MARK = "@@bench-row@@ "
SLACK_BYTES = 1 << 30

_OOM_TEXT = (
    "out of memory",
    "can't allocate memory",
    "cannot allocate memory",
    "unable to allocate",
    "bad_alloc",
    "defaultcpuallocator",
)


def emit(obj: dict) -> None:
    sys.stdout.write(ROW_MARK + json.dumps(obj) + "\n")
    sys.stdout.flush()


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = f"{type(exc).__name__} {exc}".lower()
    return any(t in text for t in _OOM_TEXT)


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class CpuMemory:
    """Peak resident memory of a stretch of code, on Linux without a profiler.

    /proc/self/clear_refs resets the peak (VmHWM) to the current RSS, so the
    peak is the stretch's own; where that is unavailable, ru_maxrss (the peak
    since the process started) is the fallback.
    """

    method = "vmhwm"

    def start(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.method = "ru_maxrss"
        self.base_kib = _status_kib("VmRSS") or 0

    def peak_bytes(self) -> int:
        if self.method == "vmhwm":
            peak = _status_kib("VmHWM") or 0
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return max(0, peak - self.base_kib) * 1024


class CudaMemory:
    method = "cuda_max_allocated"

    def start(self) -> None:
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.base = torch.cuda.memory_allocated()

    def peak_bytes(self) -> int:
        import torch

        torch.cuda.synchronize()
        return max(0, torch.cuda.max_memory_allocated() - self.base)


class AddressSpaceCap:
    """Soft RLIMIT_AS at current size + cap; lifted again on exit."""

    def __init__(self, cap_bytes: int | None):
        self.cap = cap_bytes

    def __enter__(self):
        self.old = resource.getrlimit(resource.RLIMIT_AS)
        size_kib = _status_kib("VmSize")
        if self.cap and size_kib:
            limit = size_kib * 1024 + self.cap + SLACK_BYTES
            hard = self.old[1]
            if hard != resource.RLIM_INFINITY:
                limit = min(limit, hard)
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
        return self

    def __exit__(self, *exc):
        resource.setrlimit(resource.RLIMIT_AS, self.old)
        return False


def _timer(device: str):
    """A function that times one call of fn, in seconds, synchronised."""
    if device == "cuda":
        import torch

        def time_cuda(fn):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3

        return time_cuda

    def time_cpu(fn):
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    return time_cpu


def _quantile(xs: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def grad_leaves(case: Case, x: dict) -> dict:
    """Inputs that take gradients; in shared_loo the query is the key."""
    names = ("key", "value", "w") if case.exclude_self else ("query", "key", "value", "w")
    return {name: x[name] for name in names}


def timed_calls(case: Case, x: dict, fn):
    """(before, call, first) for the mode: what is timed and what resets it."""
    leaves = grad_leaves(case, x)
    g = x.get("grad_out")

    def clear_grads():
        for t in leaves.values():
            t.grad = None

    if case.mode == "forward":
        return (lambda: None), fn, fn
    if case.mode == "fwd+bwd":

        def both():
            fn().backward(g)

        return clear_grads, both, both
    # backward alone: one graph, its backward timed again and again.
    graph = {}

    def first():
        graph["out"] = fn()
        graph["out"].backward(g, retain_graph=True)

    def again():
        graph["out"].backward(g, retain_graph=True)

    return clear_grads, again, first


def _repeat(peer, settings, timer, memory, before, call, first, row) -> list[float]:
    """The timed calls after a warm-up call, as the repeat policy allows."""
    cap, target = settings["time_cap_s"], settings["target_s"]
    memory.start()
    before()
    row["first_call_s"] = timer(first)
    if peer.jit:
        # What the first call compiled is neither the call's memory nor its
        # time: the cap is judged on the second call.
        memory.start()
        samples = []
    elif first is call and row["first_call_s"] >= target:
        # Nothing to compile, and a call this long warms its own caches: the
        # warm-up call is the first sample.
        samples = [row["first_call_s"]]
    else:
        samples = []
    if not samples:
        before()
        samples.append(timer(call))
    if samples[0] > cap:
        row["note"] = f"one call timed: a call takes over the {cap:g} s cap"
        return samples
    want = math.ceil(target / max(samples[0], 1e-9))
    reps = min(max(want, settings["min_repeats"]), settings["max_repeats"])
    while len(samples) < reps:
        before()
        samples.append(timer(call))
    return samples


def _time_case(case: Case, settings: dict, row: dict) -> dict:
    """Make inputs, warm up, time, measure memory, check. Fills row in place."""
    peer = PEERS[case.peer]
    cap = settings["mem_cap_bytes"] if case.device == "cpu" else None
    memory = CudaMemory() if case.device == "cuda" else CpuMemory()
    timer = _timer(case.device)

    with AddressSpaceCap(cap):
        x = make_inputs(case)
        row["input_bytes"] = input_bytes(case)
        if case.mode != "forward":
            for t in grad_leaves(case, x).values():
                t.requires_grad_(True)
        fn = peer.build(case, x)
        before, call, first = timed_calls(case, x, fn)
        samples = _repeat(peer, settings, timer, memory, before, call, first, row)
        row["peak_extra_bytes"] = memory.peak_bytes()
        row["memory_method"] = memory.method

    median = _quantile(samples, 0.5)
    row.update(
        status="ok",
        times_s=samples,
        repeats=len(samples),
        median_s=median,
        p20_s=_quantile(samples, 0.2),
        p80_s=_quantile(samples, 0.8),
        compile_s=max(0.0, row["first_call_s"] - median),
        pairs_per_s=case.pairs / median,
        ns_per_pair=median / case.pairs * 1e9,
    )
    limit = settings["limits"].get("mem_bytes_per_s" if case.layout == "rows" else "exp_per_s")
    kind, amount = work(case)
    row.update(bound_kind=kind, bound_work=amount)
    if limit:
        row["bound_s"] = amount / limit
        row["bound_fraction"] = row["bound_s"] / median

    if settings.get("check", True):
        _check(case, x, fn, before, row)
    return row


def _check(case: Case, x: dict, fn, before, row: dict) -> None:
    import torch

    rows = check.rows_to_check(case)
    row["check_rows"] = len(rows)
    row["check_tol"] = check.TOL[case.dtype]
    try:
        before()
        if case.mode == "forward":
            with torch.no_grad():
                err = check.check_output(case, fn(), x, rows)
        else:
            g = check.subset_grad_out(case, x, rows)
            out = fn()
            err = check.check_output(case, out, x, rows)
            out.backward(g)
            grads = {k: t.grad for k, t in grad_leaves(case, x).items()}
            err = max(err, check.check_grads(case, grads, x, rows, g))
    except Exception as exc:  # a failed check is reported, not fatal
        row["note"] = _join(row["note"], f"check failed: {_short(exc)}")
        return
    row["check_rel_err"] = err
    row["check_ok"] = bool(err <= row["check_tol"])


def _short(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    text = text[0] if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _oom_note(exc: BaseException, settings: dict) -> str:
    """'out of memory: tried to allocate 4.0 GiB (cap 4.0 GiB)' where the text says."""
    found = re.search(r"allocate ([0-9.]+) ?(bytes|[KMGT]iB)", str(exc))
    what = "out of memory"
    if found:
        scale = {"bytes": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
        size = float(found.group(1)) * scale[found.group(2)]
        what += f": tried to allocate {human_bytes(size)}"
    cap = settings.get("mem_cap_bytes")
    return what + (f" (cap {human_bytes(cap)})" if cap else "")


def _join(a: str | None, b: str) -> str:
    return f"{a}; {b}" if a else b


def run_case(case: Case, settings: dict, done: dict) -> dict:
    """One row, whatever happens: ok, skipped, oom or error."""
    import torch

    row = empty_row(**case.fields())
    peer = PEERS[case.peer]
    reason = peer.unsupported(case)
    if reason:
        return {**row, "status": "skipped", "note": reason}
    if settings.get("deadline") and time.time() > settings["deadline"]:
        return {**row, "status": "skipped", "note": "the run's time budget is spent"}
    predicted = predict_s(case, done)
    prior = peer.prior_ns.get(case.device)
    if predicted is None and prior:
        predicted = prior * 1e-9 * case.pairs
    memory = settings.get("mem_cap_bytes") or settings.get("device_memory_bytes")
    if peer.dense and memory and case.pairs * case.itemsize >= memory:
        # One n x m matrix cannot fit: run it, for it fails at its first
        # allocation, and "out of memory" is the answer the sweep exists for.
        predicted = None
    if predicted and predicted > settings["time_cap_s"]:
        cap = settings["time_cap_s"]
        note = f"time cap: one call predicted at {predicted:.3g} s > {cap:g} s"
        return {**row, "status": "skipped", "note": note}
    try:
        _time_case(case, settings, row)
    except BaseException as exc:  # every failure becomes a row
        if isinstance(exc, KeyboardInterrupt):
            raise
        row["status"] = "oom" if is_oom(exc) else "error"
        row["note"] = _join(row["note"], _oom_note(exc, settings) if is_oom(exc) else _short(exc))
        if row["status"] == "error" and settings.get("verbose"):
            traceback.print_exc()
    finally:
        if case.device == "cuda":
            torch.cuda.empty_cache()
    return row


def probe(job: dict) -> dict:
    """The machine's limits and which peers import, measured here."""
    import torch

    from bench import machine
    from bench.peers import availability

    out = {"cuda_available": torch.cuda.is_available(), "gpu": None}
    memory = CpuMemory()
    memory.start()
    out["peak_reset"] = memory.method == "vmhwm"
    if job["device"] == "cuda":
        if not out["cuda_available"]:
            return out
        limits = machine.gpu_limits()
        out["gpu"] = limits.pop("gpu")
    else:
        limits = machine.cpu_limits()
    out["limits"] = limits
    out["unavailable"] = availability(job["peers"])
    return out


def main() -> None:
    job = json.load(sys.stdin)
    import warnings

    warnings.filterwarnings("ignore")  # statsmodels and KeOps chatter
    import torch

    torch.set_num_threads(job["threads"])
    # Start torch's thread pool before the memory cap is set: thread stacks
    # and allocator arenas are the process's, not the case's.
    torch.ones(1 << 20).exp_().sum()
    if job["job"] == "probe":
        emit(probe(job))
        return
    done = {tuple(k): v for k, v in job.get("done", [])}
    for fields in job["cases"]:
        case = Case(**fields)
        row = run_case(case, job["settings"], done)
        emit(row)
        if row["status"] == "ok":
            done[family(case)] = row


if __name__ == "__main__":
    main()
