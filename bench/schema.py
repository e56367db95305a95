"""The results file: one JSON object per run, defined here and nowhere else.

Every run (``python -m bench sweep``, ``fit``, ``gpu``, ``compare``, ...) writes one file
``<machine>_<date>_<preset>.json``::

    {
      "schema": "nwfast-bench/2",
      "header": {...},          # the machine and the run: HEADER_FIELDS
      "rows": [{...}, ...]      # one per case: ROW_FIELDS
    }

Times are seconds, memory bytes, rates per second. A field that does not apply
to a row (no timing for an out-of-memory case, no bound for a fit) is ``null``,
never missing, so a reader can index every field of every row. A measurement
that only some operations make is one more entry of MEASUREMENTS.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

from bench.cases import same_inputs

SCHEMA = "nwfast-bench/2"
# Every distribution whose version can change a number.
DISTRIBUTIONS = (
    "torch",
    "triton",
    "numba",
    "numpy",
    "nwfast",
    "pykeops",
    "statsmodels",
    "kernelsmooth",
    "KDEpy",
)
RESULTS = Path(__file__).resolve().parent / "results"  # where runs write by default

HEADER_FIELDS = {
    "created": "ISO 8601 local time the run started",
    "command": "the command line, as typed",
    "kind": "'sweep', 'fit', 'gpu', 'dist', 'cold', 'compare' or 'sass'",
    "preset": "quick, full, sparse, fgt, gpu, fit-quick, fit or fit-features "
    "(bench.cases.PRESETS); dist, cold; compare or guard (python -m bench compare --guard); "
    "sass (every variant) or sass-representative (the tests' set)",
    "git_revision": "HEAD of the checkout, or null outside git",
    "git_dirty": "true when tracked files differ from HEAD (new results do not count)",
    "device": "'cpu' or 'cuda'",
    "machine": "CPU model name, or the GPU's name on cuda",
    "cpu_model": "CPU model name from /proc/cpuinfo",
    "cpu_flags": "the CPU's SIMD extensions (avx2, avx512f, ...)",
    "cpu_cores": "cores this process may run on",
    "load_average": "1, 5 and 15 minute load averages as the run started",
    "threads": "threads given to torch, Numba and KeOps in every case",
    "gpu": "null on cpu; else name, sm_count, capability, max_sm_clock_mhz, memory_bytes",
    "versions": "python, torch, triton, numba, numpy and each peer's package",
    "limits": "the machine's limits measured in this run (bench.machine)",
    "settings": "memory cap, repeat policy and time cap, data, checks",
    "peers": "peer name -> what it is, for the peers of this run",
    "peers_unavailable": "peer name -> why it was left out of this run",
    "duration_s": "wall time of the run; null while it runs (the file is rewritten as each "
    "case finishes, so a run stopped early keeps what it measured)",
    "goals": "gpu, sparse and fgt runs: each goal, the measured value and pass/fail "
    "(bench.goals); compare: per case, this tree's time / the base's at most max(threshold, noise)",
    "base": "compare: the revision this tree was timed against: rev (as given), commit",
    "sass": "sass runs: archs, kernels, the choices launched (bench.sass.CHOICES), variants, "
    "the throughput table, cards and their sources (bench.sass_model)",
}

ROW_FIELDS = {
    # The case (bench.cases.Case).
    "peer": "who computed it: nwfast, torch-compile, ... (bench.peers)",
    "op": "shared, shared_loo (exclude_self=True), rows (nw_pool_rows) or fit",
    "mode": "forward, backward (alone), fwd+bwd; for a fit the estimator: local-constant or "
    "local-linear",
    "dtype": "float32, float64, bfloat16, float16",
    "device": "cpu or cuda",
    "n": "queries (fit: training points)",
    "m": "keys per query (fit: n)",
    "d": "features of query and key",
    "w_kind": "scalar (one bandwidth weight) or per_key; null for a fit",
    "data": "the points' family (bench.cases.DATA)",
    "h_rule": "how the case's bandwidth was chosen (bench.cases.H_RULES); null for a fit",
    "pairs": "n * m (query, key) pairs",
    # What happened.
    "status": "ok, oom, skipped, error, crash or timeout",
    "note": "why a case was skipped or failed; caveats of an ok one",
    # Timing, over repeats after a warm-up call.
    "first_call_s": "the first call: JIT, torch.compile or KeOps builds included",
    "compile_s": "first_call_s - median_s for peers that compile; else null",
    "median_s": "median time of one call (a fit: one whole fit)",
    "p20_s": "20th percentile",
    "p80_s": "80th percentile",
    "repeats": "timed calls",
    "times_s": "every timed call, in order",
    "pairs_per_s": "pairs / median_s (pooling)",
    "ns_per_pair": "median_s / pairs in nanoseconds (pooling)",
    # Memory.
    "input_bytes": "bytes of the inputs (query, key, value, w)",
    "peak_extra_bytes": "peak memory during the timed calls above what was resident "
    "before them (the inputs are part of 'before')",
    "memory_method": "vmhwm (Linux peak RSS, reset before timing), ru_maxrss or cuda_max_allocated",
    # The machine's limit for this case (bench.cases.work).
    "bound_kind": "exp (shared layouts: compute-bound) or bytes (rows: memory-bound)",
    "bound_work": "exps or bytes the case must do at least (exps: on the pairs it computes)",
    "bound_s": "bound_work / the measured limit: the fastest this case can run",
    "bound_fraction": "bound_s / median_s: 1.0 means at the machine's limit",
    # Correctness (bench.check): nwfast.testing's verdicts against float64.
    "check_ok": "every verdict (output, each gradient) passed",
    "check_error": "error of the verdict nearest to failing (nwfast.testing.Verdict)",
    "check_allowed": "what that verdict allowed",
    "check_worst": "its name, and where it failed",
    "check_rows": "query rows judged (a fixed random subset at large sizes)",
    # Filled by finish_rows from the nwfast row of the same case.
    "nwfast_speedup": "this peer's median_s / nwfast's median_s (> 1: nwfast faster); "
    "compare, on the base's rows: base / this tree (< 1: this tree slower)",
}

# Measurements only some operations make.
MEASUREMENTS = {
    "h": "pooling: the bandwidth its h_rule gave, w = 1 / h^2 (per-key w scatter around it)",
    "kept_fraction": "pooling: pairs the peer computed / n m (1.0: every pair; "
    "nwfast.pairs_computed for nwfast)",
    "expanded_fraction": "nwfast: pairs whose share came from far-field expansions / n m "
    "(nwfast.plan_summary)",
    "far_bound": "nwfast with expansions: the most any row skips and expands relative to its "
    "denominator (plan_summary().bound; each row within 2 far_bound max|v|), or null",
    "bandwidth": "fit: the chosen h per feature, in the data's units",
    "loo_mse": "fit: leave-one-out MSE at that h, every peer's by one function",
    "loo_mse_vs_nwfast": "fit: loo_mse / nwfast's loo_mse (>= 1: nwfast as good)",
    "ranks": "dist: processes of the configuration (1 for single-process nwfast)",
    "threads_per_rank": "dist: threads each process computes with",
    "scaling_efficiency": "dist: T(single-process nwfast) / (ranks * median_s)",
    "ring_bytes_per_rank": "dist: bytes each rank hands to its sends in one call, rank order",
    "collective_bytes_per_rank": "dist: bytes each rank hands to collectives in one call",
    "load_averages": "dist, compare: the 1-minute load average as each round of this row started",
    "import_torch_s": "cold: import torch in a fresh interpreter (median over repeats)",
    "import_s": "cold: then import nwfast",
    "first_forward_s": "cold: then the first float32 forward (median_s: the total to here "
    "plus the first backward)",
    "first_backward_s": "cold: then its first backward, the gradient to w",
    "first_float64_s": "cold: then a first float64 forward",
    "step_bytes": "dist: one forward ring step's message, a key shard's keys and values",
    "step_transfer_s": "dist: that message's transfer alone, rank to rank (median, slowest)",
    "compare_case": "compare: the case's name (python -m bench compare --cases)",
    "revision": "compare: 'tree' (this checkout as it is) or the base's commit",
    "round_medians_s": "compare: each round's median call, one fresh process per round and side",
    "round_ratios": "compare, base rows: base / this tree in each round, in order",
    "noise": "compare, base rows: max / min of round_ratios, the noise measured",
    "fastest_ratio": "compare, base rows: the base's fastest round median / this tree's",
}


# A sass run's rows (``python -m bench sass``): one per (variant, config, arch).
# Fields after "status" are present when it is "ok"; per-pair figures and the
# model's when a hot loop was found (every kernel's main loop has one).
SASS_ROW_FIELDS = {
    "id": "the task's name: arch, kernel, dtype, shapes, flags, config",
    "name": "the kernel: fwd, dq, dkv, tangent, rows_fwd, rows_bwd, rows_tangent, "
    "moments_fwd, moments_bwd",
    "dtype": "the inputs' dtype",
    "d": "features",
    "c": "channels",
    "exclude_self": "the launch left each query's own key out",
    "sparse": "a block-sparse plan (the planner made one for these inputs)",
    "needs": "the gradients the kernel computes, from its NEED_DQ/DK/DV/DW flags ('' for a "
    "kernel without them)",
    "kernel": "module.function",
    "arch": "compute capability compiled for (90: sm_90a)",
    "config": "block sizes, num_warps, num_stages of the autotune config (null: none left)",
    "status": "ok, compile error, launch error (the launcher cannot start it) or tool error "
    "(cuobjdump or a worker failed)",
    "error": "the compiler's or launcher's message",
    "compile_s": "triton.compile's wall time",
    "registers": "registers per thread (cuobjdump --dump-resource-usage)",
    "stack_bytes": "stack frame per thread",
    "local_bytes": "local memory per thread besides the stack",
    "spill_store_bytes": "bytes of local-memory stores in the SASS (STL): spills",
    "spill_load_bytes": "bytes of local-memory loads in the SASS (LDL)",
    "loop_spill_bytes": "bytes of STL and LDL inside a loop (backward-branch spans)",
    "spills": "any spill store or load inside a loop: a cost each iteration",
    "cold_spill_bytes": "bytes of STL and LDL outside every loop: values saved once a program",
    "shared_bytes": "shared memory per block, dynamic and static",
    "instructions": "SASS instructions in the kernel",
    "blocks_per_sm": "blocks an SM holds at once (registers, shared memory, warps, blocks)",
    "warps_per_sm": "blocks_per_sm * num_warps",
    "occupancy": "warps_per_sm / the SM's most",
    "occupancy_limit": "what sets blocks_per_sm",
    "hot_loop": "the loop holding the exponentials: head, tail, instructions, MUFU.EX2, "
    "inner loops (counted once on the path)",
    "pairs_per_iteration": "(query, key) pairs a thread computes per iteration: tile / threads",
    "path_slots": "instructions issued per iteration on the hot path",
    "path_ops": "the hot path's instructions per iteration, by opcode",
    "per_pair": "the hot path's instructions per pair by category (bench.sass_model.CATEGORIES)",
    "slots_per_pair": "issue slots per pair",
    "mufu_ex2_per_pair": "MUFU.EX2 per pair",
    "hot_path_spill_ops": "local-memory loads and stores per iteration of the hot path",
    "clocks_per_pair": "SM clocks per pair: the slowest pipe's count over its rate",
    "bound_by": "that pipe: issue, fma, alu, xu or fp64",
    "exp_bound_fraction": "(1/16 clock) / clocks_per_pair: the fraction of the exp unit's "
    "bound the loop can reach",
    "predicted_s": "card and n = m -> n m clocks_per_pair / (SMs x clock)",
}


def empty_row(**case) -> dict:
    """A row with every field present, ``null`` where not yet known."""
    return {**dict.fromkeys(ROW_FIELDS), **dict.fromkeys(MEASUREMENTS), **case}


def finish_rows(rows: list[dict]) -> None:
    """Fill the ratios to the nwfast row of each case, in place."""
    nwfast = {same_inputs(r): r for r in rows if r["peer"] == "nwfast" and r["status"] == "ok"}
    for r in rows:
        base = nwfast.get(same_inputs(r))
        if r["status"] != "ok" or base is None or r is base:
            continue
        r["nwfast_speedup"] = r["median_s"] / base["median_s"]
        if r["loo_mse"] is not None and base["loo_mse"]:
            r["loo_mse_vs_nwfast"] = r["loo_mse"] / base["loo_mse"]


def _git(*args: str) -> str | None:
    try:
        cwd = Path(__file__).resolve().parent
        out = subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=10, check=True, cwd=cwd
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _cpuinfo(field: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def versions() -> dict:
    """Python's version and each distribution's; absent ones are null."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in DISTRIBUTIONS:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def header(kind: str, preset: str, device: str, threads: int, **extra) -> dict:
    """The header fields this process can fill; the caller adds limits etc."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    flags = (_cpuinfo("flags") or "").split()
    h = dict.fromkeys(HEADER_FIELDS)
    h.update(
        created=_dt.datetime.now().isoformat(timespec="seconds"),
        command=" ".join([Path(sys.orig_argv[0]).name, *sys.orig_argv[1:]]),
        kind=kind,
        preset=preset,
        git_revision=_git("rev-parse", "HEAD") or None,
        git_dirty=bool(status) if status is not None else None,
        device=device,
        machine=cpu_model(),
        cpu_model=cpu_model(),
        cpu_flags=[f for f in flags if f.startswith(("avx", "fma", "sse4"))],
        cpu_cores=cpu_cores(),
        load_average=list(os.getloadavg()),
        threads=threads,
        versions=versions(),
        peers_unavailable={},
    )
    h.update(extra)
    return h


def result_path(out_dir: Path, machine: str, preset: str) -> Path:
    """``<machine>_<YYYY-MM-DD_HHMMSS>_<preset>.json``, machine name as a slug."""
    slug = re.sub(r"[^a-z0-9]+", "-", machine.lower()).strip("-") or "machine"
    stamp = _dt.datetime.now().strftime("%Y-%m-%d_%H%M%S")
    return Path(out_dir) / f"{slug}_{stamp}_{preset}.json"


def write(path: Path, head: dict, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"schema": SCHEMA, "header": head, "rows": rows}
    path.write_text(json.dumps(doc, indent=1, allow_nan=True) + "\n")
    return path


def load(path: str | Path) -> dict:
    doc = json.loads(Path(path).read_text())
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"{path}: schema {doc.get('schema')!r}, expected {SCHEMA!r}")
    return doc
