"""nwfast.distributed on 2, 3 and 4 gloo processes, against nw_pool on the whole problem.

One spawn of processes per world size runs every case of this file (the sizes are
small: starting the processes is the cost). The shards' results come back to the
test process, which judges them with nwfast.testing against the float64 reference,
and against single-process ``nwfast.nw_pool`` on the gathered problem: outputs and
every gradient, uneven and empty shards, exclude_self across shard borders, per-key
and scalar w, bad inputs (every rank raises, and the group still works after), the
bandwidth search, and results that do not depend on timing. Apart from those: rings
torn down and started again, in processes that must exit cleanly.
"""

import datetime
import math
import os
import sys
import time
import weakref
import zlib
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import RUN_SEED

import nwfast
import nwfast.distributed
from nwfast import testing

WORLDS = (2, 3, 4)
SPAWN_TIMEOUT_S = 300  # a ring that hangs fails its tests instead of the CI job
F64 = torch.float64


def _rows_dim(x, dim):
    return 0 if x.dim() == 1 else dim


def _block(x, sizes, rank, dim=-2):
    """Rank's contiguous block of x along its points dim, as a leaf of its own."""
    dim = _rows_dim(x, dim)
    return x.narrow(dim, sum(sizes[:rank]), sizes[rank]).clone()


def _leaf(x, requires_grad):
    if not isinstance(x, torch.Tensor):
        return x
    return x.detach().clone().requires_grad_(requires_grad)


# --- the cases, built in the test process and run in every rank --------------------


@dataclass
class PoolCase:
    """One nw_pool over shards: the whole problem, how it is cut, what needs grad."""

    name: str
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    w: object  # a float, a (1,) tensor (replicated) or one per key (sharded)
    upstream: torch.Tensor
    query_sizes: list
    key_sizes: list
    exclude_self: bool = False
    grads: tuple = (True, True, True, True)  # query, key, value, w
    delays: tuple = ()  # seconds each rank waits before the forward and the backward

    @property
    def per_key(self):
        return isinstance(self.w, torch.Tensor) and self.w.numel() > 1

    def run(self, rank):
        need_q, need_k, need_v, need_w = self.grads
        q = _block(self.query, self.query_sizes, rank).requires_grad_(need_q)
        k = _block(self.key, self.key_sizes, rank).requires_grad_(need_k)
        v = _block(self.value, self.key_sizes, rank).requires_grad_(need_v)
        if self.per_key:
            w = _block(self.w, self.key_sizes, rank, dim=-1).requires_grad_(need_w)
        else:
            w = _leaf(self.w, need_w)
        self._wait(rank)
        out = nwfast.distributed.nw_pool(q, k, v, w, exclude_self=self.exclude_self)
        self._wait(rank)
        out.backward(_block(self.upstream, self.query_sizes, rank))
        grads = [x.grad if isinstance(x, torch.Tensor) else None for x in (q, k, v, w)]
        return {"out": out.detach(), "grads": grads}

    def _wait(self, rank):
        if self.delays:
            time.sleep(self.delays[rank])


@dataclass
class ErrorCase:
    """Each rank passes its own arguments; every rank must raise."""

    name: str
    arguments: list  # per rank: (args, kwargs) of nwfast.distributed.nw_pool
    message: str  # what the error says on the ranks that caused it
    culprits: tuple  # those ranks (the others say some rank refused)

    def run(self, rank):
        args, kwargs = self.arguments[rank]
        nwfast.distributed.nw_pool(*args, **kwargs)
        return {}


@dataclass
class BandwidthCase:
    name: str
    x: torch.Tensor
    y: torch.Tensor
    sizes: list
    per_feature: bool = False

    def run(self, rank):
        x, y = _block(self.x, self.sizes, rank, 0), _block(self.y, self.sizes, rank, 0)
        return nwfast.distributed.loo_bandwidth(x, y, per_feature=self.per_feature)._asdict()


