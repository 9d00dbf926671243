"""fastgal.bench.step (`fastgal bench --what step`): the thin model keeps the layer graph, and the section
reports what it claims. Speed figures live in benchmarks/RESULTS.md; here only structure and counts."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli

from fastgal.bench.main import format_table
from fastgal.bench.step import thin_model
from fastgal.train.model import ARCHS, make_model


@pytest.mark.parametrize("arch", list(ARCHS))
def test_thin_model_keeps_the_layer_graph(arch):
    full, thin = make_model(arch, 2, [0, 0], [1, 1]), thin_model(arch, 2, [0, 0], [1, 1], width=1 / 16)
    fp, tp = list(full.named_parameters()), list(thin.named_parameters())
    assert [n for n, _ in fp] == [n for n, _ in tp]
    assert [p.dim() for _, p in fp] == [p.dim() for _, p in tp]
    def kinds(m):  # the thin body is an XResNet subclass
        return [type(x).__name__.replace("_ThinXResNet", "XResNet") for x in m.modules()]

    assert kinds(full) == kinds(thin)
    assert sum(p.numel() for _, p in tp) * 50 < sum(p.numel() for _, p in fp)
    assert thin(torch.randn(2, 3, 32, 32)).shape == (2, 2)


def test_bench_step_section(bench_all, tmp_path):
    """The step section (of the suite's one `bench --what all`): the issue's counts, ratios that are the quotient
    of the figures; it needs no shards."""
    res = bench_all
    st = res["step"]
    assert st["param_tensors"] == len(list(make_model("xresnet18", 1, [0], [1]).parameters()))
    f, p = st["results"]["fastgal"], st["results"]["fastai"]
    assert f["recorder"] == "DeviceRecorder" and p["recorder"] == "Recorder" and p["optimizer"] == "fastai ranger"
    assert f["aten_ops"]["opt"] <= 60 < p["aten_ops"]["opt"]
    assert f["syncs_per_step_between_reads"] == 0 and f["loss_reads"] == 60 // st["sync_every"]
    assert p["syncs_by_method_per_step"]["cpu"] >= 1  # fastai's smooth loss: a copy to the CPU every step
    for r in (f, p):
        ms = r["ms"]
        assert 0 < ms["fwd_bwd"] < ms["total"] and ms["opt"] > 0 and ms["outside_fwd_bwd"] > 0
    sp = st["speedup_vs_baseline"]
    assert sp["opt"] == pytest.approx(p["ms"]["opt"] / f["ms"]["opt"], rel=1e-2)
    g = st["gpu_ceiling_images_per_s"]
    assert g["fastgal"]["outside_fwd_bwd"] == pytest.approx(g["bs"] / f["ms"]["outside_fwd_bwd"] * 1e3, rel=1e-2)
    table = format_table(res)  # what the command prints without --json
    assert "fastai / fastgal" in table and "aten ops" in table and "GPU ceiling" in table
    alone = json.loads(run_cli("bench", tmp_path / "none", "--what", "step", "--arch", "xresnet18", "--batches", 1,
                               "--warmup", 0, "--repeats", 1, "--quiet", "--json").stdout)
    assert alone["sections"] == ["step"] and alone["n_train"] is None and alone["step"]["results"]["fastgal"]["ms"]["total"] > 0
