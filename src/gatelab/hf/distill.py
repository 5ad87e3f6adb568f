"""Post-hoc gates on a frozen Hugging Face model: KL or BCE against each layer's own attention (token gates) or
its pooled attention mass (block gates), optionally until a held-out objective stops improving."""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from gatelab.attention.position_gates import gate_scores
from gatelab.config import GatelabError, Routing, TrainConfig, atomic_path, write_json
from gatelab.data import sample_windows
from gatelab.devices import autocast_for
from gatelab.diagnostics.probes import gate_f1
from gatelab.hf.gate_files import GATE_META, GATE_WEIGHTS, save_gates
from gatelab.progress import progress_bar
from gatelab.training.block_distill import block_gate_objective
from gatelab.training.distill import bce_oracle, kl_rows
from gatelab.training.train import MetricsLog, lr_at


def capture_layers(model, x: torch.Tensor) -> list[dict]:
    """One dense forward of batch x without gradient; per layer: the attention logits S, the allowed keys and what
    the layer's gate reads (hf_gates.gate_inputs)."""
    ctl = model.gatelab
    ctl.capture = []
    try:
        with torch.no_grad(), ctl.routing(Routing()):
            model(x, use_cache=False)
        return ctl.capture
    finally:
        ctl.capture = None


def captured_gate_objective(model, x: torch.Tensor, objective: str, k: int,
                            f1: bool = True) -> tuple[torch.Tensor, float | None]:
    """The kl or bce objective of the attached gates on batch x (averaged over layers), and their mean F1 at k
    (None when f1=False: it costs a top-k per layer): the gates are scored on one captured dense forward."""
    gates = model.gatelab.gates
    total, f1s = 0.0, []
    captured = capture_layers(model, x)
    if getattr(model.gatelab, "gate_type", "token") == "block":  # block gates: against each layer's pooled mass
        ctl = model.gatelab
        return block_gate_objective(((c["mass"], gates[c["layer"]](c["x"], ctl.block_size, c["valid"], q=c["q"],
                                                                   k=c["k"]).float())
                                     for c in captured), objective, k)
    for c in captured:
        S, allowed = c["S"], c["allowed"]
        G = gate_scores(gates[c["layer"]], c["inputs"]).float()
        total = total + (kl_rows(S, G, allowed) if objective == "kl" else bce_oracle(S, G, allowed, k))
        if f1:
            f1s.append(float(gate_f1(S, G.detach(), allowed, k)))
    return total / len(captured), (sum(f1s) / len(f1s) if f1 else None)


@torch.no_grad()
def captured_gate_f1(model, x: torch.Tensor, ks: list[int]) -> dict[int, list[float]]:
    """Per layer, the attached gates' F1 against the oracle top-k on batch x, for each k."""
    gates = model.gatelab.gates
    out: dict[int, list[float]] = {k: [] for k in ks}
    for c in capture_layers(model, x):
        G = gate_scores(gates[c["layer"]], c["inputs"]).float()
        for k in ks:
            out[k].append(float(gate_f1(c["S"], G, c["allowed"], k)))
    return out


def _heldout_windows(tokens, n_windows: int, context: int) -> tuple[torch.Tensor, int]:
    """The last n_windows non-overlapping (context + 1)-token windows of `tokens` (inputs and next tokens) and how
    many tokens before them remain for training."""
    n = n_windows * context + 1
    if len(tokens) - n < context + 2:
        raise GatelabError(f"{len(tokens)} tokens are too few to hold out {n_windows} windows of {context} tokens "
                           f"and still train on one")
    tail = torch.as_tensor(tokens[len(tokens) - n:], dtype=torch.long)
    win = torch.stack([tail[i * context:(i + 1) * context + 1] for i in range(n_windows)])
    return win, len(tokens) - n


