"""Decoding over a key/value cache of fixed size, the new token's position held on the device.

A decoding step of a small model is bound by the host: about 1,300 kernel launches per step for SmolLM2-135M, each
costing more host time than its kernel takes on the GPU. Replaying a step recorded in a CUDA graph removes that cost,
but a graph fixes every shape and every argument: the cache cannot grow, the position cannot be a Python number, and
nothing may be decided on the host from the data. This module is one layer's attention under those rules, for dense
and block-gate routings (hf/graphed.py records and replays the steps):

- The cache has room for every position from the start; keys past the position are masked (dense: SDPA with a mask
  over the whole cache, on the fused kernels that take grouped key/value heads) or never read (block: the kept-list
  kernel, kernels/block_decode.py, reads the position from memory).
- Block selection (attention/blocks.py's rule: query block i keeps its own block and the block_k best earlier blocks
  j < i by the previous block's row G[i-1, j]) is fixed once block i-1 is complete. So the gate's key factor of each
  complete block is kept (gk, float32), and a query block's kept list is computed once, at the step of its first query
  ("selecting" steps, a second graph): the previous block's pooled factor against every complete block's, ranked
  by score then lower block, as in kernels/block_select.py (float32 products of the factors). The other steps only
  read the kept list. The queries (qk gates) or layer inputs (x gates) of the current block wait in a ring of one
  block.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from gatelab.config import GatelabError, Routing
from gatelab.kernels.block_decode import block_decode, block_decode_reference

# SDPA over a fixed-size cache with a mask and grouped key/value heads: cuDNN or the memory-efficient kernel take the
# mask and read the grouped heads in place (flash takes no mask; the math path repeats the heads).
FIXED_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION,
                  SDPBackend.MATH]


@dataclass
class FixedDecode:
    """The decoding state every layer shares: the new token's position (a (1,) int64 tensor on the model's device,
    advanced on the device), the cache's capacity, the routing's block size, whether this step starts a query block
    (the block layers then select its kept blocks), and whether the model is decoding (stepping) or reading the
    prompt. `layers`: each layer's FixedBlockLayer.

    What every layer of a step derives from the position is computed once per step, when the position moves
    (set_position, advance), not once per layer: `valid` (capacity,) bool, the cache slots at or before the position
    (dense attention's mask), and `offset` (1,), the position within its block (the block ring's slot)."""

    position: torch.Tensor
    capacity: int
    block_size: int = 1
    selecting: bool = False
    stepping: bool = False
    layers: dict = field(default_factory=dict)

    def __post_init__(self):
        self.slots = torch.arange(self.capacity, device=self.position.device)
        self.valid = torch.zeros(self.capacity, dtype=torch.bool, device=self.position.device)
        self.offset = torch.zeros_like(self.position)
        self._derive()

    def _derive(self) -> None:
        self.valid.copy_(self.slots <= self.position)
        self.offset.copy_(self.position % self.block_size)

    def set_position(self, position: int) -> None:
        self.position.fill_(position)
        self._derive()

    def advance(self) -> None:
        """The next position, on the device (inside a recorded step)."""
        self.position.add_(1)
        self._derive()


@dataclass
class FixedBlockLayer:
    """One layer's block-decoding buffers: ring (B, H, bs, D) queries or (B, bs, C) inputs of the current block;
    gk (B, H, nb, d_gate) float32, the gate's key factor of each complete block; kept (B, H, kk + 1) int32, the current
    query block's kept blocks (ascending, -1 where it keeps fewer, its own block last)."""

    ring: torch.Tensor
    gk: torch.Tensor
    kept: torch.Tensor


