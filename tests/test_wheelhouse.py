"""tools/wheelhouse.py (issue 18); tests/test_gpu_check.py builds the simulated torch-only box with it.

The box: a fresh venv holding only what such GPU machines have (tools/wheelhouse.BOX and what those need,
linked in from this venv rather than installed again: torch alone is 5 GB), plus the wheelhouse installed
the way the README says (`pip install --no-index --no-deps`). No fastai, webdataset or DALI until then, and
no index. `tools/gpu_check.py --dry-run` must run green there, DALI's parts reported as skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import wheelhouse  # noqa: E402


def test_dali_parts_join_back_and_refuse_a_damaged_part(tmp_path):
    """--with-dali's packing, on stand-in wheels (the real ones are ~250 MB): parts of the asked size, each
    with its sha256; join.sh restores the wheels byte for byte, and stops on a damaged part."""
    import shutil

    src = tmp_path / "src"
    src.mkdir()
    blobs = {f"nvidia_fake_{i}-1.0-py3-none-manylinux_2_28_x86_64.whl": os.urandom(700_000 + i) for i in range(4)}
    for name, data in blobs.items():
        (src / name).write_bytes(data)
    parts = wheelhouse.pack_parts(sorted(src.glob("*.whl")), tmp_path / "house" / "dali", part_mib=1)
    assert len(parts) == 3 and all(p["bytes"] <= 2**20 for p in parts)
    good = tmp_path / "copy"
    shutil.copytree(tmp_path / "house", good)
    res = subprocess.run(["sh", str(good / "dali" / "join.sh")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert {p.name: p.read_bytes() for p in good.glob("*.whl")} == blobs
    part = tmp_path / "house" / "dali" / "dali.tar.part-01"
    damaged = bytearray(part.read_bytes())
    damaged[-1] ^= 0xFF  # one flipped byte
    part.write_bytes(bytes(damaged))
    res = subprocess.run(["sh", str(tmp_path / "house" / "dali" / "join.sh")], capture_output=True, text=True)
    assert res.returncode != 0 and "FAILED" in res.stdout + res.stderr and not list((tmp_path / "house").glob("*.whl"))


def test_wheelhouse_user_errors(tmp_path):
    """A non-empty OUT and a --python that is not major.minor[.patch] are refused before any download, in one line."""
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.whl").write_bytes(b"")
    for argv, needle in (([str(tmp_path / "full")], f"wheelhouse: {tmp_path / 'full'} is not an empty folder"),
                         ([str(tmp_path / "o"), "--python", "3"], "wheelhouse: --python '3': give major.minor")):
        res = subprocess.run([sys.executable, str(ROOT / "tools" / "wheelhouse.py"), *argv], capture_output=True, text=True)
        assert res.returncode == 2 and res.stderr.startswith(needle) and res.stderr.count("\n") == 1, res.stderr
        assert res.stdout == ""
    assert not (tmp_path / "o").exists() and [p.name for p in (tmp_path / "full").iterdir()] == ["x.whl"]


def _index(root: Path, need: dict[str, str], requires: dict[str, str] | None = None, leave_out=()) -> dict:
    """A PEP 503 index of stand-in wheels (valid, empty) for `need` (name -> version), offline; requires: name ->
    Requires-Python, as PyPI states it (data-requires-python); `leave_out`: names the index lacks. The env
    that points pip at it alone (this machine's pip config and find-links ignored)."""
    import zipfile

    requires = requires or {}
    (root / "files").mkdir(parents=True)
    for name, version in need.items():
        if name in leave_out:
            continue
        dist = f"{name.replace('-', '_')}-{version}"
        whl = root / "files" / f"{dist}-py3-none-any.whl"
        rp = f"Requires-Python: {requires[name]}\n" if name in requires else ""
        with zipfile.ZipFile(whl, "w") as z:
            z.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n{rp}")
            z.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
            z.writestr(f"{dist}.dist-info/RECORD", "")
        page = root / "simple" / wheelhouse.norm(name)
        page.mkdir(parents=True)
        attr = f' data-requires-python="{requires[name].replace(">", "&gt;").replace("<", "&lt;")}"' if name in requires else ""
        (page / "index.html").write_text(f'<html><body><a href="../../files/{whl.name}"{attr}>{whl.name}</a></body></html>')
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": (root / "simple").as_uri(),
            "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def _wheelhouse(*argv, env):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "wheelhouse.py"), *map(str, argv)], capture_output=True,
                          text=True, env=env, timeout=600)


