"""Block-routed decoding in one Triton kernel: each new query reads its kept key blocks straight from the KV cache.

A decoding step under a block routing attends one query per (batch, query head) to the key blocks its query block
keeps (attention/block_decode.py): a list idx (B, H, n) of block indices, ascending, -1 where a row keeps fewer,
its own block last-or-among-them and cut at the query's position. In torch that is a gather of the kept keys and
values into new tensors, then SDPA with a mask: about ten operator calls per layer and step, and a copy of every kept
key. The kernel reads the kept blocks in place from the cache (B, Hk, S, D), query head h from key/value head
h // (H / Hk), with an online softmax over the blocks, so nothing is copied and a layer's step is one launch (two
when the blocks are split over programs to fill the GPU: each program one share of the list, then a combine).

block_decode_reference is the same attention in torch (the gathered path), which the kernel must match
(tests/test_block_decode_kernel.py, on CPU under Triton's interpreter), and what runs where the kernel cannot:
without Triton or CUDA, or with a head size that is not a power of two.
"""
from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of torch; CPU builds run the torch reference
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
from gatelab.kernels.triton_support import _pow2, available

TARGET_PROGRAMS = 4096  # programs per launch to aim for (about 30 per SM of an H100 / H200): a decoding step reads
# little, so its time is the latency of each program's loop over its blocks; at SmolLM2's 72 heads of 8 sequences and
# 33 kept blocks this gives each program one block (benchmarks/drivers/block_decode_tuning.py)
MAX_SPLITS = 64  # shares per (batch, query head): the combine holds them all in registers


def block_decode_reference(q, k, v, idx: torch.Tensor, position: int | torch.Tensor, block_size: int,
                           scale: float | None = None) -> torch.Tensor:
    """q (B, H, 1, D) at `position` (an int, or a one-element integer tensor on q's device) over the kept blocks idx
    (B, H, n) (-1: none) of the cache k, v (B, Hk, S, D): the kept positions gathered from each query head's key/value
    head, the query's own block cut at the query, then softmax attention in float32."""
    B, H, _, D = q.shape
    Hk, S = k.shape[1], k.shape[2]
    pos = (idx.clamp(min=0).long()[..., None] * block_size + torch.arange(block_size, device=q.device)).flatten(-2)
    ok = (idx >= 0).repeat_interleave(block_size, dim=-1) & (pos <= position)  # a tensor position broadcasts
    gidx = pos.clamp(max=S - 1).view(B, Hk, -1)  # query heads h = j * G + g read key/value head j
    gidx = gidx[..., None].expand(B, Hk, gidx.shape[-1], D)
    kg = torch.gather(k, 2, gidx).view(B, H, -1, D).float()
    vg = torch.gather(v, 2, gidx).view(B, H, -1, D).float()
    scores = (q.float() @ kg.transpose(-1, -2)) * (D ** -0.5 if scale is None else scale)
    weights = torch.softmax(scores.masked_fill(~ok[:, :, None, :], float("-inf")), dim=-1)
    return (weights @ vg).to(q.dtype)


def block_decode_fits(q, k, idx: torch.Tensor, block_size: int) -> bool:
    """Whether the kernel serves these tensors: Triton available for them, head size and block size powers of two."""
    return (available(q) and _pow2(q.shape[-1], 16, 256) and _pow2(block_size, 1, 1024)
            and q.shape[2] == 1 and q.shape[1] % k.shape[1] == 0 and idx.shape[:2] == q.shape[:2])


