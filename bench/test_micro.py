"""pytest-benchmark micro-benchmarks of nwfast on CPU, to compare revisions.

    pytest bench/test_micro.py --benchmark-autosave     # one run per revision
    pytest-benchmark compare --group-by=group           # the saved runs side by side
    pytest bench/test_micro.py --benchmark-compare      # this tree vs the last saved

The test run does not collect this file (testpaths = ["tests"]). Inputs and the
timed call come from the benchmark's registry (bench.cases, bench.peers), so a
micro-benchmark times exactly what the sweep's nwfast rows time.
"""

import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("nwfast")

from bench.cases import Case, grad_leaves, make_inputs  # noqa: E402
from bench.peers import PEERS  # noqa: E402
from bench.worker import timed_calls  # noqa: E402

SHARED_SIZES = (1024, 4096, 16384)
ROWS_SIZES = (1024, 4096)  # rows inputs are 2 n m numbers: 16384 would be 2 GiB
CASES = [
    (op, n)
    for op in ("shared", "shared_loo", "rows")
    for n in (ROWS_SIZES if op == "rows" else SHARED_SIZES)
]


@pytest.fixture(scope="module", autouse=True)
def _threads():
    # One fixed thread count, so that runs on the same machine compare.
    old = torch.get_num_threads()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    yield
    torch.set_num_threads(old)


def _bench(benchmark, op: str, mode: str, n: int):
    case = Case("nwfast", op, mode, "float32", "cpu", n, n)
    x = make_inputs(case)
    leaves = grad_leaves(case, x)
    for t in leaves.values():
        t.requires_grad_(True)
    before, call, first = timed_calls(case, x, PEERS["nwfast"].build(case, x), leaves, {})
    before()
    first()  # JIT compile and warm-up, untimed
    benchmark.group = f"{mode} {op}"
    # A round of the largest sizes takes a good part of a second on 2 cores.
    rounds = 100 if n <= 1024 else 20 if n <= 4096 else 5
    benchmark.pedantic(call, setup=before, rounds=rounds, warmup_rounds=1)


@pytest.mark.parametrize(("op", "n"), CASES, ids=[f"{op}-n{n}" for op, n in CASES])
def test_forward(benchmark, op, n):
    _bench(benchmark, op, "forward", n)


@pytest.mark.parametrize(("op", "n"), CASES, ids=[f"{op}-n{n}" for op, n in CASES])
def test_backward(benchmark, op, n):
    _bench(benchmark, op, "backward", n)
