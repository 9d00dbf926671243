"""fastgal.run (`fastgal train`, `fastgal demo`): the run folder, user errors, DDP under torchrun, and
--resume after a kill, on a tiny half-resolution survey (112 px cutouts, crop 72 -> 56: the seed's
224/144/112 at half scale)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import SMALL_RUN, run_cli, stderr_on_a_terminal
from PIL import Image

README = Path(__file__).parents[1] / "README.md"
TRAIN = ("--epochs", "2", "--bs", "32", "--arch", "xresnet18", "--size", "32", "--quiet", "--workers", "1")


def _train(shards, out, *extra, kill_at=None, env=None, args=TRAIN):
    """`fastgal train` in a subprocess; kill_at=(epoch, batch[, "SIGTERM"]): SIGKILLed (or sent that signal)
    right after that training batch (tests/kill_after.py), a pre-emption at a point fixed in advance rather
    than a race with the clock."""
    cmd = [str(Path(__file__).with_name("kill_after.py")), *map(str, kill_at)] if kill_at else ["-m", "fastgal"]
    return subprocess.run([sys.executable, *cmd, "train", str(shards), "--out", str(out), *map(str, args), *extra],
                          capture_output=True, text=True, timeout=900, env=env)


def test_train_writes_the_run_folder(made_run, small_shards):
    """The suite's one whole run (conftest.made_run: 2 epochs, lr_find, TTA, made under umask 027)."""
    run, reads, res = made_run.path, made_run.reads, made_run
    # test_predict may add predictions_<input>.csv to it later, under the default umask
    mine = [p for p in run.iterdir() if not p.name.startswith("predictions_") or p.name == "predictions_valid.csv"]
    assert {stat.S_IMODE(p.stat().st_mode) for p in mine} == {0o640}
    assert "RMSE" in res.output and "lgm_tot_p50" in res.output
    idx = sorted(p.name for p in small_shards.glob("*.idx"))
    assert reads["manifest"] == 1 and sorted(reads["index"]) == idx, reads  # lr_find, fit, TTA, scoring: once
    for f in ("config.json", "history.csv", "loss.png", "lr_find.png", "model.pt", "predictions_valid.csv",
              "pred_vs_true.png", "residuals.png", "mzr.png", "metrics.json", "show_batch.png", "report.html"):
        assert (run / f).is_file(), f
    for png in run.glob("*.png"):
        Image.open(png).load()
    hist = pd.read_csv(run / "history.csv")
    assert list(hist.epoch) == [1, 2]  # counted from 1, as the progress lines count
    assert {"train_loss", "valid_loss", "rmse_metallicity", "rmse_lgm_tot_p50", "seconds", "images_per_s"} <= set(hist.columns)
    man = json.loads((small_shards / "manifest.json").read_text())
    pred = pd.read_csv(run / "predictions_valid.csv", dtype={"id": str})
    assert len(pred) == man["counts"]["valid"] and pred.id.is_unique
    assert all(len(i) == 19 for i in pred.id)
    assert {"true_metallicity", "pred_metallicity", "pred_tta_metallicity", "pred_lgm_tot_p50"} <= set(pred.columns)
    # ids line up with their true targets: compare with the catalog
    cat = pd.read_csv(small_shards.parent / "s/data/master.csv", dtype={"objID": str}).set_index("objID")
    assert np.allclose(cat.loc[pred.id, "metallicity"].values, pred.true_metallicity.values, atol=1e-4)
    m = json.loads((run / "metrics.json").read_text())
    for k in ("rmse", "nmad", "bias", "r2", "tta_rmse", "baseline_rmse", "epochs", "wall_seconds", "train_images_per_s"):
        assert k in m, k
    assert m["rmse"] == pytest.approx(np.sqrt(np.mean((pred.pred_metallicity - pred.true_metallicity) ** 2)), abs=1e-4)
    assert m["floor"]["floor_rmse"] > 0 and m["lr_find_suggested"] > 0
    # diagnostics: bins of the true value cover the validation set; the MZR from the catalog's mass column
    t = m["targets"]["metallicity"]
    assert sum(b["n"] for b in t["by_true"]) == sum(b["n"] for b in t["by_pred"]) == len(pred)
    assert 0 <= m["outlier_fraction"] < 0.2 and set(t["mzr"]) == {"true", "pred"}
    d = pred.pred_metallicity - pred.true_metallicity
    assert t["by_true"][0]["bias"] == pytest.approx(d[pred.true_metallicity <= t["by_true"][0]["hi"]].mean(), abs=1e-4)
    cfg = json.loads((run / "config.json").read_text())
    # --loader auto on a CPU is the torch fallback (faster there); --crop defaults to the shards' own
    assert cfg["device"] == "cpu" and cfg["loader_backend"] == "torch" and cfg["epochs"] == 2
    assert cfg["loader_decode"] == "CPU (libjpeg-turbo, torchvision)"
    assert cfg["crop"] == man["image"]["crop"] == 72
    w = torch.load(run / "model.pt", weights_only=False)
    assert w["targets"] == ["metallicity", "lgm_tot_p50"] and len(w["pixel_mean"]) == 3 and w["state_dict"]
    # a second run into the same folder refuses without --overwrite
    again = run_cli("train", small_shards, "--out", run, "--epochs", 1, ok=False)
    assert again.exit_code != 0 and "--overwrite" in again.output


