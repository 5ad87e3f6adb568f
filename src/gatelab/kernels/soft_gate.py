"""The soft gate as one flash-style Triton kernel each way: G = gq gk^T formed tile by tile beside S, so neither G nor
the mask goes to memory (attention/soft.py's explicit form is its reference)."""
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


# built once at import, for either backward tile list: an autotuner made while torch.compile traces would be made
# (and tune) again at every call
_TUNERS = {flag: _soft_autotuners(flag) for flag in (False, True)} if triton is not None else {}


class _SoftGateAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, gq, gk, tau, inv_t: float, renorm: bool, spill_free: bool):
        B, H, T, D = q.shape
        out = torch.empty_like(q)
        lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
        has_tau = tau is not None
        tau_arg = tau if has_tau else lse
        _soft_fwd = _TUNERS[spill_free][0]
        _soft_fwd[lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)](
            q, k, v, gq, gk, tau_arg, out, lse, T, D ** -0.5, inv_t, RENORM=renorm, HAS_TAU=has_tau, D=D,
            DG=gq.shape[-1])
        ctx.save_for_backward(q, k, v, gq, gk, tau_arg, out, lse)
        ctx.inv_t, ctx.renorm, ctx.has_tau, ctx.spill_free = inv_t, renorm, has_tau, spill_free
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
        _, _soft_bwd_kv, _soft_bwd_q = _TUNERS[ctx.spill_free]
        _soft_bwd_kv[lambda meta: (triton.cdiv(T, meta["BLOCK_N"]), B * H)](
            q, k, v, gq, gk, tau, dout, lse, delta, dk, dv, dgk, T, D ** -0.5, ctx.inv_t, **common)
        _soft_bwd_q[lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)](
            q, k, v, gq, gk, tau, dout, lse, delta, dq, dgq, T, D ** -0.5, ctx.inv_t, **common)
        return dq, dk, dv, dgq, dgk, None, None, None, None


def soft_gate_fits(q: torch.Tensor, gq: torch.Tensor) -> bool:
    """Whether the fused soft-gate kernel serves these inputs: kernels enabled for q, 16-bit inputs (fp32 keeps the
    explicit path, whose matrix products the kernel's tensor-core tiles would round), power-of-two head and gate
    widths of 16..128."""
    return (available(q) and q.dtype in (torch.bfloat16, torch.float16) and _pow2(q.shape[-1], 16, 128)
            and _pow2(gq.shape[-1], 16, 128))


def soft_gate_attention(q, k, v, gq, gk, temperature: float, renormalize: bool,
                        tau: torch.Tensor | None = None, spill_free_tiles: bool = False) -> torch.Tensor:
    """Causal attention of q, k, v (B, H, T, D) under the soft gate m = sigmoid((gq gk^T - tau) / temperature)
    (gq, gk: (B, H, T, d_gate), gq already scaled by 1 / sqrt(d_gate); tau: (B, H, T, 1) topk-sigmoid row
    thresholds, treated as constants, or None), unrenormalised (softmax(S) * m) or renormalised (softmax(S + log m)),
    with gradients for q, k, v, gq and gk. One flash-style Triton kernel each way: no T x T tensor.
    spill_free_tiles: the backward autotuner also tries tiles that do not spill registers
    (Backend.soft_spill_free_tiles)."""
    dt = q.dtype
    args = [t.to(dt).contiguous() for t in (q, k, v, gq, gk)]
    tau = tau[..., 0].float().contiguous() if tau is not None else None
    return _SoftGateAttention.apply(*args, tau, 1.0 / temperature, renormalize, spill_free_tiles)
