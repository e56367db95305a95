"""The textbook's Nadaraya-Watson experiment, run on the fused operator.

Fifty noisy samples of ``f(x) = 2 sin(x) + x**0.8`` on [0, 5], a test grid, and
five ways to pick the Gaussian kernel's ``w`` (``1 / h**2``):

- ``untrained``: ``w = 1``, the textbook's fixed kernel;
- ``scalar``: one ``w`` trained by SGD on the leave-one-out loss (``exclude_self``);
- ``scalar_no_loo``: the same, but each point may predict itself: ``w`` runs away;
- ``per_key``: one ``w_j`` per training point, leave-one-out;
- ``per_key_penalty``: per-key, with ``penalty * mean_j sqrt(w_j)`` added to the loss
  (``sqrt(w) = 1 / h`` penalises narrow kernels).

Beside them, the two estimators with leave-one-out bandwidths and their +-1.96 std
bands, ``NadarayaWatson`` and ``LocalLinearRegression``: at both ends of the data
the local constant is pulled towards the inside, the local line is not.

``run_demo`` trains them, writes ``fits.png``, ``estimators.png``, ``attention.png``,
``loss.png``, ``loss_vs_w.png``, ``summary.txt`` and ``summary.json`` and returns the
summary. It needs matplotlib and scikit-learn, the ``demo`` extra.
"""

import importlib
import json
import time
from pathlib import Path
from typing import NamedTuple

import torch

from nwfast.functional import nw_pool, nw_weights
from nwfast.models import NWKernelRegression

__all__ = [
    "ESTIMATORS",
    "VARIANTS",
    "MissingExtra",
    "make_data",
    "read_summary",
    "run_demo",
    "train",
]

# The demo's own dependencies: (module, what needs it).
EXTRA = "demo"
REQUIRES = (("matplotlib", "its figures"), ("sklearn", "its estimators"))


class MissingExtra(RuntimeError):
    """A dependency of the demo is not installed; the message says what to install."""


class Variant(NamedTuple):
    title: str  # for plots
    color: str  # the same in every figure
    trained: bool
    per_key: bool
    exclude_self: bool
    penalty: bool  # add the sqrt(w) penalty to the loss


VARIANTS = {
    "untrained": Variant("untrained (textbook kernel)", "tab:gray", False, False, True, False),
    "scalar": Variant("scalar w, leave-one-out", "tab:blue", True, False, True, False),
    "scalar_no_loo": Variant("scalar w, no leave-one-out", "tab:red", True, False, False, False),
    "per_key": Variant("per-key w, leave-one-out", "tab:green", True, True, True, False),
    "per_key_penalty": Variant("per-key w + sqrt(w) penalty", "tab:purple", True, True, True, True),
}


class Estimator(NamedTuple):
    title: str
    color: str
    class_name: str  # in nwfast.estimator


ESTIMATORS = {
    "nadaraya_watson": Estimator("Nadaraya-Watson (local constant)", "tab:blue", "NadarayaWatson"),
    "local_linear": Estimator("local-linear", "tab:green", "LocalLinearRegression"),
}


def true_function(x):
    return 2 * torch.sin(x) + x**0.8


def make_data(n_train=50, seed=0, noise=0.5):
    """The textbook's data: sorted x ~ U(0, 5), y = f(x) + N(0, noise^2), test grid.

    Returns ``x_train, y_train, x_test, y_truth`` (float32), ``x_test`` being
    ``arange(0, 5, 0.1)`` and ``y_truth`` the noise-free ``f`` there.
    """
    gen = torch.Generator().manual_seed(seed)
    x_train, _ = torch.sort(torch.rand(n_train, generator=gen) * 5)
    y_train = true_function(x_train) + noise * torch.randn(n_train, generator=gen)
    x_test = torch.arange(0, 5, 0.1)
    return x_train, y_train, x_test, true_function(x_test)


def train(model, x, y, *, epochs, lr, penalty=0.0, exclude_self=True):
    """SGD on the summed squared error of predicting each training point from the rest.

    With ``exclude_self=False`` every point is its own nearest key and the loss is
    minimised by ``w -> inf``, a kernel that reproduces the noisy data point by point.
    Returns the mean squared error at the start of each epoch.
    """
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    history = []
    for _ in range(epochs):
        optimizer.zero_grad()
        errors = (model(x, x, y, exclude_self=exclude_self) - y) ** 2
        loss = errors.sum()
        if penalty:
            loss = loss + penalty * model.w.sqrt().mean()
        loss.backward()
        optimizer.step()
        history.append(float(errors.detach().mean()))
    return history


