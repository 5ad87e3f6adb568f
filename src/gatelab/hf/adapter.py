"""Every gatelab routing mode on Hugging Face causal LMs (Llama, Qwen2/Qwen3, Gemma3, Mistral...).

No modeling file is copied: gatelab registers one attention function in transformers' attention registry
(`AttentionInterface`) and switches the model to it; that function calls `attention.attend`, the entry point the
GPT uses, so every routing mode runs the same code (and the same Triton kernels on CUDA) in both. A forward
pre-hook on each attention module keeps that layer's input hidden states X (and its rotary cos/sin), which gates
read.

- The gate variant (`position`, attention/position_gates.py) says what a token gate reads: `none`, X before RoPE;
  `rope`, X with the model's own rotary embedding; `qk`, the model's post-RoPE queries and keys. Block gates
  (`attach_block_gates`) pool X (`none`) or the queries and keys (`qk`).
- Grouped-query attention: one gate per *query* head; keys and values are repeated to the query heads.
- The model's own mask (causal, padding, sliding window) defines the allowed keys of each row; every routing mode
  selects among those, and rows with k or fewer allowed keys keep them all.
- Gate and block routings need the full key sequence: with a KV cache (generation), use dense/oracle/random.

    model = AutoModelForCausalLM.from_pretrained(...)
    gated = attach_gates(model, d_gate=32, gate="learned")
    with gated.routing(Routing(mode="gate-topk", k=64)):
        out = model(input_ids)
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace

import torch
import torch.nn as nn

from gatelab.attention.attend import GateScores, attend, dense_attention
from gatelab.attention.backend import Backend, default_backend
from gatelab.attention.block_decode import BlockDecodeCache, block_decode_attention
from gatelab.attention.blocks import block_attention_mass
from gatelab.attention.fixed_decode import FixedDecode, block_fixed_prefill, block_fixed_step, dense_fixed_step
from gatelab.attention.gates import BlockGate
from gatelab.attention.hard import RandomMaskCache
from gatelab.attention.masks import allowed_keys, causal_rows, repeat_kv, token_validity
from gatelab.attention.position_gates import (
    DEFAULT_POSITION, check_position, gate_factors, gate_inputs, gate_scores, make_gate
)
from gatelab.config import GatelabError, Routing
from gatelab.training.gate_files import BLOCK_ROWS

ATTN_NAME = "gatelab"
DENSE = Routing()
BLOCK_POSITIONS = ("none", "qk")  # what a block gate reads (position_gates' variant names): X, or the model's q and k
# The variant hf-distill --block-size uses when none is named. Rule, written before qk was measured: on SmolLM2-135M
# at 8,192 tokens (results/block/README.md), both variants distilled for the same time on the H100
# (benchmarks/drivers/block_gpu.sh smollm2 with STEPS=auto DISTILL_SECONDS=330: mean pooling, d_gate 32, lr 1e-3, KL), qk
# becomes the default if its gate's perplexity is lower than none's at every block_k evaluated (3, 8, 18);
# otherwise none (the first block gate) stays. Measured (H100, test split, 40,960 tokens): qk 30.42 / 28.33 / 27.71
# (450 steps) against none 37.32 / 30.80 / 28.64 (550 steps) at block_k 3 / 8 / 18, dense 27.45: qk.
DEFAULT_BLOCK_POSITION = "qk"


def _attention_modules(model) -> list[nn.Module]:
    mods = [m for name, m in model.named_modules() if name.endswith("self_attn")]
    if not mods:
        raise GatelabError(f"{type(model).__name__}: no `self_attn` modules found; gatelab.hf supports decoder "
                           f"models whose layers name their attention `self_attn` (Llama, Qwen2/3, Gemma3, Mistral)")
    return mods


def gatelab_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention function: the layer's attention under the controller's routing, through attend."""
    state = module._gatelab
    ctl = state["controller"]
    routing: Routing = ctl.current if ctl.layers is None or state["layer"] in ctl.layers else DENSE
    B, H, T, D = query.shape
    S = key.shape[2]
    allowed = None if attention_mask is None else allowed_keys(attention_mask, B, T, S, query.device)
    drop = dropout if module.training else 0.0
    if ctl.fixed is not None and ctl.fixed.stepping:  # a decoding step over a cache of fixed size (hf/graphed.py)
        return fixed_step_layer(ctl, state, routing, query, key, value, scaling).transpose(1, 2).contiguous(), None
    if ctl.capture is not None and ctl.gate_type == "block":  # block-gate distillation: the dense output only
        capture_block_layer(ctl, state, query, key, allowed, scaling)
        out = dense_attention(query, key, value, allowed, scaling, drop)
        return out.transpose(1, 2).contiguous(), None
    if ctl.capture is not None:  # token-gate distillation: keep what the gate learns from
        capture_token_layer(ctl, state, query, key, allowed, scaling)
    if routing.is_block and T != S:  # generating with a KV cache: the new queries read their kept blocks only
        out = decode_block_layer(ctl, state, routing, query, key, value, allowed, scaling)
        return out.transpose(1, 2).contiguous(), None
    if routing.is_block and ctl.fixed is not None:  # a prompt before decoding over a cache of fixed size
        block_fixed_prefill(ctl.fixed, state["layer"], block_gate(state, routing), routing, query, key, state["x"])
    elif routing.is_block and kwargs.get("use_cache"):  # a prompt before generation: remember its queries
        state.setdefault("decode", BlockDecodeCache()).extend(query, decode_inputs(state, routing), 0)
    gate = layer_gate(ctl, state, routing, query, key, allowed)
    if kwargs.get("output_attentions") and routing.mode != "dense":  # the weights: attend over identity values
        weights = attention_weights(query, key, routing, gate, allowed, scaling, state["layer"], ctl)
        out = weights.to(value.dtype) @ repeat_kv(value, H)
        return out.transpose(1, 2).contiguous(), weights
    out = attend(query, key, value, routing, gate=gate, allowed=allowed, scale=scaling, layer=state["layer"],
                 backend=ctl.backend, random_masks=ctl.random_masks, dropout=drop)
    return out.transpose(1, 2).contiguous(), None


