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
from bench.cases import Case, make_inputs

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


class _Sent:
    """Bytes this rank hands to torch.distributed's sends and collectives."""

    def __init__(self, dist):
        self.ring = self.collective = 0
        send, gather = dist.batch_isend_irecv, dist.all_gather

        def batch_isend_irecv(ops):
            sends = [op.tensor for op in ops if op.op is dist.isend]
            self.ring += sum(t.numel() * t.element_size() for t in sends)
            return send(ops)

        def all_gather(outputs, tensor, *args, **kwargs):
            self.collective += tensor.numel() * tensor.element_size()
            return gather(outputs, tensor, *args, **kwargs)

        dist.batch_isend_irecv, dist.all_gather = batch_isend_irecv, all_gather

    def reset(self):
        self.ring = self.collective = 0


def _block(x, rank, world):
    """Rank's contiguous block of x's first dim, n / world points (the first ranks
    take one more where it does not divide)."""
    n = len(x)
    sizes = [n // world + (r < n % world) for r in range(world)]
    return x[sum(sizes[:rank]) : sum(sizes[: rank + 1])]


def _caller(pool, leaves, upstream):
    """One call: the forward, and the backward where there is an upstream gradient."""

    def call():
        out = pool(leaves["query"], leaves["key"], leaves["value"], leaves["w"])
        if upstream is not None:
            for t in leaves.values():
                t.grad = None
            out.backward(upstream)
        return out

    return call


def rank_main(job: dict) -> dict:
    """One rank of one configuration: every mode's timed calls, bytes and verdicts."""
    import torch.distributed as dist

    import nwfast
    import nwfast.distributed

    rank, world, ring = job["rank"], job["world"], job["peer"] == "nwfast.distributed"
    if ring:
        address = f"tcp://127.0.0.1:{job['port']}"
        dist.init_process_group("gloo", init_method=address, rank=rank, world_size=world)
    sent = _Sent(dist)
    result = {"rank": rank, "times": {}, "ring_bytes": {}, "collective_bytes": {}, "check": {}}
    for mode in job["modes"]:
        case = Case("nwfast", "shared", mode, job["dtype"], "cpu", job["n"], job["n"])
        x = make_inputs(case)
        if ring:
            leaves = {
                name: _block(x[name], rank, world).clone() for name in ("query", "key", "value")
            }
            leaves["w"] = x["w"].clone()
            pool = nwfast.distributed.nw_pool
        else:
            leaves = {name: x[name].clone() for name in ("query", "key", "value", "w")}
            pool = nwfast.nw_pool
        for t in leaves.values():
            t.requires_grad_(mode != "forward")
        upstream = x.get("grad_out")  # None in forward mode
        if ring and upstream is not None:
            upstream = _block(upstream, rank, world)
        call = _caller(pool, leaves, upstream)
        call()  # warm-up: the kernels from Numba's cache, the ring's connections
        times = []
        for _ in range(job["repeats"]):
            if ring:
                dist.barrier()
            sent.reset()
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        result["times"][mode] = times
        result["ring_bytes"][mode], result["collective_bytes"][mode] = sent.ring, sent.collective
        if job["check"]:
            verdict = _judge(case, x, leaves, pool, rank, world, ring)
            if rank == 0:
                result["check"][mode] = verdict
    if ring and world > 1:
        # One forward step's message: a key shard's keys and values.
        shard = len(_block(x["key"], rank, world)) * 2 * x["key"].element_size()
        result["link"] = {"bytes": shard, "seconds": _link_seconds(dist, shard, rank, world)}
    if ring:
        dist.destroy_process_group()
    return result


def _link_seconds(dist, size, rank, world, repeats=10):
    """The median time of a ring step's transfer alone: ``size`` bytes sent to the
    next rank while as many arrive from the previous one."""
    import torch

    outgoing, incoming = torch.zeros(size, dtype=torch.uint8), torch.empty(size, dtype=torch.uint8)
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        ops = [
            dist.P2POp(dist.isend, outgoing, (rank + 1) % world),
            dist.P2POp(dist.irecv, incoming, (rank - 1) % world),
        ]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _judge(case, x, leaves, pool, rank, world, ring):
    """The sweep's verdicts (bench.check) on one more call, judged on rank 0: the
    output on a fixed subset of rows, and in fwd+bwd every gradient with an
    upstream gradient that is zero outside those rows."""
    import torch
    import torch.distributed as dist

    from bench import check
    from nwfast import testing

    rows = check.rows_to_check(case)
    gradients = case.mode != "forward"
    upstream = None
    if gradients:
        upstream = torch.zeros_like(x["grad_out"])
        upstream[rows] = x["grad_out"][rows]
    for t in leaves.values():
        t.grad = None
    out = pool(leaves["query"], leaves["key"], leaves["value"], leaves["w"])
    if gradients:
        out.backward(_block(upstream, rank, world) if ring else upstream)
    mine = [out.detach()] + [leaves[name].grad for name in ("query", "key", "value", "w")]
    parts = [mine]
    if ring:
        parts = [None] * world
        dist.all_gather_object(parts, mine)
    if rank != 0:
        return None
    out, dq, dk, dv = (
        torch.cat([p[i] for p in parts]) if parts[0][i] is not None else None for i in range(4)
    )
    q, k, v, w = x["query"], x["key"], x["value"], x["w"]
    verdicts = [testing.check_pool(out[rows], q[rows], k, v, w)]
    if gradients:
        dw = sum(p[4] for p in parts)  # each rank's part of the replicated w's gradient
        verdicts += testing.check_pool_gradients(
            [dq[rows], dk, dv, dw], q[rows], k, v, w, upstream[rows]
        )
    return check.summary(verdicts, len(rows))


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
