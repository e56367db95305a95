"""One tolerance policy for every comparison with the float64 reference.

Every test and the benchmark's correctness column judge a result ``out`` against
``ref``, the float64 reference on the very same inputs (the inputs already hold
values of the tested dtype, so only the computation's own error is measured), by
one rule::

    NaN and +-inf in the same places, and  ||out - ref|| <= allowed

with ``||.||`` the 2-norm over the finite entries and

    allowed = max(TOLERANCE[dtype] * ||ref||,  what the case itself permits).

The first term is the fixed relative error a well-conditioned case meets (1e-5 in
float32, 1e-12 in float64, 1e-2 in half precision). The second keeps a result
that cancels, a mean near 0 of values of size 1 say, from failing for the
condition it has; it is computed, never guessed. Where a bound overflows
float64 (scores near 1e300), NaN/inf placement is what is judged.

* **Outputs** (``check_pool``, ``check_rows``): a rounding-error bound for
  softmax pooling. Computing ``y_i = sum_j p_ij v_j`` with unit roundoff u
  perturbs

  - the weighted sum and its normaliser by a small multiple of
    ``u * sum_j p_ij ||v_j||``: the magnitudes of the terms, not their sum;
  - each score by about ``u * |s_ij|`` (the product ``w/2 * ||q - k||^2``, and the
    exp's own rounding adds ``u``). Relative changes ``e_ij`` of the weights move
    ``y_i`` by ``sum_j p_ij e_ij (v_j - y_i)``, hence the term
    ``u * sum_j p_ij (1 + |s_ij|) ||v_j - y_i||``.

  ``allowed_i = ROUNDING_FACTOR * u * (both terms)``, in the 2-norm over rows.
  That is first order in the scores' rounding. Where it is not small
  (``ROUNDING_FACTOR u |s_ij| >= 1``: a query so far out that its distances to
  nearby keys round alike in the dtype) any key within that rounding of the
  best may carry the row, and the row may be off by the largest
  ``||v_j - y_i||`` among them (``_score_reach``).
  ``ROUNDING_FACTOR = 16`` is the depth of sequential summation the kernels' sums
  stay below (SIMD lanes and tiles cut the rest) with room for the polynomial
  exp (1.3 u) and the lse's rounding; measured errors sit between 0.01 and 0.3
  of the bound.
* **The log-sum-exp**: absolute, per row ``ROUNDING_FACTOR * u * (1 + sum_j
  p_ij |s_ij|)``.
* **Gradients** (``check_pool_gradients``, ``check_rows_gradients``): the
  larger of two. TORCH_FACTOR = 4 times the error of torch's own autograd of the
  reference in float32 (in the tested dtype for half precision), scaled by the
  ratio of unit roundoffs for float64, as flash-attention's tests do: the
  float32 run measures how hard the case is. And a rounding bound from the
  backward's own formula: the error of each ``t_ij = p_ij (g_i . v_j - delta_i)``
  is at most ``tau_ij = p_ij (1 + |s_ij|) ||g_i|| (||v_j|| + sum_k p_ik ||v_k||)``,
  and each gradient sums it times its own factor (``|w_j| ||q_i - k_j||`` for dq
  and dk, ``| ||q_i - k_j||^2 - r_i | / 2`` for dw with the kernel contract's
  distance shift r_i, ``p_ij (1 + |s_ij|) |g_i|`` for dv). dw also carries the
  rounding of the shifted distance itself, ``|t_ij| 4 u (d_ij^2 + |r_i|) / 2``,
  large beside the difference for a far query. The backward and forward-mode
  passes take a weight below 2^-100 of its row (2^-967 in float64) as 0, so each
  pair's rounding bound holds that share too: a gradient whose other terms are
  0 (a query whose nearest keys tie with it) is all such terms. Torch is exact
  by luck where a softmax is exactly one-hot, and an equally accurate kernel
  need not be.
  ``GRAD_TOLERANCE`` is the floor (1e-10 in float64).
* **Local-linear moments** (``check_moments``, ``check_moments_gradient``): the
  moments are a softmax pooling of the terms phi_ij (``nwfast.local_linear``),
  judged as outputs are. Their gradient in w_f sums ``t_ij (u_ijf^2 - r_if) / 2``
  with ``t_ij = p_ij (G_i . phi_ij - tbar_i)`` and r_if the row's mean of
  u_ijf^2, as the kernels do; its rounding bound is ``tau_ij = p_ij (1 +
  |s_ij|) (|G_i . phi_ij - tbar_i| + sum_k |G_ik phi_ijk| + |tbar_i|)`` times
  that factor, as for dw above.
* **Tangents** (forward mode, ``check_pool_tangent``): likewise, with the
  rounding bound ``sum_j p_ij (1 + |s_ij|) (||dv_j|| + |ds_ij| (||v_j - y_i|| +
  sum_k p_ik ||v_k||))``: the tangent pass takes the forward's rounded y_i, and
  its error (about u ||y_i||) meets every ds_ij, as delta_i's meets every
  t_ij in the gradients. That is what a far query's per-key dw tangent costs:
  ds_ij ~ dw_j d_ij^2 / 2 is huge, and v_j - y_i cancels for the dominant key.

For half-precision inputs the kernels compute in float32: u is float32's and the
result's own rounding, ``u_half * ||ref||``, is added.
"""

