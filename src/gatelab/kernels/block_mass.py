"""The pooled attention mass per (query block, key block) in one Triton kernel: block-gate distillation's teacher
without a T x T tensor (attention/blocks.py's chunked torch path is its reference)."""
from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of torch; CPU builds run the torch reference
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
from gatelab.kernels.triton_support import _INTERPRET, _pow2, available

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
    return (available(q) and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype
            and q.shape[2] == k.shape[2] and _pow2(block_size, 16, 256) and _pow2(q.shape[3], 16, 256))


@torch.no_grad()
@torch.compiler.disable  # a plain kernel launch; distillation calls it eagerly
def block_attention_mass_fused(q: torch.Tensor, k: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """attention.blocks.block_attention_mass for causal attention (no other mask), as one Triton kernel: (B, H, nb, nb) float32
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