@torch.no_grad()
def heldout_objective(model, windows: torch.Tensor, loss: str, k: int, batch_size: int,
                      soft: Routing) -> tuple[float, float | None]:
    """The training objective (and for kl/bce, the gates' F1 at k) averaged over held-out windows (N, context+1)."""
    ctl = model.gatelab
    device = next(model.parameters()).device
    values, f1s = [], []
    for i in range(0, len(windows), batch_size):
        w = windows[i:i + batch_size].to(device)
        x, y = w[:, :-1], w[:, 1:]
        with autocast_for(device):
            if loss == "task":
                with ctl.routing(soft if ctl.gates is not None else Routing()):
                    logits = model(x, use_cache=False).logits.float()
                values.append(float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                                      y.reshape(-1))))
            else:
                v, f = captured_gate_objective(model, x, loss, k)
                values.append(float(v))
                f1s.append(f)
    return sum(values) / len(values), (sum(f1s) / len(f1s) if f1s else None)


def _checked_soft_routing(model, loss: str, k: int, context: int, soft_routing: Routing | None, eval_every: int,
                          patience: int, min_delta: float, eval_batches: int) -> Routing:
    """Check train_gates' arguments against the model; the soft-gate routing the task loss trains through."""
    ctl = getattr(model, "gatelab", None)
    if loss not in ("kl", "bce", "task"):
        raise GatelabError(f"loss must be kl, bce or task, got {loss!r}")
    if ctl is None or (loss != "task" and (ctl.gates is None or ctl.kind != "learned")):
        raise GatelabError("train_gates needs learned gates: attach_gates(model, gate='learned') first")
    if not any(p.requires_grad for p in model.parameters()):
        raise GatelabError("nothing to train: set_trainable(model, ...) unfroze no parameter")
    if eval_every < 0 or patience < 0 or min_delta < 0 or (eval_every and eval_batches < 1):
        raise GatelabError("eval_every, patience and min_delta must be >= 0 (and eval_batches >= 1)")
    if patience and not eval_every:
        raise GatelabError("patience (stopping when the held-out objective stops improving) needs eval_every > 0")
    Routing(mode="gate-topk", k=k).validate(context)
    soft = soft_routing if soft_routing is not None else Routing(mode="soft-gate", k=k)
    if soft.mode != "soft-gate":
        raise GatelabError(f"soft_routing must be a soft-gate routing, got {soft.mode}")
    soft.validate(context)
    return soft


RUN_FILE = "run.json"  # the settings a gate run was started with; a later call into the same folder must match
RUN_FILES = ("checkpoint.pt", "done.json", "metrics.jsonl", RUN_FILE, GATE_META, GATE_WEIGHTS)


def run_settings(model, ids: list[int], **objective) -> dict:
    """What makes two train_gates calls the same run: the base model's type and shape (not its path, which may
    move), the gates attached and what trains, the training tokens, and the objective and schedule (`objective`);
    as JSON would give it back."""
    ctl, cfg = model.gatelab, model.config
    tokens = np.asarray(ids, dtype=np.int64)
    settings = dict(model_type=cfg.model_type, n_layer=getattr(cfg, "num_hidden_layers", None),
                    d_model=getattr(cfg, "hidden_size", None), vocab_size=getattr(cfg, "vocab_size", None),
                    d_gate=ctl.d_gate, position=ctl.position, **getattr(ctl, "gate_meta", {}),
                    trainable=sorted(n for n, p in model.named_parameters() if p.requires_grad),
                    tokens=len(tokens), tokens_sha256=hashlib.sha256(tokens.tobytes()).hexdigest(), **objective)
    return json.loads(json.dumps(settings))