from typing import NamedTuple

import torch

from nwfast import reference
from nwfast._checks import resolve_tolerance
from nwfast.kernels import distance_shift
from nwfast.kernels.numba_exp import FLUSH_EXPONENT

F64 = torch.float64

UNIT_ROUNDOFF = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
}
# ||out - ref|| / ||ref|| that a well-conditioned case meets.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
GRAD_TOLERANCE = {**TOLERANCE, torch.float64: 1e-10}
ROUNDING_FACTOR = 16.0
TORCH_FACTOR = 4.0


class Verdict(NamedTuple):
    """One comparison: the error, what was allowed, and whether it passed."""

    name: str
    error: float
    allowed: float
    ok: bool
    detail: str = ""

    def __str__(self):
        mark = "ok" if self.ok else "FAILED"
        text = f"{self.name}: error {self.error:.3g}, allowed {self.allowed:.3g} [{mark}]"
        return f"{text} {self.detail}".rstrip()


def _f64(x):
    return x.detach().to("cpu", F64)


def _two_norm(x):
    """The 2-norm of x's entries, as a float. Scaled by the largest entry first:
    torch squares the entries as they are, and an error of 1e155 (a far query's
    gradient times w = 1e171) would read as inf."""
    x = _f64(x).flatten()
    scale = float(x.abs().max()) if x.numel() else 0.0
    if scale == 0.0 or scale == float("inf"):
        return scale
    return scale * float((x / scale).norm())


def compare(out, ref, allowed, name="result"):
    """``||out - ref|| <= allowed`` over finite entries, NaN/inf in the same places."""
    out, ref = _f64(out), _f64(ref)
    if out.shape != ref.shape:
        shapes = f"shape {tuple(out.shape)} != {tuple(ref.shape)}"
        return Verdict(name, float("inf"), allowed, False, shapes)
    for what, test in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        mismatch = test(out) != test(ref)
        if mismatch.any():
            where = mismatch.nonzero()[:5].tolist()
            count = int(mismatch.sum())
            detail = f"{what} placement differs at {count} entries, first {where}"
            return Verdict(name, float("inf"), allowed, False, detail)
    diff = (out - ref).where(torch.isfinite(ref), 0.0)
    error = _two_norm(diff)
    detail = ""
    if error > allowed:
        worst = int(diff.abs().flatten().argmax())
        at = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), diff.shape))
        got, want = float(out.flatten()[worst]), float(ref.flatten()[worst])
        detail = f"worst at {at}: {got:.9g} vs {want:.9g}"
    return Verdict(name, error, allowed, error <= allowed, detail)


def assert_ok(*verdicts):
    """Raise, listing every verdict, if any failed."""
    if not all(v.ok for v in verdicts):
        raise AssertionError("\n".join(str(v) for v in verdicts))


def relative_error(out, ref):
    """||out - ref|| / ||ref|| over the finite entries of ref, in float64."""
    out, ref = _f64(out), _f64(ref)
    finite = torch.isfinite(ref)
    scale = _two_norm(ref[finite])
    diff = _two_norm(out[finite] - ref[finite])
    return diff / scale if scale > 0 else diff


