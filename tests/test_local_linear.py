"""local_linear_pool and its moments kernel against plain float64 PyTorch and statsmodels."""

import importlib.util
import math
from typing import NamedTuple

import numpy as np
import pytest
import torch

import nwfast
from nwfast import local_linear as ll
from nwfast import reference, testing
from nwfast.testing import assert_close

DTYPES = [torch.float32, torch.float64]
# id -> (n, m, d, c); m > TILE so that rows span several tiles.
CASES = {
    "n37-m1100-d1-c1": (37, 1100, 1, 1),
    "n600-m600-d1-c2": (600, 600, 1, 2),
    "n40-m70-d2-c3": (40, 70, 2, 3),
    "n45-m45-d3-c1": (45, 45, 3, 1),
    "n30-m530-d2-c0": (30, 530, 2, 0),
    "n33-m33-d1-c1": (33, 33, 1, 1),
}


def inputs(case, dtype, per_feature=True):
    n, m, d, c = CASES[case]
    k = 2 * torch.rand(m, d, dtype=torch.float64)
    q = k[:n].clone() if n == m else 2.4 * torch.rand(n, d, dtype=torch.float64) - 0.2
    v = torch.randn(m, c, dtype=torch.float64)
    w = 4 + 8 * torch.rand(d if per_feature else 1, dtype=torch.float64)
    return [x.to(dtype) for x in (q, k, v, w)]


def exclude_options(case):
    n, m, _, _ = CASES[case]
    return [False, True] if n == m else [False]


def f64(*tensors):
    return [x.double() for x in tensors]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_moments_match_reference(case, dtype):
    for exclude_self in exclude_options(case):
        q, k, v, w = inputs(case, dtype)
        mom, lse = ll.moments(q, k, v, w, exclude_self=exclude_self)
        ref_mom, ref_lse = reference.moments_reference(*f64(q, k, v, w), exclude_self)
        assert mom.dtype == lse.dtype == torch.float64
        assert mom.shape == (q.shape[0], ll.moment_layout(q.shape[1], v.shape[1]).size)
        assert_close(mom, ref_mom, tolerance=1e-12 if dtype == torch.float64 else 1e-6)
        assert_close(lse, ref_lse, tolerance=1e-12 if dtype == torch.float64 else 1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][3] > 0])
def test_fit_matches_least_squares_reference(case, dtype):
    for exclude_self in exclude_options(case):
        q, k, v, w = inputs(case, dtype)
        out = nwfast.local_linear_pool(q, k, v, w, exclude_self=exclude_self)
        ref = reference.local_linear_reference(q, k, v, w, exclude_self=exclude_self)
        assert out.dtype == dtype
        # The solve amplifies the moments' rounding by the conditioning of the
        # local design, mild here (queries inside the data, ~30 keys per h).
        assert_close(out, ref, tolerance=1e-11 if dtype == torch.float64 else 1e-4)


def test_reproduces_a_linear_function_anywhere():
    """A line through exact data is its own local-linear fit, even far outside the data."""
    k = torch.rand(300, 2, dtype=torch.float64)
    q = 3 * torch.rand(50, 2, dtype=torch.float64) - 1
    coef = torch.tensor([[1.5, -2.0], [0.5, 3.0]], dtype=torch.float64)
    value = 0.7 + k @ coef
    out = nwfast.local_linear_pool(q, k, value, torch.tensor([30.0, 10.0], dtype=torch.float64))
    assert_close(out, 0.7 + q @ coef, tolerance=1e-12)


def test_one_dimensional_shapes_and_scalar_w():
    k, v = torch.rand(80, dtype=torch.float64), torch.randn(80, dtype=torch.float64)
    q = torch.rand(9, dtype=torch.float64)
    out = nwfast.local_linear_pool(q, k, v, 20.0)
    assert out.shape == (9,)
    ref = reference.local_linear_reference(q[:, None], k[:, None], v[:, None], torch.tensor([20.0]))
    assert_close(out, ref[:, 0], tolerance=1e-12)
    for w in (torch.tensor(20.0), torch.tensor([20.0])):
        assert torch.equal(nwfast.local_linear_pool(q, k, v, w.double()), out)


