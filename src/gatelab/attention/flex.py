"""flex_attention: a causal flex path with a score_mod (compiled code only) and the BlockMask of a block selection,
built from the selected blocks' index lists (no T x T tensor)."""
from __future__ import annotations

import inspect

import torch

from gatelab.attention.blocks import _diagonal_blocks, block_lists
from gatelab.attention.compiled import compile_once, compiled_if, wants_grad
from gatelab.config import GatelabError
from gatelab.kernels.block_select import block_select


def flex_ready() -> bool:
    """Whether flex_attention may serve this call: inside a torch.compile'd region (it is slow eagerly)."""
    return torch.compiler.is_compiling()


def _causal(b, h, i, j):
    return j <= i


# Tiles small enough for a score_mod that reads a captured fp32 T x T tensor: with the default tiles (128 x 128,
# three stages) the compiled forward asked the H100 for 240 KB of shared memory, over its 227 KB (torch 2.11).
FLEX_TILES = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32}


def causal_flex_attention(q, k, v, score_mod=None, return_lse: bool = False):
    """Causal flex_attention (queries and keys of the same T positions) with an optional score_mod."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    T = q.shape[-2]
    block_mask = create_block_mask(_causal, None, None, T, T, device=q.device)
    return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, return_lse=return_lse,
                          kernel_options=dict(FLEX_TILES) if score_mod is not None else None)


def _has_compute_q_blocks() -> bool:
    try:

        from torch.nn.attention.flex_attention import BlockMask
        return "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters
    except (ImportError, ValueError, TypeError):
        return False


_HAS_COMPUTE_Q_BLOCKS = _has_compute_q_blocks()


def has_flex() -> bool:
    """Whether this torch has flex_attention (2.5 and later)."""
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def compiled_flex():
    """torch.compile(flex_attention), built once. Eager flex_attention ignores a BlockMask's block lists (it
    evaluates the mask_mod everywhere), so our mask_mod also encodes the selection: correct either way."""
    from torch.nn.attention.flex_attention import flex_attention
    return compile_once("flex_attention", flex_attention)


def _causal_mod(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _selection_mod(keep: torch.Tensor, block_size: int):
    """A mask_mod that encodes the block selection itself (for flex_attention run eagerly, which ignores a
    BlockMask's block lists and evaluates the mask_mod everywhere)."""
    if keep.shape[0] == 1:
        return lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & keep[0, h, q_idx // block_size, kv_idx // block_size]
    return lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & keep[b, h, q_idx // block_size, kv_idx // block_size]


def _block_mask(kv_num: torch.Tensor, kv_idx: torch.Tensor, full_num: torch.Tensor, full_idx: torch.Tensor,
                block_size: int, T: int, mask_mod=None, backward: bool = True):
    """BlockMask with the listed earlier blocks full (no mask_mod evaluated there) and the listed partial blocks
    (the diagonal: _diagonal_blocks) under mask_mod (default: causal, all that the diagonal needs when
    flex_attention runs compiled and follows the block lists). backward=False skips the transposed (query-side)
    lists that only the backward pass reads."""
    from torch.nn.attention.flex_attention import BlockMask
    nb = full_num.shape[-1]
    if nb * block_size != T:
        raise GatelabError(f"the flex path needs the sequence length ({T}) to be a multiple of block_size "
                           f"({block_size})")
    extra = {} if backward or not _HAS_COMPUTE_Q_BLOCKS else dict(compute_q_blocks=False)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size,
                                    mask_mod=mask_mod or _causal_mod, seq_lengths=(T, T), **extra)


def build_block_mask(keep: torch.Tensor, block_size: int, T: int, mask_mod: str = "causal",
                     backward: bool = True):
    """A flex_attention BlockMask for a block keep-mask (Bs, H, nb, nb) (Bs = batch or 1), T = nb * block_size:
    the kept earlier blocks are full blocks, the diagonal the one partial block. Built from the (nb x nb)
    selection alone: no T x T tensor. mask_mod "selection" also encodes the selection in the mask_mod (right
    under eager flex_attention too), "causal" only causality (compiled flex_attention: the diagonal is all it
    evaluates there; benchmarks/bench_block.py times both)."""
    Bs, H, nb, _ = keep.shape
    full = keep & ~torch.eye(nb, dtype=torch.bool, device=keep.device)
    full_num = full.sum(-1, dtype=torch.int32)
    full_idx = torch.argsort(full.to(torch.int32), dim=-1, descending=True, stable=True).to(torch.int32)
    mod = _selection_mod(keep.contiguous(), block_size) if mask_mod == "selection" else _causal_mod
    return _block_mask(*_diagonal_blocks(Bs, H, nb, keep.device), full_num, full_idx.contiguous(), block_size, T,
                       mod, backward)


def block_mask_from_scores(scores: torch.Tensor, block_k: int, block_size: int, T: int, backward: bool = True,
                           compiled: bool = False):
    """The BlockMask of select_blocks(scores, block_k) built straight from the scores (Bs, H, nb, nb) (causal rows,
    i.e. after previous_block_rows): block_lists' top-k indices are the full-block lists, so no keep-mask or
    scatter is built on the way (build_block_mask's path took about 460 operator calls). On CUDA the lists come from
    one compiled graph when `compiled` (Backend.compile_blocks). The mask_mod is causal only: for compiled flex_attention (compiled_flex), which evaluates it
    on the diagonal blocks alone."""
    fn = compiled_if(compiled and scores.is_cuda, "block_lists", block_lists)
    return _block_mask(*fn(scores.detach(), block_k), block_size, T, None, backward)


def block_mask_from_factors(gq: torch.Tensor, gk: torch.Tensor, block_k: int, block_size: int, T: int,
                            backward: bool = True):
    """block_mask_from_scores(previous_block_rows(gq @ gk^T), ...) from a block gate's factors (BlockGate.factors:
    gq (Bs, H, nb, d_gate) scaled, gk), the four block lists written by one Triton kernel (kernels.block_select;
    its torch reference where the kernel does not serve): no nb x nb score tensor, no chain of small launches.
    The scores are float32 products of the factors (the eager path rounds G to the gate's dtype first)."""
    return _block_mask(*block_select(gq, gk, block_k), block_size, T, None, backward)


def _flex_block_attention(q, k, v, block_mask_for, scale: float | None) -> torch.Tensor:
    """Compiled flex_attention over the BlockMask that block_mask_for(backward) builds; backward: whether a gradient
    will be asked for (only then does the BlockMask need its query-side lists). flex_attention has no CPU backward."""
    backward = wants_grad(q, k, v)
    if backward and not q.is_cuda:
        raise GatelabError("flex_attention has no backward pass on CPU: use the masked block path there")
    return compiled_flex()(q, k, v, block_mask=block_mask_for(backward), scale=scale,
                           enable_gqa=k.shape[1] != q.shape[1])
