"""Row top-k selection without sorting: a Triton kernel and the torch reference it must match.

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

MAX_KERNEL_KEYS = 8192  # a row is held in registers: longer rows use the torch reference
# how a compiled hard routing applies its keep-mask: "sdpa" (a boolean attn_mask: PyTorch's memory-efficient
# kernel) or "flex" (flex_attention with the mask as a score_mod); benchmarks/bench_train.py measures both
HARD_ATTENTION = os.environ.get("GATELAB_HARD_ATTENTION", "sdpa")
# how the soft gate attends on CUDA: "fused" (soft_gate_attention below: one flash-style Triton kernel each way,
# G formed tile by tile from the gate's two projections; bf16/fp16 inputs, else the explicit path), "explicit"
# (routing.py's reference: G, S and the mask formed in memory), or "flex" (flex_attention with log m as a
# score_mod, renormalised readings only: the unrenormalised form failed to compile on torch 2.11). "fused" is the
# default because it was the fastest; the timings behind each default here: benchmarks/README.md, "Timing history".
SOFT_ATTENTION = os.environ.get("GATELAB_SOFT_ATTENTION", "fused")
# where the fused soft gate's topk-sigmoid row threshold comes from: "factors" (factor_kth_largest: G formed in
# registers from the gate's two projections, never in memory) or "scores" (G formed in memory, then the selection
# kernel). "factors" is the default, the faster of the two (benchmarks/README.md, "Timing history");
# GATELAB_TOPK_THRESHOLD=scores selects the other
TOPK_THRESHOLD = os.environ.get("GATELAB_TOPK_THRESHOLD", "factors")


ENABLED = os.environ.get("GATELAB_KERNELS", "1") != "0"  # GATELAB_KERNELS=0 (or kernels.ENABLED = False): torch only
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter (the tests)


def _interpreter_scalar_loop_bounds() -> None:
    """Triton's CPU interpreter (3.x) turns a kernel's scalars into one-element arrays and converts them with int(),
    which numpy 2.4 refuses for arrays of one dimension, so a loop bound like range(0, T, N) fails there. Make the
    interpreter's conversion take the one element. Interpreter (tests) only; compiled kernels are untouched."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_gatelab", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._gatelab = True
    interpreter._patch_lang_tensor = patched


if triton is not None and _INTERPRET:
    _interpreter_scalar_loop_bounds()


def _pow2(n: int, lo: int, hi: int) -> bool:
    """n is a power of two in [lo, hi]: the widths a kernel's tl.arange tiles can span."""
    return lo <= n <= hi and n & (n - 1) == 0


def kernels_enabled(t: torch.Tensor) -> bool:
    """Whether the Triton kernel serves tensor t: Triton importable, kernels not switched off (ENABLED), and t on
    CUDA (or on CPU under Triton's interpreter). Module constants, so a compiled graph guards on them."""
    return triton is not None and ENABLED and (t.is_cuda or _INTERPRET)


if triton is not None:
    @triton.jit
    def _mix32(x):
        """routing._mix32 (lowbias32) on uint32 values: products wrap modulo 2^32, which is the reference's
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
        if HASHED:  # routing._absorb(row hash, j): distinct within a row, so no ties
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


# factor_kth_largest's kernel settings: rows per program; 0 for one launch over every row, else row segments
# [0, S), [S, 2S), [2S, 4S), ... each launched with only as many key columns as its last row can see (a causal row i
# sees i + 1 keys, so one launch over all rows spends half its work on masked columns); the bits found bit by bit
# before the exact refinement (32: none). GATELAB_FACTOR_TAU=ROWS,SEGMENT,COARSE sets all three. The default is the
# fastest setting of `bash benchmarks/drivers/kernels_gpu.sh tune` on the H100 (benchmarks/README.md, "Timing history").
def _factor_tau_setting(text: str) -> tuple[int, int, int]:
    """GATELAB_FACTOR_TAU's value: ROWS (a power of two, 1..64), SEGMENT (>= 0), COARSE (1..32)."""
    try:
        rows, segment, coarse = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"GATELAB_FACTOR_TAU={text!r}: expected ROWS,SEGMENT,COARSE, e.g. 16,128,20") from None
    if not (_pow2(rows, 1, 64) and segment >= 0 and 1 <= coarse <= 32):
        raise ValueError(f"GATELAB_FACTOR_TAU={text!r}: ROWS must be a power of two of 1..64, SEGMENT >= 0 and "
                         "COARSE 1..32")
    return rows, segment, coarse


