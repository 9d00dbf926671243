"""fastgal.load.dali: the DALI graph of each view, declared on a CPU; the GPU placement is inspected without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastgal.load.geometry import Geometry

GEO = Geometry(size=56, crop=72, precropped=False, mean=[0.0] * 3, std=[1.0] * 3)


def test_dali_is_imported_only_where_a_graph_is_built():
    """Every module imports without DALI (the torch backend must be reachable on machines that lack it)."""
    code = ("import sys, fastgal.cli, fastgal.run, fastgal.score.predict, fastgal.load.loader, fastgal.load.dali, fastgal.demo, "
            "fastgal.bench.main, fastgal.bench.shuffle; print(sorted(m for m in sys.modules if m.startswith('nvidia.dali')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


FLOAT5 = Geometry(size=56, crop=72, precropped=False, mean=[0.0] * 5, std=[1.0] * 5, softening=[0.01] * 5)


@pytest.mark.dali
@pytest.mark.parametrize("image", ["jpeg", "float16"])
@pytest.mark.parametrize("view", ["train", "centre", 5, 4])
def test_gpu_placement_in_the_declared_graph(view, image):
    """The GPU switch decodes with 'mixed' (its output is already on the GPU) and keeps every later stage
    and the targets on the GPU; no GPU is needed to declare a graph. The CPU graph has the same stages.
    Float bands (FITS shards) go to the GPU as stored, before the cast, and are stretched there."""
    from nvidia.dali import Pipeline

    from fastgal.load.dali import PipeSpec, define

    geo = GEO if image == "jpeg" else FLOAT5
    spec = PipeSpec(view=view, geometry=geo, device="gpu", image=image, stored=(112, 112))
    with Pipeline(batch_size=2, num_threads=1, device_id=0):
        define(spec)
    for stage, node in spec.stages.items():
        assert node.device == "gpu", (stage, node.device)  # a CPU decode + .gpu() would leave "decode" on cpu
    assert ("stretch" in spec.stages) == (image != "jpeg")
    cpu = PipeSpec(view=view, geometry=geo, device="cpu", image=image, stored=(112, 112))
    with Pipeline(batch_size=2, num_threads=1, device_id=None):
        define(cpu)
    assert {n.device for n in cpu.stages.values()} == {"cpu"}
    assert set(cpu.stages) == set(spec.stages)  # the same graph, only the placement differs
    # rotation only where the view turns the image (view 4 is a pure mirror), a centre crop unless pre-cropped
    assert ("rotate" in cpu.stages) == (view in ("train", 5)) and "centre_crop" in cpu.stages


@pytest.mark.dali
def test_precropped_shards_skip_the_centre_crop_and_views_are_checked():
    from nvidia.dali import Pipeline

    from fastgal.load.dali import PipeSpec, define

    spec = PipeSpec(view="centre", geometry=Geometry(56, 72, True, [0.0] * 3, [1.0] * 3))
    with Pipeline(batch_size=2, num_threads=1, device_id=None):
        define(spec)
    assert "centre_crop" not in spec.stages
    with pytest.raises(ValueError, match="0..7"):
        define(PipeSpec(view=8, geometry=GEO, stored=(112, 112)))
    with Pipeline(batch_size=2, num_threads=1, device_id=None), pytest.raises(ValueError, match="stored size"):
        define(PipeSpec(view="centre", geometry=GEO))  # where the region starts needs the images' size


def test_the_no_dali_pass_blocks_dali_in_subprocesses_too():
    """make test's second pass puts tests/nodali first on the path: DALI must fail, the rest of nvidia load."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).with_name("nodali"))}
    code = "import torch\ntry:\n    import nvidia.dali\nexcept ImportError as e:\n    print('blocked:', e)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.startswith("blocked:") and "FASTGAL_NO_DALI" in out


def test_astropy_is_imported_only_where_a_fits_file_is_touched():
    """JPEG-only users need no astropy (the `fits` extra): no module imports it until a FITS file is read or written."""
    code = ("import sys, fastgal.cli, fastgal.run, fastgal.score.predict, fastgal.load.loader, fastgal.shards.write, fastgal.shards.cutouts, "
            "fastgal.shards.fits, fastgal.survey.synth, fastgal.demo; print(sorted(m for m in sys.modules if m.startswith('astropy')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
