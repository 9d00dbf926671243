"""Shared fixtures: tiny synthetic surveys made once per session through the real CLI.

`make test` runs the suite, then the tests marked `nodali` again with FASTGAL_NO_DALI=1, which makes
`import nvidia.dali` fail here and in every subprocess, as on a machine without DALI. Tests marked `dali`
need DALI and skip where it is missing (with the reason); every test must pass both ways.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

NO_DALI = os.environ.get("FASTGAL_NO_DALI", "") not in ("", "0")
if NO_DALI:
    _block = str(Path(__file__).with_name("nodali"))
    sys.path.insert(0, _block)
    os.environ["PYTHONPATH"] = os.pathsep.join([_block, *filter(None, [os.environ.get("PYTHONPATH")])])

import torch  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from fastai.data.core import DataLoaders  # noqa: E402
from fastai.data.load import DataLoader  # noqa: E402

from fastgal.cli import cli  # noqa: E402


def dali_importable() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def pytest_collection_modifyitems(config, items):
    if dali_importable():
        return
    why = "needs NVIDIA DALI, which is blocked (FASTGAL_NO_DALI=1) or not installed"
    for item in items:
        if "dali" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=why))


# What this process may keep mapped between tests. The suite peaks at ~2.6 GiB of private writable mappings;
# a DALI reader with a 16k shuffle buffer maps 15 GiB, not always freed with its pipeline, and past ~24 GiB
# every later fork() fails with ENOMEM under the kernel's heuristic overcommit (CI, 2026-11-29).
MAPPED_LIMIT_GIB = 8.0


def private_writable_gib() -> float | None:
    """This process's private writable mappings (what fork() must be able to commit), or None off Linux."""
    try:
        with open("/proc/self/maps") as f:
            lines = f.readlines()
    except OSError:
        return None
    total = 0
    for line in lines:  # "start-end perms offset dev inode path"
        span, perms = line.split(None, 2)[:2]
        if perms[:2] == "rw" and perms[3] == "p":
            start, end = span.split("-")
            total += int(end, 16) - int(start, 16)
    return total / 2**30


@pytest.fixture(autouse=True)
def leaves_no_big_mappings():
    """Fail the test that leaves this process holding more than MAPPED_LIMIT_GIB (after a collection, so only
    what is still referenced counts): the tests after it would fail to fork, far from the cause."""
    yield
    gib = private_writable_gib()
    if gib is not None and gib > MAPPED_LIMIT_GIB:
        import gc

        gc.collect()
        gib = private_writable_gib()
        assert gib <= MAPPED_LIMIT_GIB, (
            f"this test left {gib:.1f} GiB of private writable mappings in the test process (limit "
            f"{MAPPED_LIMIT_GIB} GiB): something it built is still referenced, or not yet freed (a DALI reader's buffers "
            f"can outlive its pipeline); release it, or keep its buffers small")


@pytest.fixture(scope="session", autouse=True)
def own_cache_dir(tmp_path_factory):
    """fastgal's user cache (util.user_cache_dir: the shards' sha256s) in the session's temp folder, for this
    process and every subprocess it starts: never the user's ~/.cache."""
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))
    yield Path(os.environ["XDG_CACHE_HOME"]) / "fastgal"
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


def run_cli(*args, ok: bool = True):
    """Invoke the fastgal CLI in-process, as a user would, and check the exit code."""
    res = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert res.exit_code == 0, res.output
    return res


@pytest.fixture(scope="session")
def survey(tmp_path_factory):
    """A 300-galaxy synthetic survey (seed 1), shared read-only by the tests."""
    out = tmp_path_factory.mktemp("survey") / "s"
    run_cli("synth", out, "--n", 300, "--seed", 1, "--quiet")
    return out


@pytest.fixture(scope="session")
def survey_shards(survey, tmp_path_factory):
    """The 300-galaxy survey sharded with the defaults but 100 samples per tar (train: 3 tars), 2 workers."""
    out = tmp_path_factory.mktemp("shards") / "out"
    run_cli("shard", survey / "data" / "master.csv", survey / "images", out, "--shard-size", 100, "--workers", 2, "--quiet")
    return out


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory):
    """A 260-galaxy survey at half resolution (112 px, crop 72 -> 56), two targets, several shards."""
    root = tmp_path_factory.mktemp("train")
    run_cli("synth", root / "s", "--n", 260, "--seed", 11, "--size", 112, "--quiet")
    run_cli("shard", root / "s/data/master.csv", root / "s/images", root / "sh", "--crop", 72,
            "--target", "metallicity", "--target", "lgm_tot_p50", "--shard-size", 120, "--quiet")
    return root / "sh"


# the suite's one whole training run: what test_train checks of a run folder, and what predict, the API, the
# heads and --compile/--resume are compared with
SMALL_RUN = ("--epochs", 2, "--bs", 32, "--arch", "xresnet18", "--size", 56, "--tta", "--lr-find", "--lr-find-iters", 6,
             "--workers", 1, "--quiet")


