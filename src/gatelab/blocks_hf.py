"""Block routing on Hugging Face causal LMs (see blocks.py for the routings and the two attention paths).

    model, tok = load_pretrained(...)
    ctl = attach_block_gates(model, d_gate=32, gate="learned", pool="mean", block_size=128, position="qk")
    set_trainable(model, layers=[])
    train_gates(model, ids, "gates/", loss="kl", k=8, context=8192)     # KL against the pooled attention mass
    with ctl.routing(Routing(mode="block-gate", block_size=128, block_k=8)):
        logits = model(input_ids, use_cache=False).logits                 # flex_attention on CUDA

Block gates take the place of the token gates in the adapter's controller (one per layer, per query head), so
hf.set_trainable, hf.train_gates (losses kl and bce), hf.save_gates and hf.load_gates work on them unchanged; the
gate file records gate_type "block", the variant (position: what it pools), the pooling and the block size it was
distilled at. During distillation each layer's dense attention runs through SDPA and only its pooled attention mass
(B, H, nb, nb) is kept, computed by one Triton kernel on CUDA (kernels.block_attention_mass_fused) or in query
chunks: a long context (8K tokens) never holds a T x T tensor per layer.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import BLOCK_ROWS, BlockGate, _repeat_kv, block_attention_mass, block_routed_attention, token_causal
from .config import GatelabError, Routing


BLOCK_POSITIONS = ("none", "qk")  # what a block gate reads (hf_gates' variant names): X, or the model's q and k
# The variant hf-distill --block-size uses when none is named. Rule, written before qk was measured: on SmolLM2-135M
# at 8,192 tokens (results/block/README.md), both variants distilled for the same time on the H100
# (benchmarks/drivers/block_gpu.sh smollm2 with STEPS=auto DISTILL_SECONDS=330: mean pooling, d_gate 32, lr 1e-3, KL), qk
# becomes the default if its gate's perplexity is lower than none's at every block_k evaluated (3, 8, 18);
# otherwise none (the first block gate) stays. Measured (H100, test split, 40,960 tokens): qk 30.42 / 28.33 / 27.71
# (450 steps) against none 37.32 / 30.80 / 28.64 (550 steps) at block_k 3 / 8 / 18, dense 27.45: qk.
DEFAULT_BLOCK_POSITION = "qk"


def attach_block_gates(model, d_gate: int = 32, gate: str = "learned", pool: str = "mean", block_size: int = 128,
                       seed: int = 0, init_std: float | None = None, backend: str = "auto",
                       position: str | None = None):
    """Patch `model` to route attention through gatelab with a block gate per layer; gate: learned | random.
    block_size: the block size distillation pools the attention mass at (deployment may use another).
    backend: the block attention path (auto: flex_attention on CUDA where it skips work; flex; masked).
    position: what the gate pools: "none", the layer's normed input X (no position); "qk", the attention's own
    queries and keys after RoPE (SeerAttention's inputs). None: DEFAULT_BLOCK_POSITION."""
    from .hf import _attention_modules, _head_dim, attach_gates
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
    ctl.gate_type, ctl.block_size, ctl.block_backend = "block", block_size, backend
    ctl.gate_meta = dict(gate_type="block", block_pool=pool, block_size=block_size, block_rows=BLOCK_ROWS)
    for i, attn in enumerate(attns):
        attn._gatelab["gate"] = gates[i]
    return ctl


def token_validity(allowed: torch.Tensor | None, B: int, T: int) -> torch.Tensor | None:
    """(B|1, T) bool: the tokens some query may attend to (not padding), which a block gate pools; None: all."""
    if allowed is None:
        return None
    return allowed.any(-2).any(-2)[..., :T]


def dense_attention(query, key, value, allowed, scale, dropout: float = 0.0):
    """SDPA over the allowed keys (flash when the mask is plain causal); rows with no allowed key give 0."""
    H, T, S = query.shape[1], query.shape[2], key.shape[2]
    key, value = _repeat_kv(key, H), _repeat_kv(value, H)
    if allowed is None and T == S:
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale, dropout_p=dropout)
    mask = allowed if allowed is not None else token_causal(T, S, query.device)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale,
                                          dropout_p=dropout).nan_to_num(0.0)


