"""Greedy generation under a routing, and how far it departs from dense generation.

Block routings decode with the KV cache reading only each query block's kept key blocks (attention/block_decode.py);
dense, oracle and random routings decode as usual; gate routings other than block need the whole sequence and are
refused by the adapter.
"""
from __future__ import annotations

import math

import torch

from gatelab.config import GatelabError, Routing
from gatelab.hf.cache import cache_keyword, kv_cache
from gatelab.hf.graphed import fixed_greedy


@torch.no_grad()
def greedy(model, ids: torch.Tensor, routing: Routing, max_new_tokens: int, graphs: bool = False,
           compiled: bool = False, timings: dict | None = None) -> torch.Tensor:
    """The greedy continuation (max_new_tokens token ids, (B, N)) of ids (B, T) under routing, through the model's
    own generate(), with a key/value cache that appends in place (hf/cache.py). graphs / compiled: instead over a
    cache of fixed size (hf/graphed.py: dense and block-gate routings), each step replayed from a CUDA graph (CUDA)
    and / or run through torch.compile; then `timings` receives fixed_greedy's (untouched otherwise)."""
    if graphs or compiled:
        return fixed_greedy(model, ids, routing, max_new_tokens, graphs=graphs, compiled=compiled, timings=timings)
    ctl = getattr(model, "gatelab", None)
    if ctl is None:
        raise GatelabError("attach_gates or attach_block_gates (or load_gates) first")
    pad = getattr(model.generation_config, "pad_token_id", None)
    pad = pad if pad is not None else getattr(model.generation_config, "eos_token_id", None) or 0
    cache = kv_cache(model, ids.shape[1] + max_new_tokens)
    with ctl.routing(routing):
        out = model.generate(ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad if isinstance(pad, int) else pad[0], use_cache=True,
                             **{cache_keyword(model): cache})
    return out[:, ids.shape[1]:]


@torch.no_grad()
def continuation_nll(model, ids: torch.Tensor, continuation: torch.Tensor) -> float:
    """Mean negative log-likelihood of `continuation` after `ids` under the model's dense attention."""
    ctl = model.gatelab
    full = torch.cat([ids, continuation], dim=1)
    with ctl.routing(Routing()):
        logits = model(full, use_cache=False).logits[:, ids.shape[1] - 1:-1].float()
    return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), continuation.flatten()))


def compare_with_dense(model, ids: torch.Tensor, routing: Routing, max_new_tokens: int, graphs: bool = False,
                       compiled: bool = False) -> dict:
    """Greedy continuations under routing and dense: the routed text's agreement with dense (share of positions with
    the same token, and the first position where they differ), and both continuations' perplexity under the dense
    model."""
    dense = greedy(model, ids, Routing(), max_new_tokens, graphs, compiled)
    routed = greedy(model, ids, routing, max_new_tokens, graphs, compiled)
    same = (routed == dense)
    first = int(same.all(0).logical_not().nonzero()[0]) if not bool(same.all()) else max_new_tokens
    return dict(routing=routing.label(), new_tokens=max_new_tokens, agreement=float(same.float().mean()),
                first_difference=first, ppl_routed=math.exp(continuation_nll(model, ids, routed)),
                ppl_dense=math.exp(continuation_nll(model, ids, dense)), tokens=routed.tolist(),
                dense_tokens=dense.tolist())
