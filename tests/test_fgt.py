"""Far fields: expanded key boxes keep every row within its bound, on data made to break it."""

import math

import numpy as np
import pytest
import torch
from test_blocks import family

import nwfast
from nwfast import reference, testing
from nwfast._checks import prepare_shared
from nwfast.kernels import blocks, far, numba_fgt, numba_nw, triton_fgt, triton_nw

F64 = torch.float64


@pytest.fixture(autouse=True)
def expansions_everywhere(sparse_everywhere, monkeypatch):
    """Plans at test sizes (no minimum size, small blocks), where an
    expansion costs a tenth of what it does and its planning nothing: at
    these sizes an expansion would rarely beat its few thousand pairs."""
    monkeypatch.setattr(far, "TERM_COST", far.TERM_COST / 10)
    monkeypatch.setattr(far, "PAIR_COST", 0.0)
    monkeypatch.setattr(far, "MIN_NEAR_KEYS", {1: 0, 2: 0})
    monkeypatch.setattr(far, "MIN_NEAR_PAIRS", 0)


def test_expansions_enter_only_where_they_pay(monkeypatch):
    """Expansions enter plans where queries hold over MIN_NEAR_KEYS[d] keys
    within delta and the pass holds over MIN_NEAR_PAIRS such pairs, in d = 1
    and 2 (never in d = 3); elsewhere skipping alone is faster (far.py gives
    the measurements)."""
    monkeypatch.undo()  # the thresholds as shipped
    gen = torch.Generator().manual_seed(5)
    cases = [
        (32768, 1, 0.19, True),
        (65536, 1, 0.0104, False),
        (8192, 1, 0.25, False),
        (2**20, 2, 0.0258, True),  # Silverman's h in the unit square
        (2**18, 2, 0.0325, False),
        (2**20, 3, 0.05, False),
    ]
    for n, d, h, expands in cases:
        x = torch.rand(1, n, d, generator=gen) * (5 if d == 1 else 1)
        w = torch.tensor([[(0.5 if d == 1 else 1.0) / h**2]])
        assert far.applies(x, x, w, 2.0**-24) == expands, (n, d, h)


def points(name, n, d):
    """test_blocks' families, and far outliers among uniform points."""
    if name == "outliers":  # far queries and keys among uniform ones
        x = torch.rand(n, d, dtype=F64)
        x[:3] = torch.tensor([-3.0, 5.0, 1e3], dtype=F64)[:, None]
        return x
    return family(name, n, d)


CASES = {
    # name: (query family, key family or None (the queries: leave-one-out),
    #        n, m, d, h, channels, batch)
    "uniform-1d": ("uniform", "uniform", 1500, 1700, 1, 0.02, 1, 1),
    "normal-1d-loo-channels": ("normal", None, 2000, 2000, 1, 0.03, 3, 1),
    "clusters-1d-loo": ("clusters", None, 1800, 1800, 1, 0.002, 1, 1),
    "duplicates-1d-loo": ("duplicates", None, 1600, 1600, 1, 0.05, 2, 1),
    "outliers-1d": ("outliers", "outliers", 1500, 1500, 1, 0.02, 1, 1),
    "tiny-w-1d-batch": ("uniform", "normal", 1200, 1000, 1, 30.0, 1, 2),
    "uniform-2d": ("uniform", "uniform", 2500, 2500, 2, 0.25, 1, 1),
    "normal-2d-loo-batch": ("normal", None, 1800, 1800, 2, 0.1, 2, 2),
    # smaller, for the interpreter's Triton path (p^2 terms a pair, a Python loop each)
    "uniform-2d-small": ("uniform", "uniform", 640, 700, 2, 0.25, 1, 1),
    "normal-2d-loo-small": ("normal", None, 900, 900, 2, 0.2, 2, 2),
}


def case_inputs(name, dtype=F64):
    q_family, k_family, n, m, d, h, c, batch = CASES[name]
    q = torch.stack([points(q_family, n, d) for _ in range(batch)])
    k = q if k_family is None else torch.stack([points(k_family, m, d) for _ in range(batch)])
    v = torch.randn(batch, m, c, dtype=F64)
    w = torch.tensor(h**-2, dtype=F64)
    return (*(x.to(dtype) for x in (q, k, v, w)), k_family is None)


