"""Block routing's selection in one Triton kernel: from a block gate's two factors to the BlockMask's index lists.

A block gate scores query block i against key block j by G = gq gk^T (gq: pooled queries projected per head and
divided by sqrt(d_gate), gk: pooled keys projected per head). Query block i keeps its diagonal block and the block_k
best *earlier* blocks j < i, ranked by the previous block's row: G[i-1, j] over j <= i-1 (attention.blocks'
previous_block_rows, earlier_topk_indices, block_lists). In torch that is tens of small operator calls per layer
(pool, project, matmul, pad, mask, top-k, sort, pad, arange, ...); at inference their launches cost more than the
sparse attention saves. The kernel here forms each row of G from the factors in registers (no nb x nb score tensor
in memory), picks the row's top block_k earlier blocks exactly, and writes the four lists flex_attention's
BlockMask.from_kv_blocks takes, the same tensors block_lists produces:

    kv_num    (B, H, nb) int32       1: each query block's one partial block, its diagonal
    kv_idx    (B, H, nb, nb) int32   row i = [i, 0, 0, ...]
    full_num  (B, H, nb) int32       min(i, kk), kk = min(block_k, nb - 1)
    full_idx  (B, H, nb, nb) int32   row i: its kk chosen blocks in ascending order, then zeros; a row i <= kk (it
                                     keeps all i earlier blocks) lists 0, 1, ..., kk - 1 (the i earlier blocks
                                     and, past full_num, the later blocks j = i..kk-1 the BlockMask ignores)

Ranking and ties: by score, then by lower block index, i.e. a stable descending sort of each causal row (later
blocks masked to -inf, so they rank after every earlier block). -0.0 ties +0.0 and NaN ranks above everything, as
torch's sort compares. Scores are float32 products of the given factors (products of 16-bit factors are exact,
accumulated in float32), so the selection is that of G = gq.float() @ gk.float()^T: block_select_reference, and
attention.blocks.block_lists(previous_block_rows(G)) on the same G (tests/test_block_select.py). A torch path that
rounds G to a 16-bit dtype first can differ where that rounding ties or reorders scores.

The kernel runs on CUDA when Triton is installed (block_select_fits); everywhere else block_select falls back to the
torch reference. Tests run the kernel on CPU under Triton's interpreter (TRITON_INTERPRET=1).

Timed once on an H200 (torch 2.11, Triton 3.6; bf16 factors, d_gate 64, B 1, H 32, block_k 4-32), per call: 70-85 us
for nb 16 to 256 (the launch: the host is the bound) against 520-580 us for G, previous_block_rows and block_lists in
torch; nb 1024 (GPU-bound, every program scores a whole row of 1024 blocks): 0.62 ms against 1.58 ms.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # Triton ships with CUDA builds of torch; CPU builds run the torch reference
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
from gatelab.kernels.triton_support import _INTERPRET, available

MAX_SELECT_BLOCKS = 1024  # a row of nb scores is held in registers: 128K tokens at block_size 128
SELECT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SELECT_TILE = (16, 20)  # (query blocks per program, bits found by bisection before the exact refinement; 32: none)

if triton is not None:
    from gatelab.kernels.topk import _float_key, _kth_largest_key_refined

    @triton.jit
    def _block_select_kernel(GQ, GK, KV_NUM, KV_IDX, FULL_NUM, FULL_IDX, H, nb, kk, DG,
                             sqb, sqh, sqn, sqd, skb, skh, skn, skd,
                             UPCAST: tl.constexpr, DC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             COARSE: tl.constexpr):
        """Query blocks i of one tile (BLOCK_M of them) of one (batch, head); grid (tiles, B * H). Row i scores the
        key blocks j < i by G[i-1, j] = gq[i-1] . gk[j], formed DC factor dimensions at a time."""
        pid_m, bh = tl.program_id(0), tl.program_id(1)
        b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query blocks i
        cols = tl.arange(0, BLOCK_N)  # key blocks j
        row_ok = rows < nb
        col_ok = cols < nb
        q_ok = row_ok & (rows >= 1)  # row i reads G's row i - 1; row 0 has no earlier block
        gq_rows = GQ + b * sqb + h * sqh + (rows - 1).to(tl.int64)[:, None] * sqn
        gk_rows = GK + b * skb + h * skh + cols.to(tl.int64)[:, None] * skn
        s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for d0 in range(0, DG, DC):
            d = d0 + tl.arange(0, DC)
            d_ok = d < DG
            gq = tl.load(gq_rows + d[None, :] * sqd, mask=q_ok[:, None] & d_ok[None, :], other=0.0)
            gk = tl.load(gk_rows + d[None, :] * skd, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            if UPCAST:  # float32 factors (products in full precision, not TF32), or bf16 under the interpreter
                s += tl.dot(gq.to(tl.float32), tl.trans(gk.to(tl.float32)), input_precision="ieee")
            else:
                s += tl.dot(gq, tl.trans(gk))
        allowed = (cols[None, :] < rows[:, None]) & row_ok[:, None]
        # -0.0 as +0.0 (torch ties them; a dot whose zero accumulator is optimised away can give -0.0), NaN above
        # everything, as torch sorts
        key = tl.where(s != s, 0xFFFFFFFF, _float_key(tl.where(s == 0.0, 0.0, s)))
        key = tl.where(allowed, key, 0)  # below every real score's key (-inf's included)
        kth = _kth_largest_key_refined(key, kk, COARSE, BLOCK_M)
        above = key > kth[:, None]
        tie = ((key == kth[:, None]) & allowed).to(tl.int32)
        room = kk - tl.sum(above.to(tl.int32), axis=1)
        keep = above | ((tie != 0) & (tl.cumsum(tie, axis=1) <= room[:, None]))  # lower blocks first among ties
        # rows i <= kk keep all i earlier blocks, then (as a stable sort of the -inf-masked row) blocks i..kk-1
        keep = tl.where((rows <= kk)[:, None], cols[None, :] < kk, keep & allowed) & row_ok[:, None]
        pos = tl.cumsum(keep.to(tl.int32), axis=1) - 1  # ascending block order, compacted
        cols2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32) + cols[None, :]
        row_base = bh.to(tl.int64) * nb * nb + rows.to(tl.int64)[:, None] * nb
        tl.store(FULL_IDX + row_base + pos, cols2, mask=keep)
        tl.store(FULL_IDX + row_base + cols2, tl.zeros_like(cols2), mask=row_ok[:, None] & col_ok[None, :]
                 & (cols2 >= kk))  # positions past the kk chosen ones (disjoint from the stores above)
        tl.store(KV_IDX + row_base + cols2, tl.where(cols2 == 0, rows[:, None], 0),
                 mask=row_ok[:, None] & col_ok[None, :])
        vec = bh.to(tl.int64) * nb + rows
        tl.store(FULL_NUM + vec, tl.minimum(rows, kk), mask=row_ok)
        tl.store(KV_NUM + vec, tl.full([BLOCK_M], 1, dtype=tl.int32), mask=row_ok)


def block_select_fits(gq: torch.Tensor, gk: torch.Tensor | None = None) -> bool:
    """Whether the kernel serves these factors: Triton available for them (CUDA, or Triton's CPU interpreter),
    gq (B, H, nb, d_gate) float16, bfloat16 or float32, gk of the same shape, dtype and device, and 1 <= nb <=
    MAX_SELECT_BLOCKS (a row of nb scores is held in registers). Whether it should serve is the caller's choice
    (Backend.kernels)."""
    return (available(gq) and gq.dim() == 4 and gq.dtype in SELECT_DTYPES and 1 <= gq.shape[2] <= MAX_SELECT_BLOCKS
            and gq.shape[3] >= 1 and gq.numel() > 0
            and (gk is None or (gk.shape == gq.shape and gk.dtype == gq.dtype and gk.device == gq.device)))


def block_select_reference(gq: torch.Tensor, gk: torch.Tensor, block_k: int):
    """The kernel's result in torch: (kv_num, kv_idx, full_num, full_idx) for G = gq gk^T formed in float32, under
    attention.blocks' rule (previous_block_rows, then each query block's block_k best earlier blocks by a stable
    descending sort, in ascending order) written here in a few lines; equal to block_lists(previous_block_rows(G),
    block_k) (tests/test_block_select.py)."""
    B, H, nb, _ = gq.shape
    dev = gq.device
    G = gq.detach().float() @ gk.detach().float().transpose(-1, -2)
    scores = F.pad(G[..., :-1, :], (0, 0, 1, 0))  # row i <- row i - 1
    earlier = torch.ones(nb, nb, dtype=torch.bool, device=dev).tril(-1)
    kk = max(0, min(block_k, nb - 1))
    ranked = scores.masked_fill(~earlier, float("-inf")).sort(dim=-1, descending=True, stable=True).indices
    full_idx = F.pad(ranked[..., :kk].sort(dim=-1).values, (0, nb - kk)).to(torch.int32).contiguous()
    full_num = torch.arange(nb, device=dev).clamp(max=kk).to(torch.int32).expand(B, H, nb).contiguous()
    kv_num = torch.ones(B, H, nb, dtype=torch.int32, device=dev)
    kv_idx = F.pad(torch.arange(nb, dtype=torch.int32, device=dev)[:, None], (0, nb - 1)).expand(B, H, nb, nb)
    return kv_num, kv_idx.contiguous(), full_num, full_idx


@torch.no_grad()
def block_select(gq: torch.Tensor, gk: torch.Tensor, block_k: int, tile: tuple[int, int] = SELECT_TILE):
    """attention.blocks.block_lists(previous_block_rows(gq @ gk^T), block_k) from the factors, in one kernel launch:
    (kv_num (B, H, nb), kv_idx (B, H, nb, nb), full_num (B, H, nb), full_idx (B, H, nb, nb)), all int32, ready for
    BlockMask.from_kv_blocks. gq (B, H, nb, d_gate) already divided by sqrt(d_gate), gk (B, H, nb, d_gate); any
    strides. tile: (query blocks per program, a power of two >= 16; coarse bits, 1..32). Where the kernel does not
    serve (block_select_fits), block_select_reference, which gives the same tensors. One custom operator
    (gatelab::block_select), so that a compiled forward keeps the selection inside its graph (no graph break) and a
    CUDA graph can record it."""
    return _block_select_op(gq.detach(), gk.detach(), block_k, tile[0], tile[1])


@torch.library.custom_op("gatelab::block_select", mutates_args=())
def _block_select_op(gq: torch.Tensor, gk: torch.Tensor, block_k: int, rows: int,
                     coarse: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if not block_select_fits(gq, gk):
        return block_select_reference(gq, gk, block_k)
    B, H, nb, DG = gq.shape
    dev = gq.device
    kv_num = torch.empty(B, H, nb, dtype=torch.int32, device=dev)
    full_num = torch.empty(B, H, nb, dtype=torch.int32, device=dev)
    kv_idx = torch.empty(B, H, nb, nb, dtype=torch.int32, device=dev)
    full_idx = torch.empty(B, H, nb, nb, dtype=torch.int32, device=dev)
    block_n = max(16, triton.next_power_of_2(nb))
    dc = max(16, min(32, triton.next_power_of_2(DG)))  # factor dimensions per tl.dot (16 at least)
    # float32 factors multiply in float32 (not TF32); bf16 too under the interpreter, whose bf16 tl.dot is wrong
    # (Triton 3.9, numpy); 16-bit products are exact in float32 either way
    upcast = gq.dtype == torch.float32 or (_INTERPRET and gq.dtype == torch.bfloat16)
    _block_select_kernel[(triton.cdiv(nb, rows), B * H)](
        gq, gk, kv_num, kv_idx, full_num, full_idx, H, nb, max(0, min(block_k, nb - 1)), DG, *gq.stride(),
        *gk.stride(), UPCAST=upcast, DC=dc, BLOCK_M=rows, BLOCK_N=block_n, COARSE=coarse,
        num_warps=4 if block_n <= 256 else 8, num_stages=1)  # pipelining the d loop: over the H200's shared memory
    return kv_num, kv_idx, full_num, full_idx


@_block_select_op.register_fake
def _(gq, gk, block_k, rows, coarse):
    B, H, nb, _ = gq.shape
    lists = dict(dtype=torch.int32, device=gq.device)
    return (torch.empty(B, H, nb, **lists), torch.empty(B, H, nb, nb, **lists), torch.empty(B, H, nb, **lists),
            torch.empty(B, H, nb, nb, **lists))
