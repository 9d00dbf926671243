"""fastgal.bench.shuffle (`fastgal bench --what shuffle`): the shuffle metrics on known sequences, the section
through the CLI, one simulated rank's loader alive at a time, and conftest's mapping guard that watches for it."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import dali_importable, private_writable_gib

from fastgal.bench.shuffle import cobatch_ratio, shuffle_section, spearman


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


def test_bench_shuffle_section(bench_all):
    res = bench_all  # --bs 16, --epochs 3, --ranks 2
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
    from fastgal.bench.main import format_table

    assert "Spearman" in format_table(res)  # what the command prints without --json


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