def plan_of(q, k, w, loo, tolerance):
    args = prepare_shared(q, k, k[..., :1], w, loo)
    return numba_nw.make_plan(args.q, args.k, args.w, 0 if loo else None, tolerance)


def pool(q, k, v, w, loo, **options):
    return nwfast.nw_pool(q, k, v, w, exclude_self=loo, backend="numba", **options)


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(CASES))
def test_expanded_pool_is_exact_to_rounding(name, dtype, poisoned):
    q, k, v, w, loo = case_inputs(name, dtype)
    plan = plan_of(q, k, w, loo, nwfast._checks.resolve_tolerance(None, dtype))
    # float64's tolerance asks 2-D expansions for orders past MAX_ORDER often
    if q.shape[-1] == 1 or dtype == torch.float32:
        assert plan is not None and plan.far is not None and plan.far.expanded > 0
    out = pool(q, k, v, w, loo)
    testing.assert_ok(testing.check_pool(out, q, k, v, w, loo))


@pytest.mark.parametrize("name", list(CASES))
def test_every_row_within_its_bound(name):
    """At a tolerance far above float64's rounding, each row's error is the
    truncation's and the skipping's: at most 2 * bound_i * max_j ||v_j||."""
    q, k, v, w, loo = case_inputs(name)
    tolerance = 1e-6
    plan = plan_of(q, k, w, loo, tolerance)
    assert plan.far is not None and plan.far.expanded > 0
    bound = far.row_bounds(plan, q.shape[1])
    assert (bound <= blocks.SAFETY * tolerance).all()
    out = pool(q, k, v, w, loo, tolerance=tolerance)
    exact = reference.pool_and_lse(q, k, v, w, loo)[0]
    error = (out - exact).norm(dim=-1)
    assert float(error.max()) > 1e-12  # the expansions truncate something, past rounding
    allowed = 2 * bound * v.norm(dim=-1).amax(dim=-1, keepdim=True) + 1e-13
    assert (error <= allowed).all(), f"row error {float((error / allowed).max()):.3g} x its bound"


def test_a_bandwidth_per_batch_element():
    """vmap over w folds one bandwidth per batch element into one call: each
    element's expansions take its own scale."""
    q, k, v, _, loo = case_inputs("normal-2d-loo-batch")
    w = torch.tensor([0.03**-2, 0.05**-2], dtype=F64)
    out = torch.func.vmap(lambda *a: pool(*a, loo))(q, k, v, w)
    for b in range(2):
        testing.assert_ok(testing.check_pool(out[b], q[b], k[b], v[b], w[b], loo))


