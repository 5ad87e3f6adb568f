"""Training: AdamW, linear warm-up then cosine decay, clipping, periodic validation, exact resume.

A run lives in one directory:
  config.json      the full TrainConfig
  metrics.jsonl    one JSON record per log / eval event
  checkpoint/      the latest checkpoint (see checkpoint.py); a run resumes from it bit-for-bit
  done.json        written last; a finished run is skipped when started again
Batches are a pure function of (seed, step), and RNG states are checkpointed, so a run killed at any
moment and resumed reproduces the uninterrupted run's losses exactly (on the same device).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch.nn.parallel import DistributedDataParallel

from gatelab.diagnostics.gate_sharpness import soft_gate_statistics
from gatelab.config import GatelabError, TrainConfig, atomic_path, same_run, to_dict, write_json
from gatelab.data import TokenData, check_same_data
from gatelab.devices import autocast_for
from gatelab.diagnostics.evaluate import perplexity
from gatelab.model import GPT
from gatelab.progress import progress_bar
from gatelab.training import distributed
from gatelab.training.block_distill import block_distill_loss
from gatelab.training.checkpoint import (
    OPTIM_FILE, build_model, find_checkpoint, load_optimizer, load_state, load_weights, read_trainer, rng_state,
    save_checkpoint, set_rng_state
)
from gatelab.diagnostics.probes import layer_inputs
from gatelab.training.distill import distill_loss
from gatelab.training.gate_files import export_block_gate, export_gate


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr over warmup_steps, then cosine decay to min_lr at cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over trainable parameters only (frozen gates are never touched, not even by weight decay);
    weight decay on matrices and embeddings, none on biases and norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise GatelabError("nothing to train: every parameter is frozen")
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [dict(params=decay, weight_decay=cfg.weight_decay), dict(params=no_decay, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             fused=device.type == "cuda")


def compile_mode(cfg: TrainConfig, device: torch.device, world: int = 1) -> str | None:
    """The torch.compile mode of a run, or None for eager. auto: on one GPU, "reduce-overhead" (CUDA graphs: a
    step of this small model is otherwise bound by kernel-launch overhead, benchmarks/results/); under torchrun,
    the default mode (DDP's gradient hooks do not go into CUDA graphs); on CPU, eager (compile time outweighs the
    gain for short runs)."""
    if cfg.compile is False:
        return None
    if cfg.compile == "auto":
        if device.type != "cuda":
            return None
        return "reduce-overhead" if world == 1 else "default"
    return "default" if cfg.compile is True else cfg.compile


class TrainingObjective(torch.nn.Module):
    """The training objective of one batch as a module: what DistributedDataParallel and torch.compile wrap.

    lm: the language-model loss under cfg.routing; kl / bce: gate distillation (extra metric: gate F1).
    """

    def __init__(self, model: GPT, cfg: TrainConfig):
        super().__init__()
        self.model, self.cfg = model, cfg

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        cfg = self.cfg
        if cfg.objective == "lm":
            return self.model(x, y, routing=cfg.routing, fused_loss=cfg.fused_loss)[1], {}
        if cfg.routing.is_block:  # a post-hoc block gate
            loss, f1 = block_distill_loss(self.model, x, cfg.objective, cfg.routing)
            return loss, dict(f1=f1)
        loss, f1 = distill_loss(self.model, x, cfg.objective, cfg.routing.k)
        return loss, dict(f1=f1)


def wrap_for_training(model: GPT, cfg: TrainConfig, ctx, device: torch.device):
    """The objective module, in DistributedDataParallel under torchrun, compiled where that applies."""
    objective = TrainingObjective(model, cfg)
    if ctx.world > 1:
        # trainable gates that the routing never reads (hard top-k under the LM loss) get no gradient
        unused = cfg.objective == "lm" and cfg.routing.mode not in ("soft-gate", "block-soft") and any(
            p.requires_grad for p in model.gate_parameters())
        objective = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None,
                                            find_unused_parameters=unused)
    mode = compile_mode(cfg, device, ctx.world) if cfg.objective == "lm" else None
    if mode is not None:
        objective = torch.compile(objective, mode=None if mode == "default" else mode)
    return objective, mode


def gate_stats(model: GPT, x: torch.Tensor, routing, device, dtype) -> list[dict]:
    """soft_gate_statistics of every layer's gate on batch x (TrainConfig.log_gate_stats)."""
    with autocast_for(device, dtype):
        inputs = layer_inputs(model, x, routing)
    return [dict(layer=i, **soft_gate_statistics(b.attn.gate, xn.float(), routing))
            for i, (b, xn) in enumerate(zip(model.blocks, inputs)) if b.attn.gate is not None]