def assert_close(out, ref, tolerance=None, name="result"):
    """A fixed relative tolerance, for identities that have no error model of their
    own (weights summing to 1, two paths that must agree): TOLERANCE by default."""
    tolerance = TOLERANCE[out.dtype] if tolerance is None else tolerance
    assert_ok(compare(out, ref, tolerance * max(_norm(ref), 1e-300), name))


def _norm(x):
    x = _f64(x)
    return _two_norm(x[torch.isfinite(x)])


def _compute_roundoff(dtype):
    """u of the arithmetic (half precision accumulates in float32)."""
    return UNIT_ROUNDOFF[F64 if dtype == F64 else torch.float32]


def _bound_norm(bound, ref):
    """||bound|| over the entries whose reference is finite (a NaN or inf row is
    judged by its placement alone). A bound that overflows float64 there is
    inf: the rounding that case permits is more than float64 can state (scores
    near 1e300), and its placement is what is left to judge."""
    bound, judged = _f64(bound), torch.isfinite(_f64(ref))
    while judged.dim() > bound.dim():
        judged = judged.all(-1)
    return _two_norm(torch.where(judged, bound.nan_to_num(nan=0.0), 0.0))


def _allowed(ref, bound, dtype, tolerance=TOLERANCE):
    """max(tolerance * ||ref||, ROUNDING_FACTOR * u * ||bound||), plus the
    rounding of a half-precision result."""
    case = ROUNDING_FACTOR * _compute_roundoff(dtype) * _bound_norm(bound, ref)
    if dtype not in (torch.float32, F64):
        case += UNIT_ROUNDOFF[dtype] * _norm(ref)
    return max(tolerance[dtype] * _norm(ref), case)


# --- the cases, one entry per (query, key) pair ----------------------------------


def _as_f64(*tensors):
    return [_f64(x) if isinstance(x, torch.Tensor) else x for x in tensors]


class _Pairs(NamedTuple):
    """A case in float64, one entry per (query, key) pair: (..., n, m, ...)."""

    diff: torch.Tensor  # q_i - k_j, (..., n, m, d)
    scores: torch.Tensor  # (..., n, m), -inf where a key is left out
    values: torch.Tensor  # v_j for each pair, (..., n, m, c)
    w: torch.Tensor  # broadcastable to (..., n, m)
    out: torch.Tensor  # the reference output with a channel dim, (..., n, c)
    lse: torch.Tensor  # (..., n)
    dtype: torch.dtype  # the tested dtype

    @property
    def weights(self):
        return torch.softmax(self.scores, dim=-1)

    @property
    def rounding(self):
        """p_ij (1 + |s_ij|), plus the weights the arithmetic flushes to zero
        (below its smallest normal number, in units of its roundoff); 0 for a
        left-out key, NaN or not."""
        compute = F64 if self.dtype == F64 else torch.float32
        flushed = torch.finfo(compute).tiny / UNIT_ROUNDOFF[compute]
        p = self.weights
        return torch.where(self.scores > -torch.inf, p * (1 + self.scores.abs()) + flushed, 0.0)

    @property
    def backward_rounding(self):
        """``rounding``, with the shares that the backward and forward-mode
        passes take as 0: below 2**FLUSH_EXPONENT of the row's total
        (``numba_exp.exp2_flush``), which is all such a term of a gradient can
        be wrong by, though the other terms of its sum be 0 (a query whose
        nearest keys all tie with it)."""
        compute = "float64" if self.dtype == F64 else "float32"
        share = 2.0 ** FLUSH_EXPONENT[compute] / UNIT_ROUNDOFF[getattr(torch, compute)]
        return torch.where(self.scores > -torch.inf, self.rounding + share, 0.0)

    @property
    def keys(self):
        """How many keys each row's softmax holds."""
        return torch.isfinite(self.scores).sum(-1) + torch.isnan(self.scores).sum(-1)


def _points(x):
    return x[:, None] if x.dim() == 1 else x


