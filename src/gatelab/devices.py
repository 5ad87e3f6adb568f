"""Which device a run uses (auto: CUDA when there is one) and its autocast (bf16 on GPU, fp32 on CPU)."""
from __future__ import annotations

from contextlib import nullcontext

import torch

from gatelab.config import DEVICE_PATTERN, GatelabError


def autocast_for(device: torch.device, dtype: str = "auto"):
    """bf16 autocast on GPU (unless fp32 is asked for), plain fp32 on CPU."""
    if device.type == "cuda" and dtype in ("auto", "bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and dtype == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(name, str) or not DEVICE_PATTERN.fullmatch(name):
        raise GatelabError(f"device must be auto, cpu, cuda, cuda:N or mps, got {name!r}")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GatelabError(f"device {name} was asked for, but no CUDA GPU is available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise GatelabError(f"device {name} was asked for, but only {torch.cuda.device_count()} GPU(s) are visible")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise GatelabError(f"device {name} was asked for, but MPS is not available")
    return dev