def block_attention(module, query, key, value, attention_mask, routing: Routing, scaling=None, dropout=0.0):
    """hf.gatelab_attention's block branch: block routings, and the capture of block-gate distillation."""
    from .hf import _allowed_keys
    state = module._gatelab
    ctl = state["controller"]
    B, H, T, D = query.shape
    S_len = key.shape[2]
    scaling = scaling if scaling is not None else D ** -0.5
    if T != S_len:
        raise GatelabError("block routings need the whole key sequence: call the model with use_cache=False")
    allowed = None if attention_mask is None else _allowed_keys(attention_mask, B, T, S_len, query.device)
    drop = dropout if module.training else 0.0
    if ctl.capture is not None:  # block-gate distillation: the dense output, and this layer's pooled mass
        reads_qk = getattr(ctl.gates[state["layer"]], "reads", "x") == "qk"
        ctl.capture.append(dict(mass=block_attention_mass(query, key, ctl.block_size, allowed, scaling),
                                x=state["x"].detach(), valid=token_validity(allowed, B, T), layer=state["layer"],
                                q=query.detach() if reads_qk else None, k=key.detach() if reads_qk else None))
        return dense_attention(query, key, value, allowed, scaling, drop).transpose(1, 2).contiguous(), None
    gate = state.get("gate")
    scores = None
    if routing.needs_block_gate:
        if gate is None or not getattr(gate, "is_block_gate", False):
            raise GatelabError(f"routing {routing.mode} needs block gates: attach_block_gates(model, ...), or "
                               f"--gate GATES saved by `gatelab hf-distill --block-size ...`")
        valid = token_validity(allowed, B, T)
        scores = lambda: gate(state["x"], routing.block_size, valid, q=query, k=key).float()  # noqa: E731
    out = block_routed_attention(query, key, value, routing, gate_scores=scores, layer=state["layer"],
                                 allowed=allowed, scale=scaling, backend=getattr(ctl, "block_backend", "auto"))
    return out.transpose(1, 2).contiguous(), None


# ------------------------------------------------------------------------------------------------------------
# long documents

def encode_long_documents(tokenizer, context: int, corpus: str = "bundled", split: str = "validation",
                          source: str | None = None) -> list[list[int]]:
    """The documents of a corpus split with at least context + 1 tokens (the model's own tokenizer), each cut to
    its whole `context`-token windows plus the one token the last window predicts: every window lies inside
    one document."""
    from .data import corpus_documents
    docs = []
    for doc_split, text in corpus_documents(corpus, source):
        if doc_split != split:
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        n = (len(ids) - 1) // context
        if n >= 1:
            docs.append(ids[:n * context + 1])
    if not docs:
        raise GatelabError(f"{corpus} has no {split} document of more than {context} tokens")
    return docs


def hf_perplexity_docs(model, docs: list[list[int]], routing: Routing, context: int, batch_size: int = 1,
                       max_tokens: int = 0, progress: bool = False) -> dict:
    """Token-weighted perplexity over whole `context`-token windows of each document (hf.hf_perplexity per
    document). max_tokens: stop after the document that reaches about this many tokens (0 = all)."""
    from .hf import hf_perplexity
    nll, count, used = 0.0, 0, 0
    for doc in docs:
        used += 1
        res = hf_perplexity(model, doc, routing, context=context, batch_size=batch_size, progress=progress)
        nll += res["nll"] * res["tokens"]
        count += res["tokens"]
        if max_tokens and count >= max_tokens:
            break
    mean = nll / count
    return dict(routing=routing.label(), nll=mean, ppl=math.exp(mean), tokens=count, documents=used)
