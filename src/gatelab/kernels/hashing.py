"""random-topk's fixed subsets: a counter-based hash of (seed, layer, head, query position, key position) in exact
int64 arithmetic, the same on every device (the selection kernel hashes the same way in registers)."""
from __future__ import annotations

import torch

from gatelab.config import GatelabError

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
    key position (kernels.topk.hashed_topk_keep takes these directly)."""
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
