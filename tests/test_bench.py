"""`fastgal bench` through the CLI on the tiny half-resolution shards: structure and arithmetic, never timing.

Speed claims live in benchmarks/RESULTS.md as same-run ratios; here we only check that every section
runs, every throughput is positive and every ratio is the quotient of the figures it reports.
"""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import BENCH_TINY, dali_importable, run_cli

# DALI is a backend only where it is installed (make test's second pass blocks it)
BACKENDS = {"fastai", "torch"} | ({"dali"} if dali_importable() else set())

TINY = BENCH_TINY


def _check_section(sec, names):
    assert set(sec["results"]) == names
    for r in sec["results"].values():
        assert r["images_per_s"] > 0 and r["images_per_s"] == pytest.approx(max(r["repeats"]))
    b = sec["results"][sec["baseline"]]["images_per_s"]
    for k, v in sec["results"].items():
        assert sec["ratio_vs_baseline"][k] == pytest.approx(v["images_per_s"] / b, rel=1e-3)
    assert sec["ratio_vs_baseline"][sec["baseline"]] == pytest.approx(1.0)


def test_bench_all_sections_json(bench_all):
    res = bench_all
    assert res["sections"] == ["loaders", "model", "e2e", "step", "shuffle", "decode", "equality"]
    # the fastai peer reads the survey's JPEGs through the manifest's source paths
    _check_section(res["loaders"], BACKENDS)
    assert res["loaders"]["baseline"] == "fastai"
    assert set(res["loaders"]["skipped"]) == {"fastai", "dali", "torch"} - BACKENDS
    m = res["model"]
    assert m["images_per_s"] > 0 and m["batch_shape"] == [16, 3, 56, 56] and m["arch"] == "xresnet18"
    e = res["e2e"]
    _check_section(e, BACKENDS)
    for k, v in e["results"].items():
        assert e["data_bound_fraction"][k] == pytest.approx(v["images_per_s"] / m["images_per_s"], rel=1e-3)
    import torch

    assert res["config"]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # --device auto
    assert res["config"]["crop"] == 72  # the shards' own region
    assert {"dali", "torch"} & BACKENDS <= set(res["shuffle"]["results"])  # test_bench_shuffle.py checks its figures
    assert res["decode"]["results"] and res["equality"]["ok"] is (True if "dali" in BACKENDS else None)  # test_bench_equality.py


def test_bench_without_source_images_falls_back_to_torch(small_shards, tmp_path):
    """Shards whose JPEG folder is gone still bench; ratios are then against the torch fallback."""
    sh = tmp_path / "sh"
    shutil.copytree(small_shards, sh)
    man = json.loads((sh / "manifest.json").read_text())
    man["source"]["images"] = str(tmp_path / "gone")
    (sh / "manifest.json").write_text(json.dumps(man))
    res = run_cli("bench", sh, "--what", "loaders", *TINY)  # the human table
    assert "skipped" in res.output and "x torch" in res.output and "images/s" in res.output


@pytest.mark.nodali  # without DALI: its loader is named as skipped, with the reason, and the rest still run
def test_bench_progress_lines_reach_a_log(small_shards):
    """Issue 22, case 6: bench's per-window lines follow the one rule (whole lines whether or not stderr is a
    terminal; they used to show on a terminal only); stdout keeps the results alone."""
    tiny = [a for a in TINY if a != "--quiet"]
    res = run_cli("bench", small_shards, "--what", "loaders", "--json", *tiny)  # CliRunner's stderr: not a terminal
    assert "  loaders torch: repeat 1/1 " in res.stderr and "\r" not in res.stderr
    loaders = json.loads(res.stdout)["loaders"]
    _check_section(loaders, BACKENDS)
    assert set(loaders["skipped"]) == {"fastai", "dali", "torch"} - BACKENDS
    assert all("not importable" in why for why in loaders["skipped"].values())
    assert run_cli("bench", small_shards, "--what", "loaders", *TINY).stderr == ""


def test_bench_user_errors(small_shards, tmp_path):
    res = run_cli("bench", small_shards, "--what", "speed", *TINY, ok=False)
    assert res.exit_code != 0 and "loaders, model, e2e, step" in res.output
    res = run_cli("bench", tmp_path, *TINY, ok=False)
    assert res.exit_code != 0 and "manifest.json" in res.output
    res = run_cli("bench", small_shards, "--images", tmp_path / "nope", *TINY, ok=False)
    assert res.exit_code != 0 and "--images" in res.output
    res = run_cli("bench", small_shards, "--compile-mode", "reduce-overhead", *TINY, ok=False)
    assert res.exit_code != 0 and "add --compile" in res.output


