"""Row top-k selection without sorting (issue 15): a Triton kernel and the torch reference it must match.

A hard routing keeps, in each causal row of a (B, H, T, S) score tensor, the k largest scores. The reference
(`routing.topk_keep_mask`) sorts every row and scatters k indices into a boolean mask; on an H100 that sort alone is
0.89 ms per layer at batch 16 x 512 (benchmarks/results/topk-*.md), most of what a gated step costs over dense.
The kernel here instead finds each row's k-th largest score by bisection on its bits: a float maps to a 32-bit
key with the same order, and 32 halvings of the key range, each one count over the row held in registers, give
the k-th largest key exactly. The keep-mask is then "key above it, or equal to it and among the first of the
ties", so it holds exactly k keys, like the reference; among tied scores the two may keep different keys.

The random modes need no score tensor at all: a key's score is a counter-based hash of its row's hash and its
position (routing.fixed_random_scores' construction), computed inside the kernel. The kernel runs on CUDA when
Triton is installed; everywhere else (and with GATELAB_KERNELS=0) the torch reference runs. Tests run the kernel
on CPU under Triton's interpreter (TRITON_INTERPRET=1).
"""
from __future__ import annotations

import os

import torch

try:  # Triton ships with CUDA builds of torch; CPU builds run the torch reference
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

MAX_KERNEL_KEYS = 8192
# how a compiled hard routing applies its keep-mask: "sdpa" (a boolean attn_mask: PyTorch's memory-efficient
# kernel) or "flex" (flex_attention with the mask as a score_mod); benchmarks/bench_train.py measures both
HARD_ATTENTION = os.environ.get("GATELAB_HARD_ATTENTION", "sdpa")
# how a compiled renormalised soft gate attends: "explicit" (routing.py's reference: SDPA with log m as a float
# mask) or "flex" (flex_attention with log m as a score_mod). Measured on an H100 (benchmarks/README.md): flex
# was not faster, and the non-renormalised readings' flex form (two passes and their log-sum-exps) failed to
# compile on torch 2.11 (an Inductor lowering error), so it serves renormalised readings only, on request.
SOFT_ATTENTION = os.environ.get("GATELAB_SOFT_ATTENTION", "explicit")  # a row is held in registers/shared memory: longer rows use the torch reference


ENABLED = os.environ.get("GATELAB_KERNELS", "1") != "0"  # GATELAB_KERNELS=0 (or kernels.ENABLED = False): torch only
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter (the tests)


def kernels_enabled(t: torch.Tensor) -> bool:
    """Whether the Triton kernel serves tensor t: Triton importable, kernels not switched off (ENABLED), and t on
    CUDA (or on CPU under Triton's interpreter). Module constants, so a compiled graph guards on them."""
    return triton is not None and ENABLED and (t.is_cuda or _INTERPRET)


