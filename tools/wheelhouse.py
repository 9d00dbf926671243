#!/usr/bin/env python
"""The wheels a torch-only GPU box lacks to run fastgal, for that box's Python and platform.

    python tools/wheelhouse.py OUT --python 3.12                        # fastgal + fastai + webdataset + ...
    python tools/wheelhouse.py OUT --python 3.12 --with-dali cuda130    # and DALI's CUDA 13 stack, in parts

Run it from fastgal's own virtualenv (make venv) on a machine with a package index: the versions are the
ones installed there (the set the test suite passed with), each downloaded again for the target (`pip
download --no-deps --only-binary=:all: --python-version X --platform P`); fastgal itself is built from this
checkout. What is left out:
  - what such a box already has (BOX: torch and torchvision with their CUDA libraries, numpy, pandas, scipy,
    matplotlib, pillow, click, requests) and everything those require;
  - spaCy, which fastai requires for fastai.text only: fastgal never imports it, and with its compiled
    dependencies it would double the size;
  - astropy (fastgal's `fits` extra: FITS cutouts for synth, shard and predict), unless --with-fits (+13 MiB): a
    box that trains on shards never needs it, since FITS shards hold raw float arrays;
  - DALI, unless --with-dali: ~250 MB of wheels, written as OUT/dali/dali.tar in parts of --part-mib MiB
    (each with its sha256 in OUT/dali/SHA256SUMS) so that each fits one transfer; OUT/dali/join.sh checks and
    joins them and unpacks the wheels into OUT.

On the box, with nothing but its own Python (see the README, "Checking fastgal on a GPU box"):
    python -m venv --system-site-packages ~/fg && ~/fg/bin/pip install --no-index --no-deps OUT/*.whl
or, without a venv:  pip install --no-index --no-deps --target ~/fg-site OUT/*.whl; export PYTHONPATH=~/fg-site
Prints the list and the total size; --json for a machine. A user error or a failed pip step is one line on
stderr, `wheelhouse: ...`, naming the package and why (pip's last error line, or the fix where it is known,
e.g. the box's full Python version), and OUT is left as it was found (absent, or empty).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BOX = ["torch", "torchvision", "numpy", "pandas", "scipy", "matplotlib", "pillow", "click", "requests"]
NEVER = {"spacy"}  # fastai.text's; see the module docstring
DALI = {"cuda120": ["nvidia-dali-cuda120", "nvidia-nvimgcodec-cu12", "nvidia-libnvcomp-cu12"],
        "cuda130": ["nvidia-dali-cuda130", "nvidia-nvimgcodec-cu13", "nvidia-libnvcomp-cu13"]}
DALI_DEPS = ["astunparse", "gast", "libcst", "makefun", "nvtx", "optree", "six", "wheel"]  # DALI's own requirements
PLATFORMS = {"linux-x86_64": "manylinux_2_28_x86_64", "linux-aarch64": "manylinux_2_28_aarch64"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(names, stop=frozenset(), python: str = "3.12") -> dict[str, str | None]:
    """name -> installed version for `names` and everything they require (not extras), as installed in this
    environment, with markers evaluated for the target Python; `stop` names are neither taken nor followed."""
    from packaging.requirements import Requirement

    mm = ".".join(python.split(".")[:2])
    env = {"extra": "", "python_version": mm, "python_full_version": python if python.count(".") == 2 else mm + ".0", "sys_platform": "linux",
           "platform_system": "Linux"}
    seen: dict[str, str | None] = {}
    todo = list(names)
    while todo:
        n = norm(todo.pop())
        if n in seen or n in stop:
            continue
        try:
            d = distribution(n)
        except PackageNotFoundError:
            seen[n] = None
            continue
        seen[n] = d.version
        for r in d.requires or []:
            req = Requirement(r)
            if req.marker is None or req.marker.evaluate(env):
                todo.append(req.name)
    return seen


FITS = ["astropy"]  # the `fits` extra


def plan(python: str, fits: bool = False) -> tuple[dict[str, str], list[str]]:
    """(name -> version to download, names a box has anyway); fits: with the `fits` extra's closure."""
    box = closure(BOX, python=python)
    need = closure(["fastgal", *(FITS if fits else [])], stop=frozenset(box) | NEVER | {norm(d) for ds in DALI.values() for d in ds}, python=python)
    missing = sorted(n for n, v in need.items() if v is None)
    if missing:
        raise Refused(f"{', '.join(missing)} not installed here; run from fastgal's venv (make venv)")
    need.pop("fastgal")
    return {n: v for n, v in sorted(need.items())}, sorted(box)


class Refused(Exception):
    """A user error or a failed pip step: main() prints it as one line, `wheelhouse: <message>`, and exits 1."""


class BadArgument(Refused):
    """A bad command-line argument: exit status 2, as argparse's own errors."""


