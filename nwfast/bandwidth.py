"""Rule-of-thumb bandwidths: the one definition of Silverman's and Scott's rules.

The estimators' ``"silverman"`` and ``"scott"`` bandwidths, the starting point of
their leave-one-out search, ``nwfast.distributed``'s sharded search and the
benchmark's ``silverman`` cases all come from :func:`from_spread`; it needs
neither scikit-learn nor the data in one place (a sharded caller passes the
statistics it gathered).
"""

import math

import torch

RULES = ("scott", "silverman")
# h_f = c * A_f * n**(-1 / (d + 4)): c for Silverman's rule and Scott's.
_CONSTANT = {"silverman": 0.9, "scott": 1.059}


def from_spread(std, iqr, n, rule="silverman"):
    """``(d,)`` bandwidths from per-feature standard deviations and interquartile
    ranges of n points: ``A_f = min(std_f, IQR_f / 1.349)`` (the robust spread;
    ``std`` alone where the IQR is 0) and ``h_f = c A_f n**(-1 / (d + 4))``, c =
    0.9 (Silverman) or 1.059 (Scott). A constant feature gets ``h_f = 1``: its
    distances are all zero."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    iqr = iqr / 1.349
    spread = torch.where(iqr > 0, torch.minimum(std, iqr), std)
    spread = torch.where(spread > 0, spread, torch.ones_like(spread))
    return _CONSTANT[rule] * spread * n ** (-1.0 / (std.shape[-1] + 4))


def rule_of_thumb(X, rule="silverman"):
    """Per-feature rule-of-thumb bandwidths for X ``(n, d)`` (a tensor), shape ``(d,)``:
    :func:`from_spread` of X's columns. For d = 1 these are statsmodels'
    ``bw_silverman`` and ``bw_scott``."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if X.dim() == 1:
        X = X[:, None]
    n, d = X.shape
    if n < 2:
        raise ValueError(f"a rule of thumb needs at least 2 points, got X of shape {(n, d)}")
    X = X.double()
    return from_spread(X.std(dim=0), quantile(X, 0.75) - quantile(X, 0.25), n, rule)


def quantile(X, q):
    """Per-column quantile with NumPy's default linear interpolation (torch.quantile
    refuses inputs of more than 2**24 elements)."""
    ordered = X.sort(dim=0).values
    position = q * (X.shape[0] - 1)
    below = math.floor(position)
    above = min(below + 1, X.shape[0] - 1)
    return ordered[below] + (position - below) * (ordered[above] - ordered[below])
