"""Configuration dataclasses, their validation, and file/CLI overrides.

Every run of gatelab is described by three plain dataclasses: the model (`ModelConfig`, defaults are
the paper's 31M GPT), a routing (`Routing`: how attention keys are selected), and the training run
(`TrainConfig`). They load from JSON or TOML files and accept `section.key=value` overrides.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator


class GatelabError(Exception):
    """An error caused by the user's input; the CLI prints it as one line and exits non-zero."""


ROUTING_MODES = ("dense", "oracle-topk", "gate-topk", "soft-gate", "random-topk", "stochastic")
SOFT_MASKS = ("topk-sigmoid", "sigmoid")
# The soft-gate readings of SPEC (Routing fields); the first is the default.
READINGS = {
    "topk-sigmoid": dict(soft_mask="topk-sigmoid", soft_renormalize=False),
    "sigmoid": dict(soft_mask="sigmoid", soft_renormalize=False),
    "topk-sigmoid-renorm": dict(soft_mask="topk-sigmoid", soft_renormalize=True),
    "sigmoid-renorm": dict(soft_mask="sigmoid", soft_renormalize=True),
}
GATE_KINDS = ("none", "learned", "random")
OBJECTIVES = ("lm", "kl", "bce")
COMPILE_CHOICES = ("auto", True, False, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class ModelConfig:
    """The pre-norm GPT of the paper (section 2.2), with an optional bilinear gate per layer and head."""

    n_layer: int = 6
    d_model: int = 256
    n_head: int = 4
    d_mlp: int = 1024
    context: int = 512
    vocab_size: int = 50257
    d_gate: int = 32
    gate: str = "none"  # none | learned | random (same init, frozen)
    gate_init_std: float | None = None  # None: 1/sqrt(d_model), so that gate scores start with unit variance

    def validate(self) -> "ModelConfig":
        for name in ("n_layer", "d_model", "n_head", "d_mlp", "context", "vocab_size", "d_gate"):
            if int(getattr(self, name)) < 1:
                raise GatelabError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_head:
            raise GatelabError(f"model.d_model ({self.d_model}) is not divisible by model.n_head ({self.n_head})")
        if self.gate not in GATE_KINDS:
            raise GatelabError(f"model.gate must be one of {', '.join(GATE_KINDS)}, got {self.gate!r}")
        return self

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_head


@dataclass
class Routing:
    """Which keys each query row attends to. SPEC's routing table; `k` counts causal keys kept per row.

    soft-gate readings (the paper only says "element-wise multiplication with sigmoid gate scores"):
      soft_mask="topk-sigmoid": m = sigmoid((G - tau_k) / soft_temperature), tau_k the row's k-th largest G
                                 (no gradient through tau_k): a soft top-k, so k matters. (default)
      soft_mask="sigmoid":      m = sigmoid(G / soft_temperature).
      soft_renormalize=False:   weights A * m, not renormalised (the literal reading). (default)
      soft_renormalize=True:    softmax(S + log m), i.e. A * m renormalised per row.
    """

    mode: str = "dense"
    k: int = 64
    soft_mask: str = "topk-sigmoid"
    soft_temperature: float = 1.0
    soft_renormalize: bool = False
    seed: int = 0  # random-topk: which fixed random subsets

    def validate(self, context: int | None = None) -> "Routing":
        if self.mode not in ROUTING_MODES:
            raise GatelabError(f"unknown routing mode {self.mode!r}; choose one of {', '.join(ROUTING_MODES)}")
        if int(self.k) < 1:
            raise GatelabError(f"routing k must be >= 1, got {self.k}")
        if context is not None and self.mode != "dense" and self.k > context:
            raise GatelabError(f"routing k ({self.k}) is larger than the context ({context})")
        if self.soft_mask not in SOFT_MASKS:
            raise GatelabError(f"soft_mask must be one of {', '.join(SOFT_MASKS)}, got {self.soft_mask!r}")
        if not self.soft_temperature > 0:
            raise GatelabError(f"soft_temperature must be > 0, got {self.soft_temperature}")
        return self

    @property
    def needs_gate(self) -> bool:
        return self.mode in ("gate-topk", "soft-gate")

    def label(self) -> str:
        if self.mode == "dense":
            return "dense"
        if self.mode == "soft-gate":
            renorm = ",renorm" if self.soft_renormalize else ""
            return f"soft-gate[{self.soft_mask},t={self.soft_temperature:g}{renorm}]@k={self.k}"
        return f"{self.mode}@k={self.k}"


@dataclass
class TrainConfig:
    """One training run: data, optimisation, schedule, checkpointing."""

    model: ModelConfig = field(default_factory=ModelConfig)
    routing: Routing = field(default_factory=Routing)  # routing used during training
    data: str = "data/prepared/bundled"  # a folder written by `gatelab prepare`
    steps: int = 2000
    batch_size: int = 16
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 200
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 250
    eval_tokens: int = 131072  # validation tokens used for periodic evaluation (0 = whole split)
    checkpoint_every: int = 250
    log_every: int = 10
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    # speed only (results agree to float rounding; `gatelab train --reference` turns both off):
    # torch.compile of the training objective: auto (CUDA graphs via mode reduce-overhead on one GPU, the default
    # mode under torchrun, off on CPU) | true (default mode) | false | a torch.compile mode name
    compile: bool | str = "auto"
    fused_loss: bool = True  # chunked output-head cross-entropy that never materialises the full logits
    # post-hoc gate training (gatelab distill): start from a checkpoint, freeze it, train only the gates
    objective: str = "lm"  # lm (language-model loss under `routing`) | kl | bce (gate distillation)
    init_from: str | None = None  # checkpoint directory whose weights (all but gates) initialise the model
    freeze_model: bool = False  # train only gate projections

    def validate(self) -> "TrainConfig":
        self.model.validate()
        self.routing.validate(self.model.context)
        if self.routing.needs_gate and self.model.gate == "none":
            raise GatelabError(f"routing {self.routing.mode} needs a gate: set model.gate=learned or random")
        for name in ("steps", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise GatelabError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.objective not in OBJECTIVES:
            raise GatelabError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.objective != "lm" and self.model.gate != "learned":
            raise GatelabError(f"objective {self.objective} trains a gate: set model.gate=learned")
        if self.compile not in COMPILE_CHOICES:
            raise GatelabError(f"compile must be one of {', '.join(map(str, COMPILE_CHOICES))}, got {self.compile!r}")
        if self.dtype not in ("auto", "fp32", "bf16"):
            raise GatelabError(f"dtype must be auto, fp32 or bf16, got {self.dtype!r}")
        return self


# Fields that change how fast a run goes, not what it computes: a run may resume, or be recognised as finished,
# with other values of them (and on another number of GPUs).
SPEED_FIELDS = ("compile", "fused_loss", "device")


def same_run(a: dict, b: dict) -> bool:
    """Whether two TrainConfig dicts describe the same run, ignoring SPEED_FIELDS."""
    strip = lambda d: {k: v for k, v in d.items() if k not in SPEED_FIELDS}  # noqa: E731
    return strip(a) == strip(b)


# ----------------------------------------------------------------------------------------------------------
# loading, overrides, serialisation

def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def _build(cls, data: dict, where: str):
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise GatelabError(f"unknown config key {where}{key!r}; known: {', '.join(names)}")
        sub = {"model": ModelConfig, "routing": Routing}.get(key) if cls is TrainConfig else None
        kwargs[key] = _build(sub, value, f"{where}{key}.") if sub and isinstance(value, dict) else value
    return cls(**kwargs)


def model_config_from_dict(data: dict) -> ModelConfig:
    return _build(ModelConfig, data, "model.").validate()


def soft_gate_routing(reading: str, k: int) -> "Routing":
    """The soft-gate Routing of a named reading (READINGS)."""
    if reading not in READINGS:
        raise GatelabError(f"unknown soft-gate reading {reading!r}; choose {', '.join(READINGS)}")
    return Routing(mode="soft-gate", k=k, **READINGS[reading])


def routing_from_dict(data: dict) -> Routing:
    return _build(Routing, data, "routing.")


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {"true": True, "false": False}.get(text.lower(), text)  # None is written null (JSON)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` strings (values parsed as JSON when they parse, else kept as strings)."""
    for item in overrides:
        if "=" not in item:
            raise GatelabError(f"override {item!r} is not of the form key=value (e.g. model.n_layer=4)")
        key, value = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise GatelabError(f"override {item!r}: {p} is not a section")
        node[parts[-1]] = _parse_value(value.strip())
    return data


def read_config_file(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise GatelabError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            import tomllib
            return tomllib.loads(text)
        return json.loads(text)
    except Exception as e:  # noqa: BLE001 - report any parse error as a one-line user error
        raise GatelabError(f"cannot parse config file {path}: {e}") from e


def load_train_config(path: str | None = None, overrides: list[str] = ()) -> TrainConfig:
    data = read_config_file(path) if path else {}
    data = apply_overrides(data, list(overrides))
    try:
        cfg = _build(TrainConfig, data, "")
    except TypeError as e:
        raise GatelabError(f"bad config: {e}") from e
    return cfg.validate()


def train_config_from_dict(data: dict) -> TrainConfig:
    return _build(TrainConfig, data, "")


# ----------------------------------------------------------------------------------------------------------
# atomic output

def follow_umask(path: str | os.PathLike, directory: bool = False) -> None:
    """Give a file (or folder) made by tempfile, which creates them private (0600 / 0700), the mode an ordinary
    open() or mkdir() would have given it under the process's umask (usually 0644 / 0755)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if directory else 0o666) & ~mask)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename (with the mode the
    umask gives new files, not tempfile's private 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        follow_umask(tmp)
        try:
            os.replace(tmp, path)
        except OSError as e:
            raise GatelabError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
