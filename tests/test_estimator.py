"""The estimators: scikit-learn's contract, their bandwidths, statsmodels' numbers."""

import warnings

import numpy as np
import pytest
import torch
from sklearn.base import clone, is_regressor
from sklearn.exceptions import NotFittedError
from sklearn.metrics import r2_score
from sklearn.model_selection import GridSearchCV, KFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

import nwfast
from nwfast import estimator
from nwfast.estimator import (
    LocalLinearRegression,
    NadarayaWatson,
    expected_failed_checks,
    rule_of_thumb,
)
from nwfast.reference import local_linear_reference, nw_pool_broadcast

ESTIMATORS = [NadarayaWatson, LocalLinearRegression]


def textbook_data(n, seed, d=1):
    rng = np.random.default_rng(seed)
    X = rng.uniform(0, 5, (n, d))
    y = 2 * np.sin(X[:, 0]) + X.sum(1) ** 0.8 + rng.normal(0, 0.5, n)
    return (X[:, 0] if d == 1 else X), y


def reference_fit(cls, Xq, X, Y, h):
    """The float64 references at bandwidth h (a float or one per feature)."""
    scale = 1 / torch.as_tensor(h, dtype=torch.float64)
    q, k = torch.as_tensor(Xq).reshape(len(Xq), -1) * scale, torch.as_tensor(X).reshape(len(X), -1)
    k = k * scale
    Y = torch.as_tensor(Y).reshape(len(X), -1)
    if cls is NadarayaWatson:
        return nw_pool_broadcast(q, k, Y, 1.0)
    return local_linear_reference(q, k, Y, torch.ones(k.shape[1], dtype=torch.float64))


def brute_force_loo_mse(cls, X, y, h):
    """Predict each point from the other n - 1 with the reference, one at a time."""
    X = np.reshape(X, (len(y), -1))
    errors = []
    for i in range(len(y)):
        others = np.arange(len(y)) != i
        pred = reference_fit(cls, X[i : i + 1], X[others], y[others], h)
        errors.append(float(pred[0, 0]) - y[i])
    return float(np.mean(np.square(errors)))


# --- scikit-learn's contract ------------------------------------------------------------


# Every way of choosing h, and float32. A fixed array of h_f cannot meet checks that
# vary the number of features; the rules give one h_f per feature on d > 1 and
# take the same path from there. Strict: a declared deviation that stops failing
# fails the test, so the list stays what the estimators really do.
CHECKED_CONFIGURATIONS = [
    {"bandwidth": 0.5},
    {"bandwidth": "silverman"},
    {"bandwidth": "scott"},
    {"bandwidth": "loo"},
    {"bandwidth": "loo", "per_feature": True},
    {"bandwidth": "loo", "dtype": "float32"},
]


@parametrize_with_checks(
    [cls(**params) for cls in ESTIMATORS for params in CHECKED_CONFIGURATIONS],
    expected_failed_checks=expected_failed_checks,
    xfail_strict=True,
)
def test_scikit_learn_checks(estimator, check):
    check(estimator)


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_is_a_regressor_with_params_and_repr(cls):
    model = cls()
    assert is_regressor(model)
    assert set(model.get_params()) == {
        "bandwidth", "per_feature", "max_iter", "tol", "dtype", "backend", "verbose",
    }  # fmt: skip
    assert repr(model) == f"{cls.__name__}()"
    assert model.set_params(bandwidth=0.3, max_iter=5) is model
    assert repr(model) == f"{cls.__name__}(bandwidth=0.3, max_iter=5)"
    assert clone(model).get_params() == model.get_params()


def test_package_exports_the_estimators():
    assert nwfast.NadarayaWatson is NadarayaWatson
    assert nwfast.LocalLinearRegression is LocalLinearRegression


