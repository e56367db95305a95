"""The worker: a child process that runs cases and prints one result row per case.

``bench.run`` starts one worker per peer (its thread pools and JIT caches are then
its own) and sends the job as JSON on stdin; each row leaves as one stdout line
that starts with ROW_MARK, since libraries print to stdout too.

CPU memory cap: before the inputs are made, the address space may grow by at
most the cap (plus slack for thread stacks, allocator arenas and JIT code). An
allocation past it fails at once and the case is reported "oom", as it would be
on a machine with that much free memory.
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
from bench.cases import Case, family, grad_leaves, input_bytes, make_inputs, work
from bench.peers import PEERS
from bench.schema import empty_row

ROW_MARK = "@@bench-row@@ "
SLACK_BYTES = 1 << 30

# What allocators say when they fail, in exceptions and in a dead process's stderr.
_OOM_TEXT = (
    "out of memory",
    "outofmemoryerror",
    "memoryerror",
    "can't allocate memory",
    "cannot allocate memory",
    "unable to allocate",
    "bad_alloc",
    "defaultcpuallocator",
)


def is_oom(text: str) -> bool:
    return any(t in text.lower() for t in _OOM_TEXT)


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
    since the process started) is the fallback, and bench.run gives each case
    its own process.
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


def quantile(xs: list[float], q: float) -> float:
    """Linear interpolation between order statistics (NumPy's default)."""
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def timed_calls(case: Case, x: dict, fn, leaves: dict, result: dict):
    """(before, call, first) for the mode: what resets, what is timed, the warm-up.

    A forward or a fit keeps its last output in ``result["out"]``: the output
    judged, or the bandwidth a fit chose.
    """
    g = x.get("grad_out")

    def clear_grads():
        for t in leaves.values():
            t.grad = None

    if case.mode == "fwd+bwd":

        def both():
            fn().backward(g)

        return clear_grads, both, both
    if case.mode == "backward":  # one graph, its backward timed again and again
        graph = {}

        def first():
            graph["out"] = fn()
            graph["out"].backward(g, retain_graph=True)

        def again():
            graph["out"].backward(g, retain_graph=True)

        return clear_grads, again, first

    def keep():
        result["out"] = fn()

    return (lambda: None), keep, keep


def _repeat(warm_up: bool, policy: dict, timer, memory, before, call, first, row) -> list:
    """The timed calls, after a warm-up call where the peer compiles."""
    cap, target = policy["time_cap_s"], policy["target_s"]
    memory.start()
    before()
    row["first_call_s"] = timer(first)
    samples = []
    if warm_up:
        # What the first call compiled is neither the call's memory nor its
        # time: the cap is judged on the second call.
        memory.start()
    elif first is call and row["first_call_s"] >= target:
        # Nothing to compile, and a call this long warms its own caches: the
        # warm-up call is the first sample.
        samples = [row["first_call_s"]]
    if not samples:
        before()
        samples.append(timer(call))
    if samples[0] > cap:
        row["note"] = f"one call timed: a call takes over the {cap:g} s cap"
        return samples
    want = math.ceil(target / max(samples[0], 1e-9))
    reps = min(max(want, policy["min_repeats"]), policy["max_repeats"])
    while len(samples) < reps:
        before()
        samples.append(timer(call))
    return samples


def _time_case(case: Case, settings: dict, row: dict, warm_up: bool, x=None, computed=None) -> None:
    """Make inputs (unless given, with the pairs the peer computes on them),
    warm up, time, measure memory, judge. Fills row in place."""
    peer = PEERS[case.peer]
    cap = settings["mem_cap_bytes"] if case.device == "cpu" else None
    memory = CudaMemory() if case.device == "cuda" else CpuMemory()
    timer = _timer(case.device)
    result = {}

    with AddressSpaceCap(cap):
        x = make_inputs(case) if x is None else x
        row["input_bytes"] = input_bytes(case) if case.op != "fit" else None
        leaves = grad_leaves(case, x)
        for t in leaves.values():
            t.requires_grad_(True)
        fn = peer.build(case, x)
        before, call, first = timed_calls(case, x, fn, leaves, result)
        samples = _repeat(warm_up, settings["policy"], timer, memory, before, call, first, row)
        row["peak_extra_bytes"] = memory.peak_bytes()
        row["memory_method"] = memory.method

    median = quantile(samples, 0.5)
    row.update(
        status="ok",
        times_s=samples,
        repeats=len(samples),
        median_s=median,
        p20_s=quantile(samples, 0.2),
        p80_s=quantile(samples, 0.8),
        compile_s=max(0.0, row["first_call_s"] - median) if peer.jit else None,
    )
    if case.op != "fit":
        row["h"] = x["h"]
        computed = peer.pairs_computed(case, x) if computed is None else computed
        row["kept_fraction"] = computed / case.pairs
        if peer.plan and case.op != "rows":  # the rows layout has no plan
            row.update(peer.plan(case, x, **peer.options))
    bound = work(case)
    if bound:
        kind, amount = bound
        if kind == "exp":  # one exp per pair computed
            amount *= row["kept_fraction"]
        limit = settings["limits"].get("mem_bytes_per_s" if kind == "bytes" else "exp_per_s")
        row.update(
            pairs_per_s=case.pairs / median,
            ns_per_pair=median / case.pairs * 1e9,
            bound_kind=kind,
            bound_work=amount,
        )
        if limit:
            row["bound_s"] = amount / limit
            row["bound_fraction"] = row["bound_s"] / median
    try:
        if case.op == "fit":
            row["bandwidth"] = result["out"].tolist()
            row["loo_mse"] = check.loo_mse(x["X"], x["y"], result["out"], case.mode)
        elif settings["check"]:
            tolerance = PEERS[case.peer].skipped_share()
            row.update(
                check.summary(*check.judge(case, x, fn, leaves, result.get("out"), tolerance))
            )
    except Exception as exc:  # the timing stands without the judgement
        row["note"] = _join(row["note"], f"not judged: {_short(exc)}")


def _short(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    text = text[0] if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def oom_note(text: str, cap: int | None) -> str:
    """'out of memory: tried to allocate 4.0 GiB (cap 4.0 GiB)' where the text says."""
    from bench.report import human_bytes

    found = re.search(r"allocate ([0-9.]+) ?(bytes|[KMGT]iB)", text)
    what = "out of memory"
    if found:
        scale = {"bytes": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
        what += f": tried to allocate {human_bytes(float(found.group(1)) * scale[found.group(2)])}"
    return what + (f" (cap {human_bytes(cap)})" if cap else "")


def _join(a: str | None, b: str) -> str:
    return f"{a}; {b}" if a else b


def predict_s(case: Case, done: dict, computed: int | None = None) -> float | None:
    """One call's time: the largest smaller size already timed, scaled by the
    pairs each computes (``computed``: the plan's count for a peer that skips;
    n m otherwise); else the peer's prior."""
    prev = done.get(family(case.fields()))
    pairs = case.pairs if computed is None else computed
    if prev:
        return prev["median_s"] * pairs / (prev["pairs"] * (prev["kept_fraction"] or 1.0))
    return PEERS[case.peer].predict_s(case, pairs)


def run_case(case: Case, settings: dict, done: dict, compiled: bool) -> dict:
    """One row, whatever happens: ok, skipped, oom or error. ``compiled``: a
    smaller size of the case ran in this process."""
    import torch

    row = empty_row(**case.fields())
    peer = PEERS[case.peer]
    if settings.get("deadline") and time.time() > settings["deadline"]:
        return {**row, "status": "skipped", "note": "the run's time budget is spent"}
    x = computed = None
    if peer.pairs is not None and case.op not in ("rows", "fit"):
        # A peer that skips pairs costs what its plan keeps: plan before predicting.
        x = make_inputs(case)
        computed = peer.pairs_computed(case, x)
    predicted = predict_s(case, done, computed)
    memory = settings["mem_cap_bytes"] or settings["device_memory_bytes"]
    needs = input_bytes(case) + peer.dense * case.pairs * case.itemsize
    if peer.dense and memory and needs >= memory:
        # "Out of memory" is the answer the sweep exists for, and it comes at
        # the first allocations: no time to predict.
        predicted = None
    cap = settings["policy"]["time_cap_s"]
    if predicted and predicted > cap and case.key() not in settings.get("uncapped", ()):
        return {
            **row,
            "status": "skipped",
            "note": f"time cap: one call predicted at {predicted:.3g} s > {cap:g} s",
        }
    warm_up = peer.jit == "each case" or (peer.jit == "once" and not compiled)
    try:
        _time_case(case, settings, row, warm_up, x, computed)
    except Exception as exc:  # every failure becomes a row
        text = f"{type(exc).__name__} {exc}"
        row["status"] = "oom" if is_oom(text) else "error"
        note = oom_note(text, settings["mem_cap_bytes"]) if is_oom(text) else _short(exc)
        row["note"] = _join(row["note"], note)
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
    out["unavailable"] = availability(job["peers"])
    if job["device"] == "cuda" and out["cuda_available"]:
        out["gpu"] = machine.gpu_info()
    if not job["limits"] or (job["device"] == "cuda" and not out["cuda_available"]):
        out["limits"] = None
    else:
        cuda = job["device"] == "cuda"
        out["limits"] = machine.gpu_limits(out["gpu"]) if cuda else machine.cpu_limits()
    return out


def emit(obj: dict) -> None:
    sys.stdout.write(ROW_MARK + json.dumps(obj) + "\n")
    sys.stdout.flush()


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
    if job["job"] == "dist":
        from bench.dist_rank import rank_main

        emit(rank_main(job))
        return
    done = {tuple(k): v for k, v in job["done"]}
    compiled = set()
    for fields in job["cases"]:
        case = Case(**fields)
        key = family(case.fields())
        row = run_case(case, job["settings"], done, key in compiled)
        emit(row)
        if row["status"] == "ok":
            done[key] = row
            compiled.add(key)
