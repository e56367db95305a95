"""NWKernelRegression: shapes, parametrisations, leave-one-out, the textbook's layouts."""

import pytest
import torch

from nwfast import reference
from nwfast.models import NWKernelRegression
from nwfast.reference import nw_pool_broadcast
from nwfast.testing import assert_close


def data(n=40, m=None, d=None, c=None, dtype=torch.float64):
    """Queries (n,) or (n, d), keys (m,) or (m, d), values (m,) or (m, c), x in [0, 5]."""
    m = n if m is None else m
    q = torch.rand((n,) if d is None else (n, d), dtype=dtype) * 5
    k = torch.rand((m,) if d is None else (m, d), dtype=dtype) * 5
    v = torch.randn((m,) if c is None else (m, c), dtype=dtype)
    return q, k, v


@pytest.mark.parametrize(
    "n, m, d, c, expected",
    [(7, 11, None, None, (7,)), (7, 11, 3, 2, (7, 2)), (5, 9, 1, 4, (5, 4))],
    ids=["1d", "d3-c2", "d1-c4"],
)
def test_shapes_and_values_match_reference(n, m, d, c, expected):
    q, k, v = data(n, m, d, c)
    net = NWKernelRegression(2.5).double()
    out = net(q, k, v)
    assert out.shape == expected
    assert_close(out, nw_pool_broadcast(q, k, v, 2.5))


def test_batch_dims_pass_through():
    q, k, v = torch.rand(2, 3, 6, 2), torch.rand(2, 3, 8, 2), torch.randn(2, 3, 8, 1)
    net = NWKernelRegression(4.0)
    assert net(q, k, v).shape == (2, 3, 6, 1)


def test_per_key_w_has_one_weight_per_key():
    q, k, v = data(6, 9)
    w0 = torch.rand(9) + 0.5  # parameters start in the default dtype, float32
    net = NWKernelRegression(w0, num_keys=9).double()
    assert net.per_key and net.raw_w.shape == (9,)
    assert_close(net(q, k, v), nw_pool_broadcast(q, k, v, w0.double()))
    # per_key=True says the same thing as num_keys alone.
    assert NWKernelRegression(per_key=True, num_keys=9).raw_w.shape == (9,)
    with pytest.raises(ValueError, match=r"w \(9,\).*key \(5,\)"):
        net(q, k[:5], v[:5])


@pytest.mark.parametrize("positive", [None, "softplus", "exp", "square"])
def test_positive_parametrisation(positive):
    net = NWKernelRegression(3.0, positive=positive).double()
    assert net.w.item() == pytest.approx(3.0, rel=1e-6)
    q, k, v = data(10, 12)
    assert_close(net(q, k, v), nw_pool_broadcast(q, k, v, 3.0), tolerance=1e-6)
    if positive is not None:
        with torch.no_grad():
            net.raw_w.fill_(-50.0)
        assert net.w.item() >= 0


@pytest.mark.parametrize("positive", [None, "softplus", "exp", "square"])
@pytest.mark.parametrize("per_key", [False, True])
def test_gradient_reaches_the_parameter(positive, per_key):
    q, k, v = data(12, 12)
    net = NWKernelRegression(2.0, num_keys=12 if per_key else None, positive=positive).double()
    net(q, k, v, exclude_self=True).pow(2).sum().backward()

    # The same loss through the reference, with autograd doing the chain rule.
    raw = net.raw_w.detach().clone().requires_grad_(True)
    w = {
        None: lambda r: r,
        "softplus": torch.nn.functional.softplus,
        "exp": torch.exp,
        "square": lambda r: r * r,
    }[positive](raw)
    nw_pool_broadcast(q, k, v, w, exclude_self=True).pow(2).sum().backward()
    assert net.raw_w.grad is not None and net.raw_w.grad.shape == net.raw_w.shape
    assert_close(net.raw_w.grad, raw.grad, tolerance=1e-10, name="d raw_w")


def test_exclude_self_is_leave_one_out():
    x, _, y = data(15, 15)
    net = NWKernelRegression(6.0, exclude_self=True).double()
    out = net(x, x, y)
    for i in range(len(x)):
        others = torch.arange(len(x)) != i
        alone = nw_pool_broadcast(x[i : i + 1], x[others], y[others], 6.0)
        assert_close(out[i : i + 1], alone)
    # The per-call argument overrides the module's default.
    assert_close(net(x, x, y, exclude_self=False), nw_pool_broadcast(x, x, y, 6.0))
    with pytest.raises(ValueError, match="exclude_self"):
        net(x[:5], x, y)


def test_textbook_rows_layout_matches_shared_layout():
    x, _, y = data(20, 20)
    keys, values = reference.textbook_leave_one_out(x, y)
    shared = NWKernelRegression(5.0, positive="square").double()
    rows = NWKernelRegression(5.0, positive="square").double()

    out_shared = shared(x, x, y, exclude_self=True)
    out_rows = rows(x, keys, values)  # 1-D queries with 2-D keys: the rows layout
    assert_close(out_rows, out_shared)
    assert_close(rows.forward_rows(x, keys, values), out_shared)

    out_shared.sum().backward()
    out_rows.sum().backward()
    assert_close(rows.raw_w.grad, shared.raw_w.grad, tolerance=1e-10, name="d raw_w")


def test_square_is_the_textbooks_parametrisation():
    # The textbook: softmax(-((q - k) * w_d2l)**2 / 2); ours: w = w_d2l**2.
    x, _, y = data(10, 10, dtype=torch.float32)
    x_test = torch.linspace(0, 5, 7)
    w_d2l = 0.8
    net = NWKernelRegression(w_d2l**2, positive="square")
    assert net.raw_w.item() == pytest.approx(w_d2l)
    scores = -(((x_test[:, None] - x[None, :]) * w_d2l) ** 2) / 2
    textbook = (torch.softmax(scores, dim=1) * y).sum(1)
    assert_close(net(x_test, x, y), textbook)


def test_keep_attention_only_when_asked():
    x, _, y = data(9, 9)
    net = NWKernelRegression(3.0).double()
    net(x, x, y)
    assert net.attention_weights is None

    net = NWKernelRegression(3.0, exclude_self=True, keep_attention=True).double()
    net(x, x, y)
    p = net.attention_weights
    assert p.shape == (9, 9) and not p.requires_grad
    assert_close(p.sum(1), torch.ones(9, dtype=torch.float64))
    assert (p.diagonal() == 0).all()

    keys, values = reference.textbook_leave_one_out(x, y)
    net(x, keys, values)
    assert net.attention_weights.shape == (9, 8)
    assert_close(net.attention_weights.sum(1), torch.ones(9, dtype=torch.float64))


def test_float32_module_on_float64_data():
    q, k, v = data(5, 6)
    out = NWKernelRegression(2.0)(q, k, v)
    assert out.dtype == torch.float64


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"positive": "relu"}, "positive must be one of"),
        ({"per_key": True}, "needs num_keys"),
        ({"per_key": False, "num_keys": 4}, "contradicts"),
        ({"num_keys": 0}, "positive int"),
        ({"w_init": 0.0, "positive": "exp"}, "w_init > 0"),
        ({"w_init": -1.0, "positive": "square"}, "w_init >= 0"),
        ({"w_init": torch.ones(3), "num_keys": 4}, r"w_init has shape \(3,\)"),
        ({"w_init": float("nan")}, "finite"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NWKernelRegression(**kwargs)
