"""The fused backends against the float64 reference: forward, gradients, extremes."""

import pytest
import torch

import nwfast
from nwfast import reference
from nwfast.testing import assert_close, relative_error

FUSED = ["numba", "triton"]
DTYPES = [torch.float32, torch.float64]

# id -> (batch dims, n, m, d, c); d None: 1-D query/key, c None: 1-D value.
SHARED_CASES = {
    "n37-m53-1d": ((), 37, 53, None, None),
    "n33-m33-d1-c1": ((), 33, 33, 1, 1),
    "n29-m70-d3-vec": ((), 29, 70, 3, None),
    "B2-n33-m65-d3-c2": ((2,), 33, 65, 3, 2),
    "B2x1-n40-m40-d1-c3": ((2, 1), 40, 40, 1, 3),
}
W_KINDS = ["float", "one-element", "per-key", "per-key-batch-signed"]


def device_for(backend):
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def shared_inputs(case, dtype, device, w_kind, requires_grad=False):
    batch, n, m, d, c = SHARED_CASES[case]
    feature = () if d is None else (d,)
    q = 1.5 * torch.randn(*batch, n, *feature, dtype=torch.float64)
    k = 1.5 * torch.randn(*batch, m, *feature, dtype=torch.float64)
    v = torch.randn(*batch, m, *(() if c is None else (c,)), dtype=torch.float64)
    if w_kind == "float":
        w = 0.7
    elif w_kind == "one-element":
        w = 0.2 + torch.rand(1, dtype=torch.float64)
    elif w_kind == "per-key":
        w = 0.1 + torch.rand(m, dtype=torch.float64)
    else:  # any finite w is legal, negative included
        w = 0.5 * torch.randn(*batch, m, dtype=torch.float64)
    tensors = [x.to(device, dtype).requires_grad_(requires_grad) for x in (q, k, v)]
    if isinstance(w, torch.Tensor):
        w = w.to(device, dtype).requires_grad_(requires_grad)
    return (*tensors, w)


def as_reference(x):
    """A float64 CPU leaf copy, so reference gradients are computed independently."""
    if not isinstance(x, torch.Tensor):
        return x
    return x.detach().double().cpu().requires_grad_(x.requires_grad)


def exclude_options(case):
    _, n, m, _, _ = SHARED_CASES[case]
    return [False, True] if n == m else [False]


def gradient_in_dtype(reference_fn, inputs, upstream, **kwargs):
    """The reference's own gradients computed in the inputs' dtype, on CPU."""
    leaves = [x.detach().cpu().requires_grad_() for x in inputs]
    out = reference_fn(*leaves, **kwargs)
    out.backward(upstream.to(out.dtype))
    return [x.grad for x in leaves]


def gradient_tolerance(grad_in_dtype, grad_float64, dtype):
    """float64: 1e-10. float32: gradients such as dw sum terms that cancel heavily
    (|sum| / sum|terms| reaches 1e-5), so a fixed float32 bound is ill-posed: the
    fused gradient may be off by 1e-4 or by 4x what torch's own float32 autograd is."""
    if dtype == torch.float64:
        return 1e-10
    return max(1e-4, 4 * relative_error(grad_in_dtype, grad_float64))


SHARED_PARAMS = [(case, exclude) for case in SHARED_CASES for exclude in exclude_options(case)]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("w_kind", W_KINDS)
@pytest.mark.parametrize("case,exclude_self", SHARED_PARAMS)
def test_forward_matches_reference(backend, dtype, w_kind, case, exclude_self):
    q, k, v, w = shared_inputs(case, dtype, device_for(backend), w_kind)
    out = nwfast.nw_pool(q, k, v, w, exclude_self=exclude_self, backend=backend)
    ref = reference.nw_pool_broadcast(*map(as_reference, (q, k, v, w)), exclude_self=exclude_self)
    assert out.dtype == dtype and out.device == q.device
    assert_close(out, ref)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("w_kind", ["one-element", "per-key-batch-signed"])
