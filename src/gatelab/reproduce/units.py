"""What each kind of unit runs: training, distillation (token and block gates), evaluation, analysis."""
from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from gatelab.config import ModelConfig, Routing, TrainConfig, to_dict
from gatelab.data import TokenData
from gatelab.devices import resolve_device
from gatelab.diagnostics.analyze import analyze, attention_statistics, ensure_gate, validation_batches
from gatelab.diagnostics.evaluate import perplexity
from gatelab.model import GPT
from gatelab.training.block_distill import block_distill_loss
from gatelab.training.checkpoint import load_model
from gatelab.training.distill import distill_config
from gatelab.training.gate_files import attach_gate, export_random_control
from gatelab.training.train import train

if TYPE_CHECKING:  # annotations only: the suite imports this module
    from gatelab.reproduce.suite import Suite, Unit


def utc_now() -> str:
    """The time now, ISO 8601 UTC to the second (units' `finished_at`, compared with criteria.Rule.written)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _device_name(device: str) -> str:
    dev = resolve_device(device)
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


def _copy(src: Path, dst_dir: Path) -> None:
    if src.is_file():
        dst_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst_dir / src.name)


def _evaluate(suite: Suite, model, routings: list[Routing]) -> dict:
    data = TokenData(suite.p.data, "validation")
    out = {}
    for r in routings:
        torch.manual_seed(0)
        res = perplexity(model, data, r, batch_size=16, max_tokens=suite.p.eval_tokens)
        key = r.label() + (f"#seed{r.seed}" if r.mode == "random-topk" and r.seed else "")
        out[key] = res["ppl"]
    return out


def _curve(metrics: Path, key: str = "val_ppl") -> list:
    if not metrics.is_file():
        return []
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [(r["step"], r[key]) for r in rows if key in r]


def _median_tokens_per_s(metrics: Path) -> float | None:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    vals = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][2:]
    return statistics.median(vals) if vals else None


def run_train(suite: Suite, unit: Unit) -> dict:
    ckpt = suite.checkpoint(unit.name)
    run_dir = ckpt.parent
    for f in ("metrics.jsonl", "done.json"):
        _copy(run_dir / f, suite.unit_dir(unit.name))
    model, _ = load_model(ckpt, device=resolve_device(suite.device))
    cfg: TrainConfig = unit.params["cfg"]
    return dict(kind="train", config=to_dict(cfg), evals=_evaluate(suite, model, unit.params["evals"]),
                curve=_curve(run_dir / "metrics.jsonl"), tokens_per_s=_median_tokens_per_s(run_dir / "metrics.jsonl"),
                max_grad_norm=max((g for _, g in _curve(run_dir / "metrics.jsonl", "grad_norm")), default=None),
                gate_params_unchanged_from_init=_gates_unchanged(model, cfg) if model.gate_parameters() else None,
                **{k: v for k, v in unit.params.items() if k not in ("cfg", "evals")})


def _gates_unchanged(model, cfg: TrainConfig) -> bool:
    torch.manual_seed(cfg.seed)
    init = GPT(cfg.model)
    return all(torch.equal(a.cpu(), b) for a, b in zip(model.gate_parameters(), init.gate_parameters()))


def run_distill(suite: Suite, unit: Unit) -> dict:
    prm = unit.params
    base = suite.checkpoint(prm["base"])
    steps = suite.p.task_steps if prm["loss"] == "task" else suite.p.distill_steps
    cfg = distill_config(base, prm["loss"], k=prm["k"], d_gate=ModelConfig(**suite.p.model).d_gate, steps=steps,
                         batch_size=suite.p.batch_size, seed=prm.get("seed", 0),
                         random_control=prm.get("random_control", False),
                         reading=prm.get("reading") if prm["loss"] == "task" else None,
                         overrides=dict(device=suite.device, eval_tokens=suite.p.eval_tokens,
                                        eval_every=suite.p.task_eval_every if prm["loss"] == "task" else 0))
    run_dir = suite.runs / unit.name
    device = resolve_device(suite.device)
    if prm.get("random_control"):
        export_random_control(cfg, run_dir, device)
    else:
        train(cfg, run_dir, progress=suite.progress)
    for f in ("metrics.jsonl", "done.json", "gate.json"):
        _copy(run_dir / f, suite.unit_dir(unit.name))
    model, _ = load_model(base, device=device)
    attach_gate(model, run_dir, base)
    deploy = Routing(mode="gate-topk", k=prm["k"])
    routings = [cfg.routing] if prm["loss"] == "task" else [deploy]
    evals = _evaluate(suite, model, routings)
    xs, _ = validation_batches(TokenData(suite.p.data, "validation"), model.cfg.context, suite.p.analysis_batches,
                               8)
    f1 = attention_statistics(model, xs, [prm["k"]])[-1][f"gate_f1@{prm['k']}"]
    curve = _curve(run_dir / "metrics.jsonl")
    return dict(kind="distill", base=prm["base"], loss=prm["loss"], k=prm["k"], seed=prm.get("seed", 0),
                reading=prm.get("reading"),
                random_control=prm.get("random_control", False), evals=evals, val_f1=f1, curve=curve,
                train_f1=_curve(run_dir / "metrics.jsonl", "f1")[-1:] or None)


def run_eval(suite: Suite, unit: Unit) -> dict:
    """Evaluate a trained unit's checkpoint under more routings."""
    model, _ = load_model(suite.checkpoint(unit.params["base"]), device=resolve_device(suite.device))
    return dict(kind="eval", base=unit.params["base"], evals=_evaluate(suite, model, unit.params["evals"]))


