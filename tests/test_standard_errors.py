"""predict(X, return_std=True): the formula against dense float64, and the band's coverage."""

import numpy as np
import pytest
import torch

from nwfast.estimator import LocalLinearRegression, NadarayaWatson


def truth(x):
    return 2 * np.sin(x) + x**0.8


def sample(rng, n):
    X = rng.uniform(0, 5, n)
    return X, truth(X) + rng.normal(0, 0.5, n)


def dense_weights(cls, Xq, X, h):
    """The (nq, n) weights l_j(x) of the fit, yhat(x) = sum_j l_j(x) y_j, in float64."""
    Xq, X = (torch.as_tensor(a, dtype=torch.float64).reshape(len(a), -1) / h for a in (Xq, X))
    u = X[None] - Xq[:, None]
    p = torch.softmax(-0.5 * (u * u).sum(-1), dim=-1)
    if cls is NadarayaWatson:
        return p
    design = torch.cat([torch.ones_like(u[..., :1]), u], dim=-1)
    normal = torch.einsum("qj,qja,qjb->qab", p, design, design)
    return torch.linalg.solve(normal, (p[..., None] * design).mT)[:, 0]


@pytest.mark.parametrize("d", [1, 2])
@pytest.mark.parametrize("cls", [NadarayaWatson, LocalLinearRegression])
def test_std_is_the_documented_formula(cls, d):
    """std(x)^2 = sum_j p_j(x) e_j^2 * sum_j l_j(x)^2, e_j the leave-one-out residuals."""
    rng = np.random.default_rng(d)
    X = rng.uniform(0, 5, (200, d))
    Y = np.stack([truth(X[:, 0]), X.sum(1)], axis=1) + rng.normal(0, 0.5, (200, 2))
    Xq = rng.uniform(-0.5, 5.5, (30, d))
    h = 0.6
    model = cls(h).fit(X, Y)
    mean, std = model.predict(Xq, return_std=True)

    # Leave-one-out residuals from the dense weights with the diagonal removed.
    loo = dense_weights(cls, X, X, h).numpy()
    if cls is NadarayaWatson:
        np.fill_diagonal(loo, 0.0)
        loo /= loo.sum(1, keepdims=True)
    else:  # the fit without point i: solved point by point
        for i in range(len(X)):
            others = np.arange(len(X)) != i
            loo[i] = 0.0
            loo[i, others] = dense_weights(cls, X[i : i + 1], X[others], h).numpy()[0]
    residuals = Y - loo @ Y
    assert model.loo_mse_ == pytest.approx(float((residuals**2).mean()), rel=1e-10)

    kernel = dense_weights(NadarayaWatson, Xq, X, h).numpy()
    weights = dense_weights(cls, Xq, X, h).numpy()
    np.testing.assert_allclose(mean, weights @ Y, rtol=1e-10)
    variance = (kernel @ residuals**2) * (weights**2).sum(1, keepdims=True)
    np.testing.assert_allclose(std, np.sqrt(variance), rtol=1e-10)


def coverage(cls, bandwidth, grid, *, n=500, repeats=100, seed=0):
    """Mean over repeats and grid points of |yhat - target| <= 1.96 std, for the
    truth and for the smoother's own mean E yhat (the fit to noise-free data)."""
    rng = np.random.default_rng(seed)
    covers_truth, covers_mean = [], []
    for _ in range(repeats):
        X, y = sample(rng, n)
        model = cls(bandwidth).fit(X, y)
        mean, std = model.predict(grid, return_std=True)
        expected = cls(model.bandwidth_).fit(X, truth(X)).predict(grid)
        covers_truth.append(np.abs(mean - truth(grid)) <= 1.96 * std)
        covers_mean.append(np.abs(mean - expected) <= 1.96 * std)
    return float(np.mean(covers_truth)), float(np.mean(covers_mean))


INTERIOR = np.linspace(0.5, 4.5, 81)


@pytest.mark.parametrize("cls", [NadarayaWatson, LocalLinearRegression])
def test_band_covers_the_truth_when_undersmoothed(cls):
    """With half the leave-one-out bandwidth the bias is small beside the noise and
    the +-1.96 std band covers the true function at close to 95% of the points."""
    h = 0.5 * cls("loo").fit(*sample(np.random.default_rng(123), 500)).bandwidth_
    covers_truth, covers_mean = coverage(cls, h, INTERIOR)
    assert 0.90 <= covers_truth <= 0.99
    assert 0.93 <= covers_mean <= 0.97


@pytest.mark.parametrize("cls", [NadarayaWatson, LocalLinearRegression])
def test_band_at_the_loo_bandwidth_misses_only_by_the_bias(cls):
    """The leave-one-out choice balances bias against variance, so the band, which
    ignores the bias, covers the truth less often; it still covers E yhat."""
    covers_truth, covers_mean = coverage(cls, "loo", INTERIOR, repeats=60)
    assert 0.93 <= covers_mean <= 0.97
    assert 0.85 <= covers_truth < covers_mean
