"""The Numba CPU kernels, called directly on canonical shapes, against dense
float64 torch computed here (argument parsing is nwfast's, tested elsewhere)."""

import math

import numpy as np
import pytest
import torch

from nwfast.testing import assert_close

numba = pytest.importorskip("numba")
from nwfast.kernels import numba_nw  # noqa: E402
from nwfast.kernels.numba_exp import exp2  # noqa: E402

F64 = torch.float64
GRAD_TOL = {torch.float32: 1e-4, torch.float64: 1e-10}
# The log-sum-exp feeds exp(s - lse) in the backward, so what matters is its
# absolute error; relative to |lse| it is ill-conditioned near lse = 0.
LSE_TOL = {torch.float32: 1e-6, torch.float64: 1e-14}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
T = numba_nw.TILE  # sizes around it cross tile boundaries


def dense_reference(q, k, v, w, exclude_self):
    """Output (B, n, c) and log-sum-exp (B, n), with the n x m scores in memory."""
    s = -(w[:, None, :] / 2) * ((q[:, :, None, :] - k[:, None, :, :]) ** 2).sum(-1)
    if exclude_self:
        s = s.masked_fill(torch.eye(q.shape[1], dtype=torch.bool), -math.inf)
    return torch.softmax(s, dim=-1) @ v, torch.logsumexp(s, dim=-1)


def assert_lse_close(lse, ref, dtype):
    """|lse - ref| <= tol * (1 + |ref|), and NaN / inf where the reference has them."""
    lse, ref = lse.double(), ref.detach()
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(lse), finite)
    assert torch.equal(lse[~finite].nan_to_num(), ref[~finite].nan_to_num())
    err = (lse - ref).abs() / (1 + ref.abs())
    assert (err[finite] <= LSE_TOL[dtype]).all(), err.max().item()


