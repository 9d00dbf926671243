"""Issue #33, nothing silently lost or wrong at the edges: an output folder belongs to one command
(util.OutLock, OUT/.fastgal.lock), and shards are checked against their manifest's sha256s before they
train or predict (Shards.check_sha256, once per file through util.HashCache)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_cli

from fastgal.util import LOCK_NAME, _proc_start

TINY = ("--epochs", 1, "--bs", 32, "--arch", "xresnet18", "--size", 32, "--workers", 1, "--quiet")


def _lock(folder: Path, pid: int, command: str = "fastgal shard", **extra) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    lock.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "2026-01-01 00:00:00 +0000",
                                "command": command, "pid_start": _proc_start(pid), **extra}))
    return lock


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.slow
def test_two_trains_into_one_folder(small_shards, tmp_path):
    """The second of two trains started at once into one --out is refused in one line naming the first (its pid);
    the first finishes with its own config.json, metrics.json and model, and leaves no lock behind."""
    run = tmp_path / "rc3"
    first = subprocess.Popen([sys.executable, "-m", "fastgal", "train", str(small_shards), "--out", str(run),
                              *map(str, TINY), "--seed", "7", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        for _ in range(1200):  # until the first holds the folder (its imports take seconds)
            if (run / LOCK_NAME).exists() or first.poll() is not None:
                break
            time.sleep(0.05)
        assert (run / LOCK_NAME).exists(), first.communicate()
        second = run_cli("train", small_shards, "--out", run, *TINY, "--seed", 8, ok=False)
        out, err = first.communicate(timeout=600)
    finally:
        first.kill()
    assert second.exit_code == 1 and len(second.output.strip().splitlines()) == 1, second.output
    assert f"is in use by `fastgal train` (pid {first.pid} on {socket.gethostname()}, started " in second.output
    assert "wait for it to finish" in second.output and "choose another folder" in second.output
    assert first.returncode == 0, err[-3000:]
    cfg, m = json.loads((run / "config.json").read_text()), json.loads((run / "metrics.json").read_text())
    assert cfg["seed"] == 7 and m == json.loads(out)  # the first's run, and only its: the files agree
    assert m["n_train"] == cfg["n_train"] and m["epochs"] == cfg["epochs"] == 1
    assert (run / "model.pt").is_file() and not (run / LOCK_NAME).exists()
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]


def test_a_stale_lock_is_taken_over(tmp_path):
    """A lock left by a killed command (its pid no longer runs, or is now another process's) is taken over, with a
    line saying so; the lock is gone when the command has finished."""
    out = tmp_path / "s"
    _lock(out, _dead_pid(), "fastgal synth")
    res = run_cli("synth", out, "--n", 20, "--size", 64)
    assert "took over" in res.stderr and "which is no longer running" in res.stderr, res.stderr
    assert (out / "synth.json").is_file() and not (out / LOCK_NAME).exists()
    # a live pid that is not the process that wrote the lock (the pid was reused): stale too
    _lock(out, os.getpid(), "fastgal synth", pid_start="1")
    run_cli("synth", out, "--n", 20, "--size", 64, "--overwrite", "--quiet")
    assert not (out / LOCK_NAME).exists()


def test_a_live_lock_refuses_shard_synth_and_download(survey, small_shards, tmp_path):
    """A folder held by a running command: shard, synth, download and demo into it are refused in one line naming the
    holder and write nothing, whatever the folder holds (with --overwrite too); `fastgal info` and train say shards
    are being written; a lock from another host is refused with the file to delete."""
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        sh, s, d = tmp_path / "sh", tmp_path / "s", tmp_path / "d"
        for folder in (sh, s, d):
            _lock(folder, holder.pid)
        dm = tmp_path / "dm"
        _lock(dm, holder.pid)
        cmds = {sh: ("shard", survey / "data" / "master.csv", survey / "images", sh),
                s: ("synth", s, "--n", 20, "--size", 64),
                dm: ("demo", "--out", dm, "--n", 20, "--overwrite"),  # --overwrite would remove its stages' folders
                d: ("download", d, "--catalog", survey / "data" / "master.csv", "--base-url", "http://127.0.0.1:9")}
        for folder, cmd in cmds.items():
            res = run_cli(*cmd, ok=False)
            assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1, res.output
            assert f"{folder} is in use by `fastgal shard` (pid {holder.pid} on {socket.gethostname()}" in res.output
            assert f"(kill {holder.pid})" in res.output
            assert [p.name for p in folder.iterdir()] == [LOCK_NAME]  # nothing written, the holder's lock kept
        res = run_cli("info", sh, ok=False)
        assert res.exit_code == 1 and f"is being written by `fastgal shard` (pid {holder.pid}" in res.output
        res = run_cli("train", sh, "--out", tmp_path / "r", ok=False)  # not yet, or no longer, finished shards
        assert res.exit_code == 1 and "wait for it to finish" in res.output and not (tmp_path / "r").exists()
        # what a held folder holds is the holder's work in progress: "in use", not "already holds a run"
        run = tmp_path / "run"
        _lock(run, holder.pid, "fastgal train")
        (run / "config.json").write_text("{}")
        (run / "checkpoint.pth").write_bytes(b"")
        for extra in ((), ("--resume",), ("--overwrite",)):
            res = run_cli("train", small_shards, "--out", run, *extra, ok=False)
            assert f"{run} is in use by `fastgal train` (pid {holder.pid}" in res.output, res.output
        (s / "synth.json").write_text("{}")
        res = run_cli("synth", s, "--n", 20, "--size", 64, "--overwrite", ok=False)
        assert f"{s} is in use by `fastgal shard` (pid {holder.pid}" in res.output and (s / "synth.json").exists()
    finally:
        holder.kill()
        holder.wait()
    (sh / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "x", "command": "fastgal shard"}))
    res = run_cli("shard", survey / "data" / "master.csv", survey / "images", sh, ok=False)
    assert f"no longer running on elsewhere, delete {sh / LOCK_NAME} and run again" in res.output


def _flipped_copy(small_shards, tmp_path):
    """A copy of small_shards with one byte of train-000001.tar flipped; flip() flips it back (and again)."""
    sh = tmp_path / "sh"
    shutil.copytree(small_shards, sh)
    tar = sh / "train-000001.tar"
    data = bytearray(tar.read_bytes())

    def flip():
        data[len(data) // 2] ^= 1
        tar.write_bytes(bytes(data))

    flip()
    return sh, tar, flip


@pytest.fixture
def hashed(monkeypatch):
    """The names of the files util.sha256_file hashes (HashCache's misses), in order."""
    from fastgal import util

    calls = []
    real = util.sha256_file
    monkeypatch.setattr(util, "sha256_file", lambda p, *a: calls.append(Path(p).name) or real(p, *a))
    return calls


def test_train_refuses_a_changed_tar_and_hashes_it_once(small_shards, tmp_path, hashed, own_cache_dir):
    """A byte flipped in a tar: train refuses before training, in one line naming the tar and the fixes, and makes
    no run folder. Each file is hashed once (util.HashCache, keyed by path, size, mtime, ctime and inode): a second
    train on the unchanged shards refuses without hashing anything."""
    from fastgal.util import sha256_file

    sh, tar, _ = _flipped_copy(small_shards, tmp_path)
    for files in (["train-000000.tar", "train-000001.tar"], []):  # the mismatch is remembered too
        hashed.clear()
        res = run_cli("train", sh, "--out", tmp_path / "r", *TINY, ok=False)
        assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1, res.output
        assert (f"{tar} does not match {sh / 'manifest.json'} (sha256 differs" in res.output
                and "re-shard with `fastgal shard ... --overwrite`" in res.output and f"`fastgal info {sh}`" in res.output)
        assert hashed == files and not (tmp_path / "r").exists()
    cache = json.loads((own_cache_dir / "sha256.json").read_text())["files"]
    assert cache[str(tar.resolve())]["sha256"] == sha256_file(tar)


@pytest.mark.slow
def test_a_repaired_tar_trains_and_predict_checks_too(small_shards, tmp_path, hashed):
    """The tar repaired: hashed again (a new mtime), with the one not reached before; it trains; predict on the
    unchanged shards hashes nothing, and refuses them once a byte is flipped again."""
    sh, tar, flip = _flipped_copy(small_shards, tmp_path)
    run_cli("train", sh, "--out", tmp_path / "bad", *TINY, ok=False)
    flip()
    hashed.clear()
    run_cli("train", sh, "--out", tmp_path / "r", *TINY)
    assert hashed == ["train-000001.tar", "valid-000000.tar"]
    hashed.clear()
    run_cli("predict", tmp_path / "r", sh, "--workers", 1)
    assert hashed == []
    flip()
    res = run_cli("predict", tmp_path / "r", sh, "--workers", 1, ok=False)
    assert res.exit_code == 1 and f"{tar} does not match" in res.output and hashed == ["train-000001.tar"]