def _check_same_run(out: Path, settings: dict) -> None:
    """Refuse a folder that holds a gate run with other settings; record the settings of a run that starts. (A run
    written before run.json existed resumes unchecked, and its folder is left as it was.)"""
    path = out / RUN_FILE
    if not path.is_file():
        if not any((out / name).is_file() for name in ("checkpoint.pt", "done.json")):
            write_json(path, settings)
        return
    saved = json.loads(path.read_text())
    differ = [k for k in sorted(saved.keys() | settings.keys()) if saved.get(k) != settings.get(k)]
    if differ:
        shown = "; ".join(f"{k}: {_short(saved.get(k))} there, {_short(settings.get(k))} here" for k in differ[:4])
        raise GatelabError(f"{out} holds a gate run with other settings ({shown}); choose another --out, or start "
                           f"over with --fresh")


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _clear_run(out: Path) -> None:
    """Remove a gate run's files from out (--fresh); other files stay."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)


def _restore_finished(model, out: Path) -> dict:
    """A finished run: restore what it trained (gates and unfrozen layers) into model; its summary, marked skipped."""
    if (out / "checkpoint.pt").is_file():
        state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(state["trainable"], strict=False)
    return dict(json.loads((out / "done.json").read_text()), skipped=True)


def _split_tokens(ids: list[int], context: int, n_heldout: int | None) -> tuple[np.ndarray, torch.Tensor | None]:
    """The tokens to train on and the n_heldout windows cut off their end (None: nothing held out)."""
    tokens = np.asarray(ids, dtype=np.int64)
    if len(tokens) < context + 2:
        raise GatelabError(f"{len(tokens)} tokens are fewer than one {context}-token window")
    heldout = None
    if n_heldout is not None:
        heldout, n_train = _heldout_windows(tokens, n_heldout, context)
        tokens = tokens[:n_train]
    return tokens, heldout


def _gate_optimizer(model, lr: float, model_lr: float | None) -> tuple[list, torch.optim.AdamW]:
    """The trainable parameters and their AdamW: the gates at lr, the unfrozen model weights at model_lr."""
    params = [p for p in model.parameters() if p.requires_grad]
    gate_ids = {id(p) for p in model.gatelab.gate_parameters()}
    groups = [dict(params=[p for p in params if id(p) in gate_ids], lr=lr),
              dict(params=[p for p in params if id(p) not in gate_ids], lr=model_lr if model_lr is not None else lr)]
    return params, torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0)


def _trainable(model) -> dict[str, torch.Tensor]:
    """A CPU copy of the trainable weights."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


@dataclass
class _GateRun:
    """A train_gates run: its settings, what the loop reads, and the state it carries (and checkpoints)."""
    model: object
    out: Path
    loss: str
    k: int
    steps: int
    batch_size: int
    context: int
    lr: float
    seed: int
    soft: Routing
    step_f1: bool
    tokens: np.ndarray  # training tokens, the held-out windows cut off
    heldout: torch.Tensor | None
    params: list  # the trainable parameters
    opt: torch.optim.AdamW
    base_lrs: list[float]  # each parameter group's peak learning rate
    sched: TrainConfig  # the learning-rate schedule (lr_at) over steps
    device: torch.device
    metrics: MetricsLog | None = None
    bar: object = None  # progress_bar's
    step: int = 0
    # stopping state: the best evaluation so far (value, step, weights), the value of the last improvement by more
    # than min_delta and the evaluations since it, whether it stopped
    best: dict | None = None
    ref: float | None = None
    bad: int = 0
    finished: bool = False
    train_s: float = 0.0  # training time up to the last checkpoint
    last_loss: float | None = None
    t0: float = 0.0  # when train_s was last brought up to date

    @property
    def ckpt(self) -> Path:
        return self.out / "checkpoint.pt"


def _resume_gates(run: _GateRun) -> None:
    """Continue from run.out/checkpoint.pt, where there is one: weights, optimizer, step and stopping state."""
    if run.ckpt.is_file():
        state = torch.load(run.ckpt, map_location="cpu", weights_only=True)
        run.model.load_state_dict(state["trainable"], strict=False)
        run.opt.load_state_dict(state["optimizer"])
        run.step = state["step"]
        run.best, run.ref, run.bad = state.get("best"), state.get("ref"), state.get("bad", 0)
        run.finished = state.get("finished", False)
        run.train_s, run.last_loss = state.get("train_s", 0.0), state.get("last_loss")


