"""NadarayaWatson: the scikit-learn-style estimator, its bandwidths and its errors."""

import numpy as np
import pytest
import torch

from nwfast.estimator import NadarayaWatson, loo_mse, rule_of_thumb, time_loo_fit
from nwfast.reference import nw_pool_broadcast


def textbook_data(n, seed, d=1):
    rng = np.random.default_rng(seed)
    X = rng.uniform(0, 5, (n, d))
    y = 2 * np.sin(X[:, 0]) + X.sum(1) ** 0.8 + rng.normal(0, 0.5, n)
    return (X[:, 0] if d == 1 else X), y


def brute_force_loo_mse(X, y, h):
    """Predict each point from the other n - 1 with the reference, one at a time."""
    X = torch.as_tensor(X).reshape(len(y), -1)
    y = torch.as_tensor(y)
    errors = []
    for i in range(len(y)):
        others = torch.arange(len(y)) != i
        pred = nw_pool_broadcast(X[i : i + 1], X[others], y[others], 1.0 / h**2)
        errors.append((pred - y[i]) ** 2)
    return float(torch.cat(errors).mean())


@pytest.mark.parametrize("y_shape", [(), (3,)], ids=["y(n,)", "y(n,c)"])
@pytest.mark.parametrize("d", [None, 1, 2], ids=["X(n,)", "X(n,1)", "X(n,2)"])
def test_fit_predict_shapes_numpy(d, y_shape):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(30,) if d is None else (30, d))
    y = rng.normal(size=(30, *y_shape))
    model = NadarayaWatson(bandwidth=0.7).fit(X, y)
    assert model.n_features_in_ == (1 if d is None else d)
    pred = model.predict(X[:7])
    assert isinstance(pred, np.ndarray) and pred.dtype == np.float64
    assert pred.shape == (7, *y_shape)
    assert model.fit(X, y) is model


def test_torch_in_torch_out_keeps_dtype():
    X, y = torch.rand(40, 2), torch.randn(40)
    model = NadarayaWatson("silverman").fit(X, y)
    pred = model.predict(X[:5])
    assert isinstance(pred, torch.Tensor) and pred.dtype == torch.float32
    assert pred.shape == (5,)
    # NumPy queries on a torch-fitted model come back as NumPy.
    assert isinstance(model.predict(X[:5].numpy()), np.ndarray)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_in_cuda_out():
    X, y = textbook_data(300, 0)
    Xc = torch.tensor(X, device="cuda", dtype=torch.float32)
    yc = torch.tensor(y, device="cuda", dtype=torch.float32)
    model = NadarayaWatson("loo").fit(Xc, yc)
    pred = model.predict(Xc[:10])
    assert pred.device.type == "cuda" and pred.shape == (10,)
    cpu = NadarayaWatson("loo").fit(X, y)
    assert model.bandwidth_ == pytest.approx(cpu.bandwidth_, rel=0.02)


def test_fixed_bandwidths_are_the_operator():
    rng = np.random.default_rng(1)
    X, y, Xq = rng.normal(size=(25, 2)), rng.normal(size=25), rng.normal(size=(6, 2))
    Xt, yt, Xqt = map(torch.from_numpy, (X, y, Xq))

    # One h for all features: w = 1 / h**2.
    pred = NadarayaWatson(bandwidth=0.8).fit(X, y).predict(Xq)
    np.testing.assert_allclose(pred, nw_pool_broadcast(Xqt, Xt, yt[:, None], 0.8**-2)[:, 0])

    # One h per feature: scale feature f by 1 / h_f, then w = 1.
    h = np.array([0.5, 2.0])
    model = NadarayaWatson(bandwidth=h).fit(X, y)
    assert isinstance(model.bandwidth_, np.ndarray) and model.bandwidth_.shape == (2,)
    ref = nw_pool_broadcast(Xqt / torch.from_numpy(h), Xt / torch.from_numpy(h), yt[:, None], 1.0)
    np.testing.assert_allclose(model.predict(Xq), ref[:, 0])


def test_loo_mse_is_leave_one_out():
    X, y = textbook_data(30, 2)
    model = NadarayaWatson(bandwidth=0.3).fit(X, y)
    expected = brute_force_loo_mse(X, y, 0.3)
    assert model.loo_mse_ == pytest.approx(expected, rel=1e-9)
    assert loo_mse(X, y, 0.3) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("rule", ["silverman", "scott"])
def test_rules_of_thumb_match_statsmodels(rule):
    from statsmodels.nonparametric import bandwidths

    X, y = textbook_data(200, 3)
    model = NadarayaWatson(bandwidth=rule).fit(X, y)
    expected = {"silverman": bandwidths.bw_silverman, "scott": bandwidths.bw_scott}[rule](X)
    assert isinstance(model.bandwidth_, float)
    assert model.bandwidth_ == pytest.approx(float(expected), rel=1e-12)

    X2, y2 = textbook_data(200, 3, d=3)
    h = NadarayaWatson(bandwidth=rule).fit(X2, y2).bandwidth_
    assert h.shape == (3,) and (h > 0).all()
    assert np.allclose(h, rule_of_thumb(torch.from_numpy(X2), rule).numpy())