def _mse(a, b):
    return float(((a - b) ** 2).mean())


def run_demo(
    seed=0,
    n_train=50,
    epochs=100,
    lr=0.2,
    penalty=3.0,
    out="demo_out",
    backend="auto",
    quiet=False,
):
    """Train every variant, write the figures and the summary under ``out``.

    Returns a dict ``{variant: {"w": [...], "loo_mse", "train_mse", "test_mse"}}``, the
    same for each of ``ESTIMATORS`` (``w = h**-2``), plus ``"seconds"``. Raises
    ``MissingExtra`` before writing anything if matplotlib or scikit-learn is missing.
    ``loo_mse`` predicts each training point from the others,
    ``train_mse`` from all points including itself, ``test_mse`` is on the test grid
    against the noise-free truth.
    """
    start = time.perf_counter()
    require_extras()  # before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    x, y, x_test, y_truth = make_data(n_train, seed)

    models, histories, results = {}, {}, {}
    for name, variant in VARIANTS.items():
        # w is stored as log w: SGD steps are then relative changes of w, the same
        # size whether w is 1 or 1000, and w stays positive.
        model = NWKernelRegression(
            num_keys=n_train if variant.per_key else None, positive="exp", backend=backend
        )
        if variant.trained:
            histories[name] = train(
                model, x, y, epochs=epochs, lr=lr,
                penalty=penalty if variant.penalty else 0.0,
                exclude_self=variant.exclude_self,
            )  # fmt: skip
        with torch.no_grad():
            w = model.w.detach()
            results[name] = {
                "w": w.reshape(-1).tolist(),
                "loo_mse": _mse(nw_pool(x, x, y, w, exclude_self=True, backend=backend), y),
                "train_mse": _mse(nw_pool(x, x, y, w, backend=backend), y),
                "test_mse": _mse(model(x_test, x, y, exclude_self=False), y_truth),
            }
        models[name] = model

    fitted = fit_estimators(x, y, backend)
    for name, model in fitted.items():
        results[name] = {
            "w": [model.bandwidth_**-2],
            "loo_mse": model.loo_mse_,
            "train_mse": _mse(model.predict(x), y),
            "test_mse": _mse(model.predict(x_test), y_truth),
        }

    plot_fits(out / "fits.png", models, results, x, y, x_test, y_truth)
    plot_estimators(out / "estimators.png", fitted, x, y)
    plot_attention(out / "attention.png", models, results, x, x_test)
    plot_losses(out / "loss.png", histories)
    plot_loss_vs_w(out / "loss_vs_w.png", results, x, y, x_test, y_truth, backend)

    results["seconds"] = time.perf_counter() - start
    text = summary_text(results, seed=seed, n_train=n_train, epochs=epochs, lr=lr, penalty=penalty)
    (out / "summary.txt").write_text(text)
    (out / "summary.json").write_text(json.dumps(results, indent=1))
    if not quiet:
        print(text, end="")
        print(f"figures and summary written to {out}")
    return results


def summary_text(results, **settings):
    """A whitespace-separated table, one row per variant, with a header row."""
    lines = ["# " + " ".join(f"{k}={v}" for k, v in settings.items())]
    lines.append(
        f"{'variant':<16} {'w_median':>10} {'w_min':>10} {'w_max':>10} "
        f"{'loo_mse':>9} {'train_mse':>9} {'test_mse':>9}"
    )
    for name in (*VARIANTS, *ESTIMATORS):
        r = results[name]
        w = torch.tensor(r["w"])
        lines.append(
            f"{name:<16} {w.median():>10.4g} {w.min():>10.4g} {w.max():>10.4g} "
            f"{r['loo_mse']:>9.4f} {r['train_mse']:>9.4f} {r['test_mse']:>9.4f}"
        )
    return "\n".join(lines) + "\n"


def read_summary(path):
    """Parse ``summary.txt`` back into ``{variant: {column: float}}``."""
    rows = [
        line.split()
        for line in Path(path).read_text().splitlines()
        if line and not line.startswith("#")
    ]
    header, *body = rows
    return {row[0]: dict(zip(header[1:], map(float, row[1:]))) for row in body}


def require_extras():
    """Raise MissingExtra, naming the extra to install, if a dependency is missing."""
    for module, purpose in REQUIRES:
        try:
            importlib.import_module(module)
        except ImportError:
            raise MissingExtra(
                f"nwfast demo needs {module} for {purpose}: pip install 'nwfast[{EXTRA}]'"
            ) from None


