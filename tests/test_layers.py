"""The folder tree is the architecture: import-linter's contracts (pyproject.toml [tool.importlinter]) hold.

    lint-imports            # from the repo root, what this test runs
"""
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def lint(cwd: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    return subprocess.run([exe, "--no-cache"], cwd=cwd, capture_output=True, text=True,
                          env={"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(cwd)})


def test_imports_flow_one_way():
    res = lint(ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "0 broken" in res.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    """The contract can fail: a shard-format module that imports the training layer is reported."""
    shutil.copytree(ROOT / "fastgal", tmp_path / "fastgal", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    idx = tmp_path / "fastgal" / "shards" / "index.py"
    idx.write_text(idx.read_text() + "\nfrom fastgal.train import model  # noqa\n")
    res = lint(tmp_path)
    assert res.returncode != 0
    assert "fastgal.shards.index -> fastgal.train.model" in res.stdout
