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


def textbook_leave_one_out(x, y):
    """The (n, n-1) key and value matrices the textbook builds with torch.eye."""
    n = x.shape[0]
    keep = (1 - torch.eye(n)).bool()
    return x.repeat((n, 1))[keep].reshape(n, -1), y.repeat((n, 1))[keep].reshape(n, -1)


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_exclude_self_equals_the_textbook_leave_one_out(backend):
    x = torch.sort(5 * torch.rand(50, dtype=torch.float64)).values
    y = 2 * torch.sin(x) + x**0.8 + 0.5 * torch.randn(50, dtype=torch.float64)
    keys, values = textbook_leave_one_out(x, y)
    w = torch.rand(1, dtype=torch.float64)
    textbook = reference.nw_pool_rows_repeat_interleave(x, keys, values, w)
    masked = nwfast.nw_pool(x, x, y, w, exclude_self=True, backend=backend)
    assert_close(masked, textbook)
    assert_close(nwfast.nw_pool_rows(x, keys, values, w, backend=backend), textbook)


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
