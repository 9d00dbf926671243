"""fastgal predict: a run applied to shards reproduces its own validation predictions; JPEG folders too."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import run_cli, stderr_on_a_terminal
from PIL import Image

from fastgal.load.geometry import CENTRE
from fastgal.load.loader import Loader
from fastgal.load.preprocess import geometry_for
from fastgal.score.predict import _checked
from fastgal.shards.cutouts import ImageRules
from fastgal.shards.read import Shards
from fastgal.train.checkpoints import inference_settings


def test_predict_on_shards_reproduces_the_run(small_run, small_shards, tmp_path):
    out = tmp_path / "p.csv"
    res = run_cli("predict", small_run, small_shards, "--split", "valid", "--tta", "--out", out, "--json")
    summary = json.loads(res.output)
    assert summary["rows"] == json.loads((small_shards / "manifest.json").read_text())["counts"]["valid"]
    got = pd.read_csv(out, dtype={"id": str})
    ref = pd.read_csv(small_run / "predictions_valid.csv", dtype={"id": str})
    assert list(got.id) == list(ref.id)
    # train's predictions_valid.csv and `fastgal predict` are one function (score.predict.predict_split): the same
    # numbers, to the CSV's 5 decimals (batches of 32 vs 256 may move the last bit of a float32)
    assert list(got.columns) == ["id", "split", *ref.columns[1:]]
    for c in ref.columns[1:]:
        assert np.allclose(got[c], ref[c], rtol=0, atol=1.01e-5), c
    # shards know the truth: the scores train wrote to metrics.json, one function and the same names (issue 29):
    # rmse of the plain prediction, tta_rmse of the 8 views' mean
    metrics = json.loads((small_run / "metrics.json").read_text())["targets"]
    assert set(summary["diagnostics"]) == set(metrics) == {"metallicity", "lgm_tot_p50"}
    for t, m in metrics.items():
        d = summary["diagnostics"][t]
        assert d["n"] == summary["rows"] and sum(b["n"] for b in d["by_true"]) == summary["rows"]
        rmse = np.sqrt(np.mean((got[f"pred_{t}"] - got[f"true_{t}"]) ** 2))
        tta = np.sqrt(np.mean((got[f"pred_tta_{t}"] - got[f"true_{t}"]) ** 2))
        assert abs(rmse - tta) > 4e-5  # apart by more than the tolerance below, so a swap of the two fails
        for key, want in (("rmse", rmse), ("tta_rmse", tta)):
            assert summary[f"{key}_{t}"] == d[key]
            assert d[key] == pytest.approx(m[key], abs=2e-5) and d[key] == pytest.approx(want, abs=2e-5), (t, key)
        for key in ("nmad", "bias", "r2", "outlier_fraction"):  # the rest of train's keys: the plain prediction's
            assert d[key] == pytest.approx(m[key], abs=1e-4), (t, key)
        assert d["tta_calibration"]["n"] == m["tta_calibration"]["n"] == summary["rows"]
    printed = run_cli("predict", small_run, small_shards, "--split", "valid", "--tta", "--out", out).output
    d = summary["diagnostics"]["metallicity"]
    assert f"metallicity: RMSE {d['rmse']:.4f}  TTA RMSE {d['tta_rmse']:.4f}  NMAD" in printed
    run_cli("predict", small_run, small_shards, "--split", "all")  # default --out: inside the run folder
    both = pd.read_csv(small_run / f"predictions_{small_shards.name}.csv", dtype={"id": str})
    man = json.loads((small_shards / "manifest.json").read_text())
    assert len(both) == man["counts"]["train"] + man["counts"]["valid"] and both.id.is_unique


def test_predict_on_a_jpeg_folder_reports_every_file(small_run, small_shards, tmp_path):
    src = small_shards.parent / "s" / "images"
    ref = pd.read_csv(small_run / "predictions_valid.csv", dtype={"id": str})
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in ref.id[:20]:
        shutil.copy(src / f"{i}.jpg", imgs / f"{i}.jpg")
    (imgs / "broken.jpg").write_bytes((src / f"{ref.id[0]}.jpg").read_bytes()[:300])
    (imgs / "page.jpg").write_bytes(b"<html>404 Not Found</html>")
    Image.new("RGB", (64, 64)).save(imgs / "small.jpg")
    # issue 22, case 4: shard's checker and reasons (a greyscale cutout is not-rgb there, so here), every file a row
    Image.open(src / f"{ref.id[1]}.jpg").convert("L").save(imgs / "grey.jpg")
    Image.open(src / f"{ref.id[2]}.jpg").save(imgs / "cutout.png")
    (imgs / ".DS_Store").write_bytes(b"\0\0")  # hidden: not an input
    out = tmp_path / "p.csv"
    res = run_cli("predict", small_run, imgs, "--out", out)
    assert "5 unusable" in res.output  # page, small, broken, grey, png
    df = pd.read_csv(out, dtype={"id": str}).set_index("id")
    assert len(df) == 25  # every file has a row
    assert df.loc["page", "status"] == "not-jpeg" and df.loc["small", "status"] == "too-small"  # under the crop
    assert df.loc["broken", "status"] == "corrupt-image" and "truncated" in df.loc["broken", "reason"].lower()
    assert df.loc["grey", "status"] == "not-rgb" and df.loc["cutout", "status"] == "not-jpeg"
    assert df.loc[["page", "small", "broken", "grey", "cutout"], "pred_metallicity"].isna().all()
    good = ref.set_index("id").loc[ref.id[:20]]
    # the torch path on JPEG files matches DALI on shards, up to decoder rounding
    assert np.allclose(df.loc[good.index, "pred_metallicity"], good.pred_metallicity, atol=2e-3)


def test_predict_errors(small_run, tmp_path):
    res = run_cli("predict", tmp_path, tmp_path, ok=False)
    assert res.exit_code != 0 and "model.pt" in res.output
    (tmp_path / "empty").mkdir()
    res = run_cli("predict", small_run, tmp_path / "empty", ok=False)
    assert res.exit_code != 0 and ".jpg" in res.output
    # issue 22, case 3: nothing scored is a failure, with the reason, though every file has its row
    (tmp_path / "none").mkdir()
    Image.effect_noise((100, 100), 40).convert("RGB").save(tmp_path / "none" / "a.jpg")  # 100 px, not the survey's 112
    res = run_cli("predict", small_run, tmp_path / "none", "--out", tmp_path / "n.csv", ok=False)
    assert res.exit_code != 0 and "none of the 1 inputs could be scored" in res.output and "wrong-size" in res.output
    assert len(pd.read_csv(tmp_path / "n.csv")) == 1


def test_predict_input_errors(small_run, small_shards, survey, tmp_path):
    import torch

    from fastgal.options import PredictConfig
    from fastgal.score.predict import predict

    fake = tmp_path / "fake"
    fake.mkdir()
    torch.save({"format_version": 99}, fake / "model.pt")
    res = run_cli("predict", fake, tmp_path, ok=False)
    assert res.exit_code != 0 and "not a fastgal model" in res.output
    res = run_cli("predict", small_run, small_run / "model.pt", ok=False)  # a file, not a folder
    assert res.exit_code != 0 and "not a folder" in res.output
    # 224 px shards against a model trained on 112 px cutouts
    big = tmp_path / "big"
    run_cli("shard", survey / "data/master.csv", survey / "images", big, "--quiet")
    res = run_cli("predict", small_run, big, ok=False)
    assert res.exit_code != 0 and "re-shard to match" in res.output
    with pytest.raises(ValueError, match="no split 'test'"):  # click's Choice at the CLI; the Shards in the library
        predict(PredictConfig(run=small_run, input=small_shards, split="test"))


def test_predict_decodes_a_jpeg_folder_as_the_loaders_do(small_shards):
    """A JPEG folder's files become the bytes the shards hold, then go through the torch loader's own decode and
    transform (the centre view and the 8 TTA views): the same tensors as the loader's."""
    from fastgal.load.decode import decode_batch
    from fastgal.load.geometry import transform_batch

    sh = Shards(small_shards)
    dl = Loader(sh.split("valid"), CENTRE, geometry_for(sh, size=56), bs=8, backend="torch")
    survey = small_shards.parent / "s" / "images"
    ids = dl.split.keys[:8]
    size = tuple(sh.image_size)
    rules = ImageRules(crop=72, precrop=None, expect=size, region=72, stored=size)
    data = [_checked(survey / f"{i}.jpg", rules) for i in ids]
    assert all(why == "" and np.array_equal(d, dl.split.jpeg(k)) for k, (d, why) in enumerate(data))
    imgs = decode_batch([d for d, _ in data])
    assert torch.equal(transform_batch(imgs, dl.geometry, CENTRE), dl.one_batch()[0])
    for v in (3, 6):
        assert torch.equal(transform_batch(imgs, dl.geometry, v), dl.view_of(v).one_batch()[0])
    assert _checked(survey.parent / "data" / "master.csv", rules)[1].startswith("not-jpeg")


