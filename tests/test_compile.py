"""The operators are torch.library custom ops: opcheck passes and torch.compile traces them."""

import pytest
import torch

import nwfast
from nwfast import ops
from nwfast.testing import assert_close


def test_opcheck_shared():
    q, k = torch.randn(2, 5, 2), torch.randn(2, 6, 2)
    v, w = torch.randn(2, 6, 3), torch.rand(2, 6)
    for x in (q, k, v, w):
        x.requires_grad_()
    torch.library.opcheck(ops.pool, (q, k, v, w, False, "numba"))
    torch.library.opcheck(ops.pool, (q[:, :6], q[:, :6], v[:, :5], w[:, :5], True, "numba"))


def test_opcheck_rows():
    query, keys, values = torch.randn(5), torch.randn(5, 8), torch.randn(5, 8)
    w = torch.rand(8)
    for x in (query, keys, values, w):
        x.requires_grad_()
    torch.library.opcheck(ops.pool_rows, (query, keys, values, w, "numba"))


@pytest.mark.parametrize("per_key", [False, True])
def test_compiled_training_step_has_no_graph_break(per_key):
    x = torch.sort(5 * torch.rand(64)).values
    y = 2 * torch.sin(x) + x**0.8 + 0.5 * torch.randn(64)

    def loss_and_grad(w):
        w = w.detach().requires_grad_()
        prediction = nwfast.nw_pool(x, x, y, w, exclude_self=True)
        loss = ((prediction - y) ** 2).mean()
        loss.backward()
        return loss.detach(), w.grad

    def step(w):
        prediction = nwfast.nw_pool(x, x, y, w, exclude_self=True)
        return ((prediction - y) ** 2).mean()

    w = torch.rand(64 if per_key else 1) + 0.5
    compiled = torch.compile(step, fullgraph=True)
    w_compiled = w.clone().requires_grad_()
    loss = compiled(w_compiled)
    loss.backward()
    eager_loss, eager_grad = loss_and_grad(w)
    assert_close(loss.detach(), eager_loss)
    assert_close(w_compiled.grad, eager_grad)
