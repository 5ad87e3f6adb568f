"""Block routing while generating with a KV cache: each new query reads only its query block's selected key blocks.

A query block's earlier key blocks are chosen by the previous query block's row (attention/blocks.py,
`previous_block_rows`), which reads only complete blocks. So the selection of block i is fixed once block i-1 is
complete: it is computed once, when block i's first query arrives, from the queries and keys seen so far (the same
scores the whole-sequence path computes, so decoding keeps exactly the blocks a prefill of the same tokens keeps),
and reused for every query of block i. A new query then attends to the selected blocks' keys and values, read
from the cache's key/value heads (grouped-query heads are not copied), plus its own block up to itself:
(block_k + 1) x block_size keys instead of the whole cache. With kernels (Backend.kernels) on CUDA one Triton kernel
reads them in place (kernels/block_decode.py); otherwise its torch reference gathers them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from gatelab.attention.block_attention import selection_scores
from gatelab.attention.blocks import select_blocks
from gatelab.attention.masks import causal_rows, repeat_kv
from gatelab.config import GatelabError, Routing
from gatelab.kernels.block_decode import block_decode, block_decode_reference


@dataclass
class BlockDecodeCache:
    """One layer's decoding state: the queries (B, H, S, D) and layer inputs (B, S, C) seen so far, in buffers that
    grow by a quarter when full (a step appends in place instead of copying the whole history), and, per query
    block, its kept key blocks and their list (B, H, n) (block indices ascending, -1 where a row keeps fewer)."""

    length: int = 0
    q_buf: torch.Tensor | None = None
    x_buf: torch.Tensor | None = None
    kept: dict = field(default_factory=dict)
    lists: dict = field(default_factory=dict)

    @property
    def q(self) -> torch.Tensor | None:
        return None if self.q_buf is None else self.q_buf[:, :, :self.length]

    @property
    def x(self) -> torch.Tensor | None:
        return None if self.x_buf is None else self.x_buf[:, :self.length]

    def extend(self, q: torch.Tensor, x: torch.Tensor | None, start: int) -> None:
        """Append the queries (B, H, T, D) and inputs (B, T, C) of positions start .. start + T - 1; a call at
        position 0 (a new prompt) starts over."""
        if start == 0:
            self.length, self.q_buf, self.x_buf, self.kept, self.lists = 0, None, None, {}, {}
        elif start != self.length:
            raise GatelabError("block decoding lost track of the sequence: its cache holds "
                               f"{self.length} positions, the model is at {start}")
        end = start + q.shape[2]
        self.q_buf = append_in_place(self.q_buf, q, 2, start)
        if x is not None:
            self.x_buf = append_in_place(self.x_buf, x, 1, start)
        self.length = end


def append_in_place(buf: torch.Tensor | None, new: torch.Tensor, dim: int, start: int,
                    capacity: int = 0) -> torch.Tensor:
    """buf with `new` written at start .. start + n along dim (buf's first `start` entries kept): in place while buf
    has room, else in a new buffer of at least `capacity` and a quarter more than needed (so appending one step at a
    time copies the history a logarithmic number of times, not at every step)."""
    end = start + new.shape[dim]
    if buf is None or buf.shape[dim] < end or buf.shape[:dim] != new.shape[:dim]:
        shape = list(new.shape)
        shape[dim] = max(end, capacity, start + start // 4 if start else end)
        grown = new.new_empty(shape)
        if start:
            grown.narrow(dim, 0, start).copy_(buf.narrow(dim, 0, start))
        buf = grown
    buf.narrow(dim, start, end - start).copy_(new)
    return buf


def kept_blocks(cache: BlockDecodeCache, k, routing: Routing, gate_scores, layer: int, block: int,
                scale: float | None) -> torch.Tensor:
    """(B|1, H, block + 1) bool: the key blocks query block `block` keeps (its own included), computed once."""
    if block not in cache.kept:
        S = cache.length
        scores = selection_scores(cache.q, k[:, :, :S], routing, gate_scores, layer, None, scale)
        cache.kept[block] = select_blocks(scores, routing.block_k)[..., block, :block + 1]
    return cache.kept[block]


def block_decode_attention(q, k, v, routing: Routing, cache: BlockDecodeCache, *, gate_scores=None, layer: int = 0,
                           scale: float | None = None, kernels: bool = False) -> torch.Tensor:
    """Attention of the new queries q (B, H, T, D) (the last T of S positions, cache.extend'ed already) over the
    cached keys and values k, v (B, Hk, S, D) under a hard block routing, reading only the kept blocks; kernels:
    one new query per sequence through the Triton kernel where it serves the tensors."""
    if routing.mode == "block-soft":
        raise GatelabError("block-soft reweights every key block: decode with block-gate, block-oracle or "
                           "block-random")
    B, H, T, D = q.shape
    S, bs = k.shape[2], routing.block_size
    first = S - T
    if T == 1:
        block = first // bs
        if block not in cache.lists:
            keep = kept_blocks(cache, k, routing, gate_scores, layer, block, scale)
            cache.lists[block] = kept_list(keep, B, H, min(routing.block_k, block) + 1)
        attend_kept = block_decode if kernels else block_decode_reference
        return attend_kept(q, k, v, cache.lists[block], first, bs, scale)
    allowed = torch.zeros(B, H, T, S, dtype=torch.bool, device=q.device)
    for t in range(T):  # several new queries (a chunk of a prompt): each one's blocks as a token mask
        keep = kept_blocks(cache, k, routing, gate_scores, layer, (first + t) // bs, scale)
        allowed[:, :, t] = _pad_blocks(keep, S, bs).expand(B, H, S)
    allowed &= causal_rows(T, S, q.device)
    k, v = repeat_kv(k, H), repeat_kv(v, H)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)


def _pad_blocks(keep: torch.Tensor, S: int, bs: int) -> torch.Tensor:
    """A block keep row (B|1, H, nb') widened to all S key positions (blocks past nb' are not kept)."""
    nb = -(-S // bs)
    wide = F.pad(keep, (0, nb - keep.shape[-1]))
    return wide[..., torch.arange(S, device=keep.device) // bs]


def kept_list(keep: torch.Tensor, B: int, H: int, n_kept: int) -> torch.Tensor:
    """(B, H, n_kept) int32: the kept block indices of each row of keep (B|1, H, nb') in ascending order, -1 past a
    row's last (n_kept: the most any row keeps, block_k earlier blocks and its own, known without reading the mask
    back)."""
    keep = keep.expand(B, H, keep.shape[-1])
    order = torch.sort(keep.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :n_kept]
    return torch.where(torch.gather(keep, -1, order), order, -1).to(torch.int32)