def test_train_user_errors(small_shards, tmp_path):
    res = run_cli("train", tmp_path, "--out", tmp_path / "r", ok=False)
    assert res.exit_code != 0 and "manifest.json" in res.output and len(res.output.strip().splitlines()) == 1
    res = run_cli("train", small_shards, "--out", tmp_path / "r", "--target", "oh_p84", ok=False)
    assert res.exit_code != 0 and "oh_p84" in res.output
    res = run_cli("train", small_shards, "--out", tmp_path / "r", "--compile-mode", "reduce-overhead", ok=False)
    assert res.exit_code != 0 and "add --compile" in res.output and not (tmp_path / "r").exists()
    if not torch.cuda.is_available():
        res = run_cli("train", small_shards, "--out", tmp_path / "r", "--device", "cuda", ok=False)
        assert res.exit_code != 0 and "GPU" in res.output
        res = run_cli("train", small_shards, "--out", tmp_path / "r", "--device", "cpu", "--precision", "bf16", ok=False)
        assert res.exit_code != 0 and "needs a GPU" in res.output
    # a shard that no longer matches its manifest
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in small_shards.iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    tar = sorted(bad.glob("train-*.tar"))[0]
    tar.write_bytes(tar.read_bytes()[:-1024])
    res = run_cli("train", bad, "--out", tmp_path / "r", ok=False)
    assert res.exit_code != 0 and tar.name in res.output


def _own_tmp(tmp_path) -> dict:
    """The environment with TMPDIR in the test's folder: what a killed process cannot remove (lr_find's
    weights, multiprocessing's pymp-*) and torchrun's torchelastic_* stay out of the machine's /tmp."""
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    return {**os.environ, "TMPDIR": str(tmp)}


