"""Plain PyTorch Nadaraya-Watson pooling: the paths every fused kernel is judged against.

Written for clarity, not speed: they build the full n x m score matrix. Two forms
of each layout, which differ only in how the query-key differences are formed:

- ``*_repeat_interleave``: the textbook's form, each query repeated m times and
  reshaped to an (n, m) grid beside the keys repeated n times;
- ``*_broadcast``: ``q[:, None] - k[None, :]``.

Both produce the very same difference tensor and then share one tail (scores,
softmax, weighted sum), so they agree bit for bit; a difference between two
such programs comes from elsewhere, typically a freshly drawn random ``w``.

Everything here computes on the caller's own tensors by broadcasting, with any
leading batch dims. The public forms call ``nwfast._checks`` to refuse bad input
with the same messages as the fused paths, but never compute on its canonical
layout: a bug there cannot hide behind itself. ``pool_and_lse`` and
``rows_and_lse`` skip the checks altogether and also return the log-sum-exp,
the two outputs of the kernel contract (``nwfast.kernels``).

With ``exclude_self`` key i is *removed* from query i's softmax, as the
textbook's ``(n, n - 1)`` matrices remove it: a NaN or inf in ``v_i`` does not
reach ``y_i`` (weighting it 0 would give 0 * NaN = NaN).

Local-linear regression (``nwfast.local_linear``) has its references here too,
unchecked, on its canonical layout: query (n, d), key (m, d), value (m, c) and w
(d,), one weight per feature. ``moments_reference`` gives the weighted moments
the fused kernels compute; ``local_linear_reference`` the fit by dense weighted
least squares, an independent route to the same numbers.
"""

import torch

from nwfast._checks import prepare_rows, prepare_shared
from nwfast._moments import covariance, line_share, unpack

__all__ = [
    "attention_weights",
    "local_linear_reference",
    "local_linear_scores",
    "moment_terms",
    "moments_reference",
    "nw_pool_broadcast",
    "nw_pool_repeat_interleave",
    "nw_pool_rows_broadcast",
    "nw_pool_rows_repeat_interleave",
    "nw_scores",
    "pool_and_lse",
    "rows_and_lse",
    "textbook_leave_one_out",
]


def _points(x):
    """(n,) is n points with one feature: (n, 1); (..., n, d) stays."""
    return x[:, None] if x.dim() == 1 else x


def _per_key(w, like):
    """w as (..., 1, m) or (1, 1), broadcastable against (..., n, m) scores."""
    w = torch.as_tensor(w, dtype=like.dtype, device=like.device)
    return w.reshape(1)[..., None, :] if w.dim() == 0 else w[..., None, :]


def nw_scores(differences, w):
    """s_ij = -(w_j / 2) * ||q_i - k_j||^2 from differences (..., n, m, d)."""
    return -(_per_key(w, differences) / 2) * (differences * differences).sum(-1)


def _differences_broadcast(q, k):
    return q[..., :, None, :] - k[..., None, :, :]


def _differences_repeat_interleave(q, k):
    *batch, n, d = q.shape
    m = k.shape[-2]
    queries = q.repeat_interleave(m, dim=-2).reshape(*batch, n, m, d)
    keys = k.repeat(*([1] * len(batch)), n, 1).reshape(*batch, n, m, d)
    return queries - keys


def _removed(scores, exclude_self):
    """The (..., n, m) mask of removed pairs, or None.

    ``exclude_self`` True removes j == i; a tensor (..., n) of key indices removes
    key ``exclude_self[..., i]`` from row i (-1: none), for a subset of the
    queries or for shards of a larger problem.
    """
    if isinstance(exclude_self, torch.Tensor):
        keys = torch.arange(scores.shape[-1], device=scores.device)
        return keys == exclude_self.to(scores.device)[..., None]
    if exclude_self:
        return torch.eye(scores.shape[-1], dtype=torch.bool, device=scores.device)
    return None


