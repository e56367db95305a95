"""The public operators: every shape and bandwidth kind, every backend, every
derivative, judged by ``nwfast.testing`` against the float64 reference."""

import pytest
import torch

import nwfast
from nwfast import reference, testing

DTYPES = [torch.float32, torch.float64]

# id -> (batch dims, n, m, d, c); d None: 1-D query/key, c None: 1-D value.
SHAPES = {
    "n37-m53-1d": ((), 37, 53, None, None),
    "n33-m33-d1-c1": ((), 33, 33, 1, 1),
    "n29-m70-d3-vec": ((), 29, 70, 3, None),
    "B2-n33-m65-d3-c2": ((2,), 33, 65, 3, 2),
    "B2x1-n40-m40-d1-c3": ((2, 1), 40, 40, 1, 3),
}
W_KINDS = ["float", "one-element", "per-key", "per-key-batch-signed"]
BACKENDS = ["numba", "triton", "torch"]


def device_for(backend):
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def inputs(shape, dtype, device, w_kind):
    batch, n, m, d, c = SHAPES[shape]
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
    q, k, v = (x.to(device, dtype) for x in (q, k, v))
    if isinstance(w, torch.Tensor):
        w = w.to(device, dtype)
    return q, k, v, w


def loo_options(shape):
    _, n, m, _, _ = SHAPES[shape]
    return [False, True] if n == m else [False]


PARAMS = [(shape, loo) for shape in SHAPES for loo in loo_options(shape)]


def leaves(*xs):
    return [x.detach().clone().requires_grad_() if isinstance(x, torch.Tensor) else x for x in xs]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("w_kind", W_KINDS)
@pytest.mark.parametrize("shape,loo", PARAMS)
def test_forward_and_gradients(backend, dtype, w_kind, shape, loo):
    q, k, v, w = inputs(shape, dtype, device_for(backend), w_kind)
    if loo:
        k = q.clone()
    q_, k_, v_, w_ = leaves(q, k, v, w)
    out = nwfast.nw_pool(q_, k_, v_, w_, exclude_self=loo, backend=backend)
    assert out.dtype == dtype and out.device == q.device
    g = torch.randn_like(out)
    out.backward(g)
    grads = [x.grad if isinstance(x, torch.Tensor) else None for x in (q_, k_, v_, w_)]
    testing.assert_ok(
        testing.check_pool(out, q, k, v, w, loo),
        *testing.check_pool_gradients(grads, q, k, v, w, g, loo),
    )


@pytest.mark.parametrize("backend", ["numba", "triton"])
@pytest.mark.parametrize("loo", [False, True])
@pytest.mark.parametrize("per_key", [False, True])
def test_gradcheck_reverse_and_forward_mode(backend, loo, per_key):
    device = device_for(backend)
    q, k = torch.randn(2, 5, 2, dtype=torch.float64, device=device).unbind(0)
    v = torch.randn(5, 2, dtype=torch.float64, device=device)
    w = 0.5 + torch.rand(5 if per_key else 1, dtype=torch.float64, device=device)

    def pool(q, k, v, w):
        return nwfast.nw_pool(q, k, v, w, exclude_self=loo, backend=backend)

    assert torch.autograd.gradcheck(pool, leaves(q, k, v, w), check_forward_ad=True)


@pytest.mark.parametrize("backend", ["numba", "triton"])
def test_torch_func_transforms(backend):
    """jvp, jacfwd, jacrev, grad, vmap and per-sample gradients, against the reference."""
    device = device_for(backend)
    q, k, v = (torch.randn(n, dtype=torch.float64, device=device) for n in (5, 6, 6))
    w = torch.rand(3, dtype=torch.float64, device=device) + 0.5

    def fused(a, w_=1.3):
        return nwfast.nw_pool(a, k, v, w_, backend=backend)

    def plain(a, w_=1.3):
        return nwfast.nw_pool(a, k, v, w_, backend="torch")

    tangent = torch.randn_like(q)
    pairs = [
        (torch.func.jvp(fused, (q,), (tangent,))[1], torch.func.jvp(plain, (q,), (tangent,))[1]),
        (torch.func.jacfwd(fused)(q), torch.func.jacfwd(plain)(q)),
        (torch.func.jacrev(fused)(q), torch.func.jacrev(plain)(q)),
        (
            torch.func.grad(lambda a: fused(a).sum())(q),
            torch.func.grad(lambda a: plain(a).sum())(q),
        ),
        (torch.func.vmap(fused)(q.expand(4, 5) * 2), torch.func.vmap(plain)(q.expand(4, 5) * 2)),
        (
            torch.func.vmap(torch.func.grad(lambda w_: fused(q, w_).sum()))(w),
            torch.func.vmap(torch.func.grad(lambda w_: plain(q, w_).sum()))(w),
        ),
    ]
    for got, want in pairs:
        testing.assert_close(got, want, 1e-12)
    import torch.autograd.forward_ad as forward_ad

    with forward_ad.dual_level():
        out = fused(forward_ad.make_dual(q, tangent))
        testing.assert_close(forward_ad.unpack_dual(out).tangent, pairs[0][1], 1e-12)