@pytest.mark.slow
def test_torchrun_ddp_on_cpu(small_shards, ddp_run):
    """Scale-out is torchrun + DDP: two CPU processes (gloo) train on disjoint halves, rank 0 writes
    (conftest's ddp_run: `torchrun --nproc_per_node 2 -m fastgal train ...`, --tta)."""
    run, proc = ddp_run.path, ddp_run.proc
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((run / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["n_valid"] == json.loads((small_shards / "manifest.json").read_text())["counts"]["valid"]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["world_size"] == 2
    assert cfg["train_seed_per_rank"] == [42, 43]  # each rank its own shuffle and augmentation draws
    n_train = cfg["n_train"]
    # each rank ran its half: (n_train // 2) // 32 steps per epoch, not n_train // 32
    assert m["steps_per_epoch"] == (n_train // 2) // 32 < n_train // 32
    # rank 0 predicts (with the 8 TTA views) and scores alone after the process group is gone, WORLD_SIZE still 2
    assert len(pd.read_csv(run / "predictions_valid.csv")) == m["n_valid"] and m["tta_rmse"] > 0


@pytest.mark.slow
@pytest.mark.nodali
def test_demo_runs_the_main_job(tmp_path):
    """fastgal demo: synth -> shard -> train -> report, with the RMSE, baseline and floor printed."""
    out = tmp_path / "demo"
    res = run_cli("demo", "--out", out, "--n", 200, "--epochs", 1, "--device", "cpu", "--quiet")
    assert "predict-the-mean" in res.output and "floor" in res.output
    # what the README's output layout promises of the main job (the demo trains with --tta: a TTA spread)
    for p in ("survey/synth.json", "shards/manifest.json", "run/metrics.json", "run/pred_vs_true.png",
              "run/residuals.png", "run/mzr.png", "run/coverage.png", "run/loss.png", "run/predictions_valid.csv"):
        assert (out / p).is_file(), p
    m = json.loads((out / "demo.json").read_text())
    t = m["targets"][m["target"]]
    assert {"by_true", "by_pred", "mzr", "tta_calibration"} <= set(t) and "sigma_tta_metallicity" in (
        out / "run/predictions_valid.csv").read_text().splitlines()[0]
    assert m["n_train"] + m["n_valid"] == 200 and m["demo"]["arch"] == m["arch"] == "xresnet18" and m["demo"]["size"] == 56
    cfg = json.loads((out / "run/config.json").read_text())  # the train preset the demo's values come from
    assert (cfg["preset"], cfg["size"], cfg["bs"], cfg["epochs"]) == ("cpu", 56, 64, 1) and m["preset"] == "cpu"
    # the numbers it reports are the run's: RMSE of its predictions, the survey's own references, printed
    pred = pd.read_csv(out / "run/predictions_valid.csv")
    assert m["rmse"] == pytest.approx(np.sqrt(np.mean((pred.pred_metallicity - pred.true_metallicity) ** 2)), abs=1e-5)
    floor = json.loads((out / "survey/synth.json").read_text())["floor"]
    assert (m["survey_floor_rmse"], m["survey_reference_rmse"]) == (floor["floor_rmse"], floor["observable_reference_rmse"])
    assert f"validation RMSE {m['rmse']:.4f} dex vs predict-the-mean {t['baseline_rmse']:.4f}" in res.output
    assert run_cli("demo", "--out", out, "--n", 50, ok=False).exit_code != 0  # refuses without --overwrite


def test_train_option_errors(small_shards, tmp_path, monkeypatch):
    r = tmp_path / "r"
    res = run_cli("train", small_shards, "--out", r, "--target", "lgm_tot_p50", ok=False)  # a subset
    assert res.exit_code != 0 and "re-shard" in res.output
    res = run_cli("train", small_shards, "--out", r, "--epochs", 0, ok=False)
    assert res.exit_code != 0 and "positive" in res.output
    res = run_cli("train", small_shards, "--out", r, "--size", 80, ok=False)  # input > the shards' 72 px region
    assert res.exit_code != 0 and "crop sizes do not fit" in res.output
    res = run_cli("train", small_shards, "--out", r, "--crop", 64, ok=False)  # not the region the stats are over
    assert res.exit_code != 0 and "re-shard" in res.output and "72" in res.output
    assert len(res.output.strip().splitlines()) == 1
    res = run_cli("train", small_shards, "--out", r, "--size", 56, "--crop", 72, "--bs", 5000, ok=False)
    assert res.exit_code != 0 and "lower --bs" in res.output
    import fastgal.load.loader

    monkeypatch.setattr(fastgal.load.loader, "dali_available", lambda: False)
    res = run_cli("train", small_shards, "--out", r, "--size", 56, "--loader", "dali", ok=False)
    assert res.exit_code != 0 and "--loader torch" in res.output
    assert not (r / "metrics.json").exists()
    # as torchrun starts a rank: lr_find is refused before any process group is joined
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    res = run_cli("train", small_shards, "--out", r, "--size", 56, "--lr-find", ok=False)
    assert res.exit_code != 0 and "single process" in res.output


def test_train_refuses_index_files_of_another_format(small_shards, tmp_path):
    """The training reader seeks through the .idx files: a manifest that records another index format is refused."""
    import shutil

    sh = tmp_path / "sh"
    shutil.copytree(small_shards, sh)
    man = json.loads((sh / "manifest.json").read_text())
    man["index_format"] = "v9.9"
    (sh / "manifest.json").write_text(json.dumps(man))
    res = run_cli("train", sh, "--out", tmp_path / "r", "--epochs", 1, "--bs", 32, "--size", 56, ok=False)
    assert res.exit_code != 0 and "v9.9" in res.output and "re-shard" in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_the_summary_reads_as_a_person_would(small_run):
    """Issue 22, case 5: '1 epoch', and the TTA spread as what it is (the views' disagreement), not a failed
    calibration; metrics.json keeps its coverage figures."""
    from fastgal.score.summary import format_metrics

    m = json.loads((small_run / "metrics.json").read_text())
    text = format_metrics(m)
    assert m["epochs"] == 2 and "2 epochs in" in text
    assert "1 epoch in" in format_metrics({**m, "epochs": 1}) and "1 epochs" not in format_metrics({**m, "epochs": 1})
    assert "TTA spread: median" in text and "not an uncertainty" in text and "RMS z" not in text
    assert m["targets"]["metallicity"]["tta_calibration"]["rms_z"] > 0  # still in the file


def test_run_records_how_it_computed(small_run):
    w = torch.load(small_run / "model.pt", weights_only=False)
    cfg = json.loads((small_run / "config.json").read_text())
    assert w["precision"] == cfg["precision"] == "fp32" and w["channels_last"] is False


@pytest.fixture(scope="module")
def killed_run(small_shards, tmp_path_factory):
    """small_run's command (conftest.SMALL_RUN) SIGTERMed after batch 2 of epoch 2, as a scheduler's time limit
    stops it: what it left, then the same command with --resume, in-process."""
    from types import SimpleNamespace

    root = tmp_path_factory.mktemp("killed")
    env = _own_tmp(root)
    run = root / "cut"
    p = _train(small_shards, run, kill_at=(1, 2, "SIGTERM"), env=env, args=SMALL_RUN)
    ckpt = run / "checkpoint.pth"
    left = SimpleNamespace(returncode=p.returncode, stderr=p.stderr, files=sorted(f.name for f in run.iterdir()),
                           temp=sorted(Path(env["TMPDIR"]).rglob("*")),
                           epoch=torch.load(ckpt, weights_only=False)["epoch"] if ckpt.exists() else None)
    res = run_cli("train", small_shards, "--out", run, *SMALL_RUN, "--resume")
    return SimpleNamespace(path=run, left=left, output=res.output)


@pytest.mark.slow
def test_sigterm_in_an_epoch_keeps_the_last_one_for_resume(killed_run):
    """Exit status 143 and one line says why; the last finished epoch is kept; no temp file of an atomic write."""
    left = killed_run.left
    assert left.returncode == 143 and "terminated (SIGTERM)" in left.stderr, left.stderr[-2000:]
    assert "Traceback" not in left.stderr, left.stderr[-2000:]
    assert f"fastgal: {killed_run.path} keeps the last finished epoch; the same command with --out {killed_run.path} --resume" in left.stderr
    assert left.epoch == 0  # the last finished epoch (fastai counts from 0)
    assert "checkpoint.pth" in left.files and "metrics.json" not in left.files
    assert not [f for f in left.files if f.startswith(".") or "tmp" in f], left.files
    assert not [f for f in left.temp if f.name.startswith("fastgal-")], left.temp  # lr_find's weights went with it


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_result(killed_run, made_run):
    """The killed run, resumed, ends where the run that was never stopped ended (small_run)."""
    cut, whole = killed_run.path, made_run.path
    m_cut, m_whole = (json.loads((d / "metrics.json").read_text()) for d in (cut, whole))
    assert m_cut["resumed_from_epoch"] == 2 and m_whole["resumed_from_epoch"] is None and m_whole["epochs"] == 2
    assert m_cut["lr_find_suggested"] == m_whole["lr_find_suggested"]  # kept in the checkpoint, not found again
    assert abs(m_cut["rmse"] - m_whole["rmse"]) <= 1e-6
    h_cut, h_whole = (pd.read_csv(d / "history.csv") for d in (cut, whole))
    cols = ["epoch", "train_loss", "valid_loss", "rmse_metallicity", "rmse_lgm_tot_p50"]
    assert np.allclose(h_cut[cols].values, h_whole[cols].values, rtol=0, atol=1e-6)
    p_cut, p_whole = (pd.read_csv(d / "predictions_valid.csv") for d in (cut, whole))
    assert np.allclose(p_cut.filter(like="pred_").values, p_whole.filter(like="pred_").values, rtol=0, atol=2e-5)
    assert not (cut / "checkpoint.pth").exists() and not (cut / "best.pth").exists()  # finished: cleaned up


def test_resume_refusals(small_shards, tmp_path):
    run = tmp_path / "r"
    res = run_cli("train", small_shards, "--out", run, "--resume", ok=False)
    assert res.exit_code != 0 and "no run to resume" in res.output
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"epochs": 3, "lr": 0.01}))
    res = run_cli("train", small_shards, "--out", run, "--resume", ok=False)  # started, but no epoch finished
    assert res.exit_code != 0 and "finished no epoch" in res.output and "without --resume" in res.output
    (run / "checkpoint.pth").write_bytes(b"")  # as if an epoch had finished (its settings are checked first)
    res = run_cli("train", small_shards, "--out", run, "--size", 56, "--epochs", 3, "--lr", 0.02, "--resume", ok=False)
    assert res.exit_code != 0 and "lr = 0.01, not 0.02" in res.output and len(res.output.strip().splitlines()) == 1
    res = run_cli("train", small_shards, "--out", run, "--resume", "--overwrite", ok=False)
    assert res.exit_code != 0 and "one of them" in res.output
    (run / "metrics.json").write_text("{}")
    res = run_cli("train", small_shards, "--out", run, "--resume", ok=False)
    assert res.exit_code != 0 and "finished" in res.output and "--overwrite" in res.output
    res = run_cli("train", small_shards, "--out", run, ok=False)
    assert res.exit_code != 0 and "--resume" in res.output