# the suite's one multi-process run: torchrun, 2 CPU processes (gloo) on small_shards; what test_train checks of
# DDP, and what test_stage's two-node run (shards over HTTP, the Slurm script) must equal
DDP_RUN = ("--epochs", 1, "--bs", 32, "--arch", "xresnet18", "--size", 56, "--workers", 1, "--tta", "--quiet", "--json")


@pytest.fixture(scope="session")
def ddp_run(small_shards, tmp_path_factory):
    """`torchrun --nproc_per_node 2 -m fastgal train small_shards DDP_RUN`: (the run folder, the process's result)."""
    import subprocess
    from types import SimpleNamespace

    root = tmp_path_factory.mktemp("ddp")
    (root / "tmp").mkdir()
    env = {**os.environ, "TMPDIR": str(root / "tmp"), "OMP_NUM_THREADS": "1"}  # torchelastic_* out of /tmp
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "fastgal",
                           "train", str(small_shards), "--out", str(root / "ddp"), *map(str, DDP_RUN)],
                          capture_output=True, text=True, env=env, timeout=600)
    return SimpleNamespace(path=root / "ddp", proc=proc)


@pytest.fixture(scope="session")
def made_run(small_shards, tmp_path_factory):
    """Two epochs on small_shards (xresnet18 at 56 px, lr_find, TTA), made in-process under umask 027 while
    counting how often the manifest and each index file are read: (path, reads, output)."""
    from types import SimpleNamespace

    import fastgal.shards.read as read

    run = tmp_path_factory.mktemp("run") / "r"
    reads = {"manifest": 0, "index": []}
    real_manifest, real_index = read.load_manifest, read.read_index
    mp = pytest.MonkeyPatch()
    mp.setattr(read, "load_manifest", lambda f: reads.__setitem__("manifest", reads["manifest"] + 1) or real_manifest(f))
    mp.setattr(read, "read_index", lambda p: reads["index"].append(Path(p).name) or real_index(p))
    old = os.umask(0o027)  # files must get the umask's modes like a plain write, not mkstemp's 0600
    try:
        res = run_cli("train", small_shards, "--out", run, *SMALL_RUN)
    finally:
        os.umask(old)
        mp.undo()
    return SimpleNamespace(path=run, reads=reads, output=res.output)


@pytest.fixture(scope="session")
def small_run(made_run):
    """The run folder of made_run."""
    return made_run.path


@pytest.fixture(scope="session")
def fits_survey(tmp_path_factory):
    """A 120-galaxy survey of ugriz FITS cutouts at half resolution (s/) and its float shards (sh/: crop 72,
    50 samples per tar); test_fits.py's fits_run trains into r/ beside them."""
    root = tmp_path_factory.mktemp("fitsrun")
    run_cli("synth", root / "s", "--n", 120, "--seed", 4, "--size", 112, "--format", "fits", "--bands", "ugriz", "--quiet")
    run_cli("shard", root / "s/data/master.csv", root / "s/images", root / "sh", "--crop", 72, "--shard-size", 50, "--quiet")
    return root


# bench's smallest windows, for the tests that read what it reports, never how fast
BENCH_TINY = ("--size", 56, "--arch", "xresnet18", "--batches", 2, "--warmup", 1, "--repeats", 1, "--bs", 16,
              "--workers", 1, "--quiet")


@pytest.fixture(scope="session")
def bench_all(small_shards):
    """`fastgal bench --what all --json` once on small_shards (the shuffle section over 3 epochs of 2 simulated
    ranks): test_bench, test_bench_shuffle, test_bench_step and test_bench_equality read its sections."""
    import json

    return json.loads(run_cli("bench", small_shards, "--what", "all", "--json", *BENCH_TINY, "--epochs", 3,
                              "--ranks", 2).stdout)  # stdout only: warnings go to stderr


def tiny_regression(n=80, bs=8, seed=0):
    """A tiny regression (80 samples of 3x8x8, 10 steps per epoch), in a fixed order."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = x.mean((1, 2, 3))[:, None] * 3 + 0.1 * torch.randn(n, 1, generator=g)
    items = list(zip(x, y))
    return DataLoaders(DataLoader(items[:n], bs=bs, shuffle=False), DataLoader(items[:16], bs=bs, shuffle=False))


def stderr_on_a_terminal(cmd: list[str]) -> tuple[int, str]:
    """Run cmd with stderr on a pseudo-terminal (stdout a pipe); its exit status and what the terminal got."""
    import pty
    import subprocess
    import threading

    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    got: list[bytes] = []

    def read():
        while True:
            try:
                b = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                return
            if not b:
                return
            got.append(b)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    proc.communicate(timeout=900)
    t.join(timeout=30)
    os.close(master)
    return proc.returncode, b"".join(got).decode(errors="replace")