@pytest.mark.parametrize("per_key", [False, True], ids=["one-w", "per-key-w"])
def test_huge_w_is_computed_pair_by_pair(per_key):
    """Rows dominated by their nearest key, hundreds of bandwidths from the
    rest of their block: no order meets the bound, so no expansion is made,
    and a key block whose weight underflows next to the block's best is not
    taken for a zero (it was, by block skipping alone: a row lost its nearest
    key)."""
    q, k, v, _, _ = case_inputs("uniform-1d")
    w = torch.tensor(1e9, dtype=F64)
    if per_key:
        w = w * (1 + torch.rand(k.shape[1], dtype=F64))
    plan = plan_of(q, k, w, False, 2.0**-53)
    assert plan is None or plan.far is None
    testing.assert_ok(testing.check_pool(pool(q, k, v, w, False), q, k, v, w))


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize(
    "name",
    [
        "uniform-1d",
        "normal-1d-loo-channels",
        "clusters-1d-loo",
        "duplicates-1d-loo",
        "outliers-1d",
        "normal-2d-loo-batch",
    ],
)
def test_expanded_gradients(name, dtype):
    q, k, v, w, loo = case_inputs(name, dtype)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, w)]
    if loo:  # one tensor for both, as the estimators pass it
        leaves[1] = leaves[0]
    out = pool(*leaves, loo)
    g = torch.randn_like(out)
    out.backward(g)
    grads = [x.grad for x in leaves]
    if loo:  # the query's and the key's share of the same tensor's gradient
        grads[0] = grads[1] = None
    testing.assert_ok(*testing.check_pool_gradients(grads, q, k, v, w, g, loo))


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
def test_far_queries_beside_expansions(dtype, poisoned):
    """Queries 10 bandwidths to 1e4 data units beyond the keys, among ordinary
    ones, in a plan that expands: each far row keeps its nearest key's value,
    and the backward's exact shift of those rows sweeps every pair they hold,
    the expanded ones included."""
    h = 0.01
    k = torch.rand(1500, 1, dtype=F64)
    far_q = torch.tensor([1 + 10 * h, -10 * h, 1 + 1e3 * h, -1e3 * h, 1 + 1e4, -1e4], dtype=F64)
    q = torch.cat([torch.rand(1400, 1, dtype=F64), far_q[:, None]])[torch.randperm(1406)]
    v = torch.randn(1500, 2, dtype=F64)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    w = torch.tensor(h**-2, dtype=dtype)
    plan = plan_of(q[None], k[None], w, False, nwfast._checks.resolve_tolerance(None, dtype))
    assert plan.far is not None and plan.far.expanded > 0
    leaves = [x.clone().requires_grad_() for x in (q, k, v, w)]
    out = pool(*leaves, False)
    g = torch.randn_like(out)
    out.backward(g)
    testing.assert_ok(
        testing.check_pool(out, q, k, v, w),
        *testing.check_pool_gradients([x.grad for x in leaves], q, k, v, w, g),
    )


def test_all_equal_points_leave_one_out():
    """Every point at one place: each row's softmax is its m - 1 others, one
    weight each, whatever the plan makes of a box of zero extent."""
    x = torch.full((1, 1200, 1), 0.3, dtype=F64)
    v = torch.randn(1, 1200, 2, dtype=F64)
    w = torch.tensor(1e4, dtype=F64)
    leaves = [x.clone().requires_grad_(), v.clone().requires_grad_(), w.clone().requires_grad_()]
    out = pool(leaves[0], leaves[0], leaves[1], leaves[2], True)
    g = torch.randn_like(out)
    out.backward(g)
    grads = [None, leaves[0].grad, leaves[1].grad, leaves[2].grad]
    testing.assert_ok(
        testing.check_pool(out, x, x, v, w, True),
        *testing.check_pool_gradients(grads, x, x, v, w, g, True),
    )


def test_query_and_key_gradients_of_leave_one_out():
    """dq and dk of a leave-one-out call each within the policy (separate
    tensors of the same points)."""
    q, k, v, w, loo = case_inputs("normal-1d-loo-channels")
    leaves = [q.clone().requires_grad_(), q.clone().requires_grad_(), v, w]
    assert plan_of(leaves[0], leaves[1], w, True, 2.0**-53).far is not None
    out = pool(*leaves, True)
    g = torch.randn_like(out)
    out.backward(g)
    grads = [leaves[0].grad, leaves[1].grad, None, None]
    testing.assert_ok(*testing.check_pool_gradients(grads, q, q, v, w, g, True))


def test_gradcheck_and_forward_mode():
    """float64 gradients through expansions, and forward mode (which
    computes the expanded pairs pair by pair)."""
    x = torch.sort(torch.rand(400, dtype=F64)).values
    inputs = [
        x.clone().requires_grad_(),
        x.clone().requires_grad_(),
        torch.randn(400, dtype=F64).requires_grad_(),
        torch.tensor(1 / 0.05**2, dtype=F64).requires_grad_(),
    ]
    args = prepare_shared(*inputs, True)
    plan = numba_nw.make_plan(args.q, args.k, args.w, 0, 2.0**-53)
    assert plan.far is not None and plan.far.expanded > 0

    def f(q, k, v, w):
        return nwfast.nw_pool(q, k, v, w, exclude_self=True, backend="numba")

    assert torch.autograd.gradcheck(f, inputs, check_forward_ad=True)