def _worker(rank, world, store, cases, out_dir):
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=120)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=timeout
    )
    results = {}
    for case in cases:
        try:
            results[case.name] = case.run(rank)
        except (TypeError, ValueError) as error:
            results[case.name] = {"error": type(error).__name__, "message": str(error)}
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()
    # Leave without the interpreter's teardown: there, after a clean destroy,
    # a rank of this many cases sometimes aborted ("terminate called without an
    # active exception", about one run of this file in four on 2 cores). The
    # results are saved; test_teardown_is_clean checks that ranks exit cleanly.
    sys.stderr.flush()
    os._exit(0)


# --- how the cases are cut ---------------------------------------------------------


def _sizes(gen, total, world, style):
    """Shard sizes that add up to ``total``: ``random`` cuts (empty shards come up),
    ``empty`` (random, and the middle rank holds none), ``ones`` (shards of one
    point but the last), ``last`` (every point on the last rank)."""
    if style == "ones":
        return [1] * (world - 1) + [total - world + 1]
    if style == "last":
        return [0] * (world - 1) + [total]
    cuts = sorted(torch.randint(0, total + 1, (world - 1,), generator=gen).tolist())
    sizes = [b - a for a, b in zip([0, *cuts], [*cuts, total])]
    if style == "empty":
        middle = world // 2
        sizes[middle - 1] += sizes[middle]
        sizes[middle] = 0
    return sizes


def _points(gen, shape, scale=1.5):
    return scale * torch.randn(shape, generator=gen, dtype=F64)


def pool_cases(gen, world):
    """The numeric cases: every one judged in full, outputs and gradients."""
    cases = []

    def points(*shape):
        return _points(gen, shape)

    def values(*shape):
        return _points(gen, shape, 1.0)

    def positive(*shape, low=0.2):
        return low + torch.rand(shape, generator=gen, dtype=F64)

    def add(name, query, key, value, w, cut, dtype=F64, **options):
        """cut: the styles (see _sizes) of the query and the key shards."""
        tensors = [x.to(dtype) for x in (query, key, value)]
        w = w.to(dtype) if isinstance(w, torch.Tensor) else w
        out_shape = query.shape if value.dim() == 1 else (*query.shape[:-1], value.shape[-1])
        upstream = torch.randn(out_shape, generator=gen, dtype=F64).to(dtype)
        n, m = (x.shape[_rows_dim(x, -2)] for x in (query, key))
        sizes = _sizes(gen, n, world, cut[0]), _sizes(gen, m, world, cut[1])
        cases.append(PoolCase(name, *tensors, w, upstream, *sizes, **options))

    # Batch dims, d = 2, c = 3, one w per key (batched), leave-one-out with the
    # queries and the keys cut at different places.
    x = points(2, 37, 2)
    add(
        "f64-batch-d2-c3-per-key-loo",
        x, x, values(2, 37, 3), positive(2, 37), ("random", "random"), exclude_self=True,
    )  # fmt: skip
    # The 1-D textbook form, a (1,) w, a rank without keys and one without queries.
    add(
        "f64-1d-one-element-w-empty",
        points(31), points(45), values(45), positive(1, low=0.5), ("empty", "empty"),
    )  # fmt: skip
    # float32, the fused d = c = 1 kernels, shards of one key with their own w;
    # query i near but not at key i, so that the pair left out would weigh.
    x = 5 * torch.rand((64, 1), generator=gen, dtype=F64)
    add(
        "f32-d1-per-key-loo-one-key-shards",
        x + 0.1 * values(64, 1), x, values(64, 1), 4 * positive(64, low=1.0), ("random", "ones"),
        dtype=torch.float32, exclude_self=True,
    )  # fmt: skip
    add(
        "f32-d1-scalar-w",
        points(50, 1), points(70, 1), values(70, 1), torch.tensor([0.8]), ("random", "random"),
        dtype=torch.float32,
    )  # fmt: skip
    # A Python float, every query on the last rank, the keys cut anyhow.
    add(
        "f64-float-w-all-queries-last",
        points(40, 3), points(33, 3), values(33, 2), 0.6, ("last", "random"),
    )  # fmt: skip
    # Some gradients only: the value's and the replicated w's.
    add(
        "f64-value-and-w-grads-only",
        points(29, 1), points(41, 1), values(41, 2), torch.tensor([1.3]), ("random", "empty"),
        grads=(False, False, True, True),
    )  # fmt: skip
    # Any finite w is legal: per-key w of both signs (positive scores, online maximum).
    x = points(48, 1)
    add(
        "f64-signed-per-key-w-loo",
        x, x, values(48, 2), 0.3 * values(48), ("random", "random"), exclude_self=True,
    )  # fmt: skip
    # Queries far from every key: |lse| ~ 500, merged across shards.
    key = points(36, 1)
    add(
        "f64-far-queries",
        key + 30.0 + points(36, 1), key, values(36, 1), torch.tensor([1.0]), ("random", "random"),
    )  # fmt: skip
    return cases