def _gate_step(run: _GateRun) -> None:
    """One optimizer step on the objective, logged to metrics.jsonl."""
    model, ctl, device = run.model, run.model.gatelab, run.device
    for g, base in zip(run.opt.param_groups, run.base_lrs):  # warm-up and cosine decay, each group from its own lr
        g["lr"] = base * lr_at(run.step, run.sched) / run.lr
    x, y = (t.to(device) for t in sample_windows(run.tokens, run.step, run.batch_size, run.context, run.seed))
    f1 = None
    with autocast_for(device):
        if run.loss == "task":  # the LM loss through the soft gate (dense where there is no gate)
            with ctl.routing(run.soft if ctl.gates is not None else Routing()):
                value = model(x, labels=None, use_cache=False).logits.float()
            value = torch.nn.functional.cross_entropy(value.reshape(-1, value.shape[-1]), y.reshape(-1))
        else:
            value, f1 = captured_gate_objective(model, x, run.loss, run.k, f1=run.step_f1)
    run.opt.zero_grad(set_to_none=True)
    value.backward()
    torch.nn.utils.clip_grad_norm_(run.params, 1.0)
    run.opt.step()
    run.step += 1
    run.last_loss = float(value.detach())
    run.metrics.write(dict(step=run.step, loss=run.last_loss, lr=run.opt.param_groups[0]["lr"],
                           **({"f1": f1} if f1 is not None else {})))
    run.bar.update(1)


def _evaluate_heldout(run: _GateRun, patience: int, min_delta: float) -> None:
    """The objective on the held-out windows, logged; it updates the best weights and the stopping rule."""
    v, vf1 = heldout_objective(run.model, run.heldout, run.loss, run.k, run.batch_size, run.soft)
    if run.best is None or v < run.best["value"]:  # the weights kept: the lowest held-out value
        run.best = dict(value=v, step=run.step, trainable=_trainable(run.model))
    if run.ref is None or v < run.ref * (1 - min_delta):  # an improvement: by more than min_delta on the last one
        run.ref, run.bad = v, 0
    else:
        run.bad += 1
    run.finished = bool(patience) and run.bad >= patience
    run.metrics.write(dict(step=run.step, val_loss=v, **({"val_f1": vf1} if vf1 is not None else {}),
                           best_step=run.best["step"]))


def _save_gate_checkpoint(run: _GateRun) -> None:
    """checkpoint.pt: the trainable weights, optimizer and stopping state, with the training time so far."""
    run.train_s += time.time() - run.t0
    run.t0 = time.time()
    with atomic_path(run.ckpt) as tmp:
        torch.save(dict(step=run.step, trainable=_trainable(run.model), optimizer=run.opt.state_dict(), best=run.best,
                        ref=run.ref, bad=run.bad, finished=run.finished, train_s=run.train_s,
                        last_loss=run.last_loss), tmp)


def _finish_gates(run: _GateRun) -> dict:
    """Save the gates (with the steps taken) and done.json; the summary."""
    best, step, steps = run.best, run.step, run.steps
    kept = {"block_k" if run.model.gatelab.gate_type == "block" else "k": run.k}  # block gates keep blocks
    summary = dict(loss=run.loss, **kept, steps=step, max_steps=steps,
                   best_step=None if best is None else best["step"],
                   best_val_loss=None if best is None else best["value"], stopped_early=step < steps,
                   train_s=round(run.train_s, 2), final_loss=run.last_loss)
    if run.model.gatelab.gates is not None:
        save_gates(run.model, run.out, extra=dict(loss=run.loss, **kept, steps=step, max_steps=steps,
                                                  best_step=summary["best_step"], seed=run.seed, context=run.context,
                                                  **({"routing": asdict(run.soft)} if run.loss == "task" else {})))
    write_json(run.out / "done.json", summary)
    return summary


