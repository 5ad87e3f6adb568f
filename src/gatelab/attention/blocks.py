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
                (soft.soft_gate_mask over the earlier blocks with k = block_k), the diagonal block weight 1

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

import torch
import torch.nn.functional as F

from gatelab.attention.gates import n_blocks
from gatelab.attention.masks import causal_rows, repeat_kv
from gatelab.kernels.block_mass import block_attention_mass_fused, block_mass_fits
from gatelab.kernels.hashing import fixed_random_scores


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
    ascending block order; a row i < kk lists its i earlier blocks first, then the later blocks i..kk-1 (to be
    ignored). The one selection both block paths use (select_blocks' keep-mask, block_mask_from_scores' block lists),
    so they pick the same blocks among tied scores too (bf16 gate scores tie often). Ties go to the lower block: a
    stable sort, where torch.topk leaves the choice among ties to the device (on CPU not the lower index), so that
    the fused kernel (kernels.block_select) picks exactly these blocks."""
    nb = scores.shape[-1]
    kk = min(block_k, nb - 1)
    masked = scores.detach().float().masked_fill(~earlier_blocks(nb, scores.device), float("-inf"))
    ranked = masked.sort(dim=-1, descending=True, stable=True).indices
    return ranked[..., :kk].sort(dim=-1).values.to(torch.int32)


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
    """(1, H, nb, nb) uniform scores in [0, 1): random-topk's counter hash (hashing.fixed_random_scores) of (seed,
    layer, head, query block, key block), the same on every device and for every sequence length, so block-random's
    choice for a query block never depends on T."""
    return fixed_random_scores(layer, n_head, nb, nb, seed, row_offset=0, device=device).float()[None]


def _plain_causal(allowed: torch.Tensor | None, T: int) -> bool:
    """Whether a mask of allowed keys (None, or bool broadcastable to (B, H, T, T)) is just the causal mask (an HF
    model without padding passes it explicitly)."""
    if allowed is None:
        return True
    if allowed.shape[-2:] != (T, T):
        return False
    return bool(torch.equal(allowed, causal_rows(T, T, allowed.device).expand_as(allowed)))


@torch.no_grad()
def block_attention_mass(q: torch.Tensor, k: torch.Tensor, block_size: int, allowed: torch.Tensor | None = None,
                         scale: float | None = None, chunk_elements: int = 1 << 27) -> torch.Tensor:
    """The pooled attention mass (B, H, nb, nb), float32: entry (i, j) is the mean over query block i's queries of
    the dense attention weight on key block j. Rows sum to 1 (0 for fully masked queries). q (B, H, T, D), k
    (B, Hk, T, D) (grouped-query attention: Hk divides H); allowed: None (causal) or a bool mask (B|1, 1|H, T, T).
    Computed in chunks of whole query blocks of about chunk_elements attention weights each."""
    B, H, T, D = q.shape
    scale = scale if scale is not None else D ** -0.5
    if block_mass_fits(q, k, block_size) and _plain_causal(allowed, T):  # one Triton kernel on CUDA
        count = torch.full((n_blocks(T, block_size), 1), float(block_size), device=q.device)
        count[-1] = T - (count.shape[0] - 1) * block_size
        return block_attention_mass_fused(q, k, block_size, scale) / count
    k = repeat_kv(k, H)
    S = k.shape[2]
    nb, nbk = n_blocks(T, block_size), n_blocks(S, block_size)
    rows = max(block_size, (chunk_elements // max(1, B * H * S)) // block_size * block_size)
    out = torch.zeros(B, H, nb, nbk, dtype=torch.float32, device=q.device)
    causal = causal_rows(T, S, q.device)
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


def _diagonal_blocks(Bs: int, H: int, nb: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(Bs, H, nb) ones and (Bs, H, nb, nb) int32 whose row i starts with i: the diagonal block of each query block
    as its one partial block. (Not cached: a tensor cached from inside a CUDA-graphed region would be overwritten.)"""
    idx = torch.arange(nb, dtype=torch.int32, device=device)
    first = F.pad(idx[:, None], (0, nb - 1))
    return (torch.ones(Bs, H, nb, dtype=torch.int32, device=device), first.expand(Bs, H, nb, nb).contiguous())


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
