"""The public Python API (fastgal/__init__.py), used only through `import fastgal` and stock fastai."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import fastgal

GEOM = dict(size=56, bs=32)


def test_the_api_is_what_help_lists_and_import_stays_light():
    assert set(fastgal.__all__) == {"dataloaders", "recipe_learner", "predict", "Shards", "Split", "RECIPE", "__version__"}
    assert sorted(dir(fastgal)) == sorted(fastgal.__all__)
    for name in ("dataloaders(", "recipe_learner(", "predict(", "Shards(", "RECIPE"):
        assert name in fastgal.__doc__
    for name in fastgal.__all__[:-1]:
        obj = getattr(fastgal, name)
        assert callable(obj) or name == "RECIPE"
        if callable(obj):
            assert "Example:" in (obj.__doc__ or ""), name  # reference docs: each with a runnable example
    with pytest.raises(AttributeError, match="no attribute 'make_learner'"):
        fastgal.make_learner  # noqa: B018  (not public; submodules become attributes once imported, as in any package)
    # `import fastgal` alone imports neither torch nor fastai: the CLI's start-up and a notebook's first cell
    code = "import sys, fastgal; print('torch' in sys.modules, 'fastai' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split() == ["False", "False"]


def test_a_stock_learner_with_another_architecture_trains_and_predicts_as_fastgal_does(small_shards):
    """Any model: fastai's own xresnet18 and MSE loss on fastgal's DataLoaders, no fastgal code in between;
    its get_preds and fastgal.predict agree sample for sample."""
    from fastai.vision.all import Learner, MSELossFlat, xresnet18

    dls = fastgal.dataloaders(small_shards, **GEOM)
    assert dls.c == 2 and dls.n_inp == 1 and dls.train.bs == 32
    learn = Learner(dls, xresnet18(n_out=dls.c), loss_func=MSELossFlat())
    learn.fit(1, 1e-3)
    preds, targs = learn.get_preds()  # the validation set, centre view, file order
    df = fastgal.predict(learn, small_shards)
    assert list(df.id) == fastgal.Shards(small_shards).split("valid").keys
    assert np.allclose(df[["pred_metallicity", "pred_lgm_tot_p50"]].to_numpy(), preds.numpy(), atol=1e-5)
    assert np.allclose(df[["true_metallicity", "true_lgm_tot_p50"]].to_numpy(), targs.numpy(), atol=1e-6)


def test_recipe_learner_and_predict_on_a_run_and_a_jpeg_folder(small_shards, small_run, survey, tmp_path):
    dls = fastgal.dataloaders(small_shards, **GEOM)
    learn = fastgal.recipe_learner(dls, arch="xresnet18")
    learn.fit_one_cycle(1, 1e-2)
    names = list(learn.recorder.metric_names)
    assert names[:5] == ["epoch", "train_loss", "valid_loss", "rmse_metallicity", "rmse_lgm_tot_p50"], names
    assert np.isfinite(learn.recorder.values[-1]).all()
    # a run folder: the same numbers as `fastgal predict` writes
    df = fastgal.predict(small_run, small_shards, tta=True)
    ref = pd.read_csv(small_run / "predictions_valid.csv", dtype={"id": str})
    assert list(df.id) == list(ref.id) and np.allclose(df.pred_tta_metallicity, ref.pred_tta_metallicity, atol=1.01e-5)
    # a JPEG folder: every file a row, with its status
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for p in sorted((small_shards.parent / "s" / "images").glob("*.jpg"))[:5]:
        (imgs / p.name).write_bytes(p.read_bytes())
    (imgs / "broken.jpg").write_bytes(b"not a jpeg")
    out = fastgal.predict(learn, imgs).set_index("id")
    assert len(out) == 6 and out.loc["broken", "status"] != "ok" and np.isnan(out.loc["broken", "pred_metallicity"])
    assert (out.drop("broken").status == "ok").all() and out.drop("broken").pred_metallicity.notna().all()
    with pytest.raises(ValueError, match="fastgal's DataLoaders"):
        fastgal.recipe_learner(object())