def test_bench_accuracy_rows_table_and_plot(tmp_path):
    """benchmarks/bench_accuracy.py's arithmetic on constructed demo.json contents, and its PNG."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_accuracy.py"
    spec = importlib.util.spec_from_file_location("bench_accuracy", path)
    acc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(acc)

    def demo(rmse, n):
        return {"targets": {"metallicity": {"rmse": rmse, "tta_rmse": rmse - 0.001, "bias": 0.01, "nmad": 0.09,
                                            "outlier_fraction": 0.02, "baseline_rmse": 0.2}},
                "target": "metallicity", "survey_reference_rmse": 0.1, "survey_floor_rmse": 0.08,
                "preset": {"epochs": 8, "arch": "xresnet18", "size": 56}, "n_train": n * 4 // 5,
                "n_valid": n // 5, "fit_seconds": 1.0}

    rows = [acc.row(n, demo(r, n)) for n, r in ((1000, 0.12), (4000, 0.11))]
    assert [r["rmse_over_reference"] for r in rows] == [1.2, 1.1]
    assert [r["rmse_over_floor"] for r in rows] == [1.5, 1.375]
    lines = acc.table(rows).splitlines()
    assert len(lines) == 4 and lines[3].startswith("| 4,000 | 3200 / 800 | 0.1100 | 0.1090 |")
    png = acc.plot(rows, tmp_path / "curve.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_a_data_bound_fraction_above_one_is_called_noise():
    """Issue 22, case 5: 1.04 must not read as a loader faster than the model."""
    from fastgal.bench.main import format_table

    sec = {"baseline": "torch", "results": {"torch": {"images_per_s": 104.0}}, "ratio_vs_baseline": {"torch": 1.0},
           "data_bound_fraction": {"torch": 1.04}}
    res = {"config": {"bs": 8, "crop": 72, "size": 56, "workers": 1, "device": "cpu", "repeats": 1, "batches": 2,
                      "warmup": 0, "arch": "xresnet18"}, "machine": {"gpu": None, "usable_cpus": 2}, "n_train": 10,
           "shards": "s", "model": {"arch": "xresnet18", "batch_shape": [8, 3, 56, 56], "precision": "fp32",
                                    "images_per_s": 100.0}, "e2e": sec}
    table = format_table(res)
    assert "noise: that loader keeps up" in table
    # issue 33: printed as the ratio it is (a `data-bound fraction` could read 1.42); the JSON key keeps its name
    assert "fraction" not in table and "e2e / model = the ratio of their images/s" in table
    assert "a ratio above 1 is the two measurements' noise" in table
    assert next(ln for ln in table.splitlines() if ln.strip().startswith("torch")).split()[-1] == "1.04"
    sec["data_bound_fraction"]["torch"] = 0.9
    assert "noise" not in format_table(res)


def test_bench_every_section_on_fits_shards(fits_survey):
    """Issue 29: bench on shards of five FITS bands runs every section with a five-channel model and batches
    (it used to build a three-channel model and crash); what cannot read float shards says why it is skipped."""
    res = json.loads(run_cli("bench", fits_survey / "sh", "--what", "all", "--epochs", 2, "--json", *TINY).stdout)
    assert res["sections"] == ["loaders", "model", "e2e", "step", "shuffle", "decode", "equality"]
    assert res["decode"] == {"results": {}, "skipped": {"decode": "the shards hold FITS bands: there is no JPEG to decode"}}
    assert res["equality"]["ok"] is (True if "dali" in BACKENDS else None)  # float bands: torch vs DALI as for JPEGs
    why = "the shards hold FITS bands, which fastai's PIL pipeline cannot read"
    loaders = BACKENDS - {"fastai"}
    for name in ("loaders", "e2e"):  # no peer: the ratios are against the torch loader
        _check_section(res[name], loaders)
        assert res[name]["baseline"] == "torch" and res[name]["skipped"]["fastai"] == why
    m = res["model"]
    assert m["batch_shape"] == [16, 5, 56, 56] and m["images_per_s"] > 0
    for k, v in res["e2e"]["results"].items():
        assert res["e2e"]["data_bound_fraction"][k] == pytest.approx(v["images_per_s"] / m["images_per_s"], rel=1e-3)
    st = res["step"]
    assert st["batch_shape"] == [8, 5, 32, 32] and set(st["results"]) == {"fastgal", "fastai"}
    assert all(r["ms"]["total"] > 0 for r in st["results"].values())
    sh = res["shuffle"]
    assert set(sh["results"]) == {"torch"} | ({"dali"} & BACKENDS)
    for r in sh["results"].values():  # every training sample read once per epoch
        assert sh["n_train"] - sh["n_train"] % 16 == sum(r["steps_per_rank"][0]) * 16
    if "dali" in BACKENDS:  # DALI's stream reader decodes JPEGs: its variants are skipped, with the reason
        from fastgal.bench.shuffle import STREAM_VARIANTS

        assert set(sh["skipped"]) == set(STREAM_VARIANTS) and all("FITS" in v for v in sh["skipped"].values())
    else:
        assert set(sh["skipped"]) == {"dali"}
