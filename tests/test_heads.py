"""Per-galaxy uncertainty (issue 12 item 2): the gaussian head and its NLL recover known heteroscedastic
noise; `fastgal train --head gaussian` writes sigma, calibration and coverage.png and `predict` carries
sigma through; the default rmse head's outputs stay as they were (only --tta's view spread is new)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import run_cli
from PIL import Image
from torch import nn

from fastgal.score.diagnostics import calibration
from fastgal.train.checkpoints import load_checkpoint
from fastgal.train.heads import GaussianHead, gaussian_nll, split_outputs, view_stats
from fastgal.train.model import Denormalize, make_model


def _draw(rng, n):
    """y = 8.9 + 0.3 x + sigma(x) N(0, 1), sigma rising from 0.05 to 0.30 dex across x in [-1, 1]."""
    x = rng.uniform(-1, 1, (n, 1)).astype(np.float32)
    sigma = 0.05 + 0.125 * (x[:, 0] + 1)
    y = (8.9 + 0.3 * x[:, 0] + sigma * rng.normal(size=n)).astype(np.float32)[:, None]
    return x, y, sigma


def test_gaussian_head_recovers_known_heteroscedastic_noise():
    rng = np.random.default_rng(0)
    x, y, _ = _draw(rng, 8000)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 1-D MLP: threads only contend with the rest of the machine
    try:
        m = nn.Sequential(nn.Linear(1, 32), nn.Mish(), nn.Linear(32, 32), nn.Mish(), nn.Linear(32, 2),
                          GaussianHead(Denormalize([y.mean()], [y.std()]), [y.std()]))
        with torch.no_grad():  # it starts at the training mean with sigma about the training spread
            mu0, s0 = split_outputs(m(torch.zeros(1, 1)), 1)
        assert abs(mu0[0, 0] - y.mean()) < 2 * y.std() and 0.1 < s0[0, 0] / y.std() < 10
        opt = torch.optim.Adam(m.parameters(), 1e-2)
        X, Y = torch.tensor(x), torch.tensor(y)
        for _ in range(600):
            i = torch.randint(0, len(X), (256,))
            loss = gaussian_nll(m(X[i]), Y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
        xt, yt, st = _draw(rng, 20000)  # fresh data
        with torch.no_grad():
            mu, sigma = split_outputs(m(torch.tensor(xt)), 1)
    finally:
        torch.set_num_threads(threads)
    in_bin = [(xt[:, 0] >= lo) & (xt[:, 0] < lo + 0.25) for lo in np.linspace(-1, 0.75, 8)]
    bins = [float(np.median(sigma[b, 0] / st[b])) for b in in_bin]
    assert all(abs(r - 1) < 0.2 for r in bins), bins  # sigma within 20% of the truth across the range
    # the check has teeth: one constant sigma (what an RMSE fit implies) misses by far more in some bins
    const = np.sqrt(np.mean(st**2))
    assert max(abs(np.median(const / st[b]) - 1) for b in in_bin) > 0.5
    c = calibration(yt[:, 0], mu[:, 0], sigma[:, 0])
    assert c["within_1sigma"] == pytest.approx(0.683, abs=0.03) and c["within_2sigma"] == pytest.approx(0.954, abs=0.02)
    assert c["rms_z"] == pytest.approx(1.0, abs=0.1) and c["median_abs_z"] == pytest.approx(0.674, abs=0.05)


def test_gaussian_nll_is_the_textbook_value_and_views_spread():
    pred = torch.tensor([[9.0, np.log(0.1)], [8.5, np.log(0.2)]])
    targ = torch.tensor([[9.1], [8.5]])
    want = np.mean([np.log(0.1) + 0.5 * 1.0, np.log(0.2)]) + 0.5 * np.log(2 * np.pi)
    assert gaussian_nll(pred, targ).item() == pytest.approx(want, rel=1e-5)
    ref = nn.functional.gaussian_nll_loss(pred[:, :1], targ, pred[:, 1:].exp() ** 2, full=True)
    assert gaussian_nll(pred, targ).item() == pytest.approx(ref.item(), rel=1e-5)  # torch's, with its constant
    mean, spread = view_stats([np.array([[1.0]]), np.array([[3.0]])])
    assert mean[0, 0] == 2.0 and spread[0, 0] == 1.0
    with pytest.raises(ValueError, match="columns"):
        split_outputs(np.zeros((2, 3)), 2)


def test_gaussian_model_shapes_and_sigma_clamp():
    torch.manual_seed(0)
    m = make_model("xresnet18", 2, [8.9, 10.0], [0.2, 0.5], head="gaussian").eval()
    with torch.no_grad():
        out = m(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 4)
    head = m[1]
    with torch.no_grad():  # an absurd raw output still gives a finite sigma inside [std e^-7, std e^2]
        s = split_outputs(head(torch.tensor([[0.0, 0.0, 1e6, -1e6]])), 2)[1]
    assert s[0, 0] == pytest.approx(0.2 * np.exp(2), rel=1e-5) and s[0, 1] == pytest.approx(0.5 * np.exp(-7), rel=1e-5)
    torch.manual_seed(0)  # the default head draws the same weights as before --head existed
    a = make_model("xresnet18", 2, [8.9, 10.0], [0.2, 0.5])
    torch.manual_seed(0)
    b = make_model("xresnet18", 2, [8.9, 10.0], [0.2, 0.5], head="rmse")
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    assert isinstance(a[1], Denormalize) and a[0][-1].out_features == 2


@pytest.fixture(scope="module")
def gaussian_run(small_shards, tmp_path_factory):
    """One epoch of --head gaussian --tta on small_shards (xresnet18 at 56 px)."""
    run = tmp_path_factory.mktemp("grun") / "r"
    res = run_cli("train", small_shards, "--out", run, "--epochs", 1, "--bs", 32, "--arch", "xresnet18",
                  "--size", 56, "--tta", "--head", "gaussian", "--quiet")
    return run, res.output


@pytest.mark.slow
def test_train_gaussian_head_writes_sigma_calibration_and_coverage(gaussian_run, small_shards, tmp_path):
    run, output = gaussian_run
    pred = pd.read_csv(run / "predictions_valid.csv", dtype={"id": str})
    for t in ("metallicity", "lgm_tot_p50"):
        for c in (f"pred_{t}", f"sigma_{t}", f"pred_tta_{t}", f"sigma_tta_{t}"):
            assert c in pred.columns, c
        assert (pred[f"sigma_{t}"] > 0).all() and (pred[f"sigma_tta_{t}"] >= 0).all()
    m = json.loads((run / "metrics.json").read_text())
    assert m["head"] == "gaussian"
    t = m["targets"]["metallicity"]
    d = pred.pred_metallicity - pred.true_metallicity
    z = d.abs() / pred.sigma_metallicity
    assert t["calibration"]["within_1sigma"] == pytest.approx(float((z <= 1).mean()), abs=1e-3)
    assert t["calibration"]["within_2sigma"] == pytest.approx(float((z <= 2).mean()), abs=1e-3)
    zt = (pred.pred_tta_metallicity - pred.true_metallicity).abs() / pred.sigma_tta_metallicity
    # (the CSV rounds to 1e-5 dex, and a 1-epoch model's views can agree that closely: compare fractions)
    assert t["tta_calibration"]["within_2sigma"] == pytest.approx(float((zt <= 2).mean()), abs=0.02)
    # the validation metric is still the RMSE of the mean, so history.csv reads the same for both heads
    assert t["rmse"] == pytest.approx(float(np.sqrt((d**2).mean())), abs=1e-4)
    hist = pd.read_csv(run / "history.csv")
    assert hist.rmse_metallicity.iloc[-1] == pytest.approx(t["rmse"], abs=1e-3)
    Image.open(run / "coverage.png").load()
    Image.open(run / "loss.png").load()
    assert "within 1 sigma" in output  # the summary's calibration line
    assert load_checkpoint(run)[1]["head"] == "gaussian"

    # predict on the shards carries sigma through and reproduces the run's own
    out = tmp_path / "p.csv"
    summary = json.loads(run_cli("predict", run, small_shards, "--tta", "--out", out, "--json").output)
    got = pd.read_csv(out, dtype={"id": str})
    assert list(got.id) == list(pred.id)
    for c in ("pred_metallicity", "sigma_metallicity", "pred_tta_metallicity", "sigma_tta_lgm_tot_p50"):
        assert np.allclose(got[c], pred[c], atol=2e-4), c
    dm = summary["diagnostics"]["metallicity"]
    assert dm["calibration"]["within_1sigma"] == pytest.approx(t["calibration"]["within_1sigma"], abs=0.01)
    assert "tta_calibration" in dm

    # and on a folder of JPEGs: sigma_<t> with or without --tta, sigma_tta_<t> with it
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in pred.id[:12]:
        shutil.copy(small_shards.parent / "s" / "images" / f"{i}.jpg", imgs / f"{i}.jpg")
    run_cli("predict", run, imgs, "--out", tmp_path / "j.csv")
    j = pd.read_csv(tmp_path / "j.csv", dtype={"id": str}).set_index("id")
    ref = pred.set_index("id").loc[j.index]
    assert np.allclose(j.sigma_metallicity, ref.sigma_metallicity, atol=2e-3) and "sigma_tta_metallicity" not in j
    run_cli("predict", run, imgs, "--tta", "--out", tmp_path / "jt.csv")
    jt = pd.read_csv(tmp_path / "jt.csv", dtype={"id": str}).set_index("id")
    assert np.allclose(jt.sigma_tta_metallicity, ref.sigma_tta_metallicity, atol=2e-3)
    assert (jt.sigma_metallicity > 0).all() and "pred_tta_metallicity" in jt


def test_default_head_writes_no_model_sigma(small_run, small_shards, tmp_path):
    """The rmse head (small_run: --tta) gains only the views' spread; no sigma_<t>, no model calibration."""
    pred = pd.read_csv(small_run / "predictions_valid.csv", dtype={"id": str})
    assert not [c for c in pred.columns if c.startswith("sigma_") and not c.startswith("sigma_tta_")]
    assert {"sigma_tta_metallicity", "sigma_tta_lgm_tot_p50"} <= set(pred.columns)
    m = json.loads((small_run / "metrics.json").read_text())
    assert m["head"] == "rmse" and all("calibration" not in v and "tta_calibration" in v for v in m["targets"].values())
    assert (small_run / "coverage.png").is_file()  # the TTA spread's coverage
    # model.pt records the rmse head; it loads as one and predicts without sigma
    model, meta = load_checkpoint(small_run)
    assert meta["head"] == "rmse" and isinstance(model[1], Denormalize)
    out = tmp_path / "p.csv"
    summary = json.loads(run_cli("predict", small_run, small_shards, "--out", out, "--json").output)
    got = pd.read_csv(out, dtype={"id": str})
    assert not [c for c in got.columns if c.startswith("sigma")] and "calibration" not in summary["diagnostics"]["metallicity"]
    assert np.allclose(got.pred_metallicity, pred.pred_metallicity, rtol=0, atol=1.01e-5)


def test_split_refuses_outputs_that_fit_neither_head():
    """A model whose output width is neither k (rmse) nor 2k (gaussian) is an inconsistent model.pt: say so."""
    mu, sigma = split_outputs(np.zeros((2, 2), np.float32), 2)
    assert mu.shape == (2, 2) and sigma is None
    with pytest.raises(ValueError, match="3 columns for 2 targets"):
        split_outputs(np.zeros((2, 3), np.float32), 2)
