"""A block gate's factors in one Triton kernel: pooled blocks of queries and keys (or of the layer input X), each
projected per head, the two factors the block selection (kernels/block_select.py) takes.

A block gate (attention.gates.BlockGate) scores query block i against key block j by G = gq gk^T, with

    gq[b, h, i] = mean over block i's tokens of Q[b, h // gq_group]  @  W_q[h]  / sqrt(d_gate)
    gk[b, h, j] = pool over block j's tokens of K[b, h // gk_group]  @  W_k[h]

where pool is the mean, or the max and the min side by side ("max-min": W_k reads 2C features, the max's then the
min's). A qk gate reads the attention's queries (H heads, group 1) and keys (Hk heads, group H / Hk); an X gate reads
the layer input (one "head", group H). In torch that is about ten operator calls per layer (two poolings, their
scalings, the weights' casts, the head repeat, two products); at inference their launches cost more than the GPU work
they do. The kernel below pools each block and projects it in registers, for both factors in one launch: one program
per (block, batch x head, side).

Rounding: the weights are rounded to the inputs' dtype first (the torch path multiplies in that dtype), then pooled
sums and products accumulate in float32 and each factor is rounded once to the inputs' dtype. The torch path rounds
the pooled blocks to that dtype before projecting, so 16-bit factors differ from it by a rounding; float32 factors
agree to float32 accuracy (tests/test_block_factors.py). block_factors_reference is the kernel's computation in torch.

The kernel serves whole blocks only (T a multiple of block_size, no padding mask), without gradients and outside
torch.compile (a compiled forward keeps the torch path, which inductor fuses): block_factors_fits says when.
"""
from __future__ import annotations

import math

import torch

try:  # Triton ships with CUDA builds of torch; CPU builds run the torch reference
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
from gatelab.config import GatelabError
from gatelab.kernels.triton_support import available

FACTOR_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TOKEN_TILE, FEATURE_TILE = 32, 64  # tokens and input features pooled per step (a 32 x 64 tile in registers)

