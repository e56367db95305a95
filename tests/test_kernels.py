"""The kernel contract (``nwfast.kernels``), one table of cases for every backend.

Each case runs on Numba and on Triton (natively on CUDA, else under the
interpreter with its default tile and with small tiles), is judged by
``nwfast.testing`` against the float64 reference on the same inputs, and its
ids read like the case: ``B2-n45-m70-d3-c2-signed-float32``.
"""

import math
from typing import NamedTuple

import pytest
import torch

import nwfast
from nwfast import reference, testing

ALL = (True, True, True, True)
DTYPES = [torch.float32, torch.float64]


class Case(NamedTuple):
    B: int
    n: int
    m: int
    d: int
    c: int
    w: str  # "shared" (one w, (B, 1)), "perkey" (B, m) or "signed" (per key, some < 0)
    loo: bool = False  # exclude_self: the queries are the keys

    def __str__(self):
        batch = f"B{self.B}-" if self.B > 1 else ""
        return f"{batch}n{self.n}-m{self.m}-d{self.d}-c{self.c}-{self.w}" + (
            "-loo" if self.loo else ""
        )


CASES = [
    Case(1, 1, 1, 1, 1, "shared"),
    Case(1, 7, 33, 1, 1, "shared"),
    Case(3, 33, 7, 3, 2, "perkey"),
    Case(2, 45, 70, 3, 2, "signed"),
    Case(2, 70, 45, 1, 1, "perkey"),
    Case(1, 64, 300, 3, 2, "perkey"),
    Case(1, 2, 2, 2, 3, "shared", True),
    Case(1, 37, 37, 1, 1, "perkey", True),
    Case(2, 50, 50, 3, 2, "signed", True),
    Case(1, 300, 300, 1, 1, "shared", True),
    Case(1, 40, 2100, 1, 1, "shared"),  # several key tiles on every backend
    Case(1, 2100, 40, 2, 3, "perkey"),  # several query blocks
    Case(2, 45, 300, 2, 1, "signed"),
    Case(1, 300, 300, 2, 2, "perkey", True),
    Case(2, 60, 70, 4, 3, "perkey"),
    Case(1, 70, 70, 4, 1, "shared", True),
    Case(1, 40, 600, 4, 2, "signed"),
    Case(1, 50, 50, 5, 2, "perkey", True),  # past the per-d passes (numba: the general ones)
    Case(1, 30, 60, 2, 9, "shared"),  # more channels than the per-d passes take
]


def make(case, dtype, device):
    """Fresh inputs of ``dtype`` on ``device``: query, key, value, w, upstream."""
    q = torch.randn(case.B, case.n, case.d, dtype=torch.float64)
    k = q.clone() if case.loo else torch.randn(case.B, case.m, case.d, dtype=torch.float64)
    v = torch.randn(case.B, case.m, case.c, dtype=torch.float64)
    if case.w == "shared":
        w = 0.2 + torch.rand(case.B, 1, dtype=torch.float64)
    elif case.w == "perkey":
        w = 0.1 + torch.rand(case.B, case.m, dtype=torch.float64)
    else:  # any finite w is legal, negative included
        w = 0.5 * torch.randn(case.B, case.m, dtype=torch.float64)
    g = torch.randn(case.B, case.n, case.c, dtype=torch.float64)
    return [x.to(device, dtype) for x in (q, k, v, w, g)]


def diagonal(case):
    return 0 if case.loo else None


def run(kernel, case, q, k, v, w, g, tolerance=0.0, needs=ALL):
    out, lse, plan = kernel.module.forward(q, k, v, w, diagonal(case), tolerance)
    grads = kernel.module.backward(g, q, k, v, w, out, lse, diagonal(case), plan, needs)
    return out, lse, plan, grads


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_and_gradients(kernel, case, dtype, poisoned):
    q, k, v, w, g = make(case, dtype, kernel.device)
    out, lse, _, grads = run(kernel, case, q, k, v, w, g)
    assert out.dtype == dtype and lse.dtype == torch.float64 and out.shape == g.shape
    assert all(grad.dtype == dtype for grad in grads)
    assert grads[3].shape == w.shape
    testing.assert_ok(
        testing.check_pool(out, q, k, v, w, case.loo),
        testing.check_pool_lse(lse, q, k, v, w, case.loo),
        *testing.check_pool_gradients(grads, q, k, v, w, g, case.loo),
    )