@pytest.mark.parametrize("case,exclude_self", SHARED_PARAMS)
def test_gradients_match_reference(backend, dtype, w_kind, case, exclude_self):
    inputs = shared_inputs(case, dtype, device_for(backend), w_kind, requires_grad=True)
    ref_inputs = [as_reference(x) for x in inputs]
    out = nwfast.nw_pool(*inputs, exclude_self=exclude_self, backend=backend)
    ref = reference.nw_pool_broadcast(*ref_inputs, exclude_self=exclude_self)
    upstream = torch.randn_like(ref)
    out.backward(upstream.to(out.device, out.dtype))
    ref.backward(upstream)
    reference_in_dtype = gradient_in_dtype(
        reference.nw_pool_broadcast, inputs, upstream, exclude_self=exclude_self
    )
    for name, x, x_ref, x_dtype in zip(
        ("query", "key", "value", "w"), inputs, ref_inputs, reference_in_dtype
    ):
        tolerance = gradient_tolerance(x_dtype, x_ref.grad, dtype)
        assert_close(x.grad, x_ref.grad, tolerance, name=f"grad of {name}")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("exclude_self", [False, True])
@pytest.mark.parametrize("per_key", [False, True])
def test_gradcheck(backend, exclude_self, per_key):
    device = device_for(backend)
    q, k = torch.randn(2, 5, 2, dtype=torch.float64, device=device).unbind(0)
    v = torch.randn(5, 2, dtype=torch.float64, device=device)
    w = 0.5 + torch.rand(5 if per_key else 1, dtype=torch.float64, device=device)
    inputs = [x.requires_grad_() for x in (q, k, v, w)]

    def pool(q, k, v, w):
        return nwfast.nw_pool(q, k, v, w, exclude_self=exclude_self, backend=backend)

    assert torch.autograd.gradcheck(pool, inputs)


@pytest.mark.parametrize("backend", FUSED)
def test_gradient_of_one_input_only(backend):
    q, k, v, w = shared_inputs("n33-m33-d1-c1", torch.float64, device_for(backend), "per-key")
    w.requires_grad_()
    nwfast.nw_pool(q, k, v, w, backend=backend).sum().backward()
    w_ref = as_reference(w)
    reference.nw_pool_broadcast(*map(as_reference, (q, k, v)), w_ref).sum().backward()
    assert_close(w.grad, w_ref.grad, 1e-10)


@pytest.mark.parametrize("backend", FUSED)
def test_backward_is_deterministic(backend):
    inputs = shared_inputs(
        "B2-n33-m65-d3-c2", torch.float32, device_for(backend), "per-key", requires_grad=True
    )
    grads = []
    for _ in range(2):
        out = nwfast.nw_pool(*inputs, backend=backend)
        grads.append(torch.autograd.grad(out.sum(), inputs))
    for first, second in zip(*grads):
        assert torch.equal(first, second)


# --- extremes ------------------------------------------------------------------


def extreme_inputs(backend, dtype):
    device = device_for(backend)
    k = torch.linspace(0, 5, 40, dtype=dtype, device=device)
    v = torch.randn(40, dtype=dtype, device=device)
    return k, v


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_huge_w_and_far_queries_give_nearest_value(backend, dtype):
    k, v = extreme_inputs(backend, dtype)
    near = k[[3, 17, 30]] + 0.01
    far = torch.tensor([-1e3, 1e3, 2e4], dtype=dtype, device=k.device)
    for q, w, nearest in ((near, 1e6, [3, 17, 30]), (far, 1.0, [0, 39, 39])):
        out = nwfast.nw_pool(q, k, v, w, backend=backend)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, v[nearest])


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tiny_w_gives_the_mean(backend, dtype):
    k, v = extreme_inputs(backend, dtype)
    q = torch.randn(9, dtype=dtype, device=k.device)
    out = nwfast.nw_pool(q, k, v, 1e-12, backend=backend)
    assert_close(out, v.double().mean().expand(9).cpu())


