"""fastgal.config: the seed's recipe written once, and every command's defaults (and CLI options) read from it."""

from __future__ import annotations

from dataclasses import fields

import pytest

from conftest import run_cli
from fastgal.config import CPU_RECIPE, RECIPE, BenchConfig, DemoConfig, ShardConfig, TrainConfig
from fastgal.order import EpochPlan

# nothing here depends on whether DALI is installed: the no-DALI pass of `make test` leaves it out
pytestmark = pytest.mark.dali_agnostic


def test_defaults_are_the_recipe():
    t = TrainConfig()
    assert (t.epochs, t.lr, t.bs, t.arch, t.size) == (RECIPE.epochs, RECIPE.lr, RECIPE.bs, RECIPE.arch, RECIPE.size)
    s = ShardConfig()
    assert (s.crop, s.valid_pct, s.seed, s.targets) == (RECIPE.crop, RECIPE.valid_pct, RECIPE.split_seed, [RECIPE.target])
    assert (BenchConfig().bs, BenchConfig().size) == (RECIPE.bs, RECIPE.size)
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
    assert "[default: 128]" in flat and "[default: xresnet34]" in flat
