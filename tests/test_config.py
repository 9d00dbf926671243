"""fastgal.options: the seed's recipe written once, and every command's defaults (and CLI options) read from it."""

from __future__ import annotations

from dataclasses import fields

from conftest import run_cli

from fastgal.load.order import EpochPlan
from fastgal.options import BenchConfig, DemoConfig, ShardConfig, TrainConfig
from fastgal.recipe import CPU_RECIPE, RECIPE


def test_defaults_are_the_recipe():
    t = TrainConfig().resolved(gpu=True, crop=RECIPE.crop)  # --preset auto on a GPU: the recipe
    assert (t.preset, t.epochs, t.lr, t.bs, t.arch, t.size, t.lr_find_iters) == (
        "recipe", RECIPE.epochs, RECIPE.lr, RECIPE.bs, RECIPE.arch, RECIPE.size, RECIPE.lr_find_iters)
    c = TrainConfig().resolved(gpu=False, crop=RECIPE.crop)  # on a CPU: the cpu preset, at the shards' input size
    assert (c.preset, c.epochs, c.bs, c.arch, c.size, c.lr_find_iters) == (
        "cpu", CPU_RECIPE.epochs, CPU_RECIPE.bs, CPU_RECIPE.arch, RECIPE.size, CPU_RECIPE.lr_find_iters)
    assert TrainConfig().resolved(gpu=True, crop=CPU_RECIPE.crop).size == CPU_RECIPE.size  # 72 -> 56 in any preset
    g = TrainConfig(preset="recipe", bs=32, size=40).resolved(gpu=False, crop=72)  # what is given wins
    assert (g.preset, g.bs, g.size, g.arch) == ("recipe", 32, 40, RECIPE.arch)
    s = ShardConfig()
    assert (s.crop, s.valid_pct, s.seed, s.targets) == (RECIPE.crop, RECIPE.valid_pct, RECIPE.split_seed, [RECIPE.target])
    assert (BenchConfig().bs, BenchConfig().size) == (RECIPE.bs, None)  # None: input_size(the shards' crop), as train
    p = EpochPlan(1, 1, 0, 0)
    assert (p.max_rotate, p.p_rotate) == (RECIPE.max_rotate, RECIPE.p_rotate)
    assert DemoConfig().preset(gpu=True)["arch"] == RECIPE.arch and DemoConfig().preset(gpu=False)["crop"] == CPU_RECIPE.crop
    # the CPU preset is the same geometry at half resolution
    assert CPU_RECIPE.image / RECIPE.image == CPU_RECIPE.crop / RECIPE.crop == CPU_RECIPE.size / RECIPE.size == 0.5


def test_the_cli_options_are_the_config_fields():
    out = run_cli("train", "--help").output
    for f in fields(TrainConfig):
        if f.metadata.get("cli") is False or f.metadata.get("argument"):
            continue
        assert (f.metadata.get("flag") or "--" + f.name.replace("_", "-")) in out, f.name
    flat = " ".join(out.split())  # click wraps long help lines
    assert "[default: the preset's: recipe 128, cpu 64]" in flat and "recipe xresnet34, cpu xresnet18]" in flat
