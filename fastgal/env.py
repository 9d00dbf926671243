"""`fastgal env`: the software and hardware fastgal runs on, and what in that stack will not work.

    fastgal env            # a table on stdout
    fastgal env --json     # the same as JSON (tools/gpu_check.py records it)

Versions of python, torch (+ the CUDA it was built for), torchvision, fastai, DALI (+ which CUDA
flavour is installed), nvImageCodec and webdataset; the NVIDIA driver and GPUs, found without torch
(nvidia-smi, else /proc/driver/nvidia), so a GPU torch cannot use still shows; whether torch can use
them; the usable cores; and warnings for the pairs that cannot work together.

Each probe is a small function (tests replace them); `diagnose` turns their answers into warnings.
No DALI or fastai import at module level: `--device auto` calls `warn_if_gpu_unused` on every run.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import platform
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

# The oldest Linux driver each CUDA major runs on (NVIDIA's CUDA compatibility table: CUDA 12.x on
# >= 525.60, 13.x on >= 580.65, through minor-version compatibility within a major).
MIN_DRIVER = {11: 450, 12: 525, 13: 580}
DALI_DISTS = {"nvidia-dali-cuda110": 11, "nvidia-dali-cuda120": 12, "nvidia-dali-cuda130": 13}
NVIMGCODEC_DISTS = ("nvidia-nvimgcodec-cu12", "nvidia-nvimgcodec-cu13", "nvidia-nvimgcodec-cu11")
PROC_VERSION = Path("/proc/driver/nvidia/version")
PROC_GPUS = Path("/proc/driver/nvidia/gpus")
VERSIONED = ("fastai", "nvidia.dali", "webdataset", "torchvision", "numpy")  # versions() beyond fastgal, python, torch


# --------------------------------------------------------------------------- probes

def dist_version(name: str) -> str | None:
    """An installed distribution's version, without importing it."""
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def versions() -> dict:
    """What this process runs on, as config.json and `fastgal bench` record it: fastgal, python, torch and
    each module of VERSIONED as it reports itself when imported (None where it does not import: DALI
    blocked or absent). Unlike the probes below, which `fastgal env` uses, it imports what it names."""
    import torch

    from fastgal import __version__

    v = {"fastgal": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for mod in VERSIONED:
        try:
            v[mod] = importlib.import_module(mod).__version__
        except Exception:  # ImportError, or a broken install's OSError
            v[mod] = None
    return v


def probe_nvidia() -> dict:
    """The NVIDIA driver and GPUs as the system sees them (not torch): nvidia-smi, else /proc."""
    out = {"driver": None, "gpus": [], "source": None, "error": None}
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            r = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20)
            rows = [[c.strip() for c in line.split(",")] for line in r.stdout.splitlines() if line.strip()]
            if r.returncode == 0 and rows:
                out.update(source="nvidia-smi", driver=rows[0][1],
                           gpus=[{"name": n, "memory": m} for n, _, m in (row[:3] for row in rows if len(row) >= 3)])
                return out
            out["error"] = (r.stderr or r.stdout).strip().splitlines()[0] if (r.stderr or r.stdout).strip() else f"exit {r.returncode}"
        except (OSError, subprocess.TimeoutExpired) as e:
            out["error"] = f"nvidia-smi: {type(e).__name__}: {e}"
    if PROC_VERSION.is_file():  # the kernel module is loaded, whatever user-space tools are installed
        m = re.search(r"\b(\d{3,}\.\d+(?:\.\d+)?)\b", PROC_VERSION.read_text(errors="replace"))
        out.update(source=str(PROC_VERSION), driver=m.group(1) if m else None, gpus=_proc_gpus())
    return out


def _proc_gpus() -> list[dict]:
    gpus = []
    for info in sorted(PROC_GPUS.glob("*/information")) if PROC_GPUS.is_dir() else []:
        m = re.search(r"^Model:\s*(.+)$", info.read_text(errors="replace"), re.M)
        gpus.append({"name": m.group(1).strip() if m else "NVIDIA GPU", "memory": None})
    return gpus


def probe_torch() -> dict:
    """torch's version, the CUDA it was built for, and whether it can use a GPU here (and why not)."""
    import torch

    with warnings.catch_warnings(record=True) as caught:  # "CUDA initialization: driver too old", ...
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    out = {"version": torch.__version__, "cuda": torch.version.cuda, "cuda_available": available,
           "device_count": torch.cuda.device_count() if available else 0, "devices": [], "bf16": None,
           "error": next((str(w.message).splitlines()[0] for w in caught if "CUDA" in str(w.message)), None)}
    if available:
        out["devices"] = [torch.cuda.get_device_name(i) for i in range(out["device_count"])]
        out["bf16"] = bool(torch.cuda.is_bf16_supported())
    return out


