"""DALI graphs over fastgal shards: train (augmented), valid (centre crop) and tta (8 dihedral views).

    from fastgal.pipeline import PipeSpec, build
    pipe = build(PipeSpec(kind="valid", tars=[...], idxs=[...], mean=[...], std=[...]))

The same graph runs on a CPU or a GPU; the one switch is PipeSpec.device:
    "cpu": every operator on the CPU, Pipeline(device_id=None)
    "gpu": JPEG decode with device="mixed" (nvJPEG: host parse, GPU decode); everything after
           it runs on the GPU because its input is there; Pipeline(device_id=<cuda index>).
ROI decoding (decoders.image_crop / image_random_crop) is deliberately not used: nvImageCodec 0.9
crashes on it with "mixed" on Hopper GPUs, and the crops here are cheap after a full decode.

Train graph (the seed's fastai DataBlock, CropPad 144 -> RandomCrop 112 -> dihedral + rotate):
    external_source (fastgal.order: JPEG bytes, targets and the augmentation draws of an exact
    per-epoch permutation, read through the DALI index files; the "index" reader) -> decode RGB
    -> centre crop 144 (skipped for shards pre-cropped by `fastgal shard --precrop`)
    -> rotate by 90*k (+ a uniform +-10 deg with p=0.75), fill 0 = dark sky
    -> crop_mirror_normalize: random 112 crop, horizontal mirror, (x - mean) / std, CHW float
90*k rotations and a mirror together draw all 8 dihedral symmetries uniformly.
The valid and tta graphs read with readers.webdataset in file order (the "stream" reader); the train
graph can too (random_shuffle in a buffer of `shuffle_buffer` samples, optionally shuffle_after_epoch),
which is what `fastgal bench --what shuffle` compares the index reader with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

# DALI is imported inside define()/build() only: PipeSpec (the graph's description, which the torch
# fallback loader reads too) must import on machines without DALI (macOS, Windows, many aarch64 boxes).

READER = "Reader"  # the name DALI iterators use to ask the reader for epoch size


@dataclass
class PipeSpec:
    kind: str  # "train" | "valid" | "tta"
    tars: Sequence[str]
    idxs: Sequence[str]
    mean: Sequence[float]  # per channel, 0-255 units (manifest pixel_stats)
    std: Sequence[float]
    target_ext: str = "target.f32"
    image_ext: str = "jpg"
    batch_size: int = 128
    size: int = 112  # the crop the model sees
    crop: int = 144  # the CropPad region random crops are drawn from
    precropped: bool = False  # shards already hold the centre `crop` region
    max_rotate: float = 10.0
    p_rotate: float = 0.75  # fastai aug_transforms' p_affine
    tta_view: int = 0  # 0..7 for kind="tta": mirror = view // 4, rotation = 90 * (view % 4)
    device: str = "cpu"  # "cpu" | "gpu": the placement switch
    device_id: int | None = None  # CUDA index when device == "gpu"
    num_threads: int = 2
    seed: int = 42  # DALI's generators; the index reader's augmentation draws (seed + rank for training)
    order_seed: int = 42  # the index reader's per-epoch permutation: the same on every rank
    shard_id: int = 0  # this process's part of the data (DDP rank) ...
    num_shards: int = 1  # ... out of this many (DDP world size)
    reader: str = "index"  # train: "index" (exact per-epoch permutation) | "stream" (DALI's buffer shuffle)
    shuffle_buffer: int = 0  # stream reader: 0 = 4 batches
    shuffle_after_epoch: bool = False  # stream reader: visit the tars in a new order every epoch
    with_pos: bool = False  # measurement mode: batches also carry the samples' positions (bench --what shuffle)
    prefetch: int = 2
    stages: dict = field(default_factory=dict, repr=False)  # filled by define(): stage -> DataNode


def define(spec: PipeSpec, source=None):
    """Declare the graph inside an active Pipeline context; return the (images, targets[, positions]) nodes.

    source: for the index reader, an iterable of batches (fastgal.order.EpochSource); one epoch.

    Also records each stage's DataNode in spec.stages so the placement can be inspected
    (tests check it without a GPU: declaring a graph needs no CUDA, building it does).
    """
    from nvidia.dali import fn
    import nvidia.dali.types as dtypes  # not `types`: fastai's star import shadows that name

    if spec.kind not in ("train", "valid", "tta"):
        raise ValueError(f"unknown pipeline kind {spec.kind!r}")
    gpu = spec.device == "gpu"
    train = spec.kind == "train"
    if train and spec.reader == "index":
        # a graph declared only to be inspected still needs a source: an empty one stands in
        jpg, y, angle, pos_x, pos_y, mirror, *pos = fn.external_source(
            source=() if source is None else source, num_outputs=6 + spec.with_pos, batch=True,
            dtype=[dtypes.UINT8, dtypes.FLOAT, dtypes.FLOAT, dtypes.FLOAT, dtypes.FLOAT, dtypes.INT32]
            + [dtypes.INT64] * spec.with_pos)
    elif spec.reader in ("index", "stream"):
        jpg, y = fn.readers.webdataset(
            paths=list(spec.tars), index_paths=list(spec.idxs),
            ext=[spec.image_ext, spec.target_ext], dtypes=[dtypes.UINT8, dtypes.FLOAT],
            missing_component_behavior="error", name=READER,
            random_shuffle=train, initial_fill=spec.shuffle_buffer or 4 * spec.batch_size,
            shuffle_after_epoch=train and spec.shuffle_after_epoch,
            shard_id=spec.shard_id, num_shards=spec.num_shards,
            pad_last_batch=not train, stick_to_shard=not train, seed=spec.seed,
            prefetch_queue_depth=spec.prefetch,
        )
        # measurement mode: "tar:offset:key.jpg", zero-padded to one length per batch for the torch iterator
        pos = [fn.pad(fn.get_property(jpg, key="source_info"), fill_value=0)] if spec.with_pos else []
    else:
        raise ValueError(f"unknown reader {spec.reader!r}; use index or stream")
    # fancy upsampling: nvJPEG ("mixed") then upsamples chroma as libjpeg-turbo does on the CPU (and as
    # torchvision and PIL do), so a galaxy's colours - the metallicity signal - do not depend on the decoder
    img = fn.decoders.image(jpg, device="mixed" if gpu else "cpu", output_type=dtypes.RGB, jpeg_fancy_upsampling=True)
    spec.stages["decode"] = img
    if not spec.precropped:
        img = fn.crop(img, crop=(spec.crop, spec.crop))  # centred: CropPad(144)
        spec.stages["centre_crop"] = img

    if train:
        if spec.reader == "stream":  # the draws come from DALI's generators; the index reader brings its own
            k = fn.random.uniform(values=[0.0, 90.0, 180.0, 270.0])
            jitter = fn.random.uniform(range=(-spec.max_rotate, spec.max_rotate)) * fn.random.coin_flip(probability=spec.p_rotate)
            angle = k + jitter
            pos_x, pos_y = fn.random.uniform(range=(0.0, 1.0)), fn.random.uniform(range=(0.0, 1.0))
            mirror = fn.random.coin_flip(probability=0.5)
        img = fn.rotate(img, angle=angle, keep_size=True, fill_value=0, interp_type=dtypes.INTERP_LINEAR)
        spec.stages["rotate"] = img
    elif spec.kind == "tta":
        view = int(spec.tta_view)
        if not 0 <= view < 8:
            raise ValueError(f"tta_view must be 0..7, got {view}")
        if view % 4:
            # exact for square crops: 90-degree multiples map pixel centres onto pixel centres
            img = fn.rotate(img, angle=float(90 * (view % 4)), keep_size=True, fill_value=0, interp_type=dtypes.INTERP_NN)
            spec.stages["rotate"] = img
        pos_x = pos_y = 0.5
        mirror = int(view >= 4)
    else:
        pos_x = pos_y = 0.5
        mirror = 0

    out = fn.crop_mirror_normalize(
        img, crop=(spec.size, spec.size), crop_pos_x=pos_x, crop_pos_y=pos_y, mirror=mirror,
        mean=list(map(float, spec.mean)), std=list(map(float, spec.std)),
        dtype=dtypes.FLOAT, output_layout="CHW",
    )
    spec.stages["normalize"] = out
    if gpu:
        y = y.gpu()  # targets ride with the images, so the iterator hands over one device
    spec.stages["targets"] = y
    return (out, y, *pos)


def build(spec: PipeSpec, source=None) -> Pipeline:
    """A ready-to-build Pipeline for spec (device_id None on the CPU: DALI wants None, not -1)."""
    from nvidia.dali import Pipeline

    if spec.device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', got {spec.device!r}")
    pipe = Pipeline(
        batch_size=spec.batch_size, num_threads=spec.num_threads,
        device_id=(spec.device_id or 0) if spec.device == "gpu" else None,
        seed=spec.seed, prefetch_queue_depth=spec.prefetch, exec_dynamic=True,
    )
    with pipe:
        pipe.set_outputs(*define(spec, source))
    return pipe