def test_tangent_by_the_direct_path():
    q, k, v, w, loo = case_inputs("uniform-1d")
    tangents = tuple(torch.randn_like(x) for x in (q, k, v, w))
    _, dout = torch.func.jvp(lambda *a: pool(*a, loo), (q, k, v, w), tangents)
    testing.assert_ok(testing.check_pool_tangent(dout, q, k, v, w, tangents, loo))


def test_plan_round_trip_and_its_direct_form():
    q, k, _, w, loo = case_inputs("normal-2d-loo-batch")
    plan = plan_of(q, k, w, loo, 2.0**-24)
    B, n, m = q.shape[0], q.shape[1], k.shape[1]
    back = blocks.unpack(blocks.pack(plan, B, n, m), far.Far)
    for a, b in zip(back.far, plan.far):
        assert np.array_equal(a, b)
    direct = far.as_direct(plan, n, m)
    assert direct.far is None and direct.pairs == plan.pairs + plan.far.expanded


@pytest.mark.parametrize("d", [1, 2])
@pytest.mark.parametrize("kind", [0, 1, 2])
def test_the_truncation_bound_holds(d, kind):
    """The bound ``far`` plans with against the truncated series itself, for
    random boxes and targets: values (kind 0), first (1) and second (2)
    moments in the distance."""
    rng = np.random.default_rng(0)
    p_max = 16
    P = np.zeros((d, 3, p_max + 1))
    T = np.zeros((d, 3, p_max + 1))
    ks = np.zeros(d, np.int64)
    for _ in range(40):
        half = rng.uniform(0.05, 1.2, d)  # in units of delta
        s = rng.uniform(-half, half)  # a source in the box
        t = rng.normal(0, 2.5, d)  # a target
        assert far._series(half, 1.0, p_max, P, T)
        for p in (2, 5, 9, 14):
            exact, series = _moment_sums(s, t, p, kind)
            bound = far._error(P, T, far.CRAMER**d * math.exp(-0.5 * (t @ t)), kind, p, ks)
            assert abs(exact - series) <= bound * (1 + 1e-9) + 1e-15


def _moment_sums(s, t, p, kind):
    """The exact sum of one source (e, (t - s)_0 e or |t - s|^2 e with e =
    exp(-|t - s|^2)) and its series truncated at order p per axis."""
    d = s.size
    e = math.exp(-((t - s) @ (t - s)))
    exact = [e, (t - s)[0] * e, (t - s) @ (t - s) * e][kind]
    H = np.zeros((d, p + 2))
    for f in range(d):
        h = np.zeros(p + 2)
        h[0] = math.exp(-(t[f] ** 2))
        h[1] = 2 * t[f] * h[0]
        for n in range(1, p + 1):
            h[n + 1] = 2 * t[f] * h[n] - 2 * n * h[n - 1]
        H[f] = h
    series = 0.0
    for alpha in np.ndindex(*([p] * d)):
        a = np.prod([s[f] ** alpha[f] / math.factorial(alpha[f]) for f in range(d)])
        value = np.prod([H[f, alpha[f]] for f in range(d)])
        if kind == 0:
            series += a * value
        elif kind == 1:
            others = np.prod([H[f, alpha[f]] for f in range(1, d)])
            series += a * 0.5 * H[0, alpha[0] + 1] * others
        else:
            for f in range(d):
                shifted = np.prod([H[g, alpha[g] + (2 if g == f else 0)] for g in range(d)])
                series += a * (0.25 * shifted + 0.5 * value)
    return exact, series


def test_plan_summary_and_pairs_computed():
    q, k, _, w, loo = case_inputs("uniform-1d")
    plan = plan_of(q, k, w, loo, 2.0**-53)
    summary = nwfast.plan_summary(q, k, w, exclude_self=loo, backend="numba")
    assert summary.computed == nwfast.pairs_computed(q, k, w, exclude_self=loo) == plan.pairs
    assert summary.expanded == plan.far.expanded > 0
    assert (
        summary.computed + summary.expanded + summary.skipped
        == summary.pairs
        == q[..., 0].numel() * k.shape[1]
    )
    assert sum(summary.expansions.values()) == len(plan.far.row_pairs)
    assert 0 < summary.bound <= blocks.SAFETY * 2.0**-53
    dense = nwfast.plan_summary(q, k, w, exclude_self=loo, tolerance=0.0)
    assert dense == (summary.pairs, summary.pairs, 0, 0, {}, 0.0)