def attention_weights(query, key, routing: Routing, gate, allowed, scaling, layer: int, ctl) -> torch.Tensor:
    """The attention weights (B, H, T, S) under the routing (output_attentions): attend over identity values, so
    that each output row is its row of weights; the torch references, the same selection as the kernels."""
    B, H, T, _ = query.shape
    S = key.shape[2]
    eye = torch.eye(S, dtype=query.dtype, device=query.device).expand(B, H, S, S)
    return attend(query, key, eye, routing, gate=gate, allowed=allowed, scale=scaling, layer=layer,
                  backend=replace(ctl.backend, kernels=False, block_attention="masked"),
                  random_masks=ctl.random_masks)


def decode_block_layer(ctl, state: dict, routing: Routing, query, key, value, allowed, scaling) -> torch.Tensor:
    """A block routing while generating: the layer's queries and inputs appended to its decode cache, then
    attention over the key blocks its query block keeps (attention/block_decode.py)."""
    B, H, T, D = query.shape
    S = key.shape[2]
    if allowed is not None and not bool((allowed | ~causal_rows(T, S, query.device)).all()):
        raise GatelabError("block routings decode unpadded sequences only (generate one prompt at a time, or "
                           "prompts of one length)")
    cache = state.setdefault("decode", BlockDecodeCache())
    cache.extend(query, decode_inputs(state, routing), S - T)
    scores = None
    if routing.needs_block_gate:
        gate = block_gate(state, routing)
        scores = lambda: gate(cache.x, routing.block_size, None, q=cache.q, k=key,  # noqa: E731
                              compiled=ctl.backend.compile_blocks).float()
    return block_decode_attention(query, key, value, routing, cache, gate_scores=scores, layer=state["layer"],
                                  scale=scaling, kernels=ctl.backend.kernels)


def decode_inputs(state: dict, routing: Routing):
    """The layer inputs block decoding keeps: X for a block gate that reads it, else None (qk gates, oracle and random
    blocks never read X)."""
    gate = state.get("gate")
    return state["x"] if routing.needs_block_gate and getattr(gate, "reads", "qk") == "x" else None


def fixed_step_layer(ctl, state: dict, routing: Routing, query, key, value, scaling) -> torch.Tensor:
    """One decoding step over a cache of fixed size (attention/fixed_decode.py): dense, or the kept blocks of a
    block-gate routing."""
    if routing.mode == "dense":
        return dense_fixed_step(query, key, value, ctl.fixed.valid, scaling)
    return block_fixed_step(ctl.fixed, state["layer"], block_gate(state, routing), routing, query, key, value,
                            state["x"], scaling, kernels=ctl.backend.kernels)


def block_gate(state: dict, routing: Routing):
    """The layer's block gate, or an error naming how to get one."""
    gate = state.get("gate")
    if gate is None or not getattr(gate, "is_block_gate", False):
        raise GatelabError(f"routing {routing.mode} needs block gates: attach_block_gates(model, ...), or "
                           f"--gate GATES saved by `gatelab hf-distill --block-size ...`")
    return gate


