"""tools/gpu_check.py --dry-run on a simulated torch-only box: every step of the GPU check runs on the CPU at tiny
sizes where the GPU machines' software is (issue 18), so the script cannot rot between the rare runs on one.

The box: a fresh venv holding only what such GPU machines have (tools/wheelhouse.BOX and what those need, linked
in from this venv rather than installed again: torch alone is 5 GB), plus tools/wheelhouse.py's wheels installed
the way the README says (`pip install --no-index --no-deps`). No fastai, webdataset or DALI until then, and no
index. The suite's one dry run runs there, DALI's parts reported as skipped; DALI's side of what the check
measures is tested on its own (tests/test_bench_equality.py, tests/test_loaders.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from collections import defaultdict
from importlib.metadata import distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import wheelhouse  # noqa: E402

TOOL = Path(__file__).resolve().parents[1] / "tools" / "gpu_check.py"
STEPS = ["env", "data", "recipe", "bench", "predict", "peer", "decode", "equality", "short"]


def steps_of(out: Path) -> dict[str, dict]:
    """Each step's record as the results folder carries it (OUT/steps.tar.gz), by name."""
    import tarfile

    with tarfile.open(out / "steps.tar.gz") as tar:
        recs = [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.startswith("steps/")]
        logs = [m.name for m in tar.getmembers() if m.name.startswith("logs/")]
    assert logs  # the logs travel with the records
    return {r["name"]: r for r in recs}


def _owners(site: Path) -> dict[tuple[str, ...], set[str]]:
    """Every path prefix (1 or 2 components) under site-packages -> the distributions with files there."""
    own = defaultdict(set)
    for d in distributions(path=[str(site)]):
        name = wheelhouse.norm(d.metadata["Name"])
        for f in d.files or []:
            parts = Path(f).parts
            if parts and parts[0] != ".." and not parts[0].startswith("__pycache__"):
                own[parts[:1]].add(name)
                if len(parts) > 2:
                    own[parts[:2]].add(name)
    return own


def box_venv(where: Path, have: set[str]) -> Path:
    """A venv whose site-packages links to this venv's files of the distributions in `have` only. A top-level
    folder shared with other distributions (namespace packages: nvidia/, cuda/) is made real and linked one
    level down, so that nvidia/dali (not on the box) stays out."""
    venv.EnvBuilder(with_pip=False, symlinks=True).create(where)
    src = Path(next(p for p in sys.path if p.endswith("site-packages")))
    dst = next((where / "lib").glob("python3*/site-packages"))
    own = _owners(src)
    for key, names in own.items():
        if len(key) != 1 or not names & have:
            continue
        if names <= have:
            (dst / key[0]).symlink_to(src / key[0])
            continue
        (dst / key[0]).mkdir(exist_ok=True)
        for sub, subnames in own.items():
            if len(sub) == 2 and sub[0] == key[0] and subnames <= have:
                (dst / sub[0] / sub[1]).symlink_to(src / sub[0] / sub[1])
    return where / "bin" / "python"


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    """The wheelhouse for this Python, the box, then ONE `gpu_check.py OUT --dry-run` there for the module's tests:
    (OUT, the process, summary.json, the records, the wheelhouse's JSON)."""
    import platform

    tmp = tmp_path_factory.mktemp("box")
    wh = tmp / "wheels"
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "wheelhouse.py"), str(wh), "--python",
                          platform.python_version(), "--json"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    house = json.loads(res.stdout)
    py = box_venv(tmp / "box", set(wheelhouse.closure(wheelhouse.BOX)))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "FASTGAL_NO_DALI")}
    probe = ("import importlib.util as u; print([m for m in ('torch', 'fastai', 'webdataset', 'nvidia.dali') "
             "if u.find_spec(m.split('.')[0]) and (m != 'nvidia.dali' or u.find_spec(m))])")
    before = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, env=env, cwd=tmp, timeout=120)
    assert before.stdout.strip() == "['torch']", before.stdout + before.stderr  # a box: torch, nothing of ours
    inst = subprocess.run([str(py), "-m", "pip", "--version"], capture_output=True, text=True, env=env)
    pip = [str(py), "-m", "pip"] if inst.returncode == 0 else [sys.executable, "-m", "pip", "--python", str(py)]
    subprocess.run([*pip, "install", "--quiet", "--no-index", "--no-deps", *map(str, sorted(wh.glob("*.whl")))],
                   check=True, env=env, timeout=600)
    out = tmp / "check"
    res = subprocess.run([str(py), str(TOOL), str(out), "--dry-run"], capture_output=True, text=True, env=env, cwd=tmp,
                         timeout=3000)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    return out, res, json.loads((out / "summary.json").read_text()), steps_of(out), house