class MetricsLog:
    """Append-only JSONL, flushed each line; on resume, records past the checkpoint's step are dropped."""

    def __init__(self, path: Path, keep_until_step: int | None):
        self.path = path
        if keep_until_step is None:
            path.write_text("")
        elif path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= keep_until_step]
            with atomic_path(path) as tmp:
                tmp.write_text("".join(line + "\n" for line in kept))
        self.f = open(path, "a")

    def write(self, record: dict) -> None:
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


@dataclass
class _Run:
    """A started run: what the training loop reads (set up once) and what it carries from step to step."""
    cfg: TrainConfig
    cfg_dict: dict
    out: Path
    ctx: distributed.Context
    rows: slice | None  # this rank's rows of each global batch
    train_data: TokenData
    val_data: TokenData
    model: GPT
    opt: torch.optim.AdamW
    log: MetricsLog | None  # rank 0 only
    objective: torch.nn.Module  # wrap_for_training's
    graphs: bool  # compiled into CUDA graphs
    bar: object  # progress_bar's
    step: int  # steps done
    t_last: float  # when throughput was last logged
    steps_since: int = 0  # steps since then
    last_val: float | None = None  # the last validation perplexity
    nonfinite_at: torch.Tensor | None = None  # the first step whose loss was not finite (-1: none), on the device

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoint"


class _Step(NamedTuple):
    """What one training step leaves for the log."""
    loss: torch.Tensor
    extra: dict
    grad_norm: torch.Tensor
    lr: float
    x: torch.Tensor


def _finished(out: Path, cfg_dict: dict, resume: str) -> dict | None:
    """The summary of the run already finished in out (marked skipped), or None to train."""
    done = out / "done.json"
    if done.is_file() and resume != "never":
        summary = json.loads(done.read_text())
        if not same_run(summary.get("config", {}), cfg_dict):
            raise GatelabError(f"{out} holds a finished run with another config; choose another --out")
        return dict(summary, skipped=True)
    return None


def _checked_inputs(cfg: TrainConfig) -> tuple[TokenData, TokenData]:
    """The training and validation data, once everything the user gave is checked (before the run directory is
    made)."""
    train_data = TokenData(cfg.data, "train", fraction=cfg.train_fraction)
    val_data = TokenData(cfg.data, "validation")
    train_data.check_trainable(cfg.model.context)
    val_data.check_trainable(cfg.model.context)
    if train_data.vocab_size > cfg.model.vocab_size:
        raise GatelabError(f"the corpus's tokenizer has {train_data.vocab_size} tokens but model.vocab_size is "
                           f"{cfg.model.vocab_size}")
    if cfg.init_from and find_checkpoint(cfg.init_from) is None:
        raise GatelabError(f"init_from: {cfg.init_from} is not a gatelab checkpoint")
    return train_data, val_data


def _checkpoint_to_resume(out: Path, resume: str) -> Path | None:
    found = find_checkpoint(out / "checkpoint") if resume != "never" else None
    if resume == "require" and found is None:
        raise GatelabError(f"--resume: {out} has no checkpoint to resume from")
    return found


def _resume(found: Path, out: Path, cfg_dict: dict, train_data: TokenData, model: GPT,
            opt: torch.optim.AdamW) -> int:
    """Load the checkpoint's weights, optimizer state and RNG states; the step it was saved at."""
    trainer = read_trainer(found)
    if not same_run(trainer["config"], cfg_dict):
        raise GatelabError(f"{out} holds a run with another config; resume it with the same config, "
                           f"or choose another --out")
    check_same_data(trainer.get("data_fingerprint"), train_data, f"the checkpoint in {out}")
    load_weights(model, load_state(found), str(found))
    load_optimizer(opt, load_state(found, OPTIM_FILE), trainer["optimizer"])
    set_rng_state(trainer["rng"])
    return trainer["step"]


