"""Probes of a GPT's attention that training, distillation and the diagnostics share: every layer's attention
input X, the unmasked logits S = Q K^T / sqrt(d_head), and the gate's top-k overlap with them (gate F1)."""
from __future__ import annotations

import math

import torch

from gatelab.config import Routing
from gatelab.kernels.topk import topk_keep_mask


@torch.no_grad()
def layer_inputs(model, idx: torch.Tensor, routing: Routing | None = None) -> list[torch.Tensor]:
    """The normed input X of every layer's attention (what Q/K/V and the gate read), under `routing`."""
    captured = []
    hooks = [b.attn.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
             for b in model.blocks]
    try:
        model.hidden(idx, routing or Routing())
    finally:
        for h in hooks:
            h.remove()
    return captured


@torch.no_grad()
def attention_logits(attn, x: torch.Tensor) -> torch.Tensor:
    """S = Q K^T / sqrt(d_head), (B, H, T, T), float32, not masked."""
    q, k, _ = attn.qkv_heads(x)
    return (q @ k.transpose(-1, -2)).float() / math.sqrt(q.shape[-1])


def gate_f1(S: torch.Tensor, G: torch.Tensor, causal: torch.Tensor, k: int) -> torch.Tensor:
    """|TopK(G) n TopK(S)| / k averaged over rows with more than k causal keys (precision = recall = F1).
    Returns NaN when no row has more than k keys."""
    T = S.shape[-1]
    if T <= k:
        return torch.tensor(float("nan"))
    both = topk_keep_mask(S, k, causal) & topk_keep_mask(G, k, causal)
    return (both[..., k:, :].sum(-1).float() / k).mean()