if triton is not None:
    @triton.jit
    def _mix32(x):
        """routing._mix32 (lowbias32) on int64 values below 2^32."""
        x = x ^ (x >> 16)
        x = (x * 0x21F0AAAD) & 0xFFFFFFFF
        x = x ^ (x >> 15)
        x = (x * 0x735A2D97) & 0xFFFFFFFF
        return x ^ (x >> 15)

    @triton.jit
    def _topk_rows_kernel(scores_ptr, row_hash_ptr, keep_ptr, tau_ptr, n_rows, T, S, offset, k,
                          HASHED: tl.constexpr, WRITE_KEEP: tl.constexpr, WRITE_TAU: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """BLOCK_M rows per program. Row r (of B*H*T, row-major) is query position i = r % T + offset, allowed keys
        j <= i. Scores come from scores_ptr (contiguous rows of S), or with HASHED from the hash of (row_hash[r], j)."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        row_ok = rows < n_rows
        pos = rows % T + offset
        allowed = (cols[None, :] <= pos[:, None]) & (cols[None, :] < S) & row_ok[:, None]
        if HASHED:  # routing._absorb(row hash, j): distinct within a row, so no ties
            h = tl.load(row_hash_ptr + rows, mask=row_ok, other=0)
            key = _mix32(((h[:, None] ^ cols[None, :].to(tl.int64)) + 0x9E3779B9) & 0xFFFFFFFF)
        else:  # order-preserving map of float32 bits to [0, 2^32)
            x = tl.load(scores_ptr + rows[:, None].to(tl.int64) * S + cols[None, :], mask=allowed, other=0.0)
            bits = x.to(tl.float32).to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
            key = tl.where(bits >= 0x80000000, bits ^ 0xFFFFFFFF, bits | 0x80000000)
        key = tl.where(allowed, key, -1)
        n_allowed = tl.minimum(pos + 1, S)
        # bisection: the largest t with count(key >= t) >= k is the k-th largest key
        lo = tl.zeros([BLOCK_M], dtype=tl.int64)
        hi = tl.full([BLOCK_M], 0xFFFFFFFF, dtype=tl.int64)
        for _ in range(32):
            mid = (lo + hi + 1) >> 1
            count = tl.sum((key >= mid[:, None]).to(tl.int32), axis=1)
            enough = count >= k
            lo = tl.where(enough, mid, lo)
            hi = tl.where(enough, hi, mid - 1)
        few = n_allowed <= k  # such rows keep every allowed key
        if WRITE_KEEP:
            above = key > lo[:, None]
            tie = (key == lo[:, None]).to(tl.int32)
            room = k - tl.sum(above.to(tl.int32), axis=1)
            keep = above | ((tie != 0) & (tl.cumsum(tie, axis=1) <= room[:, None]))
            keep = (keep | few[:, None]) & allowed
            tl.store(keep_ptr + rows[:, None].to(tl.int64) * S + cols[None, :], keep.to(tl.int8),
                     mask=(cols[None, :] < S) & row_ok[:, None])
        if WRITE_TAU:  # the k-th largest score as a float (-inf for rows that keep everything)
            bits = tl.where(lo >= 0x80000000, lo ^ 0x80000000, lo ^ 0xFFFFFFFF)
            bits = tl.where(bits >= 0x80000000, bits - 0x100000000, bits).to(tl.int32)
            tau = tl.where(few, float("-inf"), bits.to(tl.float32, bitcast=True))
            tl.store(tau_ptr + rows, tau, mask=row_ok)


def _launch(scores, row_hash, shape, k: int, offset: int, write_keep: bool, write_tau: bool):
    B, H, T, S = shape
    n_rows = B * H * T
    device = (scores if scores is not None else row_hash).device
    keep = torch.empty(shape, dtype=torch.int8, device=device) if write_keep else None  # bool after the kernel
    tau = torch.empty((B, H, T, 1), dtype=torch.float32, device=device) if write_tau else None
    block_n = max(16, triton.next_power_of_2(S))
    block_m = max(1, min(16, 4096 // block_n))
    dummy = keep if keep is not None else tau
    _topk_rows_kernel[(triton.cdiv(n_rows, block_m),)](
        scores if scores is not None else dummy, row_hash if row_hash is not None else dummy,
        keep if keep is not None else dummy, tau if tau is not None else dummy,
        n_rows, T, S, offset, k, HASHED=row_hash is not None, WRITE_KEEP=write_keep, WRITE_TAU=write_tau,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4 if block_n <= 1024 else 8)
    # a comparison, not a dtype view: torch.compile's lowering of int8 -> bool views fails (torch 2.11)
    return (keep != 0 if keep is not None else None), tau


def _fits(scores: torch.Tensor) -> bool:
    return scores.dim() == 4 and scores.shape[-1] <= MAX_KERNEL_KEYS and kernels_enabled(scores)


def causal_topk_keep(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool (B, H, T, S) mask keeping the k largest causal scores of each row; queries are the last T of the S
    keys; rows with <= k causal keys keep them all. The kernel on CUDA, else routing.topk_keep_mask."""
    from .routing import causal_rows, topk_keep_mask
    B, H, T, S = scores.shape
    if k >= S or not _fits(scores):
        return topk_keep_mask(scores, k, causal_rows(T, S, scores.device))
    keep, _ = _launch(scores.detach().contiguous(), None, (B, H, T, S), k, S - T, True, False)
    return keep


def causal_kth_largest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(B, H, T, 1) float32: the k-th largest causal score of each row, -inf where a row has <= k causal keys
    (the threshold of the topk-sigmoid soft gate)."""
    from .routing import causal_rows, row_kth_largest
    B, H, T, S = scores.shape
    if k >= S or not _fits(scores):
        return row_kth_largest(scores.detach().float(), k, causal_rows(T, S, scores.device))
    _, tau = _launch(scores.detach().contiguous(), None, (B, H, T, S), k, S - T, False, True)
    return tau


def hashed_topk_keep(row_hash: torch.Tensor, k: int, S: int) -> torch.Tensor:
    """Bool (B, H, T, S) mask keeping, in each causal row, the k keys with the largest hash of (row_hash, key):
    row_hash (B, H, T) int64 values below 2^32. With routing.fixed_random_scores' row hashes this is random-topk's
    subset; with fresh random row hashes, a uniformly random k-subset (stochastic)."""
    from .routing import _absorb, causal_rows, topk_keep_mask
    B, H, T = row_hash.shape
    if k >= S or S > MAX_KERNEL_KEYS or not kernels_enabled(row_hash):
        keys = _absorb(row_hash[..., None], torch.arange(S, device=row_hash.device))
        return topk_keep_mask(keys.to(torch.float64), k, causal_rows(T, S, row_hash.device))
    keep, _ = _launch(None, row_hash.contiguous(), (B, H, T, S), k, S - T, True, False)
    return keep