@pytest.mark.parametrize(
    ("estimator", "fold"),
    [("NadarayaWatson", "forward"), ("LocalLinearRegression", "fold_moments")],
)
def test_the_leave_one_out_search_with_expansions(estimator, fold, monkeypatch, moment_blocks):
    """The "loo" search picks the same bandwidth whether its passes expand far
    boxes or not, and its passes (local-linear's without a gradient) do expand."""
    pytest.importorskip("sklearn")
    x = torch.rand(3000, dtype=F64) * 5
    y = torch.sin(2 * x) + 0.3 * torch.randn(3000, dtype=F64)
    expanded = []
    folded = getattr(numba_fgt, fold)
    monkeypatch.setattr(numba_fgt, fold, lambda *a: expanded.append(1) or folded(*a))
    fits = []
    for enabled in (True, False):
        monkeypatch.setitem(far.SWITCH, "enabled", enabled)
        model = getattr(nwfast, estimator)("loo").fit(x[:, None].numpy(), y.numpy())
        fits.append((model.bandwidth_, model.loo_mse_))
    assert len(expanded) > 3  # passes that expanded something
    (h, mse), (h_ref, mse_ref) = fits
    assert abs(h / h_ref - 1) < 1e-4 and abs(mse / mse_ref - 1) < 1e-8


# --- local-linear's moments: one feature, the expansions' moments in the distance ----

LL_CASES = [name for name, case in CASES.items() if case[4] == 1 and case[7] == 1]


@pytest.fixture
def moment_blocks(monkeypatch):
    from nwfast.kernels import numba_moments

    monkeypatch.setattr(numba_moments, "BLOCK", 16)
    return numba_moments


def ll_inputs(name, dtype=F64):
    q, k, v, w, loo = case_inputs(name, dtype)
    return q[0], k[0], v[0], w.reshape(1), loo


def row_maxima(q, k, v, w, loo, rows=256):
    """Per row and moment, max_j |phi_ij| over the keys the row holds, in float64."""
    out = []
    for i0 in range(0, q.shape[0], rows):
        u = k.double()[None, :, :] - q.double()[i0 : i0 + rows, None, :]
        phi = reference.moment_terms(u, v.double()).abs()
        if loo:
            own = torch.arange(i0, i0 + u.shape[0])
            phi[torch.arange(u.shape[0]), own] = 0.0
        out.append(phi.amax(1))
    return torch.cat(out)


