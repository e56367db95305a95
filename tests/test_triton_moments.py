"""The Triton moments kernel against the float64 reference (under TRITON_INTERPRET=1 on
CPU: conftest sets it before triton is imported; natively on a GPU)."""

import pytest
import torch

import nwfast
from nwfast import local_linear as ll
from nwfast import reference
from nwfast.testing import assert_close

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# id -> (n, m, d, c): several query blocks, several key tiles with a ragged tail.
CASES = {
    "n7-m9-d1-c1": (7, 9, 1, 1),
    "n300-m300-d1-c2": (300, 300, 1, 2),
    "n150-m600-d2-c3": (150, 600, 2, 3),
    "n140-m140-d3-c1": (140, 140, 3, 1),
    "n40-m70-d2-c0": (40, 70, 2, 0),
}


def inputs(case, dtype, w_sign=1.0):
    n, m, d, c = CASES[case]
    k = 2 * torch.rand(m, d, dtype=torch.float64)
    q = k[:n].clone() if n == m else 2.4 * torch.rand(n, d, dtype=torch.float64) - 0.2
    v = torch.randn(m, c, dtype=torch.float64)
    w = w_sign * (4 + 8 * torch.rand(d, dtype=torch.float64))
    return [x.to(DEVICE, dtype) for x in (q, k, v, w)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES)
def test_moments_and_gradient_match_reference(case, dtype):
    n, m, _, _ = CASES[case]
    for exclude_self in [False, True] if n == m else [False]:
        q, k, v, w = inputs(case, dtype)
        w = w.requires_grad_()
        mom, lse = ll.moments(q, k, v, w, exclude_self=exclude_self, backend="triton")
        upstream = torch.randn(mom.shape, dtype=torch.float64, device=DEVICE)
        (mom * upstream).sum().backward()
        w_ref = w.detach().cpu().double().requires_grad_()
        args = [x.detach().cpu().double() for x in (q, k, v)]
        ref_mom, ref_lse = reference.moments_reference(*args, w_ref, exclude_self)
        (ref_mom * upstream.cpu()).sum().backward()
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        assert_close(mom.cpu(), ref_mom, tolerance=tol)
        assert_close(lse.cpu(), ref_lse, tolerance=tol)
        assert_close(w.grad.cpu(), w_ref.grad, tolerance=1e-10 if dtype == torch.float64 else 1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_fit_matches_the_numba_backend(dtype):
    q, k, v, w = inputs("n300-m300-d1-c2", dtype)
    out = nwfast.local_linear_pool(q, k, v, w, exclude_self=True, backend="triton")
    ref = nwfast.local_linear_pool(q.cpu(), k.cpu(), v.cpu(), w.cpu(), exclude_self=True)
    assert_close(out.cpu(), ref, tolerance=1e-12 if dtype == torch.float64 else 1e-4)


def test_far_queries_negative_w_and_nan():
    q, k, v, w = inputs("n150-m600-d2-c3", torch.float64)
    q[:3] += 40.0  # every score far below 0: the online max keeps the weights exact
    for sign in (1.0, -0.05):
        mom, lse = ll.moments(q, k, v, sign * w, backend="triton")
        ref_mom, ref_lse = reference.moments_reference(q.cpu(), k.cpu(), v.cpu(), sign * w.cpu())
        assert_close(mom.cpu(), ref_mom, tolerance=1e-12)
        assert_close(lse.cpu(), ref_lse, tolerance=1e-12)
    q, k, v, w = inputs("n300-m300-d1-c2", torch.float32)
    v[5, 0] = float("nan")
    out = nwfast.local_linear_pool(q, k, v, w, exclude_self=True, backend="triton").cpu()
    assert torch.isfinite(out[5]).all()  # key 5 is removed from query 5's fit
    assert torch.isnan(out[torch.arange(300) != 5, 0]).all()
    assert torch.isfinite(out[:, 1]).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_on_cuda_is_triton():
    q, k, v, w = inputs("n300-m300-d1-c2", torch.float32)
    out = nwfast.local_linear_pool(q, k, v, w, exclude_self=True)
    assert out.device.type == "cuda"
    ref = reference.local_linear_reference(q.cpu(), k.cpu(), v.cpu(), w.cpu(), exclude_self=True)
    assert_close(out.cpu(), ref, tolerance=1e-4)
