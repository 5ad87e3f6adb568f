"""Perplexity of a Hugging Face model under a routing, over a token stream or over whole long documents."""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch

from gatelab.config import GatelabError, Routing
from gatelab.devices import autocast_for
from gatelab.progress import progress_bar


def hf_perplexity_docs(model, docs: list[list[int]], routing: Routing, context: int, batch_size: int = 1,
                       max_tokens: int = 0, progress: bool = False) -> dict:
    """Token-weighted perplexity over whole `context`-token windows of each document (hf_perplexity per
    document). max_tokens: stop after the document that reaches about this many tokens (0 = all)."""
    nll, count, used = 0.0, 0, 0
    for doc in docs:
        used += 1
        res = hf_perplexity(model, doc, routing, context=context, batch_size=batch_size, progress=progress)
        nll += res["nll"] * res["tokens"]
        count += res["tokens"]
        if max_tokens and count >= max_tokens:
            break
    mean = nll / count
    return dict(routing=routing.label(), nll=mean, ppl=math.exp(mean), tokens=count, documents=used)


@torch.no_grad()
def hf_perplexity(model, ids: list[int], routing: Routing, context: int = 512, batch_size: int = 4,
                  max_tokens: int = 0, progress: bool = False) -> dict:
    """Token-weighted perplexity over non-overlapping `context`-token chunks (every token after the first
    predicted once), under `routing` (needs attach_gates first for anything but dense)."""

    ctl = getattr(model, "gatelab", None)
    if routing.mode != "dense" and ctl is None:
        raise GatelabError("attach_gates(model, ...) first: routings other than dense need gatelab's attention")
    device = next(model.parameters()).device
    t = torch.tensor(ids, dtype=torch.long)
    n = len(t) - 1 if not max_tokens else min(len(t) - 1, max_tokens)
    starts = list(range(0, n, context))
    nll, count = 0.0, 0
    scope = ctl.routing(routing) if ctl is not None else _nullcontext()
    with scope:
        for i in progress_bar(range(0, len(starts), batch_size), desc=routing.label(), disable=not progress,
                              leave=False):
            group = starts[i:i + batch_size]
            full = [s for s in group if s + context <= n]
            for chunk in ([full] if full else []) + [[s] for s in group if s + context > n]:
                end = [min(s + context, n) for s in chunk]
                x = torch.stack([t[s:e] for s, e in zip(chunk, end)]).to(device)
                y = torch.stack([t[s + 1:e + 1] for s, e in zip(chunk, end)]).to(device)
                with autocast_for(x.device):
                    logits = model(x, use_cache=False).logits.float()
                nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                                               reduction="sum"))
                count += y.numel()
    mean = nll / count
    return dict(routing=routing.label(), nll=mean, ppl=math.exp(mean), tokens=count)


@contextmanager
def _nullcontext():
    yield
