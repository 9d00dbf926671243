"""The public Python API's own functions: the recipe's Learner over any fastgal DataLoaders, and predictions
as a DataFrame from a run folder or from a Learner (see fastgal/__init__.py for the whole API).

    import fastgal
    dls = fastgal.dataloaders("shards/synth", bs=64, size=56)
    learn = fastgal.recipe_learner(dls, arch="xresnet18")
    learn.fit_one_cycle(1, 1e-2)
    df = fastgal.predict(learn, "shards/synth")                  # or a run folder, or a folder of JPEGs
"""

from __future__ import annotations

import functools
from pathlib import Path

import pandas as pd

from fastgal.load import loader
from fastgal.options import PredictConfig
from fastgal.recipe import RECIPE
from fastgal.train.device import resolve_device
from fastgal.util import is_url


@functools.wraps(loader.dataloaders)
def dataloaders(shards, *args, device="cpu", **kwargs):
    # the device checked here, in one line, as the CLI's --device is: not in the first batch's DALI traceback
    return loader.dataloaders(shards, *args, device=resolve_device(device, api=True), **kwargs)


def recipe_learner(dls, *, arch: str = RECIPE.arch, head: str = "rmse", opt: str = "ranger", precision: str = "auto",
                   channels_last: bool | None = None, path=None, compile: bool | str = False):
    """The seed recipe's fastai Learner over `dls` (fastgal.dataloaders'): `arch`(n_out, sa=True,
    act_cls=Mish) with an output layer that denormalises to the shards' target scale, ranger, RMSE loss and
    a per-target RMSE metric, fastai's progress bars. On a GPU: bf16 (fp16 where bf16 is missing) and
    channels-last, as `fastgal train` runs it. `compile`: True, or torch.compile's mode ("reduce-overhead"
    replays each step as a CUDA graph on a GPU).

    Example:
        learn = fastgal.recipe_learner(dls, arch="xresnet18")
        learn.lr_find(); learn.fit_one_cycle(7, 1e-2)
    """
    from fastgal.train.device import resolve_precision
    from fastgal.train.learner import make_learner
    from fastgal.train.model import make_model

    shards = getattr(dls, "shards", None)
    if shards is None:
        raise ValueError("recipe_learner needs fastgal's DataLoaders (fastgal.dataloaders): it reads the targets' scale from the shards")
    device = resolve_device(dls.device or "cpu", api=True)
    mean, std = shards.target_stats()
    model = make_model(arch, len(dls.targets), mean, std, head=head, c_in=dls.train.geometry.channels)
    return make_learner(dls, model, targets=dls.targets, path=Path(path or shards.folder), precision=resolve_precision(precision, device),
                        channels_last=device.type == "cuda" if channels_last is None else channels_last,
                        opt=opt, compile=compile, head=head, progress="fastai")


def _learner_meta(learn) -> dict:
    """What model.pt would record, read off a Learner over fastgal DataLoaders (raw outputs: one per target)."""
    from fastgal.train.checkpoints import image_meta

    dls = learn.dls
    g, sh = dls.train.geometry, dls.shards
    return {"targets": list(dls.targets), "size": g.size, "crop": g.crop, "precrop": sh.precrop,
            "image_size": list(sh.image_size), "pixel_mean": list(g.mean), "pixel_std": list(g.std), "precision": "fp32",
            **image_meta(sh, g)}


def predict(model, data, *, split: str = "valid", tta: bool = False, bs: int = 256, device: str | None = None,
            loader: str = "auto", workers: int = 0, interval=None) -> pd.DataFrame:
    """Predictions as a DataFrame: `model` is a `fastgal train` run folder (or its model.pt) or a fastai
    Learner over fastgal.dataloaders (any architecture: its outputs, one per target); `data` a shard folder
    (its `split`: valid, train or all) or a folder of .jpg cutouts. Columns as `fastgal predict` writes them:
    id, [split,] true_<t>, pred_<t>, [sigma_<t>,] and with tta pred_tta_<t>, sigma_tta_<t>; a JPEG folder
    adds file, status and reason (every file gets a row). interval (a run folder trained with --interval): levels,
    e.g. "0.68,0.9,0.95" or [0.9], add the conformal intervals lo_<t>_<level>, hi_<t>_<level> from its
    calibration.json, as `fastgal predict --interval` does.

    Example:
        df = fastgal.predict("runs/r1", "shards/synth", tta=True)
        df = fastgal.predict(learn, "images/")            # the Learner's model on new cutouts
    """
    from fastgal.score.predict import predict_table, with_intervals
    from fastgal.train.checkpoints import inference, load_checkpoint

    if isinstance(model, (str, Path)):
        dev = resolve_device(device or "auto", api=True)
        net, meta = load_checkpoint(model, dev)
    else:  # a fastai Learner
        dev = resolve_device(device or model.dls.device or "cpu", api=True)
        net, meta = model.model.to(dev).eval(), _learner_meta(model)
    if interval is not None and not isinstance(model, (str, Path)):
        raise ValueError("interval: a Learner has no calibration; give the run folder of `fastgal train --interval`")
    levels = None if interval is None else interval if isinstance(interval, str) else ",".join(map(str, interval))
    cfg = PredictConfig(run=Path(str(model)) if isinstance(model, (str, Path)) else Path("."),
                        input=data if is_url(data) else Path(data), split=split, tta=tta, bs=bs, device=str(dev),
                        loader=loader, workers=workers, interval=levels)
    df = predict_table(cfg, inference(net, meta, dev), meta, dev)
    return df if interval is None else with_intervals(cfg, df)
