"""fastgal shard / info: round trips through webdataset and DALI, rejects, counts, determinism, safety."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from fastgal.shards.catalog import random_split
from fastgal.shards.index import index_text, read_index
from fastgal.shards.read import Shards, load_manifest
from fastgal.shards.verify import verify
from fastgal.shards.write import FITS_ONLY, REASONS

MANIFEST_KEYS = ["format", "format_version", "fastgal_version", "source", "id_col", "targets", "target_stats",
                 "components", "split", "order_seed", "counts", "rejects_by_reason", "shards", "index_format", "image",
                 "pixel_stats"]


def read_rejects(out) -> list[dict]:
    with open(out / "rejects.csv", newline="") as f:
        return list(csv.DictReader(f))


def tar_samples(out, split=None) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} of every sample in OUT's tars (one split or all), read with tarfile."""
    m = json.loads((out / "manifest.json").read_text())
    got: dict[str, dict[str, bytes]] = {}
    for s in ([split] if split else list(m["shards"])):
        for e in m["shards"][s]:
            with tarfile.open(out / e["file"]) as tf:
                for mem in tf:
                    key, ext = mem.name.split(".", 1)
                    got.setdefault(key, {})[ext] = tf.extractfile(mem).read()
    return got


def test_layout_manifest_and_stats(survey, survey_shards):
    m = json.loads((survey_shards / "manifest.json").read_text())
    assert list(m) == MANIFEST_KEYS
    assert m["format"] == "fastgal-shards" and m["format_version"] == 1
    assert m["counts"] == {"catalog_rows": 300, "train": 240, "valid": 60, "rejected": 0}
    assert [e["file"] for e in m["shards"]["train"]] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert [e["samples"] for e in m["shards"]["train"]] == [100, 100, 40]
    assert [e["index"] for e in m["shards"]["valid"]] == ["valid-000000.idx"]
    assert sorted(p.name for p in survey_shards.iterdir()) == sorted(
        ["manifest.json", "rejects.csv"] + [f"train-00000{i}.{x}" for i in range(3) for x in ("tar", "idx")]
        + ["valid-000000.tar", "valid-000000.idx"])
    assert m["components"] == {"image": "jpg", "targets": "target.f32", "meta": "json"}
    assert m["image"] == {"size": [224, 224], "precrop": None, "channels": 3, "crop": 144}
    assert m["split"]["valid_pct"] == 0.2 and m["split"]["seed"] == 56 and m["order_seed"] == 56
    assert m["source"]["catalog"] == str((survey / "data" / "master.csv").resolve())
    # target statistics over the training split, from the catalog itself
    cat = pd.read_csv(survey / "data" / "master.csv", dtype={"objID": str}).set_index("objID")
    train = tar_samples(survey_shards, "train")
    y = cat.loc[list(train), "metallicity"].to_numpy()
    st_ = m["target_stats"]["metallicity"]
    assert st_["mean"] == pytest.approx(y.mean()) and st_["std"] == pytest.approx(y.std())
    assert st_["min"] == y.min() and st_["max"] == y.max()
    # pixel statistics: the centre 144 px of every training image, in 0-255 units
    px = np.stack([np.asarray(Image.open(io.BytesIO(s["jpg"])), np.float64)[40:184, 40:184] for s in train.values()])
    assert m["pixel_stats"]["region"] == 144
    assert m["pixel_stats"]["mean"] == pytest.approx(px.mean(axis=(0, 1, 2)).tolist(), rel=1e-9)
    assert m["pixel_stats"]["std"] == pytest.approx(px.std(axis=(0, 1, 2)).tolist(), rel=1e-9)


def test_split_is_fastais_random_splitter():
    from fastai.data.transforms import RandomSplitter

    for n in (1, 7, 300, 1001):
        tr, va = random_split(n, 0.2, 56)
        ftr, fva = RandomSplitter(0.2, seed=56)(list(range(n)))
        assert list(tr) == list(ftr) and list(va) == list(fva)


