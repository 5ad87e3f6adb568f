"""Post-hoc gates: train only fresh gate projections on a frozen model, save and attach them.

Objectives (docs/method.md, "Losses"; paper sections 3.3 and 4.2-4.3), per layer, head and query row over causal keys:
  kl   KL(A || softmax(G)), A the frozen model's dense attention weights, averaged over rows and layers
  bce  binary cross-entropy of G (as logits) against the oracle top-k mask of S
  lm   ("task") the language-model loss through the soft gate, model frozen (the paper's Table 5)
Distillation is a training run (train.py) with objective kl/bce/lm, init_from the base checkpoint and
freeze_model=True, so it checkpoints, resumes and skips like any run. A finished run also exports the
gate alone: RUN/gate.safetensors + RUN/gate.json (base checkpoint, its sha256, d_gate, k, loss).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from gatelab.attention.masks import causal_mask
from gatelab.config import (
    DEFAULT_READING, GatelabError, ModelConfig, Routing, TrainConfig, model_config_from_dict, soft_gate_routing
)
from gatelab.data import TokenData, check_same_data
from gatelab.diagnostics.probes import attention_logits, gate_f1, layer_inputs
from gatelab.kernels.topk import topk_keep_mask
from gatelab.training.checkpoint import find_checkpoint, read_trainer


def kl_rows(S: torch.Tensor, G: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(softmax(S) || softmax(G)), both over causal keys only."""
    log_a = torch.log_softmax(S.masked_fill(~causal, float("-inf")), dim=-1)
    log_p = torch.log_softmax(G.masked_fill(~causal, float("-inf")), dim=-1)
    terms = torch.where(causal, log_a.exp() * (log_a - log_p), torch.zeros((), device=S.device))
    return terms.sum(-1).mean()


def bce_oracle(S: torch.Tensor, G: torch.Tensor, causal: torch.Tensor, k: int) -> torch.Tensor:
    """BCE of G as logits against the oracle top-k mask of S, averaged over causal entries."""
    target = topk_keep_mask(S, k, causal).float()
    full = causal.expand_as(G)
    return F.binary_cross_entropy_with_logits(G[full], target[full])


def gate_objective(layers, objective: str, k: int) -> tuple[torch.Tensor, float]:
    """The kl or bce objective and the gate F1 at k, each averaged over layers; `layers` yields
    (S, G, allowed) per layer. Shared by gatelab's GPT and the Hugging Face adapter."""
    total, f1s = 0.0, []
    for S, G, allowed in layers:
        total = total + (kl_rows(S, G, allowed) if objective == "kl" else bce_oracle(S, G, allowed, k))
        f1s.append(float(gate_f1(S, G.detach(), allowed, k)))
    return total / len(f1s), sum(f1s) / len(f1s)


def distill_loss(model, x: torch.Tensor, objective: str, k: int) -> tuple[torch.Tensor, float]:
    """The kl or bce objective of the model's gates on batch x, and their F1 at k."""
    causal = causal_mask(x.shape[1], x.device)
    return gate_objective(((attention_logits(b.attn, xn), b.attn.gate(xn).float(), causal)
                           for b, xn in zip(model.blocks, layer_inputs(model, x))), objective, k)


def distill_config(base_checkpoint: str | Path, loss: str, k: int = 64, d_gate: int = 32, steps: int = 1000,
                   batch_size: int = 16, lr: float = 1e-3, seed: int = 0, random_control: bool = False,
                   data: str | None = None, overrides: dict | None = None, reading: str | None = None,
                   block: Routing | None = None, block_pool: str = "mean",
                   allow_other_data: bool = False) -> TrainConfig:
    """A TrainConfig that trains fresh gates on the frozen base checkpoint.

    loss: kl | bce | task. `random_control` (task only) freezes the gate too: the frozen random gate of the
    same initialisation, evaluated as the control (nothing trains, so steps is 0). reading (task only): the
    soft-gate reading trained through (config.READINGS; default config.DEFAULT_READING). block: a block routing
    (block_size, block_k): train a block gate (pooling `block_pool`) against the pooled attention mass instead.
    The data must be what the base checkpoint was trained on (its recorded fingerprint), unless allow_other_data."""
    found = find_checkpoint(base_checkpoint)
    if found is None:
        raise GatelabError(f"base checkpoint {base_checkpoint} does not exist or is not a gatelab checkpoint")
    trainer = read_trainer(found)
    mcfg: ModelConfig = model_config_from_dict(trainer["config"]["model"])
    mcfg.gate, mcfg.d_gate = ("random" if random_control else "learned"), d_gate
    if loss not in ("kl", "bce", "task"):
        raise GatelabError(f"--loss must be kl, bce or task, got {loss!r}")
    if random_control and loss != "task":
        raise GatelabError("--random-control applies to --loss task (a frozen random gate through the soft gate)")
    objective = "lm" if loss == "task" else loss
    if reading is not None and loss != "task":
        raise GatelabError("--reading applies to --loss task (the soft gate the task loss trains through)")
    routing = (soft_gate_routing(reading or DEFAULT_READING, k) if loss == "task"
               else Routing(mode="gate-topk", k=k))
    if block is not None:
        if loss == "task" or random_control:
            raise GatelabError("block gates distil with --loss kl or bce")
        mcfg.gate, mcfg.block_gate, mcfg.block_pool = "none", "learned", block_pool
        mcfg.validate()
        routing = Routing(mode="block-gate", block_size=block.block_size, block_k=block.block_k)
    routing.validate(mcfg.context)
    data = data or trainer["config"]["data"]
    check_same_data(trainer.get("data_fingerprint"), TokenData(data, "train"), f"base checkpoint {base_checkpoint}",
                    allow_other_data)
    cfg = TrainConfig(model=mcfg, routing=routing, data=data, steps=steps,
                      batch_size=batch_size, lr=lr, min_lr=lr / 10, warmup_steps=min(50, max(1, steps // 10)),
                      weight_decay=0.0, seed=seed, eval_every=0, checkpoint_every=max(1, min(250, steps)),
                      objective=objective, init_from=str(Path(base_checkpoint)), freeze_model=True)
    for key, val in (overrides or {}).items():
        setattr(cfg, key, val)
    return cfg