FACTOR_TAU_ROWS, FACTOR_TAU_SEGMENT, FACTOR_TAU_COARSE_BITS = _factor_tau_setting(
    os.environ.get("GATELAB_FACTOR_TAU", "16,128,20"))


def _causal_segments(T: int, first: int) -> list[tuple[int, int]]:
    """Row ranges [lo, hi) covering 0..T-1: one range when first is 0, else [0, first), [first, 2 first), ...
    doubling (so each range's width in keys, its last row + 1, is at most twice its first row's)."""
    if first <= 0 or first >= T:
        return [(0, T)]
    bounds = [0, first]
    while bounds[-1] < T:
        bounds.append(min(2 * bounds[-1], T))
    return list(zip(bounds[:-1], bounds[1:]))


def factor_kth_largest(gq: torch.Tensor, gk: torch.Tensor, k: int) -> torch.Tensor:
    """causal_kth_largest of G = gq gk^T (gq, gk: (B, H, T, d_gate), gq already scaled by 1 / sqrt(d_gate)) without
    forming G: (B, H, T, 1) float32, -inf where a row has <= k causal keys. The scores are the fused soft-gate
    kernel's own (the same fp32 tile products of the same inputs), so its mask is sigmoid(0) = 1/2 at each row's
    k-th key. The kernel when it serves these inputs (16-bit, d_gate a power of two of 16..128, T <= 1024), else
    the torch reference on G formed in fp32."""
    from .routing import causal_rows, row_kth_largest
    B, H, T, DG = gq.shape
    if (k >= T or T > 1024 or not _pow2(DG, 16, 128) or not kernels_enabled(gq)
            or gq.dtype not in (torch.bfloat16, torch.float16)):
        G = gq.detach().float() @ gk.detach().float().transpose(-1, -2)
        return row_kth_largest(G, k, causal_rows(T, T, gq.device))
    tau = torch.empty((B, H, T, 1), dtype=torch.float32, device=gq.device)
    gq, gk = gq.detach().contiguous(), gk.detach().to(gq.dtype).contiguous()
    for row0, row1 in _causal_segments(T, FACTOR_TAU_SEGMENT):
        block_n = max(16, triton.next_power_of_2(row1))  # a causal row below row1 sees only the first row1 keys
        _factor_tau_kernel[(triton.cdiv(row1 - row0, FACTOR_TAU_ROWS), B * H)](
            gq, gk, tau, T, k, row0, row1, DG=DG, BLOCK_M=FACTOR_TAU_ROWS, BLOCK_N=block_n,
            COARSE=FACTOR_TAU_COARSE_BITS, num_warps=4 if block_n <= 256 else 8)
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


# ----------------------------------------------------------------------------------------------------------
# The soft gate as one flash-style kernel: attention under m = sigmoid((G - tau) / t) without a T x T
# tensor in memory. G = gq gk^T (the bilinear gate's two projections, gq already scaled by 1 / sqrt(d_gate)) is
# computed tile by tile beside S = q k^T, like S itself. Both readings fit the online softmax:
#   unrenormalised  out_i = sum_j softmax(S)_ij m_ij v_j: the running sum of exp(S - max) (no m) normalises, the
#                   accumulator sums exp(S - max) m v; L_i = lse(S)
#   renormalised    out_i = softmax(S + log m)_i v: plain flash attention on S + log m; L_i = lse(S + log m)
# Backward (W = the weights applied to v, dW = dO v^T, D_i = dO_i . out_i):
#   unrenormalised  P = exp(S - L), W = P m:   dS = P (m dW - D),  dz = W dW (1 - m)
#   renormalised    W = exp(S + log m - L):    dS = W (dW - D),    dz = dS (1 - m)
# and dv = W^T dO, dq = scale dS k, dk = scale dS^T q, dgq = dz gk / t, dgk = dz^T gq / t; tau (topk-sigmoid's
# detached row threshold) gets none. routing.routed_attention's explicit path is the reference (tests/test_kernels.py).

