"""The output head's cross-entropy without the full logits: chunked torch products (the default) or Triton kernels
that form the logits tile by tile; both give the gradients during the forward pass."""
from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of torch; CPU builds run the torch reference
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
import torch.nn.functional as F

from gatelab.config import GatelabError
from gatelab.kernels.triton_support import _INTERPRET, _pow2, available

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
    return (available(h) and h.dtype in (torch.bfloat16, torch.float16) and weight.dtype == h.dtype
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


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk_rows: int, reduction: str, vocab_multiple: int = 1,
                kernel: str = "torch"):
        V = weight.shape[0]
        w = weight.to(h.dtype)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        scale = 1.0 / h.shape[0] if reduction == "mean" else 1.0
        ctx.scale = scale
        if kernel == "triton" and fused_head_fits(h, w):
            # fused_head_loss: no logits in memory, one opaque operator to torch.compile
            total, grad_h, grad_w = fused_head_loss(h, w, targets, chunk_rows, want_h, want_w)
            ctx.save_for_backward(grad_h if want_h else None, grad_w if want_w else None)
            return total * scale
        # zero rows pad the vocabulary to Vp (the torch path; the kernels mask their own columns): their logits
        # are 0, left out of the log-sum-exp; in g @ w they meet the zero rows (contributing exactly 0), and their
        # rows of grad_w are dropped
        Vp = -(-V // vocab_multiple) * vocab_multiple
        if Vp != V:
            w = F.pad(w, (0, 0, 0, Vp - V))
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros((Vp, weight.shape[1]), dtype=torch.float32, device=h.device) if want_w else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], chunk_rows):
            hc, tc = h[s:s + chunk_rows], targets[s:s + chunk_rows]
            logits = (hc @ w.t()).float()
            lse = torch.logsumexp(logits[:, :V] if Vp != V else logits, dim=-1)
            total = total + (lse - logits.gather(1, tc[:, None]).squeeze(1)).sum()
            if want_h or want_w:  # d loss / d logits = softmax - onehot (pointwise: torch.compile fuses it)
                onehot = torch.arange(logits.shape[1], device=h.device)[None, :] == tc[:, None]
                g = (torch.exp(logits - lse[:, None]) - onehot.float()).to(h.dtype)
                if want_h:
                    grad_h[s:s + chunk_rows] = g @ w
                if want_w:
                    grad_w += (g.t() @ hc).float()
        ctx.save_for_backward(grad_h if want_h else None, grad_w[:V] if want_w else None)
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        factor = grad_out * ctx.scale
        return (grad_h * factor.to(grad_h.dtype) if grad_h is not None else None,
                grad_w * factor if grad_w is not None else None, None, None, None, None, None)


LOSS_CHUNK_ROWS = 2048  # rows of logits formed at once (benchmarks/bench_train.py times other sizes)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reduction: str = "mean",
                         chunk_rows: int | None = None, vocab_multiple: int = 64, kernel: str = "torch") -> torch.Tensor:
    """cross_entropy(h @ weight.T, targets) without materialising the logits: h (N, C), weight (V, C).

    Matches `F.cross_entropy(F.linear(h, weight).float(), targets)` under the same autocast: the matrix products
    run in the autocast dtype (bf16 on GPU), softmax and log-sum-exp in fp32. The gradients are formed during the
    forward pass, chunk by chunk, and scaled by the incoming gradient in backward. vocab_multiple: the products run
    over a vocabulary padded with zero rows to a multiple of this (same math; 64 was measured faster on the GPU, 1
    pads nothing); kernel: "torch" (chunked products) or "triton" (fused_head_loss: the logits formed tile by tile,
    never stored; CUDA, 16-bit inputs) (Backend.loss_vocab_multiple, Backend.loss_kernel).
    """
    if reduction not in ("mean", "sum"):
        raise GatelabError(f"linear_cross_entropy: reduction must be mean or sum, got {reduction!r}")
    if vocab_multiple < 1:
        raise GatelabError(f"linear_cross_entropy: vocab_multiple must be >= 1, got {vocab_multiple}")
    dev = h.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
    with torch.autocast(dev, enabled=False):
        return _LinearCrossEntropy.apply(h.to(dtype), weight, targets, chunk_rows or LOSS_CHUNK_ROWS, reduction,
                                         vocab_multiple, kernel)
