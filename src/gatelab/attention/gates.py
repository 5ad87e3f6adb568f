"""Gate families that read the layer input X: the bilinear token gate G = (X W_gq)(X W_gk)^T / sqrt(d_gate) per
head, and the block gate over pooled blocks (mean, or max- and min-pooled keys; or pooled queries and keys, "qk")."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gatelab.attention.compiled import compiled_if, wants_grad
from gatelab.attention.masks import repeat_kv
from gatelab.config import GatelabError
from gatelab.kernels.block_factors import block_factors_fits, launch_block_factors


class BilinearGate(nn.Module):
    """G[h] = (X W_gq[h]) (X W_gk[h])^T / sqrt(d_gate), per head; X is the normed input of Q/K/V.

    A "random" gate is the same module with the same initialisation, frozen (requires_grad=False).
    """

    def __init__(self, d_model: int, n_head: int, d_gate: int, init_std: float | None = None,
                 trainable: bool = True):
        super().__init__()
        self.d_gate = d_gate
        self.init_std = init_std if init_std is not None else 1.0 / math.sqrt(d_model)
        self.wq = nn.Parameter(torch.empty(n_head, d_model, d_gate), requires_grad=trainable)
        self.wk = nn.Parameter(torch.empty(n_head, d_model, d_gate), requires_grad=trainable)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.wq, std=self.init_std)
        nn.init.normal_(self.wk, std=self.init_std)

    def factors(self, x: torch.Tensor, scaled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T, C) -> (X W_gq, X W_gk), each (B, H, T, d_gate); scaled: the first divided by sqrt(d_gate), so
        that G = gq gk^T (what the fused soft-gate kernel takes: it never forms G)."""
        gq = torch.einsum("btc,hcd->bhtd", x, self.wq.to(x.dtype))
        gk = torch.einsum("btc,hcd->bhtd", x, self.wk.to(x.dtype))
        return (gq / math.sqrt(self.d_gate) if scaled else gq), gk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, C) -> gate scores (B, H, T, T), not yet causally masked."""
        gq, gk = self.factors(x)
        return gq @ gk.transpose(-1, -2) / math.sqrt(self.d_gate)


def n_blocks(T: int, block_size: int) -> int:
    return -(-T // block_size)


def pool_blocks(x: torch.Tensor, block_size: int, how: str, valid: torch.Tensor | None = None) -> torch.Tensor:
    """x (B, T, C) -> (B, nb, C) per block of block_size tokens: mean, max or min over the block's tokens (the
    last block may be shorter; only its real tokens count). valid: optional (B|1, T) bool, the tokens to pool
    (e.g. not padding); a block with none pools to 0."""
    B, T, C = x.shape
    if valid is None and T % block_size == 0:  # whole blocks, every token: a view, no padded or masked copy
        return pool_whole_blocks(x, block_size, how)
    nb = n_blocks(T, block_size)
    pad = nb * block_size - T
    ok = torch.ones(1, T, dtype=torch.bool, device=x.device) if valid is None else valid
    ok = F.pad(ok.expand(B, T), (0, pad), value=False).view(B, nb, block_size, 1)
    xs = F.pad(x, (0, 0, 0, pad)).view(B, nb, block_size, C)
    if how == "mean":
        return (xs * ok).sum(2) / ok.sum(2).clamp_min(1).to(x.dtype)
    fill = float("-inf") if how == "max" else float("inf")
    pooled = xs.masked_fill(~ok, fill)
    pooled = pooled.amax(2) if how == "max" else pooled.amin(2)
    return pooled.masked_fill(~ok.any(2), 0.0)


def pool_whole_blocks(x: torch.Tensor, block_size: int, how: str) -> torch.Tensor:
    """x (..., T, C) with T a multiple of block_size -> (..., T / block_size, C): mean (sum / block_size), max or min
    over each block, read through a view of x (strided x included, e.g. heads transposed)."""
    blocks = x.unflatten(-2, (x.shape[-2] // block_size, block_size))
    if how == "mean":
        return blocks.sum(-2) / block_size
    return blocks.amax(-2) if how == "max" else blocks.amin(-2)


class BlockGate(nn.Module):
    """A bilinear gate over blocks, per head: G[h] = (pool_q(X) W_gq[h]) (pool_k(X) W_gk[h])^T / sqrt(d_gate).

    pool "mean": queries and keys mean-pooled; "max-min": queries mean-pooled, keys max-pooled and min-pooled
    and concatenated (SeerAttention's key pooling), so W_gk reads 2 features per input feature. A "random" block
    gate is the same module, frozen. Initialised N(0, 1/fan_in) like the token gate.

    reads "x" (the default): X is the layer's normed input (d_model features, no position). reads "qk" (Hugging
    Face models; SeerAttention's choice): the attention's own queries and keys after RoPE are pooled per head
    instead (head_dim features), so the gate starts from what the model's attention compares.
    """

    is_block_gate = True

    def __init__(self, d_model: int, n_head: int, d_gate: int, pool: str = "mean", init_std: float | None = None,
                 trainable: bool = True, reads: str = "x", head_dim: int | None = None):
        super().__init__()
        if pool not in ("mean", "max-min"):
            raise GatelabError(f"block gate pooling must be mean or max-min, got {pool!r}")
        if reads not in ("x", "qk"):
            raise GatelabError(f"a block gate reads x or qk, got {reads!r}")
        if reads == "qk" and not head_dim:
            raise GatelabError("a block gate that reads qk needs the attention's head_dim")
        self.d_gate, self.pool, self.init_std, self.reads = d_gate, pool, init_std, reads
        q_in = d_model if reads == "x" else head_dim
        k_in = q_in * (2 if pool == "max-min" else 1)
        self.wq = nn.Parameter(torch.empty(n_head, q_in, d_gate), requires_grad=trainable)
        self.wk = nn.Parameter(torch.empty(n_head, k_in, d_gate), requires_grad=trainable)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.wq, std=self.init_std or 1.0 / math.sqrt(self.wq.shape[1]))
        nn.init.normal_(self.wk, std=self.init_std or 1.0 / math.sqrt(self.wk.shape[1]))

    def forward(self, x: torch.Tensor, block_size: int, valid: torch.Tensor | None = None,
                q: torch.Tensor | None = None, k: torch.Tensor | None = None, compiled: bool = False) -> torch.Tensor:
        """x: (B, T, C) -> block scores (B, H, nb, nb), not yet causally masked. valid: (B|1, T) bool, the tokens
        pooled (padding excluded); None: all. q (B, H, T, D), k (B, Hk, T, D): the attention's queries and keys
        after RoPE, which a gate that reads "qk" pools instead of x (others ignore them). compiled: a qk gate's
        inference scores from one compiled graph on CUDA (Backend.compile_blocks)."""
        if self.reads == "qk":
            fn = compiled_if(self._qk_inference(q, k) and compiled, "qk_block_scores", qk_block_scores)
            return fn(q, k, self.wq, self.wk, block_size, self.pool, valid)
        gq, gk = self._x_factors(x, block_size, valid)
        return gq @ gk.transpose(-1, -2) / math.sqrt(self.d_gate)

    def factors(self, x: torch.Tensor, block_size: int, valid: torch.Tensor | None = None,
                q: torch.Tensor | None = None, k: torch.Tensor | None = None, compiled: bool = False,
                kernel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """forward's arguments -> its pooled, projected factors (gq, gk), each (B, H, nb, d_gate), gq divided by
        sqrt(d_gate): G = gq gk^T without forming it (what the fused block selection, kernels.block_select, takes).
        kernel (Backend.block_factors_kernel), not compiled: one Triton launch (kernels.block_factors) where it
        serves (eager inference on whole blocks)."""
        if self.reads == "qk":
            inference = self._qk_inference(q, k)
            if kernel and not compiled and block_factors_fits(q, k, self.wq, self.wk, block_size, valid):
                return launch_block_factors(q, k, self.wq, self.wk, block_size, self.pool)
            fn = compiled_if(inference and compiled, "qk_block_factors", qk_block_factors)
            return fn(q, k, self.wq, self.wk, block_size, self.pool, valid)
        if kernel and x.dim() == 3 and block_factors_fits(x[:, None], x[:, None], self.wq, self.wk, block_size,
                                                          valid):
            return launch_block_factors(x[:, None], x[:, None], self.wq, self.wk, block_size, self.pool)
        gq, gk = self._x_factors(x, block_size, valid)
        return gq / math.sqrt(self.d_gate), gk

    def _qk_inference(self, q, k) -> bool:
        """Whether a qk gate's call is CUDA inference (its graph may then be compiled); an error without q, k."""
        if q is None or k is None:
            raise GatelabError("this block gate reads the attention's queries and keys (qk); none were given")
        return q.is_cuda and not wants_grad(q, k, self.wq, self.wk)

    def _x_factors(self, x: torch.Tensor, block_size: int, valid: torch.Tensor | None):
        """(pool_q(X) W_gq, pool_k(X) W_gk), each (B, H, nb, d_gate), unscaled."""
        xq = pool_blocks(x, block_size, "mean", valid)
        xk = xq if self.pool == "mean" else pool_keys(x, block_size, self.pool, valid)
        gq = torch.einsum("bnc,hcd->bhnd", xq, self.wq.to(x.dtype))
        gk = torch.einsum("bnc,hcd->bhnd", xk, self.wk.to(x.dtype))
        return gq, gk


def pool_keys(x: torch.Tensor, block_size: int, pool: str, valid: torch.Tensor | None) -> torch.Tensor:
    """A block gate's key side: x (N, T, C) -> (N, nb, C) mean-pooled, or (N, nb, 2C) max- and min-pooled."""
    if pool == "mean":
        return pool_blocks(x, block_size, "mean", valid)
    return torch.cat([pool_blocks(x, block_size, "max", valid), pool_blocks(x, block_size, "min", valid)], -1)


def qk_block_scores(q, k, wq, wk, block_size: int, pool: str, valid: torch.Tensor | None = None) -> torch.Tensor:
    """A qk block gate's scores (B, H, nb, nb): the attention's queries q (B, H, T, D) mean-pooled per block and its
    keys k (B, Hk, T, D) pooled by `pool`, each mapped to d_gate per head (wq (H, D, d_gate), wk (H, D or 2D,
    d_gate)), then G = gq gk^T / sqrt(d_gate). A plain function of tensors, so that inference compiles it once for
    every layer (the layers' weights are inputs, not constants)."""
    gq, gk = _qk_projections(q, k, wq, wk, block_size, pool, valid)
    return gq @ gk.transpose(-1, -2) / math.sqrt(wq.shape[-1])


def qk_block_factors(q, k, wq, wk, block_size: int, pool: str, valid: torch.Tensor | None = None):
    """qk_block_scores' factors (gq, gk), each (B, H, nb, d_gate), gq divided by sqrt(d_gate) (G = gq gk^T)."""
    gq, gk = _qk_projections(q, k, wq, wk, block_size, pool, valid)
    return gq / math.sqrt(wq.shape[-1]), gk


def _qk_projections(q, k, wq, wk, block_size: int, pool: str, valid: torch.Tensor | None):
    B, H, T, D = q.shape
    if valid is None and T % block_size == 0:  # pooled in place, keys on their own heads, then repeated
        xq = pool_whole_blocks(q, block_size, "mean").reshape(B * H, -1, D)
        xk = (pool_whole_blocks(k, block_size, "mean") if pool == "mean" else
              torch.cat([pool_whole_blocks(k, block_size, "max"), pool_whole_blocks(k, block_size, "min")], -1))
        xk = repeat_kv(xk, H).reshape(B * H, xq.shape[1], -1)
    else:
        per_head = None if valid is None else valid.expand(B, T).repeat_interleave(H, dim=0)
        xq = pool_blocks(q.reshape(B * H, T, D), block_size, "mean", per_head)
        xk = pool_keys(repeat_kv(k, H).reshape(B * H, T, D), block_size, pool, per_head)
    nb = xq.shape[1]
    gq = torch.einsum("bhnc,hcd->bhnd", xq.view(B, H, nb, -1), wq.to(q.dtype))
    gk = torch.einsum("bhnc,hcd->bhnd", xk.view(B, H, nb, -1), wk.to(q.dtype))
    return gq, gk