def test_grid_search_over_a_pipeline_scores_like_hand_made_folds():
    X, y = textbook_data(120, 0, d=2)
    X[:, 1] *= 100  # features on different scales: the scaler matters
    bandwidths = [0.2, 0.5, 1.0]
    cv = KFold(4, shuffle=True, random_state=0)
    search = GridSearchCV(
        make_pipeline(StandardScaler(), NadarayaWatson()),
        {"nadarayawatson__bandwidth": bandwidths},
        cv=cv,
        error_score="raise",
    ).fit(X, y)
    scores = search.cv_results_["mean_test_score"]
    assert np.isfinite(scores).all()
    for h, score in zip(bandwidths, scores):
        folds = []
        for train, test in cv.split(X):
            scaler = StandardScaler().fit(X[train])
            model = NadarayaWatson(h).fit(scaler.transform(X[train]), y[train])
            folds.append(r2_score(y[test], model.predict(scaler.transform(X[test]))))
        assert score == pytest.approx(np.mean(folds), rel=1e-12)
    assert search.best_params_["nadarayawatson__bandwidth"] == bandwidths[np.argmax(scores)]
    assert search.predict(X[:3]).shape == (3,)


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_cross_val_score_and_pipeline_predict(cls):
    X, y = textbook_data(90, 1, d=2)
    pipe = make_pipeline(StandardScaler(), cls(0.5))
    scores = cross_val_score(pipe, X, y, cv=3, error_score="raise")
    assert np.isfinite(scores).all() and (scores > 0.5).all()
    assert pipe.fit(X, y).predict(X).shape == (90,)


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_not_fitted(cls):
    X = np.zeros((3, 1))
    for call in (lambda m: m.predict(X), lambda m: m.score(X, X[:, 0]), lambda m: m.loo_mse_):
        with pytest.raises(NotFittedError):
            call(cls())


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_scikit_learn_input_handling(cls):
    pd = pytest.importorskip("pandas")
    scipy_sparse = pytest.importorskip("scipy.sparse")
    X, y = textbook_data(40, 2, d=2)
    with pytest.raises(TypeError, match="Sparse data was passed"):
        cls(0.5).fit(scipy_sparse.csr_matrix(X), y)
    # Object arrays of numbers convert; of strings they are refused.
    pred = cls(0.5).fit(X.astype(object), y).predict(X)
    np.testing.assert_array_equal(pred, cls(0.5).fit(X, y).predict(X))
    with pytest.raises(ValueError, match="could not convert"):
        cls(0.5).fit(np.full((40, 2), "a", dtype=object), y)
    # pandas: feature names are kept and checked; nullable dtypes with NA are NaN.
    frame = pd.DataFrame(X, columns=["a", "b"])
    model = cls(0.5).fit(frame, y)
    assert list(model.feature_names_in_) == ["a", "b"]
    with pytest.raises(ValueError, match="feature names"):
        model.predict(frame.rename(columns={"a": "c"}))
    nullable = frame.astype("Float64")
    nullable.iloc[3, 0] = pd.NA
    with pytest.raises(ValueError, match="Input X contains NaN"):
        cls(0.5).fit(nullable, y)
    np.testing.assert_allclose(
        cls(0.5).fit(frame.astype("Float64"), pd.Series(y, dtype="Float64")).predict(frame), pred
    )


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_bad_data(cls):
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(20, 2)), rng.normal(size=20)
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        cls().fit(X, y[:19])
    with pytest.raises(ValueError, match="dim 3"):
        cls().fit(X[..., None], y)
    with pytest.raises(ValueError, match="Input X contains NaN"):
        cls().fit(np.where(X > 0.5, np.nan, X), y)
    with pytest.raises(ValueError, match="Input y contains infinity"):
        cls().fit(X, np.where(y > 0.5, np.inf, y))
    with pytest.raises(ValueError, match="Complex data not supported"):
        cls().fit(X + 1j, y)
    with pytest.raises(ValueError, match="1 sample"):
        cls().fit(X[:1], y[:1])
    with pytest.raises(ValueError, match=r"y has shape \(20, 0\)"):
        cls().fit(X, np.zeros((20, 0)))
    with pytest.raises(ValueError, match="Input X contains NaN or infinity"):
        cls(dtype="float32").fit(X * 1e300, y)  # finite in float64, not in float32
    model = cls(0.5).fit(X, y)
    with pytest.raises(ValueError, match="X has 3 features, but .* expecting 2 features"):
        model.predict(rng.normal(size=(4, 3)))
    with pytest.raises(ValueError, match="Reshape your data"):
        model.predict(X[0])
    with pytest.raises(ValueError, match="Input X contains NaN"):
        model.predict(np.where(X > 0.5, np.nan, X))
    with pytest.raises(ValueError, match="contains NaN"):
        model.score(X, np.where(y > 0.5, np.nan, y))
    # torch tensors are checked here rather than by scikit-learn
    with pytest.raises(ValueError, match="Input X contains NaN"):
        model.predict(torch.full((3, 2), float("nan")))
    with pytest.raises(TypeError, match="must be real"):
        cls().fit(torch.ones(5, 2, dtype=torch.complex64), torch.ones(5))
    with pytest.raises(ValueError, match=r"y has shape \(5, 0\)"):
        cls().fit(torch.ones(5, 2), torch.ones(5, 0))


