"""Which keys a query may see: causal masks, a model's own mask as allowed keys, and grouped key/value heads."""
from __future__ import annotations

import torch

from gatelab.kernels.topk import causal_rows

__all__ = ["allowed_keys", "causal_mask", "causal_rows", "repeat_kv", "token_validity"]


def causal_mask(T: int, device) -> torch.Tensor:
    """(T, T) bool, True where key j <= query i."""
    return causal_rows(T, T, device)


def repeat_kv(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """(B, Hk, S, D) keys or values repeated to n_head query heads (grouped-query attention)."""
    return t if t.shape[1] == n_head else t.repeat_interleave(n_head // t.shape[1], dim=1)


def token_validity(allowed: torch.Tensor | None, B: int, T: int) -> torch.Tensor | None:
    """(B|1, T) bool: the tokens some query may attend to (not padding), which a block gate pools; None: all."""
    if allowed is None:
        return None
    return allowed.any(-2).any(-2)[..., :T]


def allowed_keys(attention_mask, B: int, T: int, S: int, device) -> torch.Tensor:
    """Bool (B or 1, 1, T, S): the keys each query may see, from a model's own mask (bool, or additive float with
    large negative values for hidden keys); None: plain causal, queries at the last T of S positions."""
    if attention_mask is None:
        return causal_rows(T, S, device)[None, None]
    mask = attention_mask[..., :S]
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2
