"""Kernel regression estimators for scikit-learn: ``NadarayaWatson`` and
``LocalLinearRegression``.

Both speak in bandwidths, as statsmodels and scikit-learn do: ``h`` is the
Gaussian's standard deviation. Every pass scales the data by ``1 / h`` (one h,
or one per feature) and pools with ``w = 1``, which keeps the operator's numbers
near 1 at any scale of X (``w = h**-2`` would overflow float32 past |X| ~ 1e19).
"""

import math
from typing import NamedTuple

import numpy as np
import torch
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.metrics import r2_score
from sklearn.utils.validation import check_is_fitted, validate_data

from nwfast._checks import resolve_tolerance
from nwfast._search import search_log_h
from nwfast.bandwidth import RULES, rule_of_thumb
from nwfast.functional import nw_pool, nw_pool_with_lse
from nwfast.local_linear import (
    local_linear_pool,
    moment_layout,
    moments,
    solve_moments,
    sum_squared_weights,
)

__all__ = ["LocalLinearRegression", "NadarayaWatson", "expected_failed_checks", "rule_of_thumb"]

# Points in the pilot search that starts a "loo" search on large data.
PILOT_POINTS = 1 << 14
# The "loo" search's passes may skip keys worth this much of a row's softmax mass
# (nw_pool's tolerance; float64's own is 2**-53): each leave-one-out prediction
# moves by at most 2e-9 max|y|, far below what the search's tol resolves, and
# about a quarter fewer pairs are computed.
SEARCH_TOLERANCE = 1e-9


# --- input conversion ----------------------------------------------------------------


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


def _torch_float(name, t):
    """A torch tensor as a float tensor the kernels compute in (detached)."""
    if t.is_complex():
        raise TypeError(f"{name} must be real, got dtype {t.dtype}")
    if t.dtype == torch.bool or not t.is_floating_point():
        t = t.to(torch.get_default_dtype())
    # The CPU kernels compute in float32 or float64; half precision is a GPU dtype.
    if t.dtype in (torch.float16, torch.bfloat16) and t.device.type == "cpu":
        t = t.float()
    return t.detach()


def _check_finite(name, t):
    # NumPy on CPU: one thread, where torch's thread pool can stall on busy cores.
    finite = np.isfinite(t.numpy()).all() if t.device.type == "cpu" else torch.isfinite(t).all()
    if not finite:
        raise ValueError(f"Input {name} contains NaN or infinity (shape {tuple(t.shape)}).")


def _as_tensor(array):
    # A writable C-contiguous copy where needed: torch warns on read-only memory.
    return torch.from_numpy(np.require(array, requirements=["C", "W"]))


def _features(estimator, X, reset):
    """(n,) is n samples of one feature; sets or checks ``n_features_in_``."""
    shape = tuple(X.shape)
    if X.dim() == 1:
        X = X[:, None]
    if X.dim() != 2:
        raise ValueError(f"X must be (n_samples,) or (n_samples, n_features), got shape {shape}")
    if reset:
        estimator.n_features_in_ = X.shape[1]
    elif X.shape[1] != estimator.n_features_in_:
        expected = estimator.n_features_in_
        message = (
            f"X has {X.shape[1]} features, but {type(estimator).__name__} is expecting "
            f"{expected} features as input."
        )
        if len(shape) == 1:
            message += (
                f" A 1-D X of shape {shape} is read as {shape[0]} samples of one feature; "
                "Reshape your data with X.reshape(1, -1) if it is a single sample."
            )
        raise ValueError(message)
    return X