@pytest.mark.parametrize(
    "params, error, match",
    [
        ({"bandwidth": "cv"}, ValueError, "'scott', 'silverman' or 'loo'"),
        ({"bandwidth": -1.0}, ValueError, "positive and finite"),
        ({"bandwidth": 0.0}, ValueError, "positive and finite"),
        ({"bandwidth": [0.5, 0.5, 0.5]}, ValueError, r"shape \(3,\).*\(2,\)"),
        ({"bandwidth": True}, TypeError, "bool"),
        ({"bandwidth": {"h": 1}}, TypeError, "dict"),
        ({"bandwidth": 1.0, "per_feature": True}, ValueError, "per_feature=True applies"),
        ({"bandwidth": "loo", "max_iter": -1}, ValueError, "max_iter"),
        ({"bandwidth": "loo", "tol": "small"}, ValueError, "tol"),
        ({"dtype": "float16"}, ValueError, "dtype"),
    ],
)
@pytest.mark.parametrize("cls", ESTIMATORS)
def test_bad_parameters(cls, params, error, match):
    X, y = np.random.default_rng(0).normal(size=(20, 2)), np.zeros(20)
    with pytest.raises(error, match=match):
        cls(**params).fit(X, y)


# --- shapes, types, devices ------------------------------------------------------------