def block_decode(q, k, v, idx: torch.Tensor, position: int | torch.Tensor, block_size: int,
                 scale: float | None = None, *, target_programs: int = TARGET_PROGRAMS, num_warps: int = 4,
                 num_stages: int = 3) -> torch.Tensor:
    """block_decode_reference in one kernel launch (two when the kept blocks are split over programs). A tensor
    position is read by the kernel on the device, so that a CUDA graph of the call serves every position.
    target_programs, num_warps, num_stages: the launch (benchmarks/drivers/block_decode_tuning.py compares them)."""
    if not block_decode_fits(q, k, idx, block_size):
        return block_decode_reference(q, k, v, idx, position, block_size, scale)
    B, H, _, D = q.shape
    n = idx.shape[-1]
    idx = idx.to(torch.int32).contiguous()
    scale = D ** -0.5 if scale is None else scale
    splits = max(1, min(n, MAX_SPLITS, -(-target_programs // (B * H))))
    per_split = -(-n // splits)
    splits = -(-n // per_split)
    out = torch.empty(B, H, 1, D, dtype=q.dtype, device=q.device)
    part_m = part_l = part_acc = out  # unused when one program takes the whole list
    if splits > 1:
        part_m = torch.empty(B * H, splits, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty(B * H, splits, D, dtype=torch.float32, device=q.device)
    _block_decode_kernel[(B * H, splits)](
        q, k, v, idx, out, part_m, part_l, part_acc, H, H // k.shape[1], n, per_split, position, scale,
        q.stride(0), q.stride(1), q.stride(3), k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3), out.stride(0), out.stride(1), out.stride(3),
        BS=block_size, D=D, SPLIT=splits > 1, POS_IN_MEMORY=isinstance(position, torch.Tensor),
        num_warps=num_warps, num_stages=num_stages)
    if splits > 1:
        _combine_kernel[(B * H,)](part_m, part_l, part_acc, out, H, splits, out.stride(0), out.stride(1),
                                  out.stride(3), D=D, NS=triton.next_power_of_2(splits))
    return out


if triton is not None:
    @triton.jit
    def _block_decode_kernel(Q, K, V, IDX, OUT, PM, PL, PACC, H, G, n, per_split, POS, scale,
                             sqb, sqh, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sob, soh, sod,
                             BS: tl.constexpr, D: tl.constexpr, SPLIT: tl.constexpr, POS_IN_MEMORY: tl.constexpr):
        """One (batch, query head) and one share of its kept blocks; grid (B * H, splits). Online softmax over the
        blocks in float32; a share's running max, sum and weighted values go to PM, PL, PACC when SPLIT. POS: the
        query's position, or a pointer to it (POS_IN_MEMORY)."""
        bh, share = tl.program_id(0), tl.program_id(1)
        if POS_IN_MEMORY:
            pos = tl.load(POS)
        else:
            pos = POS
        b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
        hk = h // G
        d = tl.arange(0, D)
        # float32 whatever the scale's type: torch.compile passes a Python float to a kernel as float64
        q = (tl.load(Q + b * sqb + h * sqh + d * sqd).to(tl.float32) * scale).to(tl.float32)
        m_i = tl.zeros([1], dtype=tl.float32) - float("inf")
        l_i = tl.zeros([1], dtype=tl.float32)
        acc = tl.zeros([D], dtype=tl.float32)
        for jj in range(0, per_split):
            j = share * per_split + jj + tl.arange(0, 1)
            blk = tl.load(IDX + bh * n + j, mask=j < n, other=-1)
            offs = blk.to(tl.int64) * BS + tl.arange(0, BS)
            ok = (blk >= 0) & (offs <= pos)
            kt = tl.load(K + b * skb + hk * skh + offs[:, None] * sks + d[None, :] * skd, mask=ok[:, None], other=0.0)
            s = tl.where(ok, tl.sum(kt.to(tl.float32) * q[None, :], axis=1), float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe)
            alpha = tl.exp(m_i - m_safe)
            vt = tl.load(V + b * svb + hk * svh + offs[:, None] * svs + d[None, :] * svd, mask=ok[:, None], other=0.0)
            acc = acc * alpha + tl.sum(p[:, None] * vt.to(tl.float32), axis=0)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            m_i = m_new
        if SPLIT:
            nsplit = tl.num_programs(1)
            tl.store(PM + bh * nsplit + share + tl.arange(0, 1), m_i)
            tl.store(PL + bh * nsplit + share + tl.arange(0, 1), l_i)
            tl.store(PACC + (bh * nsplit + share) * D + d, acc)
        else:
            tl.store(OUT + b * sob + h * soh + d * sod, (acc / l_i).to(OUT.dtype.element_ty))

    @triton.jit
    def _combine_kernel(PM, PL, PACC, OUT, H, splits, sob, soh, sod, D: tl.constexpr, NS: tl.constexpr):
        """The shares of one (batch, query head) merged: weights exp(m_s - max m), output sum w acc / sum w l."""
        bh = tl.program_id(0)
        b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
        s = tl.arange(0, NS)
        d = tl.arange(0, D)
        live = s < splits
        m = tl.load(PM + bh * splits + s, mask=live, other=float("-inf"))
        lsum = tl.load(PL + bh * splits + s, mask=live, other=0.0)
        acc = tl.load(PACC + (bh * splits + s)[:, None] * D + d[None, :], mask=live[:, None], other=0.0)
        top = tl.max(m, axis=0)
        w = tl.exp(m - tl.where(top == float("-inf"), 0.0, top))
        out = tl.sum(acc * w[:, None], axis=0) / tl.sum(lsum * w, axis=0)
        tl.store(OUT + b * sob + h * soh + d * sod, out.to(OUT.dtype.element_ty))
