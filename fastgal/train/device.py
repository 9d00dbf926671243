"""Where and in what precision a command runs: --device and --precision resolved to what torch uses.

    from fastgal.train.device import resolve_device, resolve_precision
    device = resolve_device("auto")                   # cuda where torch sees a GPU, else cpu
    precision = resolve_precision("auto", device)     # bf16 / fp16 on a GPU, fp32 on a CPU
"""

from __future__ import annotations

import torch


def resolve_device(name, api: bool = False) -> torch.device:
    """--device auto|cpu|cuda[:k] (or a torch.device) -> a torch device; a one-line error when CUDA is asked for
    but absent, in the CLI's words or (api=True) the Python API's.

    On CUDA it also turns on cudnn.benchmark: every fastgal command feeds the model one input size (the crop)
    and one batch size (but a last, shorter evaluation batch), so cuDNN's autotuner picks the fastest
    convolution algorithms once, in the first batches, and keeps them."""
    name = str(name)
    if name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        from fastgal.env import warn_if_gpu_unused

        warn_if_gpu_unused(device)  # one line on stderr when an NVIDIA device is there but unusable
    elif name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            if api:
                raise ValueError(f"device={name!r} but no CUDA GPU is visible to torch; use device='cpu'")
            raise ValueError("--device cuda but no CUDA GPU is visible to torch; use --device cpu or auto")
        device = torch.device(name)
    else:
        device = torch.device(name)  # cpu (the CLI's Choice has checked the name)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return device


def resolve_precision(name: str, device: torch.device) -> str:
    """--precision auto -> bf16 on GPUs that have it, else fp16; fp32 on a CPU (where AMP does not pay)."""
    if name == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if name != "fp32" and device.type != "cuda":
        raise ValueError(f"--precision {name} needs a GPU; use fp32 (or auto) on the CPU")
    return name
