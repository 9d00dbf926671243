"""fastgal.shards.read: a shard folder read back once (Shards), one split's index parsed once (Split)."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import fastgal.shards.read as manifest
from fastgal.shards.index import read_index
from fastgal.shards.read import Shards


def test_a_split_is_its_index_read_once(survey, survey_shards, monkeypatch):
    calls = []
    real = manifest.read_index
    monkeypatch.setattr(manifest, "read_index", lambda p: calls.append(p) or real(p))
    sh = Shards(survey_shards)
    valid = sh.split("valid")
    assert sh.split("valid") is valid and len(calls) == len(valid.idxs) == 1  # parsed once, handed out again
    cat = pd.read_csv(survey / "data" / "master.csv", dtype={"objID": str}).set_index("objID")
    keys = [k for idx in valid.idxs for k, _ in real(idx)]
    assert valid.keys == keys and len(valid) == sh.manifest["counts"]["valid"] == 60
    # random access through the offsets: the original bytes, the targets, the catalog row
    for i in (0, 17, 59):
        assert valid.jpeg(i).tobytes() == (survey / "images" / f"{keys[i]}.jpg").read_bytes()
        assert valid.target(i).tolist() == [np.float32(cat.loc[keys[i], "metallicity"])]
    jpegs, y = valid.batch([3, 1])
    assert [j.tobytes() for j in jpegs] == [valid.jpeg(3).tobytes(), valid.jpeg(1).tobytes()] and y.shape == (2, 1)
    assert np.array_equal(valid.all_targets()[:, 0], cat.loc[keys, "metallicity"].to_numpy(np.float32))
    mass = valid.column("lgm_tot_p50")
    assert np.allclose(mass, cat.loc[keys, "lgm_tot_p50"].to_numpy(), rtol=0, atol=1e-12)
    assert np.isnan(valid.column("no_such_column")).all()
    assert len(calls) == 1  # columns and targets came through the index already parsed


def test_the_split_matches_the_tar_member_by_member(survey_shards):
    sp = Shards(survey_shards).split("train")
    with tarfile.open(sp.tars[1]) as tf:
        members = {m.name: m for m in tf}
        i = sp.keys.index(next(iter(members)).split(".")[0])
        assert sp.tar[i] == 1
        jpg = tf.extractfile(members[f"{sp.keys[i]}.jpg"]).read()
        meta = json.loads(tf.extractfile(members[f"{sp.keys[i]}.json"]).read())
    assert sp.jpeg(i).tobytes() == jpg and Image.open(io.BytesIO(jpg)).size == (224, 224)
    assert meta["objID"] == sp.keys[i]


def test_a_split_pickles_without_its_maps(survey_shards):
    import pickle

    sp = Shards(survey_shards).split("valid")
    sp.jpeg(0)
    assert sp._maps
    again = pickle.loads(pickle.dumps(sp))  # what a DataLoader worker gets
    assert again._maps == {} and again.jpeg(5).tobytes() == sp.jpeg(5).tobytes()


def test_the_folder_summary(survey_shards):
    sh = Shards(survey_shards)
    m = sh.manifest
    assert sh.targets == ["metallicity"] and sh.crop() == 144 and sh.precrop is None and sh.image_size == [224, 224]
    mean, std = sh.target_stats()
    assert mean == [m["target_stats"]["metallicity"]["mean"]] and std[0] > 0
    assert sh.pixel_mean == m["pixel_stats"]["mean"]
    assert len(sh.sha256()) == 64 and sh.sha256() == Shards(survey_shards).sha256()
    with pytest.raises(ValueError, match="no split 'test'"):
        sh.split("test")
    with pytest.raises(ValueError, match="--crop 100 but the shards were made for a 144 px"):
        sh.crop(100)


def test_targets_of_the_wrong_width_are_refused(survey_shards, tmp_path):
    import shutil

    bad = tmp_path / "sh"
    shutil.copytree(survey_shards, bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["targets"] = ["metallicity", "extra"]
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="targets of 4 bytes"):
        Shards(bad).split("valid")


def test_read_index_gives_offsets_of_every_component(survey_shards):
    sp = Shards(survey_shards).split("valid")
    rows = read_index(sp.idxs[0])
    key, comp = rows[0]
    assert set(comp) == {"jpg", "target.f32", "json"} and key == sp.keys[0]
    assert comp["jpg"] == (int(sp.img_off[0]), int(sp.img_size[0]))


def test_a_survey_folder_is_named_as_one(survey, tmp_path):
    """Issue 22, case 5: `fastgal train data/synth` must not suggest writing shards into the survey."""
    from conftest import run_cli

    res = run_cli("train", survey, "--out", tmp_path / "r", ok=False)
    assert res.exit_code != 0 and "is a survey (cutouts and a catalog), not shards" in res.output
    assert f"fastgal shard {survey / 'data' / 'master.csv'} {survey / 'images'} shards/{survey.name}" in res.output