def timing_case(cases, world):
    """The first case again, each rank delayed differently: the results must be the
    same bits."""
    first = cases[0]
    delays = tuple(0.05 * ((rank * 7) % world) for rank in range(world))
    return PoolCase(**{**vars(first), "name": "timing", "delays": delays})


def error_cases(gen, world):
    """Bad input on some ranks; the ranks named culprits get the specific message."""

    def shards(n=6, m=5, d=1, w=1.0, dtype=F64):
        tensors = (_points(gen, shape).to(dtype) for shape in ((n, d), (m, d), (m, 1)))
        return (*tensors, w), {}

    def everywhere(**changes):
        """Every rank passes shards(); rank 1 passes shards(**changes)."""
        return [shards(**(changes if rank == 1 else {})) for rank in range(world)]

    def with_w(arguments, w_of_rank):
        return [((*a[:3], w_of_rank(rank)), kw) for rank, (a, kw) in enumerate(arguments)]

    # Rank 1's per-key w has one w fewer than its keys; rank 0 passes a scalar.
    def per_key(m):
        return 0.5 + torch.rand(m, generator=gen, dtype=F64)

    per_key_mismatch = with_w(everywhere(), lambda rank: per_key(4 if rank == 1 else 5))
    mixed_w = with_w(
        everywhere(), lambda rank: torch.tensor(0.5, dtype=F64) if rank == 0 else per_key(5)
    )
    loo = [(a, {"exclude_self": True}) for a, _ in everywhere(n=7)]
    graph = everywhere()
    graph[1] = ((graph[1][0][0].requires_grad_(), *graph[1][0][1:]), {})
    empty_keys = everywhere(m=0)
    empty_keys[1] = ((*empty_keys[1][0][:2], _points(gen, (3, 1)), 1.0), {})
    integer = everywhere()
    integer[1] = ((integer[1][0][0].long(), *integer[1][0][1:]), {})
    return [
        ErrorCase("d-differs", everywhere(d=2), "feature dims differ across ranks", ()),
        ErrorCase("w-shard-mismatch", per_key_mismatch, "does not match key", (1,)),
        ErrorCase("scalar-w-differs", everywhere(w=2.0), "must be the same on every rank", ()),
        ErrorCase("scalar-and-per-key-w", mixed_w, "pass one w for all keys", ()),
        ErrorCase("loo-n-differs-m", loo, "exclude_self needs the queries to be the keys", ()),
        ErrorCase("dtype-differs", everywhere(dtype=torch.float32), "dtypes differ", ()),
        ErrorCase("graph-on-one-rank", graph, "record a graph", ()),
        ErrorCase("empty-key-shard-bad-value", empty_keys, "an empty key shard", (1,)),
        ErrorCase("integer-query", integer, "floating-point", (1,)),
    ]


def bandwidth_cases(gen, world):
    x = 5 * torch.rand(300, generator=gen, dtype=F64)
    y = 2 * torch.sin(x) + x**0.8 + 0.5 * torch.randn(300, generator=gen, dtype=F64)
    x2 = torch.rand((200, 2), generator=gen, dtype=F64) * torch.tensor([5.0, 50.0], dtype=F64)
    y2 = 2 * torch.sin(x2[:, 0]) + 0.5 * torch.randn(200, generator=gen, dtype=F64)
    return [
        BandwidthCase("loo-1d", x, y, _sizes(gen, 300, world, "empty")),
        BandwidthCase("loo-2d-per-feature", x2, y2, _sizes(gen, 200, world, "random"), True),
    ]


