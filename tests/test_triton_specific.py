"""What only the Triton backend has: tensor-core paths, row groups, and the
GPU-only cases (half precision, autotuned configs, offsets past 2^31).

Without CUDA the kernels run under Triton's interpreter (float32/float64 only);
the ``gpu``-marked tests run natively in the GPU suite.
"""

import pytest
import torch

from nwfast import testing
from nwfast.kernels import triton_nw

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ALL = (True, True, True, True)
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make(B, n, m, d, c, dtype, loo=False):
    q = torch.randn(B, n, d, dtype=torch.float64)
    k = q.clone() if loo else torch.randn(B, m, d, dtype=torch.float64)
    v = torch.randn(B, m, c, dtype=torch.float64)
    w = (torch.rand(B, m, dtype=torch.float64) * 2.0 - 0.3) / d
    g = torch.randn(B, n, c, dtype=torch.float64)
    return [x.to(DEVICE, dtype) for x in (q, k, v, w, g)]


def run(q, k, v, w, g, loo, needs=ALL):
    diagonal = 0 if loo else None
    out, lse, plan = triton_nw.forward(q, k, v, w, diagonal, 0.0)
    return out, lse, triton_nw.backward(g, q, k, v, w, out, lse, diagonal, plan, needs)


@pytest.mark.parametrize(
    "shape,force_qk",
    [
        ((2, 33, 33, 16, 16, True), True),
        ((2, 70, 50, 20, 17, False), True),
        ((2, 40, 50, 3, 16, False), False),
    ],
    ids=["d16-c16-loo-qkdot", "d20-c17-qkdot", "d3-c16-pvdot"],
)
def test_tensor_core_paths(shape, force_qk, monkeypatch):
    """The tl.dot paths (cross term q.k for half inputs with d >= 16, p @ v for
    c >= 16), forced on for float32 so the interpreter can check them."""
    monkeypatch.setattr(triton_nw, "_dot_policy", lambda dtype, d, c: (force_qk, c >= 16))
    B, n, m, d, c, loo = shape
    q, k, v, w, g = make(B, n, m, d, c, torch.float32, loo)
    out, _, grads = run(q, k, v, w, g, loo)
    verdicts = [testing.check_pool(out, q, k, v, w, loo)]
    verdicts += testing.check_pool_gradients(grads, q, k, v, w, g, loo)
    if force_qk:
        # ||q||^2 + ||k||^2 - 2 q.k cancels where the points are far from the
        # origin relative to their spread: why float32 never takes it outside
        # this test. Judged against its own, looser, rounding.
        verdicts = [v._replace(ok=v.error <= 100 * v.allowed) for v in verdicts]
    testing.assert_ok(*verdicts)


def test_row_groups_cover_every_row_once():
    for n, m in [(1, 1), (63, 5), (64, 300), (1000, 10), (100_000, 3000), (5, 10**7)]:
        groups, per = triton_nw._row_groups(n, m, 256)
        assert per % triton_nw.ROW_ALIGN == 0
        assert (groups - 1) * per < n <= groups * per


# --- CUDA only ---------------------------------------------------------------------

GPU_SHAPES = [
    (2, 300, 500, 1, 1, False),
    (2, 257, 257, 3, 2, True),
    (2, 300, 400, 32, 32, False),
    (1, 1000, 1000, 16, 64, True),
    (3, 1030, 517, 5, 20, False),
]


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize(
    "shape",
    GPU_SHAPES,
    ids=lambda s: "B{}-n{}-m{}-d{}-c{}{}".format(*s[:5], "-loo" if s[5] else ""),
)
def test_gpu_shared(shape, dtype):
    B, n, m, d, c, loo = shape
    q, k, v, w, g = make(B, n, m, d, c, dtype, loo)
    out, lse, grads = run(q, k, v, w, g, loo)
    assert out.dtype == dtype and all(x.dtype == dtype for x in grads)
    testing.assert_ok(
        testing.check_pool(out, q, k, v, w, loo),
        testing.check_pool_lse(lse, q, k, v, w, loo),
        *testing.check_pool_gradients(grads, q, k, v, w, g, loo),
    )


@gpu
@needs_cuda
def test_gpu_autotuned_results_repeat():
    inputs = make(2, 3000, 2000, 3, 2, torch.float32)
    first = run(*inputs, False)
    second = run(*inputs, False)
    for a, b in zip((first[0], first[1], *first[2]), (second[0], second[1], *second[2])):
        assert torch.equal(a, b)


@gpu
@needs_cuda
def test_gpu_block_sparse_plans():
    """Sorted, skipping plans with the GPU's own block size, fwd and bwd."""
    x = torch.rand(1, 2**15, 1, device="cuda", dtype=torch.float64) * 5
    v = torch.randn(1, 2**15, 1, device="cuda", dtype=torch.float64)
    w = torch.full((1, 1), 1e4, device="cuda", dtype=torch.float64)
    g = torch.randn_like(v)
    q32, k32, v32, w32, g32 = (t.float() for t in (x, x.clone(), v, w, g))
    out, lse, plan = triton_nw.forward(q32, k32, v32, w32, 0, 2.0**-24)
    assert plan.numel() > 0, "no plan"
    grads = triton_nw.backward(g32, q32, k32, v32, w32, out, lse, 0, plan, ALL)
    testing.assert_ok(
        testing.check_pool(out, q32, k32, v32, w32, True),
        *testing.check_pool_gradients(grads, q32, k32, v32, w32, g32, True),
    )


@gpu
@needs_cuda
def test_gpu_rows_past_int32_offsets():
    """n * m > 2^31: the last rows must land where they belong."""
    n = m = 46_341  # n * m = 2_147_488_281 > 2**31
    q = torch.randn(n, device="cuda").half()
    keys = torch.randn(n, m, device="cuda", dtype=torch.float16)
    values = torch.randn(n, m, device="cuda", dtype=torch.float16)
    w = torch.rand(m, device="cuda").half()
    g = torch.randn(n, device="cuda").half()
    out, lse = triton_nw.forward_rows(q, keys, values, w)
    dq, dk, dv, _ = triton_nw.backward_rows(
        g, q, keys, values, w, out, lse, (True, True, True, False)
    )
    rows = torch.tensor([0, n // 2, n - 2, n - 1], device="cuda")
    sub = (q[rows], keys[rows], values[rows], w)
    testing.assert_ok(
        testing.check_rows(out[rows], *sub),
        *testing.check_rows_gradients([dq[rows], dk[rows], dv[rows], None], *sub, g[rows]),
    )


@gpu
@needs_cuda
def test_gpu_shared_past_int32_offsets():
    """B * n * d > 2^31 in the shared layout (query side)."""
    n, d, m = 2**29 + 7, 4, 8
    q = torch.randn(1, n, d, device="cuda", dtype=torch.float16)
    k = torch.randn(1, m, d, device="cuda", dtype=torch.float16)
    v = torch.randn(1, m, 1, device="cuda", dtype=torch.float16)
    w = torch.rand(1, m, device="cuda").half()
    g = torch.randn(1, n, 1, device="cuda", dtype=torch.float16)
    out, lse, plan = triton_nw.forward(q, k, v, w, None, 0.0)
    dq, *_ = triton_nw.backward(g, q, k, v, w, out, lse, None, plan, (True, False, False, False))
    rows = torch.tensor([0, n // 2, n - 2, n - 1], device="cuda")
    sub = (q[:, rows], k, v, w)
    testing.assert_ok(
        testing.check_pool(out[:, rows], *sub),
        *testing.check_pool_gradients([dq[:, rows], None, None, None], *sub, g[:, rows]),
    )
