"""Shared fixtures: tiny synthetic surveys made once per session through the real CLI."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from fastgal.cli import cli


def run_cli(*args, ok: bool = True):
    """Invoke the fastgal CLI in-process, as a user would, and check the exit code."""
    res = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert res.exit_code == 0, res.output
    return res


@pytest.fixture(scope="session")
def survey(tmp_path_factory):
    """A 300-galaxy synthetic survey (seed 1), shared read-only by the tests."""
    out = tmp_path_factory.mktemp("survey") / "s"
    run_cli("synth", out, "--n", 300, "--seed", 1, "--quiet")
    return out


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory):
    """A 260-galaxy survey at half resolution (112 px, crop 72 -> 56), two targets, several shards."""
    root = tmp_path_factory.mktemp("train")
    run_cli("synth", root / "s", "--n", 260, "--seed", 11, "--size", 112, "--quiet")
    run_cli("shard", root / "s/data/master.csv", root / "s/images", root / "sh", "--crop", 72,
            "--target", "metallicity", "--target", "lgm_tot_p50", "--shard-size", 120, "--quiet")
    return root / "sh"


@pytest.fixture(scope="session")
def small_run(small_shards, tmp_path_factory):
    """A one-epoch run on small_shards (xresnet18 at 56 px) with TTA predictions."""
    run = tmp_path_factory.mktemp("run") / "r"
    run_cli("train", small_shards, "--out", run, "--epochs", 1, "--bs", 32, "--arch", "xresnet18",
            "--size", 56, "--crop", 72, "--tta", "--quiet")
    return run