def all_cases(world):
    gen = torch.Generator().manual_seed(zlib.crc32(f"distributed-{world}".encode()) ^ RUN_SEED)
    pools = pool_cases(gen, world)
    # The error cases come first: the group must still work after them.
    return [
        *error_cases(gen, world),
        *pools,
        timing_case(pools, world),
        *bandwidth_cases(gen, world),
    ]


# --- running a world -----------------------------------------------------------------


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """ran(world) -> ({name: case}, [results of each rank]), spawned once per world."""
    done = {}

    def run(world):
        if world not in done:
            folder = tmp_path_factory.mktemp(f"world{world}")
            cases = all_cases(world)
            _spawn(_worker, (world, str(folder / "store"), cases, str(folder)), world)
            results = [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(world)]
            done[world] = {case.name: case for case in cases}, results
        return done[world]

    return run


def _spawn(worker, args, world):
    """worker(rank, *args) in ``world`` fresh processes; raises where one raised,
    exited with a code other than 0 or died of a signal."""
    context = mp.start_processes(worker, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{world} ranks did not finish within {SPAWN_TIMEOUT_S} s")


def _failed(results, name):
    errors = [r[name] for r in results if "error" in r[name]]
    assert not errors, f"{name}: ranks raised {errors}"


def _gathered(case, results):
    """The ranks' outputs and gradients as the whole problem's."""
    parts = [r[case.name] for r in results]
    out = torch.cat([p["out"] for p in parts], _rows_dim(parts[0]["out"], -2))
    grads = []
    for i, need in enumerate(case.grads):
        pieces = [p["grads"][i] for p in parts]
        if not need or (i == 3 and not isinstance(case.w, torch.Tensor)):
            assert all(g is None for g in pieces), f"a gradient nobody asked for, input {i}"
            grads.append(None)
        elif i == 3 and not case.per_key:
            grads.append(sum(pieces))  # each rank holds its own loss's part
        else:
            grads.append(torch.cat(pieces, _rows_dim(pieces[0], -1 if i == 3 else -2)))
    return out, grads


def _single_process(case):
    leaves = [
        _leaf(x, need) for x, need in zip((case.query, case.key, case.value, case.w), case.grads)
    ]
    out = nwfast.nw_pool(*leaves, exclude_self=case.exclude_self)
    out.backward(case.upstream)
    grads = [x.grad if isinstance(x, torch.Tensor) else None for x in leaves]
    return out.detach(), grads


POOL_NAMES = [c.name for c in pool_cases(torch.Generator().manual_seed(0), 2)]
ERROR_NAMES = [c.name for c in error_cases(torch.Generator().manual_seed(0), 2)]


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", POOL_NAMES)
def test_pool_matches_one_process(ran, world, name):
    cases, results = ran(world)
    case = cases[name]
    _failed(results, name)
    out, grads = _gathered(case, results)
    inputs = (case.query, case.key, case.value, case.w)
    verdicts = [testing.check_pool(out, *inputs, exclude_self=case.exclude_self)]
    verdicts += testing.check_pool_gradients(
        grads, *inputs, case.upstream, exclude_self=case.exclude_self
    )
    # Beside the reference: single-process nw_pool on the whole problem, which
    # differs only in the order of its sums, within what the reference allows
    # either (the fixed TOLERANCE on a well-conditioned case).
    single_out, single_grads = _single_process(case)
    allowed = {verdict.name: verdict.allowed for verdict in verdicts}
    for label, got, want in zip(
        ("out", "grad of query", "grad of key", "grad of value", "grad of w"),
        (out, *grads),
        (single_out, *single_grads),
    ):
        if got is not None:
            verdicts.append(testing.compare(got, want, allowed[label], f"{label} vs nw_pool"))
    testing.assert_ok(*verdicts)


@pytest.mark.parametrize("world", WORLDS)
def test_results_do_not_depend_on_timing(ran, world):
    cases, results = ran(world)
    _failed(results, "timing")
    for rank, result in enumerate(results):
        again, once = result["timing"], result[POOL_NAMES[0]]
        assert torch.equal(again["out"], once["out"]), f"rank {rank}: output"
        for got, want in zip(again["grads"], once["grads"]):
            assert torch.equal(got, want), f"rank {rank}: gradient"


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", ERROR_NAMES)
def test_bad_input_raises_on_every_rank(ran, world, name):
    cases, results = ran(world)
    case = cases[name]
    for rank, result in enumerate(results):
        got = result[name]
        assert "error" in got, f"rank {rank} did not raise"
        expected = case.message if rank in case.culprits or not case.culprits else "refused"
        assert got["error"] in ("ValueError", "TypeError"), got
        assert expected in got["message"], f"rank {rank}: {got['message']}"


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", ["loo-1d", "loo-2d-per-feature"])
def test_bandwidth_search_matches_the_estimator(ran, world, name):
    from nwfast.estimator import NadarayaWatson

    cases, results = ran(world)
    case = cases[name]
    _failed(results, name)
    found = [r[name] for r in results]
    assert all(_same(f, found[0]) for f in found), f"ranks disagree: {found}"
    model = NadarayaWatson("loo", per_feature=case.per_feature).fit(case.x.numpy(), case.y.numpy())
    h = torch.as_tensor(found[0]["bandwidth"], dtype=F64)
    want = torch.as_tensor(model.bandwidth_, dtype=F64)
    # The same search on the same numbers: only the order of the sums differs.
    assert torch.allclose(h, want, rtol=1e-6, atol=0), (h, want)
    assert math.isclose(found[0]["loo_mse"], model.loo_mse_, rel_tol=1e-9)


def _same(a, b):
    return all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)