def _validate_fit(estimator, X, y, dtype):
    """X as a (n, d) tensor and y as (n,) or (n, c), in the compute dtype.

    Array-likes go through scikit-learn's own validation (lists, pandas with
    nullable dtypes, object arrays, sparse input refused, NaN refused, feature
    names); torch tensors are checked here and stay on their device.
    """
    if getattr(y, "ndim", None) == 2 and y.shape[1] == 0:  # before scikit-learn's message
        raise ValueError(f"y has shape {tuple(y.shape)}: no output to fit")
    if isinstance(X, torch.Tensor):
        X = _torch_float("X", X)
        vars(estimator).pop("feature_names_in_", None)  # as scikit-learn's reset does
        if y is None:
            raise ValueError(
                f"This {type(estimator).__name__} estimator requires y to be passed, "
                "but the target y is None."
            )
    else:
        X, y = validate_data(
            estimator, X, y, ensure_2d=False, dtype=(np.float64, np.float32), multi_output=True,
            y_numeric=True, ensure_min_samples=2,
        )  # fmt: skip
        X = _as_tensor(X)
    X = _features(estimator, X, reset=True)
    X = X if dtype is None else X.to(dtype)
    y = _torch_float("y", y) if isinstance(y, torch.Tensor) else _as_tensor(np.asarray(y))
    y = y.to(dtype=X.dtype, device=X.device)
    if y.dim() not in (1, 2) or y.shape[0] != X.shape[0]:
        raise ValueError(
            f"y must be (n_samples,) or (n_samples, n_outputs) with the {X.shape[0]} rows of "
            f"X (shape {tuple(X.shape)}), got shape {tuple(y.shape)}"
        )
    if X.shape[0] < 2:
        raise ValueError(f"fit needs at least 2 samples, got n_samples = {X.shape[0]}")
    # After the conversion to the compute dtype, which can overflow.
    _check_finite("X", X)
    _check_finite("y", y)
    return X, y


def _validate_predict(estimator, X):
    """X as a (n, d) tensor checked against the fit, and whether it came as torch."""
    is_torch = isinstance(X, torch.Tensor)
    if is_torch:
        X = _torch_float("X", X)
    else:
        X = _as_tensor(
            validate_data(
                estimator, X, ensure_2d=False, dtype=(np.float64, np.float32), reset=False
            )
        )
    X = _features(estimator, X, reset=False)
    _check_finite("X", X)
    return X, is_torch


def _back(t, is_torch, like):
    """A result in the dtype and on the device of the X it answers: the compute dtype
    is how the kernels work, not what the caller gets back (float64 data give
    float64 predictions, as scikit-learn expects, whatever ``dtype`` is)."""
    t = t.to(dtype=like.dtype, device=like.device)
    return t if is_torch else t.numpy()


def _is_number(x, types):
    return isinstance(x, types) and not isinstance(x, bool)


class _LeaveOneOut(NamedTuple):
    residuals: torch.Tensor  # y_i minus its prediction from the other n - 1 points, (n, c)
    mse: float


# --- the shared estimator ------------------------------------------------------------

