"""Block routing: key blocks chosen per query block, and a block-sparse attention path that skips their work.

The sequence is cut into blocks of `block_size` tokens (the last one may be shorter). Each query block i keeps
its diagonal block (causal inside it) and the `block_k` best *earlier* key blocks j < i, by a score per
(query block, key block) and head; a query block with block_k or fewer earlier blocks keeps all of them.

Scores per routing mode:
  block-oracle  the true pooled attention mass: for each query block, the mean over its queries of the dense
                attention weight that falls in each key block (computed in query chunks, never all T x T at once)
  block-gate    a block gate (BlockGate): G = pool_q(X) W_gq (pool_k(X) W_gk)^T / sqrt(d_gate), X the normed input
                of Q/K/V, queries mean-pooled per block, keys mean-pooled or max- and min-pooled and concatenated
                (SeerAttention pools keys by max and min); a hard top-k, so no gradient reaches the gate
  block-random  a fixed hash of (seed, layer, head, query block, key block): independent of the sequence length
                (a longer sequence keeps the same choices for the blocks it shares with a shorter one)
  block-soft    the soft block gate for end-to-end training: attention reweighted by a sigmoid mask of the block
                gate's scores, the reading given by Routing.soft_* exactly as for the token soft gate
                (routing.soft_gate_mask over the earlier blocks with k = block_k), the diagonal block weight 1

Selection (earlier_topk_indices: the top-k of each query block's strictly earlier blocks, shared by both paths below)
decides which blocks are kept. Attention over the kept blocks runs through one of two paths with the same result:
  flex    torch.nn.attention.flex_attention with a BlockMask built from the block selection: the chosen earlier
          blocks are "full" blocks (no mask evaluated), the diagonal the only "partial" block (a causal mask_mod);
          no T x T tensor. A routing builds it straight from the top-k block indices (block_mask_from_scores).
          Compiled (torch.compile); used on CUDA when T is a multiple of block_size and block_size a multiple of
          128 (the H100 kernels' default tiles), since that is where it skips work.
  masked  the selection expanded to a token mask (B, H, T, T), then scaled_dot_product_attention: the CPU path,
          and the GPU path for other block sizes; no speed-up, same result to float rounding.
"""
from __future__ import annotations

import math
import os
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import GatelabError, Routing
from .routing import fixed_random_scores, soft_gate_mask, topk_keep_mask

BACKENDS = ("auto", "flex", "masked")
# compile the inference path's gate scores and block lists on CUDA (see _compiled): GATELAB_COMPILE_BLOCKS=1. Off by
# default until measured on a GPU: CPU tests show the compiled graphs give exactly the eager results, and
# benchmarks/bench_block.py's e2e rows time both in one run; the faster becomes the default.
COMPILE_SELECTION = os.environ.get("GATELAB_COMPILE_BLOCKS", "0") == "1"


# ----------------------------------------------------------------------------------------------------------
# the block gate

