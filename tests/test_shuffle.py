"""Training epochs: an exact, seeded permutation every epoch on both backends (fastgal.order), DDP ranks
disjoint with equal steps, the shuffle metrics of `fastgal bench --what shuffle`, and --resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import dali_importable, private_writable_gib, run_cli
from fastgal.bench_shuffle import cobatch_ratio, shuffle_section, spearman
from fastgal.loaders import make_dls

BACKENDS = [pytest.param("dali", marks=pytest.mark.dali), "torch"]
GEOM = dict(size=56, crop=72)


def _batches(order: np.ndarray, bs: int) -> list[np.ndarray]:
    return [order[i:i + bs] for i in range(0, len(order) - bs + 1, bs)]


def test_shuffle_metrics_on_known_sequences():
    n, bs = 20000, 100
    rng = np.random.default_rng(0)
    a, b = _batches(rng.permutation(n), bs), _batches(rng.permutation(n), bs)
    assert abs(spearman(a, b)) < 0.03  # sd 1/sqrt(n) = 0.007
    assert cobatch_ratio(a, b) == pytest.approx(1.0, abs=0.1)  # ~10k pairs expected together: sd ~1%
    same = _batches(np.arange(n), bs)
    assert spearman(same, same) == pytest.approx(1.0)
    # b = a: every pair together again, chance is (bs - 1) / (n - 1)
    assert cobatch_ratio(same, same) == pytest.approx((n - 1) / (bs - 1))
    backwards = _batches(np.arange(n)[::-1].copy(), bs)
    assert spearman(same, backwards) == pytest.approx(-1.0)
    assert cobatch_ratio(same, backwards) == pytest.approx((n - 1) / (bs - 1))  # same batches, reversed
    # a buffer shuffle (what DALI's reader does): local, so it remembers the last epoch
    def buffered(seed, fill=400):
        r, buf, out = np.random.default_rng(seed), [], []
        for i in range(n):
            buf.append(i)
            if len(buf) == fill:
                out.append(buf.pop(r.integers(fill)))
        return np.array(out + [buf[j] for j in r.permutation(len(buf))])
    x, y = _batches(buffered(1), bs), _batches(buffered(2), bs)
    assert spearman(x, y) > 0.9 and cobatch_ratio(x, y) > 5


def _epochs(dl, k: int) -> list[np.ndarray]:
    return [torch.cat([p for _, _, p in dl]).numpy() for _ in range(k)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_epoch_is_a_new_exact_permutation(small_shards, backend):
    BS = 24  # 208 samples: 8 batches, 16 left over
    dls = make_dls(small_shards, bs=BS, backend=backend, **GEOM)
    n = dls.train.n
    eps = _epochs(dls.train.new(with_pos=True), 3)
    for e in eps:  # full batches of distinct samples; only the tail that does not fill a batch is left out
        assert len(e) == (n // BS) * BS and len(set(e.tolist())) == len(e) and set(e.tolist()) <= set(range(n))
    assert not np.array_equal(eps[0], eps[1]) and not np.array_equal(eps[1], eps[2])
    left_out = [set(range(n)) - set(e.tolist()) for e in eps]
    assert left_out[0] != left_out[1]  # the dropped tail is not always the same samples
    # seeded: a fresh loader reads the same epochs; set_epoch(2) reads the third epoch directly
    again = make_dls(small_shards, bs=BS, backend=backend, **GEOM).train.new(with_pos=True)
    again.set_epoch(2)
    assert np.array_equal(_epochs(again, 1)[0], eps[2])
    other = make_dls(small_shards, bs=BS, backend=backend, seed=7, **GEOM).train.new(with_pos=True)
    assert not np.array_equal(_epochs(other, 1)[0], eps[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_epoch_is_the_same_batches_whoever_reads_it(small_shards, backend):
    """Order and augmentation come from (seed, epoch): an interrupted epoch, another thread count or
    reading it after other epochs changes nothing."""
    a = make_dls(small_shards, bs=16, backend=backend, num_threads=1, **GEOM).train
    b = make_dls(small_shards, bs=16, backend=backend, num_threads=2, **GEOM).train
    a.one_batch()  # a cut-short epoch does not count
    list(a)
    xa = [x for x, _ in a]  # epoch 1
    b.set_epoch(1)
    xb = [x for x, _ in b]
    assert len(xa) == len(xb) == len(a)
    assert all(torch.equal(p, q) for p, q in zip(xa, xb))


@pytest.mark.dali
def test_dali_and_torch_read_the_same_order_with_the_same_draws(small_shards):
    d = make_dls(small_shards, bs=16, backend="dali", **GEOM).train.new(with_pos=True)
    t = make_dls(small_shards, bs=16, backend="torch", **GEOM).train.new(with_pos=True)
    for _ in range(2):
        bd, bt = list(d), list(t)
        assert all(torch.equal(p.cpu(), q) for (_, _, p), (_, _, q) in zip(bd, bt))
        std = torch.tensor(d.spec.std).view(1, 3, 1, 1)
        # same rotation, crop and mirror; the decoders and bilinear resamplers differ by a few grey levels
        diffs = [((xd - xt).abs() * std).mean() for (xd, _, _), (xt, _, _) in zip(bd, bt)]
        assert max(diffs) < 3.0


def test_bench_shuffle_section(small_shards):
    res = json.loads(run_cli("bench", small_shards, "--what", "shuffle", "--bs", 16, "--size", 56, "--workers", 1,
                             "--epochs", 3, "--ranks", 2, "--json", "--quiet").stdout)
    sh = res["shuffle"]
    names = {"torch"} | ({"dali", "dali-stream", "dali-stream+epoch", "dali-stream+epoch+fill16k"}
                         if dali_importable() else set())
    assert set(sh["results"]) == names and sh["ranks"] == 2
    n = res["n_train"]
    for name, r in sh["results"].items():
        assert len(r["spearman"]) == len(r["cobatch_ratio"]) == 2 and len(r["time_to_first_batch_s"]) == 3
        assert all(t > 0 for t in r["time_to_first_batch_s"]) and all(v > 0 for v in r["images_per_s"])
        if r["reader"] == "index":
            # DDP: disjoint, equal steps, a new split every epoch
            assert r["steps_per_rank"] == [[(n // 2) // 16] * 2] * 3
            assert r["samples_on_several_ranks"] == [0, 0, 0]
            assert all(0 < f < 1 for pair in r["rank_set_new_fraction"] for f in pair)
    if dali_importable():  # the 16k buffer capped at a rank's share: more could never fill, and costs ~1 MB a sample
        assert sh["results"]["dali-stream+epoch+fill16k"]["shuffle_buffer"] == -(-n // 2)
    assert "Spearman" in run_cli("bench", small_shards, "--what", "shuffle", "--bs", 16, "--size", 56,
                                 "--workers", 1, "--quiet").output


def test_shuffle_section_holds_one_loader_at_a_time():
    """Each simulated rank's loader is read, closed and collected before the next is built: a DALI reader with
    a 16k shuffle buffer maps ~15 GiB, and two of them alive made the torch backend's fork() fail (ENOMEM)."""
    live, seen = set(), []

    class Loader:
        def __init__(self, rank, ranks):
            self.rank, self.ranks, self.me = rank, ranks, object()
            self.cycle = self  # in a reference cycle: only the collector frees it, so release must collect
            live.add(id(self.me))

        def __iter__(self):
            seen.append(len(live))
            order = np.arange(self.rank, 64, self.ranks)
            for b in _batches(order, 8):
                yield None, None, b

        def close(self):
            pass

        def __del__(self):
            live.discard(id(self.me))

    specs = []
    res = shuffle_section(lambda backend, r, k, **spec: specs.append(spec) or Loader(r, k),
                          ["torch", "dali-stream+epoch+fill16k"], 64, 2, 3)
    assert seen and max(seen) == 1, f"loaders alive at once while one was read: {seen}"
    assert specs[-1]["shuffle_buffer"] == 22  # 16k capped at a rank's share, ceil(64 / 3)
    assert res["results"]["torch"]["coverage"] == [0.75, 0.75]  # 3 ranks x 2 batches of 8 of the 64 samples