def _shared_pairs(query, key, value, w, exclude_self):
    q, k, v, w = _as_f64(query, key, value, w)
    out, lse = reference.pool_and_lse(q, k, v, w, exclude_self)
    q, k = _points(q), _points(k)
    if v.dim() == 1:
        v, out = v[:, None], out[..., None]
    diff = q[..., :, None, :] - k[..., None, :, :]
    diff = reference._masked_differences(diff, exclude_self)
    scores = reference._masked_scores(diff, w, exclude_self)
    values = v[..., None, :, :].expand(*scores.shape, v.shape[-1])
    return _Pairs(diff, scores, values, reference._per_key(w, scores), out, lse, query.dtype)


def _rows_pairs(query, keys, values, w):
    q, K, V, w = _as_f64(query, keys, values, w)
    out, lse = reference.rows_and_lse(q, K, V, w)
    w = torch.as_tensor(w, dtype=F64).reshape(1, -1)
    diff = (q[:, None] - K)[..., None]
    scores = -(w / 2) * diff[..., 0] ** 2
    return _Pairs(diff, scores, V[..., None], w, out[:, None], lse, query.dtype)


def _output_bound(pairs):
    """Per row: sum_j p_ij ||v_j|| + sum_j p_ij (1 + |s_ij|) ||v_j - y_i||."""
    p = pairs.weights
    used = p > 0
    size = pairs.values.norm(dim=-1)
    spread = (pairs.values - pairs.out[..., None, :]).norm(dim=-1)
    magnitude = torch.where(used, p * size, 0.0).sum(-1)
    rounding = (pairs.rounding * torch.where(used, spread, 0.0)).sum(-1)
    return (magnitude + rounding).nan_to_num(nan=0.0, posinf=0.0)


def _lse_bound(pairs):
    p = pairs.weights
    spread = torch.where(p > 0, p * pairs.scores.abs(), 0.0).sum(-1)
    return (1 + spread).nan_to_num(nan=0.0, posinf=0.0)


# --- outputs and log-sum-exps ----------------------------------------------------


def _probe_dtype(dtype):
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32


def _score_reach(pairs):
    """Per row: where the scores' own rounding, ROUNDING_FACTOR u (1 + |s_ij|),
    reaches 1 or more (a query so far out that its distances to nearby keys
    round alike), no first-order bound holds: any key whose score lies within
    that rounding of the row's best may carry the row. The largest
    ||v_j - y_i|| among them; 0 for a row in the first-order regime."""
    slack = ROUNDING_FACTOR * _compute_roundoff(pairs.dtype) * (1 + pairs.scores.abs())
    best = pairs.scores.nan_to_num(nan=-torch.inf).max(-1, keepdim=True).values
    best_slack = torch.where(pairs.scores == best, slack, 0.0).max(-1, keepdim=True).values
    near = pairs.scores + slack + best_slack >= best
    spread = (pairs.values - pairs.out[..., None, :]).norm(dim=-1)
    reach = torch.where(near & torch.isfinite(spread), spread, 0.0).max(-1).values
    return torch.where(best_slack[..., 0] >= 1, reach, 0.0)


def _output_allowed(ref, pairs, dtype):
    """The first-order rounding bound, plus the reach of rows beyond it."""
    beyond = _bound_norm(_score_reach(pairs), ref)
    return _allowed(ref, _output_bound(pairs), dtype) + beyond


def check_pool(out, query, key, value, w, exclude_self=False, name="out", tolerance=0.0):
    """Judge a shared-keys result against the float64 reference of its inputs.

    ``exclude_self`` is a bool, or per-row key indices to leave out (-1: none), as
    in ``reference.pool_and_lse``: that judges a subset of the query rows (pass
    those rows of ``query`` and ``out`` and their own indices) with leave-one-out.
    ``tolerance``: that of the call, whose skipped keys may move each row by
    twice its share times the largest ||v_j|| (as ``check_pool_gradients``).
    """
    pairs = _shared_pairs(query, key, value, w, exclude_self)
    ref = pairs.out.reshape(out.shape)
    allowed = _output_allowed(ref, pairs, out.dtype)
    share = _skipped_share(tolerance, query.dtype)
    if share:
        size = torch.where(pairs.weights > 0, pairs.values.norm(dim=-1), 0.0)
        allowed = allowed + _bound_norm(2 * share * size.amax(-1), ref)
    return compare(out, ref, allowed, name)