def pip(*args, python: str = "", what: str = "") -> None:
    """pip in a subprocess; its output (warnings) goes to stderr. A failure raises Refused with the one line
    that says why (pip_failure); what: the step, for that line (e.g. "building fastgal's wheel")."""
    res = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if res.returncode != 0:
        raise Refused(pip_failure(res.stdout + "\n" + res.stderr, python, what))
    sys.stderr.write(res.stdout + res.stderr)


def pip_failure(output: str, python: str, what: str = "") -> str:
    """One line from a failed pip's output: the package it could not get and why (its last ERROR line), and
    the fix where it is known: a --python without the patch level that pip reads as X.Y.0, below what the
    package's wheel requires (e.g. soupsieve 4.1 needs Python >= 3.11.5)."""
    errors = [ln[len("ERROR:"):].strip() for ln in output.splitlines() if ln.startswith("ERROR:")]
    last = errors[-1] if errors else next((ln.strip() for ln in reversed(output.splitlines()) if ln.strip()),
                                          "pip exited with an error and said nothing")
    m = re.search(r"(?:No matching distribution found for|satisfies the requirement) ([A-Za-z0-9_.\-]+)==(\S+)", output)
    if m:
        name, version = m.groups()
        need = re.search(rf"(?:: |; ){re.escape(version)} Requires-Python (\S+?)(?:;|$)", output, re.M)
        if need:
            floor = re.match(r">=\s*(\d+)\.(\d+)", need.group(1))
            minor = ".".join(python.split(".")[:2])
            if python.count(".") == 1 and floor and f"{floor.group(1)}.{floor.group(2)}" == minor:
                fix = (f"pip reads --python {python} as {python}.0: give the box's full version (python3 -V there), "
                       f"e.g. --python {_example(python)}")
            else:  # no patch of the box's Python takes the version pinned here: the pins must come from its Python
                import platform

                fix = (f"Python {python} cannot use it, and the pins come from the Python this runs on "
                       f"({platform.python_version()}): make the wheelhouse from a fastgal venv built with the box's "
                       f"Python (make venv PYTHON=python{minor} VENV=.venv{minor}, then .venv{minor}/bin/python "
                       "tools/wheelhouse.py ...)")
            return f"{name} {version} (the version installed here) requires Python {need.group(1)}; {fix}"
        return f"pip could not download {name} {version} for Python {python or '?'}: {last}"
    return f"{what or 'pip'} failed: {last}"


def _example(python: str) -> str:
    """A full version for the hint: this interpreter's where it is the same minor, else X.Y.<patch>."""
    import platform

    here = platform.python_version()
    return here if here.startswith(python + ".") else f"{python}.<patch>"


def download(specs: list[str], out: Path, python: str, platform: str) -> None:
    # pip takes --platform literally: the older manylinux2014 (glibc 2.17) tag too, which a glibc 2.28 box runs
    # (pyerfa, astropy's, ships only that)
    older = ["--platform", platform.replace("manylinux_2_28", "manylinux2014")] if "manylinux_2_28" in platform else []
    pip("download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version", python, "--platform", platform,
        *older, "--dest", str(out), *specs, python=python, what="downloading the wheels")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


JOIN = """#!/bin/sh
# Check each part, join them into dali.tar, check it, unpack DALI's wheels beside the others (in ..).
set -e
cd "$(dirname "$0")"
sha256sum -c SHA256SUMS
cat dali.tar.part-* > dali.tar
sha256sum -c dali.tar.sha256
tar -xf dali.tar -C ..
rm dali.tar
echo "DALI wheels unpacked into $(cd .. && pwd)"
"""


def pack_parts(wheels: list[Path], folder: Path, part_mib: int) -> list[dict]:
    """wheels -> folder/dali.tar.part-NN of part_mib MiB each (one uncompressed tar, cut), SHA256SUMS of the
    parts, dali.tar.sha256 of the whole and join.sh, which checks, joins and unpacks them."""
    folder.mkdir(parents=True, exist_ok=True)
    tar = folder / "dali.tar"
    with tarfile.open(tar, "w") as t:  # wheels are zips already: no compression
        for w in sorted(wheels):
            t.add(w, arcname=w.name)
    (folder / "dali.tar.sha256").write_text(f"{sha256(tar)}  dali.tar\n")
    parts, size = [], part_mib << 20
    with open(tar, "rb") as f:
        while block := f.read(size):
            part = folder / f"dali.tar.part-{len(parts):02d}"
            part.write_bytes(block)
            parts.append({"file": part.name, "bytes": len(block), "sha256": hashlib.sha256(block).hexdigest()})
    tar.unlink()
    (folder / "SHA256SUMS").write_text("".join(f"{p['sha256']}  {p['file']}\n" for p in parts))
    (folder / "join.sh").write_text(JOIN)
    (folder / "join.sh").chmod(0o755)
    return parts


