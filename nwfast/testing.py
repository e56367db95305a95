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
condition it has; it is computed, never guessed:

* **Outputs** (``check_pool``, ``check_rows``): a rounding-error bound for softmax pooling.
  Computing ``y_i = sum_j p_ij v_j`` with unit roundoff u perturbs

  - the weighted sum and its normaliser by a small multiple of
    ``u * sum_j p_ij ||v_j||``: the magnitudes of the terms, not their sum;
  - each score by about ``u * |s_ij|`` (the product ``w/2 * ||q - k||^2``, and the
    exp's own rounding adds ``u``). Relative changes ``e_ij`` of the weights move
    ``y_i`` by ``sum_j p_ij e_ij (v_j - y_i)``, hence the term
    ``u * sum_j p_ij (1 + |s_ij|) ||v_j - y_i||``.

  ``allowed_i = ROUNDING_FACTOR * u * (both terms)``, in the 2-norm over rows.
  ``ROUNDING_FACTOR = 16`` is the depth of sequential summation the kernels' sums
  stay below in the tested sizes (SIMD lanes and tiles cut the rest) with room
  for the polynomial exp (1.3 u) and the lse's rounding; measured errors sit
  between 0.01 and 0.5 of the bound.
* **The log-sum-exp** (``lse_allowance``): absolute, per row
  ``ROUNDING_FACTOR * u * (1 + sum_j p_ij |s_ij|)``.
* **Gradients** (``check_gradients``): gradients such as ``dw`` sum terms that
  cancel heavily, and the bound above does not carry over to them in a simple
  form. Their case-aware term is measured instead, as flash-attention's tests
  do: the error of torch's own autograd of the reference in float32 (in the
  tested dtype for half precision), times ``TORCH_FACTOR = 4``, scaled by the
  ratio of unit roundoffs for float64 (the float32 run estimates the case's
  condition number). ``GRAD_TOLERANCE`` is the floor (1e-10 in float64).

