"""How sharp a soft gate's mask is during training (TrainConfig.log_gate_stats): observation only."""
from __future__ import annotations

import torch

from gatelab.attention.gates import BilinearGate
from gatelab.attention.masks import causal_mask
from gatelab.attention.soft import soft_gate_mask
from gatelab.config import Routing


@torch.no_grad()
def soft_gate_statistics(gate: BilinearGate, x: torch.Tensor, routing: Routing) -> dict:
    """How sharp a gate's soft mask is on input x (B, T, C): the weight norms, the spread of G over causal entries,
    the soft mask's mean, its mean slope dm/dG = m (1 - m) / t, the share of saturated entries (m < 0.01 or > 0.99),
    and the gate's current gradient norm. Observation only (TrainConfig.log_gate_stats)."""
    G = gate(x).float()
    causal = causal_mask(G.shape[-1], G.device)
    m = soft_gate_mask(G, routing, causal)[..., causal]
    g = G[..., causal]
    grads = [p.grad for p in (gate.wq, gate.wk) if p.grad is not None]
    return dict(wq_norm=float(gate.wq.float().norm()), wk_norm=float(gate.wk.float().norm()), g_std=float(g.std()),
                g_absmax=float(g.abs().max()), mask_mean=float(m.mean()),
                slope_mean=float((m * (1 - m)).mean() / routing.soft_temperature),
                saturated=float(((m < 0.01) | (m > 0.99)).float().mean()),
                gate_grad_norm=float(torch.sqrt(sum((gr.float() ** 2).sum() for gr in grads))) if grads else None)