def test_the_mapping_guard_sees_a_private_mapping():
    """conftest's guard (fail a test that leaves > 8 GiB mapped) measures what fork() must commit."""
    import mmap

    before = private_writable_gib()
    if before is None:
        pytest.skip("no /proc/self/maps here")
    m = mmap.mmap(-1, 2**30, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # 1 GiB, never touched
    try:
        assert abs(private_writable_gib() - before - 1.0) < 0.05
    finally:
        m.close()
    assert abs(private_writable_gib() - before) < 0.05


@pytest.mark.slow
def test_ddp_ranks_read_disjoint_equal_parts_every_epoch(small_shards, tmp_path):
    """Two gloo processes under torchrun build their loaders as `fastgal train` does (tests/ddp_epochs.py)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         str(Path(__file__).with_name("ddp_epochs.py")), str(small_shards), str(tmp_path), "3"],
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    n, bs = ranks[0]["n"], ranks[0]["bs"]
    for e in range(3):
        a, b = (set(r["epochs"][e]) for r in ranks)
        assert not a & b  # disjoint
        assert [len(r["epochs"][e]) for r in ranks] == [(n // 2) // bs * bs] * 2  # equal steps
        assert [r["steps"] for r in ranks] == [len(r["epochs"][e]) // bs for r in ranks]
    assert set(ranks[0]["epochs"][0]) != set(ranks[0]["epochs"][1])  # a new assignment every epoch
    assert ranks[0]["seed"] != ranks[1]["seed"]  # each rank its own augmentation draws


TRAIN = ("--epochs", "3", "--bs", "32", "--arch", "xresnet18", "--size", "32", "--quiet", "--workers", "1")


def _train(shards, out, *extra, **kw):
    return subprocess.Popen([sys.executable, "-m", "fastgal", "train", str(shards), "--out", str(out), *TRAIN, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("loader", [pytest.param("dali", marks=pytest.mark.dali), "torch"])
def test_a_killed_run_resumes_to_the_same_result(small_shards, tmp_path, loader):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    p = _train(small_shards, cut, "--loader", loader)
    ckpt = cut / "checkpoint.pth"
    t0 = time.time()
    while not ckpt.exists() and p.poll() is None and time.time() - t0 < 600:
        time.sleep(0.05)
    time.sleep(0.5)  # into the next epoch
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert ckpt.exists() and not (cut / "metrics.json").exists(), p.stderr.read()[-2000:]
    assert torch.load(ckpt, weights_only=False)["epoch"] < 2  # killed with work left
    out, err = _train(small_shards, cut, "--loader", loader, "--resume").communicate(timeout=900)
    assert (cut / "metrics.json").exists(), err[-2000:]
    out, err = _train(small_shards, whole, "--loader", loader).communicate(timeout=900)
    assert (whole / "metrics.json").exists(), err[-2000:]
    m_cut, m_whole = (json.loads((d / "metrics.json").read_text()) for d in (cut, whole))
    assert m_cut["resumed_from_epoch"] in (1, 2) and m_whole["resumed_from_epoch"] is None
    assert abs(m_cut["rmse"] - m_whole["rmse"]) <= 1e-6
    h_cut, h_whole = (pd.read_csv(d / "history.csv") for d in (cut, whole))
    cols = ["epoch", "train_loss", "valid_loss", "rmse_metallicity", "rmse_lgm_tot_p50"]
    assert np.allclose(h_cut[cols].values, h_whole[cols].values, rtol=0, atol=1e-6)
    assert not (cut / "checkpoint.pth").exists() and not (cut / "best.pth").exists()  # finished: cleaned up


def test_resume_refusals(small_shards, tmp_path):
    run = tmp_path / "r"
    res = run_cli("train", small_shards, "--out", run, "--resume", ok=False)
    assert res.exit_code != 0 and "no run to resume" in res.output
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"epochs": 3, "lr": 0.01}))
    res = run_cli("train", small_shards, "--out", run, "--size", 56, "--epochs", 3, "--lr", 0.02, "--resume", ok=False)
    assert res.exit_code != 0 and "lr = 0.01, not 0.02" in res.output and len(res.output.strip().splitlines()) == 1
    res = run_cli("train", small_shards, "--out", run, "--resume", "--overwrite", ok=False)
    assert res.exit_code != 0 and "one of them" in res.output
    (run / "metrics.json").write_text("{}")
    res = run_cli("train", small_shards, "--out", run, "--resume", ok=False)
    assert res.exit_code != 0 and "finished" in res.output and "--overwrite" in res.output
    res = run_cli("train", small_shards, "--out", run, ok=False)
    assert res.exit_code != 0 and "--resume" in res.output
