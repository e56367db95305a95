"""Property-based tests: hypothesis draws the case, the reference judges it.

Shapes, batch dims, d and c, scalar or per-key w from 1e-12 to 1e6 (1e300 in
float64) and negative, exclude_self, strided and stride-0 (expanded) inputs,
queries among the keys, shifted with them far from 0, placed apart from them
up to 1e6 bandwidths away, or tied with them on the integers, float32 and
float64; forward, every gradient and the tangent against the float64 reference
through ``nwfast.testing``. The scale of w, the number of keys and the queries'
placement are strategies of their own, so that the shrinker reports a minimal
case. A fixed example budget keeps ``make test`` in time; ``NWFAST_EXAMPLES``
runs more (``make fuzz``), and hypothesis prints any failing case.
"""

import os

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import nwfast
from nwfast import testing

EXAMPLES = int(os.environ.get("NWFAST_EXAMPLES", "40"))
budget = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=False,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
BACKENDS = ["numba", "triton"]


# log10 of |w|: float32 from 1e-12 to 1e6, float64 up to 1e300.
LOG_W = {torch.float32: (-12.0, 6.0), torch.float64: (-12.0, 300.0)}
# Where the queries lie: among the keys (drawn like them), all shifted with the
# keys by one common offset, apart from them: 10**1 to 10**6 bandwidths beyond
# either end of the keys (capped where a score would overflow), or with the keys
# on the integers (ties among the keys and with the queries).
PLACEMENTS = ["with-keys", "common-offset", "apart", "tied"]


def log_w(dtype):
    """|w| as a power of ten, its own strategy so the shrinker can move it alone."""
    return st.floats(*LOG_W[dtype])


def key_counts():
    return st.integers(1, 24)


def placements():
    return st.tuples(st.sampled_from(PLACEMENTS), st.floats(1.0, 6.0), st.sampled_from([-1, 1]))


