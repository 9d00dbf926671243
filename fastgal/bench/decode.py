"""`fastgal bench --what decode`: images/s of the JPEG decoders alone over the training shards, nothing else.

    fastgal bench shards/synth --what decode --device cuda --bs 256 --batches 40 --json

  torch  fastgal's batched decode (fastgal.load.decode: libjpeg-turbo on the CPU over --workers threads, one
         batched nvJPEG call on CUDA); on CUDA also nvJPEG's pixels against libjpeg-turbo's (chroma upsampling
         may shift colours, and colour is the metallicity signal), in 0-255 units
  dali   where DALI is importable: its CPU decoder, and on CUDA its `mixed` (nvJPEG) decoder with the CPU's
         chroma upsampling
Each rate is the best of --repeats windows of --batches batches of --bs after --warmup untimed batches (the
pool's threads, nvJPEG's handles, DALI's pipeline start).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import torch

from fastgal.bench.common import sync


def _windows(split, bs: int, batches: int) -> list[range]:
    """Positions of up to `batches` whole batches, wrapping round the split when it is short."""
    n = len(split)
    if n < bs:
        raise ValueError(f"--what decode: {n} training samples is fewer than one batch of {bs}; lower --bs")
    per = n // bs
    return [range((i % per) * bs, (i % per + 1) * bs) for i in range(batches)]


def _torch_rate(split, device: torch.device, pos: list[range], warm: list[range], repeats: int, threads: int) -> float:
    from fastgal.load.decode import decode_batch

    rates = []
    with ThreadPoolExecutor(threads) as pool:
        for p in warm:
            decode_batch(split.batch(p)[0], device, pool=pool)
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            for p in pos:
                decode_batch(split.batch(p)[0], device, pool=pool)
            sync(device)
            rates.append(len(pos) * len(pos[0]) / (time.perf_counter() - t0))
    return max(rates)


def _dali_rate(split, where: str, bs: int, batches: int, warmup: int, repeats: int, threads: int) -> float:
    from nvidia.dali import Pipeline, fn, types

    pipe = Pipeline(batch_size=bs, num_threads=threads, device_id=0 if where == "mixed" else None, prefetch_queue_depth=2)
    with pipe:
        jpg = fn.readers.webdataset(paths=split.tars, index_paths=split.idxs, ext=[split.image_ext])
        extra = {"jpeg_fancy_upsampling": True} if where == "mixed" else {}  # the chroma upsampling of the CPU
        pipe.set_outputs(fn.decoders.image(jpg, device=where, output_type=types.RGB, **extra))
    pipe.build()
    try:
        for _ in range(max(warmup, 1)):
            pipe.run()
        rates = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(batches):
                (imgs,) = pipe.run()
            if where == "mixed":
                imgs.as_cpu()  # waits for the GPU's last batch
            rates.append(bs * batches / (time.perf_counter() - t0))
        return max(rates)
    finally:
        del pipe


def pixels_gpu_vs_cpu(split, pos: list[range]) -> dict:
    """nvJPEG's pixels against libjpeg-turbo's over a few batches: max and mean |delta|, signed per-channel means."""
    from fastgal.load.decode import decode_batch

    mx, total, signed, n = 0.0, 0.0, torch.zeros(3, dtype=torch.float64), 0
    for p in pos[:4]:
        jpegs = split.batch(p)[0]
        d = decode_batch(jpegs, "cuda").double().cpu() - decode_batch(jpegs, "cpu").double()
        mx, total = max(mx, float(d.abs().max())), total + float(d.abs().sum())
        signed += d.sum(dim=(0, 2, 3))
        n += d.numel() // 3
    return {"max_abs": round(mx, 3), "mean_abs": round(total / max(3 * n, 1), 4),
            "mean_signed_rgb": [round(float(v), 4) for v in signed / max(n, 1)]}


def decode_bench(shards, *, bs: int, batches: int, warmup: int, repeats: int, device: torch.device, threads: int,
                 log) -> dict:
    """The decode section's result (see the module docstring)."""
    from fastgal.load.decode import decoder_name
    from fastgal.load.loader import dali_available

    split = shards.split("train")
    if split.kind != "jpeg":
        return {"results": {}, "skipped": {"decode": "the shards hold FITS bands: there is no JPEG to decode"}}
    pos, warm = _windows(split, bs, batches), _windows(split, bs, warmup) if warmup else []
    cuda = device.type == "cuda"
    res = {"bs": bs, "batches": batches, "threads": threads, "torch_decoder": decoder_name(), "results": {},
           "skipped": {}}
    runs = [("torch_cpu", lambda: _torch_rate(split, torch.device("cpu"), pos, warm, repeats, threads))]
    if cuda:
        runs.append(("torch_gpu", lambda: _torch_rate(split, device, pos, warm, repeats, threads)))
    if dali_available():
        runs.append(("dali_cpu", lambda: _dali_rate(split, "cpu", bs, batches, warmup, repeats, threads)))
        if cuda:
            runs.append(("dali_gpu", lambda: _dali_rate(split, "mixed", bs, batches, warmup, repeats, threads)))
    else:
        res["skipped"]["dali"] = "NVIDIA DALI is not importable here"
    for name, rate in runs:
        res["results"][name] = {"images_per_s": round(rate(), 1)}
        log(f"  decode {name}: {res['results'][name]['images_per_s']:,.1f} images/s")
    if cuda:
        res["torch_gpu_vs_cpu_pixels"] = pixels_gpu_vs_cpu(split, pos)
    return res


def decode_table(res: dict) -> list[str]:
    if not res["results"]:
        return ["", f"decode: skipped ({'; '.join(res['skipped'].values())})"]
    lines = ["", f"decode: JPEG decoders alone, batches of {res['bs']}, {res['threads']} threads "
                 f"(torch = fastgal's batched decode, {res['torch_decoder']})", f"  {'decoder':<15}{'images/s':>11}"]
    lines += [f"  {name:<15}{r['images_per_s']:>11,.1f}" for name, r in res["results"].items()]
    lines += [f"  {name:<15}{'skipped':>11}  ({why})" for name, why in res["skipped"].items()]
    px = res.get("torch_gpu_vs_cpu_pixels")
    if px:
        lines.append(f"  nvJPEG vs libjpeg-turbo pixels: max |delta| {px['max_abs']}, mean {px['mean_abs']}, "
                     f"signed RGB means {px['mean_signed_rgb']}")
    return lines