@pytest.mark.parametrize("how", ["double-backward", "hessian", "jacrev-jacrev", "jacfwd-jacfwd"])
def test_second_derivatives_are_refused_clearly(how):
    q, k, v = (torch.randn(size, dtype=torch.float64) for size in (7, 9, 9))

    def pool(a):
        return nwfast.nw_pool(a, k, v, 1.0)

    def double_backward():
        a = q.clone().requires_grad_()
        (grad,) = torch.autograd.grad(pool(a).sum(), a, create_graph=True)
        grad.sum().backward()

    run = {
        "double-backward": double_backward,
        "hessian": lambda: torch.func.hessian(lambda a: pool(a).sum())(q),
        "jacrev-jacrev": lambda: torch.func.jacrev(torch.func.jacrev(pool))(q),
        "jacfwd-jacfwd": lambda: torch.func.jacfwd(torch.func.jacfwd(pool))(q),
    }[how]
    with pytest.raises(RuntimeError, match="first derivatives"):
        run()


@pytest.mark.parametrize("backend", ["numba", "triton"])
def test_non_contiguous_and_expanded_inputs(backend):
    device = device_for(backend)
    base_q = torch.randn(3, 40, 2, device=device)
    base_k = torch.randn(2, 3, 50, device=device)
    q = base_q[:, ::2].transpose(0, 1)[:, :2].transpose(0, 1)  # (2, 20, 2), strided
    k = base_k.permute(1, 2, 0)[:2, ::2]  # (2, 25, 2)
    v = torch.randn(25, 1, device=device).expand(2, 25, 3)  # stride 0
    w = torch.rand(2, 50, device=device)[:, ::2]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    q_, k_, v_, w_ = leaves(q, k, v, w)
    out = nwfast.nw_pool(q_, k_, v_, w_, backend=backend)
    g = torch.randn_like(out)
    out.backward(g)
    testing.assert_ok(
        testing.check_pool(out, q, k, v, w),
        *testing.check_pool_gradients([x.grad for x in (q_, k_, v_, w_)], q, k, v, w, g),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_inputs_keep_their_graph(backend):
    device = device_for(backend)
    k, v = torch.randn(6, device=device), torch.randn(6, device=device)
    q = torch.randn(0, device=device, requires_grad=True)
    nwfast.nw_pool(q, k, v, 1.0, backend=backend).sum().backward()
    assert q.grad is not None and q.grad.shape == (0,)
    values = torch.randn(6, 0, device=device, requires_grad=True)
    out = nwfast.nw_pool(torch.randn(4, 1, device=device), k[:, None], values, 1.0, backend=backend)
    assert out.shape == (4, 0)
    out.sum().backward()
    assert values.grad.shape == (6, 0)


@pytest.mark.parametrize("tolerance", [None, 0.0, 1e-3])
def test_tolerance_is_accepted_everywhere(tolerance):
    q, k, v = torch.rand(30), torch.rand(40), torch.randn(40)
    for backend in ("numba", "torch"):
        out = nwfast.nw_pool(q, k, v, 50.0, backend=backend, tolerance=tolerance)
        testing.assert_ok(testing.check_pool(out, q, k, v, 50.0))


# --- rows layout ------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("w_kind", ["float", "one-element", "per-key-signed"])
@pytest.mark.parametrize("n,m", [(1, 1), (37, 49), (50, 260)])
def test_rows(backend, dtype, w_kind, n, m):
    device = device_for(backend)
    q = 2 * torch.rand(n, dtype=torch.float64)
    keys = 5 * torch.rand(n, m, dtype=torch.float64)
    values = torch.randn(n, m, dtype=torch.float64)
    w = {"float": 0.6, "one-element": 0.3 + torch.rand(1), "per-key-signed": torch.randn(m)}[w_kind]
    q, keys, values = (x.to(device, dtype) for x in (q, keys, values))
    w = w.to(device, dtype) if isinstance(w, torch.Tensor) else w
    q_, k_, v_, w_ = leaves(q, keys, values, w)
    out = nwfast.nw_pool_rows(q_, k_, v_, w_, backend=backend)
    g = torch.randn_like(out)
    out.backward(g)
    grads = [x.grad if isinstance(x, torch.Tensor) else None for x in (q_, k_, v_, w_)]
    testing.assert_ok(
        testing.check_rows(out, q, keys, values, w),
        *testing.check_rows_gradients(grads, q, keys, values, w, g),
    )


@pytest.mark.parametrize("backend", ["numba", "triton"])
def test_rows_gradcheck_and_tangents(backend):
    device = device_for(backend)
    q = torch.randn(4, dtype=torch.float64, device=device)
    keys, values = torch.randn(2, 4, 6, dtype=torch.float64, device=device).unbind(0)
    w = torch.randn(6, dtype=torch.float64, device=device)

    def pool(*xs):
        return nwfast.nw_pool_rows(*xs, backend=backend)

    assert torch.autograd.gradcheck(pool, leaves(q, keys, values, w), check_forward_ad=True)


@pytest.mark.parametrize("backend", ["numba", "triton"])
def test_rows_equal_shared_keys_on_shared_keys(backend):
    device = device_for(backend)
    q, k, v = (torch.randn(size, device=device) for size in (30, 45, 45))
    shared = nwfast.nw_pool(q, k, v, 1.3, backend=backend)
    rows = nwfast.nw_pool_rows(q, k.expand(30, 45), v.expand(30, 45), 1.3, backend=backend)
    testing.assert_close(rows, shared)


def test_the_textbook_leave_one_out_matrices():
    """exclude_self is the textbook's (n, n - 1) construction with torch.eye."""
    x = torch.sort(5 * torch.rand(50, dtype=torch.float64)).values
    y = 2 * torch.sin(x) + x**0.8 + 0.5 * torch.randn(50, dtype=torch.float64)
    keys, values = reference.textbook_leave_one_out(x, y)
    w = torch.rand(1, dtype=torch.float64)
    textbook = reference.nw_pool_rows_repeat_interleave(x, keys, values, w)
    for backend in BACKENDS[:2]:
        testing.assert_close(
            nwfast.nw_pool(x, x, y, w, exclude_self=True, backend=backend), textbook
        )
        testing.assert_close(nwfast.nw_pool_rows(x, keys, values, w, backend=backend), textbook)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_the_torch_backend_runs_wherever_torch_runs(dtype):
    """backend='torch' is the reference: CPU half precision, which no fused CPU
    kernel takes, and a device with no fused kernel at all ('meta' here, as MPS
    or XLA would be) run there without resolving a fused backend first."""
    q, k, v = (torch.rand(5), torch.rand(7), torch.randn(7))
    rows = (k[None].expand(5, 7), v[None].expand(5, 7))
    half = [x.to(dtype) for x in (q, k, v)]
    out = nwfast.nw_pool(*half, 2.0, backend="torch")
    lse_out, lse = nwfast.nw_pool_with_lse(*half, 2.0, backend="torch")
    row_out = nwfast.nw_pool_rows(half[0], *(x.to(dtype) for x in rows), 2.0, backend="torch")
    q64, k64, v64 = (x.double() for x in half)
    expected = reference.nw_pool_broadcast(q64, k64, v64, 2.0)
    # Half precision rounds every score, weight and sum: the error is a few of its
    # units times the pooled magnitudes, which a mean near 0 does not shrink.
    magnitudes = reference.nw_pool_broadcast(q64, k64, v64.abs(), 2.0)
    allowed = 8 * testing.UNIT_ROUNDOFF[dtype] * float(magnitudes.norm())
    for result in (out, lse_out, row_out):
        assert result.dtype == dtype
        testing.assert_ok(testing.compare(result, expected, allowed, "result"))
    assert nwfast.pairs_computed(*half[:2], 2.0, backend="torch") == 35
    with pytest.raises(TypeError, match="backend='numba'"):
        nwfast.nw_pool(*half, 2.0)  # auto: the CPU kernels take float32 and float64
    meta = [torch.empty(5, 3, device="meta"), torch.empty(7, 3, device="meta")]
    out = nwfast.nw_pool(*meta, torch.empty(7, 2, device="meta"), 2.0, backend="torch")
    assert out.device.type == "meta" and out.shape == (5, 2)
    with pytest.raises(ValueError, match="no fused kernel for meta"):
        nwfast.nw_pool(*meta, torch.empty(7, 2, device="meta"), 2.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_with_lse_returns_the_log_sum_exp_without_a_gradient(backend):
    """The lse is each row's log-sum-exp (float64), the value the pooled output
    is; the output carries gradients, the lse none (as the docstring says)."""
    q, k, v = (torch.randn(9, 2), torch.randn(13, 2), torch.randn(13, 3))
    w = torch.tensor(1.7, requires_grad=True)
    q.requires_grad_()
    out, lse = nwfast.nw_pool_with_lse(q, k, v, w, backend=backend)
    ref_out, ref_lse = reference.pool_and_lse(q.double(), k.double(), v.double(), w.double())
    assert lse.dtype == torch.float64 and lse.shape == (9,)
    assert not lse.requires_grad and out.requires_grad
    testing.assert_close(out, ref_out.float())
    testing.assert_close(lse, ref_lse, 1e-6)
    testing.assert_close(out, nwfast.nw_pool(q, k, v, w, backend=backend), 0.0)