@st.composite
def cases(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    batch = tuple(draw(st.lists(st.integers(1, 2), max_size=2)))
    n = draw(st.integers(1, 24))
    loo = draw(st.booleans()) and n > 1
    m = n if loo else draw(key_counts())
    d = draw(st.one_of(st.none(), st.integers(1, 4))) if not batch else draw(st.integers(1, 4))
    c = draw(st.one_of(st.none(), st.integers(1, 3))) if not batch else draw(st.integers(1, 3))
    w_kind = draw(st.sampled_from(["float", "one-element", "per-key", "per-key-batch"]))
    negative = draw(st.booleans())
    # a negative w makes the farthest keys dominate: keep it to modest scales
    log_w_value = draw(log_w(dtype) if not negative else st.floats(-8.0, 4.0))
    return {
        "batch": batch,
        "n": n,
        "m": m,
        "d": d,
        "c": c,
        "loo": loo,
        "w_kind": w_kind,
        "w": (-1 if negative else 1) * 10**log_w_value,
        "placement": draw(placements()),
        "strided": draw(st.booleans()),
        "expanded": draw(st.booleans()),
        "dtype": dtype,
        "backend": draw(st.sampled_from(BACKENDS)),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def _apart(keys, w, bandwidths, side, dtype):
    """Query offsets that put every query ``bandwidths`` bandwidths beyond the
    keys' extent on ``side`` (along every feature), capped so that every score
    stays finite in the dtype."""
    h = abs(w) ** -0.5
    limit = 0.01 * (torch.finfo(dtype).max / abs(w)) ** 0.5
    extent = keys.abs().max().item() if keys.numel() else 0.0
    return side * min(extent + bandwidths * h, limit)


def build(case):
    """The case's tensors, in its dtype, with the layouts it asks for."""
    gen = torch.Generator().manual_seed(case["seed"])
    batch, n, m, d, c, dtype = (case[k] for k in ("batch", "n", "m", "d", "c", "dtype"))
    feature = () if d is None else (d,)
    # With a negative w the farthest keys dominate: keep the data's scale modest.
    spread = 1.0 if case["w"] > 0 else 0.3
    step = 2 if case["strided"] else 1  # every other row of a longer tensor

    def points(count):
        x = torch.randn(*batch, step * count, *feature, generator=gen, dtype=torch.float64)
        x = x[..., ::step, :] if d is not None else x[::step]
        return spread * x

    placement, bandwidths, side = case["placement"]
    q = points(n)
    k = q.clone() if case["loo"] else points(m)
    if placement == "tied":
        q, k = q.round(), k.round()
    elif placement == "common-offset":
        q, k = q + 1e4, k + 1e4
    elif placement == "apart" and not case["loo"]:
        q = q * 0.01 + _apart(k, case["w"], 10**bandwidths, side, dtype)
    v = torch.randn(*batch, m, *(() if c is None else (c,)), generator=gen, dtype=torch.float64)
    if case["expanded"] and v.dim() >= 2:  # one value row repeated: stride 0
        v = v[..., :1, :].expand(v.shape)
    w = abs(case["w"])
    scales = 0.5 + torch.rand(
        *((*batch, m) if case["w_kind"] == "per-key-batch" else (m,)), generator=gen
    )
    sign = -1.0 if case["w"] < 0 else 1.0
    w = {
        "float": sign * w,
        "one-element": torch.tensor([sign * w]),
        "per-key": sign * w * scales,
        "per-key-batch": sign * w * scales,
    }[case["w_kind"]]
    q, k, v = (x.to(dtype) for x in (q, k, v))
    if isinstance(w, torch.Tensor):
        w = w.to(dtype)
    return q, k, v, w


# One key far from its query at w = 1e171: the gradient is 0, a kernel's rounding
# makes it ~1e155 (within its bound), whose square overflows an unscaled norm.
FAR_SINGLE_KEY = {
    "batch": (1,),
    "n": 1,
    "m": 1,
    "d": 2,
    "c": 1,
    "loo": False,
    "w_kind": "float",
    "w": 1e171,
    "placement": ("with-keys", 1.0, -1),
    "strided": False,
    "expanded": False,
    "dtype": torch.float64,
    "backend": "numba",
    "seed": 0,
}


# Queries 13 bandwidths beyond the keys at w = 3e-10 in float32: d^2 ~ 5e11,
# whose rounding (u d^2 ~ 3e4 a pair) meets dw at first order.
FAR_TINY_W = {
    **FAR_SINGLE_KEY,
    "batch": (),
    "n": 17,
    "m": 6,
    "d": None,
    "c": None,
    "w_kind": "one-element",
    "w": 3.1622776601683795e-10,
    "placement": ("apart", 1.109375, -1),
    "strided": True,
    "dtype": torch.float32,
    "seed": 16777215,
}


# Leave-one-out on tied points, float64, w = 2000 ln 2: each row's weight is on
# its ties, the next integer's share about 2**-1000, below the backward's flush
# cut, and dq, dk and dw are made of those shares alone.
TIED_FLUSHED = {
    **FAR_SINGLE_KEY,
    "batch": (),
    "n": 24,
    "m": 24,
    "d": None,
    "c": 2,
    "loo": True,
    "w": 1386.2943611198906,
    "placement": ("tied", 1.0, 1),
    "seed": 7,
}


@budget
@given(cases())
@example(case=FAR_SINGLE_KEY)
@example(case={**FAR_SINGLE_KEY, "backend": "triton"})
@example(case=FAR_TINY_W)
@example(case=TIED_FLUSHED)
def test_nw_pool_forward_and_gradients(case):
    q, k, v, w = build(case)
    device = "cuda" if case["backend"] == "triton" and torch.cuda.is_available() else "cpu"
    q, k, v = (x.to(device) for x in (q, k, v))
    w = w.to(device) if isinstance(w, torch.Tensor) else w
    leaves = [
        x.detach().clone().requires_grad_() if isinstance(x, torch.Tensor) else x
        for x in (q, k, v, w)
    ]
    out = nwfast.nw_pool(*leaves, exclude_self=case["loo"], backend=case["backend"])
    g = torch.randn(
        out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(case["seed"] + 1)
    )
    out.backward(g.to(device))
    grads = [x.grad if isinstance(x, torch.Tensor) else None for x in leaves]
    testing.assert_ok(
        testing.check_pool(out, q, k, v, w, case["loo"]),
        *testing.check_pool_gradients(grads, q, k, v, w, g.to(device), case["loo"]),
    )


@budget
@given(cases())
@example(case=FAR_SINGLE_KEY)
@example(case=TIED_FLUSHED)
def test_tangent_matches_the_reference(case):
    case = {**case, "backend": "numba"}
    q, k, v, w = build(case)
    w = w if isinstance(w, torch.Tensor) else torch.tensor(w, dtype=q.dtype)
    gen = torch.Generator().manual_seed(case["seed"] + 2)
    tangents = [torch.randn(x.shape, dtype=x.dtype, generator=gen) for x in (q, k, v, w)]

    def pool(*xs):
        return nwfast.nw_pool(*xs, exclude_self=case["loo"])

    # forward mode cannot take a stride-0 (expanded) primal: torch's own limit
    _, dout = torch.func.jvp(pool, (q, k, v.contiguous(), w), tuple(tangents))
    testing.assert_ok(testing.check_pool_tangent(dout, q, k, v, w, tangents, case["loo"]))


def test_errors_whose_squares_overflow_are_measured():
    error = torch.tensor([8.7e154, -2.0e154], dtype=torch.float64)
    verdict = testing.compare(error, torch.zeros(2, dtype=torch.float64), 1e300)
    assert verdict.ok and abs(verdict.error / 8.9269e154 - 1) < 1e-4, verdict
    assert testing.relative_error(error, 2 * error) == 0.5
