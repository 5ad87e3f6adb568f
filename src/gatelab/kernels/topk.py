"""Row top-k selection without sorting: a Triton kernel and the torch reference it must match.

A hard routing keeps, in each causal row of a (B, H, T, S) score tensor, the k largest scores. The reference
(`topk_keep_mask` below) sorts every row and scatters k indices into a boolean mask; on an H100 that sort alone is
0.89 ms per layer at batch 16 x 512 (benchmarks/results/topk-*.md), most of what a gated step costs over dense.
The kernel here instead finds each row's k-th largest score by bisection on its bits: a float maps to a 32-bit
key with the same order, and 32 halvings of the key range, each one count over the row held in registers, give
the k-th largest key exactly. The keep-mask is then "key above it, or equal to it and among the first of the
ties", so it holds exactly k keys, like the reference; among tied scores the two may keep different keys.

The random modes need no score tensor at all: a key's score is a counter-based hash of its row's hash and its
position (kernels/hashing.py), computed inside the kernel. The kernel runs on CUDA when
Triton is installed; everywhere else (and with Backend(kernels=False), GATELAB_KERNELS=0) the torch reference runs. Tests run the kernel
on CPU under Triton's interpreter (TRITON_INTERPRET=1).
"""
from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of torch; CPU builds run the torch reference
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
from gatelab.kernels.hashing import _absorb
from gatelab.kernels.triton_support import _pow2, available


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
    them all): the topk-sigmoid threshold. allowed broadcasts to scores (kernels.topk.causal_kth_largest is the fast
    causal form)."""
    if k >= scores.shape[-1]:
        return torch.full_like(scores[..., :1], float("-inf"))
    tau = row_topk(scores.masked_fill(~allowed, float("-inf")), k)[0][..., -1:]
    return tau.masked_fill(allowed.sum(-1, keepdim=True) <= k, float("-inf"))


MAX_KERNEL_KEYS = 8192  # a row is held in registers: longer rows use the torch reference


if triton is not None:
    @triton.jit
    def _mix32(x):
        """hashing._mix32 (lowbias32) on uint32 values: products wrap modulo 2^32, which is the reference's
        `& 0xFFFFFFFF`."""
        x = x ^ (x >> 16)
        x = x * 0x21F0AAAD
        x = x ^ (x >> 15)
        x = x * 0x735A2D97
        return x ^ (x >> 15)

    @triton.jit
    def _float_key(x):
        """Order-preserving map of float32 values to uint32 keys."""
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        return tl.where(bits >= 0x80000000, bits ^ 0xFFFFFFFF, bits | 0x80000000)

    @triton.jit
    def _key_float(key):
        """_float_key's inverse."""
        bits = tl.where(key >= 0x80000000, key ^ 0x80000000, key ^ 0xFFFFFFFF)
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _kth_largest_key(key, k, BLOCK_M: tl.constexpr):
        """Each row's k-th largest key (key: (BLOCK_M, cols) uint32, 0 where not allowed), bit by bit from the top:
        keep a bit when at least k keys reach the candidate."""
        kth = tl.zeros([BLOCK_M], dtype=tl.uint32)
        bit = tl.full([BLOCK_M], 0x80000000, dtype=tl.uint32)
        for _ in range(32):
            cand = kth | bit
            count = tl.sum((key >= cand[:, None]).to(tl.int32), axis=1)
            kth = tl.where(count >= k, cand, kth)
            bit = bit >> 1
        return kth

    @triton.jit
    def _topk_rows_kernel(scores_ptr, row_hash_ptr, keep_ptr, tau_ptr, n_rows, T, S, offset, k,
                          HASHED: tl.constexpr, WRITE_KEEP: tl.constexpr, WRITE_TAU: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """BLOCK_M rows per program. Row r (of B*H*T, row-major) is query position i = r % T + offset, allowed keys
        j <= i. Scores come from scores_ptr (contiguous rows of S), or with HASHED from the hash of (row_hash[r], j).
        Keys are uint32 (half the registers of int64, and native 32-bit integer arithmetic)."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        row_ok = rows < n_rows
        pos = rows % T + offset
        allowed = (cols[None, :] <= pos[:, None]) & (cols[None, :] < S) & row_ok[:, None]
        if HASHED:  # hashing._absorb(row hash, j): distinct within a row, so no ties
            h = tl.load(row_hash_ptr + rows, mask=row_ok, other=0).to(tl.uint32)
            key = _mix32((h[:, None] ^ cols[None, :].to(tl.uint32)) + 0x9E3779B9)
        else:
            x = tl.load(scores_ptr + rows[:, None].to(tl.int64) * S + cols[None, :], mask=allowed, other=0.0)
            key = _float_key(x)
        key = tl.where(allowed, key, 0)  # below every candidate threshold (each has a bit set)
        n_allowed = tl.minimum(pos + 1, S)
        kth = _kth_largest_key(key, k, BLOCK_M)
        few = n_allowed <= k  # such rows keep every allowed key
        if WRITE_KEEP:
            above = key > kth[:, None]
            tie = ((key == kth[:, None]) & allowed).to(tl.int32)
            room = k - tl.sum(above.to(tl.int32), axis=1)
            keep = above | ((tie != 0) & (tl.cumsum(tie, axis=1) <= room[:, None]))
            keep = (keep | few[:, None]) & allowed
            tl.store(keep_ptr + rows[:, None].to(tl.int64) * S + cols[None, :], keep.to(tl.int8),
                     mask=(cols[None, :] < S) & row_ok[:, None])
        if WRITE_TAU:  # the k-th largest score as a float (-inf for rows that keep everything)
            tau = tl.where(few, float("-inf"), _key_float(kth))
            tl.store(tau_ptr + rows, tau, mask=row_ok)

    @triton.jit
    def _kth_largest_key_refined(key, k, COARSE: tl.constexpr, BLOCK_M: tl.constexpr):
        """_kth_largest_key in fewer passes over the tile: the top COARSE bits bit by bit, which leaves each row's
        k-th key inside one bucket of keys sharing those bits (usually one or two keys), then inside the bucket
        the distinct values one at a time from its largest (max, count its ties, exclude them) until k are
        reached. Exact, ties included; COARSE = 32 is _kth_largest_key."""
        kth = tl.zeros([BLOCK_M], dtype=tl.uint32)
        bit = tl.full([BLOCK_M], 0x80000000, dtype=tl.uint32)
        for _ in range(COARSE):
            cand = kth | bit
            count = tl.sum((key >= cand[:, None]).to(tl.int32), axis=1)
            kth = tl.where(count >= k, cand, kth)
            bit = bit >> 1
        if COARSE < 32:
            top = kth | ((1 << (32 - COARSE)) - 1)  # the bucket's largest possible key
            need = k - tl.sum((key > top[:, None]).to(tl.int32), axis=1)  # ranks left inside the bucket (>= 1)
            bucket = tl.where((key >= kth[:, None]) & (key <= top[:, None]), key, 0)
            active = (need > 0) & (tl.max(bucket, axis=1) > 0)
            while tl.sum(active.to(tl.int32), axis=0) > 0:
                best = tl.max(bucket, axis=1)
                ties = tl.sum((bucket == best[:, None]).to(tl.int32), axis=1)
                hit = active & (ties >= need)
                kth = tl.where(hit, best, kth)
                need = tl.where(active, need - ties, need)
                bucket = tl.where(bucket == best[:, None], 0, bucket)
                active = active & (hit == 0) & (tl.max(bucket, axis=1) > 0)
        return kth

    @triton.jit
    def _factor_tau_kernel(GQ, GK, TAU, T, k, row0, row1, DG: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, COARSE: tl.constexpr):
        """topk-sigmoid's row threshold straight from the gate's two projections: the rows' scores G = gq gk^T are
        formed in registers (one tile of BLOCK_M rows x the first BLOCK_N keys, all a causal row of row1 or fewer
        keys can see), never in memory. Rows row0..row1-1; grid (their row tiles, B*H)."""
        pid_m, bh = tl.program_id(0), tl.program_id(1)
        rows = row0 + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        g = tl.arange(0, DG)
        base = bh.to(tl.int64) * T
        row_ok = rows < row1
        gq = tl.load(GQ + (base + rows)[:, None] * DG + g[None, :], mask=row_ok[:, None], other=0.0)
        gk = tl.load(GK + (base + cols)[:, None] * DG + g[None, :], mask=(cols < T)[:, None], other=0.0)
        allowed = (cols[None, :] <= rows[:, None]) & row_ok[:, None]
        key = tl.where(allowed, _float_key(tl.dot(gq, tl.trans(gk))), 0)
        kth = _kth_largest_key_refined(key, k, COARSE, BLOCK_M)
        tau = tl.where(rows + 1 <= k, float("-inf"), _key_float(kth))
        tl.store(TAU + base + rows, tau, mask=row_ok)


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
    return scores.dim() == 4 and scores.shape[-1] <= MAX_KERNEL_KEYS and available(scores)


def causal_topk_keep(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool (B, H, T, S) mask keeping the k largest causal scores of each row; queries are the last T of the S
    keys; rows with <= k causal keys keep them all. The kernel on CUDA, else topk_keep_mask."""
    B, H, T, S = scores.shape
    if k >= S or not _fits(scores):
        return topk_keep_mask(scores, k, causal_rows(T, S, scores.device))
    keep, _ = _launch(scores.detach().contiguous(), None, (B, H, T, S), k, S - T, True, False)
    return keep


def causal_kth_largest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(B, H, T, 1) float32: the k-th largest causal score of each row, -inf where a row has <= k causal keys
    (the threshold of the topk-sigmoid soft gate)."""
    B, H, T, S = scores.shape
    if k >= S or not _fits(scores):
        return row_kth_largest(scores.detach().float(), k, causal_rows(T, S, scores.device))
    _, tau = _launch(scores.detach().contiguous(), None, (B, H, T, S), k, S - T, False, True)
    return tau


def _causal_segments(T: int, first: int) -> list[tuple[int, int]]:
    """Row ranges [lo, hi) covering 0..T-1: one range when first is 0, else [0, first), [first, 2 first), ...
    doubling (so each range's width in keys, its last row + 1, is at most twice its first row's)."""
    if first <= 0 or first >= T:
        return [(0, T)]
    bounds = [0, first]
    while bounds[-1] < T:
        bounds.append(min(2 * bounds[-1], T))
    return list(zip(bounds[:-1], bounds[1:]))


FACTOR_TAU = (16, 128, 20)


def factor_kth_largest(gq: torch.Tensor, gk: torch.Tensor, k: int,
                       setting: tuple[int, int, int] = FACTOR_TAU) -> torch.Tensor:
    """causal_kth_largest of G = gq gk^T (gq, gk: (B, H, T, d_gate), gq already scaled by 1 / sqrt(d_gate)) without
    forming G: (B, H, T, 1) float32, -inf where a row has <= k causal keys. The scores are the fused soft-gate
    kernel's own (the same fp32 tile products of the same inputs), so its mask is sigmoid(0) = 1/2 at each row's
    k-th key. The kernel when it serves these inputs (16-bit, d_gate a power of two of 16..128, T <= 1024), else
    the torch reference on G formed in fp32.

    setting: (rows per program; 0 for one launch over every row, else the first of the row segments [0, S),
    [S, 2S), [2S, 4S), ... each launched with only as many key columns as its last row can see, since a causal row
    i sees i + 1 keys; the bits found bit by bit before the exact refinement, 32 for none). The default is the
    fastest measured (benchmarks/README.md, "Timing history"; Backend.factor_tau, GATELAB_FACTOR_TAU)."""
    rows, segment, coarse = setting
    B, H, T, DG = gq.shape
    if (k >= T or T > 1024 or not _pow2(DG, 16, 128) or not available(gq)
            or gq.dtype not in (torch.bfloat16, torch.float16)):
        G = gq.detach().float() @ gk.detach().float().transpose(-1, -2)
        return row_kth_largest(G, k, causal_rows(T, T, gq.device))
    tau = torch.empty((B, H, T, 1), dtype=torch.float32, device=gq.device)
    gq, gk = gq.detach().contiguous(), gk.detach().to(gq.dtype).contiguous()
    for row0, row1 in _causal_segments(T, segment):
        block_n = max(16, triton.next_power_of_2(row1))  # a causal row below row1 sees only the first row1 keys
        _factor_tau_kernel[(triton.cdiv(row1 - row0, rows), B * H)](
            gq, gk, tau, T, k, row0, row1, DG=DG, BLOCK_M=rows, BLOCK_N=block_n,
            COARSE=coarse, num_warps=4 if block_n <= 256 else 8)
    return tau


def hashed_topk_keep(row_hash: torch.Tensor, k: int, S: int) -> torch.Tensor:
    """Bool (B, H, T, S) mask keeping, in each causal row, the k keys with the largest hash of (row_hash, key):
    row_hash (B, H, T) int64 values below 2^32. With hashing.fixed_random_scores' row hashes this is random-topk's
    subset; with fresh random row hashes, a uniformly random k-subset (stochastic)."""
    B, H, T = row_hash.shape
    if k >= S or S > MAX_KERNEL_KEYS or not available(row_hash):
        keys = _absorb(row_hash[..., None], torch.arange(S, device=row_hash.device))
        return topk_keep_mask(keys.to(torch.float64), k, causal_rows(T, S, row_hash.device))
    keep, _ = _launch(None, row_hash.contiguous(), (B, H, T, S), k, S - T, True, False)
    return keep
