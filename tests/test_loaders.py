"""fastgal.load.loader: one Loader over a Split, a plan and a view, through the DALI or the torch backend.

The CPU geometry is the demo's: 112 px cutouts, crop 72 -> 56 (the seed's 224/144/112 at half scale).
"""

from __future__ import annotations

import gc
import io

import numpy as np
import pytest
import torch
from conftest import dali_importable, run_cli
from PIL import Image

from fastgal.load.geometry import CENTRE, TRAIN
from fastgal.load.loader import Loader, dataloaders, thread_budget
from fastgal.load.preprocess import geometry_for
from fastgal.shards.read import Shards

GEOM = dict(size=56, crop=72)
BACKENDS = [pytest.param("dali", marks=pytest.mark.dali), "torch"]


def _raw(shards, backend, view=CENTRE, bs=64):
    """A loader that normalises by nothing: it hands back the decoded pixels of the view."""
    sh = Shards(shards)
    geo = geometry_for(sh, size=56, crop=72, mean=[0.0] * 3, std=[1.0] * 3)
    return Loader(sh.split("valid"), view, geo, bs=bs, backend=backend)


def _epochs(dl, k: int) -> list[np.ndarray]:
    """k passes of a training loader: the positions its plan read, checked against the targets it delivered."""
    out = []
    for _ in range(k):
        pos = dl.batches()
        ys = [y for _, y in dl]
        assert len(ys) == len(pos)
        for y, p in zip(ys, pos):
            assert torch.equal(y, torch.from_numpy(dl.split.batch(p)[1]))
        out.append(np.concatenate(pos))
    return out


