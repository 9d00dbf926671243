"""What the GPU path changes, tested as far as a CPU allows (issue 9): decoders agree bit for bit, DDP
ranks draw their own augmentations, loader threads and TTA pipelines are budgeted, the torch fallback
starts its workers safely once CUDA is up, and predict computes as training did."""

from __future__ import annotations

import gc
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from fastgal.learner import inference_settings
from fastgal.loaders import TorchLoader, loader_for, make_dls, thread_budget, tta_loaders, worker_context
from fastgal.predict import _Files
from fastgal.manifest import load_manifest, read_index, shard_files

RAW = dict(mean=[0.0] * 3, std=[1.0] * 3)  # normalise by nothing: the loaders hand back decoded pixels


def _raw_valid(shards, backend):
    man = load_manifest(shards)
    dl = loader_for(shards, man, "valid", kind="valid", bs=64, size=56, crop=72, device="cpu", backend=backend, **RAW)
    return torch.cat([x for x, _ in dl]), dl


def _pil_valid(shards):
    """The valid split decoded by PIL (what `fastgal shard` measures pixel statistics with), centre 56 of 72."""
    man = load_manifest(shards)
    tars, idxs = shard_files(shards, man, "valid")
    out = []
    for tar, idx in zip(tars, idxs):
        with open(tar, "rb") as f:
            for _, comp in read_index(idx):
                off, size = comp["jpg"]
                f.seek(off)
                a = np.asarray(Image.open(io.BytesIO(f.read(size))).convert("RGB"))
                c = (a.shape[0] - 56) // 2
                out.append(torch.from_numpy(a[c:c + 56, c:c + 56].copy()).permute(2, 0, 1).float())
    return torch.stack(out)


@pytest.mark.parametrize("backend", [pytest.param("dali", marks=pytest.mark.dali), "torch"])
def test_decoders_agree_bit_for_bit(small_shards, backend):
    """Colour is the signal: DALI's CPU decoder, the torch fallback's torchvision decode and PIL must give
    identical pixels (on a GPU, nvJPEG is held to them with jpeg_fancy_upsampling; tools/gpu_check.py measures it)."""
    x, _ = _raw_valid(small_shards, backend)
    assert torch.equal(x, _pil_valid(small_shards))


def test_predict_decodes_a_jpeg_folder_as_the_loaders_do(small_shards):
    x, dl = _raw_valid(small_shards, "torch")
    survey = small_shards.parent / "s" / "images"
    ids = [k for idx in dl.spec.idxs for k, _ in read_index(idx)][:8]
    files = _Files([survey / f"{i}.jpg" for i in ids], [dl.spec], load_manifest(small_shards)["image"]["size"])
    got = torch.stack([files[i][0][0] for i in range(len(ids))])
    assert torch.equal(got, x[:8])


def test_ddp_ranks_draw_their_own_augmentations(small_shards):
    """seed + rank for training (shuffle and augmentation), the same deterministic validation on every rank."""
    a, b = (make_dls(small_shards, bs=16, backend="torch", seed=7, shard_id=r, num_shards=2, size=56) for r in (0, 1))
    assert (a.train.spec.seed, b.train.spec.seed) == (7, 8)
    assert a.valid.spec.seed == b.valid.spec.seed == 7


def test_thread_budget_shares_the_cores_between_local_ranks(monkeypatch):
    import fastgal.loaders

    monkeypatch.setattr(fastgal.loaders, "default_workers", lambda: 16)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert thread_budget(0) == 4 and thread_budget(3) == 3
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert thread_budget(0) == 16


@pytest.mark.dali
def test_tta_builds_one_pipeline_at_a_time(small_shards):
    from nvidia.dali import Pipeline

    valid = make_dls(small_shards, bs=64, backend="dali", size=56).valid
    gc.collect()
    alive = []
    n = 0
    for view in tta_loaders(valid):
        n += sum(len(x) for x, _ in view)
        gc.collect()
        alive.append(sum(isinstance(o, Pipeline) for o in gc.get_objects()))
    assert n == 8 * valid.n and max(alive) <= 1, alive


def test_torch_fallback_starts_workers_safely_once_cuda_is_up(small_shards):
    assert worker_context("cpu", 2) == {} and worker_context("cuda", 0) == {}
    ctx = worker_context("cuda", 2)
    assert ctx["multiprocessing_context"].get_start_method() in ("forkserver", "spawn") and ctx["persistent_workers"]
    spec = make_dls(small_shards, bs=16, backend="torch", size=56, num_threads=2).train.spec
    dl = TorchLoader(spec, 10, "cuda", drop_last=True)  # built, not iterated: no GPU needed
    assert dl._dl.multiprocessing_context.get_start_method() in ("forkserver", "spawn")


def test_predict_computes_as_training_did():
    assert inference_settings({"precision": "bf16", "channels_last": True}, "cuda") == (torch.bfloat16, True)
    assert inference_settings({"precision": "fp16", "channels_last": False}, "cuda:1") == (torch.float16, False)
    assert inference_settings({"precision": "bf16", "channels_last": True}, "cpu") == (None, False)  # fp32 on a CPU


def test_run_records_how_it_computed(small_run):
    w = torch.load(small_run / "model.pt", weights_only=False)
    cfg = json.loads((small_run / "config.json").read_text())
    assert w["precision"] == cfg["precision"] == "fp32" and w["channels_last"] is False
