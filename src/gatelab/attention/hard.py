"""Hard routings' keep-masks: the k keys of each row that a hard mode keeps, from the Triton selection kernel
(kernels/topk.py) where it serves, else from the torch reference (a row sort and a scatter).

oracle-topk ranks keys by the attention logits, gate-topk by the gate's scores, random-topk by a fixed hash of
(seed, layer, head, query position, key position), stochastic by fresh random numbers each call. The mask comes
from top-k indices, so it is piecewise constant: no gradient reaches whatever produced the scores.
"""
from __future__ import annotations

import torch

from gatelab.attention.masks import causal_rows
from gatelab.config import GatelabError, Routing
from gatelab.kernels.hashing import fixed_random_scores, random_row_hashes
from gatelab.kernels.topk import causal_topk_keep, hashed_topk_keep, topk_keep_mask


class RandomMaskCache:
    """Fixed random top-k subsets per (layer, head, row), from a seed, cached per size and device."""

    def __init__(self):
        self._cache: dict = {}
        self.by_allowed: dict = {}  # keep_among's: masks among allowed keys (padding, windows, a KV cache)

    def keep_among(self, allowed: torch.Tensor, layer: int, q, k, routing: Routing) -> torch.Tensor:
        """random-topk's keep-mask among `allowed` keys (padding, windows, a KV cache), the last one per (layer,
        size, k, seed, device) reused while the allowed keys are the same (its scores are a hash of the positions,
        cheap on a GPU but not free on a CPU)."""
        H, T, S = q.shape[1], q.shape[2], k.shape[2]
        key = (layer, H, T, S, routing.k, routing.seed, str(q.device))
        hit = self.by_allowed.get(key)
        if hit is not None and hit[0].shape == allowed.shape and torch.equal(hit[0], allowed):
            return hit[1]
        keep = topk_keep_mask(random_scores(q, k, None, routing, layer), routing.k, allowed)
        if len(self.by_allowed) >= 8:
            self.by_allowed.clear()
        self.by_allowed[key] = (allowed.clone(), keep)
        return keep

    @torch.compiler.disable  # computed eagerly once: a cached tensor must not be a compiled graph's (CUDA-graph) output
    def get(self, layer: int, n_head: int, T: int, k: int, seed: int, device) -> torch.Tensor:
        key = (layer, n_head, T, k, seed, str(device))
        if key not in self._cache:
            scores = fixed_random_scores(layer, n_head, T, T, seed, device=device)
            self._cache[key] = topk_keep_mask(scores, k, causal_rows(T, T, device))
        return self._cache[key]


def oracle_scores(q, k, gate, routing: Routing, layer: int) -> torch.Tensor:
    """oracle-topk: the attention logits themselves (unscaled: the same order)."""
    return q @ k.transpose(-1, -2)


def gate_scores(q, k, gate, routing: Routing, layer: int) -> torch.Tensor:
    """gate-topk: the gate's scores G."""
    return gate.scores()


def random_scores(q, k, gate, routing: Routing, layer: int) -> torch.Tensor:
    """random-topk: a fixed hash of (seed, layer, head, query position, key position), queries at the last T of
    the S positions: the same subset for a row whatever the sequence length."""
    return fixed_random_scores(layer, q.shape[1], q.shape[2], k.shape[2], routing.seed, device=q.device)[None]


def stochastic_scores(q, k, gate, routing: Routing, layer: int) -> torch.Tensor:
    """stochastic: Gumbel top-k on equal logits, i.e. a uniformly random k-subset, fresh each call."""
    return torch.rand(q.shape[0], q.shape[1], q.shape[2], k.shape[2], device=q.device)


# Each hard mode is the top-k of its scores (B|1, H, T, S): a new hard mode is a scores function added here (and its
# name in config.ROUTING_MODES). random-topk and stochastic are hashed inside the selection kernel where it serves.
HARD_SCORES = {"oracle-topk": oracle_scores, "gate-topk": gate_scores, "random-topk": random_scores,
               "stochastic": stochastic_scores}


def hard_keep(q, k, routing: Routing, gate, *, allowed: torch.Tensor | None, layer: int, fast: bool,
              random_masks: RandomMaskCache | None) -> torch.Tensor:
    """The keep-mask (B|1, H, T, S) of a hard mode (attention.attend's hard branch): the k largest of its scores
    among the allowed keys. q (B, H, T, D), k (B, H, S, D); allowed: None (plain causal, T == S) or the keys each
    query may see; fast: the Triton selection may serve; random_masks: caches random-topk's fixed subsets."""
    B, H, T, _ = q.shape
    S = k.shape[-2]
    mode = routing.mode
    if mode not in HARD_SCORES:
        raise GatelabError(f"routing mode {mode!r} is not a hard top-k mode")
    if fast and mode == "random-topk":  # the fixed subsets hashed in-kernel: no cache, no graph break
        rows = random_row_hashes(layer, H, T, routing.seed, 0, q.device)[None]
        return hashed_topk_keep(rows, routing.k, T).expand(B, H, T, T)
    if fast and mode == "stochastic":  # a fresh uniformly random k-subset per row: hashes of fresh row seeds
        return hashed_topk_keep(torch.randint(0, 1 << 32, (B, H, T), device=q.device), routing.k, T)
    if fast:
        return causal_topk_keep(HARD_SCORES[mode](q, k, gate, routing, layer), routing.k)
    if mode == "random-topk" and allowed is None and T == S:  # fixed subsets: cached per layer and size
        cache = random_masks if random_masks is not None else RandomMaskCache()
        return cache.get(layer, H, T, routing.k, routing.seed, q.device)
    ok = causal_rows(T, S, q.device) if allowed is None else allowed
    if mode == "random-topk" and random_masks is not None:
        return random_masks.keep_among(ok, layer, q, k, routing)
    return topk_keep_mask(HARD_SCORES[mode](q, k, gate, routing, layer), routing.k, ok)