def check_pool_lse(lse, query, key, value, w, exclude_self=False, dtype=None, name="lse"):
    """The kernels' log-sum-exp (float64) for inputs of ``dtype`` (the query's)."""
    pairs = _shared_pairs(query, key, value, w, exclude_self)
    dtype = dtype or query.dtype
    return compare(lse, pairs.lse, _allowed(pairs.lse * 0, _lse_bound(pairs), dtype), name)


def check_rows(out, query, keys, values, w, name="out"):
    """Judge a per-query-rows result against the float64 reference of its inputs."""
    pairs = _rows_pairs(query, keys, values, w)
    ref = pairs.out[:, 0]
    return compare(out, ref, _output_allowed(ref, pairs, out.dtype), name)


def check_rows_lse(lse, query, keys, values, w, name="lse"):
    pairs = _rows_pairs(query, keys, values, w)
    return compare(lse, pairs.lse, _allowed(pairs.lse * 0, _lse_bound(pairs), query.dtype), name)


def _moment_pairs(query, key, value, w, exclude_self):
    """The local-linear moments as a pooling: values phi_ij, outputs the moments."""
    q, k, v, w = _as_f64(query, key, value, w)
    out, lse = reference.moments_reference(q, k, v, w, exclude_self)
    u, scores, _ = reference.local_linear_scores(q, k, w, exclude_self)
    phi = reference.moment_terms(u, v)
    return _Pairs(-u, scores, phi, w, out, lse, query.dtype)


def check_moments(moments, lse, query, key, value, w, exclude_self=False):
    """Judge the local-linear moments (n, P) and their lse (n,) of these inputs
    (query (n, d), key (m, d), value (m, c), w (d,))."""
    pairs = _moment_pairs(query, key, value, w, exclude_self)
    lse_allowed = _allowed(pairs.lse * 0, _lse_bound(pairs), query.dtype)
    return (
        compare(moments, pairs.out, _output_allowed(pairs.out, pairs, query.dtype), "moments"),
        compare(lse, pairs.lse, lse_allowed, "lse"),
    )


def check_moments_gradient(grad_w, query, key, value, w, upstream, exclude_self=False):
    """Judge the gradient in w (d,) of the moments against upstream (n, P)."""
    pairs = _moment_pairs(query, key, value, w, exclude_self)
    roundoff = _compute_roundoff(grad_w.dtype)
    p = pairs.weights
    used = p > 0
    G = _f64(upstream)[:, None, :]
    a = (G * pairs.values).sum(-1)
    tbar = (G[:, 0] * pairs.out).sum(-1, keepdim=True)
    size = (G * pairs.values).abs().sum(-1) + tbar.abs()
    tau = torch.where(used, pairs.rounding * ((a - tbar).abs() + size), 0.0)
    u2 = torch.where(used[..., None], pairs.diff**2, 0.0)
    r = (p[..., None] * u2).sum(-2, keepdim=True)
    # As for dw: the difference of two rounded numbers, and the float64
    # reference's own error, which sums t_ij u_ijf^2 unshifted.
    factor = (u2 - r).abs() + 4 * roundoff * (u2 + r.abs()) + UNIT_ROUNDOFF[F64] / roundoff * u2
    floor = 0.5 * (tau[..., None] * factor).sum((0, 1))
    return check_gradients(
        [None, None, None, grad_w],
        reference.moments_reference,
        [query, key, value, w],
        upstream,
        ("query", "key", "value", "w"),
        floors=[None, None, None, floor],
        exclude_self=exclude_self,
    )


# --- gradients and tangents ------------------------------------------------------