@pytest.mark.parametrize("backend", FUSED)
def test_nan_propagates_as_in_the_reference(backend):
    device = device_for(backend)
    q, k = torch.randn(20, 2, device=device), torch.randn(25, 2, device=device)
    v = torch.randn(25, 3, device=device)
    q[7, 1] = float("nan")  # one query: only its own row becomes NaN
    out = nwfast.nw_pool(q, k, v, 0.8, backend=backend)
    assert torch.isnan(out[7]).all()
    assert torch.isfinite(out[torch.arange(20) != 7]).all()
    assert_close(out, reference.nw_pool_broadcast(*(x.double().cpu() for x in (q, k, v)), 0.8))
    v[4, 0] = float("inf")  # one value: every row reaches it
    out = nwfast.nw_pool(q, k, v, 0.8, backend=backend)
    assert_close(out, reference.nw_pool_broadcast(*(x.double().cpu() for x in (q, k, v)), 0.8))


@pytest.mark.parametrize("backend", FUSED)
def test_non_contiguous_inputs(backend):
    device = device_for(backend)
    base_q = torch.randn(3, 40, 2, device=device)
    base_k = torch.randn(2, 3, 50, device=device)
    base_v = torch.randn(50, 2, 3, device=device)
    q = base_q[:, ::2].transpose(0, 1)[:, :2]  # (20, 2, 2) with strides
    k = base_k.permute(1, 2, 0)[:2, ::2]  # (2, 25, 2)
    v = base_v[::2].permute(1, 0, 2)  # (2, 25, 3)
    q = q.transpose(0, 1)  # (2, 20, 2)
    w = torch.rand(2, 50, device=device)[:, ::2]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    out = nwfast.nw_pool(q, k, v, w, backend=backend)
    ref = reference.nw_pool_broadcast(*(x.double().cpu() for x in (q, k, v, w)))
    assert_close(out, ref)


# --- rows layout -----------------------------------------------------------------


def rows_inputs(n, m, dtype, device, per_key, requires_grad=False):
    query = 2 * torch.rand(n, dtype=torch.float64)
    keys = 5 * torch.rand(n, m, dtype=torch.float64)
    values = torch.randn(n, m, dtype=torch.float64)
    w = torch.randn(m, dtype=torch.float64) if per_key else 0.3 + torch.rand(1, dtype=torch.float64)
    return [x.to(device, dtype).requires_grad_(requires_grad) for x in (query, keys, values, w)]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per_key", [False, True])
@pytest.mark.parametrize("n,m", [(1, 1), (37, 49), (50, 260)])
def test_rows_forward_and_gradients(backend, dtype, per_key, n, m):
    inputs = rows_inputs(n, m, dtype, device_for(backend), per_key, requires_grad=True)
    ref_inputs = [as_reference(x) for x in inputs]
    out = nwfast.nw_pool_rows(*inputs, backend=backend)
    ref = reference.nw_pool_rows_broadcast(*ref_inputs)
    assert_close(out, ref)
    upstream = torch.randn_like(ref)
    out.backward(upstream.to(out.device, out.dtype))
    ref.backward(upstream)
    reference_in_dtype = gradient_in_dtype(reference.nw_pool_rows_broadcast, inputs, upstream)
    for name, x, x_ref, x_dtype in zip(
        ("query", "keys", "values", "w"), inputs, ref_inputs, reference_in_dtype
    ):
        tolerance = gradient_tolerance(x_dtype, x_ref.grad, dtype)
        assert_close(x.grad, x_ref.grad, tolerance, name=f"grad of {name}")


@pytest.mark.parametrize("backend", FUSED)
def test_rows_gradcheck(backend):
    inputs = [
        x.requires_grad_()
        for x in rows_inputs(4, 6, torch.float64, device_for(backend), per_key=True)
    ]
    assert torch.autograd.gradcheck(lambda *xs: nwfast.nw_pool_rows(*xs, backend=backend), inputs)


@pytest.mark.parametrize("backend", FUSED)
def test_rows_layout_equals_shared_layout_on_shared_keys(backend):
    device = device_for(backend)
    q, k, v = (
        torch.randn(30, device=device),
        torch.randn(45, device=device),
        torch.randn(45, device=device),
    )
    shared = nwfast.nw_pool(q, k, v, 1.3, backend=backend)
    rows = nwfast.nw_pool_rows(q, k.expand(30, 45), v.expand(30, 45), 1.3, backend=backend)
    assert_close(rows, shared.double())
