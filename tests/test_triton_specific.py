"""Triton kernels (``kernels/triton_nw.py``) against a dense float64 reference.

Without CUDA the kernels run under Triton's interpreter on CPU tensors (the
conftest sets TRITON_INTERPRET=1 before triton is imported), at small sizes and
in float32/float64 only: the interpreter has no bf16 arithmetic. With CUDA the
same tests run natively, and the ``gpu``-marked ones add half precision, large
sizes (64-bit offsets) and the autotuned configs.
"""

import pytest
import torch

from nwfast.kernels import triton_nw
from nwfast.testing import TOLERANCE, assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FWD_TOL = TOLERANCE
ALL = (True, True, True, True)

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# ---------------------------------------------------------------------------
# Reference and comparison
# ---------------------------------------------------------------------------


def ref_pool(q, k, v, w, exclude_self=False):
    """Dense softmax pooling, (B, n, d), (B, m, d), (B, m, c), (B, m)."""
    d2 = ((q[..., :, None, :] - k[..., None, :, :]) ** 2).sum(-1)
    s = -0.5 * w[..., None, :] * d2
    if exclude_self:
        eye = torch.eye(q.shape[-2], dtype=torch.bool, device=q.device)
        s = s.masked_fill(eye, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def ref_rows(q, keys, values, w):
    s = -0.5 * w * (q[:, None] - keys) ** 2
    return (torch.softmax(s, dim=-1) * values).sum(-1)


def ref_grads(ref_fn, inputs, grad_out, **kw):
    """Output and gradients of `ref_fn` in float64 by autograd."""
    leaves = [x.detach().double().requires_grad_() for x in inputs]
    out = ref_fn(*leaves, **kw)
    out.backward(grad_out.double())
    return out.detach(), [x.grad for x in leaves]


def make_shared(B, n, m, d, c, dtype):
    """Fresh inputs (conftest seeds each test); per-key bandwidths, some
    negative (training may push w below zero)."""
    q = torch.randn(B, n, d, dtype=torch.float64)
    k = torch.randn(B, m, d, dtype=torch.float64)
    v = torch.randn(B, m, c, dtype=torch.float64)
    w = (torch.rand(B, m, dtype=torch.float64) * 2.0 - 0.3) / d
    go = torch.randn(B, n, c, dtype=torch.float64)
    return [x.to(DEVICE, dtype) for x in (q, k, v, w, go)]


def make_rows(n, m, dtype):
    q = torch.randn(n, dtype=torch.float64)
    keys = torch.randn(n, m, dtype=torch.float64)
    values = torch.randn(n, m, dtype=torch.float64)
    w = torch.rand(m, dtype=torch.float64) * 2.0 - 0.3
    go = torch.randn(n, dtype=torch.float64)
    return [x.to(DEVICE, dtype) for x in (q, keys, values, w, go)]


def run_shared(q, k, v, w, go, exclude_self, needs=ALL):
    out, lse = triton_nw.forward(q, k, v, w, exclude_self)
    grads = triton_nw.backward(go, q, k, v, w, out, lse, exclude_self, needs)
    return out, lse, grads


def run_rows(q, keys, values, w, go, needs=ALL):
    out, lse = triton_nw.forward_rows(q, keys, values, w)
    grads = triton_nw.backward_rows(go, q, keys, values, w, out, lse, needs)
    return out, lse, grads


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Tensors the kernels allocate start as NaN: an element left unwritten shows."""

    def poisoned(make):
        def wrapper(*args, **kwargs):
            t = make(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t

        return wrapper

    monkeypatch.setattr(torch, "empty", poisoned(torch.empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(torch.empty_like))


@pytest.fixture(params=["one-tile", "multi-tile"])
def blocks(request, monkeypatch):
    """Interpreter tile sizes: the default large tile, or small tiles so that
    online rescaling, ragged tails and the diagonal tiles of exclude_self all
    run at these small sizes. (On CUDA the configs are autotuned instead.)"""
    if request.param == "multi-tile":
        small = {
            "fwd": {"BLOCK_N": 16, "BLOCK_M": 32},
            "dq": {"BLOCK_N": 32, "BLOCK_M": 16},
            "dkv": {"BLOCK_N": 16, "BLOCK_M": 32},
            "rows_fwd": {"BLOCK_R": 8, "BLOCK_M": 32},
            "rows_bwd": {"BLOCK_R": 16, "BLOCK_M": 32},
        }
        for name, cfg in small.items():
            monkeypatch.setitem(triton_nw.INTERPRET_CONFIGS, name, cfg)
    return request.param


# ---------------------------------------------------------------------------
# Shared keys
# ---------------------------------------------------------------------------

# (B, n, m, d, c, exclude_self); none of n, m a multiple of the small tiles.
SHARED_SHAPES = [
    (2, 1, 1, 3, 2, False),
    (2, 7, 5, 3, 2, False),
    (2, 45, 70, 3, 2, False),
    (2, 70, 45, 1, 1, False),
    (2, 50, 50, 3, 2, True),
    (2, 37, 37, 1, 1, True),
    (1, 2, 2, 2, 3, True),
]


def shape_id(s):
    return "B{}-n{}-m{}-d{}-c{}{}".format(*s[:5], "-loo" if s[5] else "")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", SHARED_SHAPES, ids=shape_id)
def test_forward_shared(shape, dtype, blocks):
    B, n, m, d, c, ex = shape
    q, k, v, w, _ = make_shared(B, n, m, d, c, dtype)
    out, lse = triton_nw.forward(q, k, v, w, ex)
    assert out.dtype == dtype and lse.dtype == dtype
    assert_close(
        out,
        ref_pool(q.double(), k.double(), v.double(), w.double(), ex),
        FWD_TOL[dtype],
        name="out",
    )
    # lse is the natural-log log-sum-exp of the scores.
    s = (
        -0.5
        * w.double()[:, None, :]
        * ((q.double()[:, :, None] - k.double()[:, None]) ** 2).sum(-1)
    )
    if ex:
        s = s.masked_fill(torch.eye(n, dtype=torch.bool, device=s.device), float("-inf"))
    assert_close(lse, torch.logsumexp(s, -1), FWD_TOL[dtype], name="lse")


@pytest.mark.parametrize("shape", SHARED_SHAPES, ids=shape_id)
def test_backward_shared_f64(shape, blocks):
    B, n, m, d, c, ex = shape
    q, k, v, w, go = make_shared(B, n, m, d, c, torch.float64)
    out, _, grads = run_shared(q, k, v, w, go, ex)
    ref_out, ref = ref_grads(ref_pool, (q, k, v, w), go, exclude_self=ex)
    assert_close(out, ref_out, 1e-12, name="out")
    for name, got, want in zip(("dquery", "dkey", "dvalue", "dw"), grads, ref):
        assert_close(got, want, 1e-10, name=name)


@pytest.mark.parametrize("shape", SHARED_SHAPES[2:5], ids=shape_id)
def test_backward_shared_f32(shape, blocks):
    B, n, m, d, c, ex = shape
    q, k, v, w, go = make_shared(B, n, m, d, c, torch.float32)
    _, _, grads = run_shared(q, k, v, w, go, ex)
    _, ref = ref_grads(ref_pool, (q, k, v, w), go, exclude_self=ex)
    for name, got, want in zip(("dquery", "dkey", "dvalue", "dw"), grads, ref):
        assert got.dtype == torch.float32
        assert_close(got, want, 1e-5, name=name)


@pytest.mark.parametrize(
    "shape",
    [
        (2, 130, 200, 3, 2, False),
        (2, 200, 130, 1, 1, False),
        (1, 200, 200, 3, 2, True),
        (1, 1100, 1300, 1, 1, False),
        (1, 600, 600, 2, 1, True),
    ],
    ids=shape_id,
)
def test_shared_default_tiles(shape):
    """The interpreter's own large tiles, up to several of them a side."""
    B, n, m, d, c, ex = shape
    for dtype in (torch.float32, torch.float64):
        q, k, v, w, go = make_shared(B, n, m, d, c, dtype)
        out, _, grads = run_shared(q, k, v, w, go, ex)
        ref_out, ref = ref_grads(ref_pool, (q, k, v, w), go, exclude_self=ex)
        assert_close(out, ref_out, FWD_TOL[dtype], name="out")
        for name, got, want in zip(("dquery", "dkey", "dvalue", "dw"), grads, ref):
            assert_close(got, want, 1e-10 if dtype == torch.float64 else 1e-5, name=name)


def test_scalar_w_expanded():
    """A scalar bandwidth arrives expanded (stride 0) to one w per key."""
    q, k, v, _, go = make_shared(2, 33, 40, 3, 2, torch.float64)
    w = torch.full((2, 1), 0.7, dtype=torch.float64, device=DEVICE).expand(2, 40)
    out, _, grads = run_shared(q, k, v, w, go, False)
    ref_out, ref = ref_grads(ref_pool, (q, k, v, w.contiguous()), go)
    assert_close(out, ref_out, 1e-12, name="out")
    for name, got, want in zip(("dquery", "dkey", "dvalue", "dw"), grads, ref):
        assert_close(got, want, 1e-10, name=name)


SUBSETS = [
    (True, False, False, False),
    (False, True, False, False),
    (False, False, True, False),
    (False, False, False, True),
    (False, True, True, False),
]


@pytest.mark.parametrize(
    "needs", SUBSETS, ids=lambda x: "".join("qkvw"[i] for i in range(4) if x[i])
)
def test_backward_needs_subset(needs):
    q, k, v, w, go = make_shared(2, 40, 30, 3, 2, torch.float64)
    _, _, full = run_shared(q, k, v, w, go, True)
    _, _, part = run_shared(q, k, v, w, go, True, needs)
    for name, need, a, b in zip(("dquery", "dkey", "dvalue", "dw"), needs, part, full):
        if need:
            assert_close(a, b, 1e-14, name=name)
        else:
            assert a is None


@pytest.mark.parametrize(
    "shape,force_qk",
    [
        ((2, 33, 33, 16, 16, True), True),
        ((2, 70, 50, 20, 17, False), True),
        ((2, 40, 50, 3, 16, False), False),
    ],
    ids=["d16-c16-loo-qkdot", "d20-c17-qkdot", "d3-c16-pvdot"],
)
def test_tensor_core_paths_f32(shape, force_qk, monkeypatch, blocks):
    """The tl.dot paths (cross term q.k for half inputs with d >= 16, p @ v for
    c >= 16), forced on for float32 so the interpreter can check them."""
    monkeypatch.setattr(triton_nw, "_dot_policy", lambda dtype, d, c: (force_qk, c >= 16))
    B, n, m, d, c, ex = shape
    q, k, v, w, go = make_shared(B, n, m, d, c, torch.float32)
    out, _, grads = run_shared(q, k, v, w, go, ex)
    ref_out, ref = ref_grads(ref_pool, (q, k, v, w), go, exclude_self=ex)
    # The cross-term form loses a little to cancellation (why float32 does not
    # use it outside this test).
    tol = 1e-4 if force_qk else 1e-5
    assert_close(out, ref_out, tol, name="out")
    for name, got, want in zip(("dquery", "dkey", "dvalue", "dw"), grads, ref):
        assert_close(got, want, 1e-4, name=name)


def test_shared_deterministic(blocks):
    q, k, v, w, go = make_shared(2, 70, 45, 3, 2, torch.float32)
    first = run_shared(q, k, v, w, go, False)
    second = run_shared(q, k, v, w, go, False)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    for a, b in zip(first[2], second[2]):
        assert torch.equal(a, b)


# Extremes ------------------------------------------------------------------


def _line_keys(m, dtype):
    """Sorted 1-D keys on [0, 1] and random values, batch of 1."""
    k = torch.linspace(0.0, 1.0, m, dtype=torch.float64)[None, :, None]
    v = torch.randn(1, m, 1, dtype=torch.float64)
    return k.to(DEVICE, dtype), v.to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_far_query_gives_nearest_value(dtype):
    k, v = _line_keys(40, dtype)
    q = torch.tensor([-1e4, -1e3, 0.5, 1e3, 1e4], dtype=dtype, device=DEVICE)[None, :, None]
    w = torch.ones(1, 40, dtype=dtype, device=DEVICE)
    out, lse = triton_nw.forward(q, k, v, w, False)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    for i, j in ((0, 0), (1, 0), (3, -1), (4, -1)):
        assert torch.allclose(out[0, i, 0], v[0, j, 0], rtol=1e-6, atol=0), (
            i,
            out[0, i, 0],
            v[0, j, 0],
        )
    assert_close(
        out, ref_pool(q.double(), k.double(), v.double(), w.double()), FWD_TOL[dtype], name="out"
    )
    go = torch.ones_like(out)
    grads = triton_nw.backward(go, q, k, v, w, out, lse, False, ALL)
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_huge_w_gives_nearest_value(dtype):
    m = 40
    k, v = _line_keys(m, dtype)
    idx = torch.tensor([0, 3, 17, 39, 25])
    # Each query a tenth of a gap from its key: the nearest key is unambiguous.
    q = (k[0, idx, 0].double() + 0.1 / (m - 1)).to(dtype)[None, :, None]
    w = torch.full((1, m), 1e6, dtype=dtype, device=DEVICE)
    out, lse = triton_nw.forward(q, k, v, w, False)
    assert torch.allclose(out[0, :, 0], v[0, idx, 0], rtol=1e-6, atol=0)
    grads = triton_nw.backward(torch.ones_like(out), q, k, v, w, out, lse, False, ALL)
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("wval", [1e-12, 0.0])
def test_tiny_w_gives_mean(wval):
    q, k, v, _, _ = make_shared(2, 20, 30, 3, 2, torch.float32)
    w = torch.full((2, 30), wval, dtype=torch.float32, device=DEVICE)
    out, _ = triton_nw.forward(q, k, v, w, False)
    assert_close(out, v.double().mean(1, keepdim=True).expand(2, 20, 2), 1e-6, name="out")
    out_loo, _ = triton_nw.forward(k, k, v, w, True)
    loo_mean = (v.double().sum(1, keepdim=True) - v.double()) / 29
    assert_close(out_loo, loo_mean, 1e-6, name="out loo")


def test_large_negative_w_matches_reference():
    q, k, v, _, go = make_shared(2, 30, 50, 3, 2, torch.float64)
    w = torch.full((2, 50), -20.0, dtype=torch.float64, device=DEVICE)
    out, _, grads = run_shared(q, k, v, w, go, False)
    ref_out, ref = ref_grads(ref_pool, (q, k, v, w), go)
    assert_close(out, ref_out, 1e-12, name="out")
    for name, got, want in zip(("dquery", "dkey", "dvalue", "dw"), grads, ref):
        assert_close(got, want, 1e-10, name=name)


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")
@pytest.mark.parametrize("exclude_self", [False, True], ids=["shared", "loo"])
def test_nan_query_row_stays_in_its_row(exclude_self, blocks):
    q, k, v, w, go = make_shared(2, 40, 40, 3, 2, torch.float64)
    if exclude_self:
        q = k.clone()
    q[0, 5, 1] = float("nan")
    out, _, grads = run_shared(q, k, v, w, go, exclude_self)
    ref_out, ref = ref_grads(ref_pool, (q, k, v, w), go, exclude_self=exclude_self)
    nan_rows = out.isnan().any(-1)
    assert nan_rows[0, 5] and nan_rows.sum() == 1
    # NaN placement of every output matches float64 autograd.
    assert_close(out, ref_out, 1e-12, name="out")
    for name, got, want in zip(("dquery", "dkey", "dvalue", "dw"), grads, ref):
        assert_close(got, want, 1e-10, name=name)


# ---------------------------------------------------------------------------
# Per-query rows
# ---------------------------------------------------------------------------

ROWS_SHAPES = [(1, 1), (7, 5), (45, 70), (70, 45), (100, 33)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", ROWS_SHAPES, ids=lambda s: f"n{s[0]}-m{s[1]}")
def test_rows(shape, dtype, blocks):
    n, m = shape
    q, keys, values, w, go = make_rows(n, m, dtype)
    out, lse, grads = run_rows(q, keys, values, w, go)
    ref_out, ref = ref_grads(ref_rows, (q, keys, values, w), go)
    assert out.dtype == dtype and lse.dtype == dtype
    assert_close(out, ref_out, FWD_TOL[dtype], name="out")
    s = -0.5 * w.double() * (q.double()[:, None] - keys.double()) ** 2
    assert_close(lse, torch.logsumexp(s, -1), FWD_TOL[dtype], name="lse")
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for name, got, want in zip(("dquery", "dkeys", "dvalues", "dw"), grads, ref):
        assert got.dtype == dtype
        assert_close(got, want, tol, name=name)


@pytest.mark.parametrize("shape", [(130, 200), (200, 130)], ids=lambda s: f"n{s[0]}-m{s[1]}")
def test_rows_default_tiles_up_to_200(shape):
    q, keys, values, w, go = make_rows(*shape, torch.float64)
    out, _, grads = run_rows(q, keys, values, w, go)
    ref_out, ref = ref_grads(ref_rows, (q, keys, values, w), go)
    assert_close(out, ref_out, 1e-12, name="out")
    for name, got, want in zip(("dquery", "dkeys", "dvalues", "dw"), grads, ref):
        assert_close(got, want, 1e-10, name=name)


def test_rows_needs_subset_and_determinism(blocks):
    q, keys, values, w, go = make_rows(70, 45, torch.float32)
    first = run_rows(q, keys, values, w, go)
    second = run_rows(q, keys, values, w, go)
    for a, b in zip((first[0], first[1], *first[2]), (second[0], second[1], *second[2])):
        assert torch.equal(a, b)
    for i in range(4):
        needs = tuple(j == i for j in range(4))
        part = run_rows(q, keys, values, w, go, needs)[2]
        for j in range(4):
            assert (part[j] is None) != (j == i)
        assert_close(part[i], first[2][i], 1e-6, name="subset")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_rows_extremes(dtype):
    n, m = 6, 40
    line = torch.linspace(0.0, 1.0, m, dtype=torch.float64)
    keys = line.expand(n, m).contiguous()
    values = torch.randn(n, m, dtype=torch.float64)
    keys, values = keys.to(DEVICE, dtype), values.to(DEVICE, dtype)
    ones = torch.ones(m, dtype=dtype, device=DEVICE)

    # Far queries: the nearest (first or last) key's value.
    q = torch.tensor([-1e4, -1e3, 1e3, 1e4, 0.3, 0.7], dtype=dtype, device=DEVICE)
    out, lse = triton_nw.forward_rows(q, keys, values, ones)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    want = torch.stack([values[0, 0], values[1, 0], values[2, -1], values[3, -1]])
    assert torch.allclose(out[:4], want, rtol=1e-6, atol=0)
    assert_close(
        out,
        ref_rows(q.double(), keys.double(), values.double(), ones.double()),
        FWD_TOL[dtype],
        name="far",
    )
    grads = triton_nw.backward_rows(torch.ones_like(out), q, keys, values, ones, out, lse, ALL)
    assert all(torch.isfinite(g).all() for g in grads)

    # Huge w: the nearest key's value.
    idx = torch.tensor([0, 5, 17, 39, 22, 30])
    q = (line[idx] + 0.1 / (m - 1)).to(DEVICE, dtype)
    out, _ = triton_nw.forward_rows(q, keys, values, ones * 1e6)
    assert torch.allclose(out, values[torch.arange(n), idx.to(DEVICE)], rtol=1e-6, atol=0)

    # Tiny w: the row mean.
    out, _ = triton_nw.forward_rows(q, keys, values, ones * 1e-12)
    assert_close(out, values.double().mean(1), 1e-6, name="tiny")


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")
@pytest.mark.parametrize("where", ["query", "keys"])
def test_rows_nan_row_stays_in_its_row(where, blocks):
    q, keys, values, w, go = make_rows(50, 40, torch.float64)
    if where == "query":
        q[7] = float("nan")
    else:
        keys[7, 3] = float("nan")
    out, _, grads = run_rows(q, keys, values, w, go)
    ref_out, ref = ref_grads(ref_rows, (q, keys, values, w), go)
    assert out.isnan().nonzero().flatten().tolist() == [7]
    assert_close(out, ref_out, 1e-12, name="out")
    for name, got, want in zip(("dquery", "dkeys", "dvalues", "dw"), grads, ref):
        assert_close(got, want, 1e-10, name=name)


def test_row_groups_cover_rows():
    for n, m in [(1, 1), (63, 5), (64, 300), (1000, 10), (100_000, 3000), (5, 10**7)]:
        groups, per = triton_nw._row_groups(n, m, 256)
        assert per % triton_nw.ROW_ALIGN == 0
        assert (groups - 1) * per < n <= groups * per


# ---------------------------------------------------------------------------
# CUDA only: half precision, autotuned configs at larger sizes, 64-bit offsets
# ---------------------------------------------------------------------------

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
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=shape_id)
def test_gpu_shared(shape, dtype):
    B, n, m, d, c, ex = shape
    q, k, v, w, go = make_shared(B, n, m, d, c, dtype)
    out, lse, grads = run_shared(q, k, v, w, go, ex)
    assert out.dtype == dtype
    ref_out, ref = ref_grads(ref_pool, (q, k, v, w), go, exclude_self=ex)
    assert_close(out, ref_out, FWD_TOL[dtype], name="out")
    tol = {torch.float64: 1e-10, torch.float32: 1e-4}.get(dtype, 1e-2)
    for name, got, want in zip(("dquery", "dkey", "dvalue", "dw"), grads, ref):
        assert got.dtype == dtype
        assert_close(got, want, tol, name=name)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize(
    "shape", [(300, 5000), (2000, 700), (1, 100_000)], ids=lambda s: f"n{s[0]}-m{s[1]}"
)
def test_gpu_rows(shape, dtype):
    q, keys, values, w, go = make_rows(*shape, dtype)
    out, _, grads = run_rows(q, keys, values, w, go)
    ref_out, ref = ref_grads(ref_rows, (q, keys, values, w), go)
    assert_close(out, ref_out, FWD_TOL[dtype], name="out")
    tol = {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, 1e-2)
    for name, got, want in zip(("dquery", "dkeys", "dvalues", "dw"), grads, ref):
        assert_close(got, want, tol, name=name)


@gpu
@needs_cuda
def test_gpu_deterministic_autotuned():
    q, k, v, w, go = make_shared(2, 3000, 2000, 3, 2, torch.float32)
    first = run_shared(q, k, v, w, go, False)
    second = run_shared(q, k, v, w, go, False)
    for a, b in zip((first[0], first[1], *first[2]), (second[0], second[1], *second[2])):
        assert torch.equal(a, b)


@gpu
@needs_cuda
def test_gpu_rows_past_int32_offsets():
    """n * m > 2^31: the last rows must land where they belong."""
    n = m = 46_341  # n * m = 2_147_488_281 > 2**31
    q = torch.randn(n, device="cuda").half()
    keys = torch.randn(n, m, device="cuda", dtype=torch.float16)
    values = torch.randn(n, m, device="cuda", dtype=torch.float16)
    w = torch.rand(m, device="cuda").half()
    go = torch.randn(n, device="cuda").half()
    out, lse, (dq, dk, dv, _) = run_rows(q, keys, values, w, go, (True, True, True, False))
    rows = torch.tensor([0, n // 2, n - 2, n - 1], device="cuda")
    ref_out, ref = ref_grads(ref_rows, (q[rows], keys[rows], values[rows], w), go[rows])
    assert_close(out[rows], ref_out, 1e-2, name="out")
    assert_close(dq[rows], ref[0], 1e-2, name="dquery")
    assert_close(dk[rows], ref[1], 1e-2, name="dkeys")
    assert_close(dv[rows], ref[2], 1e-2, name="dvalues")


@gpu
@needs_cuda
def test_gpu_shared_past_int32_offsets():
    """B * n * d > 2^31 in the shared layout (query side)."""
    n, d, m = 2**29 + 7, 4, 8
    q = torch.randn(1, n, d, device="cuda", dtype=torch.float16)
    k = torch.randn(1, m, d, device="cuda", dtype=torch.float16)
    v = torch.randn(1, m, 1, device="cuda", dtype=torch.float16)
    w = torch.rand(1, m, device="cuda").half()
    go = torch.randn(1, n, 1, device="cuda", dtype=torch.float16)
    out, lse, (dq, *_) = run_shared(q, k, v, w, go, False, (True, False, False, False))
    rows = torch.tensor([0, n // 2, n - 2, n - 1], device="cuda")
    ref_out, ref = ref_grads(ref_pool, (q[:, rows], k, v, w), go[:, rows])
    assert_close(out[:, rows], ref_out, 1e-2, name="out")
    assert_close(dq[:, rows], ref[0], 1e-2, name="dquery")
