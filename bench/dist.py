"""``python -m bench dist``: strong scaling of ``nwfast.distributed`` on one machine.

One problem (the sweep's shared-keys inputs, n = m) timed in three configurations,
each in fresh worker processes with the same threads per process (one by default):

- ``nwfast``: single-process ``nwfast.nw_pool``, the baseline;
- ``nwfast.distributed`` on a ring of 1 rank: the ring's own overhead;
- ``nwfast.distributed`` on R ranks (gloo over localhost), each rank holding a
  contiguous block of n / R queries and of m / R keys.

Strong-scaling efficiency is T(baseline) / (R * T(R ranks)). The configurations
alternate over a few rounds, so that a change in the machine's load reaches all of
them alike; medians are over every round's calls. Each rank times its calls
between barriers and a call takes as long as its slowest rank.

Bytes are counted where they leave a rank, by wrapping torch.distributed's
``batch_isend_irecv`` (the ring's sends) and ``all_gather`` (the one row of shard
sizes each call gathers) in the worker. After the timing, one call per mode and
configuration is judged as the sweep judges (``bench.check``): a fixed subset of
query rows and every gradient against the float64 reference.
"""

from __future__ import annotations

import os
import socket
import statistics
import time
from pathlib import Path

from bench import schema
from bench.cases import Case

DEFAULTS = {"sizes": (1 << 16,), "ranks": (2,), "modes": ("forward", "fwd+bwd"), "repeats": 5}
ROUNDS = 3
TIMEOUT_S = 1800  # one worker's whole job: every mode, warm-up and repeats


def run(con, *, sizes, ranks, modes, dtype, threads, repeats, rounds, check, out_dir):
    """Every configuration at every size, alternating over rounds; writes one file."""
    from bench.report import table

    settings = {"repeats": repeats, "rounds": rounds, "check": check, "dtype": dtype}
    head = schema.header("dist", "dist", "cpu", threads, settings=settings)
    configs = [("nwfast", 1), ("nwfast.distributed", 1)]
    configs += [("nwfast.distributed", r) for r in ranks if r > 1]
    con.print(
        f"[bold]nwfast bench dist[/bold]: {', '.join(f'{p} x{r}' for p, r in configs)}; "
        f"{threads} thread(s) per process, load average {os.getloadavg()[0]:.2f}"
    )
    start = time.monotonic()
    runs = {}  # (n, peer, ranks) -> every rank's results, one per round
    for round_ in range(rounds):
        for n in sizes:
            for peer, world in configs:
                judge = check and round_ == 0
                job = {"peer": peer, "world": world, "n": n, "modes": list(modes), "dtype": dtype}
                job.update(repeats=repeats, check=judge)
                load = os.getloadavg()[0]
                ranks_out = _launch(job, threads)
                runs.setdefault((n, peer, world), []).append((load, ranks_out))
                con.print(_progress(round_, n, peer, world, modes, ranks_out, load))
    rows = [
        _row(n, peer, world, mode, dtype, runs[(n, peer, world)], threads)
        for n in sizes
        for mode in modes
        for peer, world in configs
    ]
    _efficiencies(rows)
    head["duration_s"] = round(time.monotonic() - start, 1)
    path = schema.write(schema.result_path(out_dir, head["machine"], "dist"), head, rows)
    con.print(table(rows))
    con.print(f"{len(rows)} rows in {head['duration_s']:.0f} s -> {path}")
    return path, head, rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(job: dict, threads: int) -> list[dict]:
    """One configuration: a worker per rank, their results in rank order."""
    from bench.run import Worker

    port = _free_port()
    workers = [
        Worker({**job, "job": "dist", "rank": rank, "port": port, "threads": threads}, threads)
        for rank in range(job["world"])
    ]
    results = []
    for rank, worker in enumerate(workers):
        try:
            result = worker.next(timeout=TIMEOUT_S)
        except TimeoutError:
            result = None
        code, tail = worker.finish()
        if result is None:
            for other in workers:
                other.proc.kill()
            raise RuntimeError(f"rank {rank} of {job} failed (exit {code}):\n{tail}")
        results.append(result)
    return results


def _call_times(ranks_out: list[dict], mode: str) -> list[float]:
    """Each timed call's time: its slowest rank's."""
    return [max(times) for times in zip(*(r["times"][mode] for r in ranks_out))]


def _progress(round_, n, peer, world, modes, ranks_out, load) -> str:
    from bench.report import seconds

    times = ", ".join(
        f"{mode} {seconds(statistics.median(_call_times(ranks_out, mode)))}" for mode in modes
    )
    return f"  round {round_ + 1}: n = m = {n} {peer} x{world}: {times} (load {load:.2f})"


def _row(n, peer, world, mode, dtype, rounds, threads) -> dict:
    from bench.worker import quantile

    case = Case(peer, "shared", mode, dtype, "cpu", n, n)
    times = [t for _, ranks_out in rounds for t in _call_times(ranks_out, mode)]
    first = rounds[0][1]
    median = quantile(times, 0.5)
    row = schema.empty_row(**case.fields())
    row.update(
        status="ok",
        times_s=times,
        repeats=len(times),
        median_s=median,
        p20_s=quantile(times, 0.2),
        p80_s=quantile(times, 0.8),
        pairs_per_s=case.pairs / median,
        ns_per_pair=median / case.pairs * 1e9,
        ranks=world,
        threads_per_rank=threads,
        ring_bytes_per_rank=[r["ring_bytes"][mode] for r in first],
        collective_bytes_per_rank=[r["collective_bytes"][mode] for r in first],
        load_averages=[load for load, _ in rounds],
    )
    links = [r["link"] for r in first if "link" in r]
    if links:
        row["step_bytes"] = links[0]["bytes"]
        row["step_transfer_s"] = max(link["seconds"] for link in links)
    verdict = first[0]["check"].get(mode)
    if verdict:
        row.update(verdict)
    return row


def _efficiencies(rows: list[dict]) -> None:
    """T(baseline) / (ranks * T) for every row beside its baseline, in place."""
    base = {(r["n"], r["mode"]): r["median_s"] for r in rows if r["peer"] == "nwfast"}
    for r in rows:
        r["scaling_efficiency"] = base[(r["n"], r["mode"])] / (r["ranks"] * r["median_s"])


# --- in each worker process ----------------------------------------------------------


def cli_defaults(args) -> dict:
    """The run's arguments from the command line's, defaults filled in."""
    return {
        "sizes": args.sizes or DEFAULTS["sizes"],
        "ranks": args.ranks or DEFAULTS["ranks"],
        "modes": args.modes or DEFAULTS["modes"],
        "dtype": args.dtype,
        "threads": args.threads or 1,
        "repeats": args.repeats or DEFAULTS["repeats"],
        "rounds": args.rounds,
        "check": not args.no_check,
        "out_dir": Path(args.out or schema.RESULTS),
    }
