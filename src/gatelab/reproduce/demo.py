"""Experiment drivers built from resumable units (a unit = one run directory with a done.json).

`run_demo` is the README's main job: on the bundled corpus, train a small dense model and a small model
with a learned soft gate, then evaluate both under several routings and print one table.
"""
from __future__ import annotations

from pathlib import Path

import torch

from gatelab.config import ModelConfig, Routing, TrainConfig, write_json, write_text
from gatelab.data import TokenData, prepare
from gatelab.devices import resolve_device
from gatelab.diagnostics.evaluate import perplexity
from gatelab.reproduce.report.compact import format_table
from gatelab.training.checkpoint import load_model
from gatelab.training.train import train

DEMO_MODEL = dict(n_layer=2, d_model=128, n_head=4, d_mlp=512, context=128, d_gate=16)


DEMO_K = 16  # 87.5% sparsity at context 128, as k=64 is at 512


# Sized to finish in under 3 minutes on 2 CPU cores, preparing the corpus included (a step of 8 x 128 tokens takes
# about 0.5 s there: the 50,257-token output head is most of it); tests/test_user_guards.py keeps it that small.
DEMO_STEPS, DEMO_BATCH, DEMO_EVAL_TOKENS = 100, 8, 8192


def demo_config(data: str, gate: str, routing: Routing, steps: int) -> TrainConfig:
    return TrainConfig(model=ModelConfig(**DEMO_MODEL, gate=gate), routing=routing, data=data, steps=steps,
                       batch_size=DEMO_BATCH, lr=2e-3, min_lr=2e-4, warmup_steps=max(1, steps // 10),
                       eval_every=0, checkpoint_every=max(1, steps // 4), log_every=10, seed=0)


def run_demo(out: str | Path = "runs/demo", steps: int = DEMO_STEPS, progress: bool = True,
             eval_tokens: int = DEMO_EVAL_TOKENS) -> str:
    out = Path(out)
    data = "data/prepared/bundled"
    prepare("bundled", data, progress=progress)
    soft = Routing(mode="soft-gate", k=DEMO_K)
    units = {
        "dense": demo_config(data, "none", Routing(), steps),
        "soft-gate-learned": demo_config(data, "learned", soft, steps),
    }
    for name, cfg in units.items():
        train(cfg, out / name, progress=progress)
    device = resolve_device()
    val = TokenData(data, "validation")
    evals = [Routing(), Routing(mode="oracle-topk", k=DEMO_K), Routing(mode="random-topk", k=DEMO_K),
             soft, Routing(mode="gate-topk", k=DEMO_K)]
    rows = []
    for name in units:
        model, _ = load_model(out / name / "checkpoint", device=device)
        for routing in evals:
            if routing.needs_gate and not model.gates():
                continue
            torch.manual_seed(0)
            res = perplexity(model, val, routing, batch_size=16, max_tokens=eval_tokens, progress=progress,
                             desc=f"{name}: {routing.label()}")
            rows.append(dict(model=name, routing=routing.label(), val_ppl=res["ppl"], tokens=res["tokens"]))
    table = format_table(rows, ["model", "routing", "val_ppl", "tokens"])
    header = (f"gatelab demo: {steps} steps per model on the bundled corpus, model {DEMO_MODEL}, k={DEMO_K}, "
              f"device {device}; perplexity over the first {rows[0]['tokens']:,} validation tokens\n\n")
    write_json(out / "results.json", dict(steps=steps, model=DEMO_MODEL, k=DEMO_K, device=str(device), rows=rows))
    write_text(out / "results.md", header + table + "\n")
    return header + table
