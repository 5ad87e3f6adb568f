"""The paper's pre-norm GPT (section 2.2) with a bilinear gate per layer and head.

6 layers, d_model 256, 4 heads, MLP 1024 with GELU, LayerNorm, learned absolute positions, context 512,
GPT-2 vocabulary, untied input and output embeddings: 30.6M parameters, plus 393,216 gate parameters at
d_gate 32. Routing is an argument of `forward`, so one model can be trained under one routing and
evaluated under another.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gatelab.attention.attend import GateScores, attend
from gatelab.attention.backend import Backend, default_backend
from gatelab.attention.gates import BilinearGate, BlockGate
from gatelab.attention.hard import RandomMaskCache
from gatelab.config import GatelabError, ModelConfig, Routing
from gatelab.kernels.head_loss import linear_cross_entropy


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

    def gate_for(self, x: torch.Tensor, routing: Routing, backend: Backend) -> GateScores | None:
        """This layer's gate on input x, for attend: the block gate under block routings, else the token gate."""
        if routing.is_block:
            g = self.block_gate
            return None if g is None else GateScores(lambda: g(x, routing.block_size), lambda: g.factors(
                x, routing.block_size, kernel=backend.factors_kernel))
        g = self.gate
        return None if g is None else GateScores(lambda: g(x), lambda: g.factors(x, scaled=True))

    def forward(self, x: torch.Tensor, routing: Routing, backend: Backend) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv_heads(x)
        y = attend(q, k, v, routing, gate=self.gate_for(x, routing, backend), layer=self.layer, backend=backend,
                   random_masks=self.random_masks)
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

    def forward(self, x, routing: Routing, backend: Backend):
        x = x + self.attn(self.ln1(x), routing, backend)
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
        self.backend: Backend = default_backend()  # how attention and the loss are computed (attention/backend.py)
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
            x = block(x, routing, self.backend)
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
                                              reduction=reduction, kernel=self.backend.loss_kernel,
                                              vocab_multiple=self.backend.loss_vocab_multiple)
        logits = self.lm_head(h)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                   reduction=reduction)
        return logits, loss
