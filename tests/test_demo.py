"""The ``nwfast demo`` command at a tiny size: files written, summary readable."""

import math
import subprocess
import sys

import pytest

from nwfast.cli import main
from nwfast.demo import VARIANTS, read_summary, run_demo

FILES = ("fits.png", "attention.png", "loss.png", "loss_vs_w.png", "summary.txt", "summary.json")


def test_demo_command_writes_figures_and_summary(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--n-train", "12", "--epochs", "3", "--seed", "1", "--out", str(out)]
    assert main(argv) == 0
    for name in FILES:
        assert (out / name).stat().st_size > 0, name
    summary = read_summary(out / "summary.txt")
    assert set(summary) == set(VARIANTS)
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