def n_blocks(T: int, block_size: int) -> int:
    return -(-T // block_size)


def pool_blocks(x: torch.Tensor, block_size: int, how: str, valid: torch.Tensor | None = None) -> torch.Tensor:
    """x (B, T, C) -> (B, nb, C) per block of block_size tokens: mean, max or min over the block's tokens (the
    last block may be shorter; only its real tokens count). valid: optional (B|1, T) bool, the tokens to pool
    (e.g. not padding); a block with none pools to 0."""
    B, T, C = x.shape
    nb = n_blocks(T, block_size)
    pad = nb * block_size - T
    ok = torch.ones(1, T, dtype=torch.bool, device=x.device) if valid is None else valid
    ok = F.pad(ok.expand(B, T), (0, pad), value=False).view(B, nb, block_size, 1)
    xs = F.pad(x, (0, 0, 0, pad)).view(B, nb, block_size, C)
    if how == "mean":
        return (xs * ok).sum(2) / ok.sum(2).clamp_min(1).to(x.dtype)
    fill = float("-inf") if how == "max" else float("inf")
    pooled = xs.masked_fill(~ok, fill)
    pooled = pooled.amax(2) if how == "max" else pooled.amin(2)
    return pooled.masked_fill(~ok.any(2), 0.0)


class BlockGate(nn.Module):
    """A bilinear gate over blocks, per head: G[h] = (pool_q(X) W_gq[h]) (pool_k(X) W_gk[h])^T / sqrt(d_gate).

    pool "mean": queries and keys mean-pooled; "max-min": queries mean-pooled, keys max-pooled and min-pooled
    and concatenated (SeerAttention's key pooling), so W_gk reads 2 features per input feature. A "random" block
    gate is the same module, frozen. Initialised N(0, 1/fan_in) like the token gate.

    reads "x" (the default): X is the layer's normed input (d_model features, no position). reads "qk" (Hugging
    Face models; SeerAttention's choice): the attention's own queries and keys after RoPE are pooled per head
    instead (head_dim features), so the gate starts from what the model's attention compares.
    """

    is_block_gate = True

    def __init__(self, d_model: int, n_head: int, d_gate: int, pool: str = "mean", init_std: float | None = None,
                 trainable: bool = True, reads: str = "x", head_dim: int | None = None):
        super().__init__()
        if pool not in ("mean", "max-min"):
            raise GatelabError(f"block gate pooling must be mean or max-min, got {pool!r}")
        if reads not in ("x", "qk"):
            raise GatelabError(f"a block gate reads x or qk, got {reads!r}")
        if reads == "qk" and not head_dim:
            raise GatelabError("a block gate that reads qk needs the attention's head_dim")
        self.d_gate, self.pool, self.init_std, self.reads = d_gate, pool, init_std, reads
        q_in = d_model if reads == "x" else head_dim
        k_in = q_in * (2 if pool == "max-min" else 1)
        self.wq = nn.Parameter(torch.empty(n_head, q_in, d_gate), requires_grad=trainable)
        self.wk = nn.Parameter(torch.empty(n_head, k_in, d_gate), requires_grad=trainable)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.wq, std=self.init_std or 1.0 / math.sqrt(self.wq.shape[1]))
        nn.init.normal_(self.wk, std=self.init_std or 1.0 / math.sqrt(self.wk.shape[1]))

    def forward(self, x: torch.Tensor, block_size: int, valid: torch.Tensor | None = None,
                q: torch.Tensor | None = None, k: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, C) -> block scores (B, H, nb, nb), not yet causally masked. valid: (B|1, T) bool, the tokens
        pooled (padding excluded); None: all. q (B, H, T, D), k (B, Hk, T, D): the attention's queries and keys
        after RoPE, which a gate that reads "qk" pools instead of x (others ignore them)."""
        if self.reads == "qk":
            if q is None or k is None:
                raise GatelabError("this block gate reads the attention's queries and keys (qk); none were given")
            fn = qk_block_scores
            if q.is_cuda and not _wants_grad(q, k, self.wq, self.wk):  # inference: one compiled graph
                fn = _compiled("qk_block_scores", qk_block_scores)
            return fn(q, k, self.wq, self.wk, block_size, self.pool, valid)
        xq = pool_blocks(x, block_size, "mean", valid)
        xk = xq if self.pool == "mean" else pool_keys(x, block_size, self.pool, valid)
        gq = torch.einsum("bnc,hcd->bhnd", xq, self.wq.to(x.dtype))
        gk = torch.einsum("bnc,hcd->bhnd", xk, self.wk.to(x.dtype))
        return gq @ gk.transpose(-1, -2) / math.sqrt(self.d_gate)


def pool_keys(x: torch.Tensor, block_size: int, pool: str, valid: torch.Tensor | None) -> torch.Tensor:
    """A block gate's key side: x (N, T, C) -> (N, nb, C) mean-pooled, or (N, nb, 2C) max- and min-pooled."""
    if pool == "mean":
        return pool_blocks(x, block_size, "mean", valid)
    return torch.cat([pool_blocks(x, block_size, "max", valid), pool_blocks(x, block_size, "min", valid)], -1)


