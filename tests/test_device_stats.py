"""DeviceStats and GpuUtilisation (train/callbacks.py) without a GPU: NVML and nvidia-smi are stand-ins, torch's
CUDA memory counters are patched; a CPU run's history.csv keeps its columns."""

from __future__ import annotations

import sys
import time
import types

import pandas as pd
import pytest
import torch
from conftest import tiny_regression

from fastgal.train import callbacks
from fastgal.train.callbacks import DeviceStats, GpuUtilisation

CUDA0 = torch.device("cuda", 0)


def _first_samples(util: GpuUtilisation, n: int = 2) -> float:
    """The mean of the first samples the thread takes (waits for them: no timing is asserted)."""
    t0 = time.monotonic()
    for _ in range(500):
        if len(util.samples) >= n:
            break
        time.sleep(0.01)
    util.close()
    return util.mean(t0, time.monotonic())


@pytest.fixture
def no_gpu_naming(monkeypatch):
    """torch names no GPU here: the ident is the index (UUID where torch has one)."""
    monkeypatch.setattr(callbacks, "_nvml_ident", lambda device: "0")


def test_utilisation_through_nvml(monkeypatch, no_gpu_naming):
    nvml = types.SimpleNamespace(nvmlInit=lambda: None, nvmlDeviceGetHandleByIndex=lambda i: ("handle", i),
                                 nvmlDeviceGetHandleByUUID=lambda u: pytest.fail("no UUID here"),
                                 nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=42))
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    util = GpuUtilisation(CUDA0, every=0.01)
    assert util.source == "nvml" and _first_samples(util) == 42.0


def test_utilisation_falls_back_to_nvidia_smi_then_to_nothing(monkeypatch, tmp_path, no_gpu_naming):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    smi = tmp_path / "nvidia-smi"
    smi.write_text('#!/bin/sh\ncase "$*" in *"-i 0"*) echo 37 ;; *) echo bad ;; esac\n')
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    util = GpuUtilisation(CUDA0, every=0.01)
    assert util.source == "nvidia-smi" and _first_samples(util) == 37.0
    monkeypatch.setenv("PATH", str(tmp_path / "none"))
    util = GpuUtilisation(CUDA0)
    assert util.source is None and util.mean(0, time.monotonic()) is None


def test_device_stats_adds_two_columns_per_trained_epoch(monkeypatch):
    from fastai.learner import Learner

    from fastgal.train.learner import dress

    peaks = iter([2**30, 3 * 2**29])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: next(peaks))

    class Util:  # a sampler that saw 50% throughout
        def __init__(self, device, every):
            self.closed = False

        def mean(self, t0, t1):
            return 50.0

        def close(self):
            self.closed = True

    monkeypatch.setattr(callbacks, "GpuUtilisation", Util)
    learn = dress(Learner(tiny_regression(), torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 1)),
                          loss_func=torch.nn.functional.mse_loss), quiet=True)
    stats = DeviceStats(CUDA0)
    learn.add_cb(stats)
    learn.fit(2, 1e-3)
    rows = learn.epoch_stats.rows
    assert [r["peak_gpu_memory_gib"] for r in rows] == [1.0, 1.5]
    assert [r["gpu_utilisation_pct"] for r in rows] == [50.0, 50.0] and stats.util is None  # closed after fit
    learn.get_preds()  # an epoch with no training: no row, nothing read
    assert len(rows) == 2
    cpu = DeviceStats(torch.device("cpu"))  # on any other device it does nothing
    learn.remove_cb(stats).add_cb(cpu)
    learn.fit(1, 1e-3)
    assert "peak_gpu_memory_gib" not in learn.epoch_stats.rows[-1]


def test_a_cpu_run_keeps_its_history_columns(small_run):
    """history.csv of a CPU run: the columns runs are compared by, and no device columns."""
    assert list(pd.read_csv(small_run / "history.csv").columns) == [
        "epoch", "train_loss", "valid_loss", "rmse_metallicity", "rmse_lgm_tot_p50", "seconds", "images_per_s",
        "valid_images_per_s", "checkpoint_seconds"]
