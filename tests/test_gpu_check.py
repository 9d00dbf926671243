"""tools/gpu_check.py --dry-run: every step of the GPU check runs on the CPU at tiny sizes, so the script
cannot rot between the rare runs on a GPU machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import dali_importable

TOOL = Path(__file__).resolve().parents[1] / "tools" / "gpu_check.py"
STEPS = ["env", "data", "decode", "equality", "bench", "recipe", "short", "predict"]


@pytest.mark.slow
def test_dry_run_every_step(tmp_path):
    out = tmp_path / "check"
    res = subprocess.run([sys.executable, str(TOOL), str(out), "--dry-run"], capture_output=True, text=True,
                         timeout=3000)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [s["name"] for s in summary["steps"]] == STEPS and summary["ok"] and summary["dry_run"]
    for k, name in enumerate(STEPS):
        rec = json.loads((out / f"{k}-{name}.json").read_text())  # each step's own file, written when it ended
        assert rec["verdict"] == "ok", rec  # with DALI or without: the torch paths answer every step
        assert rec["verdict"] in res.stdout.splitlines()[k + 1]
    # what the steps measured, not only that they ran
    env = json.loads((out / "0-env.json").read_text())["result"]["env"]
    assert env["dali"]["importable"] == dali_importable()
    data = json.loads((out / "1-data.json").read_text())["result"]
    assert data["shard"]["train"] + data["shard"]["valid"] == 80 and data["shard"]["rejected"] == 0
    dec = json.loads((out / "2-decode.json").read_text())["result"]
    assert dec["torch_decoder"] == "torchvision" and dec["torch_cpu_images_per_s"] > 0
    assert ("dali_cpu_images_per_s" in dec) == dali_importable()
    eq = json.loads((out / "3-equality.json").read_text())["result"]["comparisons"]
    pairs = ["batched vs torch"] + (["dali_cpu vs batched", "dali_cpu vs torch"] if dali_importable() else [])
    for pair in pairs:
        valid = eq[f"valid: {pair}"]
        assert valid["images"] == 16 and valid["targets_identical"] and valid["problems"] == [], (pair, valid)
        assert valid["max_abs"] <= 1.0  # exact views: the decoders agree
        assert {f"tta {v}: {pair}" for v in range(8)} <= set(eq) and eq[f"train: {pair}"]["problems"] == []
    recipe = json.loads((out / "5-recipe.json").read_text())["result"]
    assert recipe["loaders"] == (["dali", "batched"] if dali_importable() else ["batched"])
    for r in recipe["runs"].values():
        assert len(r["images_per_s_per_epoch"]) == 1 and r["metrics"]["baseline_rmse"] > 0
    pred = json.loads((out / "7-predict.json").read_text())["result"]
    assert pred["n_jpegs"] == 16 and pred["valid_vs_predictions_valid_max_abs_dex"] <= 0.02


# the tool with its env step's command replaced by one that never ends: only the step's timeout ends it,
# however fast or loaded the machine
HANGING_ENV = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("gpu_check", sys.argv[1])
tool = sys.modules["gpu_check"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)
def never_ends(run, p, out):
    run([sys.executable, "-c", "import time; time.sleep(3600)"], "a command that never ends")
tool.RUNNERS["env"] = never_ends
sys.exit(tool.main(sys.argv[2:]))
"""


def test_a_failing_step_leaves_the_others(tmp_path):
    """A step that times out or cannot find what it needs is reported with its reason; the check goes on and
    says FAILED."""
    out = tmp_path / "check"
    res = subprocess.run([sys.executable, "-c", HANGING_ENV, str(TOOL), str(out), "--dry-run", "--steps", "env,predict",
                          "--timeout", "env=0.5"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "FAILED" in res.stdout
    recs = {r["name"]: r for r in json.loads((out / "summary.json").read_text())["steps"]}
    assert recs["env"]["verdict"] == "timeout", recs["env"]
    assert recs["env"]["reason"].startswith("a command that never ends still running at the step's timeout")
    assert recs["predict"]["verdict"] == "skipped" and "step 1" in recs["predict"]["reason"]
    assert recs["recipe"]["verdict"] == "skipped" and recs["recipe"]["reason"] == "not in --steps"
    assert all((out / f"{k}-{n}.json").is_file() for k, n in enumerate(STEPS))