@pytest.mark.filterwarnings("ignore::FutureWarning")  # statsmodels' own pandas warning
def test_loo_matches_statsmodels_cv_ls():
    X, y = textbook_data(300, 4)
    result = time_loo_fit(X, y, dtype="float64")
    # Both LOO errors are computed by the same function at each side's bandwidth.
    assert result["nwfast_loo_mse"] <= result["statsmodels_loo_mse"] * 1.03
    assert result["nwfast_bandwidth"][0] == pytest.approx(
        result["statsmodels_bandwidth"][0], rel=0.05
    )


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_loo_per_feature_matches_statsmodels_cv_ls():
    from statsmodels.nonparametric.kernel_regression import KernelReg

    X, y = textbook_data(120, 5, d=2)
    X[:, 1] *= 10  # different scales: one h per feature matters
    model = NadarayaWatson("loo", per_feature=True).fit(X, y)
    theirs = KernelReg(y, X, var_type="cc", reg_type="lc", bw="cv_ls").bw
    assert model.bandwidth_.shape == (2,)
    assert model.loo_mse_ <= loo_mse(X, y, theirs) * 1.03


def test_loo_lands_at_a_minimum():
    X, y = textbook_data(400, 6)
    model = NadarayaWatson("loo").fit(X, y)
    h = model.bandwidth_
    assert model.n_iter_ >= 1
    assert model.loo_mse_ == pytest.approx(loo_mse(X, y, h), rel=1e-6)
    assert model.loo_mse_ <= loo_mse(X, y, 0.9 * h)
    assert model.loo_mse_ <= loo_mse(X, y, 1.1 * h)
    # Far better than the rule of thumb it started from, which ignores y.
    assert model.loo_mse_ < NadarayaWatson("silverman").fit(X, y).loo_mse_


def test_loo_float32_torch_agrees_with_float64():
    X, y = textbook_data(300, 7)
    h64 = NadarayaWatson("loo").fit(X, y).bandwidth_
    h32 = NadarayaWatson("loo").fit(torch.tensor(X).float(), torch.tensor(y).float()).bandwidth_
    assert h32 == pytest.approx(h64, rel=0.02)


def test_score_is_r2():
    X, y = textbook_data(100, 8)
    model = NadarayaWatson(0.3).fit(X, y)
    pred = model.predict(X)
    r2 = 1 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    assert model.score(X, y) == pytest.approx(r2, rel=1e-9)
    # Multi-output: the mean of the per-output R^2.
    Y = np.stack([y, -2 * y], axis=1)
    assert NadarayaWatson(0.3).fit(X, Y).score(X, Y) == pytest.approx(r2, rel=1e-9)


def test_params_protocol_and_repr():
    model = NadarayaWatson()
    params = model.get_params(deep=True)
    assert set(params) == {
        "bandwidth",
        "per_feature",
        "max_iter",
        "tol",
        "dtype",
        "backend",
        "verbose",
    }
    assert repr(model) == "NadarayaWatson()"
    assert model.set_params(bandwidth="loo", max_iter=5) is model
    assert model.get_params()["max_iter"] == 5
    assert repr(model) == "NadarayaWatson(bandwidth='loo', max_iter=5)"
    # A copy built from get_params is the same estimator (scikit-learn's clone).
    assert NadarayaWatson(**model.get_params()).get_params() == model.get_params()
    with pytest.raises(ValueError, match="invalid parameter 'bandwith'"):
        model.set_params(bandwith=1.0)


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
def test_bad_parameters(params, error, match):
    X, y = np.random.default_rng(0).normal(size=(20, 2)), np.zeros(20)
    with pytest.raises(error, match=match):
        NadarayaWatson(**params).fit(X, y)


def test_bad_data():
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(20, 2)), rng.normal(size=20)
    with pytest.raises(ValueError, match=r"n = 20 rows of X \(shape \(20, 2\)\).*\(19,\)"):
        NadarayaWatson().fit(X, y[:19])
    with pytest.raises(ValueError, match=r"X must be \(n,\) or \(n, d\), got shape \(20, 2, 1\)"):
        NadarayaWatson().fit(X[..., None], y)
    with pytest.raises(ValueError, match="X contains NaN or inf"):
        NadarayaWatson().fit(np.where(X > 0.5, np.nan, X), y)
    with pytest.raises(ValueError, match="y contains NaN or inf"):
        NadarayaWatson().fit(X, np.where(y > 0.5, np.inf, y))
    with pytest.raises(TypeError, match="must be real"):
        NadarayaWatson().fit(X + 1j, y)
    with pytest.raises(TypeError, match="must be numeric"):
        NadarayaWatson().fit(X.astype(str), y)
    with pytest.raises(ValueError, match="at least 2 points"):
        NadarayaWatson().fit(X[:1], y[:1])
    with pytest.raises(RuntimeError, match="not fitted"):
        NadarayaWatson().predict(X)
    model = NadarayaWatson().fit(X, y)
    with pytest.raises(ValueError, match=r"X has 3 features \(shape \(4, 3\)\).*fitted with 2"):
        model.predict(rng.normal(size=(4, 3)))


def test_integer_inputs_are_accepted():
    X = np.arange(20).reshape(10, 2)
    y = np.arange(10)
    pred = NadarayaWatson(2.0).fit(X, y).predict(X)
    assert pred.dtype == np.float64 and pred.shape == (10,)


def test_benchmark_hook_without_statsmodels():
    X, y = textbook_data(200, 9)
    result = time_loo_fit(X, y, statsmodels=False)
    assert result["n"] == 200 and result["d"] == 1
    assert result["nwfast_s"] > 0 and result["nwfast_loo_mse"] > 0
    assert "statsmodels_s" not in result