@pytest.mark.parametrize("y_shape", [(), (1,), (3,)], ids=["y(n,)", "y(n,1)", "y(n,c)"])
@pytest.mark.parametrize("d", [None, 1, 2], ids=["X(n,)", "X(n,1)", "X(n,2)"])
@pytest.mark.parametrize("cls", ESTIMATORS)
def test_fit_predict_shapes_numpy(cls, d, y_shape):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(30,) if d is None else (30, d))
    y = rng.normal(size=(30, *y_shape))
    model = cls(bandwidth=0.7).fit(X, y)
    assert model.fit(X, y) is model
    assert model.n_features_in_ == (1 if d is None else d)
    pred = model.predict(X[:7])
    assert isinstance(pred, np.ndarray) and pred.dtype == np.float64
    assert pred.shape == (7, *y_shape)
    mean, std = model.predict(X[:7], return_std=True)
    np.testing.assert_allclose(mean, pred, rtol=1e-14)
    assert std.shape == pred.shape and (std > 0).all()


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_torch_in_torch_out_keeps_dtype(cls):
    X, y = torch.rand(40, 2), torch.randn(40)
    model = cls("silverman").fit(X, y)
    pred = model.predict(X[:5])
    assert isinstance(pred, torch.Tensor) and pred.dtype == torch.float32
    assert pred.shape == (5,)
    mean, std = model.predict(X[:5], return_std=True)
    assert isinstance(std, torch.Tensor) and std.shape == (5,)
    # NumPy queries on a torch-fitted model come back as NumPy.
    assert isinstance(model.predict(X[:5].numpy()), np.ndarray)
    assert model.score(X, y) == pytest.approx(r2_score(y.numpy(), model.predict(X).numpy()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cls", ESTIMATORS)
def test_cuda_in_cuda_out(cls):
    X, y = textbook_data(300, 0)
    Xc = torch.tensor(X, device="cuda", dtype=torch.float32)
    yc = torch.tensor(y, device="cuda", dtype=torch.float32)
    model = cls("loo").fit(Xc, yc)
    mean, std = model.predict(Xc[:10], return_std=True)
    assert mean.device.type == std.device.type == "cuda" and mean.shape == (10,)
    cpu = cls("loo").fit(X, y)
    assert model.bandwidth_ == pytest.approx(cpu.bandwidth_, rel=0.02)


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_predictions_take_the_dtype_of_x(cls):
    """The compute dtype is how the kernels work; results come in X's dtype."""
    X, y = textbook_data(40, 2, d=2)
    for compute in ("float32", "float64"):
        model = cls(0.5, dtype=compute).fit(X, y)
        for given in (np.float32, np.float64):
            Xq = X[:5].astype(given)
            mean, std = model.predict(Xq, return_std=True)
            assert mean.dtype == std.dtype == given
            # The values are those computed in the compute dtype, only converted
            # (with the std: its pass pools the residuals beside y, c = 2).
            computed, computed_std = model.predict(Xq.astype(compute), return_std=True)
            np.testing.assert_array_equal(mean, computed.astype(given))
            np.testing.assert_array_equal(std, computed_std.astype(given))
        tensor = model.predict(torch.tensor(X[:5], dtype=torch.float32))
        assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_integer_inputs_are_accepted(cls):
    X = np.arange(20).reshape(10, 2)
    pred = cls(2.0).fit(X, np.arange(10)).predict(X)
    assert pred.dtype == np.float64 and pred.shape == (10,)


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_float32_at_extreme_scales(cls):
    """The points are scaled by 1 / h: nothing overflows where h**-2 would."""
    X, y = textbook_data(200, 3)
    X32, y32 = X.astype(np.float32), y.astype(np.float32)
    small = cls(0.3).fit(X32, y32).predict(X32[:20])
    for scale in (1e-20, 1e20):
        huge = cls(0.3 * scale).fit(X32 * np.float32(scale), y32).predict(X32[:20] * scale)
        np.testing.assert_allclose(huge, small, rtol=1e-4)
    model = cls("loo").fit(X32 * np.float32(1e20), y32)
    assert model.bandwidth_ == pytest.approx(1e20 * cls("loo").fit(X32, y32).bandwidth_, rel=1e-3)


# --- what fit computes, and when ---------------------------------------------------------


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_fixed_bandwidths_are_the_reference(cls):
    rng = np.random.default_rng(1)
    X, y, Xq = rng.normal(size=(25, 2)), rng.normal(size=25), rng.normal(size=(6, 2))
    for h in (0.8, np.array([0.5, 2.0])):
        model = cls(bandwidth=h).fit(X, y)
        assert isinstance(model.bandwidth_, float if np.ndim(h) == 0 else np.ndarray)
        ref = reference_fit(cls, Xq, X, y, h)[:, 0].numpy()
        np.testing.assert_allclose(model.predict(Xq), ref, rtol=1e-12)


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_fixed_bandwidth_fit_runs_no_kernel(cls, monkeypatch):
    """fit with a fixed h only keeps the data; the leave-one-out error waits for use."""
    X, y = textbook_data(30, 2)

    def no_kernel(*args, **kwargs):
        raise AssertionError("fit ran a kernel pass")

    with monkeypatch.context() as patch:
        for name in ("nw_pool", "local_linear_pool"):
            patch.setattr(estimator, name, no_kernel)
        model = cls(bandwidth=0.3).fit(X, y)
        assert model.n_iter_ == 0
    assert model.loo_mse_ == pytest.approx(brute_force_loo_mse(cls, X, y, 0.3), rel=1e-9)


@pytest.mark.parametrize("rule", ["silverman", "scott"])
def test_rules_of_thumb_match_statsmodels(rule):
    from statsmodels.nonparametric import bandwidths

    X, y = textbook_data(200, 3)
    model = NadarayaWatson(bandwidth=rule).fit(X, y)
    expected = {"silverman": bandwidths.bw_silverman, "scott": bandwidths.bw_scott}[rule](X)
    assert isinstance(model.bandwidth_, float)
    assert model.bandwidth_ == pytest.approx(float(expected), rel=1e-12)

    X2, y2 = textbook_data(200, 3, d=3)
    h = LocalLinearRegression(bandwidth=rule).fit(X2, y2).bandwidth_
    assert h.shape == (3,) and (h > 0).all()
    assert np.allclose(h, rule_of_thumb(torch.from_numpy(X2), rule).numpy())


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_loo_lands_at_a_minimum(cls):
    X, y = textbook_data(400, 6)
    model = cls().fit(X, y)  # "loo" is the default
    h = model.bandwidth_
    assert model.n_iter_ >= 1
    assert model.loo_mse_ == pytest.approx(brute_force_loo_mse(cls, X, y, h), rel=1e-9)
    assert model.loo_mse_ <= cls(0.9 * h).fit(X, y).loo_mse_
    assert model.loo_mse_ <= cls(1.1 * h).fit(X, y).loo_mse_
    # Far better than the rule of thumb it started from, which ignores y.
    assert model.loo_mse_ < cls("silverman").fit(X, y).loo_mse_


@pytest.mark.parametrize("per_feature", [False, True])
@pytest.mark.parametrize("cls", ESTIMATORS)
def test_loo_fit_warns_nothing(cls, per_feature):
    """No warning from the search, torch's included: torch gives some warnings once
    per process, so they are made to warn every time, and an earlier test that met
    one cannot hide it here."""
    X, y = textbook_data(200, 5, d=2 if per_feature else 1)
    warn_always = torch.is_warn_always_enabled()
    torch.set_warn_always(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model = cls("loo", per_feature=per_feature).fit(X, y)
    finally:
        torch.set_warn_always(warn_always)
    assert model.n_iter_ >= 1


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_loo_float32_torch_agrees_with_float64(cls):
    X, y = textbook_data(300, 7)
    h64 = cls("loo").fit(X, y).bandwidth_
    h32 = cls("loo").fit(torch.tensor(X).float(), torch.tensor(y).float()).bandwidth_
    assert h32 == pytest.approx(h64, rel=0.02)


def test_loo_that_cannot_evaluate_its_criterion_says_so(monkeypatch):
    X, y = textbook_data(50, 8)
    monkeypatch.setattr(
        NadarayaWatson, "_fit_at", lambda self, Xq, Xk, Y, *_: torch.full_like(Y, torch.nan)
    )
    with pytest.raises(ValueError, match="leave-one-out criterion is not finite"):
        NadarayaWatson("loo").fit(X, y)


def test_a_pilot_started_search_finds_the_same_minimum(monkeypatch):
    """Large data start from a pilot search on a subsample: the same criterion's
    minimum as the walk from the rule of thumb."""
    from nwfast import estimator

    X, y = textbook_data(4000, 8)
    full = NadarayaWatson("loo").fit(X, y)
    monkeypatch.setattr(estimator, "PILOT_POINTS", 256)
    piloted = NadarayaWatson("loo", verbose=True).fit(X, y)
    assert piloted.loo_mse_ == pytest.approx(full.loo_mse_, rel=1e-6)
    assert piloted.bandwidth_ == pytest.approx(full.bandwidth_, rel=0.05)


def test_loo_of_huge_targets_stays_finite():
    X, y = textbook_data(200, 8)
    small = LocalLinearRegression("loo").fit(X, y)
    huge = LocalLinearRegression("loo").fit(X, 1e200 * y)
    assert huge.bandwidth_ == pytest.approx(small.bandwidth_, rel=1e-6)


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_score_is_r2(cls):
    X, y = textbook_data(100, 8)
    model = cls(0.3).fit(X, y)
    pred = model.predict(X)
    r2 = 1 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    assert model.score(X, y) == pytest.approx(r2, rel=1e-9)
    # Multi-output: the mean of the per-output R^2.
    Y = np.stack([y, -2 * y], axis=1)
    assert cls(0.3).fit(X, Y).score(X, Y) == pytest.approx(r2, rel=1e-9)


# --- against statsmodels' KernelReg ----------------------------------------------------


def statsmodels_fit(reg_type, X, y, Xq, h):
    from statsmodels.nonparametric.kernel_regression import KernelReg

    X2 = np.reshape(X, (len(y), -1))
    kr = KernelReg(y, X2, var_type="c" * X2.shape[1], reg_type=reg_type, bw=np.atleast_1d(h))
    return kr.fit(np.reshape(Xq, (len(Xq), -1)))[0]


@pytest.mark.filterwarnings("ignore::FutureWarning")  # statsmodels' own pandas warning
@pytest.mark.parametrize("d", [1, 2])
@pytest.mark.parametrize("cls, reg_type", [(NadarayaWatson, "lc"), (LocalLinearRegression, "ll")])
def test_fixed_bandwidths_match_statsmodels(cls, reg_type, d):
    X, y = textbook_data(250, 10 + d, d=d)
    Xq = np.random.default_rng(d).uniform(-0.3, 5.3, (60,) if d == 1 else (60, d))
    h = 0.35 if d == 1 else np.array([0.5, 1.2])
    ours = cls(h).fit(X, y).predict(Xq)
    np.testing.assert_allclose(ours, statsmodels_fit(reg_type, X, y, Xq, h), rtol=1e-10)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("per_feature", [False, True])
@pytest.mark.parametrize("cls, reg_type", [(NadarayaWatson, "lc"), (LocalLinearRegression, "ll")])
def test_loo_is_as_good_as_statsmodels_cv_ls(cls, reg_type, per_feature):
    from statsmodels.nonparametric.kernel_regression import KernelReg

    d = 2 if per_feature else 1
    X, y = textbook_data(150 if per_feature else 300, 4, d=d)
    if per_feature:
        X[:, 1] *= 10  # different scales: one h per feature matters
    X2 = X.reshape(len(y), d)
    theirs = KernelReg(y, X2, var_type="c" * d, reg_type=reg_type, bw="cv_ls").bw
    model = cls("loo", per_feature=per_feature).fit(X, y)
    # Both bandwidths judged by one yardstick: the brute-force leave-one-out MSE.
    ours = brute_force_loo_mse(cls, X, y, model.bandwidth_)
    assert model.loo_mse_ == pytest.approx(ours, rel=1e-9)
    assert ours <= brute_force_loo_mse(cls, X, y, theirs if per_feature else theirs[0]) * 1.001
    assert np.shape(model.bandwidth_) == ((d,) if per_feature else ())


# --- what local-linear buys ------------------------------------------------------------


def test_local_linear_removes_the_bias_at_the_ends():
    """Bias is the fit to noise-free data minus the truth: the fits are linear in y."""
    X = np.linspace(0, 1, 400)
    ends = np.array([0.0, 1.0])
    # A linear trend: local-linear reproduces it, Nadaraya-Watson is pulled inwards.
    y = 3 * X
    nw = NadarayaWatson(0.1).fit(X, y).predict(ends) - 3 * ends
    ll = LocalLinearRegression(0.1).fit(X, y).predict(ends) - 3 * ends
    assert (np.abs(nw) > 0.2).all()
    assert (np.abs(ll) < 1e-10).all()
    # The textbook's curved trend: local-linear's end bias is several times smaller.
    X = np.linspace(0, 5, 500)
    ends = np.array([0.0, 5.0])
    f = 2 * np.sin(X) + X**0.8
    truth = 2 * np.sin(ends) + ends**0.8
    nw = NadarayaWatson(0.1).fit(X, f).predict(ends) - truth
    ll = LocalLinearRegression(0.1).fit(X, f).predict(ends) - truth
    assert (np.abs(ll) * 5 < np.abs(nw)).all()
