"""Block-sparse plans: the bound holds on data made to break it, results stay exact."""

import math

import numpy as np
import pytest
import torch

import nwfast
from nwfast import reference, testing
from nwfast._checks import prepare_shared
from nwfast.kernels import blocks

F64 = torch.float64
# Plans at test sizes: no minimum size, small blocks.
pytestmark = pytest.mark.usefixtures("sparse_everywhere")


def family(name, n, d, generator_seed=None):
    """Points (n, d) float64 of a named family on roughly the unit scale."""
    if name == "uniform":
        return torch.rand(n, d, dtype=F64)
    if name == "normal":
        return 0.2 * torch.randn(n, d, dtype=F64)
    if name == "clusters":  # tight clusters with wide gaps
        centres = torch.tensor([[0.0] * d, [0.5] * d, [1.0] * d], dtype=F64)
        return centres[torch.randint(3, (n,))] + 0.003 * torch.randn(n, d, dtype=F64)
    if name == "duplicates":
        return torch.rand(n // 4, d, dtype=F64).repeat(4, 1)[torch.randperm(n // 4 * 4)]
    if name == "all-equal":
        return torch.full((n, d), 0.3, dtype=F64)
    raise ValueError(name)


def skipped_mass(plan, query, key, w, exclude_self):
    """Per row, the exact float64 softmax mass of the keys its plan skips."""
    (q,) = blocks.queries_in_order(plan, query)
    k, w_keys = blocks.keys_in_order(plan, key, w.expand(*w.shape[:-1], key.shape[1]))
    B, n, _ = q.shape
    m = k.shape[1]
    skip, _ = blocks.skips(plan, 0 if exclude_self else None, B, n, m)
    skip = torch.from_numpy(skip)
    scores = reference._masked_scores(q[:, :, None] - k[:, None], w_keys, skip)
    p = torch.softmax(scores, dim=-1)
    kept = torch.zeros(B, n, m, dtype=torch.bool)
    items = -(-n // plan.q_block)
    for item in range(B * items):
        b, t = divmod(item, items)
        rows = slice(t * plan.q_block, (t + 1) * plan.q_block)
        for start, end in plan.key_spans[plan.key_ptr[item] : plan.key_ptr[item + 1]]:
            kept[b, rows, start:end] = True
    return torch.where(kept, 0.0, p).sum(-1)


def make_plan(query, key, w, tolerance, exclude_self, block=16):
    return blocks.plan(query, key, w, tolerance, exclude_self, block, block)


CASES = {
    # name: (query family, key family or None (the queries), n, m, d, h, per-key w)
    "uniform-1d": ("uniform", None, 1000, 1000, 1, 0.01, False),
    "uniform-1d-perkey": ("uniform", "uniform", 700, 900, 1, 0.01, True),
    "normal-2d": ("normal", None, 900, 900, 2, 0.02, False),
    "clusters-2d": ("clusters", "clusters", 600, 800, 2, 0.004, False),
    "clusters-1d-loo": ("clusters", None, 800, 800, 1, 0.002, True),
    "duplicates-3d": ("duplicates", None, 800, 800, 3, 0.05, False),
    "clusters-3d": ("clusters", "clusters", 500, 700, 3, 0.004, True),
}


def case_inputs(name):
    q_family, k_family, n, m, d, h, per_key = CASES[name]
    q = family(q_family, n, d)[None]
    k = q if k_family is None else family(k_family, m, d)[None]
    w = (
        (0.5 + torch.rand(1, m, dtype=F64)) / h**2
        if per_key
        else torch.full((1, 1), h**-2, dtype=F64)
    )
    return q, k, w, k_family is None


@pytest.mark.parametrize("tolerance", [2.0**-24, 1e-3], ids=["2^-24", "1e-3"])
@pytest.mark.parametrize("name", list(CASES))
def test_skipped_mass_is_within_the_tolerance(name, tolerance):
    q, k, w, loo = case_inputs(name)
    plan = make_plan(q, k, w, tolerance, loo)
    assert plan is not None and plan.pairs < q.shape[1] * k.shape[1], "the plan skips nothing"
    mass = skipped_mass(plan, q, k, w, loo)
    assert mass.max() <= tolerance, f"a row skips {mass.max():.3g} > {tolerance:.3g}"


def test_outliers_and_queries_outside_the_keys():
    """A far outlier query, queries beyond both ends, and an outlier key."""
    k = torch.rand(1, 1200, 1, dtype=F64)
    k[0, 7] = 40.0  # an outlier key
    q = torch.cat(
        [torch.rand(1, 900, 1, dtype=F64), torch.tensor([[[-3.0], [5.0], [1e3]]], dtype=F64)], 1
    )
    w = torch.full((1, 1), 1e4, dtype=F64)
    plan = make_plan(q, k, w, 2.0**-24, False)
    assert skipped_mass(plan, q, k, w, False).max() <= 2.0**-24
    out = nwfast.nw_pool(q[0], k[0], torch.randn(1200, dtype=F64), 1e4)
    assert torch.isfinite(out).all()


def test_a_wide_key_is_never_skipped():
    q = torch.rand(1, 1000, 1, dtype=F64)
    k = torch.rand(1, 1000, 1, dtype=F64)
    w = torch.full((1, 1000), 1e4, dtype=F64)
    w[0, 123] = 1e-3  # one key reaching everywhere
    plan = make_plan(q, k, w, 2.0**-24, False)
    assert skipped_mass(plan, q, k, w, False).max() <= 2.0**-24
    wide = int(torch.nonzero(plan.order[1][0] == 123))
    for item in range(len(plan.key_ptr) - 1):
        spans = plan.key_spans[plan.key_ptr[item] : plan.key_ptr[item + 1]]
        assert any(start <= wide < end for start, end in spans)


@pytest.mark.parametrize(
    "why, change",
    [
        ("tolerance 0", lambda q, k, w: (q, k, w, 0.0)),
        ("negative w", lambda q, k, w: (q, k, -w, 2.0**-24)),
        (
            "NaN in a key",
            lambda q, k, w: (q, k.index_fill(1, torch.tensor([5]), math.nan), w, 2.0**-24),
        ),
        (
            "inf in a query",
            lambda q, k, w: (q.index_fill(1, torch.tensor([5]), math.inf), k, w, 2.0**-24),
        ),
        ("d = 5", lambda q, k, w: (q.repeat(1, 1, 5), k.repeat(1, 1, 5), w, 2.0**-24)),
        ("too small", lambda q, k, w: (q[:, :20], k[:, :40], w, 2.0**-24)),
        ("wide kernel", lambda q, k, w: (q, k, w * 1e-6, 2.0**-24)),
    ],
)
def test_dense_where_skipping_is_not_safe_or_does_not_pay(why, change):
    q, k, w, loo = case_inputs("uniform-1d")
    q, k, w, tolerance = change(q, k.clone(), w)
    assert make_plan(q, k, w, tolerance, False) is None, why


def test_orders_are_permutations_and_spans_are_consistent():
    q, k, w, _ = case_inputs("clusters-3d")
    plan = make_plan(q, k, w, 2.0**-24, False)
    for perm, size in zip(plan.order, (q.shape[1], k.shape[1])):
        assert torch.equal(perm[0].sort().values, torch.arange(size))
    # spans run ascending without overlap, and the transposed spans hold the
    # same (query block, key) pairs
    for ptr, spans in ((plan.key_ptr, plan.key_spans), (plan.query_ptr, plan.query_spans)):
        for item in range(len(ptr) - 1):
            runs = spans[ptr[item] : ptr[item + 1]]
            assert (runs[:, 0] < runs[:, 1]).all() and (runs[1:, 0] > runs[:-1, 1]).all()
    forward, transposed = set(), set()
    for item in range(len(plan.key_ptr) - 1):
        for start, end in plan.key_spans[plan.key_ptr[item] : plan.key_ptr[item + 1]]:
            forward |= {(item, j // plan.k_block) for j in range(start, end)}
    for item in range(len(plan.query_ptr) - 1):
        for start, end in plan.query_spans[plan.query_ptr[item] : plan.query_ptr[item + 1]]:
            transposed |= {(i // plan.q_block, item) for i in range(start, end)}
    assert forward == transposed
    packed = blocks.unpack(blocks.pack(plan, 1, q.shape[1], k.shape[1]))
    assert all(np.array_equal(a, b) for a, b in zip(packed[2:6], plan[2:6]))


def test_kd_leaves_keep_few_pairs_in_two_dimensions():
    q = torch.rand(1, 2**16, 2, dtype=F64)
    plan = make_plan(q, q, torch.full((1, 1), 1e4, dtype=F64), 2.0**-24, True, block=64)
    assert plan.pairs / 2**32 < 0.05


# --- the fused paths with skipping ---------------------------------------------


@pytest.mark.parametrize(
    "name", ["uniform-1d-perkey", "clusters-1d-loo", "normal-2d", "clusters-3d"]
)
def test_sparse_pool_is_exact_to_rounding(sparse_kernel, name, poisoned):
    q, k, w, loo = case_inputs(name)
    q, k, w = (x[0].float().to(sparse_kernel.device) for x in (q, k, w))
    w = w.reshape(-1) if w.numel() > 1 else w.reshape(())
    k = q.clone() if loo else k
    v = torch.randn(k.shape[0], 2, device=sparse_kernel.device)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, w)]
    out = nwfast.nw_pool(*leaves, exclude_self=loo, backend=sparse_kernel.name)
    g = torch.randn_like(out)
    out.backward(g)
    args = prepare_shared(q, k, v, w, loo)
    plan = sparse_kernel.module.make_plan(args.q, args.k, args.w, 0 if loo else None, 2.0**-24)
    assert plan is not None  # it skips a quarter of the pairs or more
    testing.assert_ok(
        testing.check_pool(out, q, k, v, w, loo),
        *testing.check_pool_gradients([x.grad for x in leaves], q, k, v, w, g, loo),
    )


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's exp underflow
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
def test_sparse_far_queries(sparse_kernel, dtype, poisoned):
    """Queries far from every key (10 bandwidths to 1e4 data units out) among
    ordinary ones: the plan still skips, and the rows that need it are redone
    exactly on their own spans, forward and backward."""
    h = 0.01
    k = torch.rand(900, 1, dtype=F64)
    far = torch.tensor([1 + 10 * h, -10 * h, 1 + 1e3 * h, -1e3 * h, 1 + 1e4, -1e4], dtype=F64)
    q = torch.cat([torch.rand(700, 1, dtype=F64), far[:, None]])[torch.randperm(706)]
    v = torch.randn(900, 2, dtype=F64)
    q, k, v = (x.to(sparse_kernel.device, dtype) for x in (q, k, v))
    w = torch.tensor(h**-2, dtype=dtype, device=sparse_kernel.device)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, w)]
    out = nwfast.nw_pool(*leaves, backend=sparse_kernel.name)
    g = torch.randn_like(out)
    out.backward(g)
    args = prepare_shared(q, k, v, w, False)
    assert sparse_kernel.module.make_plan(args.q, args.k, args.w, None, 2.0**-24) is not None
    testing.assert_ok(
        testing.check_pool(out, q, k, v, w),
        *testing.check_pool_gradients([x.grad for x in leaves], q, k, v, w, g),
    )


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
def test_gradients_of_tied_rows_within_the_skipped_share(sparse_kernel, dtype):
    """Leave-one-out over points tied on the integers at a small h: each row's
    weight is on its ties, and its dq and dk come from the next integers' keys
    alone, whose shares (2**-64 in float32, 2**-504 in float64) lie below the
    tolerance: what the plan leaves out of them is all of those gradients. They
    are within what the skipped share allows (the checks' ``tolerance``), and
    the dense pass's within rounding."""
    x = (torch.arange(400) % 20).to(F64)[:, None]
    log2_score = 60.0 if dtype == torch.float32 else 500.0  # the next integer's
    w = torch.tensor(2 * log2_score * math.log(2), dtype=dtype)
    q = x.to(sparse_kernel.device, dtype)
    v = torch.randn(400, 2, dtype=F64).to(sparse_kernel.device, dtype)
    g = torch.randn(400, 2, dtype=F64).to(sparse_kernel.device, dtype)
    args = prepare_shared(q, q, v, w, True)
    default = nwfast._checks.resolve_tolerance(None, dtype)
    assert sparse_kernel.module.make_plan(args.q, args.k, args.w, 0, default) is not None
    grads = {}
    for tolerance in (None, 0.0):
        leaves = [t.clone().requires_grad_() for t in (q, q, v, w)]
        out = nwfast.nw_pool(*leaves, exclude_self=True, backend=sparse_kernel.name,
                             tolerance=tolerance)  # fmt: skip
        grads[tolerance] = torch.autograd.grad(out, leaves, g)
        testing.assert_ok(
            testing.check_pool(out, q, q, v, w, True, tolerance=tolerance),
            *testing.check_pool_gradients(
                grads[tolerance], q, q, v, w, g, True, tolerance=tolerance
            ),
        )
    # judged by rounding alone, the skipping pass's dq and dk fail: the bound is needed
    rounding = testing.check_pool_gradients(grads[None], q, q, v, w, g, True)
    assert [v.ok for v in rounding] == [False, False, True, True]


def test_a_larger_tolerance_keeps_its_stated_bound(sparse_kernel):
    q, k, w, loo = case_inputs("clusters-2d")
    q, k = q[0].to(sparse_kernel.device), k[0].to(sparse_kernel.device)
    v = torch.randn(k.shape[0], 3, dtype=F64, device=sparse_kernel.device)
    out = nwfast.nw_pool(q, k, v, float(w), backend=sparse_kernel.name, tolerance=1e-3)
    exact = nwfast.nw_pool(q, k, v, float(w), backend=sparse_kernel.name, tolerance=0.0)
    bound = 2 * 1e-3 * v.norm(dim=-1).max()
    assert ((out - exact).norm(dim=-1) <= bound).all()
    assert not torch.equal(out, exact)  # something was skipped


def test_gradcheck_with_skipping():
    """float64 gradients and tangents through a block-sparse plan (on Numba:
    Triton's share the plan, and gradcheck under the interpreter takes minutes)."""
    # 6 blocks of 16 at h = 0.007: a plan keeps at most 2/3 of the pairs
    # (2000 draws), at 80 points and h = 0.016 it kept over 3/4 in 1 of 13
    x = torch.sort(torch.rand(96, dtype=F64)).values
    y = torch.randn(96, dtype=F64)
    w = torch.full((96,), 2e4, dtype=F64)
    inputs = [
        x.clone().requires_grad_(),
        x.clone().requires_grad_(),
        y.requires_grad_(),
        w.requires_grad_(),
    ]
    args = prepare_shared(*inputs, True)
    assert blocks.plan(args.q, args.k, args.w, 2.0**-53, True, 16, 16) is not None

    def pool(q, k, v, w):
        return nwfast.nw_pool(q, k, v, w, exclude_self=True, backend="numba")

    assert torch.autograd.gradcheck(pool, inputs, check_forward_ad=True)


def test_pairs_computed_counts_what_the_plan_sweeps(sparse_kernel):
    q, k, w, loo = case_inputs("clusters-1d-loo")  # per-key w, leave-one-out
    q, w = q[0].float().to(sparse_kernel.device), w[0].float().to(sparse_kernel.device)
    n = q.shape[0]
    count = nwfast.pairs_computed(q, q, w, exclude_self=True, backend=sparse_kernel.name)
    args = prepare_shared(q, q, q, w, True)
    plan = sparse_kernel.module.make_plan(args.q, args.k, args.w, 0, 2.0**-24)
    swept = sum(
        (end - start) * min(plan.q_block, n - t * plan.q_block)
        for t in range(len(plan.key_ptr) - 1)
        for start, end in plan.key_spans[plan.key_ptr[t] : plan.key_ptr[t + 1]]
    )
    assert count == plan.pairs == swept < n * n
    for dense in ({"tolerance": 0.0}, {"backend": "torch"}):
        assert nwfast.pairs_computed(q, q, w, exclude_self=True, **dense) == n * n


def test_a_plan_that_cannot_pay_is_not_made(monkeypatch):
    """The forecast from sampled pairs and the bandwidth abandons planning
    where too few pairs could go (a wide kernel on the data, or too few pairs
    in all), and lets it run where most pairs can go (the skipping goals'
    cases)."""
    monkeypatch.undo()  # the planner's thresholds as shipped
    wide = torch.rand(1, 16384, 1) * 5  # h = 0.7 on [0, 5)
    assert blocks._reach(blocks.survey(wide, wide, torch.tensor([[1.0]])), 2.0**-24, 64) > 0.9
    assert blocks.plan(wide, wide, torch.tensor([[1.0]]), 2.0**-24, False, 64, 64) is None
    narrow = torch.rand(1, 2**18, 1) * 5  # h = 0.01: about 2.4% of pairs kept
    assert blocks._reach(blocks.survey(narrow, narrow, torch.tensor([[1e4]])), 2.0**-24, 64) < 0.05
    square = torch.rand(1, 2**18, 2)  # the unit square, h = 0.01
    assert blocks._reach(blocks.survey(square, square, torch.tensor([[1e4]])), 2.0**-24, 64) < 0.05
    cube = torch.rand(1, 8192, 3) * 5  # h = 0.5: a plan would keep 93%, in whole blocks
    assert blocks._reach(blocks.survey(cube, cube, torch.tensor([[4.0]])), 2.0**-24, 64) > 0.9
    few = torch.rand(1, 2048, 1) * 5  # 2^22 pairs: fewer than planning costs
    assert blocks.plan(few, few, torch.tensor([[1e4]]), 2.0**-24, False, 64, 64) is None
    many = few[:, :1024], wide  # 2^24 pairs, h = 0.007
    assert blocks.plan(*many, torch.tensor([[1e4]]), 2.0**-24, False, 64, 64) is not None


def test_the_forecast_follows_the_data_not_its_extent(monkeypatch):
    """Normal points spread a few far ones over a wide extent, but most pairs
    lie close: the forecast samples pairs too, so at Silverman's bandwidth it
    comes within 0.1 of the fraction the plan keeps (about 3/4, too many to
    pay at 4096 points), where the extent alone forecast about 0.4."""
    monkeypatch.undo()  # the planner's thresholds as shipped
    x = torch.randn(1, 4096, 1, generator=torch.Generator().manual_seed(3))
    h = 1.06 * float(x.std()) * 4096**-0.2
    w = torch.tensor([[0.5 / h**2]])
    forecast = blocks._reach(blocks.survey(x, x, w), 2.0**-24, 64)
    assert blocks.plan(x, x, w, 2.0**-24, False, 64, 64) is None
    monkeypatch.setattr(blocks, "MIN_SAVED", 0)
    monkeypatch.setattr(blocks, "MAX_KEPT", 1.0)
    kept = blocks.plan(x, x, w, 2.0**-24, False, 64, 64).pairs / 4096**2
    assert abs(forecast - kept) < 0.1 and kept > 0.6