def test_needs_an_initialised_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        nwfast.distributed.nw_pool(torch.rand(3), torch.rand(3), torch.rand(3), 1.0)


# --- teardown ----------------------------------------------------------------------

TEARDOWN_CYCLES = 3
# What each rank's rings returned, kept to the end of its process as a script keeps
# its variables: whatever their graphs hold is torn down at interpreter exit.
_KEPT = []


def _teardown_worker(rank, world, folder, cycles):
    # C++ reports an abort ("terminate called ...") on file descriptor 2: keep this rank's.
    with open(f"{folder}/rank{rank}.err", "w") as err:
        os.dup2(err.fileno(), 2)
    torch.set_num_threads(1)
    freed, refused = [], []
    for cycle in range(cycles):
        dist.init_process_group(
            "gloo", init_method=f"file://{folder}/store{cycle}", rank=rank, world_size=world
        )
        gen = torch.Generator().manual_seed(cycle * world + rank)
        q, k = (torch.randn(20 + 7 * rank, 2, generator=gen).requires_grad_() for _ in "qk")
        v = torch.randn(20 + 7 * rank, 3, generator=gen).requires_grad_()
        out = nwfast.distributed.nw_pool(q, k, v, 0.8)
        out.square().sum().backward()
        never_differentiated = nwfast.distributed.nw_pool(q, k, v, 0.8)
        group = weakref.ref(dist.group.WORLD)
        dist.destroy_process_group()
        # The outputs' graphs do not keep the group, and gloo's threads, alive.
        freed.append(group() is None)
        try:
            never_differentiated.sum().backward()
        except RuntimeError as error:
            refused.append(str(error))
        _KEPT.extend([out, never_differentiated])
    torch.save({"freed": freed, "refused": refused}, f"{folder}/rank{rank}.pt")


@pytest.mark.parametrize("world", [2, 3])
def test_teardown_is_clean(tmp_path, world):
    """A group started, used for a forward and a backward and destroyed, again and
    again in the same processes: every rank exits with 0 and reports no abort,
    and destroy_process_group frees the group though the outputs live on."""
    _spawn(_teardown_worker, (world, str(tmp_path), TEARDOWN_CYCLES), world)
    for rank in range(world):
        err = (tmp_path / f"rank{rank}.err").read_text()
        assert "terminate called" not in err, f"rank {rank}: {err[-2000:]}"
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["freed"] == [True] * TEARDOWN_CYCLES, f"rank {rank}: {result}"
        assert len(result["refused"]) == TEARDOWN_CYCLES, f"rank {rank}: {result}"
        assert all("destroyed before this backward" in m for m in result["refused"])