def test_round_trip_webdataset(survey, survey_shards):
    import webdataset as wds

    cat = pd.read_csv(survey / "data" / "master.csv", dtype=str, keep_default_na=False)
    sh = Shards(survey_shards)
    seen = []
    for split in ("train", "valid"):
        tars = sh.split(split).tars
        for s in wds.WebDataset(tars, shardshuffle=False, empty_check=True):
            key = s["__key__"]
            seen.append(key)
            row = cat[cat.objID == key].iloc[0]
            assert s["jpg"] == (survey / "images" / f"{key}.jpg").read_bytes()  # bit-exact
            assert np.frombuffer(s["target.f32"], "<f4").tolist() == [np.float32(float(row.metallicity))]
            meta = json.loads(s["json"])
            assert meta["objID"] == key and isinstance(meta["objID"], str)
            assert meta["metallicity"] == float(row.metallicity) and meta["ra"] == float(row.ra)
    assert sorted(seen) == sorted(cat.objID) and len(seen) == len(set(seen)) == 300


@pytest.mark.dali
def test_round_trip_dali(survey, survey_shards, capfd):
    import nvidia.dali.types as dtypes
    from nvidia.dali import fn, pipeline_def

    sh = Shards(survey_shards)
    tars, idxs = [], []
    for split in ("train", "valid"):
        tars += sh.split(split).tars
        idxs += sh.split(split).idxs
    bs = 50

    @pipeline_def(batch_size=bs, num_threads=1, device_id=None)
    def pipe():
        jpg, tgt, meta = fn.readers.webdataset(
            paths=tars, index_paths=idxs, ext=["jpg", "target.f32", "json"],
            dtypes=[dtypes.UINT8, dtypes.FLOAT, dtypes.UINT8], missing_component_behavior="error", name="r")
        return jpg, tgt, meta

    p = pipe()
    p.build()
    assert p.epoch_size("r") == 300
    cat = pd.read_csv(survey / "data" / "master.csv", dtype=str).set_index("objID")
    seen = []
    for _ in range(300 // bs):
        jpg, tgt, meta = p.run()
        for k in range(bs):
            key = json.loads(bytes(np.asarray(meta[k])))["objID"]
            seen.append(key)
            assert bytes(np.asarray(jpg[k])) == (survey / "images" / f"{key}.jpg").read_bytes()
            assert np.asarray(tgt[k]).tolist() == [np.float32(float(cat.loc[key, "metallicity"]))]
    assert sorted(seen) == sorted(cat.index) and len(set(seen)) == 300
    err = capfd.readouterr()
    assert "Index file not provided" not in err.err + err.out


def test_tars_are_plain_ustar(survey_shards):
    for tar in sorted(survey_shards.glob("*.tar")):
        raw = tar.read_bytes()
        with tarfile.open(tar) as tf:
            for mem in tf:
                hdr = raw[mem.offset:mem.offset + 512]
                assert hdr[156:157] == b"0"  # a plain file: no PAX ('x'/'g') or GNU long-name headers
                assert hdr[257:263] == b"ustar\x00"
                assert mem.mtime == 0 and mem.uid == 0 and mem.uname == "fastgal" and not mem.pax_headers


@pytest.mark.nodali  # without DALI, fastgal writes the index itself
def test_index_points_at_every_member(survey_shards):
    """Whoever wrote it (DALI's wds2idx, or fastgal without DALI), each index lists the tar's samples
    in order, and every (offset, size) is exactly that member's bytes."""
    for tar in sorted(survey_shards.glob("*.tar")):
        raw = tar.read_bytes()
        idx = tar.with_suffix(".idx")
        entries = read_index(idx)
        assert idx.read_text().startswith(f"v1.2 {len(entries)}\n")
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(tar) as tf:
            for mem in tf:
                key, ext = mem.name.split(".", 1)
                members.setdefault(key, {})[ext] = tf.extractfile(mem).read()
        assert [k for k, _ in entries] == list(members)
        for key, comps in entries:
            assert {ext: raw[o:o + n] for ext, (o, n) in comps.items()} == members[key]


@pytest.mark.dali
def test_index_is_dalis_own(survey_shards, tmp_path, monkeypatch):
    """fastgal's own index (used where DALI is missing) is byte for byte what DALI's wds2idx writes."""
    from wds2idx import IndexCreator

    from fastgal.shards.index import make_index

    for tar in sorted(survey_shards.glob("*.tar")):
        with IndexCreator(str(tar), str(tmp_path / "dali.idx"), verbose=False) as ic:
            ic.create_index()
        dali = (tmp_path / "dali.idx").read_bytes()
        assert tar.with_suffix(".idx").read_bytes() == dali == index_text(tar).encode()
    monkeypatch.setitem(sys.modules, "wds2idx", None)  # `from wds2idx import ...` now raises ImportError
    make_index(tar, tmp_path / "own.idx")
    assert (tmp_path / "own.idx").read_bytes() == dali


def _tree(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_deterministic_whatever_workers(survey, survey_shards, tmp_path):
    out = tmp_path / "again"
    run_cli("shard", survey / "data" / "master.csv", survey / "images", out, "--shard-size", 100, "--workers", 1, "--quiet")
    assert _tree(out) == _tree(survey_shards)
    other = tmp_path / "seed"
    run_cli("shard", survey / "data" / "master.csv", survey / "images", other, "--seed", 1, "--quiet")
    assert tar_samples(other, "valid").keys() != tar_samples(survey_shards, "valid").keys()


def _jpeg(arr, mode=None, quality=90, fmt="JPEG") -> bytes:
    buf = io.BytesIO()
    im = Image.fromarray(arr) if mode is None else Image.fromarray(arr).convert(mode)
    im.save(buf, format=fmt, quality=quality) if fmt == "JPEG" else im.save(buf, format=fmt)
    return buf.getvalue()


def test_bad_cases_are_rejected_with_reasons(survey, tmp_path):
    cat = pd.read_csv(survey / "data" / "master.csv", dtype=str, keep_default_na=False).iloc[:40].copy()
    imgs = tmp_path / "images"
    imgs.mkdir()
    for i in cat.objID:
        shutil.copy(survey / "images" / f"{i}.jpg", imgs / f"{i}.jpg")
    ids = list(cat.objID)
    good = (survey / "images" / f"{ids[0]}.jpg").read_bytes()
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)
    expect = {}

    def img(k, data, reason):
        (imgs / f"{ids[k]}.jpg").write_bytes(data)
        expect[ids[k]] = reason

    (imgs / f"{ids[1]}.jpg").unlink()
    expect[ids[1]] = "missing-image"
    img(2, b"<!DOCTYPE html><html><body>503 Service Unavailable</body></html>", "not-jpeg")
    img(3, good[: len(good) // 2], "corrupt-image")
    img(4, _jpeg(noise, fmt="PNG"), "not-jpeg")
    img(5, _jpeg(noise[:100, :100]), "too-small")
    img(6, _jpeg(noise[:200, :200]), "wrong-size")
    img(7, _jpeg(np.full((224, 224, 3), 3, np.uint8)), "blank-image")
    img(8, _jpeg(np.full((224, 224, 3), 128, np.uint8)), "blank-image")
    img(9, _jpeg(noise, mode="L"), "not-rgb")
    img(10, _jpeg(noise, mode="CMYK"), "not-rgb")
    img(11, b"", "corrupt-image")
    cat.loc[12, "metallicity"] = ""
    cat.loc[13, "metallicity"] = "abc"
    cat.loc[14, "metallicity"] = "nan"
    cat.loc[15, "metallicity"] = "inf"
    cat.loc[16, "metallicity"] = "1e40"  # finite in float64, not in float32
    for k, r in zip(range(12, 17), ["missing-target"] + ["non-numeric-target"] + ["non-finite-target"] * 3):
        expect[ids[k]] = r
    cat.loc[17, "objID"] = "12.5"
    cat.loc[18, "objID"] = "a/b"
    # duplicates: an exact copy keeps its first row; copies that disagree are all rejected
    same = cat.iloc[[19]].copy()
    diff = cat.iloc[[20]].copy()
    diff["metallicity"] = "9.0"
    cat = pd.concat([cat, same, diff], ignore_index=True)
    cat.to_csv(tmp_path / "cat.csv", index=False)
    out = tmp_path / "out"
    res = run_cli("shard", tmp_path / "cat.csv", imgs, out, "--json", "--workers", 2)
    summary = json.loads(res.output)
    rej = read_rejects(out)
    by_id = {}
    for r in rej:
        by_id.setdefault(r["id"], []).append(r)
    for i, reason in expect.items():
        assert [r["reason"] for r in by_id.pop(i)] == [reason], i
    assert {r["reason"] for r in rej} == set(REASONS) - FITS_ONLY  # every reason a JPEG can have, and no other
    detail = {r["id"]: r["detail"] for r in rej}
    assert detail[ids[1]] == f"{imgs / ids[1]}.jpg not found"
    assert detail[ids[4]].startswith("starts with '\ufffdPNG\\r\\n")  # the text a user can recognise
    detail[ids[3]] = detail[ids[3]].split(" (")[0]  # PIL's own words follow
    assert [detail[ids[k]] for k in (2, 3, 5, 6, 7, 8, 9, 10, 11)] == [
        "starts with '<!DOCTYPE html><'", "OSError: image file is truncated",
        "100x100 px, under the 144 px centre region (--crop 144)", "200x200 px; most images are 224x224", "all dark (brightest pixel 3)",
        "flat frame (channel std 0.00)", "mode L", "mode CMYK", "empty file"]
    assert [detail[ids[k]] for k in (12, 13, 16)] == [
        "metallicity: empty", "metallicity: 'abc' is not a number", "metallicity: '1e40' is not finite (as float32)"]
    assert [r["reason"] for r in by_id.pop("12.5")] == ["bad-id"]
    assert [r["reason"] for r in by_id.pop("a/b")] == ["bad-id"]
    assert [(r["row"], r["reason"]) for r in by_id.pop(ids[19])] == [("41", "duplicate-id")]
    assert [(r["row"], r["reason"]) for r in by_id.pop(ids[20])] == [("21", "duplicate-id"), ("42", "duplicate-id")]
    assert by_id == {}
    assert all(r["detail"] for r in rej)
    m = json.loads((out / "manifest.json").read_text())
    c = m["counts"]
    assert c["catalog_rows"] == 42 and c["rejected"] == len(rej) == 21
    assert c["train"] + c["valid"] == 21 == summary["train"] + summary["valid"]
    assert sum(m["rejects_by_reason"].values()) == 21 and m["rejects_by_reason"]["blank-image"] == 2
    kept = tar_samples(out)
    assert set(kept) == set(ids) - set(expect) - {ids[17], ids[18], ids[20]}  # ids[19]: its first row
    assert set(kept).isdisjoint(r["id"] for r in rej if r["reason"] != "duplicate-id")
    assert "rejected 21" in run_cli("shard", tmp_path / "cat.csv", imgs, tmp_path / "o2", "--quiet").output


def test_readme_lists_every_reject_reason():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert [r for r in REASONS if f"`{r}`" not in readme] == []


def test_precrop(survey, tmp_path):
    out = tmp_path / "pc"
    run_cli("shard", survey / "data" / "master.csv", survey / "images", out, "--precrop", 160, "--quiet")
    m = json.loads((out / "manifest.json").read_text())
    assert m["image"] == {"size": [160, 160], "precrop": 160, "channels": 3, "crop": 144}
    assert m["pixel_stats"]["region"] == 144
    for key, s in list(tar_samples(out, "valid").items())[:5]:
        im = Image.open(io.BytesIO(s["jpg"]))
        assert im.size == (160, 160) and im.format == "JPEG"
        orig = np.asarray(Image.open(survey / "images" / f"{key}.jpg"), np.float64)[32:192, 32:192]
        assert np.abs(np.asarray(im, np.float64) - orig).mean() < 2  # the centre, at high quality
    assert verify(out)["ok"]


def test_sizes_fit_together_or_the_command_says_which_option(survey, small_shards, tmp_path):
    """Issue 22, case 3: a precrop under the crop is refused before anything is written; a survey whose
    cutouts are under the crop names --crop in every reject and in the error, and the corrected command
    runs in the same folder without --overwrite (the failed run left only its rejects report)."""
    res = run_cli("shard", survey / "data" / "master.csv", survey / "images", tmp_path / "p", "--precrop", 100, ok=False)
    assert res.exit_code != 0 and "--precrop 100 is smaller than --crop 144" in res.output and not (tmp_path / "p").exists()
    small = small_shards.parent / "s"  # 112 px cutouts
    out = tmp_path / "o"
    res = run_cli("shard", small / "data" / "master.csv", small / "images", out, "--quiet", ok=False)
    assert res.exit_code != 0 and "too-small 260" in res.output and "pass a --crop no larger than their side" in res.output
    rejects = pd.read_csv(out / "rejects.csv")
    assert (rejects.reason == "too-small").all() and rejects.detail.str.contains("(--crop 144)", regex=False).all()
    run_cli("shard", small / "data" / "master.csv", small / "images", out, "--crop", 72, "--quiet")  # corrected
    assert verify(out)["ok"] and not (out / "rejects.csv").read_text().strip().count("\n")  # header only


def test_refuse_then_overwrite_and_no_leftovers(survey, survey_shards, tmp_path):
    out = tmp_path / "o"
    shutil.copytree(survey_shards, out)
    (out / "notes.txt").write_text("mine")
    args = ["shard", survey / "data" / "master.csv", survey / "images", out, "--quiet"]
    res = run_cli(*args, ok=False)
    assert res.exit_code != 0 and "--overwrite" in res.output and len(res.output.strip().splitlines()) == 1
    assert "already holds a finished shard folder (manifest.json)" in res.output  # not "a finished shards"
    run_cli(*args, "--overwrite")
    names = sorted(p.name for p in out.iterdir())
    # the 3-tar set was replaced by a 1-tar one, not merged with it; others' files stay
    assert names == ["manifest.json", "notes.txt", "rejects.csv", "train-000000.idx", "train-000000.tar",
                     "valid-000000.idx", "valid-000000.tar"]
    assert verify(out)["ok"]


def test_interrupted_run_leaves_nothing_finished(survey, tmp_path, monkeypatch):
    import fastgal.shards.write as shards_mod

    calls = []

    def boom(tar, idx):
        calls.append(tar)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(tar, idx)

    real = shards_mod.make_index
    monkeypatch.setattr(shards_mod, "make_index", boom)
    out = tmp_path / "cut"
    res = run_cli("shard", survey / "data" / "master.csv", survey / "images", out, "--shard-size", 100, "--quiet", ok=False)
    assert res.exit_code == 130 and res.output == "fastgal: interrupted (Ctrl-C)\n"  # Ctrl-C's status, one line
    assert len(calls) == 2
    assert not out.exists()  # no tar, no manifest, no temp folder: the folder shard made held nothing, and went
    (out / "x").mkdir(parents=True)
    calls.clear()
    res = run_cli("shard", survey / "data" / "master.csv", survey / "images", out, "--shard-size", 100, "--quiet", ok=False)
    assert res.exit_code == 130 and [p.name for p in out.iterdir()] == ["x"]  # a folder that was there stays
    with pytest.raises(ValueError, match="no manifest.json"):
        load_manifest(out)
    monkeypatch.undo()
    run_cli("shard", survey / "data" / "master.csv", survey / "images", out, "--quiet")  # a clean re-run works


@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_files_get_the_modes_of_a_plain_write(survey, tmp_path, mask):
    """Shards can be shared like any other file: the umask decides, not a private temp file's 0600."""
    out = tmp_path / "o"
    old = os.umask(mask)
    try:
        run_cli("shard", survey / "data" / "master.csv", survey / "images", out, "--shard-size", 200, "--quiet")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert sorted(modes) == ["manifest.json", "rejects.csv", "train-000000.idx", "train-000000.tar",
                             "train-000001.idx", "train-000001.tar", "valid-000000.idx", "valid-000000.tar"]
    assert set(modes.values()) == {0o666 & ~mask}
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask


def test_next_run_removes_a_killed_runs_temp_folder(survey, tmp_path):
    args = [survey / "data" / "master.csv", survey / "images"]
    out = tmp_path / "o"
    (out / ".shard-x1y2").mkdir(parents=True)  # what SIGKILL leaves: a temp folder with tars in it
    (out / ".shard-x1y2" / "train-000000.tar").write_bytes(b"half a tar")
    res = run_cli("shard", *args, out)
    assert not (out / ".shard-x1y2").exists()
    assert re.search(r"removed 1 temporary folder\(s\) left in .* by an interrupted run: \.shard-x1y2\n", res.stderr)
    # also with --overwrite over finished shards, and silently with --quiet
    (out / ".shard-abc").mkdir()
    res = run_cli("shard", *args, out, "--overwrite", "--quiet")
    assert not (out / ".shard-abc").exists() and res.stderr == ""
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


# `fastgal shard ARGS` in a subprocess, after CODE has patched fastgal.shards.write (what a test cannot set up
# from outside: a full disk, a moment mid-run); its stdout and stderr as a real run's
PATCHED_SHARD = """
import sys
%s
from fastgal.cli import main
main()
"""

# the first tar is finished (its index written), the run goes on: stop there until killed
WAIT_AFTER_FIRST_TAR = """
import time
import fastgal.shards.write as shards
finish = shards._SplitWriter._finish
def finish_then_wait(self):
    finish(self)
    print("a tar is written", flush=True)
    while True:
        time.sleep(3600)
shards._SplitWriter._finish = finish_then_wait
"""

# a disk with room for ROOM bytes of each tar: the write past it fails as on a full disk
DISK_FULL = """
import errno, io, os
import fastgal.shards.write as shards
ROOM = 100_000
class FullDisk(io.BufferedWriter):
    def write(self, b):
        if self.tell() + len(b) > ROOM:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(b)
def tar_open(path, mode="r", **kw):
    return FullDisk(io.FileIO(path, mode)) if mode == "wb" else open(path, mode, **kw)
shards.open = tar_open
"""


def patched_shard(code: str, *args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", PATCHED_SHARD % code, *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun(survey, tmp_path):
    """A real `fastgal shard` killed with SIGKILL while writing (its first tar done, the others to come):
    its pool workers exit without a traceback, and the next run removes the temp folder it left."""
    out = tmp_path / "o"
    args = ["shard", survey / "data" / "master.csv", survey / "images", out, "--shard-size", 20, "--workers", 2,
            "--quiet"]
    proc = patched_shard(WAIT_AFTER_FIRST_TAR, *args)
    said = proc.stdout.readline()  # blocks until the run is at that point (or has died: EOF)
    assert said == b"a tar is written\n", proc.communicate()
    os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=60)  # EOF once the orphaned workers are gone too
    assert proc.returncode == -signal.SIGKILL
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err.decode()
    # what SIGKILL leaves: the temp folder and the claim on OUT (util.OutLock), whose pid no longer runs
    assert sorted(p.name[:7] for p in out.iterdir()) == [".fastga", ".shard-"] and not (out / "manifest.json").exists()
    assert json.loads((out / ".fastgal.lock").read_text())["pid"] == proc.pid
    assert sorted(p.name for p in next(out.glob(".shard-*")).iterdir()) == ["train-000000.idx", "train-000000.tar"]
    run_cli(*args)  # takes the stale lock over, removes the temp folder
    assert not list(out.glob(".shard-*")) and not (out / ".fastgal.lock").exists() and verify(out)["ok"]


def test_a_full_disk_is_one_line_and_leaves_nothing(survey, tmp_path):
    """The disk fills up in the middle of a tar: the one-line error, no temp folder, and no traceback when
    Python exits from the tar stream left open ("Exception ignored ... write to closed file")."""
    out = tmp_path / "o"
    proc = patched_shard(DISK_FULL, "shard", survey / "data" / "master.csv", survey / "images", out, "--workers", 1,
                         "--quiet", text=True)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1
    assert "Exception ignored" not in err, err
    assert err.splitlines() == [f"Error: no space left on device writing {out}; free space there or choose another OUT"], err
    assert not out.exists()  # the temp folder is gone, and the folder shard made for it


def test_info_and_tampering(survey_shards, tmp_path):
    res = run_cli("info", survey_shards, "--json")
    info = json.loads(res.output)
    assert info["ok"] and info["counts"]["train"] == 240
    assert "verified" in run_cli("info", survey_shards).output

    bad = tmp_path / "bad"
    shutil.copytree(survey_shards, bad)
    tar = bad / "train-000001.tar"
    raw = bytearray(tar.read_bytes())
    raw[5000] ^= 0xFF  # same size, one byte different
    tar.write_bytes(bytes(raw))
    res = run_cli("info", bad, ok=False)
    assert res.exit_code != 0 and "train-000001.tar" in res.output and "sha256" in res.output

    out = run_cli("info", bad, ok=False).output  # issue 22, case 5: the summary names every problem it counts
    import re

    listed = [line for line in out.splitlines() if line.startswith("    ")]
    n = int(re.search(r"  (\d+) problems?:", out).group(1))
    assert "problem(s)" not in out and len(listed) == min(n, 10) and any("train-000001.tar" in line for line in listed)

    tar.write_bytes(bytes(raw[:-1024]))  # truncated
    res = run_cli("info", bad, ok=False)
    assert res.exit_code != 0 and "bytes" in res.output and "train-000001.tar" in res.output
    with pytest.raises(ValueError, match="train-000001.tar"):
        load_manifest(bad)

    m = json.loads((bad / "manifest.json").read_text())
    m["format_version"] = 99
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="format_version 99"):
        load_manifest(bad)
    (bad / "manifest.json").unlink()
    res = run_cli("info", bad, ok=False)
    assert res.exit_code != 0 and "manifest.json" in res.output
    res = run_cli("info", tmp_path / "nowhere", ok=False)
    assert res.exit_code != 0 and "no manifest.json" in res.output


@pytest.mark.parametrize("case", ["no-column", "float-ids", "no-images", "no-catalog", "all-bad", "pct"])
def test_user_errors_are_one_line(survey, tmp_path, case):
    cat = tmp_path / "cat.csv"
    imgs = survey / "images"
    extra = []
    if case == "no-column":  # 14 columns: the message lists 12 and says how many there are (issue 22, case 5)
        cat.write_text("objID,oh," + ",".join(f"c{k}" for k in range(12)) + "\n1,8.9" + ",0" * 12 + "\n")
        needle = "c9, ... (14 columns)); pass --target"
    elif case == "float-ids":
        cat.write_text("objID,metallicity\n1.237645945580749e+18,8.9\n1.237645945580749e+18,9.0\n")
        needle = "float"
    elif case == "no-images":
        cat.write_text("objID,metallicity\n1,8.9\n")
        imgs = tmp_path / "missing"
        needle = "images folder"
    elif case == "no-catalog":
        cat = tmp_path / "nope.csv"
        needle = "not found"
    elif case == "all-bad":
        cat.write_text("objID,metallicity\n1,8.9\n2,8.8\n")
        needle = "no usable samples"
    else:
        cat.write_text("objID,metallicity\n1,8.9\n")
        extra = ["--valid-pct", "1.5"]
        needle = "--valid-pct"
    res = run_cli("shard", cat, imgs, tmp_path / "out", *extra, ok=False)
    assert res.exit_code != 0 and needle in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert not (tmp_path / "out" / "manifest.json").exists()
    if case == "all-bad":
        assert [r["reason"] for r in read_rejects(tmp_path / "out")] == ["missing-image"] * 2


def test_a_float_id_is_described_as_it_is(survey, tmp_path):
    """Issue 22, case 5: ids written `1237645945580748801.0` have every digit (no float64 is that value, and a
    float printer writes at most 17 significant digits): the message says so and how to write them, where it
    used to say their last digits were lost. Ids a float may have rounded are said to be that."""
    cat = tmp_path / "cat.csv"
    for ids, said in ((["1237645945580748801.0", "1237645945580748803.0"],
                       "row 1 (1 more rows like it): id '1237645945580748801.0' is written as a float, but every digit "
                       "is there: write it as 1237645945580748801"),
                      (["1237645945580748801.0", "1.2376459455807488e+18"],  # the second: a float64's repr
                       "row 2 (1 more rows like it): id '1.2376459455807488e+18' is written as a float above 2**53, "
                       "where float64 values lie 256 apart, so its last digits may have been rounded")):
        cat.write_text("objID,metallicity\n" + "".join(f"{i},8.9\n" for i in ids))
        res = run_cli("shard", cat, survey / "images", tmp_path / "out", ok=False)
        assert res.exit_code == 1 and said in res.output and "lost" not in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1


@st.composite
def catalogs(draw):
    n = draw(st.integers(1, 25))
    bad_target = draw(st.lists(st.sampled_from(["", "x", "nan"]), max_size=n))
    missing = draw(st.integers(0, 3))
    pct = draw(st.sampled_from([0.0, 0.1, 0.2, 0.5]))
    return n, bad_target, missing, pct


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(catalogs())
@example((1, [], 2, 0.5))  # the one good row lands in valid: nothing to train on, a clear error
def test_property_counts_split_and_ids(survey, tmp_path_factory, case):
    n, bad_target, missing, pct = case
    src = pd.read_csv(survey / "data" / "master.csv", dtype=str, keep_default_na=False)
    cat = src.iloc[:n][["objID", "metallicity", "ra"]].copy().reset_index(drop=True)
    for k, v in enumerate(bad_target):
        cat.loc[k, "metallicity"] = v
    # ids with no image file: big 19-digit numbers that float64 cannot hold exactly
    ghost = [str(9_007_199_254_740_993 + 2 * k) + "123" for k in range(missing)]
    cat = pd.concat([cat, pd.DataFrame({"objID": ghost, "metallicity": "8.9", "ra": "1.0"})], ignore_index=True)
    d = tmp_path_factory.mktemp("prop")
    cat.to_csv(d / "c.csv", index=False)
    usable = n - len(bad_target)
    args = ["shard", d / "c.csv", survey / "images", d / "out", "--valid-pct", pct, "--workers", 1, "--quiet"]
    # candidates in catalog order: the usable rows (positions 0..usable-1 among them), then the ghosts
    train_pos, _ = random_split(usable + missing, pct, 56)
    if usable == 0 or not any(p < usable for p in train_pos):  # nothing left to train on
        assert "no usable samples" in run_cli(*args, ok=False).output
        return
    run_cli(*args)
    m = json.loads((d / "out" / "manifest.json").read_text())
    c = m["counts"]
    rej = read_rejects(d / "out")
    assert c["catalog_rows"] == len(cat) == c["train"] + c["valid"] + c["rejected"] and len(rej) == c["rejected"]
    assert sorted(r["reason"] for r in rej) == sorted(
        ["missing-target" if v == "" else "non-numeric-target" if v == "x" else "non-finite-target" for v in bad_target]
        + ["missing-image"] * missing)
    cand = usable + missing  # rows that pass the row checks are split; then ghosts leave their split
    assert c["valid"] <= int(pct * cand) and c["train"] <= cand - int(pct * cand)
    if missing == 0:
        assert c["valid"] == int(pct * cand)
    got = tar_samples(d / "out")
    assert set(got) == set(cat.objID[len(bad_target):n])  # exact ids, as strings, both ways
    for key, s in got.items():
        assert json.loads(s["json"])["objID"] == key