def rows_reference(q, K, V, w):
    s = -(w / 2) * (q[:, None] - K) ** 2
    return (torch.softmax(s, dim=-1) * V).sum(-1), torch.logsumexp(s, dim=-1)


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Tensors the kernels allocate start as NaN: an element left unwritten shows."""

    def poisoned(make):
        def wrapper(*args, **kwargs):
            t = make(*args, **kwargs)
            return t.fill_(math.nan) if t.is_floating_point() else t

        return wrapper

    monkeypatch.setattr(torch, "empty", poisoned(torch.empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(torch.empty_like))


def representable(dtype, *tensors):
    """float64 copies holding dtype values, so that the reference sees exactly
    the kernel's inputs and only the kernel's own error is measured."""
    return tuple(t.to(dtype).double() for t in tensors)


def make_inputs(B, n, m, d, c, w_low=-0.5, w_high=3.5, dtype=torch.float32):
    """Fresh inputs (the seed comes from conftest), w uniform in [w_low,
    w_high): negative w takes the kernels' running-max path, w >= 0 the
    zero-shift one."""
    q = torch.randn(B, n, d, dtype=F64)
    k = torch.randn(B, m, d, dtype=F64)
    v = torch.randn(B, m, c, dtype=F64)
    w = w_low + (w_high - w_low) * torch.rand(B, m, dtype=F64)
    return representable(dtype, q, k, v, w, torch.randn(B, n, c, dtype=F64))


def check_shared(q, k, v, w, go, exclude_self, dtype, needs=(True,) * 4):
    """Kernel forward and backward in dtype against the float64 reference and
    its autograd gradients."""
    args = [x.to(dtype) for x in (q, k, v, w)]
    out, lse = numba_nw.forward(*args, exclude_self)
    grads = numba_nw.backward(go.to(dtype), *args, out, lse, exclude_self, needs)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, w)]
    ref, ref_lse = dense_reference(*leaves, exclude_self)
    ref.backward(go)
    assert out.dtype == dtype and lse.dtype == dtype
    assert_close(out, ref, name="out")
    assert_lse_close(lse, ref_lse, dtype)
    for name, need, grad, leaf in zip("qkvw", needs, grads, leaves):
        if need:
            assert grad.dtype == dtype
            assert_close(grad, leaf.grad, GRAD_TOL[dtype], name=f"d{name}")
    return out, grads


# ------------------------------------------------------------------ exp2


@numba.njit(cache=True)
def _exp2_array(x, out):
    for i in range(x.size):
        out[i] = exp2(x[i])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exp2_accuracy(dtype):
    tiny = np.finfo(dtype).tiny
    x = np.linspace(np.log2(tiny) - 3, 0.25, 2_000_003).astype(dtype)
    x = np.concatenate([x, np.array([0.0, -0.0, -1.0, -0.5, 0.5], dtype)])
    out = np.empty_like(x)
    _exp2_array(x, out)
    ref = np.exp2(x.astype(np.longdouble))
    normal = ref >= tiny
    rel = np.abs(out[normal] - ref[normal]) / ref[normal]
    assert rel.max() < (2.5e-7 if dtype == np.float32 else 4e-16)
    # below the normal range: flushed to 0, or within a couple of tiny of the truth
    assert np.all((out[~normal] >= 0) & (out[~normal] <= 2 * tiny))

    special = np.array([-np.inf, np.nan, -np.nan, -1e30], dtype)
    out = np.empty_like(special)
    _exp2_array(special, out)
    assert out[0] == 0 and np.isnan(out[1]) and np.isnan(out[2]) and out[3] == 0


def test_exp2_loop_is_vectorised():
    """The point of the polynomial: a loop of exp2 becomes packed SIMD code."""
    import platform
    import re

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("checks x86 assembly")

    @numba.njit(fastmath={"contract", "reassoc", "nsz", "arcp"})
    def total(x):
        s = x.dtype.type(0)
        for i in range(x.size):
            s += exp2(x[i])
        return s

    x = -np.arange(100, dtype=np.float32) / 7
    assert abs(total(x) - np.exp2(x.astype(np.float64)).sum()) < 1e-5
    asm = total.inspect_asm(total.signatures[0])
    # the polynomial's FMAs are the only FMAs here: packed ones mean SIMD exp2
    assert re.search(r"vfmadd\w*ps\s+%[yz]mm", asm), "exp2 loop was not vectorised"


# ------------------------------------------------------- shared keys


@DTYPES
@pytest.mark.parametrize(
    "B,n,m,d,c",
    [
        (1, 1, 1, 1, 1),
        (1, 7, 33, 1, 1),
        (3, 33, 7, 3, 2),
        (1, 300, 300, 1, 1),
        (3, 33, 33, 3, 1),
        (1, 300, 33, 1, 2),
        (2, 7, 300, 3, 2),
        (1, 40, 2 * T + 100, 1, 1),  # several key tiles
        (1, 40, T + 100, 2, 2),
        (2, T + 100, 40, 1, 1),  # several query tiles in the key pass
        (1, T + 100, 40, 2, 3),
    ],
)
@pytest.mark.parametrize("w_low", [-0.5, 0.0])
def test_shared_keys(B, n, m, d, c, w_low, dtype):
    check_shared(*make_inputs(B, n, m, d, c, w_low, dtype=dtype), False, dtype)


@DTYPES
@pytest.mark.parametrize(
    "B,n,d,c", [(1, 2, 1, 1), (3, 33, 3, 2), (1, 300, 1, 1), (1, T + 50, 1, 1), (1, T + 50, 2, 1)]
)
@pytest.mark.parametrize("w_range", [(-0.5, 3.5), (0.5, 3.5), (1e9, 2e9)])
def test_exclude_self(B, n, d, c, w_range, dtype):
    q, k, v, w, go = make_inputs(B, n, n, d, c, *w_range, dtype=dtype)
    k[:, : n // 2] = q[:, : n // 2]  # queries that are keys, and some that are not
    if w_range[0] < 1e9:
        check_shared(q, k, v, w, go, True, dtype)
    else:  # nearest other key only; gradients are w times a cancellation there
        out, lse = numba_nw.forward(*(x.to(dtype) for x in (q, k, v, w)), True)
        ref, ref_lse = dense_reference(q, k, v, w, True)
        assert_close(out, ref)
        assert_lse_close(lse, ref_lse, dtype)


@pytest.mark.parametrize(
    "needs", [(True, False, False, False), (False, False, False, True), (False, True, True, False)]
)
def test_needs_subset(needs):
    _, grads = check_shared(*make_inputs(2, 9, 11, 2, 2, dtype=F64), False, F64, needs)
    for need, grad in zip(needs, grads):
        assert need or grad is None or torch.isfinite(grad).all()


def test_repeatable_bit_for_bit():
    q, k, v, w, go = (x.float() for x in make_inputs(2, 700, 600, 2, 2))
    out, lse = numba_nw.forward(q, k, v, w, False)
    first = numba_nw.backward(go, q, k, v, w, out, lse, False, (True,) * 4)
    for _ in range(3):
        assert torch.equal(numba_nw.forward(q, k, v, w, False)[0], out)
        again = numba_nw.backward(go, q, k, v, w, out, lse, False, (True,) * 4)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_float32_sums_stay_accurate_at_large_m():
    q, k, v, w, _ = make_inputs(1, 3, 200_000, 1, 1)
    w = torch.full_like(w, 1e-3)  # nearly flat weights: the longest sums
    v = (v + 10.0).float().double()  # a large mean, which a drifting float32 sum would get wrong
    out, _ = numba_nw.forward(q.float(), k.float(), v.float(), w.float(), False)
    assert_close(out, dense_reference(q, k, v, w, False)[0], 1e-6)


# ------------------------------------------------------------ extremes


@DTYPES
def test_extremes(dtype):
    n, m = 6, 50
    q, _, v, w, _ = make_inputs(1, n, m, 1, 1, dtype=dtype)
    (k,) = representable(dtype, torch.linspace(-1, 1, m, dtype=F64).reshape(1, m, 1))
    cases = {
        "huge w": (q, torch.full_like(w, 1e8)),
        "far query": (q + 1e4, torch.ones_like(w)),
        "tiny w": (q, torch.full_like(w, 1e-30)),
        "zero w": (q, torch.zeros_like(w)),
        "negative w": (q, torch.full_like(w, -3.0)),
    }
    for name, (qq, ww) in cases.items():
        qq, ww = representable(dtype, qq, ww)
        out, _ = numba_nw.forward(qq.to(dtype), k.to(dtype), v.to(dtype), ww.to(dtype), False)
        assert torch.isfinite(out).all(), name
        assert_close(out, dense_reference(qq, k, v, ww, False)[0], name=name)

    huge = numba_nw.forward(q.to(dtype), k.to(dtype), v.to(dtype), (w * 0 + 1e8).to(dtype), False)
    nearest = (q[0, :, 0, None] - k[0, None, :, 0]).abs().argmin(-1)
    assert torch.equal(huge[0][0, :, 0], v[0, nearest, 0].to(dtype))
    zero = numba_nw.forward(q.to(dtype), k.to(dtype), v.to(dtype), (w * 0).to(dtype), False)
    assert_close(zero[0][0, :, 0], v[0, :, 0].mean().expand(n))


@DTYPES
def test_nan_in_one_query_row(dtype):
    q, k, v, w, go = make_inputs(1, 5, 1100, 1, 1, dtype=dtype)
    q[0, 2] = math.nan
    out, grads = check_shared(q, k, v, w, go, False, dtype)  # NaN placement checked there
    assert torch.isnan(out[0, 2]).all() and torch.isfinite(out[0, [0, 1, 3, 4]]).all()
    assert all(torch.isnan(g).all() for g in grads[1:])  # every key sums over that row


@DTYPES
@pytest.mark.parametrize("where", ["key", "value"])
def test_nan_in_a_key_or_value(where, dtype):
    q, k, v, w, _ = make_inputs(1, 5, 1100, 1, 1, dtype=dtype)
    (k if where == "key" else v)[0, 700] = math.nan
    out, _ = numba_nw.forward(q.to(dtype), k.to(dtype), v.to(dtype), w.to(dtype), False)
    assert_close(out, dense_reference(q, k, v, w, False)[0])
    assert torch.isnan(out).all()


# ------------------------------------------------------- per-query rows


@DTYPES
@pytest.mark.parametrize("n,m", [(1, 1), (7, 33), (33, 7), (300, 300), (40, T + 100)])
@pytest.mark.parametrize("w_low", [-0.5, 0.0])
def test_rows(n, m, w_low, dtype):
    q, go, K, V, w = representable(
        dtype,
        torch.randn(n, dtype=F64),
        torch.randn(n, dtype=F64),
        torch.randn(n, m, dtype=F64),
        torch.randn(n, m, dtype=F64),
        w_low + 4 * torch.rand(m, dtype=F64),
    )
    args = [x.to(dtype) for x in (q, K, V, w)]
    out, lse = numba_nw.forward_rows(*args)
    leaves = [x.clone().requires_grad_() for x in (q, K, V, w)]
    ref, ref_lse = rows_reference(*leaves)
    ref.backward(go)
    assert out.shape == (n,) and lse.shape == (n,) and out.dtype == dtype
    assert_close(out, ref, name="out")
    assert_lse_close(lse, ref_lse, dtype)
    for needs in [(True,) * 4, (False, False, False, True), (True, False, True, False)]:
        grads = numba_nw.backward_rows(go.to(dtype), *args, out, lse, needs)
        for name, need, grad, leaf in zip("qKVw", needs, grads, leaves):
            if need:
                assert_close(grad, leaf.grad, GRAD_TOL[dtype], name=f"d{name}")
    again = numba_nw.backward_rows(go.to(dtype), *args, out, lse, needs)
    assert all(torch.equal(a, b) for a, b in zip(grads, again) if a is not None)
