"""Hard routings' keep-masks: the k keys of each row that a hard mode keeps, from the Triton selection kernel
(kernels/topk.py) where it serves, else from the torch reference (a row sort and a scatter).

oracle-topk ranks keys by the attention logits, gate-topk by the gate's scores, random-topk by a fixed hash of
(seed, layer, head, query position, key position), stochastic by fresh random numbers each call. The mask comes
from top-k indices, so it is piecewise constant: no gradient reaches whatever produced the scores.
"""
from __future__ import annotations

import torch

from gatelab.attention.masks import causal_mask
from gatelab.config import GatelabError, Routing
from gatelab.kernels.hashing import fixed_random_scores, random_row_hashes
from gatelab.kernels.topk import causal_topk_keep, hashed_topk_keep, topk_keep_mask


class RandomMaskCache:
    """Fixed random top-k subsets per (layer, head, row), from a seed, cached per size and device."""

    def __init__(self):
        self._cache: dict = {}
        self.by_allowed: dict = {}  # hard_topk_keep's cache for masks of allowed keys (padding, windows, a KV cache)

    @torch.compiler.disable  # computed eagerly once: a cached tensor must not be a compiled graph's (CUDA-graph) output
    def get(self, layer: int, n_head: int, T: int, k: int, seed: int, device) -> torch.Tensor:
        key = (layer, n_head, T, k, seed, str(device))
        if key not in self._cache:
            scores = fixed_random_scores(layer, n_head, T, T, seed, device=device)
            self._cache[key] = topk_keep_mask(scores, k, causal_mask(T, device))
        return self._cache[key]


def hard_topk_keep(routing: Routing, allowed: torch.Tensor, *, logits, gate_scores, layer: int, shape,
                   device, random_cache: dict | None = None) -> torch.Tensor:
    """The keep-mask of a hard routing mode: the k largest of its scores among the allowed keys.
    logits / gate_scores: callables returning S / G, called only by the mode that needs them;
    shape: (B, H, T, S) of the attention scores. random_cache: a dict in which random-topk keeps its last
    keep-mask per (layer, size, k, seed, device), reused while the allowed keys are the same (its scores are a
    hash of the positions, cheap on a GPU but not free on a CPU)."""
    B, H, T, S = shape
    mode = routing.mode
    if mode == "oracle-topk":
        scores = logits()
    elif mode == "gate-topk":
        scores = gate_scores()
    elif mode == "random-topk":
        key = (layer, H, T, S, routing.k, routing.seed, str(device))
        hit = random_cache.get(key) if random_cache is not None else None
        if hit is not None and hit[0].shape == allowed.shape and torch.equal(hit[0], allowed):
            return hit[1]
        keep = topk_keep_mask(fixed_random_scores(layer, H, T, S, routing.seed, device=device)[None], routing.k,
                              allowed)
        if random_cache is not None:
            if len(random_cache) >= 8:
                random_cache.clear()
            random_cache[key] = (allowed.clone(), keep)
        return keep
    elif mode == "stochastic":  # Gumbel top-k on equal logits = a uniformly random k-subset, fresh each call
        scores = torch.rand(B, H, T, S, device=device)
    else:
        raise GatelabError(f"routing mode {mode!r} is not a hard top-k mode")
    return topk_keep_mask(scores, routing.k, allowed)


def hard_keep(q, k, routing: Routing, gate, *, allowed: torch.Tensor | None, layer: int, fast: bool,
              random_masks: RandomMaskCache | None) -> torch.Tensor:
    """The keep-mask (B|1, H, T, S) of a hard mode (attention.attend's hard branch); q (B, H, T, D), k (B, H, S, D);
    allowed: None (plain causal, T == S) or the keys each query may see; fast: the Triton selection may serve."""
    B, H, T, _ = q.shape
    S = k.shape[-2]
    mode = routing.mode
    if fast and mode == "random-topk":  # the fixed subsets hashed in-kernel: no cache, no graph break
        rows = random_row_hashes(layer, H, T, routing.seed, 0, q.device)[None]
        return hashed_topk_keep(rows, routing.k, T).expand(B, H, T, T)
    if fast and mode == "stochastic":  # a fresh uniformly random k-subset per row: hashes of fresh row seeds
        return hashed_topk_keep(torch.randint(0, 1 << 32, (B, H, T), device=q.device), routing.k, T)
    if fast:
        scores = q @ k.transpose(-1, -2) if mode == "oracle-topk" else gate.scores()
        return causal_topk_keep(scores, routing.k)
    if mode == "random-topk" and allowed is None and T == S:  # fixed subsets: cached per layer and size
        cache = random_masks if random_masks is not None else RandomMaskCache()
        return cache.get(layer, H, T, routing.k, routing.seed, q.device)
    ok = causal_mask(T, q.device) if allowed is None else allowed
    return hard_topk_keep(routing, ok, logits=lambda: q @ k.transpose(-1, -2),
                          gate_scores=(gate.scores if gate is not None else None), layer=layer, shape=(B, H, T, S),
                          device=q.device, random_cache=None if random_masks is None else random_masks.by_allowed)