def check_gradients(grads, reference_fn, inputs, upstream, names, floors=None, **kwargs):
    """Judge gradients of ``reference_fn(*inputs, **kwargs)`` against float64 autograd.

    ``grads`` holds the tested gradients (None where not computed), in the order of
    ``inputs`` and ``names``; ``upstream`` is the output's upstream gradient;
    ``floors`` optional rounding bounds (see the module doc), one per input.
    """
    dtype = next(g.dtype for g in grads if g is not None)
    probe = _probe_dtype(dtype)
    exact = _autograd(reference_fn, inputs, upstream, F64, "cpu", kwargs)
    device = next(x.device for x in inputs if isinstance(x, torch.Tensor))
    estimate = _autograd(reference_fn, inputs, upstream, probe, device, kwargs)
    floors = floors or [None] * len(names)
    verdicts = []
    for name, got, want, rough, floor in zip(names, grads, exact, estimate, floors):
        if got is not None:
            want = want.reshape(got.shape)
            allowed = _probe_allowed(want, rough, floor, dtype, probe, GRAD_TOLERANCE)
            verdicts.append(compare(got, want, allowed, f"grad of {name}"))
    return verdicts


def _probe_error(want, rough, dtype, probe):
    """TORCH_FACTOR times the probe's error, scaled to dtype's roundoff. Where
    the probe is NaN or inf and the reference is not, it tells nothing: 0."""
    diff = _f64(rough.reshape(want.shape)) - _f64(want)
    error = _two_norm(torch.where(torch.isfinite(diff), diff, 0.0))
    return TORCH_FACTOR * UNIT_ROUNDOFF[dtype] / UNIT_ROUNDOFF[probe] * error


def _probe_allowed(want, rough, floor, dtype, probe, tolerance):
    """The larger of TORCH_FACTOR times the probe's error (scaled to dtype) and
    the rounding bound, above the fixed tolerance."""
    allowed = max(tolerance[dtype] * _norm(want), _probe_error(want, rough, dtype, probe))
    if floor is not None:
        allowed = max(allowed, _allowed(want * 0, floor, dtype, tolerance))
    return allowed