@pytest.mark.slow
def test_a_run_stopped_in_lr_find_blocks_nothing(small_shards, tmp_path):
    """Issue 22, case 1 and a scheduler's SIGTERM in lr_find: a typo fails before anything is written; a run
    stopped in lr_find leaves no lr_find weights (43 MB each, found piling up in /tmp) in the temp folder, nor the
    run folder it made (it held no finished epoch), --resume says there is nothing to resume, and the same command
    (without --overwrite) then trains; with --quiet a clean run prints nothing on stderr (no dependency warnings) and its results on stdout."""
    run = tmp_path / "c3"
    res = run_cli("train", small_shards, "--out", run, "--arch", "xresnet43", ok=False)
    assert res.exit_code != 0 and "xresnet34" in res.output and not run.exists()
    env = _own_tmp(tmp_path)
    lr = ("--lr-find", "--lr-find-iters", "6")
    p = _train(small_shards, run, *lr, kill_at=(0, 2, "SIGTERM"), env=env)  # in lr_find
    assert p.returncode == 143 and "terminated (SIGTERM)" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert not list(Path(env["TMPDIR"]).glob("fastgal-*")), sorted(Path(env["TMPDIR"]).rglob("*"))
    assert not run.exists(), sorted(run.rglob("*"))
    res = run_cli("train", small_shards, "--out", run, *TRAIN, *lr, "--resume", ok=False)
    assert res.exit_code != 0 and "no run to resume" in res.output and "drop --resume" in res.output
    p = _train(small_shards, run, *lr, env=env)
    assert p.returncode == 0 and (run / "metrics.json").is_file(), p.stderr[-2000:]
    assert p.stderr == "" and "RMSE" in p.stdout


