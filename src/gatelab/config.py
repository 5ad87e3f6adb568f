"""Configuration dataclasses, their validation, and file/CLI overrides.

Every run of gatelab is described by three plain dataclasses: the model (`ModelConfig`, defaults are
the paper's 31M GPT), a routing (`Routing`: how attention keys are selected), and the training run
(`TrainConfig`). They load from JSON or TOML files and accept `section.key=value` overrides.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tempfile
import tomllib
import typing
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator


class GatelabError(Exception):
    """An error caused by the user's input; the CLI prints it as one line and exits non-zero."""


ROUTING_MODES = ("dense", "oracle-topk", "gate-topk", "soft-gate", "random-topk", "stochastic")


# Block routing (attention/blocks.py): key blocks of `block_size` tokens chosen per query block, the diagonal block always kept.
BLOCK_MODES = ("block-oracle", "block-gate", "block-random", "block-soft")


ALL_ROUTING_MODES = ROUTING_MODES + BLOCK_MODES


BLOCK_POOLS = ("mean", "max-min")  # how a block gate pools its keys' inputs (queries are always mean-pooled)


SOFT_MASKS = ("topk-sigmoid", "sigmoid")


# The soft-gate readings (docs/method.md; Routing fields), in the order of the tie-break of the reading study: closest to
# the paper's words ("element-wise multiplication with sigmoid gate scores (no hard top-k ...)") first.
READINGS = {
    "sigmoid": dict(soft_mask="sigmoid", soft_renormalize=False),
    "sigmoid-renorm": dict(soft_mask="sigmoid", soft_renormalize=True),
    "topk-sigmoid": dict(soft_mask="topk-sigmoid", soft_renormalize=False),
    "topk-sigmoid-renorm": dict(soft_mask="topk-sigmoid", soft_renormalize=True),
}


# The default reading: the one that satisfies most of the paper's stated facts in the reading study
# (report.READING_FACTS, results/compact/REPORT.md); a test checks that the committed study still picks it.
DEFAULT_READING = "sigmoid"


# Gate variants of the Hugging Face adapter (attention/position_gates.py; here so that the command line needs no torch to list them).
POSITIONS = ("none", "rope", "qk")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")  # torch.compile modes (hf-eval --compile)


# The variant hf-distill, `reproduce --suite pretrained --position` and attach_gates use when none is named, and so
# the gates `gatelab audit --model` audits by default. Chosen by pretrained.POSITION_RULE from the study on
# SmolLM2-135M (results/pretrained/REPORT.md, H100): KL gates at d_gate 32/64 deployed at hard top-64/128/256 came
# within a geometric mean of 0.17% (rope) and 0.19% (qk) of the oracle, against 13.0% for the pre-RoPE gate (none).
DEFAULT_POSITION = "rope"


POSITION_HELP = ("none: the gate reads the layer's normed input before RoPE (no position); rope: the model's own "
                 "rotary embedding on the gate's query and key (d_gate/2 rotary pairs at the model's frequencies, "
                 "plus per-head biases that score pure relative position); qk: low-rank maps of the model's own "
                 "post-RoPE queries and keys")


GATE_KINDS = ("none", "learned", "random")


OBJECTIVES = ("lm", "kl", "bce")


