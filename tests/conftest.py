"""Shared test set-up: Triton's interpreter without a GPU, seeds, backends, poison.

Every test draws fresh random inputs from its own seed: a hash of its id and of
one seed per run, ``NWFAST_SEED`` when set (to replay a run) and a fresh one
otherwise. The run's seed is printed in the header and beside every failure.
"""

import math
import os
import random
import types
import zlib

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors through Triton's interpreter,
# which must be chosen before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

RUN_SEED = int(os.environ.get("NWFAST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    return f"nwfast: random seed NWFAST_SEED={RUN_SEED}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        report.sections.append(
            ("nwfast seed", f"replay with: NWFAST_SEED={RUN_SEED} python -m pytest '{item.nodeid}'")
        )


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """A seed of this test's own, different on every run unless NWFAST_SEED is set."""
    seed = zlib.crc32(request.node.nodeid.encode()) ^ RUN_SEED
    torch.manual_seed(seed)
    return seed


@pytest.fixture
def poisoned(monkeypatch):
    """Tensors allocated during the test start as NaN: an element a kernel
    leaves unwritten shows up in the comparison."""

    def poison(make):
        def wrapper(*args, **kwargs):
            t = make(*args, **kwargs)
            return t.fill_(math.nan) if t.is_floating_point() else t

        return wrapper

    monkeypatch.setattr(torch, "empty", poison(torch.empty))
    monkeypatch.setattr(torch, "empty_like", poison(torch.empty_like))


# The kernel backends and how they run here: Numba on the CPU; Triton on CUDA
# when there is a GPU, else under the interpreter, once with its default large
# tile and once with small tiles so that multi-tile paths run at small sizes.
KERNEL_BACKENDS = ["numba", "triton"] + (
    [] if torch.cuda.is_available() else ["triton-small-tiles"]
)
SMALL_TILES = {
    "query": {"BLOCK_N": 16, "BLOCK_M": 32},
    "key": {"BLOCK_N": 32, "BLOCK_M": 16},
    "rows_fwd": {"BLOCK_R": 8, "BLOCK_M": 32},
    "rows_bwd": {"BLOCK_R": 16, "BLOCK_M": 32},
}


def _kernel(name, monkeypatch):
    if name == "numba":
        from nwfast.kernels import numba_nw as module

        return types.SimpleNamespace(name="numba", module=module, device="cpu")
    from nwfast.kernels import triton_nw as module

    if name == "triton-small-tiles":
        for side, config in SMALL_TILES.items():
            monkeypatch.setitem(module.INTERPRET_CONFIGS, side, config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return types.SimpleNamespace(name="triton", module=module, device=device)


@pytest.fixture(params=KERNEL_BACKENDS)
def kernel(request, monkeypatch):
    """A kernel backend: ``.name`` (for nw_pool), ``.module`` (the kernels),
    ``.device``."""
    return _kernel(request.param, monkeypatch)


@pytest.fixture
def sparse_everywhere(monkeypatch):
    """Block-sparse plans at test sizes: no minimum size, small blocks."""
    from nwfast.kernels import blocks, numba_nw, triton_nw

    monkeypatch.setattr(blocks, "MIN_SAVED", 0)
    monkeypatch.setattr(numba_nw, "BLOCK", 16)
    monkeypatch.setattr(triton_nw, "SPARSE_BLOCK", 64)


# Triton's interpreter with its default tile owns 256 points a program: too
# many to skip anything at test sizes.
SPARSE_BACKENDS = [
    name for name in KERNEL_BACKENDS if name != "triton" or torch.cuda.is_available()
]


@pytest.fixture(params=SPARSE_BACKENDS)
def sparse_kernel(request, monkeypatch, sparse_everywhere):
    """A kernel backend whose plans skip blocks at test sizes."""
    return _kernel(request.param, monkeypatch)
