"""Attention over the key blocks a block routing selects: flex_attention with a BlockMask (work skipped) or the
selection expanded to a token mask for SDPA (the same result; CPU, padding, other block sizes), and the soft block gate."""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from gatelab.attention.backend import BLOCK_ATTENTION
from gatelab.attention.blocks import (
    block_attention_mass, block_random_scores, earlier_blocks, previous_block_rows, select_blocks
)
from gatelab.attention.compiled import wants_grad
from gatelab.attention.flex import (
    _flex_block_attention, block_mask_from_factors, block_mask_from_scores, build_block_mask, has_flex
)
from gatelab.attention.gates import n_blocks
from gatelab.attention.masks import causal_rows, repeat_kv
from gatelab.attention.soft import soft_gate_mask
from gatelab.config import GatelabError, Routing
from gatelab.kernels.triton_support import available

BACKENDS = BLOCK_ATTENTION


def token_keep(keep: torch.Tensor, block_size: int, T: int, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """The block keep-mask expanded to a token mask (Bs, H, T, T), causal (and within `allowed`)."""
    blk = torch.arange(T, device=keep.device) // block_size
    tok = keep[:, :, blk][:, :, :, blk] & causal_rows(T, T, keep.device)
    return tok if allowed is None else tok & allowed


def resolve_backend(backend: str, q: torch.Tensor, block_size: int, allowed) -> str:
    if backend not in BACKENDS:
        raise GatelabError(f"block attention backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    T = q.shape[2]
    if backend == "auto":
        fits = allowed is None and T % block_size == 0 and block_size % 128 == 0
        return "flex" if q.is_cuda and fits and has_flex() else "masked"
    if backend == "flex":
        if allowed is not None:
            raise GatelabError("the flex block path takes plain causal attention (no padding or window mask)")
        if T % block_size:
            raise GatelabError(f"the flex block path needs the sequence length ({T}) to be a multiple of "
                               f"block_size ({block_size})")
    return backend


def block_sparse_attention(q, k, v, keep: torch.Tensor, block_size: int, allowed: torch.Tensor | None = None,
                           scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """Causal attention of q (B, H, T, D) over k, v (B, Hk, T, D) restricted to the kept blocks (keep: (B|1, H, nb,
    nb) bool, diagonal included), through flex_attention (work skipped) or a token mask (same result)."""
    H, T = q.shape[1], q.shape[2]
    if resolve_backend(backend, q, block_size, allowed) == "flex":
        return _flex_block_attention(q, k, v, lambda backward: build_block_mask(keep, block_size, T,
                                                                               backward=backward), scale)
    mask = token_keep(keep, block_size, T, allowed)
    out = F.scaled_dot_product_attention(q, repeat_kv(k, H), repeat_kv(v, H), attn_mask=mask, scale=scale)
    return out if allowed is None else out.nan_to_num(0.0)  # queries with no allowed key (padding) give 0


def soft_block_attention(q, k, v, G: torch.Tensor, routing: Routing, allowed: torch.Tensor | None = None,
                         scale: float | None = None) -> torch.Tensor:
    """The soft block gate: token weights from the block mask m of G (B, H, nb, nb) under the routing's soft
    reading (soft_gate_mask with k = block_k over the earlier blocks; diagonal m = 1). Renormalised:
    softmax(S + log m); otherwise softmax(S) * m. Gradients reach G."""
    B, H, T, D = q.shape
    nb = G.shape[-1]
    earlier = earlier_blocks(nb, q.device)
    log_m = soft_gate_mask(previous_block_rows(G.float()), replace(routing, mode="soft-gate", k=routing.block_k),
                           earlier, log=True)
    log_m = log_m.masked_fill(torch.eye(nb, dtype=torch.bool, device=q.device), 0.0)
    blk = torch.arange(T, device=q.device) // routing.block_size
    ok = causal_rows(T, T, q.device) if allowed is None else causal_rows(T, T, q.device) & allowed
    bias = log_m[:, :, blk][:, :, :, blk].masked_fill(~ok, float("-inf"))
    k, v = repeat_kv(k, H), repeat_kv(v, H)
    if routing.soft_renormalize:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=scale)
        return out.nan_to_num(0.0) if allowed is not None else out
    scale = scale if scale is not None else D ** -0.5
    S = (q @ k.transpose(-1, -2)).float() * scale
    A = torch.softmax(S.masked_fill(~ok, float("-inf")), dim=-1).nan_to_num(0.0)
    return (A * bias.exp()).to(v.dtype) @ v


def selection_scores(q, k, routing: Routing, gate_scores, layer: int, allowed: torch.Tensor | None = None,
                     scale: float | None = None) -> torch.Tensor:
    """The scores (B|1, H, nb, nb) a hard block routing selects by, causal (row i ranks query block i's earlier
    blocks): block-oracle's pooled attention mass and block-gate's scores by the previous block's row,
    block-random's fixed hash."""
    if routing.mode == "block-oracle":
        return previous_block_rows(block_attention_mass(q.detach(), k.detach(), routing.block_size, allowed, scale))
    if routing.mode == "block-gate":
        return previous_block_rows(gate_scores())
    return block_random_scores(layer, q.shape[1], n_blocks(q.shape[2], routing.block_size), routing.seed, q.device)


def block_routed_attention(q, k, v, routing: Routing, *, gate_scores=None, layer: int = 0,
                           allowed: torch.Tensor | None = None, scale: float | None = None,
                           backend: str = "auto", compiled: bool = False, gate_factors=None,
                           kernels: bool = False) -> torch.Tensor:
    """Causal attention under a block routing (attention.attend's block branch). q (B, H, T, D); k, v (B, Hk, T, D), Hk dividing H; gate_scores: a
    callable returning the block gate's scores (B, H, nb, nb) (block-gate, block-soft); allowed: None (causal) or
    the model's own bool mask (B|1, 1|H, T, T) (padding, sliding windows); scale: None = 1/sqrt(D); backend:
    auto | flex | masked (Backend.block_attention); compiled: the block lists from one compiled graph on CUDA;
    gate_factors: a callable returning the block gate's factors (gq scaled, gk) (BlockGate.factors), which with
    kernels (Backend.kernels) lets block-gate inference on the flex path select blocks in one Triton kernel."""
    if not routing.is_block:
        raise GatelabError(f"routing mode {routing.mode!r} is not a block routing")
    T = q.shape[2]
    if k.shape[2] != T:
        raise GatelabError("block routings need the whole key sequence: call the model with use_cache=False")
    if routing.needs_block_gate and gate_scores is None:
        raise GatelabError(f"routing {routing.mode} needs a block gate, and this model has none (build the model "
                           f"with model.block_gate=learned|random, or load one with --gate)")
    if routing.mode == "block-soft":
        return soft_block_attention(q, k, v, gate_scores(), routing, allowed, scale)
    if (routing.mode == "block-gate" and kernels and gate_factors is not None and available(q)
            and not wants_grad(q, k, v) and resolve_backend(backend, q, routing.block_size, allowed) == "flex"):
        gq, gk = gate_factors()  # no scores formed: the fused selection kernel writes the block lists
        return _flex_block_attention(q, k, v, lambda backward: block_mask_from_factors(
            gq, gk, routing.block_k, routing.block_size, T, backward=backward), scale)
    scores = selection_scores(q, k, routing, gate_scores, layer, allowed, scale)
    if resolve_backend(backend, q, routing.block_size, allowed) == "flex":  # no keep-mask on the way
        return _flex_block_attention(q, k, v, lambda backward: block_mask_from_scores(
            scores, routing.block_k, routing.block_size, T, backward=backward, compiled=compiled), scale)
    keep = select_blocks(scores.detach(), routing.block_k)
    return block_sparse_attention(q, k, v, keep, routing.block_size, allowed, scale, "masked")
