"""The ``nwfast demo`` command at a tiny size: files written, summary readable."""

import json
import math
import os
import subprocess
import sys

import pytest

from nwfast.cli import main
from nwfast.demo import ESTIMATORS, VARIANTS, read_summary, run_demo

FILES = (
    "fits.png", "estimators.png", "attention.png", "loss.png", "loss_vs_w.png", "summary.txt",
    "summary.json",
)  # fmt: skip


def test_demo_command_writes_figures_and_summary(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--n-train", "12", "--epochs", "3", "--seed", "1", "--out", str(out)]
    assert main(argv) == 0
    for name in FILES:
        assert (out / name).stat().st_size > 0, name
    summary = read_summary(out / "summary.txt")
    assert set(summary) == {*VARIANTS, *ESTIMATORS}
    for row in summary.values():
        assert set(row) == {"w_median", "w_min", "w_max", "loo_mse", "train_mse", "test_mse"}
        assert all(math.isfinite(v) for v in row.values())
    assert summary["untrained"]["w_median"] == 1.0
    # The summary is also printed.
    assert "test_mse" in capsys.readouterr().out


def test_trained_scalar_beats_untrained(tmp_path):
    results = run_demo(seed=0, epochs=30, out=tmp_path, quiet=True)
    assert results["scalar"]["test_mse"] < results["untrained"]["test_mse"]
    # Without leave-one-out, w runs away and the fit reproduces the noise.
    assert results["scalar_no_loo"]["w"][0] > 10 * results["scalar"]["w"][0]
    assert results["scalar_no_loo"]["train_mse"] < results["scalar"]["train_mse"]
    assert results["scalar_no_loo"]["test_mse"] > results["scalar"]["test_mse"]


def test_estimators_in_the_summary(tmp_path):
    from nwfast.demo import make_data
    from nwfast.estimator import LocalLinearRegression, NadarayaWatson

    results = run_demo(seed=2, n_train=40, epochs=2, out=tmp_path, quiet=True)
    x, y, _, _ = make_data(40, 2)
    for name, cls in (("nadaraya_watson", NadarayaWatson), ("local_linear", LocalLinearRegression)):
        model = cls("loo").fit(x, y)
        assert results[name]["w"] == pytest.approx([model.bandwidth_**-2])
        assert results[name]["loo_mse"] == pytest.approx(model.loo_mse_)
    assert (
        json.loads((tmp_path / "summary.json").read_text())["local_linear"]
        == (results["local_linear"])
    )


@pytest.mark.parametrize("module", ["matplotlib", "sklearn"])
def test_demo_without_its_extra_says_what_to_install_and_writes_nothing(tmp_path, module):
    # Python imports sitecustomize at start-up: it hides the module as if not installed.
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(f"import sys\nsys.modules[{module!r}] = None\n")
    out = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, "-m", "nwfast", "demo", "--out", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(shim)},
    )
    assert done.returncode != 0
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert module in lines[0] and "pip install 'nwfast[demo]'" in lines[0]
    assert not out.exists()


def test_python_dash_m():
    done = subprocess.run(
        [sys.executable, "-m", "nwfast", "demo", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0 and "--n-train" in done.stdout


@pytest.mark.parametrize(
    "argv, match",
    [
        (["demo", "--epochs", "0"], "--epochs: must be an integer >= 1"),
        (["demo", "--n-train", "1"], "--n-train: must be an integer >= 2"),
        (["demo", "--backend", "cuda"], "--backend: invalid choice"),
        ([], "required: COMMAND"),
    ],
)
def test_bad_arguments(argv, match, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    assert match in capsys.readouterr().err
