"""fastgal.score.diagnostics on constructed data: a known bias lands in the right bin, a known scatter in the
right NMAD, a known mass-metallicity relation is recovered, and calibration reads known noise right."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fastgal.score.diagnostics import (
    binned,
    calibration,
    mzr,
    nmad,
    running_band,
    summarise,
)
from fastgal.score.plots import mzr_plot, pred_vs_true, residuals


def test_nmad_and_outliers_on_known_noise():
    rng = np.random.default_rng(0)
    d = rng.normal(0.0, 0.1, 20000)
    assert nmad(d) == pytest.approx(0.1, rel=0.03)
    d[:200] = 5.0  # 1% gross outliers barely move the NMAD, and are counted
    s = summarise(np.zeros_like(d), d)
    assert s["nmad"] == pytest.approx(0.1, rel=0.05) and s["outlier_fraction"] == pytest.approx(0.01 + 0.0027, abs=0.002)
    assert s["rmse"] > 0.5  # the RMSE is dominated by them


def test_regression_to_the_mean_shows_in_bins_of_the_true_value():
    rng = np.random.default_rng(1)
    true = rng.normal(8.9, 0.2, 8000)
    pred = 8.9 + 0.6 * (true - 8.9) + rng.normal(0, 0.02, true.size)  # shrunk toward the mean
    bins = binned(true, pred, by="true")
    assert len(bins) == 8 and sum(b["n"] for b in bins) == true.size
    assert bins[0]["bias"] > 0.1 and bins[-1]["bias"] < -0.1  # low Z over-, high Z under-predicted
    for b in bins:  # each bin's bias is -0.4 x its own offset from the mean
        assert b["bias"] == pytest.approx(-0.4 * (b["median"] - 8.9), abs=0.02)
    assert abs(summarise(true, pred)["bias"]) < 0.01  # which the overall bias hides


def test_a_bias_and_a_scatter_in_one_range_land_in_their_bins():
    rng = np.random.default_rng(2)
    true = rng.uniform(8.0, 9.6, 16000)  # 8 equal-count bins: edges every 0.2 dex
    noise = np.where(true > 9.2, 0.1, 0.05)  # the metal-rich end is noisier ...
    pred = true + rng.normal(0, 1, true.size) * noise + np.where(true > 9.2, 0.1, 0.0)  # ... and biased high
    bins = binned(true, pred, by="true")
    assert len(bins) == 8
    for b in bins:
        if b["lo"] >= 9.2 - 0.01:
            assert b["bias"] == pytest.approx(0.1, abs=0.01) and b["nmad"] == pytest.approx(0.1, rel=0.1)
        elif b["hi"] <= 9.2 + 0.01:
            assert abs(b["bias"]) < 0.005 and b["nmad"] == pytest.approx(0.05, rel=0.1)
    assert sum(b["lo"] >= 9.19 for b in bins) == 2


def test_mzr_fit_recovers_a_known_relation_and_its_scatter():
    rng = np.random.default_rng(3)
    mass = rng.uniform(8.5, 11.5, 5000)
    coef = [-0.08, 1.85, -0.45]  # a Tremonti-like turnover
    z = np.polyval(coef, mass) + rng.normal(0, 0.1, mass.size)
    f = mzr(mass, z)
    assert np.allclose(f["coefficients"], coef, atol=0.05) and f["rmse"] == pytest.approx(0.1, rel=0.05)
    s = summarise(z, np.polyval(coef, mass), mass=mass)  # predicting the relation itself
    assert s["mzr"]["pred"]["rmse"] < 1e-9 and s["mzr"]["true"]["rmse"] == pytest.approx(0.1, rel=0.05)


def test_calibration_of_right_and_wrong_sigmas():
    rng = np.random.default_rng(4)
    sigma = rng.uniform(0.05, 0.2, 20000)
    true = rng.normal(8.9, 0.2, sigma.size)
    pred = true + rng.normal(0, 1, sigma.size) * sigma
    c = calibration(true, pred, sigma)
    assert c["within_1sigma"] == pytest.approx(0.683, abs=0.015) and c["within_2sigma"] == pytest.approx(0.954, abs=0.01)
    assert c["rms_z"] == pytest.approx(1.0, abs=0.03)
    c = calibration(true, pred, sigma / 2)  # overconfident
    assert c["within_1sigma"] < 0.45 and c["rms_z"] == pytest.approx(2.0, abs=0.06)
    # a zero sigma (8 TTA views that agree exactly) is left out and counted, never an Infinity in metrics.json
    c = calibration(true[:4], pred[:4], [0.1, 0.0, np.inf, 0.2])
    assert c["n"] == 2 and c["n_no_sigma"] == 2 and np.isfinite(c["rms_z"])
    assert calibration(true[:2], pred[:2], [0.0, 0.0])["rms_z"] is None


def test_plots_are_pngs_a_person_can_open(tmp_path):
    rng = np.random.default_rng(5)
    for n in (300, 5000):  # scatter, then density
        mass = rng.uniform(9, 11, n)
        true = 8.9 + 0.2 * (mass - 10) + rng.normal(0, 0.1, n)
        pred = 8.9 + 0.5 * (true - 8.9) + rng.normal(0, 0.05, n)
        s = summarise(true, pred, mass=mass)
        for f in (pred_vs_true(true, pred, tmp_path / f"pvt{n}.png"), residuals(true, pred, tmp_path / f"res{n}.png"),
                  mzr_plot(mass, true, pred, s["mzr"], tmp_path / f"mzr{n}.png")):
            im = Image.open(f)
            im.load()
            assert im.format == "PNG" and min(im.size) > 300
    band = running_band(true, pred)
    assert np.all(band["p16"] <= band["p50"]) and np.all(band["p50"] <= band["p84"])


def test_target_scores_names_the_plain_and_the_tta_prediction():
    """train's metrics.json and predict's diagnostics share one function (issue 29): rmse is the plain
    prediction's, tta_rmse the TTA mean's, baseline_rmse predicting the training mean."""
    from fastgal.score.diagnostics import target_scores

    rng = np.random.default_rng(0)
    true = rng.normal(8.9, 0.2, 400)
    pred, tta = true + rng.normal(0, 0.1, 400), true + rng.normal(0, 0.05, 400)
    m = target_scores(true, pred, pred_tta=tta, sigma_tta=np.full(400, 0.05), train_mean=8.8)
    assert list(m)[:8] == ["rmse", "nmad", "bias", "r2", "outlier_fraction", "baseline_rmse", "tta_rmse", "tta_calibration"]
    assert m["rmse"] == pytest.approx(np.sqrt(np.mean((pred - true) ** 2)))
    assert m["tta_rmse"] == pytest.approx(np.sqrt(np.mean((tta - true) ** 2)))
    assert m["baseline_rmse"] == pytest.approx(np.sqrt(np.mean((true - 8.8) ** 2)))
    plain = target_scores(true, pred)
    assert "tta_rmse" not in plain and "baseline_rmse" not in plain and plain["rmse"] == m["rmse"]
