"""Fused Nadaraya-Watson kernels: pure compute, no argument parsing.

Every backend module (``numba_nw`` for CPU, ``triton_nw`` for GPU) exposes the
same functions on canonical, already-checked torch tensors of one float dtype,
one device, contiguous:

Shared keys::

    forward(query, key, value, w, diagonal, tolerance) -> (out, lse, plan)
        query (B, n, d), key (B, m, d), value (B, m, c), and w (B, m) for one
        w per key or (B, 1) for one w shared by all keys.
        diagonal: None, or an int: query i leaves key i + diagonal out of its
        softmax where that key exists (exclude_self is diagonal 0 with n == m;
        shards of a larger problem pass their offset).
        tolerance: the most softmax mass a query may skip (``blocks``); 0.0
        computes every pair.
        out (B, n, c) in the input dtype; lse (B, n) float64, the natural-log
        log-sum-exp of s_ij over j (float64: the backward's weights
        exp(s_ij - lse_i) need it exact where |lse| is large); plan: a 1-D
        int64 CPU tensor, the block plan packed (``blocks.pack``), which the
        backward and the tangent reuse.

    backward(grad_out, query, key, value, w, out, lse, diagonal, plan, needs, keys=None)
        -> (dquery, dkey, dvalue, dw)
        grad_out (B, n, c); needs is four bools (query, key, value, w); an
        entry that is not needed may come back as None. dw has w's shape.
        out and lse may be those of a larger problem of which these keys are
        a shard: the gradients are then this shard's share. keys: how many
        keys each softmax holds in that larger problem (for the distance
        shift of a shared w, which must be the same in every shard); None:
        this call's own.

    tangent(query, key, value, w, tangents, out, lse, diagonal, plan)
        -> dout (B, n, c): the forward-mode derivative, tangents being
        (dquery, dkey, dvalue, dw) with None for a zero tangent.

    make_plan(query, key, w, diagonal, tolerance) -> blocks.Plan or None
        the plan ``forward`` makes for these inputs (None: a dense pass).

Per-query rows::

    forward_rows(query, keys, values, w) -> (out, lse)
        query (n,), keys (n, m), values (n, m), w (m,) or (1,); out (n,), lse (n,)

    backward_rows(grad_out, query, keys, values, w, out, lse, needs)
        -> (dquery, dkeys, dvalues, dw)

    tangent_rows(query, keys, values, w, tangents, out, lse) -> dout (n,)

with s_ij = -(w_j / 2) * ||q_i - k_j||^2, p_ij = softmax_j(s_ij), out_i =
sum_j p_ij v_j. A key left out of a row is removed from it, NaN or not, as
the textbook's (n, n - 1) matrices remove it.

A w of one element (w (B, 1), or (1,) for rows) is one bandwidth for all
keys, and its gradient is the sum over every pair. That sum cancels: the
terms t_ij = dL/ds_ij sum to zero over j, so scaled by a large
||q_i - k_j||^2 they leave a small total. The kernels subtract a per-query
constant r_i from ||q_i - k_j||^2 first (exact, since sum_j t_ij r_i = 0):
the log-mean-exp of the squared distances (``distance_shift``). Nothing of
size n * m is allocated beyond the rows layout's own inputs and gradients.
"""

import os
import tempfile
import warnings

import numpy as np
import torch

from . import arrays


def _writable(folder):
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def _ensure_numba_cache():
    """Numba caches compiled kernels beside their source or in the user's cache
    folder; an install that may write to neither (a read-only image with no
    writable home) would make every first call fail. Cache in the temporary
    folder then, and say so once."""
    from numba.core import config
    from numba.misc.appdirs import AppDirs

    if config.CACHE_DIR:
        return  # the user's own choice
    here = os.path.join(os.path.dirname(__file__), "__pycache__")
    if _writable(here) or _writable(AppDirs(appname="numba", appauthor=False).user_cache_dir):
        return
    config.CACHE_DIR = os.path.join(tempfile.gettempdir(), f"nwfast-numba-{os.getuid()}")
    warnings.warn(
        f"nwfast: no writable place to cache compiled kernels beside {os.path.dirname(__file__)} "
        f"or in the user's cache folder; caching them in {config.CACHE_DIR} (set "
        "NUMBA_CACHE_DIR to choose)",
        RuntimeWarning,
        stacklevel=2,
    )


_ensure_numba_cache()


# The shift of a row's softmax. With every w >= 0 each score is <= 0, so a
# shift of 0 is safe from overflow and needs no row maximum. A zero-shift sum
# below UNDERFLOW (a query far from every key, a huge w) may have lost weights
# flushed to 0 (each < 2**-126, and the largest weight is >= total / m), so
# such a row is redone against its own maximum.
UNDERFLOW = 2.0**-60
# A float64 lse holds a row's log-sum only to about u64 |lse|. Past these
# magnitudes (log2 units; by the accumulator dtype) that would cost the
# backward's weights more than 2**7 float64 ulps, or 2**-26 relative in
# float32: a query far from every key, a huge w. The backward and the tangent
# then recompute such a row's shift exactly, in the forward's own arithmetic.
EXACT_SHIFT_ABOVE = {torch.float64: 2.0**6, torch.float32: 2.0**26}


def per_key(w, m):
    """w (..., 1) or (..., m) -> (..., m) contiguous: every kernel reads one w per key."""
    w = w.expand(*w.shape[:-1], m)
    if arrays.numpy_can_hold(w):  # copied by NumPy (``arrays``)
        return torch.from_numpy(arrays.of(w))
    return w.contiguous()


def accumulator_dtype(dtype):
    """What sums run in: float64 for float64 inputs, float32 for the rest."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def distance_shift(lse, w, keys):
    """r_i (B, n) for the gradient of a shared w (B, 1), in float64; zeros for a
    per-key w, whose gradient has no sum over keys to cancel. ``keys``: how many
    keys each softmax holds (m, or m - 1 with exclude_self), a number or (B, n).

    r_i = -(2 / w) log(mean_j exp(s_ij)), from the log-sum-exp: a mean of the
    squared distances between their minimum and maximum, weighted towards the
    keys that dominate row i for either sign of w. Where the scores are too flat
    for float64 to resolve it (|w| tiny) it is 0: no shift is needed there.
    On the CPU it is computed by NumPy (``arrays``).
    """
    cpu = arrays.numpy_can_hold(lse)
    if w.shape[-1] != 1:
        if cpu:
            return torch.from_numpy(np.zeros(lse.shape))
        return torch.zeros(lse.shape, dtype=torch.float64, device=lse.device)
    if cpu:
        lse, w = arrays.float64(lse), arrays.float64(w)
        with np.errstate(divide="ignore", invalid="ignore"):  # w = 0 gives 0, as on a GPU
            return torch.from_numpy(_shift(np, lse, w, np.log(np.asarray(keys, np.float64))))
    counts = torch.as_tensor(keys, dtype=torch.float64).to(lse.device)
    return _shift(torch, lse.double(), w.double(), counts.log())


def _shift(xp, lse, w, log_keys):
    """``distance_shift`` on float64 arrays of the module xp (NumPy or torch)."""
    log_mean = lse - log_keys
    resolved = xp.abs(log_mean) > 1e-12 * (xp.abs(lse) + 1.0)
    r = -2.0 * log_mean / w
    return xp.where(resolved & xp.isfinite(r), r, 0.0)
