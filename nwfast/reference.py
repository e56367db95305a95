"""Plain PyTorch Nadaraya-Watson pooling: the paths every fused kernel is judged against.

Written for clarity, not speed: they build the full n x m score matrix. Two forms
of each layout, which differ only in how the query-key differences are formed:

- ``*_repeat_interleave``: the textbook's form, each query repeated m times and
  reshaped to an (n, m) grid beside the keys repeated n times;
- ``*_broadcast``: ``q[:, None] - k[None, :]``.

Both produce the very same difference tensor and then share one tail (scores,
softmax, weighted sum), so they agree bit for bit; a difference between two
such programs comes from elsewhere, typically a freshly drawn random ``w``.
"""

import torch

from nwfast._checks import prepare_rows, prepare_shared

__all__ = [
    "nw_pool_broadcast",
    "nw_pool_repeat_interleave",
    "nw_pool_rows_broadcast",
    "nw_pool_rows_repeat_interleave",
    "nw_scores",
    "attention_weights",
    "shared_differences",
]


def _shared_differences_repeat_interleave(q, k):
    batch, n, d = q.shape
    m = k.shape[1]
    queries = q.repeat_interleave(m, dim=1).reshape(batch, n, m, d)
    keys = k.repeat(1, n, 1).reshape(batch, n, m, d)
    return queries - keys


def nw_scores(differences, w):
    """s_ij = -(w_j / 2) * ||q_i - k_j||^2 from differences (..., n, m, d), w (..., m)."""
    return -(w[..., None, :] / 2) * (differences * differences).sum(-1)


def attention_weights(differences, args):
    """Softmax weights (B, n, m) from differences (B, n, m, d) and checked ``args``."""
    scores = nw_scores(differences, args.w)
    if args.exclude_self:
        eye = torch.eye(scores.shape[-1], dtype=torch.bool, device=scores.device)
        scores = scores.masked_fill(eye, float("-inf"))
    return torch.softmax(scores, dim=-1)


def shared_differences(q, k):
    """Broadcast form of the query-key differences: (B, n, d), (B, m, d) -> (B, n, m, d)."""
    return q[:, :, None, :] - k[:, None, :, :]


def _pool_shared(differences, args):
    return (attention_weights(differences, args) @ args.v).reshape(args.out_shape)


def nw_pool_broadcast(query, key, value, w, *, exclude_self=False):
    """Reference ``nw_pool`` with differences formed by broadcasting."""
    args = prepare_shared(query, key, value, w, exclude_self)
    return _pool_shared(shared_differences(args.q, args.k), args)


def nw_pool_repeat_interleave(query, key, value, w, *, exclude_self=False):
    """Reference ``nw_pool`` in the textbook's repeat_interleave form."""
    args = prepare_shared(query, key, value, w, exclude_self)
    return _pool_shared(_shared_differences_repeat_interleave(args.q, args.k), args)


def _pool_rows(differences, args):
    weights = torch.softmax(-(args.w / 2) * differences**2, dim=-1)
    return torch.bmm(weights.unsqueeze(1), args.values.unsqueeze(-1)).reshape(-1)


def nw_pool_rows_broadcast(query, keys, values, w):
    """Reference ``nw_pool_rows``: row i of keys and values belongs to query i."""
    args = prepare_rows(query, keys, values, w)
    return _pool_rows(args.query[:, None] - args.keys, args)


def nw_pool_rows_repeat_interleave(query, keys, values, w):
    """Reference ``nw_pool_rows`` in the textbook's form."""
    args = prepare_rows(query, keys, values, w)
    n, m = args.keys.shape
    queries = args.query.repeat_interleave(m).reshape(n, m)
    return _pool_rows(queries - args.keys, args)