def layer_gate(ctl, state: dict, routing: Routing, query, key, allowed) -> GateScores | None:
    """The layer's gate for attend, when the routing reads one: a token gate for gate-topk and soft-gate, a block
    gate for block-gate and block-soft; an error when the attached gate is of the other kind."""
    gate = state.get("gate")
    is_block = getattr(gate, "is_block_gate", False)
    if routing.needs_block_gate:
        gate = block_gate(state, routing)
        valid = token_validity(allowed, query.shape[0], query.shape[2])
        return GateScores(lambda: gate(state["x"], routing.block_size, valid, q=query, k=key,
                                       compiled=ctl.backend.compile_blocks).float(),
                          lambda: gate.factors(state["x"], routing.block_size, valid, q=query, k=key,
                                               compiled=ctl.backend.compile_blocks,
                                               kernel=ctl.backend.factors_kernel))
    if not routing.needs_gate:
        return None
    if gate is None:
        raise GatelabError(f"routing {routing.mode} needs gates: attach_gates(..., gate='learned'|'random')")
    if is_block:
        raise GatelabError(f"routing {routing.mode} needs token gates, and these are block gates: use a block "
                           f"routing (block-gate, block-soft)")
    inputs = gate_inputs(ctl.position, state["x"], state.get("rope"), query, repeat_kv(key, query.shape[1]))
    return GateScores(lambda: gate_scores(gate, inputs).float(), lambda: gate_factors(gate, inputs))


def capture_token_layer(ctl, state: dict, query, key, allowed, scaling) -> None:
    """Token-gate distillation: the layer's attention logits S, its allowed keys and the gate's inputs."""
    B, H, T, D = query.shape
    key = repeat_kv(key, H)
    scaling = scaling if scaling is not None else D ** -0.5
    S = (query @ key.transpose(-1, -2)).float() * scaling
    gate = state.get("gate")
    inputs = None if gate is None else gate_inputs(ctl.position, state["x"], state.get("rope"), query, key)
    ctl.capture.append(dict(S=S.detach(), allowed=allowed_keys(None, B, T, key.shape[2], query.device)
                            if allowed is None else allowed, layer=state["layer"],
                            inputs=None if inputs is None else {n: v.detach() for n, v in inputs.items()}))


def capture_block_layer(ctl, state: dict, query, key, allowed, scaling) -> None:
    """Block-gate distillation: the layer's pooled attention mass and what its gate reads."""
    B, H, T, D = query.shape
    if key.shape[2] != T:
        raise GatelabError("block routings need the whole key sequence: call the model with use_cache=False")
    reads_qk = getattr(ctl.gates[state["layer"]], "reads", "x") == "qk"
    ctl.capture.append(dict(mass=block_attention_mass(query, key, ctl.block_size, allowed, scaling),
                            x=state["x"].detach(), valid=token_validity(allowed, B, T), layer=state["layer"],
                            q=query.detach() if reads_qk else None, k=key.detach() if reads_qk else None))


class RoutingController:
    """Holds the routing every gated attention module uses; switch it with `with gated.routing(r):`."""

    def __init__(self, model, gates: nn.ModuleList | None, d_gate: int, kind: str, position: str = "none"):
        self.model, self.gates, self.d_gate, self.kind, self.position = model, gates, d_gate, kind, position
        self.current = Routing()
        self.layers: set[int] | None = None  # layers the routing applies to (None: all); the others stay dense
        self.capture: list | None = None  # distillation: each layer's attention logits or pooled mass, kept here
        self.gate_type = "token"
        self.backend: Backend = default_backend()  # how attention is computed (attention/backend.py)
        self.random_masks = RandomMaskCache()
        self.fixed: FixedDecode | None = None  # decoding over a cache of fixed size (hf/graphed.py) while set

    @contextmanager
    def routing(self, routing: Routing):
        routing.validate()
        previous, self.current = self.current, routing
        try:
            yield self
        finally:
            self.current = previous

    def gate_parameters(self) -> list[nn.Parameter]:
        return [] if self.gates is None else list(self.gates.parameters())


