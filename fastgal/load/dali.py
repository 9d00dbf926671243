"""DALI graphs over fastgal shards: one graph for every view (training draws, centre crop, a TTA view).

    from fastgal.load.dali import PipeSpec, build
    pipe = build(PipeSpec(view="centre", geometry=Geometry(112, 144, False, mean, std), stored=(224, 224)), source)

The same graph runs on a CPU or a GPU; the one switch is PipeSpec.device:
    "cpu": every operator on the CPU, Pipeline(device_id=None)
    "gpu": JPEG decode with device="mixed" (nvJPEG: host parse, GPU decode); everything after
           it runs on the GPU because its input is there; Pipeline(device_id=<cuda index>).
ROI decoding (decoders.image_crop / image_random_crop) is deliberately not used: nvImageCodec 0.9
crashes on it with "mixed" on Hopper GPUs, and the crops here are cheap after a full decode.

Input: external_source, fed by the loader from a Split (JPEG bytes and targets of the positions the
loader's plan reads: an exact per-epoch permutation for training, file order otherwise) and, for
training, each sample's augmentation draws (fastgal.load.order). The graph (geometry.py says what it means):
    decode RGB -> centre crop 144 at recipe.centre_offset (skipped for shards pre-cropped by `--precrop`)
    -> train: rotate by the drawn angle (90*k + a uniform +-10 deg with p=0.75), fill 0 = dark sky
       tta view v: rotate by 90 * turns exactly (nearest neighbour: pixel centres map onto pixel centres)
    -> crop_mirror_normalize: the 112 crop (drawn position, or centred by the same rule), mirror, (x - mean) / std
90*k rotations and a mirror together draw all 8 dihedral symmetries uniformly.
Float shards (FITS bands, PipeSpec.image "float16"/"float32"): external_source gives each (bands, H, W) array
as stored; no decode: copied to the GPU as stored (float16: half the bytes), cast to float32 and transposed
to HWC there, then the same crop and rotate (linear, fill 0), the stretch asinh(x / softening) per band as a
DALI arithmetic expression, and crop_mirror_normalize with the stretched values' statistics.
This is the only module that builds a DALI graph (DALI is imported inside define()/build(), so the spec imports
anywhere); loader.py's DALI backend runs it, bench/shuffle.py feeds it from DALI's own WebDataset reader.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fastgal.load.geometry import CENTRE, TRAIN, Geometry, View, check_view, dihedral
from fastgal.recipe import centre_offset


@dataclass
class PipeSpec:
    view: View  # geometry.TRAIN | CENTRE | a TTA view 0..7
    geometry: Geometry
    batch_size: int = 128
    device: str = "cpu"  # "cpu" | "gpu": the placement switch
    device_id: int | None = None  # CUDA index when device == "gpu"
    num_threads: int = 2
    seed: int = 42  # DALI's own generators (the draws come from fastgal.load.order)
    prefetch: int = 2
    image: str = "jpeg"  # what external_source gives: "jpeg" bytes, or "float16"/"float32" (bands, H, W) arrays
    stored: tuple[int, int] | None = None  # the images' (h, w) as stored (every sample of a split has it): where
    # the centre region starts; needed unless the geometry is pre-cropped
    stages: dict = field(default_factory=dict, repr=False)  # filled by define(): stage -> DataNode


def centre_pos(side: int, crop: int) -> float:
    """DALI's normalised crop position that starts a centred crop where recipe.centre_offset does (DALI's own
    centre, crop_pos 0.5, rounds an odd side - crop up; the exact fraction rounds back to the offset)."""
    return centre_offset(side, crop) / (side - crop) if side > crop else 0.5


def define(spec: PipeSpec, source=None):
    """Declare the graph inside an active Pipeline context; return the (images, targets) nodes.

    source: an iterable of batches, (jpegs, targets) or for training (jpegs, targets, angle, pos_x,
    pos_y, mirror); one pass. Also records each stage's DataNode in spec.stages so the placement can be
    inspected (tests check it without a GPU: declaring a graph needs no CUDA, building it does).
    """
    import nvidia.dali.types as dtypes  # not `types`: fastai's star import shadows that name
    from nvidia.dali import fn

    check_view(spec.view)
    train = spec.view == TRAIN
    image_type = {"jpeg": dtypes.UINT8, "float16": dtypes.FLOAT16, "float32": dtypes.FLOAT}[spec.image]
    types = [image_type, dtypes.FLOAT] + ([dtypes.FLOAT, dtypes.FLOAT, dtypes.FLOAT, dtypes.INT32] if train else [])
    layouts = ["CHW" if spec.image != "jpeg" else ""] + [""] * (len(types) - 1)
    # a graph declared only to be inspected still needs a source: an empty one stands in
    jpg, y, *draws = fn.external_source(source=() if source is None else source, num_outputs=len(types),
                                        batch=True, dtype=types, layout=layouts)
    return augment(spec, jpg, y, *draws)


def augment(spec: PipeSpec, jpg, y, angle=None, pos_x=0.5, pos_y=0.5, mirror=0):
    """decode -> centre crop -> rotate -> crop/mirror/normalize for the spec's view, on DataNodes from any
    reader (bench --what shuffle feeds it from DALI's own WebDataset reader)."""
    import nvidia.dali.types as dtypes
    from nvidia.dali import fn

    gpu, g = spec.device == "gpu", spec.geometry
    if spec.image == "jpeg":
        # fancy upsampling: nvJPEG ("mixed") then upsamples chroma as libjpeg-turbo does on the CPU (and as
        # torchvision and PIL do), so a galaxy's colours - the metallicity signal - do not depend on the decoder
        img = fn.decoders.image(jpg, device="mixed" if gpu else "cpu", output_type=dtypes.RGB, jpeg_fancy_upsampling=True)
    else:  # float bands: to the GPU as stored, then float32 HWC (the layout crop and rotate take)
        img = fn.transpose(fn.cast(jpg.gpu() if gpu else jpg, dtype=dtypes.FLOAT), perm=[1, 2, 0], output_layout="HWC")
    spec.stages["decode"] = img
    if not g.precropped:
        if spec.stored is None:
            raise ValueError("PipeSpec.stored (the images' stored size) is needed to centre the crop region")
        h, w = spec.stored
        img = fn.crop(img, crop=(g.crop, g.crop), crop_pos_x=centre_pos(w, g.crop), crop_pos_y=centre_pos(h, g.crop))
        spec.stages["centre_crop"] = img  # centred: CropPad(144)
    if spec.view == TRAIN:
        img = fn.rotate(img, angle=angle, keep_size=True, fill_value=0, interp_type=dtypes.INTERP_LINEAR)
        spec.stages["rotate"] = img
    elif spec.view != CENTRE:
        turns, flip = dihedral(spec.view)
        if turns:
            img = fn.rotate(img, angle=float(90 * turns), keep_size=True, fill_value=0, interp_type=dtypes.INTERP_NN)
            spec.stages["rotate"] = img
        mirror = int(flip)
    if spec.view != TRAIN:  # the size crop at the centre of the (turned) region, as recipe.centre_offset places it
        pos_x = pos_y = centre_pos(g.crop, g.size)
    if g.softening is not None:
        import nvidia.dali.math as dmath

        inv = np.asarray([1.0 / float(v) for v in g.softening], np.float32)
        img = dmath.asinh(img * dtypes.Constant(inv))  # per band: broadcast over the last (channel) axis
        spec.stages["stretch"] = img
    out = fn.crop_mirror_normalize(
        img, crop=(g.size, g.size), crop_pos_x=pos_x, crop_pos_y=pos_y, mirror=mirror,
        mean=list(map(float, g.mean)), std=list(map(float, g.std)), dtype=dtypes.FLOAT, output_layout="CHW",
    )
    spec.stages["normalize"] = out
    if gpu:
        y = y.gpu()  # targets ride with the images, so the iterator hands over one device
    spec.stages["targets"] = y
    return out, y


def pipeline(spec: PipeSpec):
    """An empty Pipeline with the spec's batch size, threads and placement (device_id None on the CPU:
    DALI wants None, not -1)."""
    from nvidia.dali import Pipeline

    if spec.device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', got {spec.device!r}")
    return Pipeline(batch_size=spec.batch_size, num_threads=spec.num_threads,
                    device_id=(spec.device_id or 0) if spec.device == "gpu" else None,
                    seed=spec.seed, prefetch_queue_depth=spec.prefetch, exec_dynamic=True)


def build(spec: PipeSpec, source=None):
    """A ready-to-build Pipeline for spec over `source` (see define)."""
    pipe = pipeline(spec)
    with pipe:
        pipe.set_outputs(*define(spec, source))
    return pipe
