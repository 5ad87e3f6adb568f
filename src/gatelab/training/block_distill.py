"""Post-hoc block gates: KL or BCE against each block row's pooled attention mass, and F1 against the oracle blocks."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gatelab.attention.blocks import block_attention_mass, earlier_blocks, previous_block_rows
from gatelab.config import GatelabError, Routing
from gatelab.diagnostics.probes import layer_inputs
from gatelab.kernels.topk import topk_keep_mask


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


def block_distill_loss(model, x: torch.Tensor, objective: str, routing: Routing) -> tuple[torch.Tensor, float]:
    """The kl or bce objective of the GPT's block gates on batch x (dense forward, no gradient to the model)
    against each layer's pooled attention mass at routing.block_size, and their block F1 at routing.block_k."""

    def layers():
        for block, xn in zip(model.blocks, layer_inputs(model, x)):
            with torch.no_grad():
                q, k, _ = block.attn.qkv_heads(xn)
                mass = block_attention_mass(q, k, routing.block_size)
            yield mass, block.attn.block_gate(xn, routing.block_size).float()
    return block_gate_objective(layers(), objective, routing.block_k)
