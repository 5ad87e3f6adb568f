"""Checkpoints: safetensors weights plus JSON, written atomically as a whole directory.

A checkpoint directory holds
  model.safetensors      every parameter and buffer of the model
  optimizer.safetensors  AdamW's per-parameter state (absent for weights-only checkpoints)
  trainer.json           config, step, RNG states, data position, optimizer hyper-parameters
It is written to `<dir>.tmp`, then swapped in with renames; a run killed mid-swap leaves `<dir>.old`,
which `find_checkpoint` falls back to.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gatelab.config import GatelabError, ModelConfig, TrainConfig, follow_umask, model_config_from_dict
from gatelab.model import GPT


def build_model(cfg: TrainConfig, device: torch.device) -> GPT:
    """A fresh model from cfg.seed; with init_from, every weight but the gates comes from that checkpoint
    (gates stay freshly initialised), and freeze_model leaves only the gates trainable."""
    torch.manual_seed(cfg.seed)
    model = GPT(cfg.model)
    if cfg.init_from:
        base = find_checkpoint(cfg.init_from)
        if base is None:
            raise GatelabError(f"init_from: {cfg.init_from} is not a gatelab checkpoint")
        is_gate = lambda k: ".gate." in k or ".block_gate." in k  # noqa: E731
        state = {k: v for k, v in load_state(base).items() if not is_gate(k)}
        load_weights(model, state, str(base), strict=False)
        missing = [k for k in model.state_dict() if k not in state and not is_gate(k)]
        if missing:
            raise GatelabError(f"{base} was made for another model config (missing: {', '.join(missing[:3])})")
    if cfg.freeze_model:
        gate_ids = {id(p) for p in model.gate_parameters()}
        for p in model.parameters():
            if id(p) not in gate_ids:
                p.requires_grad_(False)
    return model.to(device)


MODEL_FILE, OPTIM_FILE, TRAINER_FILE = "model.safetensors", "optimizer.safetensors", "trainer.json"


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state() -> dict:
    state = {"torch": _b64(torch.get_rng_state())}
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for name, val in st.items():
            if torch.is_tensor(val):
                tensors[f"{pid}.{name}"] = val.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{name}"] = val
    return tensors, dict(param_groups=sd["param_groups"], scalars=scalars)


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict = {}
    for key, val in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = val
    for key, val in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = val
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(path: str | Path, model: torch.nn.Module, trainer: dict,
                    optimizer: torch.optim.Optimizer | None = None) -> None:
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / MODEL_FILE))
    if optimizer is not None:
        tensors, meta = optimizer_tensors(optimizer)
        save_file(tensors, str(tmp / OPTIM_FILE))
        trainer = dict(trainer, optimizer=meta)
    (tmp / TRAINER_FILE).write_text(json.dumps(trainer, indent=1))
    for f in tmp.iterdir():  # make the files durable before the rename publishes them
        follow_umask(f)  # safetensors creates its files 0600
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(path: str | Path) -> Path | None:
    """The checkpoint at `path`, or the `.old` copy a kill during the swap left behind."""
    path = Path(path)
    for cand in (path, path.with_name(path.name + ".old")):
        if (cand / TRAINER_FILE).is_file() and (cand / MODEL_FILE).is_file():
            return cand
    return None


def read_trainer(path: str | Path) -> dict:
    path = Path(path)
    f = path / TRAINER_FILE
    if not f.is_file():
        raise GatelabError(f"{path} is not a gatelab checkpoint (no {TRAINER_FILE})")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise GatelabError(f"{f} is corrupt: {e}") from None


def check_finite(state: dict, where: str) -> dict:
    """Raise unless every floating-point tensor of `state` is finite: a file whose values were damaged (its header
    intact) would otherwise load and evaluate to NaN."""
    bad = [name for name, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise GatelabError(f"{where} holds non-finite values (NaN or infinity) in {len(bad)} tensor(s), e.g. "
                           f"{', '.join(bad[:3])}: the file is corrupt")
    return state


def load_state(path: str | Path, fname: str = MODEL_FILE) -> dict:
    f = Path(path) / fname
    if not f.is_file():
        raise GatelabError(f"checkpoint {path} lacks {fname}")
    try:
        state = load_file(str(f))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for damaged files
        raise GatelabError(f"checkpoint file {f} is corrupt or truncated ({type(e).__name__}: {e})") from None
    return check_finite(state, f"checkpoint file {f}")


def load_weights(model: torch.nn.Module, state: dict, where: str, strict: bool = True) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in state and state[k].shape != own[k].shape]
    if wrong or (strict and (missing or unexpected)):
        parts = []
        if wrong:
            parts.append("shape mismatch: " + ", ".join(wrong[:3]))
        if strict and missing:
            parts.append("missing: " + ", ".join(missing[:3]))
        if strict and unexpected:
            parts.append("unexpected: " + ", ".join(unexpected[:3]))
        raise GatelabError(f"{where} was made for another model config ({'; '.join(parts)})")
    model.load_state_dict(state, strict=strict)


def load_model(path: str | Path, device="cpu", gate: str | None = None):
    """Build the model a checkpoint describes and load its weights. `gate` overrides the gate kind
    (e.g. "none" to drop an end-to-end gate, or to add one to a dense checkpoint for distillation)."""
    path = Path(path)
    found = find_checkpoint(path)
    if found is None:
        if not path.exists():
            raise GatelabError(f"checkpoint {path} does not exist")
        raise GatelabError(f"{path} is not a gatelab checkpoint (needs {TRAINER_FILE} and {MODEL_FILE})")
    trainer = read_trainer(found)
    mcfg: ModelConfig = model_config_from_dict(trainer["config"]["model"])
    if gate is not None:
        mcfg.gate = gate
    model = GPT(mcfg)
    state = load_state(found)
    state = {k: v for k, v in state.items() if ".gate." not in k or mcfg.gate != "none"}
    load_weights(model, state, str(found), strict=gate is None)
    return model.to(device), trainer
