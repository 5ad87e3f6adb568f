"""Bilinear gates and attention under every routing mode (docs/method.md).

All masks are per layer, head and query row, over causal keys only. Rows with k or fewer causal keys keep
all of them. Hard modes (oracle-topk, gate-topk, random-topk, stochastic) build a boolean keep-mask from
top-k *indices*, which is piecewise constant: no gradient reaches whatever produced the scores. The soft
gate multiplies attention by a sigmoid of the gate scores, so gradients do reach the gate.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels
from .config import GatelabError, Routing


class BilinearGate(nn.Module):
    """G[h] = (X W_gq[h]) (X W_gk[h])^T / sqrt(d_gate), per head; X is the normed input of Q/K/V.

    A "random" gate is the same module with the same initialisation, frozen (requires_grad=False).
    """

    def __init__(self, d_model: int, n_head: int, d_gate: int, init_std: float | None = None,
                 trainable: bool = True):
        super().__init__()
        self.d_gate = d_gate
        self.init_std = init_std if init_std is not None else 1.0 / math.sqrt(d_model)
        self.wq = nn.Parameter(torch.empty(n_head, d_model, d_gate), requires_grad=trainable)
        self.wk = nn.Parameter(torch.empty(n_head, d_model, d_gate), requires_grad=trainable)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.wq, std=self.init_std)
        nn.init.normal_(self.wk, std=self.init_std)

    def factors(self, x: torch.Tensor, scaled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T, C) -> (X W_gq, X W_gk), each (B, H, T, d_gate); scaled: the first divided by sqrt(d_gate), so
        that G = gq gk^T (what the fused soft-gate kernel takes: it never forms G)."""
        gq = torch.einsum("btc,hcd->bhtd", x, self.wq.to(x.dtype))
        gk = torch.einsum("btc,hcd->bhtd", x, self.wk.to(x.dtype))
        return (gq / math.sqrt(self.d_gate) if scaled else gq), gk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, C) -> gate scores (B, H, T, T), not yet causally masked."""
        gq, gk = self.factors(x)
        return gq @ gk.transpose(-1, -2) / math.sqrt(self.d_gate)


def causal_mask(T: int, device) -> torch.Tensor:
    """(T, T) bool, True where key j <= query i."""
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


def causal_rows(T: int, S: int, device) -> torch.Tensor:
    """(T, S) bool for T queries at the last T of S positions (as with a KV cache): True where key j <= query."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)