def _masked_differences(differences, exclude_self):
    """The left-out pairs' differences zeroed: no NaN in k_i reaches row i, not
    even through the gradient."""
    removed = _removed(differences[..., 0], exclude_self)
    return differences if removed is None else differences.masked_fill(removed[..., None], 0.0)


def _masked_scores(differences, w, exclude_self):
    removed = _removed(differences[..., 0], exclude_self)
    scores = nw_scores(_masked_differences(differences, exclude_self), w)
    return scores if removed is None else scores.masked_fill(removed, float("-inf"))


def _pool(differences, value, w, exclude_self):
    """The shared tail of both forms: (out, lse)."""
    scores = _masked_scores(differences, w, exclude_self)
    weights = torch.softmax(scores, dim=-1)
    v = value[:, None] if value.dim() == 1 else value
    removed = _removed(scores, exclude_self)
    if removed is None:
        out = weights @ v
    else:
        # Remove key i from row i rather than weighting it 0 (see the module
        # doc): its value is zeroed before the product, so that no NaN in it
        # reaches row i, not even through the gradient (0 * NaN is NaN).
        values = torch.where(removed[..., None], 0.0, v[..., None, :, :])
        out = (weights[..., None] * values).sum(-2)
    if value.dim() == 1:
        out = out[..., 0]
    return out, torch.logsumexp(scores, dim=-1)


def pool_and_lse(query, key, value, w, exclude_self=False):
    """Output and natural-log log-sum-exp of the scores, unchecked, broadcast form.

    query ``(n,)`` or ``(..., n, d)``, key ``(m,)`` or ``(..., m, d)``, value
    ``(m,)`` or ``(..., m, c)``, w a number, a one-element tensor, ``(m,)`` or
    ``(..., m)``; ``exclude_self`` a bool or per-row key indices to remove (see
    ``_removed``). Returns out ``(n,)`` or ``(..., n, c)`` and lse ``(..., n)``.
    """
    return _pool(_differences_broadcast(_points(query), _points(key)), value, w, exclude_self)


def nw_pool_broadcast(query, key, value, w, *, exclude_self=False):
    """Reference ``nw_pool`` with differences formed by broadcasting."""
    prepare_shared(query, key, value, w, exclude_self)
    return pool_and_lse(query, key, value, w, exclude_self)[0]


def nw_pool_repeat_interleave(query, key, value, w, *, exclude_self=False):
    """Reference ``nw_pool`` in the textbook's repeat_interleave form."""
    prepare_shared(query, key, value, w, exclude_self)
    differences = _differences_repeat_interleave(_points(query), _points(key))
    return _pool(differences, value, w, exclude_self)[0]


def attention_weights(query, key, w, exclude_self=False):
    """The softmax weights ``p_ij``, ``(..., n, m)``, unchecked."""
    differences = _differences_broadcast(_points(query), _points(key))
    return torch.softmax(_masked_scores(differences, w, exclude_self), dim=-1)


# --- per-query rows: query (n,), keys and values (n, m) ---------------------------


def _pool_rows(differences, values, w):
    scores = -(torch.as_tensor(w, dtype=values.dtype, device=values.device) / 2) * differences**2
    weights = torch.softmax(scores, dim=-1)
    out = torch.bmm(weights.unsqueeze(1), values.unsqueeze(-1)).reshape(-1)
    return out, torch.logsumexp(scores, dim=-1)


def rows_and_lse(query, keys, values, w):
    """Output and log-sum-exp of the rows layout, unchecked, broadcast form."""
    return _pool_rows(query[:, None] - keys, values, w)


def nw_pool_rows_broadcast(query, keys, values, w):
    """Reference ``nw_pool_rows``: row i of keys and values belongs to query i."""
    prepare_rows(query, keys, values, w)
    return rows_and_lse(query, keys, values, w)[0]