For half-precision inputs the kernels compute in float32: u is float32's and the
result's own rounding, ``u_half * ||ref||``, is added.
"""

from typing import NamedTuple

import torch

from nwfast import reference
from nwfast.kernels import distance_shift

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


def compare(out, ref, allowed, name="result"):
    """``||out - ref|| <= allowed`` over finite entries, NaN/inf in the same places."""
    out, ref = _f64(out), _f64(ref)
    if out.shape != ref.shape:
        return Verdict(
            name, float("inf"), allowed, False, f"shape {tuple(out.shape)} != {tuple(ref.shape)}"
        )
    for what, test in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        mismatch = test(out) != test(ref)
        if mismatch.any():
            where = mismatch.nonzero()[:5].tolist()
            count = int(mismatch.sum())
            detail = f"{what} placement differs at {count} entries, first {where}"
            return Verdict(name, float("inf"), allowed, False, detail)
    finite = torch.isfinite(ref)
    diff = (out - ref).where(finite, 0.0)
    error = float(diff.norm())
    detail = ""
    if error > allowed:
        worst = diff.abs().flatten().argmax()
        index = list(torch.unravel_index(worst, diff.shape)) if diff.dim() else []
        at = tuple(int(i) for i in index)
        detail = (
            f"worst at {at}: {float(out.flatten()[worst]):.9g} vs {float(ref.flatten()[worst]):.9g}"
        )
    return Verdict(name, error, allowed, error <= allowed, detail)


def assert_ok(*verdicts):
    """Raise with every verdict listed if any failed."""
    failed = [v for v in verdicts if not v.ok]
    if failed:
        raise AssertionError("\n".join(str(v) for v in verdicts))


def relative_error(out, ref):
    """||out - ref|| / ||ref|| over the finite entries of ref, in float64."""
    out, ref = _f64(out), _f64(ref)
    finite = torch.isfinite(ref)
    scale = float(ref[finite].norm())
    diff = float((out[finite] - ref[finite]).norm())
    return diff / scale if scale > 0 else diff


def assert_close(out, ref, tolerance=None, name="result"):
    """A fixed relative tolerance, for identities that have no error model of their
    own (weights summing to 1, two paths that must agree): TOLERANCE by default."""
    tolerance = TOLERANCE[out.dtype] if tolerance is None else tolerance
    scale = float(_f64(ref)[torch.isfinite(_f64(ref))].norm())
    assert_ok(compare(out, ref, tolerance * (scale if scale > 0 else 1.0), name))


def _norm(x):
    x = _f64(x)
    return float(x[torch.isfinite(x)].norm())


def _compute_roundoff(dtype):
    """u of the arithmetic (half precision accumulates in float32)."""
    return UNIT_ROUNDOFF[F64 if dtype == F64 else torch.float32]


def _allowance_terms(scores, values, out):
    """Per row (...,): sum_j p_ij ||v_ij|| + sum_j p_ij (1 + |s_ij|) ||v_ij - y_i||.

    scores (..., n, m); values broadcastable to (..., n, m, c); out (..., n, c).
    Pairs with p_ij = 0 (removed keys) contribute nothing, whatever their value.
    """
    p = torch.softmax(scores, dim=-1)
    used = p > 0
    size = values.abs() if values.shape[-1] == 1 else values.norm(dim=-1, keepdim=True)
    spread = (values - out[..., None, :]).norm(dim=-1)
    magnitude = torch.where(used, p * size[..., 0], 0.0).sum(-1)
    rounding = torch.where(used, p * (1 + scores.abs()) * spread, 0.0).sum(-1)
    return (magnitude + rounding).nan_to_num(nan=0.0, posinf=0.0)


def _allowed(ref, per_row, dtype):
    u = _compute_roundoff(dtype)
    case = ROUNDING_FACTOR * u * float(per_row.norm())
    if dtype not in (torch.float32, F64):
        case += UNIT_ROUNDOFF[dtype] * _norm(ref)
    return max(TOLERANCE[dtype] * _norm(ref), case)


def _as_f64(*tensors):
    return [_f64(x) if isinstance(x, torch.Tensor) else x for x in tensors]


def _shared_case(query, key, value, w, exclude_self):
    """float64 reference out (with a channel dim), scores and per-pair values."""
    q, k, v, w = _as_f64(query, key, value, w)
    out, _ = reference.pool_and_lse(q, k, v, w, exclude_self)
    q = q[:, None] if q.dim() == 1 else q
    k = k[:, None] if k.dim() == 1 else k
    v = v[:, None] if v.dim() == 1 else v
    out = out[..., None] if value.dim() == 1 else out
    scores = reference._masked_scores(q[..., :, None, :] - k[..., None, :, :], w, exclude_self)
    return out, scores, v[..., None, :, :]


def check_pool(out, query, key, value, w, exclude_self=False, name="out"):
    """Judge a shared-keys result against the float64 reference of its inputs.

    ``exclude_self`` is a bool, or per-row key indices to remove (-1: none), as in
    ``reference.pool_and_lse``: that judges a subset of the query rows (pass those
    rows of ``query`` and ``out`` and their own indices) with leave-one-out.
    """
    ref, scores, values = _shared_case(query, key, value, w, exclude_self)
    per_row = _allowance_terms(scores, values, ref)
    return compare(out, ref.reshape(out.shape), _allowed(ref, per_row, out.dtype), name)


def check_rows(out, query, keys, values, w, name="out"):
    """Judge a per-query-rows result against the float64 reference of its inputs."""
    q, K, V, w64 = _as_f64(query, keys, values, w)
    ref, _ = reference.rows_and_lse(q, K, V, w64)
    scores = -(torch.as_tensor(w64, dtype=F64) / 2) * (q[:, None] - K) ** 2
    per_row = _allowance_terms(scores, V[..., None], ref[:, None])
    return compare(out, ref, _allowed(ref, per_row, out.dtype), name)


def check_lse(lse, scores, ref, dtype, name="lse"):
    """The log-sum-exp against the reference's, with an absolute allowance per row."""
    p = torch.softmax(scores, dim=-1)
    spread = torch.where(p > 0, p * scores.abs(), 0.0).sum(-1).nan_to_num(nan=0.0, posinf=0.0)
    per_row = ROUNDING_FACTOR * _compute_roundoff(dtype) * (1 + spread)
    return compare(lse, ref, float(per_row.norm()), name)


def check_gradients(grads, reference_fn, inputs, upstream, names, floors=None, **kwargs):
    """Judge gradients of ``reference_fn(*inputs, **kwargs)`` against float64 autograd.

    ``grads`` holds the tested gradients (None where not computed), in the order of
    ``inputs`` and ``names``; ``upstream`` is the output's upstream gradient. The
    case-aware allowance is TORCH_FACTOR times the error of torch's own autograd in
    float32 (or in the half dtype), scaled to the tested dtype's unit roundoff, or
    ``ROUNDING_FACTOR * u * ||floor||`` for a rounding bound in ``floors``.
    """
    dtype = next(g.dtype for g in grads if g is not None)
    probe = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32
    exact = _autograd(reference_fn, inputs, upstream, F64, "cpu", kwargs)
    device = next(x.device for x in inputs if isinstance(x, torch.Tensor))
    estimate = _autograd(reference_fn, inputs, upstream, probe, device, kwargs)
    scale = UNIT_ROUNDOFF[dtype] / UNIT_ROUNDOFF[probe]
    floors = floors or [None] * len(names)
    verdicts = []
    for name, got, want, rough, floor in zip(names, grads, exact, estimate, floors):
        if got is None:
            continue
        error_torch = float(_f64(rough - want.to(rough.device)).nan_to_num().norm())
        allowed = max(GRAD_TOLERANCE[dtype] * _norm(want), TORCH_FACTOR * scale * error_torch)
        if floor is not None:
            allowed = max(allowed, ROUNDING_FACTOR * _compute_roundoff(dtype) * _norm(floor))
        verdicts.append(compare(got, want.reshape(got.shape), allowed, f"grad of {name}"))
    return verdicts


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


