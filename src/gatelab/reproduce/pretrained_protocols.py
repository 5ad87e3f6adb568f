"""The pretrained suite's protocols (model sizes, steps, k values per run length) and the paper's numbers."""
from __future__ import annotations

from dataclasses import dataclass

from gatelab.attention.position_gates import POSITIONS
from gatelab.config import DEFAULT_READING

PAPER = {  # Qwen3-1.7B, the paper's numbers (docs/method.md)
    "table9": {64: (11.57, 11.52), 128: (11.53, 11.52), 256: (11.52, 11.52)},  # oracle, dense
    "table6": {"kl": {64: 12.24, 128: 11.72, 256: 11.56}, "bce": {64: 102.82, 128: 25.76, 256: 20.78}},
    "table7": {"none": 8.70, "learned": 8.80, "random": 8.80, "dense (not fine-tuned)": 10.85},
    "table8": {0: (10.71, 42.26), 2: (10.13, 23.07), 4: (10.03, 21.04), 8: (10.48, 17.40)},
}


@dataclass
class PretrainedProtocol:
    name: str
    posthoc_steps: int  # Table 6 (the paper's post-hoc gates: 1,000 steps on the 31M model)
    task_steps: int  # Tables 7-8 (paper: 5,000)
    batch_size: int = 8
    context: int = 512
    k: int = 64
    ks: tuple = (64, 128, 256)
    d_gates: tuple = (32, 64, 128)
    unfreeze: tuple = (0, 2, 4, 8)
    gate_lr: float = 1e-3
    model_lr: float = 3e-5  # unfrozen Q/K/V/O of a pretrained model: a fine-tuning rate
    eval_tokens: int = 0  # 0 = the whole validation split
    f1_batches: int = 4
    # the gate-variant study and Table 6 of a variant: trained until the held-out objective stops improving
    positions: tuple = POSITIONS
    position_d_gates: tuple = (32, 64)
    converge_max_steps: int = 800  # cap (the learning-rate schedule runs over it); --max-steps overrides it
    eval_every: int = 50  # held-out objective every this many steps ...
    patience: int = 4  # ... stop after this many evaluations without a relative improvement of min_delta
    min_delta: float = 0.002
    eval_batches: int = 2  # held-out windows: the last eval_batches x batch_size windows of the training split
    note: str = ""


PROTOCOLS = {
    "compact": PretrainedProtocol("compact", posthoc_steps=500, task_steps=500,
                                  note="SmolLM2-135M on the bundled corpus; fewer steps than the paper's 5,000 "
                                       "(the loss curves in units/*/metrics.jsonl say whether they converged)."),
    "smoke": PretrainedProtocol("smoke", posthoc_steps=3, task_steps=3, batch_size=2, context=32, k=4, ks=(4, 8),
                                d_gates=(4, 8), unfreeze=(0, 1), eval_tokens=256, f1_batches=1,
                                position_d_gates=(4,), converge_max_steps=8, eval_every=2, patience=2,
                                eval_batches=1,
                                note="a tiny random model on CPU: checks the pipeline, not the science"),
}


def _reading_tag(reading: str) -> str:
    """Unit-name suffix of a soft-gate reading: none for the default reading (config.DEFAULT_READING), the reading's
    name for every other one."""
    return "" if reading == DEFAULT_READING else f"-{reading}"