def nw_pool_rows_repeat_interleave(query, keys, values, w):
    """Reference ``nw_pool_rows`` in the textbook's form."""
    prepare_rows(query, keys, values, w)
    n, m = keys.shape
    queries = query.repeat_interleave(m).reshape(n, m)
    return _pool_rows(queries - keys, values, w)[0]


def textbook_leave_one_out(x, y):
    """The textbook's leave-one-out rows: the (n, n - 1) keys and values that
    ``torch.eye`` cuts out, row i everything but point i (``exclude_self``
    computes the same without building them)."""
    n = x.shape[0]
    keep = ~torch.eye(n, dtype=torch.bool, device=x.device)
    return x.repeat(n, 1)[keep].reshape(n, n - 1), y.repeat(n, 1)[keep].reshape(n, n - 1)


# --- local-linear: query (n, d), key (m, d), value (m, c), w (d,) --------------------


def local_linear_scores(query, key, w, exclude_self=False):
    """u_ij = k_j - q_i (n, m, d), the scores -(1/2) sum_f w_f u_ijf^2 (n, m) with
    the removed pairs at -inf, and the mask of those pairs (None: none removed)."""
    u = key[None, :, :] - query[:, None, :]
    scores = -0.5 * (u * u * w).sum(-1)
    removed = _removed(scores, exclude_self)
    if removed is not None:
        scores = scores.masked_fill(removed, float("-inf"))
    return u, scores, removed


def moment_terms(u, value):
    """phi_ij (n, m, P), the layout's terms of each pair, whose weighted sums are
    the moments; u (n, m, d), value (m, c)."""
    n, m, d = u.shape
    rows, cols = torch.triu_indices(d, d, device=u.device)
    v = value[None].expand(n, m, -1)
    return torch.cat(
        [u, u[..., rows] * u[..., cols], v, (u[..., :, None] * v[..., None, :]).flatten(2)], -1
    )


def moments_reference(query, key, value, w, exclude_self=False):
    """The moments of the layout and the lse by dense broadcasting, for the tests.

    query (n, d), key (m, d), value (m, c), w (d,); computed in their dtype.
    """
    u, scores, removed = local_linear_scores(query, key, w, exclude_self)
    p = torch.softmax(scores, dim=-1)
    terms = p[..., None] * moment_terms(u, value)
    if removed is not None:  # remove key i from row i (a NaN there must not reach it)
        terms = torch.where(removed[..., None], 0.0, terms)
    return terms.sum(1).double(), torch.logsumexp(scores, dim=-1).double()


def local_linear_reference(query, key, value, w, *, exclude_self=False):
    """The local-linear fit by weighted least squares per query, in float64.

    ``torch.linalg.lstsq`` on the dense design [1, k_j - q_i] scaled by sqrt(p_ij),
    an independent route to the same numbers as the moments; rows that are thin
    (``nwfast.local_linear``'s module doc) move to the local-constant value by the
    same share as in the fused path. query (n, d), key (m, d), value (m, c), w (d,);
    returns (n, c) float64.
    """
    q, k, v, w = (x.double() for x in (query, key, value, w))
    u, scores, removed = local_linear_scores(q, k, w, exclude_self)
    design = torch.cat([torch.ones_like(u[..., :1]), u], dim=-1)
    # sqrt(p) as exp(log p / 2): finite gradients where a key is removed (p = 0)
    root = torch.exp(0.5 * torch.log_softmax(scores, dim=-1))[..., None]
    target = v[None].expand(u.shape[0], -1, -1)
    if removed is not None:
        design = torch.where(removed[..., None], 0.0, design)
        target = torch.where(removed[..., None], 0.0, target)
    line = torch.linalg.lstsq(root * design, root * target, driver="gelsd").solution[:, 0]
    mom, _ = moments_reference(q, k, v, w, exclude_self)
    S1, S2, Sv, _ = unpack(mom, q.shape[1], v.shape[1])
    share = line_share(covariance(S1, S2)[0], query.dtype)[:, None]
    return torch.where(share == 0.0, Sv, Sv + share * (line - Sv))
