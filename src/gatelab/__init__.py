"""gatelab: learned sparse-attention routing, and whether it beats a random one.

Reproduces "Routing Absorption in Sparse Attention: Why Random Gates Are Hard to Beat" (arXiv 2603.02227).
Start reading at `attention/attend.py` (every routing mode, one entry point), then `model.py` (the paper's GPT).

    from gatelab import GPT, ModelConfig, Routing, attend
    model = GPT(ModelConfig(gate="learned"))
    logits, _ = model(idx, routing=Routing(mode="gate-topk", k=64))

The names below are imported on first use, so that `import gatelab` (and the command line's `--help`) stays light.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "GPT": "gatelab.model",
    "ModelConfig": "gatelab.config", "Routing": "gatelab.config", "TrainConfig": "gatelab.config",
    "GatelabError": "gatelab.config",
    "attend": "gatelab.attention.attend", "GateScores": "gatelab.attention.attend",
    "Backend": "gatelab.attention.backend",
    "train": "gatelab.training.train",
    "distill_config": "gatelab.training.distill", "attach_gate": "gatelab.training.gate_files",
    "load_model": "gatelab.training.checkpoint",
    "perplexity": "gatelab.diagnostics.evaluate", "analyze": "gatelab.diagnostics.analyze",
    "audit": "gatelab.diagnostics.analyze",
    "attach_gates": "gatelab.hf.adapter", "attach_block_gates": "gatelab.hf.adapter",
    "load_gates": "gatelab.hf.gate_files", "load_pretrained": "gatelab.hf.gate_files",
    "train_gates": "gatelab.hf.distill",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'gatelab' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