def row_topk(scores: torch.Tensor, k: int, method: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest entries of each row (last dim), largest first.

    method "sort" sorts each row: on CUDA, for rows of attention length, a segmented sort in shared memory is
    several times faster than torch.topk's radix selection (benchmarks/bench_topk.py); "auto" picks it there.
    Among tied scores the two methods may keep different (equally valid) keys.
    """
    if method == "auto":
        method = "sort" if scores.is_cuda and scores.shape[-1] <= 4096 else "topk"
    if method == "sort":
        values, indices = scores.sort(dim=-1, descending=True)
        return values[..., :k], indices[..., :k]
    out = scores.topk(k, dim=-1)
    return out.values, out.indices


def topk_keep_mask(scores: torch.Tensor, k: int, causal: torch.Tensor) -> torch.Tensor:
    """Bool mask keeping the k largest causal scores of each row (all causal keys when a row has <= k).
    scores and causal broadcast: e.g. (1, H, T, S) fixed random scores against a (B, 1, T, S) per-sequence mask."""
    T = scores.shape[-1]
    shape = torch.broadcast_shapes(scores.shape, causal.shape)
    if k >= T:
        return causal.expand(shape).clone()
    masked = scores.detach().masked_fill(~causal, float("-inf"))
    idx = row_topk(masked, k)[1]
    keep = torch.zeros(shape, dtype=torch.bool, device=scores.device)
    keep.scatter_(-1, idx, True)
    return keep & causal  # rows with < k causal keys picked some -inf future keys: drop them


def row_kth_largest(scores: torch.Tensor, k: int, allowed: torch.Tensor) -> torch.Tensor:
    """(..., 1): the k-th largest allowed score of each row, -inf for rows with k or fewer allowed keys (they keep
    them all): the topk-sigmoid threshold. allowed broadcasts to scores (kernels.causal_kth_largest is the fast
    causal form)."""
    if k >= scores.shape[-1]:
        return torch.full_like(scores[..., :1], float("-inf"))
    tau = row_topk(scores.masked_fill(~allowed, float("-inf")), k)[0][..., -1:]
    return tau.masked_fill(allowed.sum(-1, keepdim=True) <= k, float("-inf"))


def soft_gate_mask(G: torch.Tensor, routing: Routing, causal: torch.Tensor, log: bool = False,
                   tau: torch.Tensor | None = None) -> torch.Tensor:
    """The soft gate's multiplicative mask m (or log m when `log`) over the allowed keys (`causal`: any bool
    mask broadcastable to G, e.g. causal & not padding); other entries get 0 / -inf. tau: topk-sigmoid's row
    thresholds when the caller has them already (kernels.causal_kth_largest)."""
    t = routing.soft_temperature
    if routing.soft_mask == "topk-sigmoid":
        if tau is None:
            tau = row_kth_largest(G.detach(), routing.k, causal)
        z = (G - tau) / t
    else:
        z = G / t
    if log:
        return F.logsigmoid(z).masked_fill(~causal, float("-inf"))
    return torch.sigmoid(z).masked_fill(~causal, 0.0)


@torch.no_grad()
def soft_gate_statistics(gate: BilinearGate, x: torch.Tensor, routing: Routing) -> dict:
    """How sharp a gate's soft mask is on input x (B, T, C): the weight norms, the spread of G over causal entries,
    the soft mask's mean, its mean slope dm/dG = m (1 - m) / t, the share of saturated entries (m < 0.01 or > 0.99),
    and the gate's current gradient norm. Observation only (TrainConfig.log_gate_stats)."""
    G = gate(x).float()
    causal = causal_mask(G.shape[-1], G.device)
    m = soft_gate_mask(G, routing, causal)[..., causal]
    g = G[..., causal]
    grads = [p.grad for p in (gate.wq, gate.wk) if p.grad is not None]
    return dict(wq_norm=float(gate.wq.float().norm()), wk_norm=float(gate.wk.float().norm()), g_std=float(g.std()),
                g_absmax=float(g.abs().max()), mask_mean=float(m.mean()),
                slope_mean=float((m * (1 - m)).mean() / routing.soft_temperature),
                saturated=float(((m < 0.01) | (m > 0.99)).float().mean()),
                gate_grad_norm=float(torch.sqrt(sum((gr.float() ** 2).sum() for gr in grads))) if grads else None)


_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9
MAX_RANDOM_KEYS = 1 << 32  # positions are hashed as 32-bit integers