def fit_estimators(x, y, backend="auto"):
    """Both estimators fitted with leave-one-out bandwidths, by name."""
    # Imported here: scikit-learn is part of the demo extra, not of the library.
    from nwfast import estimator

    return {
        name: getattr(estimator, spec.class_name)("loo", backend=backend).fit(x, y)
        for name, spec in ESTIMATORS.items()
    }


# --- figures -------------------------------------------------------------------------


def _pyplot():
    # Imported here so that the library and the CLI's other commands never pay for
    # matplotlib (require_extras has checked it is there); Agg draws without a display.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _edges(points):
    """Cell edges around sorted points: midpoints inside, half a gap beyond the ends."""
    p = points.double()
    mid = (p[1:] + p[:-1]) / 2
    return torch.cat([2 * p[:1] - mid[:1], mid, 2 * p[-1:] - mid[-1:]]).numpy()


def _w_label(w):
    w = torch.tensor(w)
    if w.numel() == 1:
        return f"w = {w.item():.3g}"
    return f"w median {w.median():.3g} ({w.min():.2g} to {w.max():.3g})"


def plot_fits(path, models, results, x, y, x_test, y_truth):
    """One panel per variant (fit, truth, data), and one of the learned per-key w."""
    plt = _pyplot()
    x, y, x_test, y_truth = (t.numpy() for t in (x, y, x_test, y_truth))
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5), sharex=True)
    for ax, (name, model) in zip(axes.flat, models.items()):
        r, variant = results[name], VARIANTS[name]
        with torch.no_grad():
            pred = model(torch.from_numpy(x_test), torch.from_numpy(x), torch.from_numpy(y),
                         exclude_self=False).numpy()  # fmt: skip
        ax.plot(x_test, y_truth, color="black", lw=1.2, ls="--", label="truth f(x)")
        ax.plot(x, y, "o", ms=3.5, color="tab:orange", alpha=0.7, label="training data")
        ax.plot(x_test, pred, color=variant.color, lw=2.2, label="prediction")
        ax.set_title(
            f"{variant.title}\n{_w_label(r['w'])}, test MSE {r['test_mse']:.3f}", fontsize=10
        )
        ax.set_ylim(-1.5, 5.5)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("y")

    ax = axes.flat[len(models)]
    for name in ("per_key", "per_key_penalty"):
        variant = VARIANTS[name]
        ax.plot(x, results[name]["w"], "o-", ms=3, lw=1, color=variant.color, label=variant.title)
    scalar_w = results["scalar"]["w"][0]
    ax.axhline(
        scalar_w, color=VARIANTS["scalar"].color, ls="--", label=f"scalar w = {scalar_w:.3g}"
    )
    ax.set_yscale("log")
    ax.set_title("learned w per training key (log scale)\nlarger w = narrower kernel", fontsize=10)
    ax.set_ylabel("w_j")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    for ax in axes[1]:
        ax.set_xlabel("x")
    fig.suptitle(
        f"Nadaraya-Watson regression of f(x) = 2 sin(x) + x^0.8 from {len(x)} noisy points"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_attention(path, models, results, x, x_test, names=("untrained", "scalar", "per_key")):
    """Attention weights, test queries (rows) by training keys (columns), both sorted."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 4.4))
    for ax, name in zip(axes, names):
        with torch.no_grad():
            weights = nw_weights(x_test, x, models[name].w.detach()).numpy()
        # Cells drawn at the points' own positions: the training x are not evenly spaced.
        image = ax.pcolormesh(_edges(x), _edges(x_test), weights, cmap="Reds")
        ax.invert_yaxis()
        ax.set_title(f"{VARIANTS[name].title}\n{_w_label(results[name]['w'])}", fontsize=10)
        ax.set_xlabel("training key x_j (sorted)")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03, label="weight p_ij")
    axes[0].set_ylabel("test query x_i")
    fig.suptitle("Attention weights: each row is a softmax over the training keys")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_losses(path, histories):
    """Training MSE per epoch; the no-leave-one-out curve is an in-sample error."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.4))
    for name, history in histories.items():
        variant = VARIANTS[name]
        in_sample = not variant.exclude_self
        label = variant.title + (" (in-sample error)" if in_sample else "")
        ax.plot(range(1, len(history) + 1), history, ":" if in_sample else "-", lw=2,
                color=variant.color, label=label)  # fmt: skip
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training MSE (leave-one-out unless noted)")
    ax.set_title("Training loss per epoch (SGD on log w)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_loss_vs_w(path, results, x, y, x_test, y_truth, backend="auto"):
    """Why leave-one-out: the in-sample error falls forever as w grows, the LOO error
    has a minimum, and the test error follows the LOO error."""
    plt = _pyplot()
    ws = torch.logspace(-1, 5, 121)

    def errors(queries, target, exclude_self=False):
        # Every w at once: the sweep is one batched call, batch b using w = ws[b].
        b = len(ws)
        pred = nw_pool(
            queries[None, :, None].expand(b, -1, 1), x[None, :, None].expand(b, -1, 1),
            y[None, :, None].expand(b, -1, 1), ws[:, None].expand(b, len(x)),
            exclude_self=exclude_self, backend=backend,
        )  # fmt: skip
        return ((pred[..., 0] - target) ** 2).mean(1).tolist()

    curves = {
        "in-sample": errors(x, y),
        "leave-one-out": errors(x, y, exclude_self=True),
        "test (vs truth)": errors(x_test, y_truth),
    }
    fig, ax = plt.subplots(figsize=(7, 4.4))
    # Coloured as the variants that minimise them: red in-sample, blue leave-one-out.
    styles = (":", "tab:red"), ("-", "tab:blue"), ("--", "black")
    for (label, curve), (style, color) in zip(curves.items(), styles):
        ax.plot(ws.numpy(), curve, style, lw=2, color=color, label=label)
    for name in ("untrained", "scalar", "scalar_no_loo"):
        w = results[name]["w"][0]
        if w <= ws[-1]:
            ax.axvline(w, color=VARIANTS[name].color, lw=1.2, alpha=0.8,
                       label=f"{VARIANTS[name].title}: w = {w:.3g}")  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("w = 1 / h^2 (larger = narrower kernel)")
    ax.set_ylabel("mean squared error")
    ax.set_title("Training error with and without leave-one-out")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_estimators(path, fitted, x, y, band=1.96):
    """Each estimator's fit with its +-1.96 std band (left), and the bias of each, the
    fit to noise-free data minus the truth, at one bandwidth against the same band
    (right): at both ends the local constant is pulled towards the inside of the
    data, the local line much less."""
    plt = _pyplot()
    grid = torch.linspace(0, 5, 301)
    truth = true_function(grid).numpy()
    # One bandwidth for both, so that the difference is the model's, not h's.
    h = fitted["nadaraya_watson"].bandwidth_
    fig, (fit_ax, bias_ax) = plt.subplots(1, 2, figsize=(13, 4.8))
    fit_ax.plot(grid, truth, color="black", lw=1.2, ls="--", label="truth f(x)")
    fit_ax.plot(x, y, "o", ms=3.5, color="tab:orange", alpha=0.7, label="training data")
    bias_ax.axhline(0.0, color="black", lw=1.0)
    for name, model in fitted.items():
        spec = ESTIMATORS[name]
        mean, std = (t.numpy() for t in model.predict(grid, return_std=True))
        fit_ax.plot(
            grid, mean, color=spec.color, lw=2, label=f"{spec.title}, h = {model.bandwidth_:.3g}"
        )
        fit_ax.fill_between(grid, mean - band * std, mean + band * std, color=spec.color,
                            alpha=0.18, lw=0)  # fmt: skip
        # The fits are linear in y: the fit to f(x_j) is the expected fit.
        at_h = type(model)(h, backend=model.backend)
        _, std_h = at_h.fit(x, y).predict(grid, return_std=True)
        bias = at_h.fit(x, true_function(x)).predict(grid).numpy() - truth
        bias_ax.plot(grid, bias, color=spec.color, lw=2, label=f"{spec.title}: bias")
        bias_ax.fill_between(grid, -band * std_h, band * std_h, color=spec.color, alpha=0.12,
                             lw=0, label=f"+-{band} std")  # fmt: skip
        for end, side in ((0, 1), (-1, -1)):
            bias_ax.annotate(
                f"{bias[end]:+.2f}", (grid[end], bias[end]), color=spec.color, fontsize=9,
                ha="left" if side > 0 else "right", textcoords="offset points",
                xytext=(5 * side, 0), va="center",
            )  # fmt: skip
    fit_ax.set_title(f"Leave-one-out bandwidths, bands of +-{band} std")
    bias_ax.set_title(f"Bias (fit to noise-free data minus f) at h = {h:.3g} for both")
    for ax in (fit_ax, bias_ax):
        ax.set_xlabel("x")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right" if ax is fit_ax else "lower center")
    fit_ax.set_ylabel("y")
    bias_ax.set_ylabel("E fit - f(x)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
