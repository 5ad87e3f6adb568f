"""Token-weighted perplexity over a whole split, in non-overlapping chunks, under any routing."""
from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from .config import Routing
from .data import TokenData
from .progress import progress_bar


def autocast_for(device: torch.device, dtype: str = "auto"):
    """bf16 autocast on GPU (unless fp32 is asked for), plain fp32 on CPU."""
    if device.type == "cuda" and dtype in ("auto", "bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and dtype == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def resolve_device(name: str = "auto") -> torch.device:
    from .config import DEVICE_PATTERN, GatelabError
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


@torch.no_grad()
def perplexity(model, data: TokenData, routing: Routing, batch_size: int = 16, max_tokens: int = 0,
               dtype: str = "auto", progress: bool = False, desc: str = "eval") -> dict:
    """exp(total NLL / total predicted tokens) over non-overlapping `context`-token chunks of `data`."""
    device = next(model.parameters()).device
    context = model.cfg.context
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    chunks = list(data.chunks(context, max_tokens))
    full = [c for c in chunks if c[0].numel() == context]
    short = [c for c in chunks if c[0].numel() != context]
    batches = [full[i:i + batch_size] for i in range(0, len(full), batch_size)] + [[c] for c in short]
    for batch in progress_bar(batches, desc=desc, unit="batch", disable=not progress, leave=False):
        x = torch.stack([c[0] for c in batch]).to(device)
        y = torch.stack([c[1] for c in batch]).to(device)
        with autocast_for(device, dtype):
            _, nll = model(x, y, routing=routing, reduction="sum")
        total_nll += float(nll)
        total_tokens += y.numel()
    model.train(was_training)
    mean = total_nll / max(total_tokens, 1)
    return dict(routing=routing.label(), nll=mean, ppl=math.exp(min(mean, 700.0)), tokens=total_tokens)
