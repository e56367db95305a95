"""``NWKernelRegression``: the textbook's Nadaraya-Watson model on the fused operator.

The model is a learnable Gaussian attention pooling (Dive into Deep Learning,
"Attention Pooling by Similarity" / "Nadaraya-Watson Kernel Regression"):

    y_hat(q) = sum_j softmax_j(-(w_j / 2) * ||q - k_j||^2) * v_j

with one learnable ``w`` shared by all keys, or one per key.
"""

import torch
from torch import nn

from nwfast._checks import _flag
from nwfast.functional import nw_pool, nw_pool_rows, nw_weights

__all__ = ["NWKernelRegression"]

POSITIVE = (None, "softplus", "exp", "square")


class NWKernelRegression(nn.Module):
    """Nadaraya-Watson kernel regression with a learnable Gaussian bandwidth weight.

    Scores are ``s_ij = -(w_j / 2) * ||q_i - k_j||^2``: ``w`` multiplies the *squared*
    distance, so it is ``1 / h**2`` for a Gaussian of standard deviation ``h``. The
    textbook writes ``-((q - k) * w_d2l)**2 / 2``, whose ``w_d2l`` is the square
    root of ours: ``w = w_d2l**2``. ``positive="square"`` stores exactly the
    textbook's parameter (``raw_w = w_d2l``) and reproduces its training run.

    Args:
        w_init: initial ``w`` (default 1.0, the untrained textbook kernel). A
            float, or for a per-key model a tensor of ``num_keys`` values.
        num_keys: learn one ``w_j`` per key (the keys must then always be the same
            ``num_keys`` points, in the same order). Leave out for one scalar ``w``.
        per_key: ``True`` asks for one ``w`` per key and needs ``num_keys``;
            ``None`` (default) infers it from ``num_keys``.
        positive: how ``w`` is stored. ``None`` stores ``w`` itself, which gradient
            steps can push below zero (a negative ``w`` turns the kernel inside out and
            favours the *farthest* keys). ``"softplus"`` (``w = softplus(raw)``),
            ``"exp"`` (``w = exp(raw)``, steps act on ``log w``) and ``"square"``
            (``w = raw**2``, the textbook's form) keep it non-negative.
        exclude_self: default for :meth:`forward`: leave key i out of query i's
            softmax (the queries are the keys). This is leave-one-out training on the
            training set itself; without it, ``w`` grows until every point predicts
            its own value.
        keep_attention: after each forward, keep the attention weights (n x m,
            detached) in ``attention_weights``. Off by default: they are the one
            n x m thing the fused operator never builds.
        backend: passed to :func:`nwfast.nw_pool` (``"auto"``, ``"numba"``,
            ``"triton"`` or ``"torch"``).

    Attributes:
        raw_w: the ``nn.Parameter`` (shape ``()`` or ``(num_keys,)``).
        w: the effective ``w`` (differentiable; ``raw_w`` itself when
            ``positive=None``).
        attention_weights: the last forward's weights when ``keep_attention=True``,
            else ``None``.

    Example::

        net = NWKernelRegression(positive="exp", exclude_self=True)
        loss = ((net(x_train, x_train, y_train) - y_train) ** 2).mean()
        y_test = net(x_test, x_train, y_train, exclude_self=False)
    """

    def __init__(
        self,
        w_init=1.0,
        *,
        num_keys=None,
        per_key=None,
        positive=None,
        exclude_self=False,
        keep_attention=False,
        backend="auto",
    ):
        super().__init__()
        if positive not in POSITIVE:
            raise ValueError(f"positive must be one of {POSITIVE}, got {positive!r}")
        if per_key is None:
            per_key = num_keys is not None
        if per_key and num_keys is None:
            raise ValueError("per_key=True needs num_keys=, the number of keys")
        if not per_key and num_keys is not None:
            raise ValueError(f"per_key=False contradicts num_keys={num_keys}")
        if per_key and (
            isinstance(num_keys, bool) or not isinstance(num_keys, int) or num_keys < 1
        ):
            raise ValueError(f"num_keys must be a positive int, got {num_keys!r}")

        shape = (num_keys,) if per_key else ()
        w0 = torch.as_tensor(w_init, dtype=torch.get_default_dtype())
        if w0.numel() == 1:
            w0 = w0.reshape(()).expand(shape)
        elif tuple(w0.shape) != shape:
            raise ValueError(f"w_init has shape {tuple(w0.shape)}, expected a scalar or {shape}")
        if not torch.isfinite(w0).all():
            raise ValueError("w_init must be finite")
        if positive in ("softplus", "exp") and not (w0 > 0).all():
            raise ValueError(f"positive={positive!r} needs w_init > 0, got {w_init!r}")
        if positive == "square" and not (w0 >= 0).all():
            raise ValueError(f"positive='square' needs w_init >= 0, got {w_init!r}")

        self.positive = positive
        self.exclude_self = _flag("exclude_self", exclude_self)
        self.keep_attention = _flag("keep_attention", keep_attention)
        self.backend = backend
        self.raw_w = nn.Parameter(self._to_raw(w0).clone())
        self.attention_weights = None

    def _to_raw(self, w):
        if self.positive == "softplus":
            # log(exp(w) - 1), written to neither overflow for large w nor lose
            # precision for small w.
            return w + torch.log(-torch.expm1(-w))
        if self.positive == "exp":
            return w.log()
        if self.positive == "square":
            return w.sqrt()
        return w

    @property
    def per_key(self):
        return self.raw_w.dim() == 1

    @property
    def w(self):
        """The effective ``w`` (``1 / h**2``), differentiable with respect to ``raw_w``."""
        raw = self.raw_w
        if self.positive == "softplus":
            return nn.functional.softplus(raw)
        if self.positive == "exp":
            return raw.exp()
        if self.positive == "square":
            return raw * raw
        return raw

    @property
    def bandwidth(self):
        """The Gaussian's standard deviation ``h = w**-0.5`` (detached; NaN where w < 0)."""
        return self.w.detach().rsqrt()

    def forward(self, query, key, value, *, exclude_self=None):
        """Predict at ``query`` from (``key``, ``value``).

        Shared layout (every query sees the same keys): query ``(n,)`` or
        ``(B..., n, d)``, key ``(m,)`` or ``(B..., m, d)``, value ``(m,)`` or
        ``(B..., m, c)``; see :func:`nwfast.nw_pool`.

        A 1-D ``query`` with a 2-D ``key`` is the textbook's per-query layout
        (``(n,)``, ``(n, m)``, ``(n, m)``) and goes to :meth:`forward_rows`.

        ``exclude_self`` overrides the module's default for this call; leave-one-out
        needs the queries to be the keys, so pass ``exclude_self=False`` to predict
        at new points with a model built with ``exclude_self=True``.
        """
        if query.dim() == 1 and key.dim() == 2:
            if exclude_self:
                raise ValueError(
                    "exclude_self does not apply to the per-query (rows) layout: its "
                    "keys already leave each query's own point out"
                )
            return self.forward_rows(query, key, value)
        exclude = self.exclude_self if exclude_self is None else exclude_self
        w = self.w.to(query.dtype)
        out = nw_pool(query, key, value, w, exclude_self=exclude, backend=self.backend)
        if self.keep_attention:
            with torch.no_grad():
                self.attention_weights = nw_weights(query, key, w, exclude_self=exclude)
        return out

    def forward_rows(self, query, keys, values):
        """The textbook's layout: query i sees its own row ``keys[i]``, ``values[i]``.

        query ``(n,)``, keys and values ``(n, m)``; result ``(n,)``. The textbook's
        leave-one-out matrices, ``(n, n - 1)`` rows built with ``torch.eye``, give the
        same result as ``forward(x, x, y, exclude_self=True)`` for a scalar ``w``,
        which needs none of them. A per-key ``w`` belongs to row *positions* here (the
        m columns), not to training points: after leaving point i out, column j of row
        i holds a different point for j >= i.
        """
        w = self.w.to(query.dtype)
        out = nw_pool_rows(query, keys, values, w, backend=self.backend)
        if self.keep_attention:
            with torch.no_grad():
                scores = -(w / 2) * (query[:, None] - keys) ** 2
                self.attention_weights = torch.softmax(scores, dim=-1)
        return out

    def extra_repr(self):
        kind = f"num_keys={self.raw_w.shape[0]}" if self.per_key else "scalar w"
        return (
            f"{kind}, positive={self.positive!r}, exclude_self={self.exclude_self}, "
            f"backend={self.backend!r}"
        )
