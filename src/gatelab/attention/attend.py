"""`attend`: causal attention under any routing mode, the one entry point of the GPT and the Hugging Face adapter.

The routing-mode switch exists here only. Per layer, head and query row, over the allowed keys only (causal, and
the model's own mask where it has one); rows with k or fewer allowed keys keep them all.

    dense                        SDPA (flash when plainly causal)
    oracle-topk, gate-topk,      a keep-mask of exactly k keys per row (attention/hard.py), then SDPA (or
    random-topk, stochastic      flex_attention with the mask as a score_mod, Backend.hard_attention)
    soft-gate                    attention weighted by a sigmoid of the gate's scores (attention/soft.py)
    block-*                      whole key blocks per query block (attention/block_attention.py)

Where the Triton kernels serve (Backend.kernels, CUDA or Triton's interpreter, plain causal attention with T == S),
the selection and the soft gate run on them; elsewhere (CPU, a padding or window mask, a KV cache) on their torch
references, which the kernels are tested against.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from gatelab.attention.backend import Backend, default_backend
from gatelab.attention.block_attention import block_routed_attention
from gatelab.attention.flex import causal_flex_attention, flex_ready
from gatelab.attention.hard import RandomMaskCache, hard_keep
from gatelab.attention.masks import causal_rows, repeat_kv
from gatelab.attention.soft import soft_attention
from gatelab.config import GatelabError, Routing
from gatelab.kernels.triton_support import available

# A decoding step's SDPA (one query, every key): flash reads grouped-query heads in place and serves every cache
# length with the same kernel; cuDNN, which SDPA would otherwise pick on Hopper, plans anew for each new key length,
# which costs more host time per step than the attention itself.
DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

@dataclass(frozen=True)
class GateScores:
    """A gate's scores for one attention call, computed only when a routing asks for them.

    scores: returns G, (B, H, T, S) for a token gate or (B, H, nb, nb) for a block gate, not yet masked.
    factors: optionally returns (gq, gk) with G = gq gk^T (gq already scaled), which lets the fused soft-gate
    kernel and the threshold kernel (for a block gate, the block selection kernel) run without forming G."""

    scores: Callable[[], torch.Tensor]
    factors: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None


def attend(q, k, v, routing: Routing, *, gate: GateScores | None = None, allowed: torch.Tensor | None = None,
           scale: float | None = None, layer: int = 0, backend: Backend | None = None,
           random_masks: RandomMaskCache | None = None, dropout: float = 0.0) -> torch.Tensor:
    """Causal attention of q (B, H, T, D) over k, v (B, Hk, S, D) (Hk dividing H; the queries are the last T of
    the S positions) under `routing`: (B, H, T, D).

    gate: the gate's scores (gate-topk, soft-gate, block-gate, block-soft need one); allowed: None (plain causal)
    or the keys each query may see, bool (B|1, 1|H, T, S) (padding, sliding windows); a query with none gets 0;
    scale: None = 1/sqrt(D); layer: the layer index (random modes hash it); backend: how to compute (default:
    the environment's, attention.backend); random_masks: a cache of random-topk's fixed subsets; dropout: on the
    attention weights (training only)."""
    backend = backend or default_backend()
    if routing.needs_gate and gate is None:
        raise GatelabError(f"routing {routing.mode} needs a gate, and this model has none (load one with --gate, or "
                           f"build the model with model.gate=learned|random)")
    if routing.is_block:
        return block_routed_attention(q, k, v, routing, gate_scores=gate.scores if gate is not None else None,
                                      layer=layer, allowed=allowed, scale=scale, backend=backend.block_attention,
                                      compiled=backend.compile_blocks, kernels=backend.kernels,
                                      gate_factors=gate.factors if gate is not None else None)
    if routing.mode == "dense":
        return dense_attention(q, k, v, allowed, scale, dropout)
    H, T, S = q.shape[1], q.shape[2], k.shape[2]
    if routing.needs_gate and T != S:
        raise GatelabError("gate routings need the whole key sequence: call the model with use_cache=False")
    k, v = repeat_kv(k, H), repeat_kv(v, H)
    fast = backend.kernels and available(q) and allowed is None and T == S
    if routing.mode == "soft-gate":
        return soft_attention(q, k, v, routing, gate, allowed=allowed, scale=scale, backend=backend, fast=fast,
                              dropout=dropout)
    keep = hard_keep(q, k, routing, gate, allowed=allowed, layer=layer, fast=fast, random_masks=random_masks)
    if fast and flex_ready() and backend.hard_attention == "flex" and scale is None and not dropout:
        keep4 = keep.expand(q.shape[0], H, T, T)  # random-topk's cached (H, T, T) masks broadcast over the batch
        return causal_flex_attention(q, k, v, score_mod=lambda score, b, h, i, j: torch.where(
            keep4[b, h, i, j], score, float("-inf")))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale, dropout_p=dropout)
    return out if allowed is None else out.nan_to_num(0.0)


def dense_attention(q, k, v, allowed: torch.Tensor | None = None, scale: float | None = None,
                    dropout: float = 0.0) -> torch.Tensor:
    """SDPA over the allowed keys (flash when plainly causal); a query with no allowed key gets 0."""
    H, T, S = q.shape[1], q.shape[2], k.shape[2]
    if allowed is None and T == 1:  # one new query per sequence (decoding): every key, read once per key/value head
        with sdpa_kernel(DECODE_BACKENDS):
            return F.scaled_dot_product_attention(q, k, v, scale=scale, dropout_p=dropout, enable_gqa=k.shape[1] != H)
    k, v = repeat_kv(k, H), repeat_kv(v, H)
    if allowed is None and T == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, dropout_p=dropout)
    mask = allowed if allowed is not None else causal_rows(T, S, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, dropout_p=dropout).nan_to_num(0.0)
