"""A Hugging Face model's whole-sequence forward under torch.compile, for dense and gatelab routings alike.

Eagerly a small model's forward is bound by kernel launches, not by attention: at 135M parameters every prompt length
up to 8K takes about the same time, so no attention saving shows. `compile_prefill` compiles the forward calls made
without a key/value cache (perplexity, scoring, the prefill a benchmark times) and leaves every other call (generation
steps with their cache) eager. One compiled graph serves every routing: torch.compile guards on the routing the
controller holds and compiles once per routing and prompt shape.

While torch.compile traces, transformers cannot tell a plain causal prompt from packed sequences and builds the full
T x T boolean mask, which takes the dense path off flash attention and the block path off flex_attention (no work
skipped). `causal_skip_while_compiling` gives no mask (plain causal) for an unpadded prompt, as transformers does
eagerly; pass mask_while_tracing=True to keep transformers' own traced mask.
"""
from __future__ import annotations

import functools

import torch

from gatelab.attention.compiled import raise_recompile_limit
from gatelab.config import COMPILE_MODES, GatelabError
from gatelab.hf.adapter import ATTN_NAME

RECOMPILE_LIMIT = 64  # graphs per compiled forward: one per routing and prompt shape


def causal_skip_while_compiling(*args, **kwargs):
    """transformers' SDPA mask, except None (plain causal) for a prompt without padding, packing or offset while
    torch.compile traces; sliding-window masks and every other call are transformers' own."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    offsets = [kwargs.get(name, 0) for name in ("q_offset", "kv_offset")]
    if (torch.compiler.is_compiling() and kwargs.get("attention_mask") is None and kwargs.get("local_size") is None
            and "q_length" in kwargs and kwargs["q_length"] == kwargs.get("kv_length")
            and all(isinstance(o, int) and o == 0 for o in offsets)):
        return None
    return ALL_MASK_ATTENTION_FUNCTIONS["sdpa"](*args, **kwargs)


def is_prefill_without_cache(args: tuple, kwargs: dict) -> bool:
    """A forward over more than one token with use_cache=False and no cache given."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        ids = kwargs.get("inputs_embeds")
    return (ids is not None and ids.shape[1] > 1 and kwargs.get("use_cache") is False
            and kwargs.get("past_key_values") is None and kwargs.get("cache") is None)


def compile_prefill(model, mode: str = "default", backend: str = "inductor", mask_while_tracing: bool = False):
    """Route `model`'s cache-free whole-sequence forward calls (model(ids, use_cache=False)) through one
    torch.compile of its forward (mode: default | reduce-overhead (CUDA graphs) | max-autotune); other calls stay
    eager. Attach gatelab (attach_gates / attach_block_gates / load_gates) first. Returns the model."""
    if mode not in COMPILE_MODES:
        raise GatelabError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    if getattr(model, "gatelab", None) is None:
        raise GatelabError("attach gatelab to the model (attach_gates, attach_block_gates or load_gates) before "
                           "compile_prefill")
    if getattr(model, "gatelab_eager_forward", None) is not None:
        return model
    if not mask_while_tracing:
        from transformers.masking_utils import AttentionMaskInterface
        AttentionMaskInterface.register(ATTN_NAME, causal_skip_while_compiling)
    raise_recompile_limit(RECOMPILE_LIMIT)
    eager = model.forward
    compiled = torch.compile(eager, mode=mode, backend=backend, dynamic=False)

    @functools.wraps(eager)
    def forward(*args, **kwargs):
        return (compiled if is_prefill_without_cache(args, kwargs) else eager)(*args, **kwargs)

    model.gatelab_eager_forward = eager
    model.forward = forward
    return model