@pytest.mark.parametrize("name", LL_CASES)
def test_local_linear_moments_within_their_bound(name, moment_blocks, poisoned):
    """At a tolerance far above float64's rounding each moment with k factors of u
    (and b of v) moves by at most 2 bound_i max(max_j |phi_ij|, (sqrt(2) h)^k
    max_j |v_j|^b), bound_i the plan's skipped and expanded mass of the row
    (``numba_moments``' contract), on expanded plans."""
    from nwfast import local_linear as ll

    q, k, v, w, loo = ll_inputs(name)
    tolerance = 1e-6
    plan = moment_blocks.make_plan(q, k, w, 0 if loo else None, tolerance)
    assert plan is not None and plan.far is not None and plan.far.expanded > 0
    bound = far.row_bounds(plan, q.shape[0])[0]
    mom, lse = ll.moments(q, k, v, w, exclude_self=loo, tolerance=tolerance)
    exact, exact_lse = reference.moments_reference(q, k, v, w, loo)
    c = v.shape[1]
    sigma = math.sqrt(2.0 / float(w))
    v_max = float(v.abs().max())
    # per column: powers of u (first, second, the values, the products) and of v
    k_pow = torch.tensor([1.0, 2.0] + [0.0] * c + [1.0] * c, dtype=F64)
    v_pow = torch.tensor([0.0, 0.0] + [1.0] * (2 * c), dtype=F64)
    series = sigma**k_pow * v_max**v_pow
    scale = torch.maximum(row_maxima(q, k, v, w, loo), series)
    allowed = 2 * bound[:, None] * scale + 1e-13 * scale
    error = (mom - exact).abs()
    assert float(error.max()) > 1e-13  # the expansions truncate something, past rounding
    assert (error <= allowed).all(), f"{float((error / allowed).max()):.3g} of the bound"
    assert float((lse - exact_lse).abs().max()) <= 2 * float(bound.max()) + 1e-13


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", LL_CASES)
def test_local_linear_expanded_fit_and_gradient(name, dtype, moment_blocks, poisoned):
    """At the dtype's own tolerance the fit and its gradient in w match the
    every-pair pass as closely as that matches float64, or to rounding; the
    gradient sweeps the expanded pairs one by one."""
    q, k, v, w, loo = ll_inputs(name, dtype)
    tolerance = nwfast._checks.resolve_tolerance(None, dtype)
    plan = moment_blocks.make_plan(q, k, w, 0 if loo else None, tolerance)
    assert plan is not None and plan.far is not None and plan.far.expanded > 0
    upstream = torch.randn(q.shape[0], v.shape[1], dtype=F64)
    fits, grads = [], []
    # expanded, every pair, and every pair on the inputs in float64
    from nwfast import local_linear as ll

    exact = tuple(x.double() for x in (q, k, v, w))
    for args, tol in (((q, k, v, w), tolerance), ((q, k, v, w), 0.0), (exact, 0.0)):
        w_grad = args[3].clone().requires_grad_()
        fit = nwfast.local_linear_pool(*args[:3], w_grad, exclude_self=loo, tolerance=tol)
        (grad,) = torch.autograd.grad((fit.double() * upstream).sum(), w_grad)
        fits.append(fit.double())
        grads.append(grad.double())
    # Rows near the line's ramp amplify rounding: the expanded pass may differ from the
    # every-pair one by as much as that one differs from float64, and by rounding.
    rounding = 1e-9 if dtype == F64 else 2e-5
    # and the solve amplifies the sums' rounding by 1 / lam (R = C / S2 in one feature)
    mom, _ = ll.moments(*exact[:3], exact[3], exclude_self=loo, tolerance=0.0)
    lam = ((mom[:, 1] - mom[:, 0] ** 2) / mom[:, 1]).nan_to_num(1.0).clamp_min(1e-300)[:, None]
    fit_noise = 4 * (fits[1] - fits[2]).abs() + (rounding + 1e-13 / lam) * float(v.abs().max())
    assert ((fits[0] - fits[1]).abs() <= fit_noise).all()
    if dtype == F64:  # 1.8e-11 seen where an ill-posed row's line dominates (|grad| 1e5)
        allowed = 1e-9 * float(grads[1].abs().max())
    else:  # float32's gradient cancels: its rounding against its terms, sum_i |g_i| max|v| / w
        terms = float((upstream.abs().sum(0) * v.double().abs().amax(0)).sum()) / float(w)
        allowed = 1e-7 * terms  # 2.4e-9 seen
    allowed += 4 * float((grads[1] - grads[2]).abs().max())
    assert float((grads[0] - grads[1]).abs().max()) <= allowed


def test_local_linear_at_w_zero_is_not_expanded(moment_blocks):
    """w = 0 scales every point to one place: no plan, so no expansion whose
    distances would have to be scaled back by 1 / sqrt(w)."""
    q, k, v, _, loo = ll_inputs("uniform-1d")
    w = torch.zeros(1, dtype=F64)
    assert moment_blocks.make_plan(q, k, w, None, 1e-6) is None or (
        moment_blocks.make_plan(q, k, w, None, 1e-6).far is None
    )
    fit = nwfast.local_linear_pool(q, k, v, w, tolerance=1e-6)
    exact = reference.local_linear_reference(q, k, v, w)
    nwfast.testing.assert_close(fit, exact, tolerance=1e-12)


# --- the Triton path: the same plans, the far sums in Triton kernels ------------

# Under the interpreter a program owns 256 points by default, too many for a
# box to expand anything at these sizes; 64 as on a GPU here (sparse_everywhere).
FAR_TILES = {"query": {"BLOCK_N": 64, "BLOCK_M": 256}, "key": {"BLOCK_N": 256, "BLOCK_M": 64}}
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def triton_blocks(monkeypatch):
    for side, config in FAR_TILES.items():
        monkeypatch.setitem(triton_nw.INTERPRET_CONFIGS, side, config)