@pytest.mark.slow
def test_the_wheelhouse_is_what_the_box_lacks(dry):
    house = dry[4]
    names = {w["file"].split("-")[0].lower() for w in house["wheels"]}
    assert {"fastgal", "fastai", "webdataset", "braceexpand"} <= names
    assert not names & {"torch", "torchvision", "numpy", "nvidia_dali_cuda120", "spacy"}  # the box has them, or never needs them
    assert house["total_bytes"] <= 32 * 2**20, house["total_bytes"]  # the goal: <= 32 MiB without DALI


@pytest.mark.slow
def test_dry_run_every_step_and_three_files(dry):
    out, res, summary, recs, _ = dry
    assert sorted(p.name for p in out.iterdir()) == ["steps.tar.gz", "summary.json", "summary.txt"]  # results only
    assert (out.with_name("check-work") / "shards" / "manifest.json").is_file()  # the bulk lives beside OUT
    assert [s["name"] for s in summary["steps"]] == STEPS and summary["ok"] and summary["dry_run"] and summary["finished"]
    assert set(recs) == set(STEPS)
    # the DALI-only steps say why (equality: on a CPU without DALI nothing is left to compare); every other answers
    assert {n: r["verdict"] for n, r in recs.items() if r["verdict"] != "ok"} == {"peer": "skipped", "equality": "skipped"}
    assert "DALI not installed" in recs["peer"]["reason"] and "DALI is not importable" in recs["equality"]["reason"]
    table = res.stdout.splitlines()
    for k, name in enumerate(STEPS):  # the table: a row per step, its verdict and headline
        assert table[k + 1].startswith(f"{k} {name}") and recs[name]["verdict"] in table[k + 1]


@pytest.mark.slow
def test_dry_run_headlines(dry):
    _, res, summary, _, _ = dry
    heads = {s["name"]: s["headline"] for s in summary["steps"]}
    assert all(h and not h.startswith("(no headline") for h in heads.values()), heads
    assert heads["env"].startswith("torch ") and "DALI" in heads["env"]
    assert heads["data"].startswith("synth ") and "shard " in heads["data"]
    assert "seed job (7 x 130k) projected" in heads["recipe"] and "RMSE" in heads["recipe"]
    assert "e2e x fastai" in heads["bench"] and "--compile-mode reduce-overhead" in heads["bench"]
    assert "dex" in heads["predict"] and "torch_cpu" in heads["decode"]
    assert "comparisons ok" not in heads["equality"]
    assert "dali skipped: NVIDIA DALI is not importable" in heads["decode"]
    assert "losses finite" in heads["short"]
    assert all(h in res.stdout for h in heads.values())


@pytest.mark.slow
def test_dry_run_measures(dry):
    """What the steps measured, not only that they ran."""
    _, _, _, recs, _ = dry
    env = recs["env"]["result"]["env"]
    assert env["dali"]["importable"] is False and env["fastai"]
    data = recs["data"]["result"]
    assert data["shard"]["train"] + data["shard"]["valid"] == 80 and data["shard"]["rejected"] == 0
    dec = recs["decode"]["result"]
    assert dec["torch_decoder"] == "torchvision" and dec["results"]["torch_cpu"]["images_per_s"] > 0
    assert "dali_cpu" not in dec["results"] and dec["skipped"] == {"dali": "NVIDIA DALI is not importable here"}
    recipe = recs["recipe"]["result"]
    assert recipe["loader_backend"] == "torch"  # --loader auto on a CPU (on a GPU: dali, or torch without DALI)
    [epoch] = recipe["per_epoch"]
    assert epoch["train_images_per_s"] > 0 and epoch["valid_images_per_s"] > 0 and epoch["checkpoint_seconds"] > 0
    assert epoch["peak_gpu_memory_gib"] is None and recipe["peak_gpu_memory_gib"] is None  # no GPU columns on a CPU
    assert recipe["model_images_per_s"] > 0 and recipe["data_bound_fraction"] > 0
    job = recipe["seed_job"]
    assert job["galaxies"] == 130_000 and job["projected_minutes"] > 0 and job["seed_minutes_p100"] == 13.6
    assert job["speedup_vs_seed"] == pytest.approx(13.6 * 60 / job["projected_seconds"], rel=0.02, abs=0.006)  # 2 decimals
    assert recipe["metrics"]["baseline_rmse"] > 0
    pred = recs["predict"]["result"]
    assert pred["n_jpegs"] == 16 and pred["valid_vs_predictions_valid_max_abs_dex"] <= 0.02
    bench = recs["bench"]["result"]
    assert set(bench["bench"]["sections"]) == {"step", "model", "loaders", "e2e"}
    comp = bench["compile"]  # eager and compiled in one process; on a CPU no CUDA graphs
    assert comp["mode"] == "reduce-overhead" and comp["cuda_graphs"] is False
    assert comp["eager_images_per_s"] > 0 and comp["compiled_images_per_s"] > 0 and comp["first_step_seconds"] > 0
    assert comp["compiled_x_eager"] == pytest.approx(comp["compiled_images_per_s"] / comp["eager_images_per_s"], rel=0.01)
    assert recs["short"]["result"]["fp32_epoch"]["epochs"] == 1


