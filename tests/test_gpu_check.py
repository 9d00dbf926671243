"""tools/gpu_check.py --dry-run: every step of the GPU check runs on the CPU at tiny sizes, so the script
cannot rot between the rare runs on a GPU machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import dali_importable

TOOL = Path(__file__).resolve().parents[1] / "tools" / "gpu_check.py"
STEPS = ["env", "data", "recipe", "bench", "predict", "compile", "peer", "decode", "equality", "short"]


def steps_of(out: Path) -> dict[str, dict]:
    """Each step's record as the results folder carries it (OUT/steps.tar.gz), by name."""
    import tarfile

    with tarfile.open(out / "steps.tar.gz") as tar:
        recs = [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.startswith("steps/")]
        logs = [m.name for m in tar.getmembers() if m.name.startswith("logs/")]
    assert logs  # the logs travel with the records
    return {r["name"]: r for r in recs}


@pytest.mark.slow
def test_dry_run_every_step(tmp_path):
    out = tmp_path / "check"
    res = subprocess.run([sys.executable, str(TOOL), str(out), "--dry-run"], capture_output=True, text=True,
                         timeout=3000)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["steps.tar.gz", "summary.json", "summary.txt"]  # results only
    assert (tmp_path / "check-work" / "shards" / "manifest.json").is_file()  # the bulk lives beside OUT
    summary = json.loads((out / "summary.json").read_text())
    assert [s["name"] for s in summary["steps"]] == STEPS and summary["ok"] and summary["dry_run"] and summary["finished"]
    recs = steps_of(out)
    for k, name in enumerate(STEPS):
        rec = recs[name]
        if name == "peer" and not dali_importable():
            assert rec["verdict"] == "skipped" and "DALI not installed" in rec["reason"], rec
        else:
            assert rec["verdict"] == "ok", rec  # with DALI or without: the torch paths answer every other step
        assert rec["verdict"] in res.stdout.splitlines()[k + 1]
    # what the steps measured, not only that they ran
    env = recs["env"]["result"]["env"]
    assert env["dali"]["importable"] == dali_importable()
    data = recs["data"]["result"]
    assert data["shard"]["train"] + data["shard"]["valid"] == 80 and data["shard"]["rejected"] == 0
    dec = recs["decode"]["result"]
    assert dec["torch_decoder"] == "torchvision" and dec["torch_cpu_images_per_s"] > 0
    assert ("dali_cpu_images_per_s" in dec) == dali_importable()
    eq = recs["equality"]["result"]["comparisons"]
    pairs = ["batched vs torch"] + (["dali_cpu vs batched", "dali_cpu vs torch"] if dali_importable() else [])
    for pair in pairs:
        valid = eq[f"valid: {pair}"]
        assert valid["images"] == 16 and valid["targets_identical"] and valid["problems"] == [], (pair, valid)
        assert valid["max_abs"] <= 1.0  # exact views: the decoders agree
        assert {f"tta {v}: {pair}" for v in range(8)} <= set(eq) and eq[f"train: {pair}"]["problems"] == []
    recipe = recs["recipe"]["result"]
    assert recipe["loader_backend"] == "torch"  # --loader auto on a CPU (on a GPU: dali, or batched without DALI)
    [epoch] = recipe["per_epoch"]
    assert epoch["train_images_per_s"] > 0 and epoch["valid_images_per_s"] > 0 and epoch["checkpoint_seconds"] > 0
    assert recipe["model_images_per_s"] > 0 and recipe["data_bound_fraction"] > 0
    job = recipe["seed_job"]
    assert job["galaxies"] == 130_000 and job["projected_minutes"] > 0 and job["seed_minutes_p100"] == 13.6
    assert job["speedup_vs_seed"] == pytest.approx(13.6 * 60 / job["projected_seconds"], rel=0.02, abs=0.006)  # 2 decimals
    assert recipe["metrics"]["baseline_rmse"] > 0
    if dali_importable():
        assert recs["peer"]["result"]["loader_backend"] == "batched"
    pred = recs["predict"]["result"]
    assert pred["n_jpegs"] == 16 and pred["valid_vs_predictions_valid_max_abs_dex"] <= 0.02
    comp = recs["compile"]["result"]  # eager and compiled in one process; on a CPU no CUDA graphs
    assert comp["mode"] == "reduce-overhead" and comp["cuda_graphs"] is False
    assert comp["eager_images_per_s"] > 0 and comp["compiled_images_per_s"] > 0 and comp["first_step_seconds"] > 0
    assert comp["compiled_x_eager"] == pytest.approx(comp["compiled_images_per_s"] / comp["eager_images_per_s"], rel=0.01)


def test_the_timeouts_fit_the_budget(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", TOOL)
    tool = sys.modules["gpu_check"] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
    spec.loader.exec_module(tool)
    assert sum(tool.TIMEOUTS.values()) <= tool.Params().budget <= 330 and list(tool.TIMEOUTS) == STEPS
    res = subprocess.run([sys.executable, str(TOOL), str(tmp_path / "c"), "--timeout", "recipe=400"],
                         capture_output=True, text=True, timeout=300)
    total = sum(tool.TIMEOUTS.values()) - tool.TIMEOUTS["recipe"] + 400
    assert res.returncode == 2 and f"sum to {total} s, more than --budget 330 s" in res.stderr


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
    assert set(steps_of(out)) == set(STEPS)


def test_the_work_folder_may_not_be_inside_the_results(tmp_path):
    res = subprocess.run([sys.executable, str(TOOL), str(tmp_path / "c"), "--dry-run", "--work", str(tmp_path / "c" / "w")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "must not be OUT or inside it" in res.stderr and not (tmp_path / "c").exists()


@pytest.mark.slow
def test_a_compile_step_that_times_out_says_how_far_it_got(tmp_path):
    """Compiling the recipe's model may outlast its 50 s estimate on the first GPU: the timeout's reason then
    names the last progress line the bench reached (the eager rate, the first step), or says there was none.
    The step gets SIGTERM before SIGKILL, so the bench removes its temp folder."""
    out, tmp = tmp_path / "check", tmp_path / "tmp"
    tmp.mkdir()
    # a cold compile, as on a fresh GPU box
    env = {**os.environ, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1", "TMPDIR": str(tmp)}
    res = subprocess.run([sys.executable, str(TOOL), str(out), "--dry-run", "--steps", "data,compile",
                          "--timeout", "compile=15"], capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 1 and "FAILED" in res.stdout, res.stdout + res.stderr[-2000:]
    rec = steps_of(out)["compile"]
    assert rec["verdict"] == "timeout" and "still running at the step's timeout; its last line: " in rec["reason"], rec
    assert not list(tmp.glob("fastgal-*")), sorted(tmp.glob("*"))