def triton_plan_of(q, k, w, loo, tolerance):
    args = prepare_shared(q, k, k[..., :1], w, loo)
    return triton_nw.make_plan(args.q, args.k, args.w, 0 if loo else None, tolerance)


def on_device(*tensors):
    return [x.to(TRITON_DEVICE) for x in tensors]


BOTH_DTYPES = ("uniform-1d", "normal-1d-loo-channels", "tiny-w-1d-batch", "normal-2d-loo-small")
TRITON_CASES = (
    [(name, dtype) for name in BOTH_DTYPES for dtype in (torch.float32, F64)]
    # the skipping tests' adversarial families, once each
    + [("clusters-1d-loo", F64), ("duplicates-1d-loo", torch.float32), ("outliers-1d", F64)]
) + (  # the interpreter computes no half precision
    [("uniform-1d", torch.float16), ("normal-2d-loo-small", torch.bfloat16)]
    if torch.cuda.is_available()
    else []
)


@pytest.mark.parametrize(
    ("name", "dtype"), TRITON_CASES, ids=[f"{n}-{str(t)[6:]}" for n, t in TRITON_CASES]
)
def test_triton_expansions_forward_and_gradients(name, dtype, triton_blocks, poisoned):
    q, k, v, w, loo = case_inputs(name, dtype)
    plan = triton_plan_of(q, k, w, loo, nwfast._checks.resolve_tolerance(None, dtype))
    if q.shape[-1] == 1 or dtype != F64:
        assert plan is not None and plan.far is not None and plan.far.expanded > 0
    leaves = [x.clone().requires_grad_() for x in on_device(q, k, v, w)]
    out = nwfast.nw_pool(*leaves, exclude_self=loo, backend="triton")
    g = torch.randn_like(out)
    out.backward(g)
    testing.assert_ok(
        testing.check_pool(out, q, k, v, w, loo),
        *testing.check_pool_gradients([x.grad for x in leaves], q, k, v, w, g, loo),
    )


@pytest.mark.parametrize("name", ["outliers-1d", "clusters-1d-loo", "uniform-2d-small"])
def test_triton_rows_within_their_bound(name, triton_blocks):
    """As ``test_every_row_within_its_bound``, through the Triton kernels."""
    tolerance = 1e-6
    # boxes that evaluate a local expansion and boxes that evaluate each series:
    # about 1 draw in 200 of uniform-2d-small gives every box a local expansion
    for _ in range(10):
        q, k, v, w, loo = case_inputs(name)
        plan = triton_plan_of(q, k, w, loo, tolerance)
        assert plan.far is not None and plan.far.expanded > 0
        if (plan.far.q_local > 0).any() and (plan.far.q_local == 0).any():
            break
    else:
        raise AssertionError(f"{name}: 10 draws, none with both kinds of boxes")
    bound = far.row_bounds(plan, q.shape[1])
    out = nwfast.nw_pool(
        *on_device(q, k, v, w), exclude_self=loo, tolerance=tolerance, backend="triton"
    )
    exact = reference.pool_and_lse(q, k, v, w, loo)[0]
    error = (out.cpu() - exact).norm(dim=-1)
    assert float(error.max()) > 1e-12  # the expansions truncate something, past rounding
    allowed = 2 * bound * v.norm(dim=-1).amax(dim=-1, keepdim=True) + 1e-13
    assert (error <= allowed).all(), f"row error {float((error / allowed).max()):.3g} x its bound"


def test_triton_tangent_by_the_direct_path(triton_blocks):
    q, k, v, w, loo = case_inputs("uniform-1d")
    tangents = tuple(torch.randn_like(x) for x in (q, k, v, w))
    assert triton_plan_of(q, k, w, loo, 2.0**-53).far is not None
    _, dout = torch.func.jvp(
        lambda *a: nwfast.nw_pool(*a, exclude_self=loo, backend="triton"),
        tuple(on_device(q, k, v, w)),
        tuple(on_device(*tangents)),
    )
    testing.assert_ok(testing.check_pool_tangent(dout, q, k, v, w, tangents, loo))