def qk_block_scores(q, k, wq, wk, block_size: int, pool: str, valid: torch.Tensor | None = None) -> torch.Tensor:
    """A qk block gate's scores (B, H, nb, nb): the attention's queries q (B, H, T, D) mean-pooled per block and its
    keys k (B, Hk, T, D) pooled by `pool`, each mapped to d_gate per head (wq (H, D, d_gate), wk (H, D or 2D,
    d_gate)), then G = gq gk^T / sqrt(d_gate). A plain function of tensors, so that inference compiles it once for
    every layer (the layers' weights are inputs, not constants)."""
    B, H, T, D = q.shape
    per_head = None if valid is None else valid.expand(B, T).repeat_interleave(H, dim=0)
    xq = pool_blocks(q.reshape(B * H, T, D), block_size, "mean", per_head)
    xk = pool_keys(_repeat_kv(k, H).reshape(B * H, T, D), block_size, pool, per_head)
    nb = xq.shape[1]
    gq = torch.einsum("bhnc,hcd->bhnd", xq.view(B, H, nb, -1), wq.to(q.dtype))
    gk = torch.einsum("bhnc,hcd->bhnd", xk.view(B, H, nb, -1), wk.to(q.dtype))
    return gq @ gk.transpose(-1, -2) / math.sqrt(wq.shape[-1])


_COMPILED: dict = {}


def _compile_once(name: str, fn):
    """torch.compile(fn, dynamic=False), built once per name (compiled_flex, _compiled)."""
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn, dynamic=False)
    return _COMPILED[name]


def _compiled(name: str, fn):
    """fn compiled once, with COMPILE_SELECTION (GATELAB_COMPILE_BLOCKS=1); else fn. The inference path of block
    routing (gate scores, top-k block lists) is tens of small kernels per layer; eager, their launches cost more than
    the attention they save at batch 1 (benchmarks/bench_block.py's e2e rows time both)."""
    return _compile_once(name, fn) if COMPILE_SELECTION else fn


# ----------------------------------------------------------------------------------------------------------
# block scores and selection

def earlier_blocks(nb: int, device) -> torch.Tensor:
    """(nb, nb) bool, True where key block j < query block i: the blocks a query block chooses among."""
    return torch.ones(nb, nb, dtype=torch.bool, device=device).tril(-1)


def previous_block_rows(scores: torch.Tensor) -> torch.Tensor:
    """Causal block scores: row i becomes row i-1 (row 0, which has no earlier block to choose, is zeros).

    A query block's own pooled row reads every token of the block, so choosing its key blocks by it lets a query's
    output depend on later tokens of its block (measured by future_token_influence); trained end to end, a model
    reads the future through that. Row i-1 (the previous, complete query block against key blocks j <= i-1) only
    reads tokens every query of block i can see, and its entries cover exactly block i's earlier blocks j < i. Every
    block selection (gate, soft gate, oracle) and the distillation targets go through this, so they stay one
    consistent quantity."""
    return F.pad(scores[..., :-1, :], (0, 0, 1, 0))


def earlier_topk_indices(scores: torch.Tensor, block_k: int) -> torch.Tensor:
    """(..., nb, kk) int32, kk = min(block_k, nb - 1): the kk highest-scoring earlier blocks of each query block, in
    ascending block order; a row i < kk lists its i earlier blocks first (the rest are later blocks, to be ignored).
    The one selection both block paths use (select_blocks' keep-mask, block_mask_from_scores' block lists), so they
    pick the same blocks among tied scores too (bf16 gate scores tie often)."""
    nb = scores.shape[-1]
    kk = min(block_k, nb - 1)
    masked = scores.detach().float().masked_fill(~earlier_blocks(nb, scores.device), float("-inf"))
    return masked.topk(kk, dim=-1).indices.sort(dim=-1).values.to(torch.int32)


