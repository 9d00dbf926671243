"""The seed's recipe: every number of the published run, once (nanoGPT's config block).

    from fastgal.recipe import RECIPE, CPU_RECIPE
    RECIPE.bs, RECIPE.crop, RECIPE.size        # 128, 144 (CropPad), 112 (RandomCrop)

Every command's defaults come from here through its config dataclass (options.py); `fastgal train --preset`
picks RECIPE or CPU_RECIPE for the settings a user did not give.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Recipe:
    """The published recipe (fastai DataBlock + xresnet34 + ranger, ~130k SDSS galaxies, one P100)."""

    image: int = 224  # SkyServer getjpeg cutouts, 224 x 224
    crop: int = 144  # CropPad(144): the centre region ...
    size: int = 112  # ... that RandomCrop(112) draws the model's input from
    max_rotate: float = 10.0  # aug_transforms(max_rotate=10) ...
    p_rotate: float = 0.75  # ... at fastai's p_affine
    arch: str = "xresnet34"  # xresnet34(n_out, sa=True, act_cls=Mish)
    epochs: int = 7  # fit_one_cycle(7, 1e-2)
    lr: float = 1e-2
    bs: int = 128
    valid_pct: float = 0.2  # RandomSplitter(0.2, seed=56)
    split_seed: int = 56
    target: str = "metallicity"  # 12 + log(O/H), MPA-JHU oh_p50
    lr_find_iters: int = 100  # learn.lr_find(): fastai's default num_it


RECIPE = Recipe()


# How a cutout frames its galaxy (`fastgal download --scale auto` asks SkyServer for it, `fastgal synth`
# draws it): the frame's width in units of petroR90_r. "original" is the published study's rule (Wu &
# Boada's download_images.py: scale = 2 * petroR90_r / 0.396 / width, about 5.05 x petroR90_r at any width).
NATIVE_SCALE = 0.396  # SDSS arcsec/pixel


FRAMES = {"original": 2 / NATIVE_SCALE, "4r90": 4.0}


# `fastgal demo` on a CPU: the same geometry at half resolution (112 px cutouts spanning the same
# sky, crop 72 -> 56) with xresnet18, so 2 cores finish in a few minutes and still learn.
# `fastgal train --preset cpu` takes its training settings (PRESET_FIELDS) from here too.
CPU_RECIPE = replace(RECIPE, image=112, crop=72, size=56, arch="xresnet18", epochs=8, bs=64, lr_find_iters=30)


# `fastgal train --preset`: which Recipe fills the training settings a user did not give. `auto` is the
# recipe on a GPU and the cpu preset on a CPU. The model's input size is not a preset's: it follows the
# shards' crop by the recipe's ratio (input_size), whatever the preset.
PRESETS = {"recipe": RECIPE, "cpu": CPU_RECIPE}


PRESET_FIELDS = ("arch", "bs", "epochs", "lr", "lr_find_iters")


def preset_name(asked: str, gpu: bool) -> str:
    """--preset auto -> 'recipe' on a GPU, 'cpu' on a CPU; an explicit name stays."""
    return asked if asked != "auto" else ("recipe" if gpu else "cpu")


def input_size(crop: int) -> int:
    """The model's input for a crop region: the recipe's RandomCrop(112) of CropPad(144), 7/9 of the region
    (144 -> 112, 72 -> 56)."""
    return round(crop * RECIPE.size / RECIPE.crop)


ARCH_NAMES = ["xresnet18", "xresnet34", "xresnet50", "xresnet18_deep", "xresnet34_deep"]  # model.ARCHS, checked by click


def centre_offset(side: int, crop: int) -> int:
    """Where a centred crop of `crop` px starts in `side` px: fastai's CropPad / center crop, (side - crop) // 2,
    rounded down where side - crop is odd. The one rule for every centred crop fastgal makes: shard's --precrop
    and statistics, the FITS region, the loaders (torch and DALI), predict on a folder."""
    return (side - crop) // 2