_COMMON_DOC = """
    Parameters:
        bandwidth: how to choose ``h``, the Gaussian's standard deviation:

            - a positive number: one ``h`` for all features;
            - a positive array of d numbers: one ``h_f`` per feature (feature f is
              scaled by ``1 / h_f``);
            - ``"scott"`` / ``"silverman"``: per-feature rules of thumb (see
              :func:`rule_of_thumb`), fast but blind to y;
            - ``"loo"`` (the default, statsmodels' ``cv_ls``): the ``h`` that
              minimises the leave-one-out mean squared error, found by the search
              described below.

        per_feature: with ``"loo"``, learn one ``h_f`` per feature (a product kernel,
            as statsmodels' ``KernelReg``) instead of one ``h`` for all. A single ``h``
            on raw features assumes they share a scale: standardise them first
            (``make_pipeline(StandardScaler(), ...)``).
        max_iter: most L-BFGS iterations of the ``"loo"`` search.
        tol: the ``"loo"`` search stops once an iteration improves the leave-one-out
            MSE by less than ``tol`` relative to it.
        dtype: compute dtype, ``"float32"`` or ``"float64"``; ``None`` keeps the float
            dtype of the training data (integers become float64; float32 data runs
            about twice as fast on CPU). Predictions come back in the float dtype
            of the X they answer, whatever the compute dtype.
        backend: the kernels' backend, ``"auto"`` (Numba on CPU, Triton on CUDA),
            ``"numba"``, ``"triton"`` or ``"torch"`` (the plain reference).
        verbose: print the ``"loo"`` search's progress.

    Attributes (after ``fit``):
        bandwidth_: the chosen ``h``: a float where one ``h`` serves all features, a
            NumPy array ``(d,)`` where each feature has its own.
        loo_mse_: the leave-one-out MSE at ``bandwidth_``. The ``"loo"`` search knows
            it; for a fixed or rule-of-thumb bandwidth it is computed on first use
            (one n x n pass, shared with ``predict(..., return_std=True)``), so that
            ``fit`` itself costs O(n).
        n_features_in_, feature_names_in_: as in scikit-learn.
        n_iter_: L-BFGS iterations of the ``"loo"`` search (0 for a fixed or
            rule-of-thumb bandwidth).

    Standard errors: ``predict(X, return_std=True)`` returns ``(mean, std)``, as
    ``GaussianProcessRegressor`` does. The prediction is linear in y,
    ``yhat(x) = sum_j l_j(x) y_j``, so with independent noise of local variance
    ``sigma^2(x)``, ``Var yhat(x) ~= sigma^2(x) * sum_j l_j(x)**2``. ``sigma^2(x)``
    is estimated by the squared leave-one-out residuals ``e_j = y_j - yhat_-j(x_j)``
    (this estimator's own) smoothed with the kernel weights ``p_j(x)`` (non-negative,
    so the estimate is too), and ``sum_j l_j**2`` comes from one more fused pass at
    ``2 w``: ``sum_j p_j**2 = exp(lse(2 w) - 2 lse(w))``. The band ``mean +- 1.96 std``
    is for the smoother's mean ``E yhat(x)``: it ignores the smoothing bias (largest
    where the function curves sharply; Nadaraya-Watson also at the ends of the
    data), treats ``h`` as fixed although ``"loo"`` chose it from the same data,
    and assumes the noise varies slowly with x. The leave-one-out residuals carry
    some bias and variance of their own, which widens the band slightly.

    How ``"loo"`` searches: the leave-one-out MSE as a function of ``log h`` is
    smooth but can have more than one dip, and Silverman's rule, a density rule,
    often oversmooths for regression. So the search starts at Silverman's ``h`` and
    walks by factors of 2 (forward passes only) while the error falls. A parabola
    through the best point and its two neighbours gives a start and the curvature,
    and L-BFGS with a strong-Wolfe line search runs on ``log h`` rescaled by that
    curvature, so that its first step is a Newton step: a few forward+backward
    passes of the fused operator with ``exclude_self=True``. It raises a
    ``ValueError`` where the criterion cannot be evaluated (it is not finite at the
    starting bandwidth).

    Input: X ``(n_samples, n_features)``, or ``(n_samples,)`` for one feature; y
    ``(n_samples,)`` or ``(n_samples, n_outputs)``. Array-likes (lists, NumPy,
    pandas) go through scikit-learn's validation and give NumPy results; torch
    tensors (CPU or CUDA) give tensors on the same device. Results take X's float
    dtype (integers read as float64 from NumPy, torch's default dtype from torch).

    Deviations from scikit-learn's conventions, declared to its checks by
    :func:`expected_failed_checks`: a 1-D X is accepted as one feature (the
    textbook's use, ``fit(x, y)`` on a vector), where scikit-learn requires 2-D X
    (``check_fit1d``). ``n_iter_`` is 0 where no search runs (a fixed or
    rule-of-thumb bandwidth), where scikit-learn expects at least 1 from an estimator
    with ``max_iter`` (``check_non_transformer_estimators_n_iter``). A y of shape
    ``(n, 1)`` stays 2-D in the predictions, as for any multi-output regressor
    (scikit-learn's ``LinearRegression`` does the same).
"""