class _Pairs(NamedTuple):
    """A case in float64, one entry per (query, key) pair: (..., n, m, ...)."""

    diff: torch.Tensor  # q_i - k_j, (..., n, m, d)
    scores: torch.Tensor  # (..., n, m), -inf where a key is removed
    values: torch.Tensor  # v_j for each pair, (..., n, m, c)
    upstream: torch.Tensor  # g_i, (..., n, c)
    w: torch.Tensor  # broadcastable to (..., n, m)
    keys: torch.Tensor  # keys in each row's softmax, (..., n)


def _pair_floors(pairs, shared_w, roundoff):
    """Per-pair rounding bounds of the gradients: (dq and dk, dv, dw) terms.

    The error of t_ij = p_ij (g_i . v_j - delta_i) is at most tau_ij =
    p_ij (||g_i|| ||v_j|| + ||g_i|| sum_k p_ik ||v_k||) (1 + |s_ij|), and each
    gradient sums tau_ij times its own factor: |w_j| ||q_i - k_j|| for dq and dk,
    ||q_i - k_j||^2 / 2 for dw, less the kernel contract's distance shift where
    one w serves all keys; dv sums p_ij (1 + |s_ij|) |g_i|.
    """
    p = torch.softmax(pairs.scores, dim=-1)
    used = p > 0
    rounding = torch.where(used, p * (1 + pairs.scores.abs()), 0.0)
    g_size = pairs.upstream.norm(dim=-1)
    v_size = pairs.values.norm(dim=-1)
    a = g_size * torch.where(used, p * v_size, 0.0).sum(-1)
    tau = rounding * (g_size[..., None] * v_size + a[..., None])
    dist = pairs.diff.norm(dim=-1)
    dist2 = dist * dist
    if shared_w:
        lse = torch.logsumexp(pairs.scores, dim=-1)
        shift = distance_shift(lse, pairs.w[..., 0], pairs.keys)[..., None]
        # the shifted distance is itself rounded: u (d^2 + |r|) where it is ~0
        dist2 = (dist2 - shift).abs() + roundoff * (dist2 + shift.abs())
    pair_q = tau * pairs.w.abs() * dist
    pair_v = rounding[..., None] * pairs.upstream[..., None, :].abs()
    return pair_q, pair_v, 0.5 * tau * dist2


def _shared_pairs(query, key, value, w, upstream, exclude_self):
    q, k, v, w, g = _as_f64(query, key, value, w, upstream)
    q = q[:, None] if q.dim() == 1 else q
    k = k[:, None] if k.dim() == 1 else k
    if v.dim() == 1:
        v, g = v[:, None], g[..., None]
    diff = q[..., :, None, :] - k[..., None, :, :]
    scores = reference._masked_scores(diff, w, exclude_self)
    values = v[..., None, :, :].expand(*scores.shape, v.shape[-1])
    keys = torch.isfinite(scores).sum(-1)
    return _Pairs(diff, scores, values, g, reference._per_key(w, scores), keys)


def _roundoff_of(grads):
    return _compute_roundoff(next(g.dtype for g in grads if g is not None))


def _w_size(w):
    return tuple(w.shape) if isinstance(w, torch.Tensor) else ()


def check_pool_gradients(grads, query, key, value, w, upstream, exclude_self=False):
    """Judge (dquery, dkey, dvalue, dw) of ``nw_pool`` on these inputs."""
    pairs = _shared_pairs(query, key, value, w, upstream, exclude_self)
    shared_w = _w_size(w) in ((), (1,)) or _w_size(w)[-1:] == (1,)
    pair_q, pair_v, pair_w = _pair_floors(pairs, shared_w, _roundoff_of(grads))
    floors = [
        pair_q.sum(-1),
        pair_q.sum(-2),
        pair_v.sum(-3),
        pair_w.sum(-2).sum_to_size(_w_size(w)),
    ]
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
    q, K, V, w64, g = _as_f64(query, keys, values, w, upstream)
    w_keys = torch.as_tensor(w64, dtype=F64).reshape(1, -1)
    diff = (q[:, None] - K)[..., None]
    scores = -(w_keys / 2) * diff[..., 0] ** 2
    pairs = _Pairs(diff, scores, V[..., None], g[:, None], w_keys, torch.isfinite(scores).sum(-1))
    pair_q, pair_v, pair_w = _pair_floors(pairs, _w_size(w) in ((), (1,)), _roundoff_of(grads))
    floors = [pair_q.sum(-1), pair_q, pair_v[..., 0], pair_w.sum(-2).sum_to_size(_w_size(w))]
    return check_gradients(
        grads,
        reference.rows_and_lse,
        [query, keys, values, w],
        upstream,
        ("query", "keys", "values", "w"),
        floors=floors,
    )