def _mix32(x):
    """A bijection of 32-bit integers with strong avalanche (Wellons' lowbias32, the 2022 constants), on Python
    ints or int64 tensors. Both multipliers are below 2^31, so x * c < 2^63 never overflows int64: the result is
    exact integer arithmetic, the same on CPU and CUDA."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _M32
    return x ^ (x >> 15)


def _absorb(h, value):
    """Hash `value` (a 32-bit int or int64 tensor) into the running hash h."""
    return _mix32(((h ^ value) + _GOLDEN) & _M32)


def random_row_hashes(layer: int, n_head: int, T: int, seed: int, row_offset: int = 0, device=None) -> torch.Tensor:
    """(n_head, T) int64: the hash of (seed, layer, head, query position) from which fixed_random_scores hashes each
    key position (kernels.hashed_topk_keep takes these directly)."""
    if row_offset < 0 or row_offset + T > MAX_RANDOM_KEYS:
        raise GatelabError(f"random-topk: positions must lie in [0, {MAX_RANDOM_KEYS}), got rows {row_offset}.."
                           f"{row_offset + T - 1}")
    base = _absorb(_absorb(_mix32(_GOLDEN), seed & _M32), (seed >> 32) & _M32)
    base = _absorb(base, layer & _M32)
    arange = lambda n, start=0: torch.arange(start, start + n, dtype=torch.int64, device=device)  # noqa: E731
    heads = _absorb(torch.full((n_head, 1), base, dtype=torch.int64, device=device), arange(n_head)[:, None])
    return _absorb(heads, arange(T, row_offset)[None, :])


def fixed_random_scores(layer: int, n_head: int, T: int, S: int, seed: int, row_offset: int | None = None,
                        device=None) -> torch.Tensor:
    """(n_head, T, S) scores in [0, 1) whose row-wise top-k is random-topk's fixed subset.

    Score (head h, query position i, key position j) is a counter-based hash of (seed, layer, h, i, j), so it
    does not depend on the sequence length: a prefix of a sequence gets the rows (and subsets) of the full
    sequence. Queries sit at positions row_offset .. row_offset + T - 1 (default S - T: the last T of the S keys,
    as with a KV cache). Computed in int64 integer arithmetic, so identical on every device; within a row the
    scores are distinct (the last mixing step is a bijection of the key position), so top-k has no ties."""
    offset = S - T if row_offset is None else row_offset
    if offset < 0 or offset + T > MAX_RANDOM_KEYS or S > MAX_RANDOM_KEYS:
        raise GatelabError(f"random-topk: positions must lie in [0, {MAX_RANDOM_KEYS}), got rows {offset}.."
                           f"{offset + T - 1} of {S} keys")
    rows = random_row_hashes(layer, n_head, T, seed, offset, device)[..., None]  # (H, T, 1)
    keys = _absorb(rows, torch.arange(S, dtype=torch.int64, device=device))  # (H, T, S), distinct within each row
    return keys.to(torch.float64) / float(1 << 32)


class RandomMaskCache:
    """Fixed random top-k subsets per (layer, head, row), from a seed, cached per size and device."""

    def __init__(self):
        self._cache: dict = {}

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


def routed_attention(q, k, v, routing: Routing, *, gate_scores=None, layer: int = 0,
                     random_masks: RandomMaskCache | None = None, gate_factors=None) -> torch.Tensor:
    """Causal attention of q, k, v (B, H, T, D) under `routing`.

    gate_scores: a callable returning G (B, H, T, T), needed by gate-topk and soft-gate. gate_factors: optionally a
    callable returning (gq, gk) with G = gq gk^T (BilinearGate.factors), which lets the fused soft-gate kernel
    (kernels.soft_gate_attention, kernels.SOFT_ATTENTION = "fused") run without forming G.
    """
    B, H, T, D = q.shape
    mode = routing.mode
    if mode == "dense":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if routing.needs_gate and gate_scores is None:
        raise GatelabError(f"routing {mode} needs a gate, and this model has none (load one with --gate, or "
                           f"build the model with model.gate=learned|random)")
    causal = causal_mask(T, q.device)
    fast = kernels.kernels_enabled(q)  # the sort-free Triton selection (kernels.py); else the torch reference
    if mode == "soft-gate" and fast and kernels.SOFT_ATTENTION == "fused" and gate_factors is not None:
        gq, gk = gate_factors()
        if kernels.soft_gate_fits(q, gq):
            tau = None
            if routing.soft_mask == "topk-sigmoid" and kernels.TOPK_THRESHOLD == "factors":
                tau = kernels.factor_kth_largest(gq, gk, routing.k)  # each row's k-th largest G, in registers
            elif routing.soft_mask == "topk-sigmoid":  # the row threshold needs G's rows: formed once, no gradient
                with torch.no_grad():
                    tau = kernels.causal_kth_largest(gate_scores().float(), routing.k)
            return kernels.soft_gate_attention(q, k, v, gq, gk, routing.soft_temperature, routing.soft_renormalize,
                                               tau)
    if mode == "soft-gate":
        G = gate_scores().float()
        tau = (kernels.causal_kth_largest(G, routing.k) if fast and routing.soft_mask == "topk-sigmoid" else None)
        if fast and flex_ready() and kernels.SOFT_ATTENTION == "flex" and routing.soft_renormalize:
            return soft_gate_flex_attention(q, k, v, G, routing, tau)
        if routing.soft_renormalize:  # softmax(S + log m): A * m renormalised
            log_m = soft_gate_mask(G, routing, causal, log=True, tau=tau)
            if log_m.requires_grad and not (q.requires_grad or k.requires_grad or v.requires_grad):
                # Only the mask wants a gradient (a gate trained on a frozen model, e.g. Table 5). PyTorch's fused
                # SDPA kernels decide from q/k/v alone whether to keep the softmax statistics that their backward
                # needs, so on CUDA the memory-efficient kernel then fails in backward ("LSE is not correctly
                # aligned"). The explicit softmax computes the same thing and differentiates through the mask.
                S = (q @ k.transpose(-1, -2)).float() / math.sqrt(D)
                return torch.softmax(S + log_m, dim=-1).to(v.dtype) @ v
            return F.scaled_dot_product_attention(q, k, v, attn_mask=log_m.to(q.dtype))
        S = (q @ k.transpose(-1, -2)).float() / math.sqrt(D)
        A = torch.softmax(S.masked_fill(~causal, float("-inf")), dim=-1)
        return (A * soft_gate_mask(G, routing, causal, tau=tau)).to(v.dtype) @ v
    if mode == "random-topk" and fast:  # the fixed subsets hashed in-kernel: no cache, no graph break
        rows = random_row_hashes(layer, H, T, routing.seed, 0, q.device)[None]
        keep = kernels.hashed_topk_keep(rows, routing.k, T).expand(B, H, T, T)
    elif mode == "random-topk":  # fixed subsets: cached per layer and size
        cache = random_masks if random_masks is not None else RandomMaskCache()
        keep = cache.get(layer, H, T, routing.k, routing.seed, q.device)
    elif fast and mode in ("oracle-topk", "gate-topk"):
        scores = q @ k.transpose(-1, -2) if mode == "oracle-topk" else gate_scores()
        keep = kernels.causal_topk_keep(scores, routing.k)
    elif fast and mode == "stochastic":  # a fresh uniformly random k-subset per row: hashes of fresh row seeds
        keep = kernels.hashed_topk_keep(torch.randint(0, 1 << 32, (B, H, T), device=q.device), routing.k, T)
    else:
        keep = hard_topk_keep(routing, causal, logits=lambda: q @ k.transpose(-1, -2), gate_scores=gate_scores,
                              layer=layer, shape=(B, H, T, T), device=q.device)
    if fast and flex_ready() and kernels.HARD_ATTENTION == "flex":
        keep4 = keep.expand(B, H, T, T)  # random-topk's cached (H, T, T) masks broadcast over the batch
        return causal_flex_attention(q, k, v, score_mod=lambda score, b, h, i, j: torch.where(
            keep4[b, h, i, j], score, float("-inf")))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


# ----------------------------------------------------------------------------------------------------------
# flex_attention paths: no T x T attention matrix. flex_attention is fast only when compiled, so they
# serve the compiled training step (train.py's fast path) on CUDA; eager code keeps the explicit reference above.

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


def soft_gate_flex_attention(q, k, v, G: torch.Tensor, routing: Routing, tau: torch.Tensor | None):
    """The soft gate (every reading) through flex_attention: log m = logsigmoid((G - tau) / t) added to the scores.
    Renormalised, that is softmax(S + log m) itself. Not renormalised, A * m = exp(S + log m - lse(S)), i.e. the
    renormalised output times exp(lse(S + log m) - lse(S)); a second flex pass gives lse(S). Gradients reach q, k,
    v and G (a captured buffer of the score_mod) through both passes."""
    t = routing.soft_temperature
    thr = tau[..., 0] if tau is not None else None

    def add_log_mask(score, b, h, i, j):
        z = G[b, h, i, j] - thr[b, h, i] if thr is not None else G[b, h, i, j]
        return score + F.logsigmoid(z / t)

    if routing.soft_renormalize:
        return causal_flex_attention(q, k, v, add_log_mask)
    out, lse_masked = causal_flex_attention(q, k, v, add_log_mask, return_lse=True)
    _, lse = causal_flex_attention(q, k, v, return_lse=True)
    return out * torch.exp(lse_masked - lse)[..., None].to(out.dtype)