if triton is not None:
    @triton.jit
    def _soft_tile(q, k, gq, gk, tau, rows, cols, T, sm_scale, inv_t, RENORM: tl.constexpr):
        """Scores of one (query tile, key tile): S (scaled), log m and m, and the causal validity. The scales are
        compile-time constants (fp32; under torch.compile, Inductor passes a runtime Python float as fp64)."""
        s = tl.dot(q, tl.trans(k)) * sm_scale
        z = (tl.dot(gq, tl.trans(gk)) - tau[:, None]) * inv_t
        log_m = tl.minimum(z, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(z)))
        ok = (cols[None, :] <= rows[:, None]) & (cols[None, :] < T) & (rows[:, None] < T)
        return s, log_m, tl.exp(log_m), ok

    @triton.jit
    def _soft_fwd_kernel(Q, K, V, GQ, GK, TAU, O, L, T, sm_scale: tl.constexpr, inv_t: tl.constexpr,
                         RENORM: tl.constexpr, HAS_TAU: tl.constexpr, D: tl.constexpr, DG: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_m, bh = tl.program_id(0), tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        d, g = tl.arange(0, D), tl.arange(0, DG)
        base = bh.to(tl.int64) * T
        row_ok = rows < T
        q = tl.load(Q + (base + rows)[:, None] * D + d[None, :], mask=row_ok[:, None], other=0.0)
        gq = tl.load(GQ + (base + rows)[:, None] * DG + g[None, :], mask=row_ok[:, None], other=0.0)
        tau = tl.load(TAU + base + rows, mask=row_ok, other=0.0) if HAS_TAU else tl.zeros([BLOCK_M], tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        for start in range(0, (pid_m + 1) * BLOCK_M, BLOCK_N):  # past T: masked
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < T
            k = tl.load(K + (base + cols)[:, None] * D + d[None, :], mask=col_ok[:, None], other=0.0)
            v = tl.load(V + (base + cols)[:, None] * D + d[None, :], mask=col_ok[:, None], other=0.0)
            gk = tl.load(GK + (base + cols)[:, None] * DG + g[None, :], mask=col_ok[:, None], other=0.0)
            s, log_m, m, ok = _soft_tile(q, k, gq, gk, tau, rows, cols, T, sm_scale, inv_t, RENORM)
            s = tl.where(ok, s + log_m if RENORM else s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows past T: nothing allowed
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            w = p if RENORM else p * m
            acc = acc * alpha[:, None] + tl.dot(w.to(v.dtype), v)
            m_i = m_new
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        tl.store(O + (base + rows)[:, None] * D + d[None, :], (acc / l_safe[:, None]).to(O.dtype.element_ty),
                 mask=row_ok[:, None])
        tl.store(L + base + rows, m_i + tl.log(l_safe), mask=row_ok)

    @triton.jit
    def _soft_bwd_weights(q, k, v, gq, gk, tau, do, lse, delta, rows, cols, T, sm_scale, inv_t,
                          RENORM: tl.constexpr):
        """W (applied to v), dS and dz of one tile in the backward pass (zero outside the causal entries)."""
        s, log_m, m, ok = _soft_tile(q, k, gq, gk, tau, rows, cols, T, sm_scale, inv_t, RENORM)
        dw = tl.dot(do, tl.trans(v)).to(tl.float32)
        if RENORM:
            w = tl.where(ok, tl.exp(s + log_m - lse[:, None]), 0.0)
            ds = w * (dw - delta[:, None])
            dz = ds * (1.0 - m)
        else:
            p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
            w = p * m
            ds = p * (m * dw - delta[:, None])
            dz = w * dw * (1.0 - m)
        return w, ds, dz

    @triton.jit
    def _soft_bwd_kv_kernel(Q, K, V, GQ, GK, TAU, DO, L, DELTA, DK, DV, DGK, T, sm_scale: tl.constexpr, inv_t: tl.constexpr,
                            RENORM: tl.constexpr, HAS_TAU: tl.constexpr, D: tl.constexpr, DG: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """dk, dv, dgk of one key tile: a loop over the query tiles that can see it."""
        pid_n, bh = tl.program_id(0), tl.program_id(1)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        d, g = tl.arange(0, D), tl.arange(0, DG)
        base = bh.to(tl.int64) * T
        col_ok = cols < T
        k = tl.load(K + (base + cols)[:, None] * D + d[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(V + (base + cols)[:, None] * D + d[None, :], mask=col_ok[:, None], other=0.0)
        gk = tl.load(GK + (base + cols)[:, None] * DG + g[None, :], mask=col_ok[:, None], other=0.0)
        dk = tl.zeros([BLOCK_N, D], tl.float32)
        dv = tl.zeros([BLOCK_N, D], tl.float32)
        dgk = tl.zeros([BLOCK_N, DG], tl.float32)
        for start in range((pid_n * BLOCK_N // BLOCK_M) * BLOCK_M, T, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            row_ok = rows < T
            q = tl.load(Q + (base + rows)[:, None] * D + d[None, :], mask=row_ok[:, None], other=0.0)
            gq = tl.load(GQ + (base + rows)[:, None] * DG + g[None, :], mask=row_ok[:, None], other=0.0)
            do = tl.load(DO + (base + rows)[:, None] * D + d[None, :], mask=row_ok[:, None], other=0.0)
            tau = tl.load(TAU + base + rows, mask=row_ok, other=0.0) if HAS_TAU else tl.zeros([BLOCK_M], tl.float32)
            lse = tl.load(L + base + rows, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + base + rows, mask=row_ok, other=0.0)
            w, ds, dz = _soft_bwd_weights(q, k, v, gq, gk, tau, do, lse, delta, rows, cols, T, sm_scale, inv_t,
                                          RENORM)
            dv += tl.dot(tl.trans(w.to(do.dtype)), do)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
            dgk += tl.dot(tl.trans(dz.to(gq.dtype)), gq)
        tl.store(DK + (base + cols)[:, None] * D + d[None, :], (dk * sm_scale).to(DK.dtype.element_ty),
                 mask=col_ok[:, None])
        tl.store(DV + (base + cols)[:, None] * D + d[None, :], dv.to(DV.dtype.element_ty), mask=col_ok[:, None])
        tl.store(DGK + (base + cols)[:, None] * DG + g[None, :], (dgk * inv_t).to(DGK.dtype.element_ty),
                 mask=col_ok[:, None])

    @triton.jit
    def _soft_bwd_q_kernel(Q, K, V, GQ, GK, TAU, DO, L, DELTA, DQ, DGQ, T, sm_scale: tl.constexpr, inv_t: tl.constexpr,
                           RENORM: tl.constexpr, HAS_TAU: tl.constexpr, D: tl.constexpr, DG: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """dq, dgq of one query tile: a loop over the key tiles it sees."""
        pid_m, bh = tl.program_id(0), tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        d, g = tl.arange(0, D), tl.arange(0, DG)
        base = bh.to(tl.int64) * T
        row_ok = rows < T
        q = tl.load(Q + (base + rows)[:, None] * D + d[None, :], mask=row_ok[:, None], other=0.0)
        gq = tl.load(GQ + (base + rows)[:, None] * DG + g[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(DO + (base + rows)[:, None] * D + d[None, :], mask=row_ok[:, None], other=0.0)
        tau = tl.load(TAU + base + rows, mask=row_ok, other=0.0) if HAS_TAU else tl.zeros([BLOCK_M], tl.float32)
        lse = tl.load(L + base + rows, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + base + rows, mask=row_ok, other=0.0)
        dq = tl.zeros([BLOCK_M, D], tl.float32)
        dgq = tl.zeros([BLOCK_M, DG], tl.float32)
        for start in range(0, (pid_m + 1) * BLOCK_M, BLOCK_N):  # past T: masked
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < T
            k = tl.load(K + (base + cols)[:, None] * D + d[None, :], mask=col_ok[:, None], other=0.0)
            v = tl.load(V + (base + cols)[:, None] * D + d[None, :], mask=col_ok[:, None], other=0.0)
            gk = tl.load(GK + (base + cols)[:, None] * DG + g[None, :], mask=col_ok[:, None], other=0.0)
            w, ds, dz = _soft_bwd_weights(q, k, v, gq, gk, tau, do, lse, delta, rows, cols, T, sm_scale, inv_t,
                                          RENORM)
            dq += tl.dot(ds.to(k.dtype), k)
            dgq += tl.dot(dz.to(gk.dtype), gk)
        tl.store(DQ + (base + rows)[:, None] * D + d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
                 mask=row_ok[:, None])
        tl.store(DGQ + (base + rows)[:, None] * DG + g[None, :], (dgq * inv_t).to(DGQ.dtype.element_ty),
                 mask=row_ok[:, None])


# (BLOCK_M, BLOCK_N, warps) the soft-gate kernels' autotuner tries. Compiled for sm_90 on CPU
# (scripts/kernel_resources.py) the backward kernels spill registers in every one of these; tiles that do not spill
# (bwd_kv 64 x 16 with 4 warps, bwd_q 64 x 32 with 8 warps) join the backward lists with
# GATELAB_SOFT_SPILL_FREE_TILES=1 (timed beside the default by benchmarks/drivers/soft_kernel_check.py --compare-tiles).
SOFT_TILES = ((64, 64, 4), (64, 64, 8), (128, 64, 8), (64, 32, 4))
SOFT_SPILL_FREE_TILES = dict(kv=((64, 16, 4),), q=((64, 32, 8),))
SOFT_ADD_SPILL_FREE = os.environ.get("GATELAB_SOFT_SPILL_FREE_TILES", "0") == "1"


def _soft_configs(extra=()):
    """Tile shapes and warps tried once per (T, D, d_gate) on the GPU (triton.autotune); the interpreter runs one."""
    if _INTERPRET:
        return [triton.Config(dict(BLOCK_M=16, BLOCK_N=16), num_warps=1, num_stages=1)]
    return [triton.Config(dict(BLOCK_M=m, BLOCK_N=n), num_warps=w, num_stages=2) for m, n, w in SOFT_TILES + extra]


def _soft_autotuners(add_spill_free: bool):
    """The three soft-gate kernels under triton.autotune (the backward lists with the spill-free tiles if asked)."""
    key = ["T", "D", "DG", "RENORM"]
    extra = SOFT_SPILL_FREE_TILES if add_spill_free else dict(kv=(), q=())
    # the backward kernels write their whole outputs: no reset between autotuning trials is needed
    return (triton.autotune(_soft_configs(), key=key)(_soft_fwd_kernel),
            triton.autotune(_soft_configs(extra["kv"]), key=key)(_soft_bwd_kv_kernel),
            triton.autotune(_soft_configs(extra["q"]), key=key)(_soft_bwd_q_kernel))


if triton is not None:
    _soft_fwd, _soft_bwd_kv, _soft_bwd_q = _soft_autotuners(SOFT_ADD_SPILL_FREE)


class _SoftGateAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, gq, gk, tau, inv_t: float, renorm: bool):
        B, H, T, D = q.shape
        out = torch.empty_like(q)
        lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
        has_tau = tau is not None
        tau_arg = tau if has_tau else lse
        _soft_fwd[lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)](
            q, k, v, gq, gk, tau_arg, out, lse, T, D ** -0.5, inv_t, RENORM=renorm, HAS_TAU=has_tau, D=D,
            DG=gq.shape[-1])
        ctx.save_for_backward(q, k, v, gq, gk, tau_arg, out, lse)
        ctx.inv_t, ctx.renorm, ctx.has_tau = inv_t, renorm, has_tau
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, gq, gk, tau, out, lse = ctx.saved_tensors
        B, H, T, D = q.shape
        dout = dout.contiguous()
        delta = (dout.float() * out.float()).sum(-1)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dgq, dgk = torch.empty_like(gq), torch.empty_like(gk)
        common = dict(RENORM=ctx.renorm, HAS_TAU=ctx.has_tau, D=D, DG=gq.shape[-1])
        _soft_bwd_kv[lambda meta: (triton.cdiv(T, meta["BLOCK_N"]), B * H)](
            q, k, v, gq, gk, tau, dout, lse, delta, dk, dv, dgk, T, D ** -0.5, ctx.inv_t, **common)
        _soft_bwd_q[lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)](
            q, k, v, gq, gk, tau, dout, lse, delta, dq, dgq, T, D ** -0.5, ctx.inv_t, **common)
        return dq, dk, dv, dgq, dgk, None, None, None


def soft_gate_fits(q: torch.Tensor, gq: torch.Tensor) -> bool:
    """Whether the fused soft-gate kernel serves these inputs: kernels enabled for q, 16-bit inputs (fp32 keeps the
    explicit path, whose matrix products the kernel's tensor-core tiles would round), power-of-two head and gate
    widths of 16..128."""
    return (kernels_enabled(q) and q.dtype in (torch.bfloat16, torch.float16) and _pow2(q.shape[-1], 16, 128)
            and _pow2(gq.shape[-1], 16, 128))


def soft_gate_attention(q, k, v, gq, gk, temperature: float, renormalize: bool,
                        tau: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of q, k, v (B, H, T, D) under the soft gate m = sigmoid((gq gk^T - tau) / temperature)
    (gq, gk: (B, H, T, d_gate), gq already scaled by 1 / sqrt(d_gate); tau: (B, H, T, 1) topk-sigmoid row
    thresholds, treated as constants, or None), unrenormalised (softmax(S) * m) or renormalised (softmax(S + log m)),
    with gradients for q, k, v, gq and gk. One flash-style Triton kernel each way: no T x T tensor."""
    dt = q.dtype
    args = [t.to(dt).contiguous() for t in (q, k, v, gq, gk)]
    tau = tau[..., 0].float().contiguous() if tau is not None else None
    return _SoftGateAttention.apply(*args, tau, 1.0 / temperature, renormalize)


# ------------------------------------------------------------------------------------------------------------
# pooled block attention mass (block-gate distillation's teacher), without the T x T attention in memory

if triton is not None:
    @triton.jit
    def _block_mass_kernel(Q, K, OUT, sqb, sqh, sqt, skb, skh, skt, H, T, nb, group, qk_scale,
                           BLOCK: tl.constexpr, TILE_N: tl.constexpr, D: tl.constexpr):
        """One program per (query block i, batch x head): pass 1 finds each query's causal log-sum-exp (online, in
        base 2), pass 2 sums each query's softmax weights over every earlier key block j <= i and writes the block
        total to OUT[b, h, i, j] (the caller divides by the queries per block)."""
        i = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        rows = i * BLOCK + tl.arange(0, BLOCK)
        dims = tl.arange(0, D)
        row_ok = rows < T
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqt + dims[None, :], mask=row_ok[:, None], other=0.0)
        k_base = K + b * skb + (h // group) * skh
        m = tl.full([BLOCK], -1.0e30, dtype=tl.float32)  # finite: padded rows never see a key and stay at 0
        l = tl.zeros([BLOCK], dtype=tl.float32)
        end = tl.minimum((i + 1) * BLOCK, T)
        for n0 in range(0, end, TILE_N):
            cols = n0 + tl.arange(0, TILE_N)
            k = tl.load(k_base + cols[:, None] * skt + dims[None, :], mask=cols[:, None] < T, other=0.0)
            s = tl.dot(q, tl.trans(k)) * qk_scale
            ok = (cols[None, :] <= rows[:, None]) & row_ok[:, None]
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            l = l * tl.exp2(m - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
            m = m_new
        inv_l = tl.where(row_ok, 1.0 / tl.maximum(l, 1.0e-30), 0.0)
        out_row = OUT + bh * nb * nb + i * nb
        for j in range(0, i + 1):
            total = 0.0
            for n0 in range(j * BLOCK, (j + 1) * BLOCK, TILE_N):
                cols = n0 + tl.arange(0, TILE_N)
                k = tl.load(k_base + cols[:, None] * skt + dims[None, :], mask=cols[:, None] < T, other=0.0)
                s = tl.dot(q, tl.trans(k)) * qk_scale
                ok = (cols[None, :] <= rows[:, None]) & row_ok[:, None]
                p = tl.where(ok, tl.exp2(s - m[:, None]), 0.0) * inv_l[:, None]
                total += tl.sum(tl.sum(p, 1), 0)
            tl.store(out_row + j, total)


def block_mass_fits(q: torch.Tensor, k: torch.Tensor, block_size: int) -> bool:
    """Whether block_attention_mass_fused serves these inputs: the kernel enabled for q, 16-bit q and k of one
    dtype, as many keys as queries, and a power-of-two block size (16-256) and head dim (16-256)."""
    return (kernels_enabled(q) and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype
            and q.shape[2] == k.shape[2] and _pow2(block_size, 16, 256) and _pow2(q.shape[3], 16, 256))


@torch.no_grad()
@torch.compiler.disable  # a plain kernel launch; distillation calls it eagerly
def block_attention_mass_fused(q: torch.Tensor, k: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """blocks.block_attention_mass for causal attention (no other mask), as one Triton kernel: (B, H, nb, nb) float32
    block sums of the softmax weights, before the division by each query block's size. q (B, H, T, D), k (B, Hk, T,
    D). Logits are accumulated in float32 (the torch path rounds them to q's dtype first)."""
    B, H, T, D = q.shape
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    nb = -(-T // block_size)
    out = torch.zeros(B, H, nb, nb, dtype=torch.float32, device=q.device)
    tile_n = 16 if _INTERPRET else min(64, block_size)
    _block_mass_kernel[(nb, B * H)](q, k, out, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
                                    k.stride(2), H, T, nb, H // k.shape[1], scale * 1.4426950408889634,
                                    BLOCK=block_size, TILE_N=tile_n, D=D, num_warps=8 if block_size >= 128 else 4)
    return out


# ------------------------------------------------------------------------------------------------------------
# The output head's loss without the logits in memory: opt-in (model.LOSS_KERNEL = "triton").
# In the H100 profile of the dense step (benchmarks/results/profile-*.txt) the head is half the step: the logits
# product, the log-sum-exp / softmax-gradient reduction over the 50,257-wide rows (1.41 ms a step, reading the
# logits several times) and the two gradient products. Here, per chunk of rows:
#   pass 1 (_lce_lse_kernel)   logits tile by tile (h W^T, fp32 accumulate) with an online log-sum-exp; each
#                              program covers one row block and one slice of the vocabulary, the slices' (max, sum)
#                              pairs are combined after; the target's logit is picked on the way. No logits stored.
#   pass 2 (_lce_grad_kernel)  the same tiles again, g = softmax - onehot formed in registers and written once (bf16,
#                              what the weight gradient's product reads), and grad_h's share of the slice, g W,
#                              accumulated in registers; the slices' shares are summed after.
#   grad_w                     g^T h by cuBLAS, as before.
# Logits are kept in fp32 (the torch path rounds them to bf16 before the log-sum-exp).

if triton is not None:
    @triton.jit
    def _head_program(H, TGT, N, V, cols_per_split, C: tl.constexpr, BLOCK_M: tl.constexpr):
        """What both head kernels start from: program (row block, vocabulary slice) -> its rows, their validity,
        the width's indices, the rows of h (BLOCK_M, C), their targets, the slice and its columns [lo, hi)."""
        split = tl.program_id(1)
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        c = tl.arange(0, C)
        h = tl.load(H + rows[:, None].to(tl.int64) * C + c[None, :], mask=row_ok[:, None], other=0.0)
        tgt = tl.load(TGT + rows, mask=row_ok, other=-1)
        lo = split * cols_per_split
        return rows, row_ok, c, h, tgt, split, lo, tl.minimum(lo + cols_per_split, V)

    @triton.jit
    def _lce_lse_kernel(H, W, TGT, MAX, SUM, PICK, N, V, cols_per_split, C: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr):
        """Program (row block, vocabulary slice): the slice's running max and sum of exp(logit - max) per row, and
        the target's logit where it falls in the slice (0 elsewhere)."""
        rows, row_ok, c, h, tgt, split, lo, hi = _head_program(H, TGT, N, V, cols_per_split, C, BLOCK_M)
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_M], tl.float32)
        pick = tl.zeros([BLOCK_M], tl.float32)
        for v0 in range(lo, hi, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_ok = cols < hi
            w = tl.load(W + cols[:, None].to(tl.int64) * C + c[None, :], mask=col_ok[:, None], other=0.0)
            logits = tl.where(col_ok[None, :], tl.dot(h, tl.trans(w)), float("-inf"))
            m_new = tl.maximum(m, tl.max(logits, 1))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), 1)
            m = m_new
            pick += tl.sum(tl.where(cols[None, :] == tgt[:, None], logits, 0.0), 1)
        out = split * N + rows
        tl.store(MAX + out, m, mask=row_ok)
        tl.store(SUM + out, s, mask=row_ok)
        tl.store(PICK + out, pick, mask=row_ok)

    @triton.jit
    def _lce_grad_kernel(H, W, TGT, LSE, G, DH, N, V, g_stride, cols_per_split, C: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, WRITE_G: tl.constexpr,
                         WANT_DH: tl.constexpr):
        """Program (row block, vocabulary slice): g = exp(logit - lse) - onehot over the slice, written to G (bf16,
        row stride g_stride); the slice's share of grad_h = g W to DH[split] (fp32)."""
        rows, row_ok, c, h, tgt, split, lo, hi = _head_program(H, TGT, N, V, cols_per_split, C, BLOCK_M)
        lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
        dh = tl.zeros([BLOCK_M, C], tl.float32)
        for v0 in range(lo, hi, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_ok = cols < hi
            w = tl.load(W + cols[:, None].to(tl.int64) * C + c[None, :], mask=col_ok[:, None], other=0.0)
            logits = tl.dot(h, tl.trans(w))
            g = tl.exp(logits - lse[:, None]) - (cols[None, :] == tgt[:, None]).to(tl.float32)
            g = tl.where(col_ok[None, :] & row_ok[:, None], g, 0.0).to(w.dtype)
            if WRITE_G:
                tl.store(G + rows[:, None].to(tl.int64) * g_stride + cols[None, :], g,
                         mask=row_ok[:, None] & col_ok[None, :])
            if WANT_DH:
                dh += tl.dot(g, w)
        if WANT_DH:
            tl.store(DH + (split * N + rows)[:, None].to(tl.int64) * C + c[None, :], dh, mask=row_ok[:, None])


# (BLOCK_M, BLOCK_V, warps, stages) tried once per shape on the GPU (triton.autotune). Chosen offline: compiled for
# sm_90 here (scripts/kernel_resources.py), these use no local memory (register spills) at C = 256, except the
# gradient kernel's 64 x 64 and 64 x 128 tiles (56 and 96 bytes a thread), kept in case their wider tiles win anyway.
LCE_LSE_TILES = ((64, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3), (64, 64, 8, 3), (64, 64, 4, 4))
LCE_GRAD_TILES = ((64, 32, 8, 3), (64, 64, 8, 3), (64, 128, 8, 3))


def _lce_configs(tiles):
    """The autotuner's configs for the head kernels; the interpreter runs one."""
    if _INTERPRET:
        return [triton.Config(dict(BLOCK_M=16, BLOCK_V=16), num_warps=1, num_stages=1)]
    return [triton.Config(dict(BLOCK_M=m, BLOCK_V=v), num_warps=w, num_stages=st) for m, v, w, st in tiles]


if triton is not None:
    _lce_lse = triton.autotune(_lce_configs(LCE_LSE_TILES), key=["C", "cols_per_split"])(_lce_lse_kernel)
    # DH partials are written whole (every row of each split) and G only where stored: no reset between trials
    _lce_grad = triton.autotune(_lce_configs(LCE_GRAD_TILES), key=["C", "cols_per_split", "WRITE_G", "WANT_DH"])(
        _lce_grad_kernel)

LOSS_SPLITS = 8  # vocabulary slices per row block: with 2,048-row chunks, 32 row blocks x 8 slices of programs


def fused_head_fits(h: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the fused head kernels serve these inputs: kernels enabled for h, h and weight 16-bit of one dtype,
    and a power-of-two width of 16..256."""
    return (kernels_enabled(h) and h.dtype in (torch.bfloat16, torch.float16) and weight.dtype == h.dtype
            and _pow2(h.shape[-1], 16, 256))


def _head_chunk(h, w, targets, want_h: bool, want_w: bool, grad_h, grad_w, g_buffer) -> torch.Tensor:
    """One chunk of rows on the two head kernels: h (n, C), w (V, C) of one 16-bit dtype, targets (n,). Returns the
    chunk's summed loss (fp32 scalar); writes grad_h (n, C) and adds g^T h to grad_w (V, C) fp32 when asked.
    g_buffer: (>= n, >= V) scratch for g (row stride its width)."""
    n, C = h.shape
    V = w.shape[0]
    splits = LOSS_SPLITS
    cols_per_split = -(-V // (splits * 128)) * 128  # slices start on 128-column boundaries (aligned stores of g)
    m, s, pick = (torch.empty(splits, n, dtype=torch.float32, device=h.device) for _ in range(3))
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), splits)  # noqa: E731
    _lce_lse[grid](h, w, targets, m, s, pick, n, V, cols_per_split, C=C)
    top = m.amax(0)
    lse = top + torch.log((s * torch.exp(m - top)).sum(0))
    loss = (lse - pick.sum(0)).sum()
    if want_h or want_w:
        unused = torch.empty(1, dtype=torch.float32, device=h.device)
        dh = torch.empty(splits, n, C, dtype=torch.float32, device=h.device) if want_h else unused
        g = g_buffer if want_w else unused
        _lce_grad[grid](h, w, targets, lse.contiguous(), g, dh, n, V, g.stride(0) if want_w else 0,
                        cols_per_split, C=C, WRITE_G=want_w, WANT_DH=want_h)
        if want_h:
            grad_h.copy_(dh.sum(0))
        if want_w:
            grad_w += (g[:n, :V].t() @ h).float()
    return loss


@torch.library.custom_op("gatelab::fused_head_loss", mutates_args=())
def fused_head_loss(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, chunk_rows: int, want_h: bool,
                    want_w: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The summed cross-entropy of h (N, C) @ w (V, C)^T against targets (N,) on the head kernels, chunk_rows rows at
    a time, with its gradients: (loss fp32 scalar, grad_h (N, C) in h's dtype, grad_w (V, C) fp32); a gradient not
    asked for comes back empty. One opaque operator to torch.compile: traced into, the kernels' in-place writes were
    functionalised into clones that faulted on the H100 (torch 2.11, tests/test_cuda.py), where eager was right."""
    h, w, targets = h.contiguous(), w.contiguous(), targets.contiguous()
    N, C = h.shape
    V = w.shape[0]
    grad_h = torch.empty_like(h) if want_h else h.new_empty(0)
    grad_w = torch.zeros((V, C), dtype=torch.float32, device=h.device) if want_w else h.new_empty(0, dtype=torch.float32)
    # g's scratch rows, 64-aligned (the weight gradient's product reads them)
    g_buffer = torch.empty(min(chunk_rows, N), -(-V // 64) * 64, dtype=h.dtype, device=h.device) if want_w else None
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for s in range(0, N, chunk_rows):
        total += _head_chunk(h[s:s + chunk_rows], w, targets[s:s + chunk_rows], want_h, want_w,
                             grad_h[s:s + chunk_rows] if want_h else None, grad_w, g_buffer)
    return total, grad_h, grad_w


@fused_head_loss.register_fake
def _(h, w, targets, chunk_rows, want_h, want_w):
    return (h.new_empty((), dtype=torch.float32), h.new_empty(h.shape) if want_h else h.new_empty(0),
            h.new_empty((w.shape[0], h.shape[1]), dtype=torch.float32) if want_w else h.new_empty(0, dtype=torch.float32))