@pytest.mark.slow
def test_a_precrop_model_scores_raw_cutouts(small_shards, tmp_path):
    """Issue 22, case 3: a model trained on --precrop shards takes raw cutouts' centre, as shard did."""
    s = small_shards.parent / "s"
    sh, run = tmp_path / "sh", tmp_path / "r"
    run_cli("shard", s / "data/master.csv", s / "images", sh, "--crop", 72, "--precrop", 80, "--quiet")
    run_cli("train", sh, "--out", run, "--epochs", 1, "--bs", 32, "--arch", "xresnet18", "--size", 32, "--quiet")
    raw = tmp_path / "raw"
    raw.mkdir()
    ids = Shards(sh).split("valid").keys[:6]
    for i in ids:
        shutil.copy(s / "images" / f"{i}.jpg", raw / f"{i}.jpg")  # 112 px originals, not the 80 px centres
    run_cli("predict", run, raw, "--out", tmp_path / "raw.csv")
    got = pd.read_csv(tmp_path / "raw.csv", dtype={"id": str}).set_index("id")
    assert (got.status == "ok").all() and got.pred_metallicity.notna().all()
    ref = pd.read_csv(run / "predictions_valid.csv", dtype={"id": str}).set_index("id").loc[ids]
    assert np.allclose(got.loc[ids, "pred_metallicity"], ref.pred_metallicity, atol=2e-3)  # the same centre