def train_gates(model, ids: list[int], out_dir: str | Path, loss: str = "kl", k: int = 64, steps: int = 1000,
                batch_size: int = 8, context: int = 512, lr: float = 1e-3, seed: int = 0,
                checkpoint_every: int = 100, progress: bool = True, model_lr: float | None = None,
                soft_routing: Routing | None = None, eval_every: int = 0, patience: int = 0,
                min_delta: float = 0.0, eval_batches: int = 2, step_f1: bool = True, fresh: bool = False) -> dict:
    """Train the attached gates (and whatever else set_trainable unfroze) on windows of `ids`.

    loss: kl (KL(dense attention || softmax(G)) per row), bce (G vs the oracle top-k mask), or task (the LM
    loss through the soft gate, the paper's Tables 7-8). soft_routing: the soft gate (reading) the task loss
    trains through, the one it will be evaluated under (default: soft-gate at k, the default reading).

    Until convergence (eval_every > 0): the last eval_batches x batch_size non-overlapping windows of `ids` are
    held out (never trained on); every eval_every steps (and at the last) the objective on them, and for kl/bce the
    gates' F1 at k, is logged to metrics.jsonl as val_loss / val_f1. With patience > 0, training stops once
    `patience` evaluations in a row failed to improve on the last improvement's val_loss by more than the fraction
    min_delta; `steps` is then the cap (the learning-rate schedule runs over it). Either way the gates (and unfrozen
    weights) of the evaluation with the lowest val_loss are kept. step_f1=False leaves the per-step F1 (a top-k
    per layer and step) out of the log.

    Resumes exactly from out_dir/checkpoint.pt (the stopping state included); writes out_dir/metrics.jsonl and, at
    the end, the gates (save_gates, with the steps taken) and done.json (steps taken, best step, training time).
    A finished run is restored, not trained again. out_dir/run.json records the run's settings (run_settings): a
    call whose settings differ is refused, unless fresh, which removes the folder's run files and starts over.
    """
    soft = _checked_soft_routing(model, loss, k, context, soft_routing, eval_every, patience, min_delta, eval_batches)
    settings = run_settings(model, ids, loss=loss, k=k, steps=steps, batch_size=batch_size, context=context, lr=lr,
                            seed=seed, model_lr=model_lr, soft=asdict(soft) if loss == "task" else None,
                            eval_every=eval_every, patience=patience, min_delta=min_delta,
                            eval_batches=eval_batches if eval_every else None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if fresh:
        _clear_run(out)
    _check_same_run(out, settings)
    if (out / "done.json").is_file():
        return _restore_finished(model, out)
    tokens, heldout = _split_tokens(ids, context, eval_batches * batch_size if eval_every else None)
    params, opt = _gate_optimizer(model, lr, model_lr)
    run = _GateRun(model=model, out=out, loss=loss, k=k, steps=steps, batch_size=batch_size, context=context, lr=lr,
                   seed=seed, soft=soft, step_f1=step_f1, tokens=tokens, heldout=heldout, params=params, opt=opt,
                   base_lrs=[g["lr"] for g in opt.param_groups],
                   sched=TrainConfig(steps=steps, lr=lr, min_lr=lr / 10, warmup_steps=min(50, max(1, steps // 10))),
                   device=next(model.parameters()).device)
    _resume_gates(run)
    run.metrics = MetricsLog(out / "metrics.jsonl", keep_until_step=run.step if run.ckpt.is_file() else None)
    run.bar = progress_bar(total=steps, initial=run.step, desc=f"gates ({loss})", disable=not progress)
    run.t0 = time.time()
    while run.step < steps and not run.finished:
        _gate_step(run)
        if eval_every and (run.step % eval_every == 0 or run.step == steps):
            _evaluate_heldout(run, patience, min_delta)
        done = run.finished or run.step == steps
        if done and run.best is not None:  # keep the best evaluation's weights
            model.load_state_dict(run.best["trainable"], strict=False)
            run.finished = True
        if run.step % checkpoint_every == 0 or done:
            _save_gate_checkpoint(run)
    run.bar.close()
    run.metrics.close()
    return _finish_gates(run)
