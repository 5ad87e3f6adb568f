"""Functions compiled once per process (torch.compile), for the block path's inference graphs and flex_attention."""
from __future__ import annotations

import torch

_COMPILED: dict = {}


def compile_once(name: str, fn):
    """torch.compile(fn, dynamic=False), built once per name."""
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn, dynamic=False)
    return _COMPILED[name]


def raise_recompile_limit(graphs: int) -> None:
    """Let one compiled function keep at least `graphs` graphs (one per routing and shape) before torch.compile falls
    back to eager."""
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), graphs))


def compiled_if(flag: bool, name: str, fn):
    """fn compiled once when flag (Backend.compile_blocks), else fn. The inference path of block routing (gate
    scores, top-k block lists) is tens of small kernels per layer; eager, their launches cost more than the attention
    they save at batch 1 (benchmarks/bench_block.py's e2e rows time both)."""
    return compile_once(name, fn) if flag else fn


def wants_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