def test_triton_far_queries_beside_expansions(triton_blocks):
    """As ``test_far_queries_beside_expansions``, through the Triton kernels:
    far rows among expanded ones keep their nearest key's value, and their
    gradients (an exact shift each) stay within the policy."""
    h = 0.01
    k = torch.rand(1500, 1, dtype=F64)
    far_q = torch.tensor([1 + 10 * h, -10 * h, 1 + 1e3 * h, -1e3 * h, 1 + 1e4, -1e4], dtype=F64)
    q = torch.cat([torch.rand(1400, 1, dtype=F64), far_q[:, None]])[torch.randperm(1406)]
    v = torch.randn(1500, 2, dtype=F64)
    q, k, v = (x.float() for x in (q, k, v))
    w = torch.tensor(h**-2)
    assert triton_plan_of(q[None], k[None], w, False, 2.0**-24).far.expanded > 0
    leaves = [x.clone().requires_grad_() for x in on_device(q, k, v, w)]
    out = nwfast.nw_pool(*leaves, backend="triton")
    g = torch.randn_like(out)
    out.backward(g)
    testing.assert_ok(
        testing.check_pool(out, q, k, v, w),
        *testing.check_pool_gradients([x.grad for x in leaves], q, k, v, w, g),
    )


def test_triton_plan_summary(triton_blocks):
    q, k, _, w, loo = case_inputs("uniform-1d")
    plan = triton_plan_of(q, k, w, loo, 2.0**-53)
    summary = nwfast.plan_summary(*on_device(q, k, w), exclude_self=loo, backend="triton")
    assert summary.expanded == plan.far.expanded > 0
    assert summary.computed == plan.pairs


@pytest.mark.parametrize(
    ("name", "tolerance"),
    [("outliers-1d", 1e-6), ("clusters-1d-loo", 1e-6), ("uniform-2d-small", 1e-6)]
    + [("normal-2d-loo-small", 1e-6)],
)
def test_triton_backward_shares_match_the_cpu_kernels(name, tolerance, triton_blocks):
    """The expanded pairs' shares of every gradient, from the Triton kernels
    and from ``numba_fgt`` on one plan: the same series, so the same sums to
    float64 rounding. The plans hold boxes with a local expansion and boxes
    evaluating each series, and leave-one-out rows subtracting their own key
    (and keys their own query)."""
    q, k, v, w, loo = case_inputs(name)
    tolerance = nwfast._checks.resolve_tolerance(tolerance, F64)
    plan = triton_plan_of(q, k, w, loo, tolerance)
    assert plan.far is not None and plan.far.expanded > 0
    if not (plan.far.q_local == 0).any():  # some data give every box a local expansion
        q_local = plan.far.q_local.copy()
        q_local[1::2] = 0  # these boxes' rows evaluate each series: valid, and slower
        plan = plan._replace(far=plan.far._replace(q_local=q_local))
    assert (plan.far.q_local > 0).any() and (plan.far.q_local == 0).any()
    B, n, _ = q.shape
    m = k.shape[1]
    out, lse = reference.pool_and_lse(q, k, v, w, loo)
    q, g, out, lse = blocks.queries_in_order(plan, q, torch.randn_like(out), out, lse)
    k, v = blocks.keys_in_order(plan, k, v)
    args = (q, g, k, v, w.reshape(1, 1).expand(B, 1), out, lse, torch.randn(B, n, dtype=F64))
    skip, skipped_by = blocks.skips(plan, 0 if loo else None, B, n, m)
    needs = (True, True, True, True)
    want = numba_fgt.backward_shares(plan, needs, *args, skip, skipped_by)
    skips = (torch.from_numpy(skip), torch.from_numpy(skipped_by))
    got = triton_fgt.backward_shares(plan, needs, *on_device(*args, *skips), loo)
    for label, a, b in zip("qkvw", got, want):
        error = float((a.cpu() - b).norm() / b.norm())
        assert error < 1e-9, (label, error)  # dw cancels: up to 3e-12 seen on random plans
