"""``NadarayaWatson``: a scikit-learn-style kernel regressor on the fused operator.

It speaks in bandwidths, as statsmodels and scikit-learn do: ``h`` is the Gaussian's
standard deviation, so the operator's ``w`` is ``1 / h**2``; a per-feature bandwidth
``h_f`` is applied by scaling feature f by ``1 / h_f`` and pooling with ``w = 1``.
"""

import inspect
import math
import time

import numpy as np
import torch

from nwfast.functional import nw_pool

__all__ = ["NadarayaWatson", "loo_mse", "rule_of_thumb", "time_loo_fit"]

RULES = ("scott", "silverman")


# --- input conversion ----------------------------------------------------------------


def _shape(a):
    return tuple(a.shape)


def _to_tensor(name, a, dtype=None, device=None):
    """``a`` as a float tensor; also says whether it came in as a torch tensor."""
    if isinstance(a, torch.Tensor):
        is_torch = True
        if a.is_complex():
            raise TypeError(f"{name} must be real, got dtype {a.dtype}")
        t = a.detach()
    else:
        is_torch = False
        arr = np.asarray(a)
        if arr.dtype.kind == "c":
            raise TypeError(f"{name} must be real, got dtype {arr.dtype}")
        if arr.dtype.kind not in "biuf":
            raise TypeError(f"{name} must be numeric, got dtype {arr.dtype}")
        if arr.dtype.kind != "f" or arr.dtype == np.float16:
            arr = arr.astype(np.float64)
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if not t.is_floating_point():
        t = t.to(torch.get_default_dtype())
    # The CPU kernels compute in float32 or float64; half precision is a GPU dtype.
    if t.dtype in (torch.float16, torch.bfloat16) and t.device.type == "cpu":
        t = t.float()
    return t.to(dtype=dtype, device=device), is_torch


def _compute_dtype(dtype):
    """None, or torch.float32/float64 from a name, a torch dtype or a NumPy dtype."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    else:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = None
    if name not in ("float32", "float64"):
        raise ValueError(f"dtype must be None, 'float32' or 'float64', got {dtype!r}")
    return getattr(torch, name)


def _features(name, X, d=None):
    """X as (n, d): a 1-D X is n points with one feature."""
    if X.dim() == 1:
        X = X[:, None]
    if X.dim() != 2:
        raise ValueError(f"{name} must be (n,) or (n, d), got shape {_shape(X)}")
    if d is not None and X.shape[1] != d:
        raise ValueError(
            f"{name} has {X.shape[1]} features (shape {_shape(X)}) but the estimator "
            f"was fitted with {d}"
        )
    return X


def _check_finite(name, t):
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or inf (shape {_shape(t)})")


def _back(t, is_torch, device):
    return t.to(device) if is_torch else t.cpu().numpy()


# --- bandwidths ----------------------------------------------------------------------


def rule_of_thumb(X, rule="silverman"):
    """Per-feature rule-of-thumb bandwidths for X ``(n, d)`` (a tensor), shape ``(d,)``.

    ``A_f = min(std_f, IQR_f / 1.349)`` (the robust spread; ``std`` alone where the
    IQR is 0) and ``h_f = c * A_f * n**(-1 / (d + 4))`` with ``c = 0.9`` (Silverman)
    or ``1.059`` (Scott). For d = 1 these are statsmodels' ``bw_silverman`` and
    ``bw_scott``. A constant feature gets ``h_f = 1``: its distances are all zero.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    X = _features("X", X)
    n, d = X.shape
    if n < 2:
        raise ValueError(f"a rule of thumb needs at least 2 points, got X of shape {_shape(X)}")
    X = X.double()
    std = X.std(dim=0)
    iqr = (_quantile(X, 0.75) - _quantile(X, 0.25)) / 1.349
    spread = torch.where(iqr > 0, torch.minimum(std, iqr), std)
    spread = torch.where(spread > 0, spread, torch.ones_like(spread))
    c = 0.9 if rule == "silverman" else 1.059
    return c * spread * n ** (-1.0 / (d + 4))


def _quantile(X, q):
    """Per-column quantile with NumPy's default linear interpolation (torch.quantile
    refuses inputs of more than 2**24 elements)."""
    ordered = X.sort(dim=0).values
    position = q * (X.shape[0] - 1)
    below = math.floor(position)
    above = min(below + 1, X.shape[0] - 1)
    return ordered[below] + (position - below) * (ordered[above] - ordered[below])