def _autograd(fn, inputs, upstream, dtype, device, kwargs):
    leaves = [
        x.detach().to(device, dtype).requires_grad_() if isinstance(x, torch.Tensor) else x
        for x in inputs
    ]
    out = fn(*leaves, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    out.backward(upstream.detach().to(out.device, out.dtype))
    return [
        (x.grad if x.grad is not None else torch.zeros_like(x)).detach()
        if isinstance(x, torch.Tensor)
        else None
        for x in leaves
    ]


def _pair_floors(pairs, upstream, shared_w, roundoff):
    """Per-pair rounding bounds of the gradients (see the module doc): the terms
    of dq and dk (summed over keys and over queries), of dv and of dw."""
    p = pairs.weights
    used = p > 0
    g = upstream[..., None] if upstream.dim() < pairs.out.dim() else upstream
    g_size = g.norm(dim=-1)
    v_size = torch.where(used, pairs.values.norm(dim=-1), 0.0)
    a = (p * v_size).sum(-1)
    size = g_size[..., None] * (v_size + a[..., None])  # bounds |g_i . (v_j - y_i)|
    tau = pairs.backward_rounding * size
    dist = torch.where(used, pairs.diff.norm(dim=-1), 0.0)
    dist2 = dist * dist
    distance_rounding = 0.0
    if shared_w:
        shift = distance_shift(pairs.lse, pairs.w[..., 0], pairs.keys)[..., None]
        # The shifted distance is a difference of two rounded numbers, a few u
        # (d^2 + |r|) off, and r = -2 (lse - log m) / w carries the lse's own
        # error divided by w: that matters where the difference is ~0.
        lse_error = 2 * roundoff * _lse_bound(pairs)[..., None] / pairs.w.abs()
        # Those few u (d^2 + |r|) also meet t_ij itself, not only its rounding:
        # |t_ij| 4 u (d^2 + |r|), first order (queries 13 bandwidths out at
        # w = 3e-10: d^2 ~ 5e11, u d^2 ~ 3e4 in float32), in the floor over
        # what _allowed multiplies it by.
        t = (g[..., None, :] * (pairs.values - pairs.out[..., None, :])).sum(-1)
        t_size = torch.where(used, p * t.abs(), 0.0)
        distance_rounding = t_size * 4 * (dist2 + shift.abs()) / ROUNDING_FACTOR
        # The float64 reference sums t_ij d_ij^2 unshifted: its own error, about
        # u64 sum |t_ij| d_ij^2, is as far as it can judge (queries ~1e12 out).
        reference_error = UNIT_ROUNDOFF[F64] / roundoff * dist2
        dist2 = (dist2 - shift).abs() + 4 * roundoff * (dist2 + shift.abs()) + lse_error
        dist2 = dist2 + reference_error
    pair_q = tau * pairs.w.abs() * dist
    pair_v = pairs.backward_rounding[..., None] * g[..., None, :].abs()
    pair_w = 0.5 * (tau * dist2 + distance_rounding)
    # what a pair would move each gradient by at a weight of 1: a row's skipped
    # keys (weights summing to at most the tolerance) move it by that much
    unit_q = size * pairs.w.abs() * dist
    unit_v = used[..., None] * g[..., None, :].abs()
    unit_w = torch.where(used, 0.5 * size * dist2, 0.0)
    return (pair_q, pair_v, pair_w), (unit_q, unit_v, unit_w)


def _skipped_share(tolerance, dtype):
    """The share of each row's weight a call with ``tolerance`` may leave out."""
    return resolve_tolerance(tolerance, dtype)


def _w_size(w):
    return tuple(w.shape) if isinstance(w, torch.Tensor) else ()


def _roundoff_of(tensors):
    return _compute_roundoff(next(t.dtype for t in tensors if t is not None))


def check_pool_gradients(
    grads, query, key, value, w, upstream, exclude_self=False, tolerance=0.0
):  # fmt: skip
    """Judge (dquery, dkey, dvalue, dw) of ``nw_pool`` on these inputs.

    ``tolerance``: that of the call (``None``, its default, is the dtype's
    rounding). Each row may then leave out keys holding up to that share of its
    weight, and each gradient may miss what those keys would add: a row's dq
    at most the share times its largest term at a weight of 1, dk, dv and a
    per-key dw a share of every row's term, and that alone where the kept
    terms cancel (a query whose nearest keys tie with it). 0 judges a dense
    result by rounding alone."""
    pairs = _shared_pairs(query, key, value, w, exclude_self)
    w_size = _w_size(w)
    shared_w = w_size in ((), (1,)) or w_size[-1:] == (1,)
    roundoff = _roundoff_of(grads)
    (pair_q, pair_v, pair_w), unit = _pair_floors(pairs, _f64(upstream), shared_w, roundoff)
    floors = [pair_q.sum(-1), pair_q.sum(-2), pair_v.sum(-3), pair_w.sum(-2)]
    share = _skipped_share(tolerance, query.dtype) / (ROUNDING_FACTOR * roundoff)
    if share:
        unit_q, unit_v, unit_w = (share * x for x in unit)
        floors[0] = floors[0] + unit_q.amax(-1)
        floors[1] = floors[1] + unit_q.sum(-2)
        floors[2] = floors[2] + unit_v.sum(-3)
        floors[3] = floors[3] + (unit_w.amax(-1, True).sum(-2) if shared_w else unit_w.sum(-2))
    floors[3] = floors[3].sum_to_size(w_size)
    return check_gradients(
        grads,
        reference.pool_and_lse,
        [query, key, value, w],
        upstream,
        ("query", "key", "value", "w"),
        floors=floors,
        exclude_self=exclude_self,
    )


def check_rows_gradients(grads, query, keys, values, w, upstream):
    """Judge (dquery, dkeys, dvalues, dw) of ``nw_pool_rows`` on these inputs."""
    pairs = _rows_pairs(query, keys, values, w)
    shared_w = _w_size(w) in ((), (1,))
    (pair_q, pair_v, pair_w), _ = _pair_floors(pairs, _f64(upstream), shared_w, _roundoff_of(grads))
    floors = [pair_q.sum(-1), pair_q, pair_v[..., 0], pair_w.sum(-2).sum_to_size(_w_size(w))]
    return check_gradients(
        grads,
        reference.rows_and_lse,
        [query, keys, values, w],
        upstream,
        ("query", "keys", "values", "w"),
        floors=floors,
    )


def _jvp(fn, inputs, tangents, dtype, device, kwargs):
    # contiguous: forward mode cannot take a stride-0 (expanded) primal
    primals = tuple(x.detach().to(device, dtype).contiguous() for x in inputs)
    dual = tuple(
        torch.zeros_like(x) if t is None else t.detach().to(device, dtype)
        for x, t in zip(primals, tangents)
    )
    return torch.func.jvp(lambda *a: fn(*a, **kwargs)[0], primals, dual)[1]


def _check_tangent(dout, fn, inputs, tangents, pairs, ds, dv, name, share=0.0, **kwargs):
    """dv: ||dv_j|| for each pair (..., n, m), or 0; share: what each row may
    leave out of its weight (``check_pool_gradients``' tolerance)."""
    dtype = dout.dtype
    probe = _probe_dtype(dtype)
    exact = _jvp(fn, inputs, tangents, F64, "cpu", kwargs)
    rough = _jvp(fn, inputs, tangents, probe, inputs[0].device, kwargs)
    p = pairs.weights
    used = p > 0
    size = torch.where(used, pairs.values.norm(dim=-1), 0.0)
    spread = (pairs.values - pairs.out[..., None, :]).norm(dim=-1)
    spread = spread + (p * size).sum(-1, keepdim=True)
    term = torch.where(used, dv + ds.abs() * spread, 0.0)
    bound = (pairs.backward_rounding * term).sum(-1)
    bound = bound + share / (ROUNDING_FACTOR * _compute_roundoff(dtype)) * term.amax(-1)
    allowed = _probe_allowed(exact.reshape(dout.shape), rough, bound, dtype, probe, GRAD_TOLERANCE)
    return compare(dout, exact.reshape(dout.shape), allowed, name)


def check_pool_tangent(
    dout, query, key, value, w, tangents, exclude_self=False, name="tangent", tolerance=0.0
):  # fmt: skip
    """Judge the forward-mode derivative of ``nw_pool`` along ``tangents``
    (dquery, dkey, dvalue, dw; None for zero) against float64 ``torch.func.jvp``;
    ``tolerance`` as in ``check_pool_gradients``."""
    pairs = _shared_pairs(query, key, value, w, exclude_self)
    dq, dk, _, dw = (None if t is None else _f64(t) for t in tangents)
    ds = torch.zeros_like(pairs.scores)
    if dq is not None or dk is not None:
        dq = torch.zeros_like(_f64(_points(query))) if dq is None else _points(dq)
        dk = torch.zeros_like(_f64(_points(key))) if dk is None else _points(dk)
        ds = ds - pairs.w * (pairs.diff * (dq[..., :, None, :] - dk[..., None, :, :])).sum(-1)
    if dw is not None:
        dw_pairs = reference._per_key(dw, pairs.scores)
        ds = ds - 0.5 * dw_pairs * (pairs.diff * pairs.diff).sum(-1)
    dv = 0.0
    if tangents[2] is not None:
        dv = _points(_f64(tangents[2])).norm(dim=-1)[..., None, :]
    w = w if isinstance(w, torch.Tensor) else torch.tensor(w, dtype=query.dtype)
    inputs = [query, key, value, w]
    return _check_tangent(
        dout,
        reference.pool_and_lse,
        inputs,
        tangents,
        pairs,
        ds,
        dv,
        name,
        share=_skipped_share(tolerance, query.dtype),
        exclude_self=exclude_self,
    )


def check_rows_tangent(dout, query, keys, values, w, tangents, name="tangent"):
    """Judge the forward-mode derivative of ``nw_pool_rows`` along ``tangents``."""
    pairs = _rows_pairs(query, keys, values, w)
    dq, dK, _, dw = (None if t is None else _f64(t) for t in tangents)
    diff = pairs.diff[..., 0]
    ds = torch.zeros_like(pairs.scores)
    if dq is not None or dK is not None:
        dq = torch.zeros(diff.shape[0], dtype=F64) if dq is None else dq
        dK = torch.zeros_like(diff) if dK is None else dK
        ds = ds - pairs.w * diff * (dq[:, None] - dK)
    if dw is not None:
        ds = ds - 0.5 * dw.reshape(1, -1) * diff**2
    dv = 0.0 if tangents[2] is None else _f64(tangents[2]).abs()
    w = w if isinstance(w, torch.Tensor) else torch.tensor(w, dtype=query.dtype)
    inputs = [query, keys, values, w]
    return _check_tangent(dout, reference.rows_and_lse, inputs, tangents, pairs, ds, dv, name)
