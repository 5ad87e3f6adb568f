"""The soft gate: attention weighted by a sigmoid of the gate's scores, under each reading (docs/method.md).

m = sigmoid((G - tau) / t), tau the row's k-th largest G for topk-sigmoid (no gradient through it), else 0.
Unrenormalised: softmax(S) * m. Renormalised: softmax(S + log m). Gradients reach the gate through m.

Three paths give the same result: the fused Triton kernel (kernels/soft_gate.py: G formed tile by tile from the
gate's two factors, never in memory), flex_attention with log m as a score_mod (compiled code), and the explicit
torch form below (G, S and the mask in memory), which also serves any mask of allowed keys (padding, windows).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gatelab.attention.backend import Backend
from gatelab.attention.flex import causal_flex_attention, flex_ready
from gatelab.attention.masks import causal_rows
from gatelab.config import Routing
from gatelab.kernels.soft_gate import soft_gate_attention, soft_gate_fits
from gatelab.kernels.topk import causal_kth_largest, factor_kth_largest, row_kth_largest


def soft_gate_mask(G: torch.Tensor, routing: Routing, causal: torch.Tensor, log: bool = False,
                   tau: torch.Tensor | None = None) -> torch.Tensor:
    """The soft gate's multiplicative mask m (or log m when `log`) over the allowed keys (`causal`: any bool
    mask broadcastable to G, e.g. causal & not padding); other entries get 0 / -inf. tau: topk-sigmoid's row
    thresholds when the caller has them already (kernels.topk.causal_kth_largest)."""
    t = routing.soft_temperature
    if routing.soft_mask == "topk-sigmoid":
        if tau is None:
            tau = row_kth_largest(G.detach(), routing.k, causal)
        z = (G - tau) / t
    else:
        z = G / t
    if log:
        return F.logsigmoid(z).masked_fill(~causal, float("-inf"))
    return torch.sigmoid(z).masked_fill(~causal, 0.0)


def soft_gate_flex_attention(q, k, v, G: torch.Tensor, routing: Routing, tau: torch.Tensor | None):
    """The soft gate (every reading) through flex_attention: log m = logsigmoid((G - tau) / t) added to the scores.
    Renormalised, that is softmax(S + log m) itself. Not renormalised, A * m = exp(S + log m - lse(S)), i.e. the
    renormalised output times exp(lse(S + log m) - lse(S)); a second flex pass gives lse(S). Gradients reach q, k,
    v and G (a captured buffer of the score_mod) through both passes."""
    t = routing.soft_temperature
    thr = tau[..., 0] if tau is not None else None

    def add_log_mask(score, b, h, i, j):
        z = G[b, h, i, j] - thr[b, h, i] if thr is not None else G[b, h, i, j]
        return score + F.logsigmoid(z / t)

    if routing.soft_renormalize:
        return causal_flex_attention(q, k, v, add_log_mask)
    out, lse_masked = causal_flex_attention(q, k, v, add_log_mask, return_lse=True)
    _, lse = causal_flex_attention(q, k, v, return_lse=True)
    return out * torch.exp(lse_masked - lse)[..., None].to(out.dtype)


def soft_attention(q, k, v, routing: Routing, gate, *, allowed: torch.Tensor | None, scale: float | None,
                   backend: Backend, fast: bool, dropout: float = 0.0) -> torch.Tensor:
    """The soft gate's attention (attention.attend's soft-gate branch). q, k, v: (B, H, T|S, D), key heads already
    repeated; gate: attend's GateScores; allowed: None (plain causal) or the allowed keys (B|1, 1|H, T, S);
    fast: the Triton kernels may serve (CUDA or interpreter, plain causal, backend.kernels)."""
    D = q.shape[-1]
    plain_scale = scale is None or scale == D ** -0.5
    if (fast and backend.soft_attention == "fused" and gate.factors is not None and plain_scale
            and not dropout):
        gq, gk = gate.factors()
        if soft_gate_fits(q, gq):
            tau = None
            if routing.soft_mask == "topk-sigmoid" and backend.topk_threshold == "factors":
                tau = factor_kth_largest(gq, gk, routing.k, backend.factor_tau)  # each row's k-th G, in registers
            elif routing.soft_mask == "topk-sigmoid":  # the row threshold needs G's rows: formed once, no gradient
                with torch.no_grad():
                    tau = causal_kth_largest(gate.scores().float(), routing.k)
            return soft_gate_attention(q, k, v, gq, gk, routing.soft_temperature, routing.soft_renormalize, tau,
                                       backend.soft_spill_free_tiles)
    G = gate.scores().float()
    tau = causal_kth_largest(G, routing.k) if fast and routing.soft_mask == "topk-sigmoid" else None
    if (fast and flex_ready() and backend.soft_attention == "flex" and routing.soft_renormalize and plain_scale
            and not dropout):
        return soft_gate_flex_attention(q, k, v, G, routing, tau)
    return soft_gate_reference(q, k, v, G, routing, allowed, scale, tau, dropout)


def soft_gate_reference(q, k, v, G: torch.Tensor, routing: Routing, allowed: torch.Tensor | None = None,
                        scale: float | None = None, tau: torch.Tensor | None = None,
                        dropout: float = 0.0) -> torch.Tensor:
    """The explicit soft gate: G (B, H, T, S) and S in memory; allowed: the keys each query may see (None: causal,
    queries at the last T of S positions); a query with no allowed key gets 0."""
    T, S_len, D = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = scale if scale is not None else 1.0 / math.sqrt(D)
    ok = causal_rows(T, S_len, q.device) if allowed is None else allowed
    if routing.soft_renormalize:  # softmax(S + log m): A * m renormalised
        log_m = soft_gate_mask(G, routing, ok, log=True, tau=tau)
        if allowed is None and not dropout and not (
                log_m.requires_grad and not (q.requires_grad or k.requires_grad or v.requires_grad)):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=log_m.to(q.dtype), scale=scale)
        # Only the mask wants a gradient (a gate trained on a frozen model, e.g. Table 5), or rows may have no
        # allowed key. PyTorch's fused SDPA kernels decide from q/k/v alone whether to keep the softmax statistics
        # that their backward needs, so on CUDA the memory-efficient kernel then fails in backward ("LSE is not
        # correctly aligned"). The explicit softmax computes the same thing and differentiates through the mask.
        weights = torch.softmax((q @ k.transpose(-1, -2)).float() * scale + log_m, dim=-1)
    else:
        S = (q @ k.transpose(-1, -2)).float()
        S = S / math.sqrt(D) if scale == 1.0 / math.sqrt(D) else S * scale
        weights = torch.softmax(S.masked_fill(~ok, float("-inf")), dim=-1) * soft_gate_mask(G, routing, ok, tau=tau)
    weights = weights.nan_to_num(0.0) if allowed is not None else weights
    if dropout:
        weights = F.dropout(weights, p=dropout)
    return weights.to(v.dtype) @ v
