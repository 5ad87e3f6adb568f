"""Whether a routing lets a token's output depend on later tokens: the report's leak check for block routings."""
from __future__ import annotations

from dataclasses import replace

import torch

from gatelab.config import DEFAULT_READING, GatelabError, ModelConfig, Routing, soft_gate_routing
from gatelab.model import GPT


def future_token_influence(mode: str, reading: str | None = None, block_size: int = 8, block_k: int = 2) -> float:
    """How much a token moves the outputs of the earlier tokens of its own query block under block routing `mode`:
    the largest change of a tiny random GPT's final hidden states at positions 40-44 when token 45 is replaced
    (blocks of `block_size`; 0.0 means causal). Block selection pools each query block over all its tokens, so a
    query's kept blocks (and, for block-soft, its weights) depend on later tokens of its block: a leak that an
    end-to-end trained model can exploit. Measured, not assumed: the report and the tests call this."""
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