def test_train_opt_option(small_shards, small_run, tmp_path, monkeypatch):
    """--opt reaches the Learner and config.json (small_run trained with the default, fastgal's ranger):
    every optimizer the run makes is fastai's Lookahead(RAdam), and it stepped; an unknown name is refused."""
    from fastai.optimizer import Lookahead

    import fastgal.train.learner

    assert json.loads((small_run / "config.json").read_text())["opt"] == "ranger"
    made, real = [], fastgal.train.learner.optimizer

    def spy(name):  # the opt_func make_learner gets for --opt, recording each optimizer it makes
        f = real(name)

        def opt_func(*args, **kwargs):
            made.append(f(*args, **kwargs))
            return made[-1]

        return opt_func

    monkeypatch.setattr(fastgal.train.learner, "optimizer", spy)
    run = tmp_path / "fastai-ranger"
    run_cli("train", small_shards, "--out", run, "--epochs", 1, "--bs", 32, "--arch", "xresnet18", "--size", 56,
            "--quiet", "--opt", "fastai-ranger")
    assert made and all(type(o) is Lookahead for o in made)  # fastgal's Ranger is not one
    assert made[-1].count > 0  # and the fit stepped it
    assert json.loads((run / "config.json").read_text())["opt"] == "fastai-ranger"
    assert (run / "metrics.json").is_file() and len(pd.read_csv(run / "history.csv")) == 1
    res = run_cli("train", small_shards, "--out", tmp_path / "x", "--opt", "adam", ok=False)
    assert res.exit_code == 2 and not (tmp_path / "x").exists()
    assert res.output.splitlines()[-1] == "Error: Invalid value for '--opt': 'adam' is not one of 'ranger', 'fastai-ranger'."