def probe_dali() -> dict:
    """DALI's installed distribution (its CUDA flavour) and whether it imports."""
    dists = {d: v for d in DALI_DISTS if (v := dist_version(d))}
    dist = next(iter(dists), None)
    out = {"version": dists.get(dist), "distribution": dist, "cuda_major": DALI_DISTS.get(dist),
           "installed": sorted(dists), "importable": False, "error": None}
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401  (the iterator fastgal uses)

        out["importable"] = True
        out["version"] = nvidia.dali.__version__
    except Exception as e:  # ImportError, or a broken install's OSError
        out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return out


def probe_nvimgcodec() -> dict:
    """nvImageCodec, the codec library DALI's decoders are built on."""
    dist = next((d for d in NVIMGCODEC_DISTS if dist_version(d)), None)
    return {"version": dist_version(dist) if dist else None, "distribution": dist}


def probe_cores() -> dict:
    import os

    from fastgal.util import default_workers

    return {"usable": default_workers(), "total": os.cpu_count()}


# --------------------------------------------------------------------------- diagnosis

def _major(version: str | None) -> int | None:
    m = re.match(r"\s*(\d+)", version or "")
    return int(m.group(1)) if m else None


def gpu_unused_reason(torch_info: dict, nvidia: dict) -> str:
    """Why torch cannot use the NVIDIA device the system shows, as far as can be known."""
    if torch_info["cuda"] is None:
        return (f"torch {torch_info['version']} is a CPU-only build; install a CUDA build "
                "(make TORCH_SPEC=..., see the README's platform notes)")
    need, driver = MIN_DRIVER.get(_major(torch_info["cuda"])), _major(nvidia["driver"])
    if need and driver and driver < need:
        return (f"torch {torch_info['version']} is built for CUDA {torch_info['cuda']}, which needs an NVIDIA driver "
                f">= {need}, and this one is {nvidia['driver']}: update the driver, or install a torch built for "
                f"CUDA {max(c for c, d in MIN_DRIVER.items() if d <= driver)} (make TORCH_SPEC=..., see the README)")
    return torch_info["error"] or "torch.cuda.is_available() is False (is CUDA_VISIBLE_DEVICES empty?)"


def diagnose(info: dict) -> list[str]:
    """Warnings for a stack that will not do what fastgal expects of it."""
    t, d, nv = info["torch"], info["dali"], info["nvidia"]
    out = []
    present = bool(nv["gpus"] or nv["driver"])
    if present and not t["cuda_available"]:
        out.append(f"an NVIDIA device is present but torch cannot use it: {gpu_unused_reason(t, nv)}")
    driver = _major(nv["driver"])
    if d["cuda_major"] and driver and driver < MIN_DRIVER.get(d["cuda_major"], 0):
        fix = "install nvidia-dali-cuda120 (driver >= 525) instead" if d["cuda_major"] > 12 else "update the driver"
        out.append(f"{d['distribution']} needs an NVIDIA driver >= {MIN_DRIVER[d['cuda_major']]}, and this one is "
                   f"{nv['driver']}: {fix}")
    if not d["importable"]:
        why = "not installed" if not d["distribution"] else f"installed ({d['distribution']}) but does not import: {d['error']}"
        out.append(f"NVIDIA DALI is {why}; --loader auto takes the torch loader (nvJPEG + one resample on a GPU), "
                   "and --loader dali fails")
    return out


def notes(info: dict) -> list[str]:
    """What works but is worth knowing: DALI and torch built for different CUDA majors (the default install:
    torch 2.14.1 is CUDA 13, nvidia-dali-cuda120 is CUDA 12) run together on a driver new enough for both,
    with two CUDA runtimes loaded; the diagnose() warnings say when the driver is too old for either."""
    t, d = info["torch"], info["dali"]
    torch_major = _major(t["cuda"])
    if d["importable"] and d["cuda_major"] and torch_major and d["cuda_major"] != torch_major:
        need = max(MIN_DRIVER.get(d["cuda_major"], 0), MIN_DRIVER.get(torch_major, 0))
        return [f"DALI ({d['distribution']}) and torch (CUDA {t['cuda']}) are built for different CUDA majors: "
                f"together they need a driver >= {need} and load two CUDA runtimes; "
                f"nvidia-dali-cuda{torch_major}0 matches this torch"]
    return []