def test_predict_computes_as_training_did():
    assert inference_settings({"precision": "bf16", "channels_last": True}, "cuda") == (torch.bfloat16, True)
    assert inference_settings({"precision": "fp16", "channels_last": False}, "cuda:1") == (torch.float16, False)
    assert inference_settings({"precision": "bf16", "channels_last": True}, "cpu") == (None, False)  # fp32 on a CPU


def test_the_table_groups_columns_per_target():
    """One layout for predictions_valid.csv and `fastgal predict`: per target true, pred, sigma, pred_tta,
    sigma_tta; NaN for unusable rows; true values of other targets than the model's come first."""
    from fastgal.score.predict import table

    est = {"pred": np.array([[1.0, 2.0], [3.0, 4.0]]), "sigma": None, "pred_tta": np.array([[5.0, 6.0], [7.0, 8.0]])}
    true = np.array([[0.5, 1.5], [2.5, 3.5]], dtype=np.float32)
    df = table(["a", "b"], ["m", "g"], est, true, split="valid")
    assert list(df.columns) == ["id", "split", "true_m", "pred_m", "pred_tta_m", "true_g", "pred_g", "pred_tta_g"]
    assert df.pred_tta_g.tolist() == [6.0, 8.0] and df.true_g.tolist() == [1.5, 3.5]
    bad = table(["a", "b"], ["m", "g"], est, bad=np.array([False, True]))
    assert np.isnan(bad.pred_m[1]) and bad.pred_m[0] == 1.0 and "true_m" not in bad
    other = table(["a", "b"], ["m", "g"], est, true, true_names=["x", "y"])
    assert list(other.columns)[:3] == ["id", "true_x", "true_y"] and "true_m" not in other


def test_predict_counts_images_on_a_terminal_only(small_run, small_shards, tmp_path):
    """Long work shows progress (util.Progress's rule): predict's counter, every view of every image with --tta,
    is redrawn on a terminal only; off one, and on one with --quiet, stderr stays empty."""
    import subprocess
    import sys

    n = len(Shards(small_shards).split("valid"))
    cmd = [sys.executable, "-m", "fastgal", "predict", str(small_run), str(small_shards), "--tta", "--device", "cpu"]
    rc, tty = stderr_on_a_terminal([*cmd, "--out", str(tmp_path / "a.csv")])
    assert rc == 0, tty[-3000:]
    assert f"\r\x1b[Kpredict {9 * n}/{9 * n} img [" in tty  # the centre view, then the 8 dihedral ones
    p = subprocess.run([*cmd, "--out", str(tmp_path / "b.csv")], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and p.stderr == "", p.stderr[-3000:]
    rc, tty = stderr_on_a_terminal([*cmd, "--out", str(tmp_path / "c.csv"), "--quiet"])
    assert rc == 0 and "predict " not in tty, tty[-3000:]
