"""Block routing while generating with a KV cache: each new query reads only its query block's selected key blocks.

A query block's earlier key blocks are chosen by the previous query block's row (attention/blocks.py,
`previous_block_rows`), which reads only complete blocks. So the selection of block i is fixed once block i-1 is
complete: it is computed once, when block i's first query arrives, from the queries and keys seen so far (the same
scores the whole-sequence path computes, so decoding keeps exactly the blocks a prefill of the same tokens keeps),
and reused for every query of block i. A new query then attends to the selected blocks' keys and values, gathered,
plus its own block up to itself: (block_k + 1) x block_size keys instead of the whole cache.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from gatelab.attention.block_attention import selection_scores
from gatelab.attention.blocks import select_blocks
from gatelab.attention.masks import causal_rows, repeat_kv
from gatelab.config import GatelabError, Routing


@dataclass
class BlockDecodeCache:
    """One layer's decoding state: the queries (and the layer inputs a block gate may pool) seen so far, and the
    kept key blocks of each query block, (B|1, H, nb) bool, by query block index."""

    q: torch.Tensor | None = None
    x: torch.Tensor | None = None
    kept: dict = field(default_factory=dict)

    def extend(self, q: torch.Tensor, x: torch.Tensor | None, start: int) -> None:
        """Append the queries (B, H, T, D) and inputs (B, T, C) of positions start .. start + T - 1; a call at
        position 0 (a new prompt) starts over."""
        if start == 0 or self.q is None or self.q.shape[2] != start:
            if start != 0:
                raise GatelabError("block decoding lost track of the sequence: its cache holds "
                                   f"{0 if self.q is None else self.q.shape[2]} positions, the model is at {start}")
            self.q, self.x, self.kept = None, None, {}
        self.q = q if self.q is None else torch.cat([self.q, q], dim=2)
        if x is not None:
            self.x = x if self.x is None else torch.cat([self.x, x], dim=1)


def kept_blocks(cache: BlockDecodeCache, k, routing: Routing, gate_scores, layer: int, block: int,
                scale: float | None) -> torch.Tensor:
    """(B|1, H, block + 1) bool: the key blocks query block `block` keeps (its own included), computed once."""
    if block not in cache.kept:
        S = cache.q.shape[2]
        scores = selection_scores(cache.q, k[:, :, :S], routing, gate_scores, layer, None, scale)
        cache.kept[block] = select_blocks(scores, routing.block_k)[..., block, :block + 1]
    return cache.kept[block]


def block_decode_attention(q, k, v, routing: Routing, cache: BlockDecodeCache, *, gate_scores=None, layer: int = 0,
                           scale: float | None = None) -> torch.Tensor:
    """Attention of the new queries q (B, H, T, D) (the last T of S positions, cache.extend'ed already) over the
    cached keys and values k, v (B, Hk, S, D) under a hard block routing, reading only the kept blocks."""
    if routing.mode == "block-soft":
        raise GatelabError("block-soft reweights every key block: decode with block-gate, block-oracle or "
                           "block-random")
    B, H, T, D = q.shape
    S, bs = k.shape[2], routing.block_size
    k, v = repeat_kv(k, H), repeat_kv(v, H)
    first = S - T
    if T == 1:
        keep = kept_blocks(cache, k, routing, gate_scores, layer, first // bs, scale)
        return _gathered_attention(q, k, v, keep, bs, first, scale)
    allowed = torch.zeros(B, H, T, S, dtype=torch.bool, device=q.device)
    for t in range(T):  # several new queries (a chunk of a prompt): each one's blocks as a token mask
        keep = kept_blocks(cache, k, routing, gate_scores, layer, (first + t) // bs, scale)
        allowed[:, :, t] = _pad_blocks(keep, S, bs).expand(B, H, S)
    allowed &= causal_rows(T, S, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)


def _pad_blocks(keep: torch.Tensor, S: int, bs: int) -> torch.Tensor:
    """A block keep row (B|1, H, nb') widened to all S key positions (blocks past nb' are not kept)."""
    nb = -(-S // bs)
    wide = F.pad(keep, (0, nb - keep.shape[-1]))
    return wide[..., torch.arange(S, device=keep.device) // bs]


def _gathered_attention(q, k, v, keep: torch.Tensor, bs: int, position: int, scale: float | None) -> torch.Tensor:
    """One query per (batch, head) at `position` over the kept blocks' keys only: their positions gathered from
    the cache, the query's own block cut at the query, missing blocks (fewer earlier blocks than block_k) masked."""
    B, H, _, D = q.shape
    keep = keep.expand(B, H, keep.shape[-1])
    n_kept = int(keep.sum(-1).max())
    order = torch.sort(keep.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :n_kept]
    valid = torch.gather(keep, -1, order)  # (B, H, n_kept): False where a row keeps fewer blocks
    pos = (order[..., None] * bs + torch.arange(bs, device=q.device)).flatten(-2)  # (B, H, n_kept * bs)
    ok = valid.repeat_interleave(bs, dim=-1) & (pos <= position)
    pos = pos.clamp(max=k.shape[2] - 1)
    idx = pos[..., None].expand(B, H, pos.shape[-1], D)
    kg, vg = torch.gather(k, 2, idx), torch.gather(v, 2, idx)
    return F.scaled_dot_product_attention(q, kg, vg, attn_mask=ok[:, :, None, :], scale=scale)