def attach_gates(model, d_gate: int = 32, gate: str = "learned", seed: int = 0,
                 init_std: float | None = None, position: str = DEFAULT_POSITION) -> RoutingController:
    """Patch `model` (in place) to route attention through gatelab; gate: learned | random | none;
    position: the gate variant, none | rope | qk (attention/position_gates.py)."""
    from transformers import AttentionInterface
    if gate not in ("learned", "random", "none"):
        raise GatelabError(f"gate must be learned, random or none, got {gate!r}")
    check_position(position, d_gate if gate != "none" else None)
    AttentionInterface.register(ATTN_NAME, gatelab_attention)
    try:  # transformers builds masks through a registry keyed by the same name: ours are boolean, as for SDPA
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
        AttentionMaskInterface.register(ATTN_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    except ImportError:  # older transformers pass their 4D additive masks directly
        pass
    cfg = model.config
    attns = _attention_modules(model)
    hidden, heads = cfg.hidden_size, cfg.num_attention_heads
    gates = None
    if gate != "none":
        torch.manual_seed(seed)
        dev = next(model.parameters()).device
        gates = nn.ModuleList([make_gate(position, hidden, _head_dim(model, attn), heads, d_gate, init_std,
                                         trainable=gate == "learned") for attn in attns]).to(dev)
        model.gatelab_gates = gates  # registered, so .to(), state_dict() and optimisers see them
    controller = RoutingController(model, gates, d_gate, gate, position)
    for i, attn in enumerate(attns):
        attn._gatelab = dict(controller=controller, layer=i, gate=None if gates is None else gates[i], x=None,
                             rope=None)

        def keep_input(mod, args, kwargs):
            x = kwargs.get("hidden_states", args[0] if args else None)
            mod._gatelab["x"] = x  # the layer's normed input, before q/k/v_proj and RoPE
            mod._gatelab["rope"] = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
        if not getattr(attn, "_gatelab_hooked", False):
            attn.register_forward_pre_hook(keep_input, with_kwargs=True)
            attn._gatelab_hooked = True
    _set_attn_implementation(model, ATTN_NAME)
    model.gatelab = controller
    return controller


def attach_block_gates(model, d_gate: int = 32, gate: str = "learned", pool: str = "mean", block_size: int = 128,
                       seed: int = 0, init_std: float | None = None, backend: str = "auto",
                       position: str | None = None):
    """Patch `model` to route attention through gatelab with a block gate per layer; gate: learned | random.
    block_size: the block size distillation pools the attention mass at (deployment may use another).
    backend: the block attention path (auto: flex_attention on CUDA where it skips work; flex; masked).
    position: what the gate pools: "none", the layer's normed input X (no position); "qk", the attention's own
    queries and keys after RoPE (SeerAttention's inputs). None: DEFAULT_BLOCK_POSITION."""
    if gate not in ("learned", "random"):
        raise GatelabError(f"block gates are learned or random, got {gate!r}")
    position = position or DEFAULT_BLOCK_POSITION
    if position not in BLOCK_POSITIONS:
        raise GatelabError(f"a block gate reads {' or '.join(BLOCK_POSITIONS)} (--position), got {position!r}")
    Routing(mode="block-gate", block_size=block_size).validate()
    ctl = attach_gates(model, gate="none")
    cfg = model.config
    attns = _attention_modules(model)
    torch.manual_seed(seed)
    dev = next(model.parameters()).device
    reads = "qk" if position == "qk" else "x"
    gates = nn.ModuleList([BlockGate(cfg.hidden_size, cfg.num_attention_heads, d_gate, pool, init_std,
                                     trainable=gate == "learned", reads=reads, head_dim=_head_dim(model, attn))
                           for attn in attns]).to(dev)
    model.gatelab_gates = gates
    ctl.gates, ctl.kind, ctl.d_gate, ctl.position = gates, gate, d_gate, position
    ctl.gate_type, ctl.block_size = "block", block_size
    ctl.backend = replace(ctl.backend, block_attention=backend)
    ctl.gate_meta = dict(gate_type="block", block_pool=pool, block_size=block_size, block_rows=BLOCK_ROWS)
    for i, attn in enumerate(attns):
        attn._gatelab["gate"] = gates[i]
    return ctl


def _head_dim(model, attn) -> int:
    cfg = model.config
    return int(getattr(attn, "head_dim", None) or getattr(cfg, "head_dim", None)
               or cfg.hidden_size // cfg.num_attention_heads)


def _set_attn_implementation(model, name: str) -> None:
    for m in model.modules():
        c = getattr(m, "config", None)
        if c is not None and hasattr(c, "_attn_implementation"):
            try:
                c._attn_implementation = name
            except Exception:  # noqa: BLE001 - some configs guard the setter
                c._attn_implementation_internal = name


def set_trainable(model, layers: list[int] | None = None, gates: bool = True) -> list[str]:
    """Freeze everything, then unfreeze the gates (if learned) and the q/k/v/o projections of `layers`."""
    attns = _attention_modules(model)
    for p in model.parameters():
        p.requires_grad_(False)
    names = []
    for i in layers or []:
        if not 0 <= i < len(attns):
            raise GatelabError(f"layer {i} does not exist (the model has {len(attns)})")
        for pname in ("q_proj", "k_proj", "v_proj", "o_proj"):
            for p in getattr(attns[i], pname).parameters():
                p.requires_grad_(True)
            names.append(f"layer {i} {pname}")
    ctl = getattr(model, "gatelab", None)
    if gates and ctl is not None and ctl.kind == "learned":
        for p in ctl.gate_parameters():
            p.requires_grad_(True)
        names.append("gates")
    return names
