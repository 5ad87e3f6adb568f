"""The paper's pre-norm GPT (section 2.2) with a bilinear gate per layer and head.

6 layers, d_model 256, 4 heads, MLP 1024 with GELU, LayerNorm, learned absolute positions, context 512,
GPT-2 vocabulary, untied input and output embeddings: 30.6M parameters, plus 393,216 gate parameters at
d_gate 32. Routing is an argument of `forward`, so one model can be trained under one routing and
evaluated under another.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels
from .config import GatelabError, ModelConfig, Routing
from .blocks import BlockGate, block_routed_attention
from .routing import BilinearGate, RandomMaskCache, routed_attention


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.n_head, self.layer = cfg.n_head, layer
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.gate = (BilinearGate(cfg.d_model, cfg.n_head, cfg.d_gate, cfg.gate_init_std,
                                  trainable=cfg.gate == "learned") if cfg.gate != "none" else None)
        self.block_gate = (BlockGate(cfg.d_model, cfg.n_head, cfg.d_gate, cfg.block_pool, cfg.gate_init_std,
                                     trainable=cfg.block_gate == "learned") if cfg.block_gate != "none" else None)
        self.random_masks: RandomMaskCache | None = None  # shared across layers, set by GPT

    def qkv_heads(self, x: torch.Tensor):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        return [t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v)]

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv_heads(x)
        if routing.is_block:  # block routings (blocks.py)
            block_scores = (lambda: self.block_gate(x, routing.block_size)) if self.block_gate is not None else None
            y = block_routed_attention(q, k, v, routing, gate_scores=block_scores, layer=self.layer)
            return self.proj(y.transpose(1, 2).reshape(B, T, C))
        gate_scores = (lambda: self.gate(x)) if self.gate is not None else None
        gate_factors = (lambda: self.gate.factors(x, scaled=True)) if self.gate is not None else None
        y = routed_attention(q, k, v, routing, gate_scores=gate_scores, layer=self.layer,
                             random_masks=self.random_masks, gate_factors=gate_factors)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_mlp)
        self.proj = nn.Linear(cfg.d_mlp, cfg.d_model)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg, layer)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x, routing: Routing):
        x = x + self.attn(self.ln1(x), routing)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.context, cfg.d_model)
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.random_masks = RandomMaskCache()
        for b in self.blocks:
            b.attn.random_masks = self.random_masks
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):  # GPT-2's scaled init of residual projections
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        for b in self.blocks:
            if b.attn.gate is not None:
                b.attn.gate.reset_parameters()
        for b in self.blocks:
            if b.attn.block_gate is not None:
                b.attn.block_gate.reset_parameters()

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    # ------------------------------------------------------------------------------------------------------
    def gates(self) -> list[BilinearGate]:
        return [b.attn.gate for b in self.blocks if b.attn.gate is not None]

    def block_gates(self) -> list[BlockGate]:
        return [b.attn.block_gate for b in self.blocks if b.attn.block_gate is not None]

    def gate_parameters(self) -> list[nn.Parameter]:
        """The parameters of every gate, token and block gates alike."""
        return [p for g in self.gates() + self.block_gates() for p in g.parameters()]

    def num_params(self, gates: bool = False) -> int:
        gate_ids = {id(p) for p in self.gate_parameters()}
        return sum(p.numel() for p in self.parameters() if (id(p) in gate_ids) == gates)

    def hidden(self, idx: torch.Tensor, routing: Routing | None = None) -> torch.Tensor:
        """Final normed hidden states (B, T, C)."""
        routing = routing or Routing()
        B, T = idx.shape
        if T > self.cfg.context:
            raise GatelabError(f"sequence length {T} exceeds the model's context {self.cfg.context}")
        pos = torch.arange(T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x, routing)
        return self.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, routing: Routing | None = None,
                reduction: str = "mean", fused_loss: bool = False):
        """Returns (logits, loss); loss is None without targets. Logits are computed in the autocast dtype.

        fused_loss: compute the loss with `linear_cross_entropy` (chunked, never holding the full logits) and
        return (None, loss); training uses it by default (TrainConfig.fused_loss).
        """
        h = self.hidden(idx, routing)
        if fused_loss and targets is not None:
            return None, linear_cross_entropy(h.view(-1, h.size(-1)), self.lm_head.weight, targets.reshape(-1),
                                              reduction=reduction)
        logits = self.lm_head(h)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                   reduction=reduction)
        return logits, loss


# ----------------------------------------------------------------------------------------------------------
# The output head and its loss, fused: the 50K-vocabulary logits of a batch are the largest tensor of a training
# step (16 x 512 x 50,257 in fp32 is 1.6 GB, plus as much again for their gradient). Computed in row chunks, with
# the gradient of each chunk formed at once, only one chunk's logits ever exist.

class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk_rows: int, reduction: str, vocab_multiple: int = 1):
        V = weight.shape[0]
        w = weight.to(h.dtype)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        scale = 1.0 / h.shape[0] if reduction == "mean" else 1.0
        ctx.scale = scale
        if LOSS_KERNEL == "triton" and kernels.fused_head_fits(h, w):
            # kernels.fused_head_loss: no logits in memory, one opaque operator to torch.compile
            total, grad_h, grad_w = kernels.fused_head_loss(h, w, targets, chunk_rows, want_h, want_w)
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
                grad_w * factor if grad_w is not None else None, None, None, None, None)


LOSS_CHUNK_ROWS = 2048  # rows of logits formed at once (benchmarks/bench_train.py times other sizes)
# Pad the vocabulary of the fused loss's matrix products to a multiple of this (1: no padding). The GPT-2
# vocabulary (50,257, odd) leaves every logits row unaligned: in the H100 profile of the dense step
# (benchmarks/results/profile-*.txt) the logits product ran an sm80 cutlass kernel (0.46 ms a step) where the
# aligned gradient products ran Hopper kernels, and the log-sum-exp/gradient reduction over the unaligned rows
# took 1.41 ms a step, the largest single part of the head. Same math (tests/test_fast.py). Timed beside the
# unpadded loss on the H100 (benchmarks/results/nvidia-h100-80gb-hbm3-batch16-opt-in.md): 6.27 vs 6.31 ms a dense
# step, a 0.6% gain (within the run-to-run spread of the step) with the gradient check passing, so 64 is the default
# by the rule in benchmarks/README.md ("Opt-in paths, timed"); GATELAB_LOSS_VOCAB_MULTIPLE=1 turns it off.
LOSS_VOCAB_MULTIPLE = int(os.environ.get("GATELAB_LOSS_VOCAB_MULTIPLE", "64"))
# "torch" (the chunked products above) or "triton" (kernels.fused_head_loss: the logits formed tile by tile and
# never stored, on CUDA for 16-bit inputs; GATELAB_LOSS_KERNEL=triton). Timed on the H100 beside the default
# (benchmarks/results/nvidia-h100-80gb-hbm3-batch16-opt-in.md): 7.89 vs 6.10 ms a dense step, so "torch" stays.
LOSS_KERNEL = os.environ.get("GATELAB_LOSS_KERNEL", "torch")


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reduction: str = "mean",
                         chunk_rows: int | None = None, vocab_multiple: int | None = None) -> torch.Tensor:
    """cross_entropy(h @ weight.T, targets) without materialising the logits: h (N, C), weight (V, C).

    Matches `F.cross_entropy(F.linear(h, weight).float(), targets)` under the same autocast: the matrix products
    run in the autocast dtype (bf16 on GPU), softmax and log-sum-exp in fp32. The gradients are formed during the
    forward pass, chunk by chunk, and scaled by the incoming gradient in backward.
    """
    if reduction not in ("mean", "sum"):
        raise GatelabError(f"linear_cross_entropy: reduction must be mean or sum, got {reduction!r}")
    vocab_multiple = vocab_multiple or LOSS_VOCAB_MULTIPLE
    if vocab_multiple < 1:
        raise GatelabError(f"linear_cross_entropy: vocab_multiple must be >= 1, got {vocab_multiple}")
    dev = h.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
    with torch.autocast(dev, enabled=False):
        return _LinearCrossEntropy.apply(h.to(dtype), weight, targets, chunk_rows or LOSS_CHUNK_ROWS, reduction,
                                         vocab_multiple)