def run_block_distill(suite: Suite, unit: Unit) -> dict:
    """A post-hoc block gate: distil (KL against the pooled attention mass) on the frozen base checkpoint, deploy
    it as block-gate, and measure its block F1 against the oracle's blocks on validation batches."""
    p, prm = suite.p, unit.params
    block = Routing(mode="block-gate", block_size=p.block_size, block_k=p.block_k)
    base = suite.checkpoint(prm["base"])
    cfg = distill_config(base, prm["loss"], k=p.k, d_gate=ModelConfig(**p.model).d_gate, steps=p.distill_steps,
                         batch_size=p.batch_size, block=block,
                         overrides=dict(device=suite.device, eval_tokens=p.eval_tokens, eval_every=0))
    run_dir = suite.runs / unit.name
    train(cfg, run_dir, progress=suite.progress)
    for f in ("metrics.jsonl", "done.json", "gate.json"):
        _copy(run_dir / f, suite.unit_dir(unit.name))
    device = resolve_device(suite.device)
    model, _ = load_model(base, device=device)
    attach_gate(model, run_dir, base)
    xs, _ = validation_batches(TokenData(p.data, "validation"), model.cfg.context, p.analysis_batches, 8)
    with torch.no_grad():
        f1s = [block_distill_loss(model, x.to(device), prm["loss"], block)[1] for x in xs]
    return dict(kind="block-distill", base=prm["base"], loss=prm["loss"], block_size=p.block_size, block_k=p.block_k,
                evals=_evaluate(suite, model, [block]), val_f1=sum(f1s) / len(f1s),
                train_f1=_curve(run_dir / "metrics.jsonl", "f1")[-1:] or None)


def run_analyze(suite: Suite, unit: Unit) -> dict:
    base = suite.checkpoint(unit.params["base"])
    model, _ = load_model(base, device=resolve_device(suite.device))
    note = ensure_gate(model)
    res = analyze(model, TokenData(suite.p.data, "validation"), list(suite.p.topk_ks),
                  suite.unit_dir(unit.name), batches=suite.p.analysis_batches, batch_size=8, title=unit.name,
                  gate_note=note)
    return dict(kind="analyze", base=unit.params["base"], layers=res["layers"], gate_gradients=res["gate_gradients"])