class _KernelRegressor(RegressorMixin, BaseEstimator):
    """Fitting, prediction and the bandwidth search shared by the estimators; the
    subclasses say how one pass predicts (``_fit_at``) and its variance
    (``_fit_and_variance``)."""

    def __init__(
        self,
        bandwidth="loo",
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

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.target_tags.single_output = True
        return tags

    # parameters

    def _check_params(self, d):
        """The fixed bandwidth as a tensor (0-d or (d,)), or a rule or "loo"."""
        if not isinstance(self.per_feature, bool):
            raise TypeError(f"per_feature must be a bool, got {self.per_feature!r}")
        if not _is_number(self.max_iter, (int, np.integer)) or self.max_iter < 0:
            raise ValueError(f"max_iter must be an int >= 0, got {self.max_iter!r}")
        if not _is_number(self.tol, (int, float, np.number)) or not self.tol >= 0:
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

    # fitting

    def fit(self, X, y):
        """Fit to X ``(n_samples, n_features)`` or ``(n_samples,)`` and y
        ``(n_samples,)`` or ``(n_samples, n_outputs)``; returns self.

        With a fixed or rule-of-thumb bandwidth this only checks and keeps the data,
        O(n); ``"loo"`` runs the bandwidth search.
        """
        X, y = _validate_fit(self, X, y, _compute_dtype(self.dtype))
        bandwidth = self._check_params(X.shape[1])
        self.X_fit_ = X.contiguous()
        self.y_fit_ = (y[:, None] if y.dim() == 1 else y).contiguous()
        self._y_ndim = y.dim()
        self._loo = None
        self.n_iter_ = 0
        if isinstance(bandwidth, str) and bandwidth == "loo":
            h, best_pred = self._search_loo(self.X_fit_, self.y_fit_)
            self._loo = self._loo_from(best_pred)
        elif isinstance(bandwidth, str):
            h = rule_of_thumb(X, bandwidth).to(X.dtype).to(X.device)
            h = h[0] if X.shape[1] == 1 else h
        else:
            h = bandwidth.to(X.dtype).to(X.device)
        self._h = h.detach()
        # A single std is a float; per-feature stds stay an array.
        self.bandwidth_ = float(h) if h.dim() == 0 else h.cpu().double().numpy()
        return self

    def _leave_one_out(self):
        """Residuals and MSE of predicting each training point from the others."""
        if self._loo is None:
            with torch.no_grad():
                pred = self._fit_at(self.X_fit_, self.X_fit_, self.y_fit_, self._h, True)
            self._loo = self._loo_from(pred)
        return self._loo

    def _loo_from(self, pred):
        residuals = self.y_fit_ - pred
        return _LeaveOneOut(residuals, float((residuals.double() ** 2).mean()))

    @property
    def loo_mse_(self):
        check_is_fitted(self)
        return self._leave_one_out().mse

    def _search_loo(self, X, Y):
        """The bandwidth minimising the leave-one-out MSE (see the class docstring),
        and the leave-one-out predictions there (for ``loo_mse_`` and the std)."""
        start, step = self._search_start(X, Y)
        # The loss is relative to the variance of y, so that its gradient in log h has
        # the same size whatever the units of y (L-BFGS's first step depends on it),
        # and y is scaled to at most 1 first, so that no square overflows.
        y_scale = Y.abs().amax(dim=0).double().clamp_min(torch.finfo(torch.float64).tiny)
        var_y = float((Y.double() / y_scale).var(dim=0, unbiased=False).mean())
        var_y = var_y if var_y > 0 else 1.0
        best = {"loss": math.inf}
        tolerance = max(SEARCH_TOLERANCE, resolve_tolerance(None, X.dtype))

        def loss_at(log_h):
            pred = self._fit_at(X, X, Y, log_h.exp(), True, tolerance)
            loss = (((pred - Y).double() / y_scale) ** 2).mean() / var_y
            value = float(loss.detach())
            if value < best["loss"]:
                best.update(loss=value, log_h=log_h.detach().clone(), pred=pred.detach())
            return loss, value

        def say(msg):
            if self.verbose:
                print(f"[{type(self).__name__} loo] {msg}")

        def loss_and_gradient(u, log_h):
            loss, _ = loss_at(log_h)
            loss.backward()
            return loss

        def value_at(log_h):
            with torch.no_grad():
                return loss_at(log_h)[1]

        self.n_iter_ = search_log_h(
            value_at, loss_and_gradient, start.log(), step, self.max_iter, self.tol, say
        )
        return best["log_h"].exp(), best["pred"]

    def _search_start(self, X, Y):
        """Where the walk starts and its step in log h: Silverman's rule and factors
        of 2; past ``4 * PILOT_POINTS`` points, the search's own answer on a random
        subsample scaled by the n^(-1/(d+4)) rate, and factors of 2^(1/4). The passes
        at the rule's wide bandwidths are the dearest ones (they skip least), and the
        pilot lands close enough to the minimum for finer steps."""
        n, d = X.shape
        if n <= 4 * PILOT_POINTS:
            start = rule_of_thumb(X, "silverman").to(X.dtype).to(X.device)
            if not self.per_feature:
                start = start.log().mean().exp()  # geometric mean: one h for all features
            return start, math.log(2.0)
        # A fixed seed: the same data give the same search.
        pick = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:PILOT_POINTS]
        pick = pick.to(X.device)
        pilot, _ = self._search_loo(X[pick], Y[pick])
        return pilot * (PILOT_POINTS / n) ** (1.0 / (d + 4)), math.log(2.0) / 4

    # prediction

    def predict(self, X, return_std=False):
        """Predictions at X: ``(n,)`` or ``(n, n_outputs)`` as y was in ``fit``.

        With ``return_std=True``, ``(mean, std)``: the standard error of each
        prediction, of the same shape (see the class docstring for the formula and
        what it leaves out). The first such call computes the leave-one-out
        residuals (one n x n pass) if the fit did not.
        """
        check_is_fitted(self)
        X, is_torch = _validate_predict(self, X)
        given = X
        X = X.to(dtype=self.X_fit_.dtype, device=self.X_fit_.device)
        with torch.no_grad():
            if return_std:
                squared = self._leave_one_out().residuals ** 2
                mean, var = self._fit_and_variance(X, self.X_fit_, self.y_fit_, squared, self._h)
                results = (mean, var.clamp_min(0.0).sqrt())
            else:
                results = (self._fit_at(X, self.X_fit_, self.y_fit_, self._h, False),)
        if self._y_ndim == 1:
            results = tuple(r[:, 0] for r in results)
        results = tuple(_back(r, is_torch, given) for r in results)
        return results if return_std else results[0]

    def score(self, X, y, sample_weight=None):
        """R^2 of ``predict(X)`` against y (scikit-learn's ``r2_score``, averaged over
        outputs); NaN in y raises, as there."""
        pred = self.predict(X)
        numpy = [t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else t for t in (y, pred)]
        return r2_score(*numpy, sample_weight=sample_weight)

    # the model's own passes, implemented by each estimator

    def _fit_at(self, Xq, Xk, Y, h, exclude_self, tolerance=None):
        """Predictions at Xq (n, d) from Xk (m, d), Y (m, c) at bandwidth h (0-d or
        (d,)), differentiable with respect to h; ``tolerance`` as nw_pool's, for a
        pass that may skip keys."""
        raise NotImplementedError

    def _fit_and_variance(self, Xq, Xk, Y, squared_residuals, h):
        """(predictions, their variance) at Xq, both (n, c)."""
        raise NotImplementedError