@pytest.mark.slow
def test_compile_trains_the_same_run_folder(small_shards, small_run, tmp_path, monkeypatch):
    """--compile (torch.compile of the model in place): small_run's files, weight keys and columns, close losses.

    Dynamo captures the graphs as with the default backend; they run eagerly here, because inductor's C++
    code generation takes minutes on 2 cores (tools/gpu_check.py times the real thing on a GPU)."""
    compiled, real = [], torch.nn.Module.compile

    def compile_eager(self, *args, **kwargs):
        compiled.append(type(self).__name__)
        return real(self, *args, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(torch.nn.Module, "compile", compile_eager)
    run = tmp_path / "compiled"
    res = run_cli("train", small_shards, "--out", run, *SMALL_RUN, "--compile", "--compile-mode",
                  "reduce-overhead")  # small_run's + --compile (CUDA graphs on a GPU)
    assert "compiled (reduce-overhead): epoch 1 includes compiling" in res.output  # its images/s are not steady state
    a, b = small_run, run
    def written(r):  # test_predict adds predictions_<input>.csv to the shared small_run
        return sorted(p.name for p in r.iterdir() if not p.name.startswith("predictions_") or p.name.endswith("_valid.csv"))

    assert written(a) == written(b) and "model.pt" in written(b)
    config = json.loads((b / "config.json").read_text())
    assert config["compile"] is True and config["compile_mode"] == "reduce-overhead" and compiled == ["Sequential"]
    wa, wb = (torch.load(r / "model.pt", weights_only=False)["state_dict"] for r in (a, b))
    assert list(wa) == list(wb)  # no "_orig_mod." prefix: predict reads it as any run
    pa, pb = (pd.read_csv(r / "predictions_valid.csv") for r in (a, b))
    assert list(pa.columns) == list(pb.columns) and len(pa) == len(pb)
    assert np.isfinite(pb.filter(like="pred_").values).all()
    ha, hb = (pd.read_csv(r / "history.csv") for r in (a, b))
    assert list(ha.columns) == list(hb.columns)
    # the same seed and data: compiled kernels reorder float sums, so close rather than equal
    np.testing.assert_allclose(hb.train_loss, ha.train_loss, rtol=0.05)


@pytest.mark.slow
def test_the_cpu_preset_sizes_train_for_a_cpu(small_shards, tmp_path):
    """Issue 22, case 2: --preset (auto: cpu on a CPU, the recipe on a GPU) fills the settings not given from
    recipe.CPU_RECIPE or RECIPE; what is given wins; the input size follows the shards' crop (7/9: 72 -> 56) in
    either preset; config.json records the preset, every value and which ones the preset set."""
    from fastgal.recipe import CPU_RECIPE, RECIPE

    a = tmp_path / "auto"
    res = run_cli("train", small_shards, "--out", a, "--epochs", 1, "--device", "cpu", "--workers", 1)
    cfg = json.loads((a / "config.json").read_text())
    assert (cfg["preset"], cfg["arch"], cfg["bs"], cfg["lr"], cfg["lr_find_iters"]) == (
        "cpu", CPU_RECIPE.arch, CPU_RECIPE.bs, CPU_RECIPE.lr, CPU_RECIPE.lr_find_iters)
    assert cfg["epochs"] == 1 and cfg["size"] == 56 and cfg["crop"] == 72  # given; from the shards' crop
    assert cfg["from_preset"] == ["arch", "bs", "lr", "lr_find_iters"]
    assert ("preset cpu (--preset auto on a CPU): arch xresnet18, bs 64, lr 0.01; given: --epochs 1; "
            "input 56 px from the shards' crop 72; --preset recipe for the seed's") in res.stderr
    m = json.loads((a / "metrics.json").read_text())
    assert m["preset"] == "cpu" and m["arch"] == "xresnet18" and m["steps_per_epoch"] == cfg["n_train"] // 64
    assert "xresnet18, preset cpu" in res.stdout
    # the recipe by name, on the same CPU: its values where none are given (size still from the shards' crop,
    # where the recipe's own 112 would not fit a 72 px region); decided before any fit, so no second training
    from fastgal.options import TrainConfig

    given = TrainConfig(shards=small_shards, preset="recipe", arch="xresnet18", bs=32, epochs=1)
    cfg = given.resolved(gpu=False, crop=72)
    assert (cfg.preset, cfg.arch, cfg.bs, cfg.epochs, cfg.lr, cfg.lr_find_iters, cfg.size) == (
        "recipe", "xresnet18", 32, 1, RECIPE.lr, RECIPE.lr_find_iters, 56)
    assert given.from_preset() == ["lr", "lr_find_iters"]
    assert TrainConfig(shards=small_shards).resolved(gpu=True, crop=144).arch == RECIPE.arch  # auto on a GPU


def test_epochs_count_from_1_everywhere(small_run):
    """Issue 22, case 5: the progress lines count epochs from 1, and so do history.csv, metrics.json's best_epoch
    and the summary (fastai's Recorder counts from 0; fastgal converts once, where it writes history.csv)."""
    from fastgal.score.summary import format_metrics

    m = json.loads((small_run / "metrics.json").read_text())
    hist = pd.read_csv(small_run / "history.csv")
    assert list(hist.epoch) == [1, 2] and m["best_epoch"] in (1, 2) and m["epochs"] == 2
    best = int(hist.epoch[hist.rmse_metallicity.idxmin()])  # the monitored metric's best, counted from 1
    assert m["best_epoch"] == best and f"best epoch {best} of 2" in format_metrics(m)


@pytest.mark.slow
def test_stderr_is_one_line_per_step_off_a_terminal_and_redraws_only_on_one(small_shards, tmp_path):
    """Issue 22, case 6, one rule for every command (util.Progress): whole lines (the preset, lr_find's start and
    result, one per epoch) whether or not stderr is a terminal; the redrawn counter (lr_find's `lr_find: iteration
    i/N`, then each epoch's batches) only on a terminal; --quiet silences both. The README says exactly that."""
    cmd = [sys.executable, "-m", "fastgal", "train", str(small_shards), "--epochs", "2", "--bs", "32", "--arch",
           "xresnet18", "--size", "32", "--lr-find", "--lr-find-iters", "6", "--workers", "1", "--device", "cpu"]
    p = subprocess.run([*cmd, "--out", str(tmp_path / "log")], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stderr.splitlines()  # a batch job's log: one line per step, nothing redrawn
    assert "\r" not in p.stderr and "\x1b" not in p.stderr and "batch" not in p.stderr
    assert lines[0].startswith("preset cpu (--preset auto on a CPU): lr 0.01; given: --arch xresnet18") and len(lines) == 5, lines
    assert lines[1] == "lr_find: 6 iterations of bs 32 (--lr-find-iters)"
    assert lines[2].startswith("lr_find: ") and "suggested lr (valley)" in lines[2]
    assert [ln.split("  ")[0] for ln in lines[3:]] == ["epoch 1/2", "epoch 2/2"]
    assert "RMSE" in p.stdout and "best epoch" in p.stdout and "epoch 1/2" not in p.stdout  # results on stdout
    # on a terminal: the same lines, and between them the redrawn counters; lr_find's counts its iterations
    rc, tty = stderr_on_a_terminal([*cmd, "--out", str(tmp_path / "tty")])
    assert rc == 0, tty[-3000:]
    assert "\r\x1b[K  lr_find: iteration 1/6" in tty and "\r\x1b[K  epoch 1/2  batch 1/" in tty
    finder = tty[:tty.index("lr_find: 6 iterations in")]
    assert "batch" not in finder  # lr_find is not shown as epochs of one batch ("epoch 13/101 batch 1/1")
    assert "\r\x1b[Kepoch 2/2  train_loss" in tty  # an epoch's line replaces its counter
    # (--quiet: an empty stderr, test_a_killed_run_resumes_to_the_same_result)
    readme = " ".join(README.read_text().split())
    assert "whole lines (the preset, each stage, lr_find's start and result, one per epoch) whether or not" in readme
    assert "`FASTGAL_NO_DALI=1` is read by the test suite only" in readme


def test_the_observable_reference_is_that_of_the_bands_the_shards_hold(tmp_path):
    """gri shards of a ugriz survey are judged against what g, r, i show (0.1012), not the survey's five
    bands (0.1009); JPEG shards are gri; bands synth cannot write have no reference to give."""
    from fastgal.run import synth_floor
    from fastgal.score.summary import format_metrics
    from fastgal.survey.floor import reference_for

    survey = tmp_path / "survey"
    (survey / "data").mkdir(parents=True)
    ref = reference_for("ugriz")
    (survey / "synth.json").write_text(json.dumps({"floor": {
        "observable_reference_rmse": ref["rmse"], "observable_reference": ref, "floor_rmse": 0.08}}))
    source = {"catalog": str(survey / "data" / "master.csv")}

    def floor(bands):
        return synth_floor({"source": source, "image": {"bands": bands} if bands else {}})

    assert floor(list("ugriz"))["observable_reference_rmse"] == ref["rmse"] == 0.1009
    gri = floor(["g", "r", "i"])
    assert (gri["observable_reference_rmse"], gri["observable_reference"]["bands"]) == (0.1012, "gri")
    assert gri["floor_rmse"] == 0.08  # the latent floor does not depend on what the images show
    assert floor(None)["observable_reference"]["bands"] == "gri"  # JPEG shards
    assert floor(["Ha", "r"]) is None
    line = format_metrics({"targets": {}, "floor": gri, "epochs": 1, "fit_seconds": 1.0, "train_images_per_s": 1.0,
                           "device": "cpu", "precision": "fp32", "loader_backend": "torch",
                           "loader_decode": "no decode", "best_epoch": 1})
    assert "0.1012 dex (what gri images show)" in line
