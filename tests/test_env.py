"""`fastgal env`: every field, and each warning on a faked stack (the probes replaced), and only there."""

from __future__ import annotations

import json
import os
import sys

import pytest
from conftest import NO_DALI, dali_importable, run_cli

from fastgal import env

pytestmark = pytest.mark.nodali  # what `fastgal env` says of DALI and the loader is what differs without it

FIELDS = {"fastgal", "python", "platform", "torch", "torchvision", "fastai", "dali", "nvimgcodec", "webdataset", "astropy",
          "nvidia", "cores", "jpeg_decoder", "warnings", "notes"}

H200 = "NVIDIA H200, 580.65.06, 143771 MiB"


def fake_smi(tmp_path, monkeypatch, text: str = H200, rc: int = 0):
    """An `nvidia-smi` first on PATH that prints `text` (what the real one prints for the query)."""
    bin_ = tmp_path / "bin"
    bin_.mkdir(exist_ok=True)
    smi = bin_ / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\ncat <<'EOF'\n{text}\nEOF\nexit {rc}\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_}{os.pathsep}{os.environ['PATH']}")


def no_nvidia(tmp_path, monkeypatch):
    """A machine with no NVIDIA driver: no nvidia-smi on PATH, no /proc/driver/nvidia."""
    monkeypatch.setattr(env.shutil, "which", lambda name: None)
    monkeypatch.setattr(env, "PROC_VERSION", tmp_path / "absent" / "version")
    monkeypatch.setattr(env, "PROC_GPUS", tmp_path / "absent" / "gpus")


def torch_info(cuda="13.0", available=False, error=None):
    return {"version": f"2.14.1+{'cu' + cuda.replace('.', '') if cuda else 'cpu'}", "cuda": cuda,
            "cuda_available": available, "device_count": int(available), "devices": ["NVIDIA H200"] * available,
            "bf16": True if available else None, "error": error}


def dali_info(dist="nvidia-dali-cuda130", importable=True):
    return {"version": "2.4.0", "distribution": dist, "cuda_major": env.DALI_DISTS.get(dist), "installed": [dist],
            "importable": importable, "error": None if importable else "ModuleNotFoundError: No module named 'nvidia.dali'"}


def report(monkeypatch, torch=None, dali=None) -> dict:
    """`fastgal env --json` through the CLI, with the torch/DALI probes replaced where given."""
    if torch is not None:
        monkeypatch.setattr(env, "probe_torch", lambda: torch)
    if dali is not None:
        monkeypatch.setattr(env, "probe_dali", lambda: dali)
    return json.loads(run_cli("env", "--json").output)


def test_json_has_every_field_and_the_real_stack(tmp_path, monkeypatch):
    no_nvidia(tmp_path, monkeypatch)
    info = report(monkeypatch)
    assert set(info) == FIELDS
    import torch

    assert info["torch"]["version"] == torch.__version__ and info["torch"]["cuda"] == torch.version.cuda
    assert info["torch"]["cuda_available"] == torch.cuda.is_available()
    assert set(info["dali"]) == {"version", "distribution", "cuda_major", "installed", "importable", "error"}
    assert info["dali"]["importable"] == dali_importable()
    assert set(info["nvidia"]) == {"driver", "gpus", "source", "error"} and info["nvidia"]["gpus"] == []
    assert info["cores"]["usable"] == len(os.sched_getaffinity(0))
    no_dali = [w for w in info["warnings"] if "DALI is" in w]
    assert bool(no_dali) == (NO_DALI or not dali_importable())
    from fastgal.load.decode import decoder

    j = info["jpeg_decoder"]
    assert j["name"] == decoder()[0] == "torchvision" and j["version"] == info["torchvision"] and j["error"] is None
    assert j["auto_loader"] == {"cpu": "torch", "cuda": "dali" if dali_importable() and not NO_DALI else "torch"}


def test_table_lists_versions_and_warnings(tmp_path, monkeypatch):
    no_nvidia(tmp_path, monkeypatch)
    monkeypatch.setattr(env, "probe_dali", lambda: dali_info("nvidia-dali-cuda120"))
    monkeypatch.setattr(env, "probe_torch", lambda: torch_info("13.0"))
    out = run_cli("env").output
    assert "torch           2.14.1+cu130 (CUDA 13.0)" in out
    assert "DALI            2.4.0 (nvidia-dali-cuda120, CUDA 12)" in out
    assert "NVIDIA driver   none found" in out
    assert "JPEG decoder    torchvision " in out and "--loader auto: dali on a GPU, torch on a CPU" in out
    assert "\nnote: DALI (nvidia-dali-cuda120) and torch (CUDA 13.0) are built for different CUDA majors" in out


def test_a_healthy_gpu_stack_has_no_warnings(tmp_path, monkeypatch):
    fake_smi(tmp_path, monkeypatch)
    info = report(monkeypatch, torch_info("13.0", available=True), dali_info("nvidia-dali-cuda130"))
    assert info["nvidia"] == {"driver": "580.65.06", "gpus": [{"name": "NVIDIA H200", "memory": "143771 MiB"}],
                              "source": "nvidia-smi", "error": None}
    assert info["warnings"] == []


def test_no_nvidia_smi_means_no_gpu_warning(tmp_path, monkeypatch):
    no_nvidia(tmp_path, monkeypatch)
    info = report(monkeypatch, torch_info(None), dali_info("nvidia-dali-cuda120"))
    assert info["nvidia"]["driver"] is None and info["warnings"] == []


