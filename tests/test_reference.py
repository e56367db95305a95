"""The two reference forms agree bit for bit; the textbook's leave-one-out matrices agree too."""

import pytest
import torch

import nwfast
from nwfast import reference
from nwfast.testing import assert_close


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(
    "shapes,exclude_self",
    [
        (((50,), (70,), (70,)), False),
        (((60,), (60,), (60,)), True),
        (((3, 20, 4), (3, 30, 4), (3, 30, 2)), False),
        (((2, 2, 25, 1), (2, 2, 25, 1), (2, 2, 25, 3)), True),
    ],
)
def test_repeat_interleave_and_broadcast_agree_bit_for_bit(dtype, shapes, exclude_self):
    q, k, v = (torch.randn(shape, dtype=dtype) for shape in shapes)
    w = torch.rand(shapes[1][:-1] if len(shapes[1]) > 1 else shapes[1], dtype=dtype)
    broadcast = reference.nw_pool_broadcast(q, k, v, w, exclude_self=exclude_self)
    textbook = reference.nw_pool_repeat_interleave(q, k, v, w, exclude_self=exclude_self)
    assert torch.equal(broadcast, textbook)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_rows_forms_agree_bit_for_bit(dtype):
    query, keys, values = (
        torch.rand(40, dtype=dtype),
        torch.rand(40, 55, dtype=dtype),
        torch.randn(40, 55, dtype=dtype),
    )
    w = torch.rand(1, dtype=dtype)
    assert torch.equal(
        reference.nw_pool_rows_broadcast(query, keys, values, w),
        reference.nw_pool_rows_repeat_interleave(query, keys, values, w),
    )


def test_exclude_self_removes_a_nan_value_from_its_own_row():
    """Key i is removed from row i, as the textbook's (n, n - 1) matrices remove
    it: a NaN value of key i reaches every row but its own, gradients included."""
    x = torch.rand(12, dtype=torch.float64)
    v = torch.randn(12, dtype=torch.float64)
    v[4] = float("nan")
    q = x.clone().requires_grad_()
    out = reference.nw_pool_broadcast(q, x, v, 3.0, exclude_self=True)
    assert torch.isfinite(out[4]) and torch.isnan(out[torch.arange(12) != 4]).all()
    out[4].backward()
    assert torch.isfinite(q.grad[4])
    keys, values = reference.textbook_leave_one_out(x, v)
    assert_close(
        out[4:5].detach(), reference.nw_pool_rows_broadcast(x[4:5], keys[4:5], values[4:5], 3.0)
    )


def test_weights_are_a_softmax():
    q, k = torch.randn(2, 7, 3, dtype=torch.float64), torch.randn(2, 9, 3, dtype=torch.float64)
    w = torch.rand(2, 9, dtype=torch.float64)
    weights = nwfast.nw_weights(q, k, w)
    assert weights.shape == (2, 7, 9)
    assert_close(weights.sum(-1), torch.ones(2, 7, dtype=torch.float64))
    v = torch.randn(2, 9, 4, dtype=torch.float64)
    assert_close(weights @ v, reference.nw_pool_broadcast(q, k, v, w))
    loo = nwfast.nw_weights(q[0], q[0], 1.0, exclude_self=True)
    assert loo.shape == (7, 7) and (loo.diagonal() == 0).all()