def split_dali(flavour: str, out: Path, python: str, platform: str, part_mib: int) -> list[dict]:
    """DALI's stack (and its pure-Python requirements) downloaded, then packed into parts (pack_parts)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        download(DALI[flavour], tmp, python, platform)
        download(DALI_DEPS, tmp, python, platform)
        return pack_parts(list(tmp.glob("*.whl")), out / "dali", part_mib)


def main(argv=None) -> int:
    """The command; a user error or a pip failure is one line on stderr, `wheelhouse: ...` (exit 2 for a bad
    argument, as argparse's own, 1 otherwise), with OUT left as it was found."""
    try:
        return _main(argv)
    except Refused as e:
        print(f"wheelhouse: {e}", file=sys.stderr)
        return 2 if isinstance(e, BadArgument) else 1


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="folder for the wheels (created; must be empty or absent)")
    ap.add_argument("--python", default="3.12", help="the box's Python, major.minor[.patch] (3.12 means 3.12.0 to pip: "
                    "give the patch level where a wheel needs a later one) [3.12]")
    ap.add_argument("--platform", default="linux-x86_64", choices=sorted(PLATFORMS), help="the box's platform")
    ap.add_argument("--with-dali", choices=sorted(DALI), help="also DALI's stack for this CUDA major, in parts")
    ap.add_argument("--part-mib", type=int, default=60, help="size of each DALI part, MiB [60]")
    ap.add_argument("--with-fits", action="store_true", help="also astropy (FITS cutouts: synth, shard, predict on .fits)")
    ap.add_argument("--json", action="store_true", help="the result as JSON on stdout")
    a = ap.parse_args(argv)
    if a.out.exists() and (not a.out.is_dir() or any(a.out.iterdir())):
        raise BadArgument(f"{a.out} is not an empty folder: choose a new folder or empty it")
    if not re.fullmatch(r"3\.\d+(\.\d+)?", a.python):
        raise BadArgument(f"--python {a.python!r}: give major.minor[.patch], e.g. 3.12 or 3.12.3")
    platform = PLATFORMS[a.platform]
    need, box = plan(a.python, fits=a.with_fits)
    made = not a.out.exists()
    a.out.mkdir(parents=True, exist_ok=True)
    try:
        res = _build(a, need, box, platform)
    except BaseException:  # a failed download (or Ctrl-C) leaves OUT as it was found: absent, or empty
        if made:
            shutil.rmtree(a.out, ignore_errors=True)
        else:
            for p in a.out.iterdir():
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        raise
    if a.json:
        print(json.dumps(res, indent=1))
        return 0
    for w in res["wheels"]:
        print(f"{w['bytes'] / 2**20:8.2f} MiB  {w['file']}")
    print(f"{res['total_bytes'] / 2**20:8.2f} MiB  in {len(res['wheels'])} wheels for Python {a.python} ({platform}) in {a.out}")
    if a.with_dali:
        d = res["dali"]
        print(f"{d['total_bytes'] / 2**20:8.2f} MiB  DALI ({a.with_dali}) in {len(d['parts'])} parts of <= {a.part_mib} MiB "
              f"in {a.out}/dali; join and check them with: {d['join']}")
    print(f"install on the box: {res['install']}")
    return 0


def _build(a, need: dict[str, str], box: list[str], platform: str) -> dict:
    """fastgal's wheel, the others downloaded, DALI's parts: into a.out; the JSON-ready result."""
    with tempfile.TemporaryDirectory() as tmp:  # fastgal from a copy, so the build leaves nothing in the checkout
        src = Path(tmp) / "fastgal"
        anywhere = shutil.ignore_patterns(".git", "*.egg-info", "__pycache__")

        def ignore(folder, names):  # the checkout's own venv, build and data folders, not fastgal/shards/ (a subpackage)
            top = {".venv", "build", "shards", "runs", "demo", "data"} if Path(folder) == ROOT else set()
            return set(anywhere(folder, names)) | (top & set(names))

        shutil.copytree(ROOT, src, ignore=ignore)
        pip("wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir", str(a.out.resolve()), str(src),
            what="building fastgal's wheel")
    download([f"{n}=={v}" for n, v in need.items()], a.out, a.python, platform)
    wheels = sorted(a.out.glob("*.whl"))
    res = {"out": str(a.out), "python": a.python, "platform": platform, "box_has": box, "left_out": sorted(NEVER),
           "wheels": [{"file": w.name, "bytes": w.stat().st_size} for w in wheels],
           "total_bytes": sum(w.stat().st_size for w in wheels),
           "install": f"pip install --no-index --no-deps {a.out}/*.whl   (in a venv made with --system-site-packages)"}
    if a.with_dali:
        res["dali"] = {"flavour": a.with_dali, "parts": split_dali(a.with_dali, a.out, a.python, platform, a.part_mib),
                       "join": f"sh {a.out}/dali/join.sh"}
        res["dali"]["total_bytes"] = sum(p["bytes"] for p in res["dali"]["parts"])
    return res


if __name__ == "__main__":
    sys.exit(main())