@pytest.mark.parametrize("per_feature", [False, True], ids=["scalar-w", "per-feature-w"])
@pytest.mark.parametrize("exclude_self", [False, True], ids=["all", "loo"])
@pytest.mark.parametrize("case", ["n45-m45-d3-c1", "n33-m33-d1-c1"])
def test_gradcheck_in_w(case, exclude_self, per_feature):
    q, k, v, w = inputs(case, torch.float64, per_feature)
    if not exclude_self:
        q = q[:20] + 0.05
    w = w.requires_grad_()
    torch.autograd.gradcheck(lambda w: ll.moments(q, k, v, w, exclude_self=exclude_self)[0], (w,))
    torch.autograd.gradcheck(
        lambda w: nwfast.local_linear_pool(q, k, v, w, exclude_self=exclude_self), (w,)
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradient_in_w_matches_reference_autograd(dtype):
    q, k, v, w = inputs("n600-m600-d1-c2", dtype)
    upstream = torch.randn(q.shape[0], 2, dtype=torch.float64)
    w_fused = w.clone().requires_grad_()
    out = nwfast.local_linear_pool(q, k, v, w_fused, exclude_self=True)
    (out.double() * upstream).sum().backward()
    w_ref = w.double().requires_grad_()
    ref = nwfast.local_linear_pool(*f64(q, k, v), w_ref, exclude_self=True, backend="torch")
    (ref * upstream).sum().backward()
    assert_close(w_fused.grad, w_ref.grad, tolerance=1e-10 if dtype == torch.float64 else 1e-3)


def test_thin_neighbourhoods_fall_back_to_local_constant():
    dtype = torch.float64
    v = torch.randn(5, 1, dtype=dtype)
    # One key, or every key at one point: no line, the (weighted) mean.
    for k in (torch.zeros(1, 1, dtype=dtype), torch.full((5, 1), 0.3, dtype=dtype)):
        q = torch.tensor([[0.0], [1.0]], dtype=dtype)
        out = nwfast.local_linear_pool(q, k, v[: len(k)], 1.0)
        # Judged by the pool's own rounding model: the weighted mean of values
        # of either sign may cancel far below their size, so no tolerance
        # relative to the result holds.
        testing.assert_ok(testing.check_pool(out, q, k, v[: len(k)], 1.0))
    # Keys on a line in the plane: no plane through them.
    t = torch.rand(40, 1, dtype=dtype)
    k = torch.cat([t, 2 * t], dim=1)
    v = torch.randn(40, 1, dtype=dtype)
    q = torch.rand(6, 2, dtype=dtype)
    testing.assert_ok(testing.check_pool(nwfast.local_linear_pool(q, k, v, 5.0), q, k, v, 5.0))
    # Far from the data with a narrow kernel all the weight sits on the nearest key.
    k = torch.linspace(0, 1, 50, dtype=dtype)[:, None]
    v = torch.randn(50, 1, dtype=dtype)
    out = nwfast.local_linear_pool(torch.tensor([[40.0]], dtype=dtype), k, v, 1e4)
    assert torch.equal(out, v[-1:])


def two_key_ramp(w):
    """Keys at 0 and 3, a query at -1: lam = 9 p1 p2 / (p1 + 16 p2) (R = C / S2 of
    the module doc) falls as exp(-7.5 w) through the ramp while the line through
    the two keys stays put. The inputs and the prediction the module doc states,
    in closed form."""
    q, k = torch.tensor([[-1.0]], dtype=torch.float64), torch.tensor([[0.0], [3.0]])
    v = torch.tensor([[0.5], [2.0]], dtype=torch.float64)
    p2 = 1.0 / (1.0 + math.exp(7.5 * w))
    p1 = 1.0 - p2
    lam = 9 * p1 * p2 / (p1 + 16 * p2)
    thin, full = ll.line_ramp(torch.float64)
    t = min(max((math.log(lam) - math.log(thin)) / math.log(full / thin), 0.0), 1.0)
    share = t * t * (3 - 2 * t)
    sv, line = p1 * 0.5 + p2 * 2.0, 0.5 - 1.5 / 3
    return (q, k.double(), v), lam, sv + share * (line - sv), share


def test_thin_rows_move_to_the_line_along_the_ramp():
    """Below THIN the fit is the local-constant value, from FULL on the line, and in
    between Sv + s (line - Sv) with the documented smoothstep, continuous in w: the
    fused path and the lstsq reference against the closed form across the ramp; the
    equivalent kernel's weights reproduce the fit (gamma carries the share); and the
    share's own derivative enters the gradient in w."""
    # the ramps docs/estimators.md states
    assert ll.line_ramp(torch.float64) == (2.0**-33, 2.0**-20)
    assert ll.line_ramp(torch.float32) == ll.line_ramp(torch.float16) == (2.0**-14, 2.0**-7)
    regions = set()
    for w in np.linspace(1.0, 5.0, 161):
        args, lam, expected, share = two_key_ramp(w)
        regions.add(0 if share == 0 else 2 if share == 1 else 1)
        # C = S2 - S1 S1^T cancels by 1 / lam, and the solve scales the step to the line
        noise = 1e-15 / lam + 1e-14
        fused = nwfast.local_linear_pool(*args, w, tolerance=0.0)
        ref = nwfast.local_linear_pool(*args, w, backend="torch")
        for fit in (fused, ref):
            assert abs(float(fit) - expected) <= noise, (w, lam, float(fit), expected)
        mom, _ = ll.moments(*args, w, tolerance=0.0)
        solved = ll.solve_moments(mom, 1, 1, torch.float64)
        q, k, v = args
        u = k[:, 0] - q[0, 0]
        p = torch.softmax(-0.5 * w * u * u, 0)
        weights = p * (1 + solved.gamma[0, 0] * (u - mom[0, 0]))
        assert abs(float(weights @ v[:, 0]) - float(solved.value)) <= noise
    assert regions == {0, 1, 2}, "the sweep crosses the whole ramp"

    # The gradient in w against the closed form's, above, on and below the ramp (on
    # it the share moves with w as fast as the weights do). Not gradcheck: its
    # differences of the fused fit round at 1e-15 / lam, a tenth of the slope here.
    for w_value in (2.0, 2.75, 3.5):
        args, lam, _, share = two_key_ramp(w_value)
        step = 1e-6
        ahead, behind = (two_key_ramp(w_value + sign * step)[2] for sign in (1, -1))
        slope = (ahead - behind) / (2 * step)
        for backend in ("numba", "torch"):
            w = torch.tensor([w_value], dtype=torch.float64, requires_grad=True)
            fit = nwfast.local_linear_pool(*args, w, backend=backend)
            grad = torch.autograd.grad(fit.sum(), w)[0]
            assert float(grad) == pytest.approx(slope, rel=1e-6, abs=1e-9), (lam, share, backend)
        if 0 < share < 1:
            assert abs(slope) > 0.1  # the share's derivative dominates


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_underflowing_and_negative_scores(dtype):
    """A query far from every key (the sums underflow at shift 0) and a negative w
    (scores above 0) both take the row's maximum as the shift."""
    k = torch.rand(700, 2, dtype=torch.float64)
    q = torch.cat([torch.rand(5, 2, dtype=torch.float64), 30 + torch.rand(3, 2)])
    v = torch.randn(700, 2, dtype=torch.float64)
    for w in (torch.tensor([0.5, 0.2]), torch.tensor([-0.3, 0.4])):
        args = [x.to(dtype) for x in (q, k, v, w.double())]
        mom, lse = ll.moments(*args)
        ref_mom, ref_lse = reference.moments_reference(*f64(*args))
        assert torch.isfinite(mom).all()
        assert_close(mom, ref_mom, tolerance=1e-12 if dtype == torch.float64 else 1e-5)
        assert_close(lse, ref_lse, tolerance=1e-12 if dtype == torch.float64 else 1e-6)


# --- far from every key -----------------------------------------------------------
# The kernels' far-query family (tests/test_kernels.py) for the moments, on every
# backend: queries inside the data and 10, 1e3 and 1e6 bandwidths beyond either
# end of it along the first feature, and 1e4 data units away; one key, a tie
# (two keys at one place), many; w from 1e-12 to 1e6 (1e300 in float64), one a
# feature; leave-one-out with far outliers among the points.

MOMENT_BACKENDS = ["numba"] + (["triton"] if importlib.util.find_spec("triton") else [])
FAR_W = {torch.float32: [1e-12, 1e-4, 1.0, 1e3, 1e6], torch.float64: [1e-12, 1.0, 1e6, 1e300]}


class FarMoments(NamedTuple):
    dtype: torch.dtype
    w: float
    m: int
    d: int
    loo: bool

    def __str__(self):
        return f"m{self.m}-d{self.d}-w{self.w:g}{'-loo' if self.loo else ''}-{self.dtype}"


FAR_CASES = [
    FarMoments(dtype, w, m, d, loo)
    for dtype, scales in FAR_W.items()
    for w in scales
    for m in (1, 3, 37)
    for d in (1, 2)
    for loo in (False, True)
    if not loo or m == 37
]


def far_moment_inputs(case, device):
    """(query (n, d), key (m, d), value (m, 2), w (d,)) of ``case``; places the
    dtype cannot tell from the data's edge, or whose scores would overflow the
    float64 reference, are dropped."""
    f64 = torch.float64
    keys = torch.rand(case.m, case.d, dtype=f64)
    if case.m == 3:  # a tie: the first two keys share one place
        keys = keys[[0, 0, 1]]
    h = case.w**-0.5
    limit = (torch.finfo(f64).max / 8 / case.w / case.d) ** 0.5
    places = [x for x in (10 * h, 1e3 * h, 1e6 * h, 1e4) if 4 * torch.finfo(case.dtype).eps < x]
    far = torch.tensor([y for x in places if x < limit for y in (1.0 + x, -x)], dtype=f64)
    points = torch.rand(len(far), case.d, dtype=f64)
    points[:, 0] = far
    if case.loo:  # the points are the keys, some far outliers among them
        keys = torch.cat([keys, points])
        queries = keys
    else:
        queries = torch.cat([torch.rand(2, case.d, dtype=f64), points])
    w = case.w * (0.5 + torch.rand(case.d, dtype=f64))
    v = torch.randn(keys.shape[0], 2, dtype=f64)
    return [x.to(device, case.dtype) for x in (queries, keys, v, w)]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's exp underflow
@pytest.mark.parametrize("backend", MOMENT_BACKENDS)
@pytest.mark.parametrize("case", FAR_CASES, ids=str)
def test_far_queries_moments(case, backend):
    """Moments, lse and the gradient in w of queries far from every key."""
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    q, k, v, w = far_moment_inputs(case, device)
    leaf = w.clone().requires_grad_()
    mom, lse = ll.moments(q, k, v, leaf, exclude_self=case.loo, backend=backend)
    upstream = torch.randn(mom.shape, dtype=torch.float64, device=device)
    (mom * upstream).sum().backward()
    testing.assert_ok(
        *testing.check_moments(mom, lse, q, k, v, w, case.loo),
        *testing.check_moments_gradient(leaf.grad, q, k, v, w, upstream, case.loo),
    )


def test_nan_propagates_and_the_removed_key_does_not():
    q, k, v, w = inputs("n600-m600-d1-c2", torch.float64)
    v[3, 0] = float("nan")
    out = nwfast.local_linear_pool(q, k, v, w, exclude_self=True)
    assert torch.isfinite(out[3]).all()  # key 3 is removed from query 3's fit
    assert torch.isnan(out[torch.arange(600) != 3, 0]).all()
    assert torch.isfinite(out[:, 1]).all()
    q2 = q.clone()
    q2[5, 0] = float("nan")
    out = nwfast.local_linear_pool(q2, k, v[:, 1:], w)
    assert torch.isnan(out[5]).all() and torch.isfinite(out[torch.arange(600) != 5]).all()


def test_results_repeat_bit_for_bit():
    q, k, v, w = inputs("n600-m600-d1-c2", torch.float32)
    first = ll.moments(q, k, v, w, exclude_self=True)
    again = ll.moments(q, k, v, w, exclude_self=True)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_opcheck_and_compile_without_graph_break():
    q, k, v, w = inputs("n40-m70-d2-c3", torch.float64)
    torch.library.opcheck(ll._moments_op, (q, k, v, w.requires_grad_(), None, 2.0**-53, "numba"))
    x = torch.sort(5 * torch.rand(64)).values
    y = 2 * torch.sin(x) + x**0.8 + 0.5 * torch.randn(64)

    def loo_loss(w):
        return ((nwfast.local_linear_pool(x, x, y, w, exclude_self=True) - y) ** 2).mean()

    compiled = torch.compile(loo_loss, fullgraph=True, backend="eager")
    w = torch.tensor(4.0, requires_grad=True)
    loss = compiled(w)
    (grad,) = torch.autograd.grad(loss, w)
    w_eager = torch.tensor(4.0, requires_grad=True)
    eager = loo_loss(w_eager)
    eager.backward()
    assert_close(loss.detach(), eager.detach())
    assert_close(grad, w_eager.grad)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # statsmodels' own pandas warning
@pytest.mark.parametrize("d", [1, 2])
def test_matches_statsmodels_local_linear(d):
    from statsmodels.nonparametric.kernel_regression import KernelReg

    rng = np.random.default_rng(d)
    X = rng.uniform(0, 5, (300, d))
    y = 2 * np.sin(X[:, 0]) + X.sum(1) ** 0.8 + rng.normal(0, 0.5, 300)
    Xq = rng.uniform(-0.3, 5.3, (40, d))
    h = np.array([0.4, 0.9][:d])
    theirs, _ = KernelReg(y, X, var_type="c" * d, reg_type="ll", bw=h).fit(Xq)
    # h per feature: the points scaled by 1 / h, w = 1.
    scale = torch.from_numpy(1 / h)
    ours = nwfast.local_linear_pool(
        torch.from_numpy(Xq) * scale, torch.from_numpy(X) * scale, torch.from_numpy(y), 1.0
    )
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=1e-10, atol=0)


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((torch.rand(4, 2), torch.rand(5, 3), torch.rand(5), 1.0), {}, ValueError, r"feature dims"),
        ((torch.rand(4), torch.rand(5), torch.rand(6), 1.0), {}, ValueError, r"value \(6,\)"),
        ((torch.rand(4), torch.rand(0), torch.rand(0), 1.0), {}, ValueError, r"m=0"),
        ((torch.rand(4, 2), torch.rand(5, 2), torch.rand(5), torch.rand(3)), {}, ValueError,
         r"w \(3,\).*\(2,\)"),
        ((torch.rand(4), torch.rand(5), torch.rand(5), 1.0), {"exclude_self": True}, ValueError,
         "n == m"),
        ((torch.rand(4), torch.rand(5).double(), torch.rand(5), 1.0), {}, TypeError, "dtype"),
        ((torch.arange(4), torch.rand(5), torch.rand(5), 1.0), {}, TypeError, "floating-point"),
        ((torch.rand(4, 1, 1), torch.rand(5), torch.rand(5), 1.0), {}, ValueError,
         r"query must be \(n,\) or \(n, d\)"),
        ((torch.rand(4), torch.rand(5), torch.rand(5, requires_grad=True), 1.0), {}, ValueError,
         "value requires grad"),
        ((torch.rand(4), torch.rand(5), torch.rand(5), "1"), {}, TypeError, "w must be"),
    ],
)  # fmt: skip
def test_bad_input(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        nwfast.local_linear_pool(*args, **kwargs)


# --- skipping keys: the bound of the module doc, on data made to strain it ---------


def adversarial(name, generator):
    """(query, key, value, w per feature, exclude_self), float64, of a named family."""
    f64 = {"dtype": torch.float64, "generator": generator}
    n = 700
    if name == "clusters-2d":  # tight clusters with wide gaps, a line through each
        centres = torch.tensor([[0.0, 0.0], [0.5, 0.2], [1.0, 1.0]], dtype=torch.float64)
        k = centres[torch.randint(3, (n,), generator=generator)] + 0.05 * torch.randn(n, 2, **f64)
        return k, k, k @ torch.tensor([[2.0], [-1.0]], dtype=torch.float64), [1e4, 4e3], True
    if name == "duplicates-1d":  # every point four times: ties everywhere
        k = torch.rand(n // 4, 1, **f64).repeat(4, 1)
        return k, k, torch.sin(6 * k) + 0.1 * torch.randn(k.shape, **f64), [4e3], True
    if name == "outliers-2d":  # far outliers among the keys and the queries
        k = torch.rand(n, 2, **f64)
        k[:5] = 30.0 + torch.rand(5, 2, **f64)
        q = torch.cat([torch.rand(200, 2, **f64), torch.tensor([[-20.0, 0.5], [0.5, 40.0]])])
        return q, k, torch.randn(n, 1, **f64), [2e3, 5e2], False
    if name == "nearly-collinear-2d":  # the local design is nearly singular across the line
        t = torch.rand(n, 1, **f64)
        k = torch.cat([t, 0.3 * t + 1e-3 * torch.randn(n, 1, **f64)], 1)
        return k, k, torch.cos(5 * t) + k[:, 1:], [3e3, 3e3], True
    if name == "clusters-3d":  # four clusters at a tetrahedron's corners, 1.4 apart
        corners = [[0.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]
        centres = torch.tensor(corners, dtype=torch.float64) + 0.1 * torch.rand(4, 3, **f64)
        k = centres[torch.randint(4, (n,), generator=generator)] + 0.1 * torch.randn(n, 3, **f64)
        return k, k, torch.randn(n, 2, **f64), [400.0, 200.0, 800.0], True
    raise ValueError(name)


def kept_keys(plan, n, m):
    """(n, m) bool: the pairs the plan sweeps, in the caller's order."""
    kept = torch.zeros(n, m, dtype=torch.bool)
    perm_q, perm_k = (p[0] for p in plan.order)
    for item in range(len(plan.key_ptr) - 1):
        rows = perm_q[item * plan.q_block : (item + 1) * plan.q_block]
        for start, end in plan.key_spans[plan.key_ptr[item] : plan.key_ptr[item + 1]]:
            kept[rows[:, None], perm_k[start:end][None, :]] = True
    return kept


def lines_through(q, k, v, w, loo, kept=None):
    """Per query, the weighted least-squares line (intercept, slope) through the keys
    (the kept ones), by lstsq: (n, 1 + d, c) float64."""
    u, scores, removed = reference.local_linear_scores(q, k, w, loo)
    root = torch.exp(0.5 * torch.log_softmax(scores, dim=-1))
    if kept is not None:
        root = torch.where(kept, root, 0.0)
    design = torch.cat([torch.ones_like(u[..., :1]), u], -1)
    target = v[None].expand(q.shape[0], -1, -1)
    if removed is not None:
        design = torch.where(removed[..., None], 0.0, design)
        target = torch.where(removed[..., None], 0.0, target)
    weighted = root[..., None]
    return torch.linalg.lstsq(weighted * design, weighted * target, driver="gelsd").solution


def skipping_bound(q, k, v, w, loo, kept, line):
    """Per query and channel, the module doc's bound on how far the fit moves when
    the keys outside ``kept`` are skipped; ``line`` is the exact one. Also each
    row's skipped mass and how well its kept keys pose the fit: the smallest
    eigenvalue of their scaled weighted covariance (R of the module doc) and m_q.
    Rounding the moments by u moves a fit by up to about u (1 + m_q^2) / smallest
    times the values' scale (C = S2 - S1 S1^T cancels by 1 + m_q^2)."""
    u, scores, removed = reference.local_linear_scores(q, k, w, loo)
    p = torch.softmax(scores, dim=-1)
    skipped = torch.where(kept, 0.0, p)
    if removed is not None:
        kept, skipped = kept & ~removed, torch.where(removed, 0.0, skipped)
    eps = skipped.sum(1)
    design = torch.cat([torch.ones_like(u[..., :1]), u], -1)
    residual = v[None] - torch.einsum("nmf,nfc->nmc", design, line)
    pk = torch.where(kept, p, 0.0)
    pk = pk / pk.sum(1, keepdim=True)
    S1 = torch.einsum("nm,nmf->nf", pk, u)
    C = torch.einsum("nm,nmf,nmg->nfg", pk, u, u) - S1[:, :, None] * S1[:, None, :]
    scale = C.diagonal(dim1=1, dim2=2).clamp_min(1e-300).sqrt()
    R = C / (scale[:, :, None] * scale[:, None, :])
    smallest = torch.linalg.eigvalsh(torch.nan_to_num(R)).amin(1)
    spread = smallest > 1e-8
    eye = torch.eye(C.shape[1], dtype=C.dtype)
    Cinv = torch.linalg.inv(torch.where(spread[:, None, None], C, eye))
    m_q = torch.einsum("nf,nfg,ng->n", S1, Cinv, S1).sqrt()
    offset = u - S1[:, None]
    m_j = torch.einsum("nmf,nfg,nmg->nm", offset, Cinv, offset).sqrt()
    amplified = residual.abs() * (1 + m_q[:, None] * m_j)[..., None]
    worst = torch.where((skipped > 0)[..., None], amplified, 0.0).amax(1)
    return (eps / (1 - eps))[:, None] * worst, eps, smallest, m_q


def lstsq_rounding(smallest, m_q):
    """Per row, how far rounding moves a float64 fit, per unit of the values'
    scale: the moments' rounding amplified by the solve as the conditioning
    allows (skipping_bound's doc), in either solver (the fused one and lstsq:
    1.3x 1e-14 seen between them)."""
    return 4e-14 * (1 + m_q**2) / smallest


def farthest_within(q, k, w, loo, mass):
    """(n, m) bool: the keys kept when each row skips its farthest keys while
    their softmax mass stays within ``mass`` (a skip set far heavier than a
    plan's, whose bounds are loose)."""
    _, scores, _ = reference.local_linear_scores(q, k, w, loo)
    p = torch.softmax(scores, dim=-1)
    order = scores.argsort(dim=1)  # farthest first
    within = p.gather(1, order).cumsum(1) <= mass
    return ~torch.zeros_like(within).scatter(1, order, within)


@pytest.mark.parametrize(
    "name", ["clusters-2d", "duplicates-1d", "outliers-2d", "nearly-collinear-2d", "clusters-3d"]
)
def test_skipping_keeps_the_stated_bound(name, monkeypatch, fresh_seed):
    """On data made to strain it: the fit through the kept keys moves from the
    exact one by at most the module doc's bound (both fits by lstsq in float64),
    for the keys a plan skips and for a heavier skip set of mass up to 1e-3 a
    row; the plan skips at most its tolerance; and the fused kernel computes
    the fit through the keys its plan kept as closely as its dense pass computes
    the exact one."""
    from nwfast.kernels import blocks, numba_moments

    monkeypatch.setattr(blocks, "MIN_SAVED", 0)  # plans at test sizes, small blocks
    monkeypatch.setattr(numba_moments, "BLOCK", 16)
    q, k, v, w, loo = adversarial(name, torch.Generator().manual_seed(fresh_seed))
    w = torch.tensor(w, dtype=torch.float64)
    tolerance = 1e-3
    plan = numba_moments.make_plan(q, k, w, 0 if loo else None, tolerance)
    assert plan is not None and plan.pairs < q.shape[0] * k.shape[0], "the plan skips nothing"
    everything = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool)
    exact = lines_through(q, k, v, w, loo)
    *_, conditioned, m_exact = skipping_bound(q, k, v, w, loo, everything, exact)
    planned = kept_keys(plan, q.shape[0], k.shape[0])
    for kept in (planned, farthest_within(q, k, w, loo, tolerance)):
        through_kept = lines_through(q, k, v, w, loo, kept)
        bound, eps, smallest, m_q = skipping_bound(q, k, v, w, loo, kept, exact)
        assert eps.max() <= tolerance
        # Rows whose fits lstsq resolves in float64: both far from singular, and
        # their rounding small beside the values (not a query far outside the
        # keys, whose fit extrapolates: m_q of 1e8 amplifies rounding by 1e16).
        rounding = lstsq_rounding(smallest, m_q) + lstsq_rounding(conditioned, m_exact)
        resolved = (smallest > 1e-8) & (conditioned > 1e-8) & (rounding < 1e-6)
        assert resolved.float().mean() > 0.5
        moved = (through_kept[:, 0] - exact[:, 0]).abs()
        slack = (rounding + 1e-12)[:, None] * v.abs().max()
        excess = (moved - bound - slack)[resolved]
        assert (excess <= 0).all(), f"a fit moved {excess.max():.3g} past its bound"
    assert eps.max() > 1e-4  # the heavier set strains the bound

    through_planned = lines_through(q, k, v, w, loo, planned)
    *_, smallest, m_q = skipping_bound(q, k, v, w, loo, planned, exact)
    dense = nwfast.local_linear_pool(q, k, v, w, exclude_self=loo, tolerance=0.0)
    fit = nwfast.local_linear_pool(q, k, v, w, exclude_self=loo, tolerance=tolerance)
    # Rows below the ramp's top take (a share of) the local-constant value, not lstsq's.
    noise = 4 * (dense - exact[:, 0]).abs() + lstsq_rounding(smallest, m_q)[:, None] * v.abs().max()
    full = ll.line_ramp(torch.float64)[1]
    lines = (smallest >= full) & (conditioned >= full)
    assert ((fit - through_planned[:, 0]).abs() <= noise)[lines].all()
    assert not torch.equal(fit, dense)  # something was skipped
