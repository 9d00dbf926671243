"""Conformal intervals (issue 32): the split-conformal maths on synthetic draws (the finite-sample guarantee,
the Mondrian bins, the hashed calibration part), and `fastgal train --interval` -> calibration.json ->
`fastgal predict --interval` / fastgal.predict on shards and on a JPEG folder of the same galaxies."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli
from PIL import Image

import fastgal
from fastgal.score.conformal import (
    calibrate,
    calibration_part,
    conformal_quantile,
    intervals,
    parse_levels,
    resampled_coverage,
)


def test_the_finite_sample_quantile_is_the_ceil_n_plus_1_level_th_score():
    s = np.arange(1.0, 10.0)  # n = 9
    assert conformal_quantile(s, 0.9) == 9.0  # ceil(10 * 0.9) = 9: exactly, not 9.000000001 -> 10
    assert conformal_quantile(s, 0.5) == 5.0
    assert conformal_quantile(s, 0.8) == 8.0
    assert conformal_quantile(s, 0.95) == math.inf  # ceil(9.5) = 10 > 9: 9 scores cannot promise 95%
    assert parse_levels("0.95,0.68,0.9") == [0.68, 0.9, 0.95]
    for bad in ("0.9,1", "0", "x"):
        with pytest.raises(ValueError, match="between 0 and 1"):
            parse_levels(bad)


def _draws(rng, n, trials):
    """Heteroscedastic, heavy-tailed errors with a sigma that is right only up to a factor of 2 (a badly
    calibrated head): (true, pred, sigma) of shape (trials, n)."""
    pred = rng.normal(9.0, 0.2, (trials, n))
    scale = rng.uniform(0.05, 0.3, (trials, n))
    true = pred + scale * rng.standard_t(4, (trials, n))
    return true, pred, scale * 2.0


def test_split_conformal_covers_at_least_the_level_and_at_most_level_plus_1_over_n_plus_1():
    """The guarantee on exchangeable draws, averaged over many calibration sets: level <= E[coverage] <=
    level + 1/(n+1); the raw +-z sigma interval of the same (mis-scaled) sigma does not come close."""
    rng = np.random.default_rng(0)
    n_cal, n_test, trials = 49, 200, 400
    true, pred, sigma = _draws(rng, n_cal + n_test, trials)
    for level in (0.68, 0.9, 0.95):
        for normalized in (True, False):
            covs = []
            for i in range(trials):
                c = slice(0, n_cal)
                cal = calibrate(range(n_cal), true[i, c], pred[i, c], sigma[i, c] if normalized else None,
                                targets=["z"])
                lo, hi = intervals(cal, "z", pred[i, n_cal:], sigma[i, n_cal:], level)
                covs.append(np.mean((true[i, n_cal:] >= lo) & (true[i, n_cal:] <= hi)))
            se = np.std(covs) / np.sqrt(trials)
            assert level - 3 * se <= np.mean(covs) <= level + 1 / (n_cal + 1) + 3 * se, (level, normalized)
    raw = resampled_coverage(true[0], pred[0], sigma[0], [0.68], n_cal=n_cal, repeats=200)["0.68"]
    assert raw["raw_sigma"]["coverage"] > 0.85  # sigma twice too large: raw intervals over-cover
    assert raw["coverage"] == pytest.approx(0.68, abs=0.05)  # conformal, over re-splits of the same galaxies


def test_mondrian_bins_cover_in_each_bin_where_one_q_does_not():
    """Two populations told apart by the prediction, one 4x noisier, and no sigma: one global q under-covers the
    noisy one and over-covers the other; Mondrian bins by the prediction cover both."""
    rng = np.random.default_rng(1)
    n = 4000
    pred = rng.choice([8.5, 9.2], n)
    true = pred + np.where(pred > 9, 0.2, 0.05) * rng.normal(size=n)
    cal_m = np.arange(n) < n // 2
    marg = calibrate(range(n // 2), true[cal_m], pred[cal_m], targets=["z"])
    mond = calibrate(range(n // 2), true[cal_m], pred[cal_m], targets=["z"], by="pred", n_bins=2)
    te, noisy = ~cal_m, pred > 9
    for cal, ok in ((marg, False), (mond, True)):
        lo, hi = intervals(cal, "z", pred[te], level=0.9)
        inside = (true[te] >= lo) & (true[te] <= hi)
        per_bin = [inside[noisy[te]].mean(), inside[~noisy[te]].mean()]
        assert all(abs(c - 0.9) < 0.03 for c in per_bin) == ok, per_bin


def test_the_calibration_part_is_a_stable_hash_of_the_id():
    ids = [str(1237646632775516000 + i) for i in range(4000)]
    part = calibration_part(ids, 0.5)
    assert abs(part.mean() - 0.5) < 0.03
    rev = calibration_part(ids[::-1], 0.5)[::-1]  # the order of the rows does not move a galaxy
    assert (part == rev).all() and (calibration_part(ids[:100], 0.5) == part[:100]).all()
    assert (calibration_part([int(i) for i in ids[:50]], 0.5) == part[:50]).all()  # int or str id: the same
    assert (calibration_part(ids, 0.3) <= part).all()  # a smaller part is inside the larger one


@pytest.fixture(scope="module")
def interval_run(small_shards, tmp_path_factory):
    """One epoch of --head gaussian --interval on small_shards (xresnet18 at 56 px)."""
    run = tmp_path_factory.mktemp("crun") / "r"
    run_cli("train", small_shards, "--out", run, "--epochs", 1, "--bs", 32, "--arch", "xresnet18", "--size", 56,
            "--head", "gaussian", "--interval", "0.68,0.9,0.95", "--workers", 1, "--quiet")
    return run


@pytest.mark.slow
def test_train_interval_calibrates_on_a_part_that_chose_nothing(interval_run):
    run = interval_run
    df = pd.read_csv(run / "predictions_valid.csv", dtype={"id": str})
    cal = json.loads((run / "calibration.json").read_text())
    calm = calibration_part(df.id, 0.5)
    assert (df.part == np.where(calm, "calibration", "test")).all() and sorted(cal["ids"]) == sorted(df.id[calm])
    # the epoch was chosen (validated) on the test part only: history's RMSE is the test part's
    hist = pd.read_csv(run / "history.csv")
    test = df[~calm]
    assert hist.rmse_metallicity.iloc[-1] == pytest.approx(
        float(np.sqrt(np.mean((test.pred_metallicity - test.true_metallicity) ** 2))), abs=1e-4)
    # the intervals: pred -+ q sigma with q the finite-sample quantile of the calibration part's |z|
    c = df[calm]
    z = np.sort(np.abs(c.true_metallicity - c.pred_metallicity) / c.sigma_metallicity)
    q = conformal_quantile(z, 0.9)
    assert np.allclose(df["hi_metallicity_0.9"], df.pred_metallicity + q * df.sigma_metallicity, atol=2e-4)
    m = json.loads((run / "metrics.json").read_text())["conformal"]
    assert m["n_calibration"] == calm.sum() and m["n_test"] == (~calm).sum() and m["method"] == "normalized"
    held = m["held_out"]["metallicity"]["0.9"]
    inside = (test.true_metallicity >= test["lo_metallicity_0.9"]) & (test.true_metallicity <= test["hi_metallicity_0.9"])
    assert held["marginal"]["coverage"] == pytest.approx(inside.mean(), abs=1e-9)
    assert {"marginal", "mondrian_pred", "raw_sigma"} <= set(held) and "by_true" in held["raw_sigma"]
    assert set(m["resampled"]["lgm_tot_p50"]) == {"0.68", "0.9", "0.95"}
    Image.open(run / "interval_coverage.png").load()
    assert "interval_coverage.png" in (run / "report.html").read_text()


@pytest.mark.slow
def test_predict_interval_on_a_jpeg_folder_equals_the_shards(interval_run, small_shards, small_run, tmp_path):
    run = interval_run
    a, b = tmp_path / "sh.csv", tmp_path / "img.csv"
    out = run_cli("predict", run, small_shards, "--interval", "0.68,0.9,0.95", "--out", a, "--workers", 1).output
    assert "conformal intervals: 0.68:" in out
    run_cli("predict", run, small_shards.parent / "s" / "images", "--interval", "0.68,0.9,0.95", "--out", b,
            "--workers", 1)
    sh = pd.read_csv(a, dtype={"id": str}).set_index("id")
    img = pd.read_csv(b, dtype={"id": str}).set_index("id").loc[sh.index]
    ref = pd.read_csv(run / "predictions_valid.csv", dtype={"id": str}).set_index("id").loc[sh.index]
    cols = [c for c in sh.columns if c.startswith(("lo_", "hi_"))]
    assert len(cols) == 12  # 2 targets x 3 levels x (lo, hi)
    for c in cols:  # the same galaxies, the same intervals: from shards, from JPEGs, and what train wrote
        assert np.allclose(sh[c], img[c], atol=2e-3) and np.allclose(sh[c], ref[c], atol=2e-5), c
    api = fastgal.predict(run, small_shards, interval=[0.9]).set_index("id")
    assert np.allclose(api["hi_metallicity_0.9"], sh["hi_metallicity_0.9"], atol=2e-5)
    # a run trained without --interval has no calibration: one line saying how to get one
    res = run_cli("predict", small_run, small_shards, "--interval", "0.9", "--out", tmp_path / "x.csv", ok=False)
    assert res.exit_code != 0 and "trained without --interval" in res.output
    # a folder with --tta predicts only the views' mean, which was not calibrated: refused before any work
    res = run_cli("predict", run, small_shards.parent / "s" / "images", "--interval", "0.9", "--tta", "--out",
                  tmp_path / "y.csv", ok=False)
    assert res.exit_code != 0 and "drop --tta" in res.output and not (tmp_path / "y.csv").exists()


def test_train_interval_refuses_bad_settings_before_training(small_shards, tmp_path):
    out = tmp_path / "r"
    res = run_cli("train", small_shards, "--out", out, "--interval", "0.9", "--calib-pct", "0.01", ok=False)
    assert res.exit_code != 0 and "10 of each" in res.output and not (out / "config.json").exists()
    res = run_cli("train", small_shards, "--out", out, "--interval", "0.9,1.5", ok=False)
    assert res.exit_code != 0 and "between 0 and 1" in res.output
    res = run_cli("train", small_shards, "--out", out, "--interval", "0.9", "--interval-by", "mass", "--mass-col", "nope",
                  ok=False)
    assert res.exit_code != 0 and "'nope'" in res.output and not (out / "config.json").exists()