class NadarayaWatson(_KernelRegressor):
    __doc__ = (
        """Nadaraya-Watson (local constant) kernel regression with a Gaussian kernel.

    ``predict(x) = sum_j K_h(x - X_j) y_j / sum_j K_h(x - X_j)``, computed by
    :func:`nwfast.nw_pool` without ever holding the n x m kernel matrix: a weighted
    mean of the training targets, biased towards the inside of the data at its ends
    (see :class:`LocalLinearRegression`). The weights of the standard error are
    ``l_j(x) = p_j(x)``.
    """
        + _COMMON_DOC
    )

    def _fit_at(self, Xq, Xk, Y, h, exclude_self, tolerance=None):
        h0 = h.detach()
        options = {"exclude_self": exclude_self, "backend": self.backend, "tolerance": tolerance}
        if h.dim() == 0:
            # The points scaled by the fixed h0; w = (h0 / h)**2 = 1 carries the gradient.
            return nw_pool(Xq / h0, Xk / h0, Y, (h0 / h) ** 2, **options)
        # nw_pool's w is per key, not per feature: the gradient reaches each h_f
        # through the scaled points.
        return nw_pool(Xq / h, Xk / h, Y, 1.0, **options)

    def _fit_and_variance(self, Xq, Xk, Y, squared_residuals, h):
        q, k, c = Xq / h, Xk / h, Y.shape[1]
        both, lse = nw_pool_with_lse(q, k, torch.cat([Y, squared_residuals], 1), 1.0,
                                     backend=self.backend)  # fmt: skip
        _, lse_2w = nw_pool_with_lse(q, k, Y[:, :1], 2.0, backend=self.backend)
        sum_p2 = torch.exp(lse_2w - 2.0 * lse).to(Y.dtype)
        return both[:, :c], both[:, c:] * sum_p2[:, None]