def dense_fixed_step(q, k, v, valid: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """One new query per sequence, q (B, H, 1, D), over the cache slots k, v (B, Hk, capacity, D) where valid
    (capacity,) bool is set (FixedDecode.valid: those at or before the position)."""
    with sdpa_kernel(FIXED_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=valid.view(1, 1, 1, -1), scale=scale,
                                              enable_gqa=k.shape[1] != q.shape[1])


def check_fixed_routing(routing: Routing) -> None:
    if routing.mode not in ("dense", "block-gate"):
        raise GatelabError(f"decoding with CUDA graphs serves dense and block-gate routings, not {routing.mode}")


def one_block_factors(gate, q_block=None, k_block=None, x_block=None) -> tuple[torch.Tensor, torch.Tensor]:
    """A block gate's factors (gq scaled, gk), each (B, H, d_gate), of one complete block: its queries (B, H, bs, D)
    and keys (B, Hk, bs, D) for a gate that reads qk, its layer inputs (B, bs, C) otherwise."""
    bs = (q_block if gate.reads == "qk" else x_block).shape[-2]
    gq, gk = gate.factors(x_block, bs, None, q=q_block, k=k_block)
    return gq[:, :, 0], gk[:, :, 0]


def select_kept(layer: FixedBlockLayer, gq: torch.Tensor, block, block_k: int) -> None:
    """layer.kept <- the kept list of query block `block` (an int, or a (1,) tensor), from the previous block's query
    factor gq (B, H, d_gate) against the key factors of the complete blocks j < block in layer.gk."""
    nb = layer.gk.shape[2]
    kk = layer.kept.shape[-1] - 1
    blocks = torch.arange(nb, device=gq.device)
    scores = (layer.gk @ gq.float()[..., None]).squeeze(-1).masked_fill(blocks >= block, float("-inf"))
    ranked = scores.sort(dim=-1, descending=True, stable=True).indices[..., :kk]
    earlier = torch.where(ranked < block, ranked, nb).sort(dim=-1).values  # the chosen ones ascending, others last
    own = torch.zeros_like(layer.kept[..., :1]) + block
    layer.kept.copy_(torch.cat([torch.where(earlier < nb, earlier, -1).to(torch.int32), own.to(torch.int32)], -1))


def block_fixed_prefill(fixed: FixedDecode, layer_index: int, gate, routing: Routing, q, k, x) -> None:
    """Set up a layer's block buffers after a prompt of P positions: q (B, H, P, D), k (B, Hk, P, D) (after RoPE),
    x (B, P, C) the layer inputs. The complete blocks' key factors, the ring holding the block that the first step
    needs (its own, or the previous one when the first step starts a block), and the kept list of the first step's
    block."""
    B, H, P, D = q.shape
    bs = routing.block_size
    if fixed.block_size != bs:
        raise GatelabError(f"the decoding state counts blocks of {fixed.block_size} positions, the routing {bs}")
    nb = -(-fixed.capacity // bs)
    kk = max(0, min(routing.block_k, nb - 1))
    reads_qk = gate.reads == "qk"
    ring = q.new_zeros(B, H, bs, D) if reads_qk else x.new_zeros(B, bs, x.shape[-1])
    layer = FixedBlockLayer(ring, torch.zeros(B, H, nb, gate.d_gate, device=q.device),
                            torch.full((B, H, kk + 1), -1, dtype=torch.int32, device=q.device))
    complete = P // bs
    if complete:
        n = complete * bs
        gq, gk = gate.factors(None if reads_qk else x[:, :n], bs, None, q=q[:, :, :n], k=k[:, :, :n])
        layer.gk[:, :, :complete] = gk.float()
        select_kept(layer, gq[:, :, -1], complete, routing.block_k)
    else:
        select_kept(layer, torch.zeros(B, H, gate.d_gate, device=q.device), 0, routing.block_k)
    start = (P - 1) // bs * bs  # the current block's first position, or the last complete block's
    if reads_qk:
        ring[:, :, :P - start] = q[:, :, start:]
    else:
        ring[:, :P - start] = x[:, start:]
    fixed.layers[layer_index] = layer


def block_fixed_step(fixed: FixedDecode, layer_index: int, gate, routing: Routing, q, k, v, x,
                     scale: float | None = None, kernels: bool = True) -> torch.Tensor:
    """One new query per sequence, q (B, H, 1, D) at fixed.position, over the kept blocks of the whole cache k, v
    (B, Hk, capacity, D); x (B, 1, C) its layer input. On a selecting step, the block just completed gets its key
    factor and the new block its kept list first."""
    layer = fixed.layers.get(layer_index)
    if layer is None:
        raise GatelabError("block decoding with CUDA graphs starts from a prompt run under the same routing")
    bs = routing.block_size
    pos = fixed.position
    reads_qk = gate.reads == "qk"
    if fixed.selecting:  # the ring holds the block just completed
        prev = pos // bs - 1
        keys = None
        if reads_qk:
            keys = k.index_select(2, prev * bs + torch.arange(bs, device=q.device))
        gq, gk = one_block_factors(gate, layer.ring if reads_qk else None, keys, None if reads_qk else layer.ring)
        layer.gk.index_copy_(2, prev, gk.float()[:, :, None])
        select_kept(layer, gq, prev + 1, routing.block_k)
    if reads_qk:
        layer.ring.index_copy_(2, fixed.offset, q)
    else:
        layer.ring.index_copy_(1, fixed.offset, x)
    attend_kept = block_decode if kernels else block_decode_reference
    return attend_kept(q, k, v, layer.kept, pos, bs, scale)