COMPILE_CHOICES = ("auto", True, False, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


DTYPES = ("auto", "fp32", "bf16")


DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


@dataclass(frozen=True)
class Limit:
    """The allowed range of a numeric config field: lo <= x (lo < x when lo_open), and x < hi (x <= hi unless
    hi_open) when hi is given."""

    lo: float
    lo_open: bool = False
    hi: float | None = None
    hi_open: bool = True

    def __contains__(self, x) -> bool:
        below_hi = self.hi is None or (x < self.hi if self.hi_open else x <= self.hi)
        return (x > self.lo if self.lo_open else x >= self.lo) and below_hi

    def __str__(self) -> str:
        low = f"> {self.lo:g}" if self.lo_open else f">= {self.lo:g}"
        return low if self.hi is None else f"{low} and {'<' if self.hi_open else '<='} {self.hi:g}"


AT_LEAST_1, AT_LEAST_0, ABOVE_0 = Limit(1), Limit(0), Limit(0, lo_open=True)


def _type_name(kinds: tuple) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def check_fields(obj) -> None:
    """Type- and range-check every plain field of a config dataclass, in place: ints may be given as integral
    floats (2e3), numbers must be finite, bools must be true/false; LIMITS and CHOICES of the class say the rest.
    Raises GatelabError naming the field (e.g. `model.n_layer must be an integer, got 'abc'`)."""
    cls = type(obj)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kinds = typing.get_args(hints[f.name]) or (hints[f.name],)
        if not all(k in (int, float, bool, str, type(None)) for k in kinds):
            continue  # a section (model, routing): checked by its own validate()
        name, value = cls.PREFIX + f.name, getattr(obj, f.name)
        if value is None and type(None) in kinds:
            continue
        if isinstance(value, bool):
            ok = bool in kinds
        elif isinstance(value, int):
            ok = int in kinds or float in kinds
            if ok and int not in kinds:
                value = float(value)
        elif isinstance(value, float):
            ok = float in kinds or (int in kinds and math.isfinite(value) and value.is_integer())
            if ok and float not in kinds:
                value = int(value)
            if ok and not math.isfinite(value):
                raise GatelabError(f"{name} must be a finite number, got {value}")
        else:
            ok = isinstance(value, str) and str in kinds
        choices = cls.CHOICES.get(f.name)
        if isinstance(choices, re.Pattern):
            if not (ok and choices.fullmatch(value)):
                raise GatelabError(f"{name} must be auto, cpu, cuda, cuda:N or mps, got {value!r}")
        elif choices is not None and not (ok and value in choices):
            shown = ", ".join(json.dumps(c) if isinstance(c, bool) else str(c) for c in choices)
            raise GatelabError(f"{name} must be one of {shown}, got {value!r}")
        if not ok:
            raise GatelabError(f"{name} must be {_type_name(kinds)}, got {value!r}")
        setattr(obj, f.name, value)
        limit = cls.LIMITS.get(f.name)
        if limit is not None and not isinstance(value, (bool, str)) and value not in limit:
            raise GatelabError(f"{name} must be {limit}, got {value}")


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
    block_gate: str = "none"  # a block gate per layer for the block routings: none | learned | random (frozen)
    block_pool: str = "mean"  # the block gate's key pooling: mean | max-min (SeerAttention's; doubles its key input)

    PREFIX: ClassVar[str] = "model."
    LIMITS: ClassVar[dict] = dict(n_layer=AT_LEAST_1, d_model=AT_LEAST_1, n_head=AT_LEAST_1, d_mlp=AT_LEAST_1,
                                  context=AT_LEAST_1, vocab_size=AT_LEAST_1, d_gate=AT_LEAST_1, gate_init_std=ABOVE_0)
    CHOICES: ClassVar[dict] = dict(gate=GATE_KINDS, block_gate=GATE_KINDS, block_pool=BLOCK_POOLS)

    def validate(self) -> "ModelConfig":
        check_fields(self)
        if self.d_model % self.n_head:
            raise GatelabError(f"model.d_model ({self.d_model}) is not divisible by model.n_head ({self.n_head})")
        return self

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_head


@dataclass
class Routing:
    """Which keys each query row attends to (docs/method.md, "Routing modes"); `k` counts causal keys kept per row.

    soft-gate readings (the paper only says "element-wise multiplication with sigmoid gate scores"; READINGS):
      soft_mask="sigmoid":      m = sigmoid(G / soft_temperature). (default, DEFAULT_READING)
      soft_mask="topk-sigmoid": m = sigmoid((G - tau_k) / soft_temperature), tau_k the row's k-th largest G
                                 (no gradient through tau_k): a soft top-k, so k matters.
      soft_renormalize=False:   weights A * m, not renormalised (the literal reading). (default)
      soft_renormalize=True:    softmax(S + log m), i.e. A * m renormalised per row.
    """

    mode: str = "dense"
    k: int = 64
    soft_mask: str = READINGS[DEFAULT_READING]["soft_mask"]
    soft_temperature: float = 1.0
    soft_renormalize: bool = READINGS[DEFAULT_READING]["soft_renormalize"]
    seed: int = 0  # random-topk: which fixed random subsets
    # block routings (attention/blocks.py): blocks of block_size tokens; each query block keeps its diagonal block plus the
    # block_k best earlier key blocks (all of them when it has block_k or fewer). block-soft reads soft_* above.
    block_size: int = 64
    block_k: int = 4

    PREFIX: ClassVar[str] = "routing."
    LIMITS: ClassVar[dict] = dict(k=AT_LEAST_1, soft_temperature=ABOVE_0, seed=AT_LEAST_0, block_size=AT_LEAST_1,
                                  block_k=AT_LEAST_1)
    CHOICES: ClassVar[dict] = dict(mode=ALL_ROUTING_MODES, soft_mask=SOFT_MASKS)

    def validate(self, context: int | None = None) -> "Routing":
        if isinstance(self.mode, str) and self.mode not in ALL_ROUTING_MODES:
            raise GatelabError(f"unknown routing mode {self.mode!r}; routing.mode must be one of "
                               f"{', '.join(ALL_ROUTING_MODES)}")
        check_fields(self)
        if context is not None and self.mode != "dense" and not self.is_block and self.k > context:
            raise GatelabError(f"routing k ({self.k}) is larger than the context ({context})")
        if self.is_block and context is not None and self.block_size > context:
            raise GatelabError(f"routing block_size ({self.block_size}) is larger than the context ({context})")
        return self

    @property
    def needs_gate(self) -> bool:
        return self.mode in ("gate-topk", "soft-gate")

    @property
    def is_block(self) -> bool:
        return self.mode in BLOCK_MODES

    @property
    def needs_block_gate(self) -> bool:
        return self.mode in ("block-gate", "block-soft")

    def label(self) -> str:
        if self.mode == "dense":
            return "dense"
        if self.is_block:
            reading = ""
            if self.mode == "block-soft":
                reading = f"[{self.soft_mask},t={self.soft_temperature:g}{',renorm' if self.soft_renormalize else ''}]"
            return f"{self.mode}{reading}@b={self.block_size},k={self.block_k}"
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
    train_fraction: float = 1.0  # train on the first this share of the training split (0 < f <= 1)
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
    # observation only: at each log step, per-layer statistics of the gates (weight norms, spread of G, the soft
    # mask's mean and slope, gate gradient norm) go into metrics.jsonl as `gate_stats` (benchmarks/drivers/soft_gate_divergence.py)
    log_gate_stats: bool = False
    # post-hoc gate training (gatelab distill): start from a checkpoint, freeze it, train only the gates
    objective: str = "lm"  # lm (language-model loss under `routing`) | kl | bce (gate distillation)
    init_from: str | None = None  # checkpoint directory whose weights (all but gates) initialise the model
    freeze_model: bool = False  # train only gate projections

    PREFIX: ClassVar[str] = ""
    # 0 means "off" for eval_every (no periodic evaluation), "the whole split" for eval_tokens, and "no warm-up",
    # "no weight decay" or "no clipping" for warmup_steps, weight_decay and grad_clip; the last step always logs,
    # evaluates (unless eval_every is 0) and saves a checkpoint.
    LIMITS: ClassVar[dict] = dict(steps=AT_LEAST_1, batch_size=AT_LEAST_1, lr=ABOVE_0, min_lr=AT_LEAST_0,
                                  warmup_steps=AT_LEAST_0, weight_decay=AT_LEAST_0, beta1=Limit(0, hi=1),
                                  beta2=Limit(0, hi=1), grad_clip=AT_LEAST_0, seed=AT_LEAST_0, eval_every=AT_LEAST_0,
                                  eval_tokens=AT_LEAST_0, checkpoint_every=AT_LEAST_1, log_every=AT_LEAST_1,
                                  train_fraction=Limit(0, lo_open=True, hi=1, hi_open=False))
    CHOICES: ClassVar[dict] = dict(device=DEVICE_PATTERN, dtype=DTYPES, compile=COMPILE_CHOICES,
                                   objective=OBJECTIVES)

    def validate(self) -> "TrainConfig":
        for name, cls in (("model", ModelConfig), ("routing", Routing)):
            if not isinstance(getattr(self, name), cls):
                raise GatelabError(f"{name} must be a section of {name}.* fields (an object), got "
                                   f"{getattr(self, name)!r}")
        self.model.validate()
        self.routing.validate(self.model.context)
        check_fields(self)
        if not self.data:
            raise GatelabError("data must name a prepared corpus folder, got an empty string")
        if self.routing.needs_gate and self.model.gate == "none":
            raise GatelabError(f"routing {self.routing.mode} needs a gate: set model.gate=learned or random")
        if self.routing.needs_block_gate and self.model.block_gate == "none":
            raise GatelabError(f"routing {self.routing.mode} needs a block gate: set model.block_gate=learned or "
                               f"random")
        trains_block_gate = self.routing.is_block and self.model.block_gate == "learned"
        if self.objective != "lm" and self.model.gate != "learned" and not trains_block_gate:
            raise GatelabError(f"objective {self.objective} trains a gate: set model.gate=learned (or, under a block "
                               f"routing, model.block_gate=learned)")
        return self


# Fields that change how fast a run goes or what it logs, not what it computes: a run may resume, or be recognised
# as finished, with other values of them (and on another number of GPUs).
SPEED_FIELDS = ("compile", "fused_loss", "device", "log_gate_stats")


def same_run(a: dict, b: dict) -> bool:
    """Whether two TrainConfig dicts describe the same run, ignoring SPEED_FIELDS. Fields added to the config
    since a run was written count at their defaults, so older runs still resume and are recognised as finished."""
    def normal(d: dict) -> dict:
        try:
            d = to_dict(_build(TrainConfig, d, ""))
        except (GatelabError, TypeError):
            pass
        return {k: v for k, v in d.items() if k not in SPEED_FIELDS}
    return normal(a) == normal(b)


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
            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 - report any parse error as a one-line user error
        raise GatelabError(f"cannot parse config file {path}: {' '.join(str(e).split())}") from e
    if not isinstance(data, dict):
        raise GatelabError(f"config file {path} must hold an object of fields (e.g. {{\"steps\": 500}}), got "
                           f"{type(data).__name__}")
    return data


PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the checkout (an editable install), whose examples name


def resolve_config_data(data: Any, config_path: str | os.PathLike) -> Any:
    """A config file's relative `data` path, resolved against the config file's folder (against the project root
    for the configs inside the project, e.g. experiments/*.json), so that a run reads the same data wherever it is
    started from. Kept as written when it names the same folder from the working directory (so that runs written
    before keep their config); an absolute path otherwise."""
    if not isinstance(data, str) or not data or Path(data).is_absolute():
        return data
    config_dir = Path(config_path).resolve().parent
    base = PROJECT_ROOT if config_dir.is_relative_to(PROJECT_ROOT) else config_dir
    target = base / data
    return data if target.resolve() == (Path.cwd() / data).resolve() else str(target)


def load_train_config(path: str | None = None, overrides: list[str] = ()) -> TrainConfig:
    data = read_config_file(path) if path else {}
    if "data" in data and not any(o.split("=", 1)[0].strip() == "data" for o in overrides):
        data["data"] = resolve_config_data(data["data"], path)  # a `data=` override is relative to where it's typed
    data = apply_overrides(data, list(overrides))
    try:
        cfg = _build(TrainConfig, data, "")
    except TypeError as e:
        raise GatelabError(f"bad config: {e}") from e
    return cfg.validate()


def train_config_from_dict(data: dict) -> TrainConfig:
    return _build(TrainConfig, data, "")


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
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:  # name the file asked for, not the temporary one beside it
        raise GatelabError(f"cannot write {path}: {e.strerror or e}") from None
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


def check_writable(path: str | os.PathLike, option: str) -> None:
    """Raise unless a file can be written at `path` (its folder exists or can be made, and is writable): checked
    before a command computes what it would write there."""
    path = Path(path)
    if path.is_dir():
        raise GatelabError(f"{option} {path} is a folder; give the name of a file to write")
    folder = next((p for p in [path.parent, *path.parent.parents] if p.exists()), Path("."))
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise GatelabError(f"{option} {path}: cannot write there ({folder} is not a writable folder)")


def write_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
