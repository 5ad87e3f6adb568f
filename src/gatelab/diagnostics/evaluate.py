"""Token-weighted perplexity over a whole split, in non-overlapping chunks, under any routing."""
from __future__ import annotations

import math

import torch

from gatelab.config import Routing
from gatelab.data import TokenData
from gatelab.devices import autocast_for
from gatelab.progress import progress_bar


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