@pytest.mark.parametrize("layout", ["dense", "loo", "sparse"])
def test_backward_and_tangent_sum_every_chunk_of_tiles(monkeypatch, layout, poisoned):
    """The float32 backward and tangent at d = c = 1 sum each pair's term over
    CHUNK_TILES tiles in float32 and add each chunk's sum in float64, at the
    end of each chunk and of each span: dq and the tangent on the query side,
    dk, dv and dw on the key side. Streamed tiles of 4 (chunks of 64) over 300
    points make four whole chunks and a part; with exclude_self a left-out
    pair sits in a tile of every chunk; with a plan, spans of either side hold
    more than a chunk and end inside one. Every gradient (dw a key) and the
    tangent are judged against the reference."""
    from nwfast.kernels import blocks, triton_nw

    # the interpreter's tiles (a GPU times its own configs)
    monkeypatch.setitem(triton_nw.INTERPRET_CONFIGS, "query", {"BLOCK_N": 16, "BLOCK_M": 4})
    monkeypatch.setitem(triton_nw.INTERPRET_CONFIGS, "key", {"BLOCK_N": 4, "BLOCK_M": 16})
    monkeypatch.setattr(blocks, "MIN_SAVED", 0)
    dev, f32, m = "cuda" if torch.cuda.is_available() else "cpu", torch.float32, 300
    k = torch.sort(20 * torch.rand(1, m, 1, dtype=torch.float64), dim=1).values
    loo = layout == "loo"
    q = k.clone() if loo else 20 * torch.rand(1, m, 1, dtype=torch.float64)
    v = torch.randn(1, m, 1, dtype=torch.float64)
    # one w a key, so that each key's dw is judged on its own
    w = (8.0 if layout == "sparse" else 0.05) * (1 + torch.rand(1, m, dtype=torch.float64))
    g = torch.randn(1, m, 1, dtype=torch.float64)
    q, k, v, w, g = (x.to(dev, f32) for x in (q, k, v, w, g))
    diagonal, tolerance = (0 if loo else None), (1e-6 if layout == "sparse" else 0.0)
    plan = triton_nw.make_plan(q, k, w, diagonal, tolerance)
    if layout == "sparse" and not torch.cuda.is_available():
        for spans in (plan.key_spans, plan.query_spans):
            length = spans[:, 1] - spans[:, 0]
            assert length.max() > 64 and (length % 64 != 0).any(), length
    else:
        assert plan is None or layout == "sparse"
    out, lse, plan = triton_nw.forward(q, k, v, w, diagonal, tolerance)
    grads = triton_nw.backward(g, q, k, v, w, out, lse, diagonal, plan, ALL)
    tangents = [torch.randn_like(x) for x in (q, k, v, w)]
    dout = triton_nw.tangent(q, k, v, w, tangents, out, lse, diagonal, plan)
    testing.assert_ok(
        testing.check_pool(out, q, k, v, w, loo, tolerance=tolerance),
        *testing.check_pool_gradients(grads, q, k, v, w, g, loo, tolerance=tolerance),
        testing.check_pool_tangent(dout, q, k, v, w, tangents, loo, tolerance=tolerance),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
# d > 1 with one channel (12, 15): the per-pair sum of the float32 tangent
@pytest.mark.parametrize("case", CASES[1:10:2] + CASES[12:19], ids=str)
def test_tangent(kernel, case, dtype, poisoned):
    q, k, v, w, _ = make(case, dtype, kernel.device)
    tangents = [torch.randn_like(x) for x in (q, k, v, w)]
    out, lse, plan = kernel.module.forward(q, k, v, w, diagonal(case), 0.0)
    for drop in range(5):  # all four tangents, then each one left out (None)
        some = [None if i == drop else t for i, t in enumerate(tangents)]
        dout = kernel.module.tangent(q, k, v, w, some, out, lse, diagonal(case), plan)
        testing.assert_ok(testing.check_pool_tangent(dout, q, k, v, w, some, case.loo))


@pytest.mark.parametrize(
    "needs",
    [(True, False, False, False), (False, True, False, False), (False, False, True, False)]
    + [(False, False, False, True), (False, True, True, False)],
    ids=lambda x: "".join("qkvw"[i] for i in range(4) if x[i]),
)
def test_needs_subset(kernel, needs):
    case = Case(2, 40, 40, 3, 2, "perkey", True)
    inputs = make(case, torch.float64, kernel.device)
    *_, full = run(kernel, case, *inputs)
    *_, part = run(kernel, case, *inputs, needs=needs)
    for name, need, a, b in zip("qkvw", needs, part, full):
        if need:
            testing.assert_close(a, b, 1e-13, name=f"d{name}")
        else:
            assert a is None


@pytest.mark.parametrize("case", [CASES[3], CASES[8]], ids=str)
def test_results_repeat_bit_for_bit(kernel, case):
    inputs = make(case, torch.float32, kernel.device)
    first = run(kernel, case, *inputs)
    second = run(kernel, case, *inputs)
    for a, b in zip((first[0], first[1], *first[3]), (second[0], second[1], *second[3])):
        assert torch.equal(a, b)


# --- extremes: each case is inputs (B = 1, canonical) that break naive arithmetic ---


def _line(m, dtype, device):
    k = torch.linspace(-1.0, 1.0, m, dtype=torch.float64)[None, :, None]
    return k.to(device, dtype)


def extreme(name, dtype, device):
    """(query, key, value, w, loo) for one named extreme case."""
    k = _line(40, dtype, device)
    v = torch.randn(1, 40, 2, dtype=torch.float64).to(device, dtype)
    q = torch.randn(1, 9, 1, dtype=torch.float64).to(device, dtype)
    full = lambda value: torch.full((1, 40), value, dtype=dtype, device=device)  # noqa: E731
    if name == "huge-w":
        # each query within 0.3 spacings of a key and 0.7 of the next: at w = 1e8 every
        # other key's score is lower by more than 1e4 (a query at a midpoint would
        # share its weight between two keys)
        spacing = 2.0 / 39
        offset = spacing * (0.6 * torch.rand(1, 9, 1, dtype=torch.float64) - 0.3)
        q = k[:, torch.randint(40, (9,))] + offset.to(device, dtype)
        return q, k, v, full(1e8), False
    if name == "far-queries":
        far = torch.tensor([-1e4, -1e3, 1e3, 2e4], dtype=dtype, device=device)[None, :, None]
        return far, k, v, full(1.0), False
    if name == "tiny-w":
        return q, k, v, full(1e-30), False
    if name == "zero-w":
        return q, k, v, full(0.0), False
    if name == "negative-w":
        return q, k, v, full(-3.0), False
    if name == "large-scores":  # a tight cluster of keys far from the queries
        cluster = 3.0 + 0.01 * torch.randn(1, 40, 1, dtype=torch.float64)
        return q, cluster.to(device, dtype), v, full(100.0), False
    if name == "all-equal":
        same = torch.full((1, 40, 1), 0.5, dtype=dtype, device=device)
        return same, same.clone(), v, full(3.0), True
    if name == "tied-loo":
        # 8 points at each of 0, 1, ..., 4, leave-one-out: each row's weight is on
        # its 7 ties, and the next value's share (about 2**-113 in float32,
        # 2**-1003 in float64) lies below the backward's flush cut yet is a
        # normal number, and dq comes from those shares alone
        tied = (torch.arange(40, dtype=torch.float64) % 5)[None, :, None].to(device, dtype)
        log2_share = -110.0 if dtype == torch.float32 else -1000.0
        return tied, tied.clone(), v, full(-2 * log2_share * math.log(2)), True
    if name == "duplicate-keys":
        return q, k.repeat_interleave(2, 1)[:, :40], v, full(30.0), False
    if name == "nan-query":
        q = q.clone()
        q[0, 4] = float("nan")
        return q, k, v, full(2.0), False
    if name == "nan-key":
        k = k.clone()
        k[0, 17] = float("nan")
        return q, k, v, full(2.0), False
    if name == "inf-value":
        v = v.clone()
        v[0, 5, 1] = float("inf")
        return q, k, v, full(2.0), False
    if name == "loo-nan-value":  # key i is removed from row i: its NaN stays out
        v = v.clone()
        v[0, 6, 0] = float("nan")
        return k, k.clone(), v, full(2.0), True
    if name == "loo-nan-key":
        keys = k.clone()
        keys[0, 11] = float("nan")
        return keys, keys.clone(), v, full(2.0), True
    raise ValueError(name)


EXTREMES = [
    "huge-w",
    "far-queries",
    "tiny-w",
    "zero-w",
    "negative-w",
    "large-scores",
    "all-equal",
    "duplicate-keys",
    "tied-loo",
    "nan-query",
    "nan-key",
    "inf-value",
    "loo-nan-value",
    "loo-nan-key",
]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's exp overflow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", EXTREMES)
def test_extremes(kernel, name, dtype, poisoned):
    q, k, v, w, loo = extreme(name, dtype, kernel.device)
    g = torch.randn(*q.shape[:2], v.shape[-1], dtype=dtype, device=kernel.device)
    case = Case(1, q.shape[1], k.shape[1], 1, 2, "perkey", loo)
    out, lse, _, grads = run(kernel, case, q, k, v, w, g)
    testing.assert_ok(
        testing.check_pool(out, q, k, v, w, loo),
        testing.check_pool_lse(lse, q, k, v, w, loo),
        *testing.check_pool_gradients(grads, q, k, v, w, g, loo),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_huge_w_and_far_queries_give_the_nearest_value(kernel, dtype):
    for name in ("huge-w", "far-queries"):
        q, k, v, w, _ = extreme(name, dtype, kernel.device)
        out, _, _ = kernel.module.forward(q, k, v, w, None, 0.0)
        nearest = (q[0, :, 0, None] - k[0, None, :, 0]).abs().argmin(-1)
        # every other key underflows (extreme() keeps queries off midpoints): the
        # nearest value, to its own rounding
        testing.assert_close(out[0], v[0, nearest], 4 * testing.UNIT_ROUNDOFF[dtype], name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shares_below_the_flush_cut_are_0_in_the_backward(dtype):
    """The CPU backward takes a share below 2**FLUSH_EXPONENT of its row as 0:
    where every other term of dq is 0 (ties), dq is then exactly 0 and the
    reference's is not, which the tolerance policy's floor admits."""
    q, k, v, w, loo = extreme("tied-loo", dtype, "cpu")
    leaves = [x.clone().requires_grad_() for x in (q, k, v, w)]
    out = nwfast.nw_pool(*leaves, exclude_self=loo, backend="numba", tolerance=0.0)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, g)
    exact = [x.double().requires_grad_() for x in (q, k, v, w)]
    ref_out, _ = reference.pool_and_lse(*exact, exclude_self=loo)
    ref_dq = torch.autograd.grad(ref_out, exact[0], g.double())[0]
    assert torch.equal(grads[0], torch.zeros_like(grads[0])) and (ref_dq != 0).all()
    testing.assert_ok(*testing.check_pool_gradients(grads, q, k, v, w, g, loo))
    # dk and dw too come from those shares alone; dv does not, and 1e-2 off fails
    off = [x * (1 + 1e-2) for x in grads]
    verdicts = testing.check_pool_gradients(off, q, k, v, w, g, loo)
    assert [v.ok for v in verdicts] == [True, True, False, True]
    # nor does the floor admit that where the shares are larger: w a tenth
    leaves = [x.clone().requires_grad_() for x in (q, k, v, w / 10)]
    out = nwfast.nw_pool(*leaves, exclude_self=loo, backend="numba", tolerance=0.0)
    off = [x * (1 + 1e-2) for x in torch.autograd.grad(out, leaves, g)]
    verdicts = testing.check_pool_gradients(off, q, k, v, w / 10, g, loo)
    assert not any(v.ok for v in verdicts)


# --- far from every key ----------------------------------------------------------
# Queries placed independently of the keys: inside the data, and 10, 1e3 and 1e6
# bandwidths (h = w**-1/2) beyond either end of it, and 1e4 data units away;
# one key, two, a tie (two keys at one place), many; w from 1e-12 to 1e6 (and
# 1e300 in float64), shared or per key. Leave-one-out cases hold far outliers
# among the points, whose rows are then far from every other key. Every score
# stays finite in the reference (where it would overflow the query is left out).
# In d = 2..4 the keys fill the unit cube and the far queries lie on a line
# through its centre, beyond either side, with a tie and many keys.

FAR_W = {torch.float32: [1e-12, 1e-4, 1.0, 1e3, 1e6], torch.float64: [1e-12, 1.0, 1e6, 1e300]}
FAR_KEYS = [1, 2, 3, 37]
FAR_BANDWIDTHS = [10.0, 1e3, 1e6]


class Far(NamedTuple):
    dtype: torch.dtype
    w: float
    m: int
    per_key: bool
    loo: bool
    d: int = 1

    def __str__(self):
        kind = "perkey" if self.per_key else "shared"
        dims = f"d{self.d}-" if self.d > 1 else ""
        return f"{dims}m{self.m}-w{self.w:g}-{kind}{'-loo' if self.loo else ''}-{self.dtype}"


FAR_CASES = [
    Far(dtype, w, m, per_key, loo)
    for dtype, scales in FAR_W.items()
    for w in scales
    for m in FAR_KEYS
    for per_key in (False, True)
    for loo in (False, True)
    if not loo or m >= 3
]
FAR_CASES_IN_D = [
    Far(dtype, w, m, (d + i) % 2 == 1, loo, d)
    for d in (2, 3, 4)
    for dtype, scales in FAR_W.items()
    for i, w in enumerate(scales)
    for m in (3, 37)
    for loo in (False, True)
]


def far_places(w, dtype):
    """Distances beyond the data ([0, 1]) at which a query is placed: several
    bandwidths and 1e4; those the dtype cannot tell from the data's edge, or
    whose scores would overflow the float64 reference, are dropped."""
    h = w**-0.5
    places = [b * h for b in FAR_BANDWIDTHS] + [1e4]
    limit = (torch.finfo(torch.float64).max / 8 / w) ** 0.5
    eps = torch.finfo(dtype).eps
    return [x for x in places if 4 * eps < x < limit]


def far_inputs(case, device):
    """(query, key, value, w) of shape (1, n, d), (1, m, d), (1, m, 2), (1, m) or (1, 1)."""
    f64 = torch.float64
    if case.m == 3:  # a tie: the first two keys share one place
        keys = torch.rand(2, case.d, dtype=f64)[[0, 0, 1]]
    else:
        keys = torch.rand(case.m, case.d, dtype=f64)
    places = far_places(case.w, case.dtype)
    if case.d == 1:
        far = torch.tensor([x for d in places for x in (1.0 + d, -d)], dtype=f64)[:, None]
    else:  # on a line through the cube's centre, beyond its corners
        direction = torch.rand(case.d, dtype=f64) + 0.5
        direction /= direction.norm()
        reach = torch.tensor([s * (case.d**0.5 + d) for d in places for s in (1, -1)], dtype=f64)
        far = 0.5 + reach[:, None] * direction
    if case.loo:  # the points are the keys, two of them far outliers
        keys = torch.cat([keys, far[-2:]])
        queries = keys
    else:
        queries = torch.cat([torch.rand(2, case.d, dtype=f64), far])
    m = keys.shape[0]
    w = torch.full((1,), case.w, dtype=f64)
    if case.per_key:
        w = case.w * (0.5 + torch.rand(m, dtype=f64))
    v = torch.randn(m, 2, dtype=f64)
    return [x.to(device, case.dtype) for x in (queries[None], keys[None], v[None], w[None])]


def check_far(module, device, case):
    """Forward, lse, every gradient and the tangent of a far-query case."""
    q, k, v, w = far_inputs(case, device)
    g = torch.randn(*q.shape[:2], 2, dtype=case.dtype, device=device)
    diag = 0 if case.loo else None
    out, lse, plan = module.forward(q, k, v, w, diag, 0.0)
    grads = module.backward(g, q, k, v, w, out, lse, diag, plan, ALL)
    tangents = [torch.randn_like(x) for x in (q, k, v, w)]
    dout = module.tangent(q, k, v, w, tangents, out, lse, diag, plan)
    testing.assert_ok(
        testing.check_pool(out, q, k, v, w, case.loo),
        testing.check_pool_lse(lse, q, k, v, w, case.loo),
        *testing.check_pool_gradients(grads, q, k, v, w, g, case.loo),
        testing.check_pool_tangent(dout, q, k, v, w, tangents, case.loo),
    )


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's exp underflow
@pytest.mark.parametrize("case", FAR_CASES, ids=str)
def test_far_queries(kernel, case, poisoned):
    """Queries far from every key, d = 1, on every backend."""
    check_far(kernel.module, kernel.device, case)


@pytest.mark.parametrize("case", FAR_CASES_IN_D, ids=str)
def test_far_queries_in_several_dimensions(case, poisoned):
    """Queries far from every key, d = 2..4, on the Numba kernels. (Triton's
    d > 1 kernels return NaN and inf for about half of these cases today: the
    1e4-unit queries in float32, w = 1e300 in float64; they join this family
    when they pass it.)"""
    from nwfast.kernels import numba_nw

    check_far(numba_nw, "cpu", case)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_far_queries_take_the_nearest_keys_values(kernel, dtype):
    """The textbook's keys, queries 1e3 and 1e4 out on either side: each gets
    its nearest key's value, a tie the mean of the two; the gradient of the
    values and the tangent along them follow the same weights. Exact, at every
    w up to 1e300, where the rounding bound of the family says little."""
    dev = kernel.device
    k = torch.linspace(0, 5, 100, dtype=dtype, device=dev)
    k = torch.cat([k, k[-1:]])[None, :, None]  # the last key twice: a tie beyond 5
    v = torch.randn(1, 101, 1, dtype=dtype, device=dev)
    q = torch.tensor([-1e4, 1e4, -1e3, 1e3], dtype=dtype, device=dev)[None, :, None]
    g = torch.randn(1, 4, 1, dtype=dtype, device=dev)
    dv_tangent = torch.randn_like(v)
    # the weights every far query should have: key 0, or the tie at 5 halved
    p = torch.zeros(4, 101, dtype=dtype, device=dev)
    p[[0, 2], 0] = 1.0
    p[[1, 3], 99:] = 0.5
    for w in [100.0, 1e3, 1e6] + ([1e300] if dtype == torch.float64 else []):
        w = torch.tensor([[w]], dtype=dtype, device=dev)
        out, lse, plan = kernel.module.forward(q, k, v, w, None, 0.0)
        grads = kernel.module.backward(g, q, k, v, w, out, lse, None, plan, (0, 0, 1, 0))
        tangents = [None, None, dv_tangent, None]
        dout = kernel.module.tangent(q, k, v, w, tangents, out, lse, None, plan)
        exact = 4 * testing.UNIT_ROUNDOFF[dtype]
        testing.assert_close(out[0], p @ v[0], exact, name=f"out, w={float(w)}")
        testing.assert_close(grads[2][0], p.T @ g[0], exact, name=f"dvalue, w={float(w)}")
        testing.assert_close(dout[0], p @ dv_tangent[0], exact, name=f"tangent, w={float(w)}")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's exp underflow
def test_rows_whose_shift_has_a_large_low_half(kernel, poisoned):
    """Float32 queries midway between two keys 7012 units either side, w = 1:
    each weight is exactly 1/2, and the row's lse, -(w/2) 7012^2 + ln 2, lies
    just under the exact-shift threshold, where its float32 split leaves a low
    half of -1.76 (log2 units): a weight factor of 3.4 where a pass drops it.
    In one batch element every query is such a row; in the other, two queries
    a million units out sit among them, at the end of one tile of streamed rows
    and the start of another (small tiles: 32 rows), so that a query-side
    program and a key-side tile hold both kinds, and others only midway rows.
    The rounding bound of the family says little at such scores (a score's
    rounding moves a weight by e^2), so out, the tangent along the values, dq,
    dk and dv are held to their exact values (the far rows': the nearest
    key's weight, 1), and everything to the reference."""
    a = 7012.0
    scaled_lse = (-0.5 * a * a + math.log(2)) / math.log(2)
    low = scaled_lse - float(torch.tensor(scaled_lse, dtype=torch.float32))
    assert 1.5 < abs(low) and abs(scaled_lse) < nwfast.kernels.EXACT_SHIFT_ABOVE[torch.float32]

    dev, f32, n = kernel.device, torch.float32, 100
    k = torch.tensor([-a, a], dtype=f32, device=dev).expand(2, 2)[..., None].contiguous()
    q = torch.zeros(2, n, 1, dtype=f32, device=dev)
    q[1, 31], q[1, 64] = 1.25e6, -1.5e6
    v = torch.randn(2, 2, 2, dtype=f32, device=dev)
    w = torch.ones(2, 1, dtype=f32, device=dev)
    g = torch.randn(2, n, 2, dtype=f32, device=dev)
    out, lse, plan = kernel.module.forward(q, k, v, w, None, 0.0)
    grads = kernel.module.backward(g, q, k, v, w, out, lse, None, plan, ALL)
    tangents = [torch.randn_like(x) for x in (q, k, v, w)]
    dout = kernel.module.tangent(q, k, v, w, tangents, out, lse, None, plan)
    dv_tangent = [None, None, tangents[2], None]
    dout_v = kernel.module.tangent(q, k, v, w, dv_tangent, out, lse, None, plan)
    testing.assert_ok(
        testing.check_pool(out, q, k, v, w, False),
        testing.check_pool_lse(lse, q, k, v, w, False),
        *testing.check_pool_gradients(grads, q, k, v, w, g, False),
        testing.check_pool_tangent(dout, q, k, v, w, tangents, False),
    )

    # the weights: 1/2 each midway, the nearer key's 1 out at +-1e6
    p = torch.full((2, n, 2), 0.5, dtype=f32, device=dev)
    p[1, 31], p[1, 64] = torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0])
    exact = 4 * testing.UNIT_ROUNDOFF[f32]
    testing.assert_close(out, p @ v, exact, name="out")
    testing.assert_close(dout_v, p @ tangents[2], exact, name="tangent along the values")
    u = testing.UNIT_ROUNDOFF[f32]
    testing.assert_close(grads[2], p.mT @ g, n * u, name="dv")
    # t_ij = p_ij g_i . (v_j - y_i): +-(1/4) g_i . (v_1 - v_2) midway, 0 out
    # far; dq_i = -w sum_j t_ij (q_i - k_j) and dk_j = w sum_i t_ij (q_i - k_j).
    # Rounding: a few u of each sum's terms before they cancel, p_ij |g_i|
    # (|v_j| + |y_i|) |q_i - k_j| (for a far row, the rounding of t, about
    # u |g| |v|, times its million-unit distance).
    p64, g64, v64, diff = p.double(), g.double(), v.double(), (q - k.mT).double()
    y64 = p64 @ v64
    t = p64 * (g64 @ v64.mT - (g64 * y64).sum(-1, keepdim=True))
    size = g64.abs() @ v64.abs().mT + (g64.abs() * y64.abs()).sum(-1, keepdim=True)
    size = p64 * size * diff.abs()
    for name, actual, expected, terms in (
        ("dq", grads[0][..., 0], -(t * diff).sum(-1), size.sum(-1)),
        ("dk", grads[1][..., 0], (t * diff).sum(-2), size.sum(-2)),
    ):
        excess = (actual.double() - expected).abs() - 16 * u * terms
        assert (excess <= 0).all(), f"{name}: {excess.max():.3g} past its rounding"


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's exp underflow
@pytest.mark.parametrize("case", [case for case in FAR_CASES if not case.loo], ids=str)
def test_far_queries_rows(kernel, case, poisoned):
    """The family in the rows layout: each query its own keys (those of the
    shared case, shuffled), forward, lse, gradients and tangent."""
    q, k, v, w = (x[0] for x in far_inputs(case, kernel.device))
    n, m = q.shape[0], k.shape[0]
    order = torch.rand(n, m).argsort(-1).to(kernel.device)
    q, keys, values = q[:, 0], k[:, 0][order], v[:, 0][order]
    g = torch.randn(n, dtype=case.dtype, device=kernel.device)
    out, lse = kernel.module.forward_rows(q, keys, values, w)
    grads = kernel.module.backward_rows(g, q, keys, values, w, out, lse, ALL)
    tangents = [torch.randn_like(x) for x in (q, keys, values, w)]
    dout = kernel.module.tangent_rows(q, keys, values, w, tangents, out, lse)
    testing.assert_ok(
        testing.check_rows(out, q, keys, values, w),
        testing.check_rows_lse(lse, q, keys, values, w),
        *testing.check_rows_gradients(grads, q, keys, values, w, g),
        testing.check_rows_tangent(dout, q, keys, values, w, tangents),
    )


