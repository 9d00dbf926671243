"""`fastgal bench --what decode` and `--what equality` on the tiny half-resolution shards: what they report,
never how fast. Equality's contracts on a CPU: the torch loader and DALI hand over the same centre and
TTA views exactly, and training views within one grey level."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import dali_importable, run_cli

from fastgal.bench.equality import EXACT, Pair
from fastgal.bench.main import format_table

TINY = ("--size", 56, "--batches", 2, "--warmup", 1, "--repeats", 1, "--bs", 16, "--workers", 1, "--device", "cpu")


def test_bench_decode_section(bench_all):
    dec = bench_all["decode"]
    assert dec["bs"] == 16 and dec["batches"] == 2 and dec["torch_decoder"] in ("torchvision", "torchcodec")
    assert set(dec["results"]) == {"torch_cpu"} | ({"dali_cpu"} if dali_importable() else set())
    assert all(r["images_per_s"] > 0 for r in dec["results"].values())
    assert ("dali" in dec["skipped"]) != dali_importable() and "torch_gpu_vs_cpu_pixels" not in dec  # no GPU here
    table = format_table(bench_all)  # what the command prints without --json
    assert "decode: JPEG decoders alone" in table and "torch_cpu" in table


@pytest.mark.dali
def test_bench_equality_torch_vs_dali_on_cpu(bench_all):
    eq = bench_all["equality"]
    assert eq["ok"] is True and eq["problems"] == [] and eq["skipped"] == {}
    views = ["centre"] + [f"tta {v}" for v in range(8)]
    assert set(eq["comparisons"]) == {f"{v}: torch_cpu vs dali_cpu" for v in views + ["train"]}
    for v in views:  # evaluation views: exactly the same pixels (float32 rounding of the normalisation aside)
        c = eq["comparisons"][f"{v}: torch_cpu vs dali_cpu"]
        assert c["rule"] == "exact" and c["images"] == 32 and c["targets_identical"], c
        assert c["max_abs"] <= EXACT and c["fraction_differing"] == 0, c
    train = eq["comparisons"]["train: torch_cpu vs dali_cpu"]  # the same samples and draws, rotated per backend
    assert train["rule"] == "grey" and train["images"] == 32 and train["targets_identical"]
    assert train["max_abs"] <= 1 + EXACT and train["fraction_differing"] < 0.01, train
    assert eq["outputs_on_their_device"] == {"torch_cpu": True, "dali_cpu": True}
    table = format_table({**bench_all, "sections": ["equality"]})
    assert "centre: torch_cpu vs dali_cpu" in table and table.rstrip().endswith("ok")


def test_bench_equality_without_dali_says_why(small_shards, monkeypatch):
    import fastgal.load.loader

    monkeypatch.setattr(fastgal.load.loader, "dali_available", lambda: False)
    res = json.loads(run_cli("bench", small_shards, "--what", "equality,decode", "--json", "--quiet", *TINY).stdout)
    eq = res["equality"]
    assert eq["ok"] is None and eq["comparisons"] == {} and "not importable" in eq["skipped"]["dali"]
    assert "not importable" in res["decode"]["skipped"]["dali"] and set(res["decode"]["results"]) == {"torch_cpu"}


def test_pair_rules_catch_differences():
    """One value off by a grey level breaks `exact`; two break `grey`; a shifted colour breaks `decoders`."""
    std = [2.0, 2.0, 2.0]
    x = torch.zeros(2, 3, 4, 4)
    y = torch.zeros(2, 1)
    off = x.clone()
    off[0, 1, 2, 2] = 0.5  # one value, 1 grey level (0.5 x std 2)
    pr = Pair(std)
    pr.add((x, y), (off, y))
    s = pr.summary("exact")
    assert s["max_abs"] == 1.0 and s["fraction_differing"] == round(1 / x.numel(), 6) and s["images"] == 2
    assert len(s["problems"]) == 1 and s["problems"][0].startswith("not exact")
    assert pr.summary("grey")["problems"] == []
    off[1, 0, 0, 0] = 1.0  # 2 grey levels
    pr = Pair(std)
    pr.add((x, y), (off, y + 1))
    assert {p.split(" ")[0] for p in pr.summary("grey")["problems"]} == {"max", "targets"}
    pr = Pair(std)
    pr.add((x + 0.25, y), (x, y))  # every value half a grey level brighter
    s = pr.summary("decoders")
    assert s["mean_signed"] == [0.5, 0.5, 0.5] and "per-channel mean" in s["problems"][0]
