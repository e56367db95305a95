"""Property-based tests: hypothesis draws the case, the reference judges it.

Shapes, batch dims, d and c, scalar or per-key w from 1e-8 to 1e4 and
negative, exclude_self, strided and stride-0 (expanded) inputs, data offset far
from 0, float32 and float64; forward and every gradient against the float64
reference through ``nwfast.testing``. A fixed example budget keeps CI in time;
``NWFAST_EXAMPLES`` runs more (and hypothesis prints any failing case).
"""

import os

import torch
from hypothesis import HealthCheck, given, settings
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


@st.composite
def cases(draw):
    batch = tuple(draw(st.lists(st.integers(1, 2), max_size=2)))
    n = draw(st.integers(1, 24))
    loo = draw(st.booleans()) and n > 1
    m = n if loo else draw(st.integers(1, 24))
    d = draw(st.one_of(st.none(), st.integers(1, 4))) if not batch else draw(st.integers(1, 4))
    c = draw(st.one_of(st.none(), st.integers(1, 3))) if not batch else draw(st.integers(1, 3))
    w_kind = draw(st.sampled_from(["float", "one-element", "per-key", "per-key-batch"]))
    log_w = draw(st.floats(-8, 4))
    negative = draw(st.booleans())
    return {
        "batch": batch,
        "n": n,
        "m": m,
        "d": d,
        "c": c,
        "loo": loo,
        "w_kind": w_kind,
        "w": (-1 if negative else 1) * 10**log_w,
        "offset": draw(st.sampled_from([0.0, 1e4])),
        "strided": draw(st.booleans()),
        "expanded": draw(st.booleans()),
        "dtype": draw(st.sampled_from([torch.float32, torch.float64])),
        "backend": draw(st.sampled_from(BACKENDS)),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


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
        return case["offset"] + spread * x

    q = points(n)
    k = q.clone() if case["loo"] else points(m)
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


@budget
@given(cases())
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
