"""The operators are torch.library ops: opcheck passes on both fused backends and
torch.compile(fullgraph=True) traces a training step through them."""

import pytest
import torch

import nwfast
from nwfast import ops, testing

BACKENDS = ["numba", "triton"]


def device_for(backend):
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def grad_leaves(*xs):
    return [x.requires_grad_() for x in xs]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tolerance", [0.0, 2.0**-24])
def test_opcheck_shared(backend, tolerance):
    device = device_for(backend)
    q, k = torch.randn(2, 5, 2, device=device), torch.randn(2, 6, 2, device=device)
    v, w = torch.randn(2, 6, 3, device=device), torch.rand(2, 6, device=device)
    grad_leaves(q, k, v, w)
    torch.library.opcheck(ops.pool, (q, k, v, w, None, tolerance, backend))
    square = q[:, :6].detach().clone().requires_grad_()
    torch.library.opcheck(ops.pool, (square, square, v[:, :5], w[:, :1], 0, tolerance, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_rows(backend):
    device = device_for(backend)
    query, keys, values = (torch.randn(*s, device=device) for s in ((5,), (5, 8), (5, 8)))
    w = torch.rand(8, device=device)
    grad_leaves(query, keys, values, w)
    torch.library.opcheck(ops.pool_rows, (query, keys, values, w, backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_key", [False, True])
def test_compiled_training_step_has_no_graph_break(backend, per_key):
    device = device_for(backend)
    x = torch.sort(5 * torch.rand(64, device=device)).values
    y = 2 * torch.sin(x) + x**0.8 + 0.5 * torch.randn(64, device=device)

    def step(w):
        prediction = nwfast.nw_pool(x, x, y, w, exclude_self=True, backend=backend)
        return ((prediction - y) ** 2).mean()

    w = torch.rand(64 if per_key else 1, device=device) + 0.5
    compiled = torch.compile(step, fullgraph=True)
    w_compiled = w.clone().requires_grad_()
    loss = compiled(w_compiled)
    loss.backward()
    w_eager = w.clone().requires_grad_()
    eager_loss = step(w_eager)
    eager_loss.backward()
    testing.assert_close(loss.detach(), eager_loss.detach())
    testing.assert_close(w_compiled.grad, w_eager.grad)