def probe_decoder(dali: bool) -> dict:
    """The JPEG decoder the torch loaders use (fastgal.load.decode), and what --loader auto picks per device."""
    from fastgal.load.decode import decoder

    try:
        name = decoder()[0]
        error = None
    except RuntimeError as e:
        name, error = None, str(e)
    return {"name": name, "version": dist_version(name) if name else None, "error": error,
            "torchcodec": dist_version("torchcodec"),
            "auto_loader": {"cpu": "torch", "cuda": "dali" if dali else "torch"}}


def gather() -> dict:
    """Everything `fastgal env` reports (see the module docstring)."""
    from fastgal import __version__

    info = {
        "fastgal": __version__, "python": platform.python_version(), "platform": platform.platform(),
        "torch": probe_torch(), "torchvision": dist_version("torchvision"), "fastai": dist_version("fastai"),
        "dali": probe_dali(), "nvimgcodec": probe_nvimgcodec(), "webdataset": dist_version("webdataset"),
        "astropy": dist_version("astropy"), "nvidia": probe_nvidia(), "cores": probe_cores(),
    }
    info["jpeg_decoder"] = probe_decoder(info["dali"]["importable"])
    info["warnings"] = diagnose(info)
    info["notes"] = notes(info)
    return info


def warn_if_gpu_unused(device) -> str | None:
    """--device auto: one line on stderr when it falls back to the CPU on a machine with an NVIDIA device."""
    if str(device) != "cpu":
        return None
    nv = probe_nvidia()
    if not (nv["gpus"] or nv["driver"]):
        return None
    line = (f"fastgal: running on the CPU although an NVIDIA device is present ({gpu_unused_reason(probe_torch(), nv)}); "
            "`fastgal env` says more")
    print(line, file=sys.stderr, flush=True)
    return line


def _decoder_row(j: dict) -> str:
    if not j["name"]:
        return f"none: {j['error']}"
    a = j["auto_loader"]
    return (f"{j['name']} {j['version'] or ''} (nvJPEG on a GPU, libjpeg-turbo on a CPU); --loader auto: "
            f"{a['cuda']} on a GPU, {a['cpu']} on a CPU")


def format_table(info: dict) -> str:
    """The human summary printed by `fastgal env`."""
    t, d, nv, im = info["torch"], info["dali"], info["nvidia"], info["nvimgcodec"]
    gpus = ", ".join(f"{g['name']} ({g['memory']})" if g["memory"] else g["name"] for g in nv["gpus"]) or "-"
    if t["cuda_available"]:
        use = f"yes, {t['device_count']} device(s): {', '.join(t['devices'])}; bf16 {'yes' if t['bf16'] else 'no'}"
    else:
        use = "no" + (f" ({t['error']})" if t["error"] else "")
    dali = (f"{d['version']} ({d['distribution']}, CUDA {d['cuda_major']})" if d["distribution"] else "not installed")
    if d["distribution"] and not d["importable"]:
        dali += f"; does not import: {d['error']}"
    rows = [
        ("fastgal", info["fastgal"]), ("python", f"{info['python']} ({info['platform']})"),
        ("torch", f"{t['version']} (CUDA {t['cuda'] or 'none: CPU build'})"),
        ("torchvision", info["torchvision"] or "-"), ("fastai", info["fastai"] or "-"), ("DALI", dali),
        ("nvImageCodec", f"{im['version']} ({im['distribution']})" if im["distribution"] else "not installed"),
        ("webdataset", info["webdataset"] or "-"),
        ("astropy", info["astropy"] or "not installed (only FITS cutouts need it: pip install 'fastgal[fits]')"),
        ("JPEG decoder", _decoder_row(info["jpeg_decoder"])),
        ("NVIDIA driver", f"{nv['driver']} (from {nv['source']})" if nv["driver"]
         else "none found" + (f" ({nv['error']})" if nv["error"] else "")),
        ("GPUs", gpus), ("torch uses GPU", use),
        ("cores", f"{info['cores']['usable']} usable of {info['cores']['total']}"),
    ]
    lines = [f"{k:<16}{v}" for k, v in rows]
    lines += [f"warning: {w}" for w in info["warnings"]] or ["no warnings"]
    lines += [f"note: {n}" for n in info["notes"]]
    return "\n".join(lines)
