#!/usr/bin/env python3
"""Sparse inference on a Hugging Face model: prefill and decode under block-gate routing beside dense, one GPU.

    PYTHONPATH=src python benchmarks/bench_inference.py --budget-minutes 20                   # SmolLM2-shaped, random
    PYTHONPATH=src python benchmarks/bench_inference.py --compile --compile-mode reduce-overhead
    PYTHONPATH=src python benchmarks/bench_inference.py --model DIR --gguf FILE --gate GATES  # the real model + ppl
    PYTHONPATH=src python benchmarks/bench_inference.py --tiny --out /tmp/inf                # tiny, on CPU

For each context (--contexts, default 8192 and 32768) and batch (--batches, default 1 and 8), the whole model under
dense attention (gatelab's SDPA path) and under block-gate routing at each target block sparsity (--sparsities;
block_k per context as bench_block.py chooses it: the share of causal (query block, key block) tiles skipped; 0 is
the block path keeping every block, which must reproduce dense):

  prefill  one forward over the context, logits of the last position only: eager and (--compile) torch.compile of
           the model's forward, the same compiled function for dense and sparse (while it traces, the unpadded
           prompts' causal mask is left out as transformers leaves it out eagerly: --traced-mask keeps the T x T
           mask transformers builds there, which puts both paths on a masked kernel); the selection alone (every layer's
           gate, top-k and BlockMask, timed on the captured inputs of the first layer); one layer's attention alone
           (dense SDPA, or the block path over that selection) and its effective TFLOP/s; peak memory; perplexity
           with --model and a tokenizer
  decode   greedy decoding with the KV cache: a prefill of the context, then --new-tokens steps of one token per
           sequence; tokens/s, whether the tokens are dense's, one layer's attention per step alone, peak memory

Writes <out>/inference-<device>.{json,md} after every row (a stopped run keeps its rows), with the device, torch
version and command; each row also records the wall seconds it took to measure (row_s), for budgeting a run. A measurement that fails (a compile error, out of memory) is recorded in its row and the run
goes on; the exit status is then 1.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import transformers
from transformers import AttentionInterface, DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import inference_targets  # noqa: E402
from bench_block import SMOLLM2, TINY, Budget, distinct_block_ks, fmt, kept_tiles, load_model, sync, timed  # noqa: E402
from gatelab.attention.attend import dense_attention  # noqa: E402
from gatelab.attention.block_attention import block_sparse_attention, resolve_backend, selection_scores  # noqa: E402
from gatelab.attention.block_decode import BlockDecodeCache, block_decode_attention  # noqa: E402
from gatelab.attention.blocks import select_blocks  # noqa: E402
from gatelab.attention.flex import block_mask_from_factors, block_mask_from_scores, compiled_flex  # noqa: E402
from gatelab.attention.masks import allowed_keys  # noqa: E402
from gatelab.config import COMPILE_MODES, GatelabError, Routing, atomic_path  # noqa: E402
from inference_targets import COMPILED_GRAPHED_CACHE, GRAPHED_CACHE  # noqa: E402
from gatelab.hf.adapter import ATTN_NAME, attach_block_gates, gatelab_attention, layer_gate  # noqa: E402
from gatelab.hf.cache import cache_keyword, kv_cache  # noqa: E402
from gatelab.hf.graphed import GRAPH_WARM_STEPS, fixed_greedy, steady_window  # noqa: E402
from gatelab.hf.compile import compile_prefill  # noqa: E402
from gatelab.hf.corpus import encode_long_documents  # noqa: E402
from gatelab.hf.evaluate import hf_perplexity_docs  # noqa: E402
from gatelab.kernels.triton_support import available  # noqa: E402

# bf16 dense (no structured sparsity) tensor-core peaks, TFLOP/s, by a part of the device name; first match wins
PEAK_BF16_TFLOPS = (("h200", 989.0), ("h100 pcie", 756.0), ("h100", 989.0), ("a100", 312.0))
ROPE_THETA = 1_000_000.0  # random weights: a RoPE base for 32K-128K positions
TINY_PRESET = dict(contexts=[256], batches=[1, 2], block_size=16, new_tokens=16, iters=2, warmup=1)
FULL_PRESET = dict(contexts=[8192, 32768], batches=[1, 8], block_size=128, new_tokens=64, iters=10, warmup=3)


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny random model at 256 tokens, block size 16 (CPU)")
    ap.add_argument("--shape", choices=("smollm2", "tiny"), default="smollm2", help="random weights of this shape")
    ap.add_argument("--model", help="a local Hugging Face model folder (default: random weights of --shape)")
    ap.add_argument("--gguf", help="a GGUF file inside --model")
    ap.add_argument("--gate", help="block gates from `gatelab hf-distill --block-size` for --model")
    ap.add_argument("--contexts", type=int_list, help="prompt lengths (default 8192,32768)")
    ap.add_argument("--batches", type=int_list, help="batch sizes (default 1,8)")
    ap.add_argument("--sparsities", type=lambda s: [float(x) for x in s.split(",") if x],
                    default=[0.0, 0.5, 0.75, 0.875], help="target block sparsities (0: every block kept)")
    ap.add_argument("--block-size", type=int, help="routing block size (default 128)")
    ap.add_argument("--new-tokens", type=int, help="decode steps after the prefill (default 64)")
    ap.add_argument("--graph-compile", action="store_true", help="also decode rows whose CUDA-graphed steps run "
                    "through torch.compile (kv_cache 'fixed, CUDA graphs, compiled')")
    ap.add_argument("--graph-steps", type=int, default=320, help="decode steps of the CUDA-graphed rows (at "
                    "least three query blocks from a block edge: timed from the step after the graph of the steps "
                    "that start a block is recorded, over whole blocks; dense from step %d)" % GRAPH_WARM_STEPS)
    ap.add_argument("--iters", type=int, help="timed calls per prefill measurement (median; default 10)")
    ap.add_argument("--warmup", type=int, help="untimed calls before them (default 3)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the model's forward (CUDA)")
    ap.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                    help="torch.compile mode (reduce-overhead: CUDA graphs)")
    ap.add_argument("--traced-mask", action="store_true", help="compiled: keep the T x T causal mask transformers "
                    "builds while tracing (by default none for the unpadded prompts, as eagerly)")
    ap.add_argument("--block-attention", default="auto", choices=("auto", "flex", "masked"),
                    help="the block path's attention (Backend.block_attention)")
    ap.add_argument("--compile-blocks", action="store_true", help="Backend.compile_blocks: the gate's scores and "
                    "block lists from compiled graphs in the eager forward")
    ap.add_argument("--block-factors-kernel", action=argparse.BooleanOptionalAction, default=None,
                    help="Backend.block_factors_kernel: the gate's factors in one Triton launch in the eager forward "
                    "(default: the backend's, on unless GATELAB_BLOCK_FACTORS_KERNEL=0)")
    ap.add_argument("--skip", default="", help="comma-separated parts to leave out: prefill, decode, ppl, "
                    "dynamic-cache (the dense decode row with transformers' DynamicCache), eager-decode (the decode "
                    "rows with eager steps), graphs (the decode rows "
                    "over a cache of fixed size with CUDA-graphed steps), selection-compiled")
    ap.add_argument("--profile", action="store_true", help="also profile each row once (torch.profiler): the GPU's "
                    "busy share of the wall time and the top kernels (one prefill call; --profile-steps decode steps)")
    ap.add_argument("--profile-steps", type=int, default=4, help="decode steps profiled with --profile (default 4)")
    ap.add_argument("--ppl-split", default="test", choices=("validation", "test"))
    ap.add_argument("--ppl-tokens", type=int, default=0, help="stop each perplexity after about this many tokens")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--budget-minutes", type=float, help="start no new row after this many minutes")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--tag", default="", help="appended to the output names: inference-<device>-<tag>.{json,md}")
    args = ap.parse_args(argv)
    if args.tiny:
        args.shape = "tiny"
    for name, value in (TINY_PRESET if args.tiny else FULL_PRESET).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    bad = [T for T in args.contexts if T % args.block_size]
    if bad:
        ap.error(f"contexts {bad} are not multiples of the block size {args.block_size}")
    return args


# ------------------------------------------------------------------------------------------------------------
@dataclass
class Bench:
    """What every row reads: the model, its controller, where and how to time, and the results so far."""

    args: argparse.Namespace
    model: object
    tok: object
    ctl: object
    device: torch.device
    dtype: torch.dtype
    budget: Budget
    data: dict
    eager: object = None  # the model's eager forward
    compiled: object = None  # the compiled cache-free forward (hf.compile.compile_prefill), one for dense and sparse
    cache_kw: str = "past_key_values"
    ppl: dict = field(default_factory=dict)
    docs: dict = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def peak_tflops(name: str) -> float | None:
    low = name.lower()
    return next((v for key, v in PEAK_BF16_TFLOPS if key in low), None)


def random_model(args, dims, device, dtype):
    """Random weights of the given dims (Llama layout), RoPE base and positions extended for long contexts, and
    random block gates."""
    torch.manual_seed(0)
    positions = max(131072, max(args.contexts) + args.new_tokens + 1)
    cfg = transformers.LlamaConfig(vocab_size=dims["vocab"], hidden_size=dims["hidden"],
                                   intermediate_size=dims["intermediate"], num_hidden_layers=dims["layers"],
                                   num_attention_heads=dims["heads"], num_key_value_heads=dims["kv_heads"],
                                   head_dim=dims["head_dim"], max_position_embeddings=positions,
                                   rope_theta=ROPE_THETA, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    ctl = attach_block_gates(model, d_gate=32, gate="random", block_size=args.block_size)
    return model, None, ctl


def build(args) -> Bench:
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dims = TINY if args.shape == "tiny" else SMOLLM2
    if args.model:
        model, tok, ctl = load_model(args, dims, device, dtype)
    else:
        model, tok, ctl = random_model(args, dims, device, dtype)
    ctl.backend = replace(ctl.backend, block_attention=args.block_attention,
                          compile_blocks=args.compile_blocks or ctl.backend.compile_blocks,
                          block_factors_kernel=ctl.backend.block_factors_kernel if args.block_factors_kernel is None
                          else args.block_factors_kernel)
    for name in ("recompile_limit", "cache_size_limit", "accumulated_cache_size_limit"):  # a graph per shape, routing
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 512)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    note = (f"model {args.model}{' / ' + args.gguf if args.gguf else ''}, gate {args.gate or 'random'}" if args.model
            else f"{'tiny' if args.shape == 'tiny' else 'SmolLM2-135M'}-shaped random weights, RoPE base "
                 f"{ROPE_THETA:g}, random qk block gates")
    note += (f": {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} query heads, {cfg.num_key_value_heads} "
             f"key/value heads, head dim {head_dim}")
    compile_on = args.compile and device.type == "cuda"
    data = dict(device=name, torch=torch.__version__, transformers=transformers.__version__,
                command="python " + shlex.join(sys.argv), model_note=note, dtype=str(dtype).replace("torch.", ""),
                block_size=args.block_size, iters=args.iters, warmup=args.warmup, new_tokens=args.new_tokens,
                graph_steps=args.graph_steps,
                compile=compile_on, compile_mode=args.compile_mode if compile_on else None,
                compile_note=None if compile_on or not args.compile else "torch.compile is timed on CUDA only",
                compile_mask=None, layers=cfg.num_hidden_layers, real_model=bool(args.model),
                profiled=args.profile, backend=ctl.backend.describe(), peak_bf16_tflops=peak_tflops(name), prompts={},
                prefill=[], decode=[], finished=False)
    b = Bench(args, model, tok, ctl, device, dtype, Budget(args.budget_minutes), data, eager=model.forward,
              cache_kw=cache_keyword(model))
    if compile_on:
        start_compile(b)
    return b


def start_compile(b: Bench) -> None:
    """One torch.compile of the model's cache-free forward for every compiled row (gatelab.hf.compile); the causal
    mask left out while tracing unless --traced-mask."""
    compile_prefill(b.model, mode=b.args.compile_mode, mask_while_tracing=b.args.traced_mask)
    b.eager, b.compiled = b.model.gatelab_eager_forward, b.model.forward
    b.data.update(compile=True, compile_mode=b.args.compile_mode,
                  compile_mask="transformers' traced T x T mask" if b.args.traced_mask else
                  "none for unpadded causal prefill (skipped while tracing, as transformers does eagerly)")


# ------------------------------------------------------------------------------------------------------------
def attempt(row: dict, key: str, thunk):
    """thunk(), or None with the error recorded in the row (the run goes on)."""
    try:
        return thunk()
    except Exception as e:  # noqa: BLE001 - a compile error or out of memory ends this measurement only
        msg = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        row.setdefault("errors", {})[key] = msg
        print(f"  ({row.get('routing')} {key} failed: {msg})", flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None


def release(model) -> None:
    """Drop what the adapter keeps between calls (each layer's last input, the decode caches), so that one row's
    tensors are not counted in the next row's peak memory."""
    for m in model.modules():
        state = getattr(m, "_gatelab", None)
        if state is not None:
            state["x"] = state["rope"] = None
            state.pop("decode", None)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def settings(b: Bench, T: int) -> list[tuple]:
    """(target sparsity, block_k, achieved sparsity, routing) per setting at context T, dense first. Every block
    kept (sparsity 0) means every block of the decoded sequence too: block_k covers the new tokens' blocks."""
    bs = b.args.block_size
    out = [(None, None, None, Routing())]
    for target, bk, achieved in distinct_block_ks(T // bs, b.args.sparsities, minimum=1):
        if bk == T // bs - 1:  # every earlier block of the prompt: keep those of the new tokens as well
            bk = -(-(T + max(b.args.new_tokens, b.args.graph_steps) + 1) // bs)
        out.append((target, bk, round(achieved, 4), Routing(mode="block-gate", block_size=bs, block_k=bk)))
    return out


def long_docs(b: Bench, T: int) -> list | None:
    """The bundled split's documents of more than T tokens (the model's tokenizer), or None."""
    if b.tok is None:
        return None
    if T not in b.docs:
        try:
            b.docs[T] = encode_long_documents(b.tok, T, "bundled", b.args.ppl_split)
        except GatelabError as e:
            print(f"  (no text for {T} tokens: {e})", flush=True)
            b.docs[T] = None
    return b.docs[T]


def prompt_ids(b: Bench, T: int, B: int) -> torch.Tensor:
    """B prompts of T tokens: the first T tokens of the bundled documents (a real tokenizer), else random ids."""
    docs = long_docs(b, T)
    if docs:
        b.data["prompts"][str(T)] = f"bundled {b.args.ppl_split} documents longer than {T} tokens, first {T} tokens"
        return torch.tensor([docs[i % len(docs)][:T] for i in range(B)], device=b.device)
    b.data["prompts"][str(T)] = "random token ids"
    g = torch.Generator().manual_seed(1000 * T + B)
    return torch.randint(0, b.model.config.vocab_size, (B, T), generator=g).to(b.device)


def write(b: Bench) -> None:
    """The JSON and markdown, each replaced in one rename."""
    out = Path(b.args.out)
    slug = "inference-" + re.sub(r"[^a-z0-9]+", "-", b.data["device"].lower()).strip("-")
    slug += f"-{b.args.tag}" if b.args.tag else ""
    with atomic_path(out / f"{slug}.json") as tmp:
        tmp.write_text(json.dumps(b.data, indent=1) + "\n")
    with atomic_path(out / f"{slug}.md") as tmp:
        tmp.write_text(markdown(b.data))


# ------------------------------------------------------------------------------------------------------------
class _Captured(Exception):
    """Stops a forward once the first layer's attention inputs are kept."""


def capture_first_layer(b: Bench, ids: torch.Tensor) -> dict:
    """The first layer's attention inputs for ids (queries and keys after RoPE, values, the layer's input X, its
    allowed keys and scale), from a forward stopped inside that layer's attention."""
    box = {}

    def grab(module, query, key, value, attention_mask, scaling=None, **kwargs):
        B, H, T, _ = query.shape
        allowed = None if attention_mask is None else allowed_keys(attention_mask, B, T, key.shape[2], query.device)
        box.update(q=query, k=key, v=value, x=module._gatelab["x"], allowed=allowed, scale=scaling)
        raise _Captured

    AttentionInterface.register(ATTN_NAME, grab)
    try:
        with torch.no_grad(), b.ctl.routing(Routing()):
            b.eager(ids, use_cache=False, logits_to_keep=1)
    except _Captured:
        pass
    finally:
        AttentionInterface.register(ATTN_NAME, gatelab_attention)
    if not box:
        raise RuntimeError("the first layer's attention was not reached")
    return box


def select_layer(ctl, routing: Routing, gate, cap: dict):
    """One layer's block selection as block_routed_attention makes it before attending: the gate's factors and the
    fused selection kernel's BlockMask (CUDA, flex path), else the gate's scores, their top-k block lists and the
    BlockMask (flex path) or keep-mask (masked path). Returns the BlockMask or the keep-mask."""
    q, k, allowed = cap["q"], cap["k"], cap["allowed"]
    T, bs, bk = q.shape[2], routing.block_size, routing.block_k
    backend = ctl.backend
    gate_scores = layer_gate(ctl, dict(gate=gate, x=cap["x"]), routing, q, k, allowed)
    path = resolve_backend(backend.block_attention, q, bs, allowed)
    if backend.kernels and available(q) and path == "flex":
        gq, gk = gate_scores.factors()
        return block_mask_from_factors(gq, gk, bk, bs, T, backward=False)
    scores = selection_scores(q, k, routing, gate_scores.scores, 0, allowed, cap["scale"])
    if path == "flex":
        return block_mask_from_scores(scores, bk, bs, T, backward=False, compiled=backend.compile_blocks)
    return select_blocks(scores.detach(), bk)


def attention_flops(routing: Routing, B: int, H: int, T: int, D: int) -> float:
    """Forward FLOPs of the causal (query, key) pairs computed: 4 B H D per pair (QK^T and PV); under a block routing
    the kept earlier blocks' pairs and the diagonal blocks' causal ones."""
    if not routing.is_block:
        return 4.0 * B * H * D * T * (T + 1) / 2
    bs = routing.block_size
    nb = T // bs
    pairs = bs * bs * (kept_tiles(nb, routing.block_k) - nb) + nb * bs * (bs + 1) / 2
    return 4.0 * B * H * D * pairs


def attention_call(routing: Routing, cap: dict, selection) -> tuple[str, object]:
    """(path, a call of one layer's attention on the captured inputs) as the routed forward runs it: dense SDPA, or
    the block path over `selection` (flex: compiled flex_attention over the BlockMask; masked: SDPA with the token
    mask)."""
    q, k, v, scale, allowed = cap["q"], cap["k"], cap["v"], cap["scale"], cap["allowed"]
    if not routing.is_block:
        return "sdpa", lambda: dense_attention(q, k, v, allowed, scale)
    if isinstance(selection, torch.Tensor):  # a keep-mask: the masked path
        return "masked", lambda: block_sparse_attention(q, k, v, selection, routing.block_size, allowed, scale,
                                                        "masked")
    flex = compiled_flex()
    return "flex", lambda: flex(q, k, v, block_mask=selection, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def layer_columns(b: Bench, row: dict, routing: Routing, cap: dict) -> None:
    """The selection alone (every layer's gate on the first layer's inputs) and one layer's attention alone."""
    args, ctl, dev = b.args, b.ctl, b.device
    B, H, T, D = cap["q"].shape
    sel = None
    with torch.no_grad():
        if routing.is_block:
            every_layer = lambda: [select_layer(ctl, routing, g, cap) for g in ctl.gates]  # noqa: E731
            row["selection_ms"] = attempt(row, "selection", lambda: timed(every_layer, dev, args.iters,
                                                                           args.warmup)[0])
            if args.profile:
                row["selection_profile"] = attempt(row, "selection profile", lambda: profile(every_layer, dev, 1))
            if b.compiled is not None and "selection-compiled" not in args.skip.split(","):
                fn = torch.compile(every_layer, mode=args.compile_mode, dynamic=False)
                row["selection_compiled_ms"] = attempt(row, "selection compiled", lambda: timed(
                    fn, dev, args.iters, max(args.warmup, 3))[0])
            sel = attempt(row, "selection", lambda: select_layer(ctl, routing, ctl.gates[0], cap))
            if sel is None:
                return
        path, attend = attention_call(routing, cap, sel)
        ms = attempt(row, "attention", lambda: timed(attend, dev, args.iters, args.warmup)[0])
    row.update(attention_path=path, attention_ms=ms)
    if ms and b.cuda and path != "masked":  # the masked path computes every pair: no FLOPs skipped to count
        row["attention_tflops"] = attention_flops(routing, B, H, T, D) / ms / 1e9


def perplexity(b: Bench, T: int, routing: Routing) -> dict | None:
    """Perplexity at context T under routing on the bundled long documents (a real model and tokenizer only)."""
    if b.tok is None or "ppl" in b.args.skip.split(","):
        return None
    key = (T, routing.label())
    if key not in b.ppl:
        docs = long_docs(b, T)
        b.ppl[key] = None if not docs else hf_perplexity_docs(b.model, docs, routing, T, batch_size=1,
                                                              max_tokens=b.args.ppl_tokens)
    return b.ppl[key]


# ------------------------------------------------------------------------------------------------------------
def prefill_forward(fn, ctl, routing: Routing, ids: torch.Tensor):
    with torch.no_grad(), ctl.routing(routing):
        return fn(ids, use_cache=False, logits_to_keep=1).logits


def prefill_row(b: Bench, T: int, B: int, ids, setting: tuple, dense: dict | None) -> dict:
    target, bk, achieved, r = setting
    args, model, ctl = b.args, b.model, b.ctl
    row = dict(kind="prefill", context=T, batch=B, routing=r.label(), block_k=bk, target_sparsity=target,
               sparsity=achieved if r.is_block else 0.0)
    release(model)
    spread = {}
    eager = attempt(row, "eager", lambda: timed(lambda: prefill_forward(b.eager, ctl, r, ids), b.device,
                                                  args.iters, args.warmup, absolute_peak=True, spread=spread))
    row["eager_ms"], row["peak_mib"] = eager if eager else (None, None)
    row.update({f"eager_{k}": v for k, v in spread.items()})
    if b.compiled is not None:
        release(model)
        spread = {}
        comp = attempt(row, "compiled", lambda: timed(lambda: prefill_forward(b.compiled, ctl, r, ids), b.device,
                                                        args.iters, max(args.warmup, 3), absolute_peak=True,
                                                        spread=spread))
        row["compiled_ms"], row["compiled_peak_mib"] = comp if comp else (None, None)
        row.update({f"compiled_{k}": v for k, v in spread.items()})
    if args.profile:
        release(model)
        fn = b.compiled if row.get("compiled_ms") else b.eager
        row["profile"] = attempt(row, "profile", lambda: profile(lambda: prefill_forward(fn, ctl, r, ids), b.device, 1))
    release(model)
    cap = attempt(row, "capture", lambda: capture_first_layer(b, ids))
    if cap is not None:
        layer_columns(b, row, r, cap)
    del cap
    release(model)
    ref = row if not r.is_block else dense or {}  # no ratio when the dense row is missing
    for key in ("eager_ms", "compiled_ms", "attention_ms"):
        mine, theirs = row.get(key), ref.get(key)
        row[key.replace("_ms", "_speedup")] = theirs / mine if mine and theirs else None
    res = attempt(row, "ppl", lambda: perplexity(b, T, r))
    if res:
        row.update(ppl=res["ppl"], ppl_tokens=res["tokens"])
    return row


def new_cache(b: Bench, capacity: int, dynamic: bool):
    """The decode rows' KV cache: gatelab's in-place cache (hf.cache.kv_cache), or transformers' DynamicCache."""
    if not dynamic:
        return kv_cache(b.model, capacity)
    try:
        return DynamicCache(config=b.model.config)
    except TypeError:  # transformers before caches took the config
        return DynamicCache()


def decode_once(b: Bench, routing: Routing, ids: torch.Tensor, steps: int, dynamic: bool = False,
                profile_steps: int = 0) -> dict:
    """Greedy decoding with the KV cache: the prefill of ids (the first new token from its last logits), then
    `steps` forwards of one token per sequence. Times of each phase, the steps+1 new tokens, peak memory; with
    profile_steps, a profile of that many further steps."""
    dev = b.device
    cache = new_cache(b, ids.shape[1] + steps + profile_steps + 1, dynamic)
    if b.cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    with torch.no_grad(), b.ctl.routing(routing):
        sync(dev)
        t0 = time.perf_counter()
        out = b.eager(ids, use_cache=True, logits_to_keep=1, **{b.cache_kw: cache})
        tok = out.logits[:, -1:].argmax(-1)
        sync(dev)
        t1 = time.perf_counter()
        new = [tok]
        step = lambda t: b.eager(t, use_cache=True, **{b.cache_kw: cache}).logits[:, -1:].argmax(-1)  # noqa: E731
        for _ in range(steps):
            tok = step(tok)
            new.append(tok)
        sync(dev)
        t2 = time.perf_counter()
        peak = torch.cuda.max_memory_allocated(dev) / 2 ** 20 if b.cuda else None
        box = [tok]
        prof = profile(lambda: box.append(step(box[-1])), dev, profile_steps) if profile_steps else None
    return dict(prefill_ms=1000 * (t1 - t0), decode_ms=1000 * (t2 - t1), tokens=torch.cat(new, 1).cpu(),
                peak_mib=peak, profile=prof)


def profile(fn, dev, calls: int, top: int = 10) -> dict:
    """fn run `calls` times under torch.profiler: wall ms per call and, on CUDA, the GPU kernel ms per call (their
    sum: the GPU's busy time when kernels do not overlap), launches per call and the kernels with the most GPU time;
    on CPU the operators with the most self CPU time."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    cuda = dev.type == "cuda"
    sync(dev)
    with torch_profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(dev)
        wall = (time.perf_counter() - t0) * 1000 / calls
    if cuda:
        kernels = [(e.name, e.time_range.elapsed_us() / 1000) for e in prof.events() if e.device_type.name == "CUDA"]
    else:
        kernels = [(a.key, a.self_cpu_time_total / 1000 / a.count) for a in prof.key_averages() for _ in range(a.count)]
    by_name: dict = {}
    for name, ms in kernels:
        total, n = by_name.get(name, (0.0, 0))
        by_name[name] = (total + ms / calls, n + 1)
    tops = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    return dict(calls=calls, wall_ms=wall, gpu_kernel_ms=sum(ms for _, ms in kernels) / calls if cuda else None,
                kernels_per_call=len(kernels) / calls if cuda else None,
                top=[dict(name=n[:90], ms=ms, launches=c // calls) for n, (ms, c) in tops])


def graph_ms(fn, replays: int = 100, calls: int = 1) -> float:
    """GPU time of one call of fn: `calls` calls captured once in a CUDA graph, then the mean over `replays`
    back-to-back replays (no host launch or synchronisation per call)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / (replays * calls)


def decode_attention(b: Bench, routing: Routing, B: int, T: int) -> dict:
    """One layer's attention for one new token per sequence at position T over a cache of T + 1 positions (random
    values of the model's shapes): gatelab's dense path (what the dense rows run: SDPA over the key/value heads), or
    block_decode_attention, its kept blocks chosen in the warm-up (block-random's fixed choice: the per-step cost does
    not depend on which blocks). Per call with the host's launch and a synchronisation (median), and on CUDA the GPU
    time alone (graph_ms)."""
    cfg, args, dev = b.model.config, b.args, b.device
    H, Hk = cfg.num_attention_heads, cfg.num_key_value_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    g = torch.Generator(device=dev).manual_seed(0)
    q_all = torch.randn(B, H, T + 1, D, device=dev, dtype=b.dtype, generator=g)
    k, v = (torch.randn(B, Hk, T + 1, D, device=dev, dtype=b.dtype, generator=g) for _ in range(2))
    q = q_all[:, :, -1:]
    with torch.no_grad():
        if routing.is_block:
            cache = BlockDecodeCache()
            cache.extend(q_all, None, 0)
            r, kernels = replace(routing, mode="block-random"), b.ctl.backend.kernels
            call = lambda: block_decode_attention(q, k, v, r, cache, kernels=kernels)  # noqa: E731
        else:
            call = lambda: dense_attention(q, k, v)  # noqa: E731
        out = dict(attention_step_ms=timed(call, dev, args.iters, args.warmup)[0])
        if b.cuda:
            out["attention_step_gpu_ms"] = graph_ms(call)
    return out


def decode_row(b: Bench, T: int, B: int, ids, setting: tuple, dense: dict | None, dynamic: bool = False) -> dict:
    """One decode row; dynamic: dense decoding with transformers' DynamicCache (which copies the whole cache at every
    step), beside the dense row with the in-place cache."""
    target, bk, achieved, r = setting
    N = b.args.new_tokens
    row = dict(kind="decode", context=T, batch=B, routing=r.label(), block_k=bk, target_sparsity=target,
               sparsity=achieved if r.is_block else 0.0, new_tokens=N,
               kv_cache="transformers DynamicCache" if dynamic else "in-place")
    bs = r.block_size
    row["keys_read_share"] = (min(bk, T // bs) * bs + 1) / (T + 1) if r.is_block else 1.0
    release(b.model)
    attempt(row, "warm-up", lambda: decode_once(b, r, ids, min(2, N), dynamic))
    release(b.model)
    steps = b.args.profile_steps if b.args.profile else 0
    res = attempt(row, "decode", lambda: decode_once(b, r, ids, N, dynamic, steps))
    release(b.model)
    if res:
        tokens = res.pop("tokens")
        row.update(res, ms_per_step=res["decode_ms"] / N if N else None,
                   tokens_per_s=B * N / (res["decode_ms"] / 1000) if N else None, tokens=tokens.tolist())
        ref = row if not (r.is_block or dynamic) else dense or {}  # no comparison when the dense row is missing
        if ref.get("tokens"):
            same = tokens == torch.tensor(ref["tokens"])
            row.update(same_tokens_as_dense=bool(same.all()), token_agreement=float(same.float().mean()),
                       first_difference=None if bool(same.all()) else int(same.all(0).logical_not().nonzero()[0]))
        theirs = ref.get("tokens_per_s")
        row["speedup"] = row["tokens_per_s"] / theirs if theirs and row["tokens_per_s"] else None
    if not dynamic:
        row.update(attempt(row, "attention", lambda: decode_attention(b, r, B, T)) or {})
    return row


def graphed_once(b: Bench, routing: Routing, ids: torch.Tensor, steps: int, compiled: bool = False) -> dict:
    """Greedy decoding over a cache of fixed size with CUDA-graphed steps (hf/graphed.py; eager steps without CUDA):
    the prefill, then `steps` steps, of which steady_window's are timed (warm_ms: the steps before them, with each
    kind of step's eager warm-up, recording and any compilation)."""
    if steady_window(ids.shape[1], steps, routing) is None:
        raise ValueError(f"{steps} graphed steps leave no steady window (whole query blocks after the warm-up)")
    if b.cuda:
        torch.cuda.reset_peak_memory_stats(b.device)
    t: dict = {}
    tokens = fixed_greedy(b.model, ids, routing, steps + 1, graphs=b.cuda, compiled=compiled, timings=t)
    peak = torch.cuda.max_memory_allocated(b.device) / 2 ** 20 if b.cuda else None
    return dict(prefill_ms=1000 * t["prefill_s"], warm_ms=1000 * t["warm_s"], decode_ms=1000 * t["steady_s"],
                timed_steps=t["steady_steps"], window=t["window"], tokens=tokens.cpu(), peak_mib=peak)


def graphed_row(b: Bench, T: int, B: int, ids, setting: tuple, dense: dict | None, compiled: bool = False) -> dict:
    """One decode row with CUDA-graphed steps (--graph-steps of them); its speed and tokens against `dense`: the
    graphed dense row for a block row, the eager in-place dense row for the graphed dense row."""
    target, bk, achieved, r = setting
    N = b.args.graph_steps
    row = dict(kind="decode", context=T, batch=B, routing=r.label(), block_k=bk, target_sparsity=target,
               sparsity=achieved if r.is_block else 0.0, new_tokens=N,
               kv_cache=(COMPILED_GRAPHED_CACHE if compiled else GRAPHED_CACHE) if b.cuda else
               "fixed, compiled" if compiled else "fixed, eager")
    row["keys_read_share"] = (min(bk, T // r.block_size) * r.block_size + 1) / (T + 1) if r.is_block else 1.0
    release(b.model)
    res = attempt(row, "decode", lambda: graphed_once(b, r, ids, N, compiled))
    release(b.model)
    if res:
        tokens = res.pop("tokens")
        n = res["timed_steps"]
        row.update(res, ms_per_step=res["decode_ms"] / n, tokens_per_s=B * n / (res["decode_ms"] / 1000),
                   tokens=tokens.tolist())
        if dense and dense.get("tokens"):
            theirs = torch.tensor(dense["tokens"])
            n = min(theirs.shape[1], tokens.shape[1])  # the eager dense row decodes fewer steps
            same = tokens[:, :n] == theirs[:, :n]
            row.update(same_tokens_as_dense=bool(same.all()), token_agreement=float(same.float().mean()),
                       first_difference=None if bool(same.all()) else int(same.all(0).logical_not().nonzero()[0]))
        theirs = (dense or {}).get("tokens_per_s")
        row["speedup"] = row["tokens_per_s"] / theirs if theirs else None
    return row


# ------------------------------------------------------------------------------------------------------------
def run_rows(b: Bench, kind: str, T: int, B: int, ids) -> None:
    """The rows of one kind (prefill or decode) at context T and batch B, dense first; JSON after each."""
    make = prefill_row if kind == "prefill" else decode_row
    dense = dense_graphed = dense_compiled = None
    for setting in settings(b, T):
        r = setting[3]
        if b.budget.over():
            b.data[kind].append(dict(kind=kind, context=T, batch=B, routing=r.label(), block_k=setting[1],
                                     sparsity=setting[2], skipped="budget"))
            write(b)
            continue
        eager = kind == "prefill" or "eager-decode" not in b.args.skip.split(",")
        rows = [seconds_taken(make, b, T, B, ids, setting, dense)] if eager else []
        if not r.is_block and eager:
            dense = rows[0]
            if kind == "decode" and "dynamic-cache" not in b.args.skip.split(","):
                rows.append(seconds_taken(decode_row, b, T, B, ids, setting, dense, dynamic=True))
        if kind == "decode" and "graphs" not in b.args.skip.split(",") and r.mode in ("dense", "block-gate"):
            rows.append(seconds_taken(graphed_row, b, T, B, ids, setting, dense_graphed if r.is_block else dense))
            dense_graphed = dense_graphed or (None if r.is_block else rows[-1])
            if b.args.graph_compile:
                rows.append(seconds_taken(graphed_row, b, T, B, ids, setting,
                                          dense_compiled if r.is_block else dense, True))
                dense_compiled = dense_compiled or (None if r.is_block else rows[-1])
        for row in rows:
            b.data[kind].append(row)
            write(b)
            print(progress_line(row), flush=True)


def seconds_taken(row_fn, *args, **kwargs) -> dict:
    """row_fn's row with the wall seconds it took to measure (row_s: compilation, profiles and perplexity included),
    what a run's --budget-minutes has to cover."""
    t0 = time.perf_counter()
    row = row_fn(*args, **kwargs)
    row["row_s"] = round(time.perf_counter() - t0, 3)
    return row


def progress_line(row: dict) -> str:
    cache = "" if row.get("kv_cache", "in-place") == "in-place" else f" ({row['kv_cache']})"
    head = (f"[{row['kind']}] {row['context']} x{row['batch']} {row['routing']}{cache} (s={fmt(row.get('sparsity'))}, "
            f"{fmt(row.get('row_s'), 1)} s)")
    if row["kind"] == "prefill":
        return (f"{head}: eager {fmt(row.get('eager_ms'), 2)} ms ({fmt(row.get('eager_speedup'), 2)}x), compiled "
                f"{fmt(row.get('compiled_ms'), 2)} ms, selection {fmt(row.get('selection_ms'), 2)} ms, attention "
                f"{fmt(row.get('attention_ms'), 3)} ms, ppl {fmt(row.get('ppl'))}")
    return (f"{head}: {fmt(row.get('tokens_per_s'), 1)} tokens/s ({fmt(row.get('speedup'), 2)}x), "
            f"{fmt(row.get('ms_per_step'), 2)} ms/step, same tokens as dense {fmt(row.get('same_tokens_as_dense'))}, "
            f"attention/step {fmt(row.get('attention_step_ms'), 3)} ms")


def main(argv=None) -> int:
    args = parse_args(argv)
    b = build(args)
    skip = {s for s in args.skip.split(",") if s}
    print(f"{b.data['device']}: {b.data['model_note']}; compile {b.data['compile_mode'] or 'off'}", flush=True)
    for T in args.contexts:
        for B in args.batches:
            ids = prompt_ids(b, T, B)
            for kind in ("prefill", "decode"):
                if kind not in skip:
                    run_rows(b, kind, T, B, ids)
    b.data["finished"] = True
    write(b)
    print(markdown(b.data))
    failed = [r for r in b.data["prefill"] + b.data["decode"] if r.get("errors")]
    return 1 if failed else 0


# ------------------------------------------------------------------------------------------------------------
def gib(mib) -> str:
    return "-" if mib is None else f"{mib / 1024:.2f}"


def times(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


def timing_cell(r: dict, kind: str) -> str:
    """A prefill time: the median, with the fastest and slowest timed call where the row has them."""
    lo, hi = r.get(f"{kind}_min_ms"), r.get(f"{kind}_max_ms")
    spread = "" if lo is None or hi is None else f" ({lo:.2f}-{hi:.2f})"
    return fmt(r.get(f"{kind}_ms"), 2) + spread


def setting_cell(r: dict) -> str:
    return "-" if r.get("block_k") is None else f"{r['sparsity']:.3f} ({r['block_k']})"


def prefill_table(data: dict) -> list[str]:
    peak = data.get("peak_bf16_tflops")
    lines = ["| context | batch | routing | sparsity (block_k) | eager ms | vs dense | compiled ms | vs dense | "
             "selection ms (eager / compiled) | peak GiB | attention ms, one layer (path) | attention TFLOP/s "
             "(% of peak) | ppl |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["prefill"]:
        head = f"| {r['context']} | {r['batch']} | {r['routing']} | {setting_cell(r)} |"
        if "skipped" in r:
            lines.append(f"{head} skipped ({r['skipped']}) |" + " |" * 8)
            continue
        tf = r.get("attention_tflops")
        tf_cell = "-" if tf is None else f"{tf:.1f}" + (f" ({100 * tf / peak:.1f}%)" if peak else "")
        sel = ("-" if r.get("block_k") is None else
               f"{fmt(r.get('selection_ms'), 2)} / {fmt(r.get('selection_compiled_ms'), 2)}")
        lines.append(f"{head} {timing_cell(r, 'eager')} | {times(r.get('eager_speedup'))} | "
                     f"{timing_cell(r, 'compiled')} | {times(r.get('compiled_speedup'))} | {sel} | "
                     f"{gib(r.get('peak_mib'))} | {fmt(r.get('attention_ms'), 3)} ({r.get('attention_path', '-')}) | "
                     f"{tf_cell} | {fmt(r.get('ppl'), 3)} |")
    return lines


def decode_table(data: dict) -> list[str]:
    lines = ["| context | batch | routing | sparsity (block_k) | keys read | prefill ms | decode ms / step | "
             "tokens/s | vs dense | same tokens as dense (agreement) | attention ms / step, one layer (per call / GPU) | "
             "peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["decode"]:
        cache = r.get("kv_cache", "in-place")
        label = r["routing"] + ("" if cache == "in-place" else " (transformers DynamicCache)" if "Dynamic" in cache
                                else f" ({cache})")
        head = f"| {r['context']} | {r['batch']} | {label} | {setting_cell(r)} |"
        if "skipped" in r:
            lines.append(f"{head} skipped ({r['skipped']}) |" + " |" * 7)
            continue
        same = r.get("same_tokens_as_dense")
        same_cell = "-" if same is None else f"{'yes' if same else 'no'} ({r['token_agreement']:.3f})"
        attn = fmt(r.get("attention_step_ms"), 3)
        if r.get("attention_step_gpu_ms") is not None:
            attn += f" / {fmt(r['attention_step_gpu_ms'], 4)}"
        lines.append(f"{head} {100 * r['keys_read_share']:.1f}% | {fmt(r.get('prefill_ms'), 2)} | "
                     f"{fmt(r.get('ms_per_step'), 2)} | {fmt(r.get('tokens_per_s'), 1)} | {times(r.get('speedup'))} | "
                     f"{same_cell} | {attn} | {gib(r.get('peak_mib'))} |")
    return lines


def legend(data: dict) -> list[str]:
    peak = data.get("peak_bf16_tflops")
    return [
        "- *sparsity (block_k)*: the share of the causal (query block, key block) tiles the block routing skips, "
        "with the number of earlier blocks each query block keeps (its own block is always kept); block_k is chosen "
        "per context to come closest to each target (0: every block kept, which must give dense's output).",
        "- *eager ms* / *compiled ms*: median time of one forward over the whole context (logits of the last "
        "position only; in brackets the fastest and slowest timed call), eager, and through one `torch.compile` of the model's forward shared by dense and sparse "
        f"(mode {data.get('compile_mode') or '-'}; causal mask: {data.get('compile_mask') or '-'}); *vs dense*: "
        "dense time / this time.",
        "- *selection ms*: the block selection alone, every layer: each layer's gate (pooling, projections, scores or "
        "factors), the top-k block lists and the BlockMask (keep-mask on the masked path), exactly the calls the "
        "routed forward makes before attending, run for each layer's gate on the captured inputs of the first layer "
        "(its queries and keys after RoPE and its input X, from a forward stopped there); the same shapes as every "
        "layer's, so the time is that of the forward's selection. Eager (what *eager ms* contains) / compiled "
        "(the same calls under `torch.compile`, with --compile). It is part of *eager ms*, not added to it.",
        "- *peak GiB*: `torch.cuda.max_memory_allocated` during the timed calls (prefill: the eager calls; decode: "
        "the prefill with the cache and the steps), weights, activations and KV cache included (the adapter keeps "
        "each layer's input between calls, dense and sparse alike); CUDA only.",
        "- *attention ms, one layer*: the first layer's attention alone on its captured inputs: dense SDPA "
        "(gatelab's dense path, causal) or the block path over the selection of the first layer's gate (flex: "
        "compiled flex_attention over the BlockMask; masked: SDPA with the token mask, no work skipped). "
        "*TFLOP/s*: forward FLOPs of the pairs computed, 4 B H D x pairs (dense: T (T + 1) / 2 pairs; block: the kept "
        "earlier blocks' block_size^2 pairs plus each diagonal block's causal pairs), divided by that time; beside "
        f"the device's bf16 dense peak ({fmt(peak, 0)} TFLOP/s); CUDA only.",
        "- *ppl*: perplexity on the bundled long documents in whole windows of the context (a real model and "
        "tokenizer only; random weights leave it out).",
        "- decode: *keys read*: the share of the cache the first new token attends to (its kept earlier blocks and "
        "itself); *prefill ms*: the prefill with the cache (in the graphed rows its first call in the process for "
        "that routing, so with any first-call compilation and kernel loading: not a prefill measurement); *decode ms "
        f"/ step*: one forward of one token per sequence, mean of {data['new_tokens']} steps; *tokens/s*: batch x "
        "steps / their time; *same tokens as dense*: the greedy tokens (the prefill's and each step's) against "
        "dense's, with the share that agree (bf16 on random weights: nearly flat logits, so a rounding difference "
        "can flip a token).",
        "- *attention ms / step, one layer*: one new token per sequence over a cache of context + 1 positions "
        "(random values of the model's shapes): gatelab's dense path (SDPA over the cache's key/value heads, "
        "grouped-query, what the dense rows run), or `block_decode_attention` (the kept blocks read from the "
        "key/value heads, by the Triton kernel where it serves; the selection, made once per query block, in the "
        "warm-up). *Per call*: median of calls each launched and synchronised (host time included); *GPU*: one "
        "call captured in a CUDA graph, mean of 100 replays (the kernels' own time; CUDA only).",
        "- decode rows use gatelab's KV cache that appends in place (`gatelab.hf.cache.kv_cache`, sized for the "
        "prompt and the new tokens); the dense row marked *transformers DynamicCache* uses transformers' own cache, "
        "which concatenates each step onto the whole cache, and its *vs dense* is against the in-place dense row.",
        "- rows marked *fixed, CUDA graphs* decode over a cache of fixed size with every step replayed from a CUDA "
        "graph (`gatelab.hf.graphed`; *fixed, eager*: the same steps without CUDA; *compiled*: each step through "
        "`torch.compile` (mode default; the steps that start a query block, one in block_size, uncompiled), then "
        f"recorded): {data.get('graph_steps', '-')} steps, timed once every kind of step has been recorded: dense "
        f"from step {GRAPH_WARM_STEPS} on; block from the step after the second that starts a query block (its graph "
        "recorded then) over whole query blocks, so one step in block_size selects (`steady_window`); the steps "
        "before, with each kind's eager warm-up, recording and compilation, are the row's *warm_ms* in the JSON; "
        "*vs dense* and *same tokens*: a graphed block row against the graphed dense row, the graphed dense row "
        "against the in-place dense row (compiled rows: against the compiled graphed dense row).",
        "- *Profiles* (--profile): one prefill call (the compiled one when measured), the selection of every layer "
        "(as in *selection ms*) and a few decode steps under "
        "torch.profiler: wall ms per call, the sum of GPU kernel times per call (below the wall time when the GPU "
        "waits on the CPU: launch-bound), kernel launches per call and the kernels with the most GPU time.",
    ]


def profiles(data: dict) -> list[str]:
    rows = [(r, key) for r in data["prefill"] + data["decode"] for key in ("profile", "selection_profile")
            if r.get(key)]
    if not rows:
        return []
    lines = ["", "## Profiles", ""]
    for r, key in rows:
        p = r[key]
        cache = " (transformers DynamicCache)" if r.get("kv_cache", "in-place") != "in-place" else ""
        busy = "-" if p["gpu_kernel_ms"] is None else f"{p['gpu_kernel_ms']:.2f}"
        launches = "-" if p["kernels_per_call"] is None else f"{p['kernels_per_call']:.0f}"
        what = "the selection of every layer" if key == "selection_profile" else "call" if r["kind"] == "prefill" \
            else "step"
        lines.append(f"- **{r['kind']} {r['context']} x{r['batch']} {r['routing']}{cache}**: {p['wall_ms']:.2f} ms "
                     f"wall per {what}, GPU kernels {busy} ms, "
                     f"{launches} launches; top ({'GPU' if p['gpu_kernel_ms'] is not None else 'self CPU'} ms): "
                     + "; ".join(
                         f"`{k['name']}` {k['ms']:.3f} ms x{k['launches']}" for k in p["top"][:6]))
    return lines


def markdown(data: dict) -> str:
    lines = [f"# Sparse inference: block-gate routing vs dense on {data['device']}", "",
             f"torch {data['torch']}, transformers {data['transformers']}; command: `{data['command']}`; "
             f"{data['model_note']}; dtype {data['dtype']}; routing block size {data['block_size']}; prefill times are "
             f"medians of {data['iters']} calls after {data['warmup']}; backend: "
             + ", ".join(f"{k} {data['backend'].get(k, False)}" for k in
                         ("kernels", "block_attention", "compile_blocks", "block_factors_kernel")) + "."
             + (f" {data['compile_note']}." if data.get("compile_note") else "")
             + ("" if data.get("finished") else " **Run not finished: the rows so far.**"),
             "", "## Prefill", ""] + prefill_table(data) + ["", "## Decode", ""] + decode_table(data)
    prompts = "; ".join(f"{T}: {src}" for T, src in data["prompts"].items())
    lines += ["", f"Prompts: {prompts or '-'}.", "", "## Legend", ""] + legend(data)
    lines += ["", "## Targets", "", "Criteria: `benchmarks/inference_targets.py` (its docstring says which rows each "
              "reads).", ""] + inference_targets.markdown(inference_targets.evaluate(data))
    lines += profiles(data)
    errors = [f"- {r['kind']} {r['context']} x{r['batch']} {r['routing']}: {k}: {v}"
              for r in data["prefill"] + data["decode"] for k, v in r.get("errors", {}).items()]
    if errors:
        lines += ["", "## Failed measurements", ""] + errors
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