def _pil_valid(shards):
    """The valid split decoded by PIL (what `fastgal shard` measures pixel statistics with), centre 56 of 72."""
    sp = Shards(shards).split("valid")
    out = []
    for i in range(len(sp)):
        a = np.asarray(Image.open(io.BytesIO(sp.jpeg(i).tobytes())).convert("RGB"))
        c = (a.shape[0] - 56) // 2
        out.append(torch.from_numpy(a[c:c + 56, c:c + 56].copy()).permute(2, 0, 1).float())
    return torch.stack(out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decoders_agree_bit_for_bit(small_shards, backend):
    """Colour is the signal: DALI's CPU decoder, the torch backend's torchvision decode and PIL must give
    identical pixels (on a GPU, nvJPEG is held to them with jpeg_fancy_upsampling; tools/gpu_check.py measures it)."""
    x = torch.cat([x for x, _ in _raw(small_shards, backend)])
    assert torch.equal(x, _pil_valid(small_shards))


@pytest.mark.dali
def test_dali_and_torch_give_the_same_eval_tensors(small_shards):
    dd = dataloaders(small_shards, bs=32, backend="dali", **GEOM)
    td = dataloaders(small_shards, bs=32, backend="torch", **GEOM)
    xd, yd = map(torch.cat, zip(*dd.valid))
    xt, yt = map(torch.cat, zip(*td.valid))
    assert xd.shape == xt.shape == (len(xd), 3, 56, 56) and yd.shape[1] == 2
    assert torch.equal(yd, yt)  # same samples, same order
    std = torch.tensor(dd.shards.pixel_std).view(1, 3, 1, 1)
    assert ((xd - xt).abs() * std).max() <= 1.01  # both libjpeg-turbo: at most decoder rounding, 1/255
    for v in (1, 6):
        a, b = (torch.cat([x for x, _ in d.valid.view_of(v)]) for d in (dd, td))
        assert ((a - b).abs() * std).max() <= 1.01
        assert not torch.allclose(a, xd)  # a different view


def test_tta_views_are_the_dihedral_group(small_shards):
    """View v = v % 4 quarter turns counter-clockwise, mirrored when v >= 4, of the centre crop: exact."""
    centre = torch.cat([x for x, _ in _raw(small_shards, "torch")])
    for v in range(8):
        got = torch.cat([x for x, _ in _raw(small_shards, "torch", view=v)])
        want = torch.rot90(centre, k=v % 4, dims=(-2, -1))
        assert torch.equal(got, want.flip(-1) if v >= 4 else want), v
    base = _raw(small_shards, "torch")
    views = [torch.cat([x for x, _ in dl]) for dl in base.tta()]
    assert len(views) == 8 and len({tuple(t[0, 0, :3, 0].tolist()) for t in views}) > 1
    assert all(torch.equal(v, torch.cat([x for x, _ in _raw(small_shards, "torch", view=k)])) for k, v in enumerate(views))
    assert base.view_of(5)._impl is base._impl  # one set of workers serves the 8 views: started once, not 8 times


@pytest.mark.parametrize("backend", BACKENDS)
def test_len_is_the_number_of_batches_yielded(small_shards, backend):
    dls = dataloaders(small_shards, bs=32, backend=backend, **GEOM)
    n_train, n_valid = len(dls.train.split), len(dls.valid.split)
    assert len(dls.train) == n_train // 32 and len(dls.valid) == -(-n_valid // 32)
    dls.train.one_batch()  # an interrupted epoch (like lr_find's cancel) ...
    for _ in range(2):  # ... must not shorten the next ones
        sizes = [len(x) for x, _ in dls.train]
        assert sizes == [32] * len(dls.train)
    assert [len(x) for x, _ in dls.valid] == [32] * (n_valid // 32) + [n_valid % 32] * bool(n_valid % 32)
    assert dls.train.n == n_train and dls.bs == 32 and dls.device.type == "cpu"
    x, y = dls.one_batch()
    assert x.dtype == torch.float32 and abs(float(x.mean())) < 1.5
    v = dls.train.new(shuffle=False, drop_last=False)  # what fastai's get_preds asks for: the centre view, in order
    assert v.view == CENTRE and len(v) == -(-n_train // 32)
    assert dls.valid.view_of(3).new(shuffle=False).view == 3 and dls.train.new().view == TRAIN


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_epoch_is_a_new_exact_permutation(small_shards, backend):
    BS = 24  # 208 samples: 8 batches, 16 left over
    dls = dataloaders(small_shards, bs=BS, backend=backend, **GEOM)
    n = dls.train.n
    eps = _epochs(dls.train, 3)
    for e in eps:  # full batches of distinct samples; only the tail that does not fill a batch is left out
        assert len(e) == (n // BS) * BS and len(set(e.tolist())) == len(e) and set(e.tolist()) <= set(range(n))
    assert not np.array_equal(eps[0], eps[1]) and not np.array_equal(eps[1], eps[2])
    left_out = [set(range(n)) - set(e.tolist()) for e in eps]
    assert left_out[0] != left_out[1]  # the dropped tail is not always the same samples
    # seeded: a fresh loader reads the same epochs; set_epoch(2) reads the third epoch directly
    again = dataloaders(small_shards, bs=BS, backend=backend, **GEOM).train
    again.set_epoch(2)
    assert np.array_equal(_epochs(again, 1)[0], eps[2])
    other = dataloaders(small_shards, bs=BS, backend=backend, seed=7, **GEOM).train
    assert not np.array_equal(_epochs(other, 1)[0], eps[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_epoch_is_the_same_batches_whoever_reads_it(small_shards, backend):
    """Order and augmentation come from (seed, epoch): an interrupted epoch, another thread count or
    reading it after other epochs changes nothing."""
    a = dataloaders(small_shards, bs=16, backend=backend, threads=1, **GEOM).train
    b = dataloaders(small_shards, bs=16, backend=backend, threads=2, **GEOM).train
    a.one_batch()  # a cut-short epoch does not count
    list(a)
    xa = [x for x, _ in a]  # epoch 1
    b.set_epoch(1)
    xb = [x for x, _ in b]
    assert len(xa) == len(xb) == len(a)
    assert all(torch.equal(p, q) for p, q in zip(xa, xb))


def _pixels(batches, geometry):
    """A pass's images back in 0-255 units, and its targets."""
    std, mean = (torch.tensor(v).view(1, 3, 1, 1) for v in (geometry.std, geometry.mean))
    xs, ys = zip(*batches)
    return torch.cat(xs) * std + mean, torch.cat(ys)


def _figures(a: torch.Tensor, b: torch.Tensor) -> dict:
    """What RESULTS reports of two passes: max and p99 of |a - b| in grey levels, signed per-channel means."""
    d = a - b
    return {"max": float(d.abs().max()), "p99": float(d.abs().flatten().double().quantile(0.99)),
            "mean": [float(m) for m in d.mean((0, 2, 3))]}


@pytest.mark.dali
def test_the_torch_resample_is_dalis_graph_to_a_grey_level(small_shards):
    """The same epoch with the same draws through DALI's CPU graph and the torch path: the same samples in
    the same order, and pixels equal but for single grey levels where the two round a bilinear sample
    differently (DALI computes the map in its own float order; both round to whole levels as uint8 does)."""
    d = dataloaders(small_shards, bs=16, backend="dali", **GEOM).train
    b = dataloaders(small_shards, bs=16, backend="torch", **GEOM).train
    for _ in range(2):
        assert all(np.array_equal(p, q) for p, q in zip(d.batches(), b.batches()))
        (xd, yd), (xb, yb) = _pixels(list(d), d.geometry), _pixels(list(b), b.geometry)
        assert torch.equal(yd, yb)
        f = _figures(xb, xd)
        assert f["max"] <= 1.0 + 1e-3 and f["p99"] <= 1e-3 and max(map(abs, f["mean"])) < 0.01, f
    assert not torch.equal(xb, _pixels(list(b), b.geometry)[0])  # a new epoch: new order and draws


def test_the_torch_loader_prepares_ahead_and_stops_when_dropped(small_shards, monkeypatch):
    import threading

    from fastgal.load.loader import _Torch

    def producers():
        return [t for t in threading.enumerate() if t.name == "fastgal-loader"]

    dl = dataloaders(small_shards, bs=16, backend="torch", **GEOM).train
    it = iter(dl)
    next(it)
    assert len(producers()) == 1
    it.close()  # lr_find's cancel, one_batch(): the producer thread must end, not wait on a full queue
    assert producers() == []
    calls = []

    def broken(self, view, pos, draws):
        calls.append(1)
        raise OSError("disk read failed")

    monkeypatch.setattr(_Torch, "make", broken)
    with pytest.raises(OSError, match="disk read failed"):  # raised where the user reads, not lost in a thread
        dl.one_batch()
    assert calls == [1] and producers() == []
    threads = list(dl._impl._pool._threads)
    dl.close()  # and the CPU decode threads go with close()
    assert threads and not any(t.is_alive() for t in threads)


def test_auto_picks_torch_on_a_gpu_without_dali_and_batched_is_torch(monkeypatch):
    import fastgal.load.loader as L

    monkeypatch.setattr(L, "dali_available", lambda: False)
    assert L.pick_backend("auto", "cuda") == "torch" and L.pick_backend("auto", "cpu") == "torch"
    monkeypatch.setattr(L, "dali_available", lambda: True)
    assert L.pick_backend("auto", "cuda") == "dali" and L.pick_backend("auto", "cpu") == "torch"
    assert L.pick_backend("batched", "cuda") == "torch"  # the torch path's former name, in old commands and configs


@pytest.mark.nodali
@pytest.mark.skipif(dali_importable(), reason="checks a machine without DALI: make test's second pass blocks it")
def test_without_dali_auto_is_torch_and_dali_is_refused_in_one_line(small_shards, tmp_path):
    from fastgal.load.loader import pick_backend

    assert pick_backend("auto", "cuda") == "torch" and pick_backend("auto", "cpu") == "torch"
    assert dataloaders(small_shards, bs=16, **GEOM).train.backend == "torch"
    res = run_cli("train", small_shards, "--out", tmp_path / "r", "--loader", "dali", ok=False)
    assert res.exit_code != 0 and "--loader dali needs NVIDIA DALI" in res.output and "--loader torch" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "r" / "metrics.json").exists()


def test_ddp_ranks_share_one_permutation_and_draw_their_own_augmentations(small_shards):
    """seed for the order (the same on every rank: disjoint parts), seed + rank for the draws; validation is
    all of the set, in file order, on every rank."""
    a, b = (dataloaders(small_shards, bs=16, backend="torch", seed=7, rank=r, world=2, **GEOM) for r in (0, 1))
    assert (a.train.plan.aug_seed, b.train.plan.aug_seed) == (7, 8)
    assert a.train.plan.order_seed == b.train.plan.order_seed == 7
    pa, pb = (np.concatenate(d.train.batches()) for d in (a, b))
    assert not set(pa) & set(pb) and len(pa) == len(pb) == (len(a.train.split) // 2) // 16 * 16
    assert len(a.train) == len(b.train)
    assert a.valid.batches()[0].tolist() == b.valid.batches()[0].tolist() == list(range(16))
    assert sum(len(p) for p in a.valid.batches()) == len(a.valid.split)


def test_thread_budget_shares_the_cores_between_local_ranks(monkeypatch):
    import fastgal.load.loader

    monkeypatch.setattr(fastgal.load.loader, "default_workers", lambda: 16)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert thread_budget(0) == 4 and thread_budget(3) == 3
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert thread_budget(0) == 16


@pytest.mark.dali
def test_tta_builds_one_pipeline_at_a_time(small_shards):
    from nvidia.dali import Pipeline

    valid = dataloaders(small_shards, bs=64, backend="dali", size=56).valid
    gc.collect()
    alive, n = [], 0
    for view in valid.tta():
        n += sum(len(x) for x, _ in view)
        gc.collect()
        alive.append(sum(isinstance(o, Pipeline) for o in gc.get_objects()))
    assert n == 8 * valid.n and max(alive) <= 1, alive


def test_geometry_that_does_not_fit_is_refused(small_shards):
    sh = Shards(small_shards)
    with pytest.raises(ValueError, match="--crop 80 but the shards were made for a 72 px"):
        geometry_for(sh, size=56, crop=80)
    with pytest.raises(ValueError, match="crop sizes do not fit"):
        geometry_for(sh, size=80)
    with pytest.raises(ValueError, match="fewer than one batch of 999"):
        dataloaders(small_shards, bs=999, **GEOM)