def _start(cfg: TrainConfig, out: Path, cfg_dict: dict, resume: str, progress: bool, model: GPT | None) -> _Run:
    """Check the inputs, make the run directory, build (or resume) the model and optimizer, open the log."""
    train_data, val_data = _checked_inputs(cfg)
    found = _checkpoint_to_resume(out, resume)
    ctx = distributed.setup(cfg.device)
    device = ctx.device
    rows = ctx.rows(cfg.batch_size)
    model = model.to(device) if model is not None else build_model(cfg, device)
    opt = make_optimizer(model, cfg, device)
    out.mkdir(parents=True, exist_ok=True)
    step = _resume(found, out, cfg_dict, train_data, model, opt) if found is not None else 0
    log = None
    if ctx.main:
        write_json(out / "config.json", cfg_dict)
        log = MetricsLog(out / "metrics.jsonl", keep_until_step=step if found is not None else None)
    objective, mode = wrap_for_training(model, cfg, ctx, device)
    bar = progress_bar(total=cfg.steps, initial=step, desc=f"train {out.name}" + (f" x{ctx.world}" if ctx.world > 1
                       else ""), unit="step", disable=not (progress and ctx.main))
    graphs = mode is not None and "reduce-overhead" in mode
    return _Run(cfg=cfg, cfg_dict=cfg_dict, out=out, ctx=ctx, rows=rows, train_data=train_data, val_data=val_data,
                model=model, opt=opt, log=log, objective=objective, graphs=graphs, bar=bar, step=step,
                t_last=time.perf_counter(), nonfinite_at=torch.tensor(-1, device=device))