def test_a_python_without_its_patch_level_is_one_line_naming_the_fix(tmp_path):
    """Issue 29: pip reads --python 3.11 as 3.11.0, below a wheel's Requires-Python >=3.11.5; that was a
    CalledProcessError traceback. Now one line naming the package and the fix, and OUT is not left half full;
    the fix (the full version) then works. Offline: pip reads a local index of stand-in wheels."""
    need, _ = wheelhouse.plan("3.11")
    first = next(iter(need))
    env = _index(tmp_path / "index", need, requires={first: ">=3.11.5"})
    out = tmp_path / "wheels"
    res = _wheelhouse(out, "--python", "3.11", env=env)
    assert res.returncode == 1 and "Traceback" not in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith(f"wheelhouse: {first} {need[first]} (the version installed here) requires Python >=3.11.5; "
                                 "pip reads --python 3.11 as 3.11.0: give the box's full version"), res.stderr
    assert res.stdout == "" and not out.exists()  # no half-made wheelhouse to trip the next try ("not empty")
    ok = _wheelhouse(out, "--python", "3.11.7", "--json", env=env)
    assert ok.returncode == 0, ok.stderr[-2000:]
    got = {w["file"].split("-")[0] for w in json.loads(ok.stdout)["wheels"]}
    assert got == {"fastgal"} | {n.replace("-", "_") for n in need}


def test_a_pip_failure_is_one_line_naming_the_package(tmp_path):
    """A wheel pip cannot get: one line with the package and pip's last error line; an empty OUT stays empty."""
    need, _ = wheelhouse.plan("3.12")
    gone = sorted(need)[-1]
    env = _index(tmp_path / "index", need, leave_out={gone})
    out = tmp_path / "wheels"
    out.mkdir()
    res = _wheelhouse(out, "--python", "3.12", env=env)
    assert res.returncode == 1 and "Traceback" not in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith(f"wheelhouse: pip could not download {gone} {need[gone]} for Python 3.12: "
                                 f"No matching distribution found for {gone}=={need[gone]}"), res.stderr
    assert out.is_dir() and not list(out.iterdir())


def test_pip_failure_reads_pip_s_own_words():
    """The one line from pip's output as pip 26 prints it (captured from a real --python 3.11 run)."""
    said = ("WARNING: Location 'file:///opt/pypi/simple/rich/' is ignored: it is neither a file nor a directory.\n"
            "ERROR: Ignored the following yanked versions: 3.0, 3.0.1\n"
            "ERROR: Ignored the following versions that require a different python version: 0.0.0 Requires-Python "
            ">=3.14; 3.0.2 Requires-Python >=3.11.5; 4.1.4 Requires-Python >=3.11.5\n"
            "ERROR: Could not find a version that satisfies the requirement soupsieve==4.1.4 (from versions: 0.4, 2.10)\n"
            "ERROR: No matching distribution found for soupsieve==4.1.4\n")
    line = wheelhouse.pip_failure(said, "3.11")
    assert line.startswith("soupsieve 4.1.4 (the version installed here) requires Python >=3.11.5; pip reads "
                           "--python 3.11 as 3.11.0: give the box's full version") and "\n" not in line
    assert "cannot use it" in wheelhouse.pip_failure(said, "3.11.2")
    # issue 33: a whole minor version below the pin (3.10 for >=3.11.5): no --python 3.10.x helps, and the line
    # does not tell a user already in fastgal's venv to run from it; it names the venv to build instead
    older = wheelhouse.pip_failure(said, "3.10")
    assert "pip reads" not in older and "make venv PYTHON=python3.10 VENV=.venv3.10" in older, older
    assert wheelhouse.pip_failure("Building...\nERROR: Failed building wheel for fastgal\n", "3.12",
                                  "building fastgal's wheel") == "building fastgal's wheel failed: Failed building wheel for fastgal"


def test_astropy_only_with_fits():
    """FITS shards hold raw arrays: a box that trains never needs astropy, so it joins the wheels only when asked."""
    plain, box = wheelhouse.plan("3.12")
    fits, _ = wheelhouse.plan("3.12", fits=True)
    assert "astropy" not in plain and "pyerfa" not in plain
    assert {"astropy", "pyerfa"} <= set(fits) and set(plain) <= set(fits) and "numpy" in box