def _pool(Xq, Xk, Y, h, exclude_self, backend):
    """NW prediction at Xq (n, d) from keys Xk (m, d), values Y (m, c), bandwidth h.

    ``h`` is a 0-d tensor (one Gaussian std for all features: ``w = 1 / h**2``) or
    ``(d,)`` (scale feature f by ``1 / h_f``, then ``w = 1``). Differentiable in h.
    """
    if h.dim() == 0:
        return nw_pool(Xq, Xk, Y, h**-2, exclude_self=exclude_self, backend=backend)
    scale = 1.0 / h
    return nw_pool(Xq * scale, Xk * scale, Y, 1.0, exclude_self=exclude_self, backend=backend)


def loo_mse(X, y, bandwidth, *, backend="auto"):
    """Leave-one-out mean squared error of NW regression at a fixed bandwidth.

    ``X`` ``(n,)`` or ``(n, d)``, ``y`` ``(n,)`` or ``(n, c)`` (NumPy or torch),
    ``bandwidth`` a float (one std for all features) or ``(d,)`` per feature. Point i
    is predicted from the other n - 1 points; the mean is over points and outputs.
    This is statsmodels' ``cv_ls`` criterion, computed with one fused pass.
    """
    X, _ = _to_tensor("X", X)
    X = _features("X", X)
    y, _ = _to_tensor("y", y, dtype=X.dtype, device=X.device)
    Y = y[:, None] if y.dim() == 1 else y
    if isinstance(bandwidth, torch.Tensor):
        bandwidth = bandwidth.detach().cpu().numpy()
    h = torch.as_tensor(np.asarray(bandwidth, dtype=np.float64)).to(X.dtype).to(X.device)
    with torch.no_grad():
        pred = _pool(X, X, Y, h, True, backend)
    return float(((pred - Y) ** 2).mean())


# --- the estimator -------------------------------------------------------------------


