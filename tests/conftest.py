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
