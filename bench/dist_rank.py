"""One rank of ``python -m bench dist`` (``bench.dist`` drives the ranks): the
timed calls of one configuration, the bytes that leave the rank, and the
verdicts on one call per mode. A leaf of the benchmark: the worker process
imports it, and it imports neither the driver nor the worker.
"""

from __future__ import annotations

import statistics
import time

from bench.cases import Case, make_inputs


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
    # both calls take the default tolerance: the rows may leave out what it allows
    verdicts = [testing.check_pool(out[rows], q[rows], k, v, w, tolerance=None)]
    if gradients:
        dw = sum(p[4] for p in parts)  # each rank's part of the replicated w's gradient
        verdicts += testing.check_pool_gradients(
            [dq[rows], dk, dv, dw], q[rows], k, v, w, upstream[rows], tolerance=None
        )
    return check.summary(verdicts, len(rows))