def _train_step(run: _Run) -> _Step:
    """One optimizer step at run.step: learning rate, batch, forward, backward, clipped update."""
    cfg, device = run.cfg, run.device
    lr = lr_at(run.step, cfg)
    for group in run.opt.param_groups:
        group["lr"] = lr
    x, y = run.train_data.batch(run.step, cfg.batch_size, cfg.model.context, cfg.seed, run.rows)
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    if run.ctx.world > 1:  # per-rank randomness (stochastic routing) that a resume on the same N reproduces
        torch.manual_seed(cfg.seed * 1_000_003 + run.step * 7919 + run.ctx.rank)
    if run.graphs:  # a new iteration: CUDA-graph outputs of the last one may be overwritten
        torch.compiler.cudagraph_mark_step_begin()
    with autocast_for(device, cfg.dtype):
        loss, extra = run.objective(x, y)
    # The first step with a non-finite loss, tracked on the device (no host sync per step) and checked
    # before every log and checkpoint, so a bad state is never saved.
    run.nonfinite_at = torch.where((run.nonfinite_at < 0) & ~torch.isfinite(loss.detach()), run.step,
                                   run.nonfinite_at)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_([p for p in run.model.parameters() if p.requires_grad],
                                               cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    run.opt.step()
    run.step += 1
    run.steps_since += 1
    return _Step(loss, extra, grad_norm, lr, x)


def _stop_if_nonfinite(run: _Run) -> None:
    """Raise if any rank's loss was not finite at a step so far (the last good checkpoint stays)."""
    cfg = run.cfg
    first_bad = int(run.ctx.min(torch.where(run.nonfinite_at >= 0, run.nonfinite_at, cfg.steps + 1)))
    if first_bad <= cfg.steps:
        kept = find_checkpoint(run.ckpt_dir)
        where = (f"the last good checkpoint (step {read_trainer(kept)['step']}) is kept in {kept}"
                 if kept else "no checkpoint had been written yet")
        run.bar.update(1)  # the bar shows this step, as metrics.jsonl would: steps count from 1
        raise GatelabError(f"non-finite loss at step {first_bad + 1} of {cfg.steps}; stopping: {where}")


def _log_step(run: _Run, last: _Step) -> None:
    """The step's metrics.jsonl record (loss over ranks, learning rate, gradient norm, throughput) and the bar."""
    cfg = run.cfg
    loss_v = run.ctx.mean(last.loss).item()
    now = time.perf_counter()
    tokens_per_step = cfg.batch_size * cfg.model.context
    tok_s = run.steps_since * tokens_per_step / max(now - run.t_last, 1e-9)
    run.t_last, run.steps_since = now, 0
    extra = last.extra
    if cfg.log_gate_stats and run.model.gates():
        extra = dict(extra, gate_stats=gate_stats(run.model, last.x[:2], cfg.routing, run.device, cfg.dtype))
    if run.ctx.main:
        run.log.write(dict(step=run.step, loss=loss_v, lr=last.lr, grad_norm=float(last.grad_norm),
                           tokens_per_s=tok_s, **extra))
    shown = dict(ppl=f"{math.exp(min(loss_v, 50)):.1f}") if cfg.objective == "lm" else \
        {k: f"{v:.3f}" for k, v in extra.items() if isinstance(v, float)}  # kl/bce: no perplexity
    run.bar.set_postfix(loss=f"{loss_v:.3f}", **shown, tok_s=f"{tok_s:,.0f}", refresh=False)


def _evaluate(run: _Run) -> None:
    """Validation perplexity, logged (rank 0)."""
    cfg = run.cfg
    res = perplexity(run.model, run.val_data, cfg.routing, cfg.batch_size, cfg.eval_tokens, cfg.dtype)
    run.last_val = res["ppl"]
    run.log.write(dict(step=run.step, val_loss=res["nll"], val_ppl=res["ppl"], val_tokens=res["tokens"]))
    run.bar.write(f"step {run.step}: validation ppl {res['ppl']:.2f} ({cfg.routing.label()})")


def _save(run: _Run) -> None:
    """The checkpoint after run.step (rank 0): weights, optimizer, RNG states and data position."""
    cfg = run.cfg
    save_checkpoint(run.ckpt_dir, run.model, dict(config=run.cfg_dict, step=run.step, rng=rng_state(),
                                                  data_position=dict(seed=cfg.seed, next_step=run.step),
                                                  data_fingerprint=run.train_data.fingerprint), run.opt)


def _finish(run: _Run) -> dict:
    """The run's summary; rank 0 exports a trained gate of a frozen model and writes done.json."""
    cfg, ctx, model, out = run.cfg, run.ctx, run.model, run.out
    summary = dict(config=run.cfg_dict, steps=run.step, final_val_ppl=run.last_val, device=str(run.device),
                   params=model.num_params(), gate_params=model.num_params(gates=True), world_size=ctx.world,
                   data_fingerprint=run.train_data.fingerprint)
    if not ctx.main:
        ctx.barrier()
        return summary
    if cfg.freeze_model and model.gates():
        export_gate(model, cfg, out)
        summary["gate"] = str(out / "gate.json")
    elif cfg.freeze_model and model.block_gates():
        export_block_gate(model, cfg, out)
        summary["gate"] = str(out / "gate.json")
    write_json(out / "done.json", summary)
    ctx.barrier()
    return summary


def train(cfg: TrainConfig, out_dir: str | Path, resume: str = "auto", progress: bool = True,
          stop_after: int | None = None, model: GPT | None = None) -> dict:
    """Train (or resume, or skip if finished) the run in out_dir. Returns the final summary.

    resume: "auto" continues from a checkpoint when there is one; "require" fails without one;
    "never" starts over. `stop_after` ends the process early after that many steps (for tests).
    `model` lets a caller supply a prepared model (e.g. with some parameters frozen).
    """
    cfg.validate()
    out = Path(out_dir)
    cfg_dict = to_dict(cfg)
    finished = _finished(out, cfg_dict, resume)
    if finished is not None:
        return finished
    run = _start(cfg, out, cfg_dict, resume, progress, model)
    try:
        while run.step < cfg.steps:
            last = _train_step(run)
            step = run.step
            will_log = step % cfg.log_every == 0 or step == cfg.steps
            will_save = step % cfg.checkpoint_every == 0 or step == cfg.steps
            will_eval = bool(cfg.eval_every) and (step % cfg.eval_every == 0 or step == cfg.steps)
            if will_log or will_save or will_eval:
                _stop_if_nonfinite(run)
            if will_log:
                _log_step(run, last)
            if will_eval and run.ctx.main:
                _evaluate(run)
            if will_save and run.ctx.main:
                _save(run)
            run.bar.update(1)
            if will_save or will_eval:
                run.ctx.barrier()  # the other ranks wait for rank 0's evaluation and checkpoint
            if stop_after is not None and step >= stop_after and step < cfg.steps:
                return dict(stopped_at=step)
    finally:
        run.bar.close()
        if run.ctx.main:
            run.log.close()
    return _finish(run)