def select_blocks(scores: torch.Tensor, block_k: int) -> torch.Tensor:
    """Keep-mask (..., nb, nb) over blocks: each query block's diagonal block and its block_k highest-scoring
    earlier blocks (all of them when it has block_k or fewer). scores: (..., nb, nb), e.g. (B, H, nb, nb)."""
    nb = scores.shape[-1]
    earlier = earlier_blocks(nb, scores.device)
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if min(block_k, nb - 1) > 0:
        keep.scatter_(-1, earlier_topk_indices(scores, block_k).long(), True)
    return (keep & earlier) | torch.eye(nb, dtype=torch.bool, device=scores.device)


@torch.compiler.disable  # integer hashing with 32-bit constants: eager, outside compiled graphs (and CUDA graphs)
def block_random_scores(layer: int, n_head: int, nb: int, seed: int, device) -> torch.Tensor:
    """(1, H, nb, nb) uniform scores in [0, 1): random-topk's counter hash (routing.fixed_random_scores) of (seed,
    layer, head, query block, key block), the same on every device and for every sequence length, so block-random's
    choice for a query block never depends on T."""
    return fixed_random_scores(layer, n_head, nb, nb, seed, row_offset=0, device=device).float()[None]


def _repeat_kv(t: torch.Tensor, n_head: int) -> torch.Tensor:
    return t if t.shape[1] == n_head else t.repeat_interleave(n_head // t.shape[1], dim=1)


def token_causal(T: int, S: int, device) -> torch.Tensor:
    """(T, S) bool: query i (the last T of S positions) sees key j <= i."""
    return torch.arange(S, device=device)[None, :] <= torch.arange(T, device=device)[:, None] + (S - T)


def _plain_causal(allowed: torch.Tensor | None, T: int) -> bool:
    """Whether a mask of allowed keys (None, or bool broadcastable to (B, H, T, T)) is just the causal mask (an HF
    model without padding passes it explicitly)."""
    if allowed is None:
        return True
    if allowed.shape[-2:] != (T, T):
        return False
    return bool(torch.equal(allowed, token_causal(T, T, allowed.device).expand_as(allowed)))


@torch.no_grad()
def block_attention_mass(q: torch.Tensor, k: torch.Tensor, block_size: int, allowed: torch.Tensor | None = None,
                         scale: float | None = None, chunk_elements: int = 1 << 27) -> torch.Tensor:
    """The pooled attention mass (B, H, nb, nb), float32: entry (i, j) is the mean over query block i's queries of
    the dense attention weight on key block j. Rows sum to 1 (0 for fully masked queries). q (B, H, T, D), k
    (B, Hk, T, D) (grouped-query attention: Hk divides H); allowed: None (causal) or a bool mask (B|1, 1|H, T, T).
    Computed in chunks of whole query blocks of about chunk_elements attention weights each."""
    B, H, T, D = q.shape
    scale = scale if scale is not None else D ** -0.5
    from . import kernels
    if kernels.block_mass_fits(q, k, block_size) and _plain_causal(allowed, T):  # one Triton kernel on CUDA
        count = torch.full((n_blocks(T, block_size), 1), float(block_size), device=q.device)
        count[-1] = T - (count.shape[0] - 1) * block_size
        return kernels.block_attention_mass_fused(q, k, block_size, scale) / count
    k = _repeat_kv(k, H)
    S = k.shape[2]
    nb, nbk = n_blocks(T, block_size), n_blocks(S, block_size)
    rows = max(block_size, (chunk_elements // max(1, B * H * S)) // block_size * block_size)
    out = torch.zeros(B, H, nb, nbk, dtype=torch.float32, device=q.device)
    causal = token_causal(T, S, q.device)
    for s in range(0, T, rows):
        e = min(T, s + rows)
        logits = (q[:, :, s:e] @ k.transpose(-1, -2)).float() * scale
        ok = causal[s:e] if allowed is None else causal[s:e] & allowed[..., s:e, :]
        A = torch.softmax(logits.masked_fill(~ok, float("-inf")), dim=-1).nan_to_num(0.0)
        A = F.pad(A, (0, nbk * block_size - S)).view(B, H, e - s, nbk, block_size).sum(-1)
        nq = n_blocks(e - s, block_size)
        A = F.pad(A, (0, 0, 0, nq * block_size - (e - s))).view(B, H, nq, block_size, nbk).sum(3)
        out[:, :, s // block_size:s // block_size + nq] = A
    count = torch.full((nb, 1), float(block_size), device=q.device)
    count[-1] = T - (nb - 1) * block_size
    return out / count


# ----------------------------------------------------------------------------------------------------------
# attention over the kept blocks

def _has_compute_q_blocks() -> bool:
    try:
        import inspect

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
    return _compile_once("flex_attention", flex_attention)


def _causal_mod(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _selection_mod(keep: torch.Tensor, block_size: int):
    """A mask_mod that encodes the block selection itself (for flex_attention run eagerly, which ignores a
    BlockMask's block lists and evaluates the mask_mod everywhere)."""
    if keep.shape[0] == 1:
        return lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & keep[0, h, q_idx // block_size, kv_idx // block_size]
    return lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & keep[b, h, q_idx // block_size, kv_idx // block_size]


def _diagonal_blocks(Bs: int, H: int, nb: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(Bs, H, nb) ones and (Bs, H, nb, nb) int32 whose row i starts with i: the diagonal block of each query block
    as its one partial block. (Not cached: a tensor cached from inside a CUDA-graphed region would be overwritten.)"""
    idx = torch.arange(nb, dtype=torch.int32, device=device)
    first = F.pad(idx[:, None], (0, nb - 1))
    return (torch.ones(Bs, H, nb, dtype=torch.int32, device=device), first.expand(Bs, H, nb, nb).contiguous())


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


def block_lists(scores: torch.Tensor, block_k: int):
    """The BlockMask's four lists for select_blocks(scores, block_k), scores (Bs, H, nb, nb) causal rows (after
    previous_block_rows): (partial counts, partial indices) = each query block's diagonal block, (full counts, full
    indices) = the top-k indices of its earlier blocks (earlier_topk_indices, as select_blocks), min(i, k) of them
    first in row i. A plain function of tensors (compiled on CUDA: block_mask_from_scores)."""
    Bs, H, nb, _ = scores.shape
    one, diag_idx = _diagonal_blocks(Bs, H, nb, scores.device)
    kk = min(block_k, nb - 1)
    if kk <= 0:
        full_num = torch.zeros(Bs, H, nb, dtype=torch.int32, device=scores.device)
        return one, diag_idx, full_num, torch.zeros(Bs, H, nb, nb, dtype=torch.int32, device=scores.device)
    full_idx = F.pad(earlier_topk_indices(scores, block_k), (0, nb - kk)).contiguous()
    full_num = torch.arange(nb, device=scores.device).clamp(max=kk).to(torch.int32).expand(Bs, H, nb).contiguous()
    return one, diag_idx, full_num, full_idx


def block_mask_from_scores(scores: torch.Tensor, block_k: int, block_size: int, T: int, backward: bool = True):
    """The BlockMask of select_blocks(scores, block_k) built straight from the scores (Bs, H, nb, nb) (causal rows,
    i.e. after previous_block_rows): block_lists' top-k indices are the full-block lists, so no keep-mask or
    scatter is built on the way (build_block_mask's path took about 460 operator calls). On CUDA the lists come from
    one compiled graph. The mask_mod is causal only: for compiled flex_attention (compiled_flex), which evaluates it
    on the diagonal blocks alone."""
    fn = _compiled("block_lists", block_lists) if scores.is_cuda else block_lists
    return _block_mask(*fn(scores.detach(), block_k), block_size, T, None, backward)


def token_keep(keep: torch.Tensor, block_size: int, T: int, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """The block keep-mask expanded to a token mask (Bs, H, T, T), causal (and within `allowed`)."""
    blk = torch.arange(T, device=keep.device) // block_size
    tok = keep[:, :, blk][:, :, :, blk] & token_causal(T, T, keep.device)
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


def _wants_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _flex_block_attention(q, k, v, block_mask_for, scale: float | None) -> torch.Tensor:
    """Compiled flex_attention over the BlockMask that block_mask_for(backward) builds; backward: whether a gradient
    will be asked for (only then does the BlockMask need its query-side lists). flex_attention has no CPU backward."""
    backward = _wants_grad(q, k, v)
    if backward and not q.is_cuda:
        raise GatelabError("flex_attention has no backward pass on CPU: use the masked block path there")
    return compiled_flex()(q, k, v, block_mask=block_mask_for(backward), scale=scale,
                           enable_gqa=k.shape[1] != q.shape[1])


def block_sparse_attention(q, k, v, keep: torch.Tensor, block_size: int, allowed: torch.Tensor | None = None,
                           scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """Causal attention of q (B, H, T, D) over k, v (B, Hk, T, D) restricted to the kept blocks (keep: (B|1, H, nb,
    nb) bool, diagonal included), through flex_attention (work skipped) or a token mask (same result)."""
    H, T = q.shape[1], q.shape[2]
    if resolve_backend(backend, q, block_size, allowed) == "flex":
        return _flex_block_attention(q, k, v, lambda backward: build_block_mask(keep, block_size, T,
                                                                               backward=backward), scale)
    mask = token_keep(keep, block_size, T, allowed)
    out = F.scaled_dot_product_attention(q, _repeat_kv(k, H), _repeat_kv(v, H), attn_mask=mask, scale=scale)
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
    ok = token_causal(T, T, q.device) if allowed is None else token_causal(T, T, q.device) & allowed
    bias = log_m[:, :, blk][:, :, :, blk].masked_fill(~ok, float("-inf"))
    k, v = _repeat_kv(k, H), _repeat_kv(v, H)
    if routing.soft_renormalize:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=scale)
        return out.nan_to_num(0.0) if allowed is not None else out
    scale = scale if scale is not None else D ** -0.5
    S = (q @ k.transpose(-1, -2)).float() * scale
    A = torch.softmax(S.masked_fill(~ok, float("-inf")), dim=-1).nan_to_num(0.0)
    return (A * bias.exp()).to(v.dtype) @ v


def block_routed_attention(q, k, v, routing: Routing, *, gate_scores=None, layer: int = 0,
                           allowed: torch.Tensor | None = None, scale: float | None = None,
                           backend: str = "auto") -> torch.Tensor:
    """Causal attention under a block routing. q (B, H, T, D); k, v (B, Hk, T, D), Hk dividing H; gate_scores: a
    callable returning the block gate's scores (B, H, nb, nb) (block-gate, block-soft); allowed: None (causal) or
    the model's own bool mask (B|1, 1|H, T, T) (padding, sliding windows); scale: None = 1/sqrt(D)."""
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
    if routing.mode == "block-oracle":
        scores = previous_block_rows(block_attention_mass(q.detach(), k.detach(), routing.block_size, allowed, scale))
    elif routing.mode == "block-gate":
        scores = previous_block_rows(gate_scores())
    else:
        scores = block_random_scores(layer, q.shape[1], n_blocks(T, routing.block_size), routing.seed, q.device)
    if resolve_backend(backend, q, routing.block_size, allowed) == "flex":  # no keep-mask on the way
        return _flex_block_attention(q, k, v, lambda backward: block_mask_from_scores(
            scores, routing.block_k, routing.block_size, T, backward=backward), scale)
    keep = select_blocks(scores.detach(), routing.block_k)
    return block_sparse_attention(q, k, v, keep, routing.block_size, allowed, scale, "masked")


# ----------------------------------------------------------------------------------------------------------
# post-hoc block gates: the objective, and F1 against the oracle blocks

def block_kl(mass: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Mean over query blocks with at least two earlier blocks of KL(P || softmax(G)), both over the earlier
    blocks only, P the pooled attention mass renormalised over them (the diagonal block is always kept, so the
    gate only has to rank the earlier ones)."""
    nb = G.shape[-1]
    earlier = earlier_blocks(nb, G.device)
    rows = earlier.sum(-1) >= 2
    if not bool(rows.any()):
        return G.sum() * 0.0
    P = mass.masked_fill(~earlier, 0.0)
    P = P / P.sum(-1, keepdim=True).clamp_min(1e-30)
    log_q = torch.log_softmax(G.masked_fill(~earlier, float("-inf")), dim=-1)
    terms = torch.where(earlier & (P > 0), P * (P.clamp_min(1e-30).log() - log_q), torch.zeros((), device=G.device))
    return terms.sum(-1)[..., rows].mean()


def block_bce(mass: torch.Tensor, G: torch.Tensor, block_k: int) -> torch.Tensor:
    """BCE of G as logits against the oracle's block top-k (earlier blocks only)."""
    nb = G.shape[-1]
    earlier = earlier_blocks(nb, G.device)
    if not bool(earlier.any()):
        return G.sum() * 0.0
    target = topk_keep_mask(mass, min(block_k, nb), earlier).float()
    full = earlier.expand_as(G)
    return F.binary_cross_entropy_with_logits(G[full], target.expand_as(G)[full])


def block_f1(mass: torch.Tensor, G: torch.Tensor, block_k: int) -> float:
    """|TopK(G) n TopK(mass)| / block_k over earlier blocks, averaged over query blocks with more than block_k
    earlier blocks (NaN when there is none)."""
    nb = G.shape[-1]
    if nb - 1 <= block_k:
        return float("nan")
    earlier = earlier_blocks(nb, G.device)
    both = topk_keep_mask(mass, block_k, earlier) & topk_keep_mask(G.detach(), block_k, earlier)
    return float((both[..., block_k + 1:, :].sum(-1).float() / block_k).mean())


def block_gate_objective(layers, objective: str, block_k: int) -> tuple[torch.Tensor, float]:
    """The kl or bce objective and the block F1 at block_k, averaged over layers; `layers` yields (mass, G)."""
    if objective not in ("kl", "bce"):
        raise GatelabError(f"block gates distil with loss kl or bce, got {objective!r}")
    total, f1s = 0.0, []
    for mass, G in layers:  # the rows selection uses: each query block's scores from the previous block
        mass, G = previous_block_rows(mass), previous_block_rows(G)
        total = total + (block_kl(mass, G) if objective == "kl" else block_bce(mass, G, block_k))
        f1s.append(block_f1(mass, G, block_k))
    return total / len(f1s), sum(f1s) / len(f1s)


# ----------------------------------------------------------------------------------------------------------
# post-hoc block gates on gatelab's GPT: distillation loss, export, attach

def block_distill_loss(model, x: torch.Tensor, objective: str, routing: Routing) -> tuple[torch.Tensor, float]:
    """The kl or bce objective of the GPT's block gates on batch x (dense forward, no gradient to the model)
    against each layer's pooled attention mass at routing.block_size, and their block F1 at routing.block_k."""
    from .distill import layer_inputs

    def layers():
        for block, xn in zip(model.blocks, layer_inputs(model, x)):
            with torch.no_grad():
                q, k, _ = block.attn.qkv_heads(xn)
                mass = block_attention_mass(q, k, routing.block_size)
            yield mass, block.attn.block_gate(xn, routing.block_size).float()
    return block_gate_objective(layers(), objective, routing.block_k)


BLOCK_GATE_FORMAT = "gatelab-block-gate-v1"
# what a block gate's scores mean, recorded in saved gates: each query block ranked by the previous block's row
# (previous_block_rows). Gates saved before it (own-row, not causal) have no such field and are refused.
BLOCK_ROWS = "previous-block"


def check_block_rows(meta: dict, path) -> None:
    if meta.get("block_rows") != BLOCK_ROWS:
        raise GatelabError(f"block gate {path} was distilled before block selection became causal (its gate.json has "
                           f"no block_rows: {BLOCK_ROWS!r}); distil it again")


def export_block_gate(model, cfg, out_dir):
    """Write the GPT's block gates alone: OUT/gate.safetensors + OUT/gate.json (format gatelab-block-gate-v1:
    base checkpoint and its sha256, shape, d_gate, pooling, the block size and k it was distilled at)."""
    from pathlib import Path

    from safetensors.torch import save_file

    from .checkpoint import MODEL_FILE, find_checkpoint
    from .config import to_dict, write_json
    from .data import sha256_file
    from .distill import GATE_META, GATE_WEIGHTS, trained_on
    out = Path(out_dir)
    state = {f"blocks.{i}.{name}": p.detach().cpu().contiguous()
             for i, b in enumerate(model.blocks) for name, p in (("wq", b.attn.block_gate.wq),
                                                                  ("wk", b.attn.block_gate.wk))}
    base = find_checkpoint(cfg.init_from) if cfg.init_from else None
    meta = dict(format=BLOCK_GATE_FORMAT, base_checkpoint=str(cfg.init_from) if cfg.init_from else None,
                base_sha256=sha256_file(base / MODEL_FILE) if base else None, n_layer=model.cfg.n_layer,
                n_head=model.cfg.n_head, d_model=model.cfg.d_model, d_gate=model.cfg.d_gate,
                block_pool=model.cfg.block_pool, block_size=cfg.routing.block_size, block_k=cfg.routing.block_k,
                loss=cfg.objective, steps=cfg.steps, seed=cfg.seed, routing=to_dict(cfg.routing),
                block_rows=BLOCK_ROWS, data_fingerprint=trained_on(cfg))
    tmp = out / (GATE_WEIGHTS + ".tmp")
    save_file(state, str(tmp))
    tmp.replace(out / GATE_WEIGHTS)
    write_json(out / GATE_META, meta)
    return out / GATE_META


def attach_block_gate(model, meta: dict, state: dict) -> dict:
    """Give every layer of the GPT the saved block gate (frozen); the checks of distill.attach_gate ran already."""
    check_block_rows(meta, "(GPT block gate)")
    cfg = model.cfg
    device = next(model.parameters()).device
    for i, block in enumerate(model.blocks):
        gate = BlockGate(cfg.d_model, cfg.n_head, int(meta["d_gate"]), meta.get("block_pool", "mean"),
                         trainable=False)
        gate.wq.data.copy_(state[f"blocks.{i}.wq"])
        gate.wk.data.copy_(state[f"blocks.{i}.wk"])
        block.attn.block_gate = gate.to(device)
    cfg.block_gate, cfg.block_pool = "random", meta.get("block_pool", "mean")
    return meta


def future_token_influence(mode: str, reading: str | None = None, block_size: int = 8, block_k: int = 2) -> float:
    """How much a token moves the outputs of the earlier tokens of its own query block under block routing `mode`:
    the largest change of a tiny random GPT's final hidden states at positions 40-44 when token 45 is replaced
    (blocks of `block_size`; 0.0 means causal). Block selection pools each query block over all its tokens, so a
    query's kept blocks (and, for block-soft, its weights) depend on later tokens of its block: a leak that an
    end-to-end trained model can exploit. Measured, not assumed: the report and the tests call this."""
    from .config import DEFAULT_READING, ModelConfig, soft_gate_routing
    from .model import GPT
    if block_size != 8:
        raise GatelabError("future_token_influence edits position 45 inside the block 40-47: block_size must be 8")
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT(ModelConfig(n_layer=2, d_model=64, n_head=4, d_mlp=128, context=64, d_gate=8, vocab_size=101,
                                block_gate="learned")).eval()
    x = torch.randint(0, 101, (1, 64), generator=gen)
    edited = x.clone()
    edited[0, 45] = (x[0, 45] + 7) % 101
    if mode == "block-soft":
        routing = replace(soft_gate_routing(reading or DEFAULT_READING, 8), mode="block-soft",
                          block_size=block_size, block_k=block_k)
    else:
        routing = Routing(mode=mode, block_size=block_size, block_k=block_k)
    with torch.no_grad():
        a, b = model.hidden(x, routing), model.hidden(edited, routing)
    return (a[0, 40:45] - b[0, 40:45]).abs().max().item()