if triton is not None:
    @triton.jit
    def _pool_project(SRC, W, OUT, b, h, n, H, nb, C, DG, group, block_size, scale,
                      s_b, s_h, s_t, s_c, w_h, w_c, w_d,
                      MAXMIN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
        """OUT[b, h, n] = pool(SRC[b, h // group, block n]) @ W[h] * scale, pooled and projected BLOCK_C features
        at a time; max-min: the max against W's first C rows, the min against the next C."""
        base = SRC + b * s_b + (h // group) * s_h + n * block_size * s_t
        d = tl.arange(0, BLOCK_D)
        d_ok = d < DG
        w_base = W + h * w_h + d[None, :] * w_d
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            c_ok = c < C
            hi = tl.full([BLOCK_C], float("-inf"), dtype=tl.float32)
            lo = tl.full([BLOCK_C], float("inf"), dtype=tl.float32)
            total = tl.zeros([BLOCK_C], dtype=tl.float32)
            for t0 in range(0, block_size, BLOCK_T):
                t = t0 + tl.arange(0, BLOCK_T)
                ok = (t < block_size)[:, None] & c_ok[None, :]
                x = tl.load(base + t.to(tl.int64)[:, None] * s_t + c[None, :] * s_c, mask=ok, other=0.0)
                x = x.to(tl.float32)
                if MAXMIN:
                    hi = tl.maximum(hi, tl.max(tl.where(ok, x, float("-inf")), axis=0))
                    lo = tl.minimum(lo, tl.min(tl.where(ok, x, float("inf")), axis=0))
                else:
                    total += tl.sum(x, axis=0)
            w_ok = c_ok[:, None] & d_ok[None, :]
            w = tl.load(w_base + c[:, None] * w_c, mask=w_ok, other=0.0)
            w = w.to(SRC.dtype.element_ty).to(tl.float32)  # the weights in the inputs' dtype, as the torch path
            if MAXMIN:
                w_min = tl.load(w_base + (C + c)[:, None] * w_c, mask=w_ok, other=0.0)
                w_min = w_min.to(SRC.dtype.element_ty).to(tl.float32)
                acc += tl.sum(tl.where(c_ok, hi, 0.0)[:, None] * w, axis=0)
                acc += tl.sum(tl.where(c_ok, lo, 0.0)[:, None] * w_min, axis=0)
            else:
                acc += tl.sum(total[:, None] * w, axis=0)
        if not MAXMIN:
            acc = acc / block_size
        out = OUT + ((b * H + h) * nb + n) * DG + d
        tl.store(out, (acc * scale).to(OUT.dtype.element_ty), mask=d_ok)

    @triton.jit
    def _block_factors_kernel(SQ, SK, WQ, WK, GQ, GK, H, nb, C, DG, q_group, k_group, block_size, q_scale,
                              sq_b, sq_h, sq_t, sq_c, sk_b, sk_h, sk_t, sk_c,
                              wq_h, wq_c, wq_d, wk_h, wk_c, wk_d,
                              K_MAXMIN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                              BLOCK_D: tl.constexpr):
        """Grid (nb, B * H, 2): block n of (batch, head), side 0 the query factor, side 1 the key factor."""
        n, bh, side = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
        b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
        if side == 0:
            _pool_project(SQ, WQ, GQ, b, h, n, H, nb, C, DG, q_group, block_size, q_scale,
                          sq_b, sq_h, sq_t, sq_c, wq_h, wq_c, wq_d, False, BLOCK_T, BLOCK_C, BLOCK_D)
        else:
            _pool_project(SK, WK, GK, b, h, n, H, nb, C, DG, k_group, block_size, 1.0,
                          sk_b, sk_h, sk_t, sk_c, wk_h, wk_c, wk_d, K_MAXMIN, BLOCK_T, BLOCK_C, BLOCK_D)


def block_factors_fits(q_src: torch.Tensor, k_src: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor,
                       block_size: int, valid: torch.Tensor | None = None) -> bool:
    """Whether the kernel serves these inputs: Triton available for them (CUDA, or Triton's CPU interpreter), no
    padding mask, q_src and k_src (B, Hq|Hk, T, C) of one float dtype and device with T a positive multiple of
    block_size, wq (H, C, d_gate) and wk (H, C or 2C, d_gate) with H a multiple of both head counts, no gradient
    asked for, and not inside torch.compile."""
    if not (available(q_src) and valid is None and q_src.dim() == 4 and k_src.dim() == 4 and wq.dim() == 3):
        return False
    B, Hq, T, C = q_src.shape
    H, DG = wq.shape[0], wq.shape[2]
    grads = torch.is_grad_enabled() and any(t.requires_grad for t in (q_src, k_src, wq, wk))
    return (q_src.dtype in FACTOR_DTYPES and k_src.dtype == q_src.dtype and k_src.device == q_src.device
            and k_src.shape[0] == B and k_src.shape[2] == T and k_src.shape[3] == C and T > 0 and T % block_size == 0
            and H % Hq == 0 and H % k_src.shape[1] == 0 and wq.shape[1] == C and DG >= 1
            and wk.shape in ((H, C, DG), (H, 2 * C, DG)) and not grads and not torch.compiler.is_compiling())


def block_factors(q_src: torch.Tensor, k_src: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, block_size: int,
                  key_pool: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """(gq, gk), each (B, H, nb, d_gate) in the inputs' dtype, gq divided by sqrt(d_gate): q_src (B, Hq, T, C)
    mean-pooled per block and projected by wq (H, C, d_gate) for head h from source head h // (H / Hq); k_src
    (B, Hk, T, C) pooled by key_pool ("mean", or "max-min" with wk (H, 2C, d_gate)) and projected by wk. Any
    strides. One kernel launch where block_factors_fits; elsewhere block_factors_reference."""
    if key_pool not in ("mean", "max-min"):
        raise GatelabError(f"block gate key pooling must be mean or max-min, got {key_pool!r}")
    if not block_factors_fits(q_src, k_src, wq, wk, block_size):
        return block_factors_reference(q_src, k_src, wq, wk, block_size, key_pool)
    return launch_block_factors(q_src, k_src, wq, wk, block_size, key_pool)


def launch_block_factors(q_src: torch.Tensor, k_src: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor,
                         block_size: int, key_pool: str) -> tuple[torch.Tensor, torch.Tensor]:
    """block_factors' kernel launch without its checks, for a caller that has asked block_factors_fits (and knows
    key_pool) already: the checks cost host time on every layer of an eager forward."""
    B, Hq, T, C = q_src.shape
    H, _, DG = wq.shape
    nb = T // block_size
    gq = torch.empty(B, H, nb, DG, dtype=q_src.dtype, device=q_src.device)
    gk = torch.empty_like(gq)
    _block_factors_kernel[(nb, B * H, 2)](
        q_src, k_src, wq, wk, gq, gk, H, nb, C, DG, H // Hq, H // k_src.shape[1], block_size, 1.0 / math.sqrt(DG),
        *q_src.stride(), *k_src.stride(), *wq.stride(), *wk.stride(), K_MAXMIN=key_pool == "max-min",
        BLOCK_T=TOKEN_TILE, BLOCK_C=min(FEATURE_TILE, triton.next_power_of_2(C)),
        BLOCK_D=max(16, triton.next_power_of_2(DG)), num_warps=4)
    return gq, gk


def block_factors_reference(q_src: torch.Tensor, k_src: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor,
                            block_size: int, key_pool: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's computation in torch (whole blocks; any T is cut to whole blocks): weights rounded to the
    inputs' dtype, pooling and products in float32, each factor rounded once."""
    H, DG = wq.shape[0], wq.shape[2]
    nb = q_src.shape[2] // block_size

    def pooled(src: torch.Tensor, how: str) -> torch.Tensor:  # (B, H, nb, C or 2C) in float32
        blocks = src[:, :, :nb * block_size].float().unflatten(2, (nb, block_size))
        blocks = blocks.repeat_interleave(H // src.shape[1], dim=1)
        return blocks.mean(3) if how == "mean" else torch.cat([blocks.amax(3), blocks.amin(3)], -1)

    def project(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bhnc,hcd->bhnd", x, w.to(q_src.dtype).float())

    gq = project(pooled(q_src, "mean"), wq) / math.sqrt(DG)
    gk = project(pooled(k_src, key_pool), wk)
    return gq.to(q_src.dtype), gk.to(q_src.dtype)
