"""JPEG bytes -> uint8 RGB tensors, a batch per call: on a GPU with nvJPEG, on a CPU with libjpeg-turbo.

    from fastgal.load.decode import decode_batch, decoder_name
    jpegs, y = Shards("shards/synth").split("valid").batch(range(128))
    x = decode_batch(jpegs, "cuda")          # (128, 3, H, W) uint8 on the GPU, one nvJPEG call
    decoder_name()                            # "torchvision" or "torchcodec"

Which decoder: torchvision's `decode_jpeg` where the installed torchvision still has it, else TorchCodec's
(`torchcodec.decoders.decode_jpeg`, the same signature). torchvision first because it is already a
dependency, its CUDA build is torch's by construction (TorchCodec wheels are built per CUDA major and must
be matched by hand, which is what the torch-only GPU boxes cannot do), and it is what the CPU paths have
always used: bit-identical to DALI's CPU decoder and PIL (tests/test_loaders.py). torchvision 0.29
deprecated its decoders in favour of TorchCodec and will remove them; when it does, the same code takes
TorchCodec (also bit-identical on a CPU: tests/test_decode.py). `fastgal env` names the one in use.

On CUDA both decode a list in one batched nvJPEG call (torchvision PR #8496); on a CPU the list is a
loop, so decode_batch splits it over a thread pool's threads (the decoder releases the GIL).
"""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np
import torch

# torchvision >= 0.29 warns on every decode that its decoders are deprecated; fastgal knows, and takes
# TorchCodec once they are gone (see the module docstring). Only that message is silenced.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision are deprecated",
                        category=DeprecationWarning)

DECODERS = ("torchvision", "torchcodec")


def _load(name: str) -> Callable:
    if name == "torchvision":
        from torchvision.io import ImageReadMode, decode_jpeg

        return lambda data, device: decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    from torchcodec.decoders import decode_jpeg

    return lambda data, device: decode_jpeg(data, mode="RGB", device=device)


@lru_cache(maxsize=None)
def decoder(prefer: str | None = None) -> tuple[str, Callable]:
    """(name, fn(list of 1-D uint8 CPU tensors, device) -> list of CHW uint8 tensors): `prefer` where it
    imports, else the first of DECODERS that does."""
    order = ([prefer] if prefer else []) + [d for d in DECODERS if d != prefer]
    why = []
    for name in order:
        try:
            return name, _load(name)
        except (ImportError, OSError, RuntimeError) as e:  # absent, or a binary that does not load here
            why.append(f"{name}: {e}")
    raise RuntimeError("no JPEG decoder: torchvision lacks decode_jpeg and TorchCodec is not installed "
                       f"(pip install torchcodec); {'; '.join(why)}")


def decoder_name() -> str:
    return decoder()[0]


def decode_batch(jpegs: Sequence[np.ndarray], device="cpu", *, pool: ThreadPoolExecutor | None = None,
                 prefer: str | None = None) -> torch.Tensor:
    """Same-sized JPEGs (1-D uint8 arrays) -> one (N, 3, H, W) uint8 tensor on `device`. On a CPU, `pool`
    (a ThreadPoolExecutor the caller keeps) decodes the batch in as many parts as it has threads."""
    _, fn = decoder(prefer)
    data = [torch.from_numpy(np.array(j, dtype=np.uint8, copy=True)) for j in jpegs]  # mmap slices are read-only
    device = torch.device(device)
    k = pool._max_workers if pool is not None and device.type == "cpu" else 1
    if k <= 1 or len(data) < 2 * k:
        return torch.stack(fn(data, device))
    step = -(-len(data) // k)
    parts = pool.map(lambda i: fn(data[i:i + step], device), range(0, len(data), step))
    return torch.stack([img for part in parts for img in part])