def test_the_timeouts_fit_the_budget(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", TOOL)
    tool = sys.modules["gpu_check"] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
    spec.loader.exec_module(tool)
    timeouts = {s.name: s.timeout for s in tool.STEPS}
    assert sum(timeouts.values()) <= tool.Params().budget <= 330 and list(timeouts) == STEPS
    res = subprocess.run([sys.executable, str(TOOL), str(tmp_path / "c"), "--timeout", "recipe=400"],
                         capture_output=True, text=True, timeout=300)
    total = sum(timeouts.values()) - timeouts["recipe"] + 400
    assert res.returncode == 2 and f"sum to {total} s, more than --budget 330 s" in res.stderr


# the tool with its env step's command replaced by one that never ends: only the step's timeout ends it,
# however fast or loaded the machine
HANGING_ENV = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("gpu_check", sys.argv[1])
tool = sys.modules["gpu_check"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)
def never_ends(ctx):
    ctx([sys.executable, "-c", "import time; time.sleep(3600)"], "a command that never ends")
tool.STEPS[0].run = never_ends
sys.exit(tool.main(sys.argv[2:]))
"""


def test_a_failing_step_leaves_the_others(tmp_path):
    """A step that times out or cannot find what it needs is reported with its reason; the check goes on and
    says FAILED."""
    out = tmp_path / "check"
    res = subprocess.run([sys.executable, "-c", HANGING_ENV, str(TOOL), str(out), "--dry-run", "--steps", "env,predict",
                          "--timeout", "env=0.5"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "FAILED" in res.stdout
    recs = {r["name"]: r for r in json.loads((out / "summary.json").read_text())["steps"]}
    assert recs["env"]["verdict"] == "timeout", recs["env"]
    assert recs["env"]["reason"].startswith("a command that never ends still running at the step's timeout")
    assert recs["predict"]["verdict"] == "skipped" and "the data step's shards" in recs["predict"]["reason"]
    assert recs["recipe"]["verdict"] == "skipped" and recs["recipe"]["reason"] == "not in --steps"
    assert set(steps_of(out)) == set(STEPS)


def test_the_work_folder_may_not_be_inside_the_results(tmp_path):
    res = subprocess.run([sys.executable, str(TOOL), str(tmp_path / "c"), "--dry-run", "--work", str(tmp_path / "c" / "w")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "must not be OUT or inside it" in res.stderr and not (tmp_path / "c").exists()


@pytest.mark.slow
def test_a_bench_step_that_times_out_says_how_far_it_got(tmp_path):
    """Compiling the recipe's model may outlast its estimate on the first GPU: a command that times out is
    reported with the last line it wrote, or says there was none. The step gets SIGTERM before SIGKILL, so
    the bench removes its temp folder."""
    out, tmp = tmp_path / "check", tmp_path / "tmp"
    tmp.mkdir()
    # a cold compile, as on a fresh GPU box
    env = {**os.environ, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1", "TMPDIR": str(tmp)}
    res = subprocess.run([sys.executable, str(TOOL), str(out), "--dry-run", "--steps", "data,bench",
                          "--timeout", "bench=10"], capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 1 and "FAILED" in res.stdout, res.stdout + res.stderr[-2000:]
    rec = steps_of(out)["bench"]
    assert rec["verdict"] == "timeout" and "still running at the step's timeout; its last line: " in rec["reason"], rec
    assert not list(tmp.glob("fastgal-*")), sorted(tmp.glob("*"))