# --- per-query rows ------------------------------------------------------------


ROWS_CASES = [(1, 1), (7, 33), (33, 7), (100, 333), (40, 2100)]


def make_rows(n, m, dtype, device, shared_w):
    q = torch.randn(n, dtype=torch.float64)
    keys = torch.randn(n, m, dtype=torch.float64)
    values = torch.randn(n, m, dtype=torch.float64)
    w = (
        0.3 + torch.rand(1, dtype=torch.float64)
        if shared_w
        else torch.randn(m, dtype=torch.float64)
    )
    g = torch.randn(n, dtype=torch.float64)
    return [x.to(device, dtype) for x in (q, keys, values, w, g)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shared_w", [True, False], ids=["shared", "signed"])
@pytest.mark.parametrize("shape", ROWS_CASES, ids=lambda s: f"n{s[0]}-m{s[1]}")
def test_rows(kernel, shape, shared_w, dtype, poisoned):
    q, keys, values, w, g = make_rows(*shape, dtype, kernel.device, shared_w)
    out, lse = kernel.module.forward_rows(q, keys, values, w)
    grads = kernel.module.backward_rows(g, q, keys, values, w, out, lse, ALL)
    tangents = [torch.randn_like(x) for x in (q, keys, values, w)]
    dout = kernel.module.tangent_rows(q, keys, values, w, tangents, out, lse)
    assert out.shape == (shape[0],) and grads[3].shape == w.shape
    testing.assert_ok(
        testing.check_rows(out, q, keys, values, w),
        testing.check_rows_lse(lse, q, keys, values, w),
        *testing.check_rows_gradients(grads, q, keys, values, w, g),
        testing.check_rows_tangent(dout, q, keys, values, w, tangents),
    )


def test_rows_needs_subset_and_repeat(kernel):
    q, keys, values, w, g = make_rows(70, 45, torch.float32, kernel.device, False)
    out, lse = kernel.module.forward_rows(q, keys, values, w)
    full = kernel.module.backward_rows(g, q, keys, values, w, out, lse, ALL)
    again = kernel.module.backward_rows(g, q, keys, values, w, out, lse, ALL)
    assert all(torch.equal(a, b) for a, b in zip(full, again))
    for i in range(4):
        needs = tuple(j == i for j in range(4))
        part = kernel.module.backward_rows(g, q, keys, values, w, out, lse, needs)
        assert all((part[j] is None) != (j == i) for j in range(4))
        testing.assert_close(part[i], full[i], 1e-6, name=f"subset {i}")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("where", ["query", "keys"])
def test_rows_nan_stays_in_its_row(kernel, where):
    q, keys, values, w, g = make_rows(50, 40, torch.float64, kernel.device, False)
    if where == "query":
        q[7] = float("nan")
    else:
        keys[7, 3] = float("nan")
    out, lse = kernel.module.forward_rows(q, keys, values, w)
    grads = kernel.module.backward_rows(g, q, keys, values, w, out, lse, ALL)
    assert out.isnan().nonzero().flatten().tolist() == [7]
    testing.assert_ok(
        testing.check_rows(out, q, keys, values, w),
        *testing.check_rows_gradients(grads, q, keys, values, w, g),
    )


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("case", [c for c in FAR_CASES if c.m == 37 and not c.loo][::3], ids=str)
def test_shards_share_the_gradients_of_far_queries(kernel, case):
    """The backward of each half of the keys, given the whole problem's out and
    lse (as ``nwfast.distributed`` calls it), gives that half's share: the
    halves' dq summed, and their dk, dv, dw side by side, are the gradients;
    far rows too, whose shift a shard cannot recompute from its own keys."""
    q, k, v, w = far_inputs(case, kernel.device)
    g = torch.randn(*q.shape[:2], 2, dtype=case.dtype, device=kernel.device)
    out, lse, _ = kernel.module.forward(q, k, v, w, None, 0.0)
    m = k.shape[1]
    halves = [slice(0, m // 2), slice(m // 2, m)]
    parts = []
    for part in halves:
        wp = w[:, part] if w.shape[-1] == m else w
        dense = kernel.module.forward(q, k[:, part], v[:, part], wp, None, 0.0)[2]
        parts.append(
            kernel.module.backward(
                g, q, k[:, part], v[:, part], wp, out, lse, None, dense, ALL, keys=m
            )
        )
    dq = parts[0][0] + parts[1][0]
    dk = torch.cat([p[1] for p in parts], 1)
    dv = torch.cat([p[2] for p in parts], 1)
    dw = torch.cat([p[3] for p in parts], 1) if w.shape[-1] == m else parts[0][3] + parts[1][3]
    testing.assert_ok(*testing.check_pool_gradients([dq, dk, dv, dw], q, k, v, w, g))