def test_gpu_present_but_torch_is_a_cpu_build(tmp_path, monkeypatch):
    fake_smi(tmp_path, monkeypatch)
    info = report(monkeypatch, torch_info(None), dali_info("nvidia-dali-cuda120"))
    [w] = info["warnings"]
    assert "NVIDIA device is present but torch cannot use it" in w and "CPU-only build" in w


def test_gpu_present_but_the_driver_is_too_old_for_torch(tmp_path, monkeypatch):
    fake_smi(tmp_path, monkeypatch, "NVIDIA A100-SXM4-40GB, 550.54.15, 40960 MiB")
    info = report(monkeypatch, torch_info("13.0"), dali_info("nvidia-dali-cuda120"))
    gpu = [w for w in info["warnings"] if "torch cannot use it" in w]
    assert len(gpu) == 1 and ">= 580" in gpu[0] and "550.54.15" in gpu[0] and "CUDA 12" in gpu[0]
    assert any("different CUDA majors" in n for n in info["notes"])


def test_driver_from_proc_when_there_is_no_nvidia_smi(tmp_path, monkeypatch):
    no_nvidia(tmp_path, monkeypatch)
    proc = tmp_path / "proc"
    (proc / "gpus" / "0000:01:00.0").mkdir(parents=True)
    (proc / "version").write_text("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  "
                                  "Release Build  (dvs-builder@U16-I3-B03-4-3)\nGCC version:  gcc 12\n")
    (proc / "gpus" / "0000:01:00.0" / "information").write_text("Model: \t\t NVIDIA H100 80GB HBM3\nIRQ: 42\n")
    monkeypatch.setattr(env, "PROC_VERSION", proc / "version")
    monkeypatch.setattr(env, "PROC_GPUS", proc / "gpus")
    info = report(monkeypatch, torch_info("13.0", error="CUDA initialization: no device"), dali_info())
    assert info["nvidia"]["driver"] == "580.65.06" and info["nvidia"]["gpus"][0]["name"] == "NVIDIA H100 80GB HBM3"
    [w] = info["warnings"]
    assert "torch cannot use it: CUDA initialization: no device" in w


def test_dali_cuda12_with_a_cuda13_torch(tmp_path, monkeypatch):
    fake_smi(tmp_path, monkeypatch)
    info = report(monkeypatch, torch_info("13.0", available=True), dali_info("nvidia-dali-cuda120"))
    assert info["warnings"] == []  # works on this 580 driver: a note, not a warning
    [n] = info["notes"]
    assert "different CUDA majors" in n and "nvidia-dali-cuda130" in n and ">= 580" in n


def test_dali_cuda13_on_a_cuda12_driver(tmp_path, monkeypatch):
    fake_smi(tmp_path, monkeypatch, "NVIDIA L4, 535.104.05, 23034 MiB")
    info = report(monkeypatch, torch_info("12.6", available=True), dali_info("nvidia-dali-cuda130"))
    assert any("nvidia-dali-cuda130 needs an NVIDIA driver >= 580" in w and "nvidia-dali-cuda120" in w
               for w in info["warnings"])


def test_dali_blocked_means_the_fallback_loader(tmp_path, monkeypatch):
    no_nvidia(tmp_path, monkeypatch)
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # `import nvidia.dali` now raises ImportError
    monkeypatch.setattr(env, "probe_torch", lambda: torch_info(None))
    info = report(monkeypatch)
    assert info["dali"]["importable"] is False and "Error" in info["dali"]["error"]
    [w] = info["warnings"]
    assert "takes the torch loader" in w and ("does not import" in w or "not installed" in w)
    assert info["jpeg_decoder"]["auto_loader"]["cuda"] == "torch"


def test_warn_if_gpu_unused(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(env, "probe_torch", lambda: torch_info("13.0"))
    fake_smi(tmp_path, monkeypatch, "NVIDIA A100-SXM4-40GB, 550.54.15, 40960 MiB")
    line = env.warn_if_gpu_unused("cpu")
    err = capsys.readouterr().err
    assert err == line + "\n" and err.count("\n") == 1 and "driver >= 580" in err
    assert env.warn_if_gpu_unused("cuda") is None and capsys.readouterr().err == ""


@pytest.mark.parametrize("device", ["cpu", "cuda:0"])
def test_warn_if_gpu_unused_is_silent_without_nvidia(tmp_path, monkeypatch, capsys, device):
    no_nvidia(tmp_path, monkeypatch)
    assert env.warn_if_gpu_unused(device) is None
    assert capsys.readouterr().err == ""


def test_versions_are_what_this_process_imports(monkeypatch):
    """env.versions(), what `fastgal bench` (machine) and `fastgal train` (config.json) record: fastgal, python,
    torch and each module of VERSIONED as imported here; None for one that does not import (DALI, blocked)."""
    import platform

    import fastai
    import numpy
    import torch

    import fastgal

    v = env.versions()
    assert list(v) == ["fastgal", "python", "torch", *env.VERSIONED]
    assert (v["fastgal"], v["python"], v["torch"]) == (fastgal.__version__, platform.python_version(), torch.__version__)
    assert v["fastai"] == fastai.__version__ and v["numpy"] == numpy.__version__
    if dali_importable():
        import nvidia.dali

        assert v["nvidia.dali"] == nvidia.dali.__version__
    else:
        assert v["nvidia.dali"] is None
    monkeypatch.setattr(env, "VERSIONED", ("numpy", "fastgal_no_such_module"))
    assert env.versions() == {"fastgal": fastgal.__version__, "python": platform.python_version(),
                              "torch": torch.__version__, "numpy": numpy.__version__, "fastgal_no_such_module": None}