class NadarayaWatson:
    """Nadaraya-Watson (local constant) kernel regression with a Gaussian kernel.

    ``predict(x) = sum_i K_h(x - X_i) y_i / sum_i K_h(x - X_i)``, computed by
    :func:`nwfast.nw_pool` without ever holding the n x m kernel matrix.

    Args:
        bandwidth: how to choose ``h``, the Gaussian's standard deviation:

            - a positive number: one ``h`` for all features (``w = 1 / h**2``);
            - a positive array of d numbers: one ``h_f`` per feature;
            - ``"scott"`` / ``"silverman"``: per-feature rules of thumb (see
              :func:`rule_of_thumb`), fast but blind to y;
            - ``"loo"``: the ``h`` minimising the leave-one-out MSE (statsmodels'
              ``cv_ls``), found by gradient steps on ``log h`` through the fused
              operator with ``exclude_self=True``.

        per_feature: with ``"loo"``, learn one ``h_f`` per feature (a product kernel,
            as statsmodels' ``KernelReg``) instead of one ``h`` for all. A single ``h``
            on raw features assumes they share a scale: standardise them first.
        max_iter: most L-BFGS iterations of the ``"loo"`` search.
        tol: the ``"loo"`` search stops once an iteration improves the LOO MSE by less
            than ``tol`` relative to it.
        dtype: compute dtype, ``"float32"`` or ``"float64"``; ``None`` keeps the float
            dtype of the training data (NumPy's default is float64; float32 data runs
            about twice as fast on CPU).
        backend: passed to :func:`nwfast.nw_pool`.
        verbose: print the ``"loo"`` search's progress.

    Attributes (after ``fit``):
        bandwidth_: the chosen ``h``: a float where one ``h`` serves all features, a
            NumPy array ``(d,)`` where each feature has its own (an array was given,
            a rule on d > 1 features, or ``"loo"`` with ``per_feature=True``).
        loo_mse_: the leave-one-out MSE at ``bandwidth_``.
        n_features_in_: d.
        n_iter_: L-BFGS iterations run (0 for a fixed or rule-of-thumb bandwidth).

    How ``"loo"`` searches: the LOO MSE as a function of ``log h`` is smooth but can
    have more than one dip, and Silverman's rule, a density rule, often oversmooths
    for regression. So the search starts at Silverman's ``h`` and walks by factors of 2
    (forward passes only, no gradients) while the LOO MSE falls. A parabola through
    the best point and its two neighbours gives a start and the curvature, and L-BFGS
    with a strong-Wolfe line search runs on ``log h`` rescaled by that curvature, so
    that its first step is a Newton step. On one parameter L-BFGS is a safeguarded
    secant method: at n = 20000 the whole search is 4 forward passes and 2 to 4
    forward+backward passes, where Adam with a fixed step would need tens.

    NumPy in, NumPy out; torch in (CPU or CUDA), torch out on the input's device.
    """

    def __init__(
        self,
        bandwidth="silverman",
        *,
        per_feature=False,
        max_iter=50,
        tol=1e-5,
        dtype=None,
        backend="auto",
        verbose=False,
    ):
        self.bandwidth = bandwidth
        self.per_feature = per_feature
        self.max_iter = max_iter
        self.tol = tol
        self.dtype = dtype
        self.backend = backend
        self.verbose = verbose

    # scikit-learn's parameter protocol, without depending on scikit-learn.

    @classmethod
    def _param_names(cls):
        parameters = inspect.signature(cls.__init__).parameters.values()
        return [p.name for p in parameters if p.name != "self"]

    def get_params(self, deep=True):
        """The constructor's parameters as a dict (``deep`` has nothing to recurse into)."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params):
        """Set constructor parameters by name; returns ``self``."""
        valid = self._param_names()
        for name, value in params.items():
            if name not in valid:
                raise ValueError(
                    f"invalid parameter {name!r} for {type(self).__name__}; valid "
                    f"parameters are {valid}"
                )
            setattr(self, name, value)
        return self

    def __repr__(self):
        defaults = {
            p.name: p.default for p in inspect.signature(type(self).__init__).parameters.values()
        }
        changed = []
        for name, value in self.get_params().items():
            default = defaults[name]
            same = value is default or (
                type(value) is type(default)
                and isinstance(value, (str, int, float, bool))
                and value == default
            )
            if not same:
                changed.append(f"{name}={value!r}")
        return f"{type(self).__name__}({', '.join(changed)})"

    # fitting

    def _check_params(self, d):
        """The fixed bandwidth as a tensor (0-d or (d,)), or a rule/"loo" name."""
        if not isinstance(self.per_feature, bool):
            raise TypeError(f"per_feature must be a bool, got {self.per_feature!r}")
        if not _is_number(self.max_iter, int) or self.max_iter < 0:
            raise ValueError(f"max_iter must be an int >= 0, got {self.max_iter!r}")
        if not _is_number(self.tol, (int, float)) or not self.tol >= 0:
            raise ValueError(f"tol must be a number >= 0, got {self.tol!r}")
        _compute_dtype(self.dtype)

        bandwidth = self.bandwidth
        if isinstance(bandwidth, str):
            if bandwidth not in (*RULES, "loo"):
                raise ValueError(
                    f"bandwidth must be a positive number, a per-feature array, 'scott', "
                    f"'silverman' or 'loo'; got {bandwidth!r}"
                )
            if self.per_feature and bandwidth != "loo":
                raise ValueError(
                    f"per_feature=True applies to bandwidth='loo'; {bandwidth!r} is "
                    "per feature already"
                )
            return bandwidth
        if self.per_feature:
            raise ValueError(
                "per_feature=True applies to bandwidth='loo'; for fixed per-feature "
                "bandwidths pass an array of d numbers"
            )
        if isinstance(bandwidth, bool):
            raise TypeError("bandwidth must be a number, an array or a rule name, got a bool")
        if isinstance(bandwidth, torch.Tensor):
            bandwidth = bandwidth.detach().cpu().numpy()
        try:
            h = np.asarray(bandwidth, dtype=np.float64)
        except (TypeError, ValueError):
            raise TypeError(
                f"bandwidth must be a number, an array or a rule name, got "
                f"{type(self.bandwidth).__name__}"
            ) from None
        if h.ndim > 1 or (h.ndim == 1 and h.shape[0] != d):
            raise ValueError(
                f"bandwidth has shape {h.shape}; expected a number or one per feature, ({d},)"
            )
        if not (np.isfinite(h).all() and (h > 0).all()):
            raise ValueError(f"bandwidth must be positive and finite, got {self.bandwidth!r}")
        return torch.from_numpy(h)

    def fit(self, X, y):
        """Fit to ``X`` ``(n,)`` or ``(n, d)`` and ``y`` ``(n,)`` or ``(n, c)``; returns self."""
        dtype = _compute_dtype(self.dtype)
        X, _ = _to_tensor("X", X, dtype=dtype)
        X = _features("X", X)
        n, d = X.shape
        bandwidth = self._check_params(d)
        y, _ = _to_tensor("y", y, dtype=X.dtype, device=X.device)
        if y.dim() not in (1, 2) or y.shape[0] != n:
            raise ValueError(
                f"y must be (n,) or (n, c) with n = {n} rows of X (shape {_shape(X)}), "
                f"got shape {_shape(y)}"
            )
        if n < 2:
            raise ValueError(f"fit needs at least 2 points, got X of shape {_shape(X)}")
        _check_finite("X", X)
        _check_finite("y", y)

        self.X_fit_ = X.contiguous()
        self.y_fit_ = (y[:, None] if y.dim() == 1 else y).contiguous()
        self._y_ndim = y.dim()
        self.n_features_in_ = d
        self.n_iter_ = 0

        if isinstance(bandwidth, str) and bandwidth == "loo":
            h, self.loo_mse_ = self._search_loo(X, self.y_fit_)
        else:
            if isinstance(bandwidth, str):
                h = rule_of_thumb(X, bandwidth).to(X.dtype)
                h = h[0] if d == 1 else h
            else:
                h = bandwidth.to(X.dtype).to(X.device)
            with torch.no_grad():
                pred = _pool(X, X, self.y_fit_, h, True, self.backend)
            self.loo_mse_ = float(((pred - self.y_fit_) ** 2).mean())
        self._h = h.detach()
        # A single std is a float; per-feature stds stay an array.
        self.bandwidth_ = float(h) if h.dim() == 0 else h.cpu().double().numpy()
        return self

    def _search_loo(self, X, Y):
        """The bandwidth minimising the LOO MSE, and that MSE (see the class docstring)."""
        start = rule_of_thumb(X, "silverman").to(X.dtype)
        if not self.per_feature:
            start = start.log().mean().exp()  # geometric mean: one h for all features
        # The loss is divided by the variance of y so that its gradient in log h has
        # the same size whatever the units of y: L-BFGS's first step depends on it.
        var_y = float(Y.var(dim=0, unbiased=False).mean())
        var_y = var_y if var_y > 0 else 1.0

        def loss_at(log_h):
            pred = _pool(X, X, Y, log_h.exp(), True, self.backend)
            return ((pred - Y) ** 2).mean() / var_y

        def say(msg):
            if self.verbose:
                print(f"[NadarayaWatson loo] {msg}")

        # Walk by factors of 2 from the rule of thumb while the LOO MSE falls,
        # downwards first (the rule tends to oversmooth), upwards if that fails.
        log2 = math.log(2.0)
        log_start = start.log()
        scanned = {}  # steps of a factor 2 from the start -> loss

        def scan(k):
            with torch.no_grad():
                scanned[k] = float(loss_at(log_start + k * log2))
            say(f"scan h={_fmt(start * 2.0**k)} loss={scanned[k]:.6g}")
            return scanned[k]

        scan(0)
        for direction in (-1, 1):
            k = 0
            while abs(k) < 8 and scan(k + direction) < scanned[k]:
                k += direction
            if k != 0:
                break
        k = min(scanned, key=scanned.get)

        # A parabola through the best point and its two neighbours gives where to
        # start and the curvature; L-BFGS then works on u = (log h - center) *
        # sqrt(curvature), whose second derivative is about 1, so that its first
        # step, the plain negative gradient, is already a Newton step.
        offset, scale = float(k), 1.0
        if k - 1 in scanned and k + 1 in scanned:
            below, here, above = scanned[k - 1], scanned[k], scanned[k + 1]
            curvature = below - 2 * here + above  # per step of log 2, squared
            if curvature > 1e-12:
                offset += 0.5 * (below - above) / curvature
                scale = math.sqrt(curvature) / log2
        center = log_start + offset * log2
        best = {"loss": scanned[k], "log_h": log_start + k * log2}

        u = torch.zeros_like(center, requires_grad=True)
        optimizer = torch.optim.LBFGS(
            [u],
            lr=1.0,
            max_iter=self.max_iter,
            # The loss is relative to var(y) and near its minimum: an absolute
            # tolerance of tol * loss is the relative one.
            tolerance_change=self.tol * scanned[k],
            history_size=10,
            line_search_fn="strong_wolfe",
        )

        def closure():
            optimizer.zero_grad()
            log_h = center + u / scale
            loss = loss_at(log_h)
            loss.backward()
            value = float(loss.detach())
            say(f"L-BFGS h={_fmt(log_h.exp())} loss={value:.6g}")
            if value < best["loss"]:
                best["loss"], best["log_h"] = value, log_h.detach().clone()
            return loss

        if self.max_iter > 0:
            optimizer.step(closure)
        self.n_iter_ = optimizer.state[u].get("n_iter", 0)
        return best["log_h"].exp(), best["loss"] * var_y

    # prediction

    def _check_fitted(self):
        if not hasattr(self, "X_fit_"):
            raise RuntimeError(f"this {type(self).__name__} is not fitted yet: call fit(X, y)")

    def predict(self, X):
        """Predictions at ``X`` ``(n,)`` or ``(n, d)``: ``(n,)`` or ``(n, c)`` as y was."""
        self._check_fitted()
        X, is_torch = _to_tensor("X", X)
        device = X.device
        X = _features("X", X, self.n_features_in_).to(self.X_fit_.dtype).to(self.X_fit_.device)
        with torch.no_grad():
            pred = _pool(X, self.X_fit_, self.y_fit_, self._h, False, self.backend)
        if self._y_ndim == 1:
            pred = pred[:, 0]
        return _back(pred, is_torch, device)

    def score(self, X, y):
        """R^2 of ``predict(X)`` against ``y``, averaged over outputs (as scikit-learn)."""
        pred = self.predict(X)
        pred, _ = _to_tensor("prediction", pred)
        y, _ = _to_tensor("y", y, dtype=pred.dtype, device=pred.device)
        if y.shape != pred.shape:
            raise ValueError(f"y has shape {_shape(y)}, expected {_shape(pred)} for this X")
        pred = pred.double().reshape(y.shape[0], -1)
        y = y.double().reshape(y.shape[0], -1)
        residual = ((y - pred) ** 2).sum(0)
        total = ((y - y.mean(0)) ** 2).sum(0)
        # A constant output is explained perfectly or not at all, as in scikit-learn.
        r2 = torch.where(
            total > 0, 1 - residual / total.clamp_min(1e-300), (residual == 0).double()
        )
        return float(r2.mean())


def _is_number(x, types):
    return isinstance(x, types) and not isinstance(x, bool)


def _fmt(h):
    h = h.detach().cpu().double()
    return f"{float(h):.5g}" if h.dim() == 0 else np.array2string(h.numpy(), precision=4)


# --- benchmark hook ------------------------------------------------------------------


def time_loo_fit(X, y, *, statsmodels=True, dtype="float32", backend="auto"):
    """Time ``NadarayaWatson(bandwidth="loo").fit`` against statsmodels' ``cv_ls``.

    One call per side on the same data (NumPy ``X`` ``(n,)`` or ``(n, d)``, ``y``
    ``(n,)``); both LOO MSEs are computed with :func:`loo_mse` so they are comparable.
    statsmodels' ``KernelReg`` cross-validation is O(n^2) Python-level work per
    evaluation: keep ``n`` to a few hundred when ``statsmodels=True``.

    Returns a dict: ``n``, ``d``, ``nwfast_s``, ``nwfast_bandwidth``,
    ``nwfast_loo_mse``, ``nwfast_n_iter`` and, with statsmodels, ``statsmodels_s``,
    ``statsmodels_bandwidth``, ``statsmodels_loo_mse``.
    """
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    X2 = X[:, None] if X.ndim == 1 else X
    per_feature = X2.shape[1] > 1
    model = NadarayaWatson("loo", per_feature=per_feature, dtype=dtype, backend=backend)
    t0 = time.perf_counter()
    model.fit(X, y)
    result = {
        "n": X2.shape[0],
        "d": X2.shape[1],
        "nwfast_s": time.perf_counter() - t0,
        "nwfast_bandwidth": np.atleast_1d(model.bandwidth_).tolist(),
        "nwfast_loo_mse": loo_mse(X2, y, model.bandwidth_, backend=backend),
        "nwfast_n_iter": model.n_iter_,
    }
    if statsmodels:
        from statsmodels.nonparametric.kernel_regression import KernelReg

        t0 = time.perf_counter()
        reg = KernelReg(y, X2, var_type="c" * X2.shape[1], reg_type="lc", bw="cv_ls")
        result["statsmodels_s"] = time.perf_counter() - t0
        bw = np.asarray(reg.bw, dtype=np.float64)
        result["statsmodels_bandwidth"] = bw.tolist()
        result["statsmodels_loo_mse"] = loo_mse(
            X2, y, bw if per_feature else bw[0], backend=backend
        )
    return result
