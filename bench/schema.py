"""The results file: one JSON object per run, defined here and nowhere else.

Every run of ``python -m bench``, ``python -m bench.bandwidth`` and the GPU suite
writes one file ``bench/results/<machine>_<date>[_<tag>].json``::

    {
      "schema": "nwfast-bench/1",
      "header": {...},          # the machine and the run, see HEADER_FIELDS
      "rows": [{...}, ...]      # one per case: ROW_FIELDS for a sweep,
                                # BANDWIDTH_ROW_FIELDS for bandwidth selection
    }

Times are seconds, memory bytes, rates per second. A field that does not apply
to a row (no timing for an out-of-memory case, no check for a skipped one) is
``null``, never missing, so a reader can index every field of every row.
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

SCHEMA = "nwfast-bench/1"

HEADER_FIELDS = {
    "created": "ISO 8601 local time the run started",
    "command": "the command line, as typed",
    "kind": "'sweep' or 'bandwidth'",
    "git_revision": "HEAD of the checkout, or null before the first commit",
    "git_dirty": "true when the working tree differs from HEAD",
    "device": "'cpu' or 'cuda'",
    "machine": "CPU model name, or the GPU's name on cuda",
    "cpu_model": "CPU model name from /proc/cpuinfo",
    "cpu_cores": "cores this process may run on",
    "threads": "threads given to torch and Numba in every case",
    "gpu": "null on cpu; else name, sm_count, max_sm_clock_mhz, memory_bytes",
    "versions": "python, torch, triton, numba, numpy and each peer's package",
    "limits": "the machine's limits measured in this run (bench.machine)",
    "settings": "memory cap, time cap, repeat policy, data and bandwidth",
    "peers": "peer name -> what it is, for the peers of this run",
    "peers_unavailable": "peer name -> why it was left out of this run",
    "goals": "GPU suite only: each goal, the measured value and pass/fail",
}

# The sweep's rows. ``bench.sweep`` fills the timing fields, ``finish_rows``
# the ratios that need every peer's row of a case.
ROW_FIELDS = {
    # The case (bench.cases.Case).
    "peer": "who computed it: nwfast, torch-broadcast, torch-compile, ...",
    "operator": "nw_pool or nw_pool_rows",
    "layout": "shared, shared_loo (exclude_self=True) or rows",
    "mode": "forward, backward (backward alone) or fwd+bwd",
    "dtype": "float32, float64, bfloat16, float16",
    "device": "cpu or cuda",
    "n": "queries",
    "m": "keys per query",
    "d": "features of query and key",
    "w_kind": "scalar (one bandwidth weight) or per_key",
    "pairs": "n * m (query, key) pairs",
    # What happened.
    "status": "ok, oom, skipped, error, crash or timeout",
    "note": "why a case was skipped or failed; caveats of an ok one",
    # Timing, over repeats after a warm-up call.
    "first_call_s": "the warm-up call: includes JIT / torch.compile / KeOps builds",
    "compile_s": "first_call_s - median_s: the one-off cost of the first call",
    "median_s": "median time of one call",
    "p20_s": "20th percentile",
    "p80_s": "80th percentile",
    "repeats": "timed calls",
    "times_s": "every timed call, in order",
    "pairs_per_s": "pairs / median_s",
    "ns_per_pair": "median_s / pairs in nanoseconds",
    # Memory.
    "input_bytes": "bytes of the inputs (query, key, value, w)",
    "peak_extra_bytes": "peak memory during the timed calls above what was "
    "resident before them (inputs included in 'before')",
    "memory_method": "vmhwm (Linux peak RSS, reset before timing), ru_maxrss, "
    "or cuda_max_allocated",
    # The machine's limit for this case (see bench.cases.work).
    "bound_kind": "exp (shared layouts: compute-bound) or bytes (rows: memory-bound)",
    "bound_work": "exps or bytes the case must do at least",
    "bound_s": "bound_work / the measured limit: the fastest this case can run",
    "bound_fraction": "bound_s / median_s: 1.0 means at the machine's limit",
    # Correctness, against nwfast.reference in float64.
    "check_rel_err": "max over outputs and gradients of ||out - ref|| / ||ref||",
    "check_tol": "tolerance for the dtype (DESIGN 4)",
    "check_rows": "query rows compared (a random subset at large sizes)",
    "check_ok": "check_rel_err <= check_tol, with NaN/inf in the same places",
    # Filled by finish_rows from the nwfast row of the same case.
    "nwfast_speedup": "this peer's median_s / nwfast's median_s (> 1: nwfast faster)",
}


# ``python -m bench.bandwidth``: one row per (peer, n).
BANDWIDTH_ROW_FIELDS = {
    "peer": "nwfast (float64 data), nwfast-f32, statsmodels (cv_ls), kernelsmooth (lscv)",
    "n": "training points",
    "d": "features",
    "status": "ok, skipped or error",
    "note": "why skipped or failed",
    "fit_s": "median time of one fit (bandwidth search included)",
    "fits": "fits timed",
    "times_s": "every timed fit",
    "bandwidth": "the chosen h per feature, in the data's units",
    "loo_mse": "leave-one-out MSE at that h, all peers by one function",
    "loo_mse_vs_nwfast": "loo_mse / nwfast's loo_mse at this n (>= 1: nwfast as good)",
    "nwfast_speedup": "fit_s / nwfast's fit_s at this n (> 1: nwfast faster)",
}


def empty_row(fields=None, **case) -> dict:
    """A row with every field present, ``null`` where not yet known."""
    row = dict.fromkeys(ROW_FIELDS if fields is None else fields)
    row.update(case)
    return row


def case_key(row: dict) -> tuple:
    """Rows with the same key ran the same inputs: they are compared."""
    return tuple(row[k] for k in ("layout", "mode", "dtype", "device", "n", "m", "d", "w_kind"))


def finish_rows(rows: list[dict]) -> None:
    """Fill ``nwfast_speedup`` from the nwfast row of each case, in place."""
    nwfast = {
        case_key(r): r["median_s"] for r in rows if r["peer"] == "nwfast" and r["status"] == "ok"
    }
    for r in rows:
        t = nwfast.get(case_key(r))
        ok = r["status"] == "ok" and r["median_s"] and t
        r["nwfast_speedup"] = r["median_s"] / t if ok and r["peer"] != "nwfast" else None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def versions() -> dict:
    """Versions of everything that can change a number; absent packages are null."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in (
        "torch",
        "triton",
        "numba",
        "numpy",
        "nwfast",
        "pykeops",
        "statsmodels",
        "kernelsmooth",
    ):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def header(kind: str, device: str, threads: int, **extra) -> dict:
    """The header fields this process can fill; the caller adds limits etc."""
    revision = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain")
    h = dict.fromkeys(HEADER_FIELDS)
    h.update(
        created=_dt.datetime.now().isoformat(timespec="seconds"),
        command=" ".join([Path(sys.orig_argv[0]).name, *sys.orig_argv[1:]]),
        kind=kind,
        git_revision=revision or None,
        git_dirty=bool(status) if status is not None else None,
        device=device,
        machine=cpu_model(),
        cpu_model=cpu_model(),
        cpu_cores=cpu_cores(),
        threads=threads,
        versions=versions(),
        peers_unavailable={},
    )
    h.update(extra)
    return h


def result_path(out_dir: Path, machine: str, tag: str = "") -> Path:
    """``<machine>_<YYYY-MM-DD_HHMMSS>[_<tag>].json``, machine name as a slug."""
    slug = re.sub(r"[^a-z0-9]+", "-", machine.lower()).strip("-") or "machine"
    stamp = _dt.datetime.now().strftime("%Y-%m-%d_%H%M%S")
    name = f"{slug}_{stamp}" + (f"_{tag}" if tag else "") + ".json"
    return Path(out_dir) / name


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