class LocalLinearRegression(_KernelRegressor):
    __doc__ = (
        """Local-linear kernel regression with a Gaussian kernel (statsmodels'
    ``KernelReg(reg_type="ll")``).

    At each x, the weighted least-squares line (plane in d features) through the
    training data, weights ``p_j(x) = softmax_j(-||x - X_j||^2 / (2 h^2))`` (per
    feature: ``(x_f - X_jf) / h_f``), evaluated at x. Where Nadaraya-Watson averages,
    the line follows a trend to the ends of the data: its bias there is of the order
    of the interior's (``h**2``) instead of ``h``, and it does not depend on the
    density of X. :func:`nwfast.local_linear_pool` computes it from one streaming
    pass of weighted moments per query and a (d+1) x (d+1) solve.

    Where a query's neighbourhood is too thin for a line (the keys that carry its
    weight span fewer than d directions: fewer than d + 1 points in general
    position, duplicates, or a query so far from the data that one point takes all
    the weight) the prediction there falls back to the local-constant
    (Nadaraya-Watson) value, and near such neighbourhoods it moves smoothly from
    one to the other, so that the leave-one-out criterion stays continuous in h;
    see :mod:`nwfast.local_linear` for the test. The weights of the standard error
    are the fit's equivalent kernel ``l_j(x) = p_j(x) (1 + gamma(x) . (X_j - x -
    S1(x)))``, which can be negative (gamma scaled by the line's share).
    """
        + _COMMON_DOC
    )

    def _fit_at(self, Xq, Xk, Y, h, exclude_self, tolerance=None):
        # The fit is invariant to scaling each feature: the points are scaled by the
        # fixed h0 and w_f = (h0_f / h_f)**2 = 1 carries the gradient to h.
        h0 = h.detach()
        return local_linear_pool(
            Xq / h0, Xk / h0, Y, (h0 / h) ** 2, exclude_self=exclude_self, backend=self.backend,
            tolerance=tolerance,
        )  # fmt: skip

    def _fit_and_variance(self, Xq, Xk, Y, squared_residuals, h):
        q, k = Xq / h, Xk / h
        d, c = q.shape[1], Y.shape[1]
        mom, lse = moments(q, k, torch.cat([Y, squared_residuals], 1), 1.0, backend=self.backend)
        fit = solve_moments(mom, d, 2 * c, q.dtype)
        mom_2w, lse_2w = moments(q, k, Y[:, :0], 2.0, backend=self.backend)
        layout = moment_layout(d, 2 * c)
        sigma2 = mom[:, layout.values][:, c:]  # the kernel-weighted mean of e_j**2
        sum_l2 = sum_squared_weights(fit, mom[:, layout.first], mom_2w, lse, lse_2w, d)
        return fit.value[:, :c].to(Y.dtype), (sigma2 * sum_l2[:, None]).to(Y.dtype)


def expected_failed_checks(estimator):
    """The scikit-learn checks these estimators fail on purpose, with the reason:
    pass to ``check_estimator(..., expected_failed_checks=...)`` (as a dict) or to
    ``parametrize_with_checks(..., expected_failed_checks=expected_failed_checks)``."""
    if not isinstance(estimator, _KernelRegressor):
        return {}
    failing = {
        "check_fit1d": "a 1-D X is read as n samples of one feature, the textbook's use",
    }
    searches = isinstance(estimator.bandwidth, str) and estimator.bandwidth == "loo"
    if not searches or estimator.max_iter == 0:
        # n_iter_ counts the iterations that ran, as scikit-learn's glossary defines
        # it: with no search there are none, and reporting 1 would be false.
        # scikit-learn declares the same for its own estimators whose max_iter does
        # not apply to every configuration (Ridge's direct solvers,
        # SelfTrainingClassifier).
        failing["check_non_transformer_estimators_n_iter"] = (
            "n_iter_ is 0 where no search runs: a fixed or rule-of-thumb bandwidth, or max_iter=0"
        )
    return failing
