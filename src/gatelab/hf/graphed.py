"""Greedy decoding whose steps replay CUDA graphs: the whole model's forward for one token, without host launches.

A decoding step of a small model costs more host time (launching about 1,300 kernels) than GPU time. Here the cache
has a fixed size and the position lives on the device (attention/fixed_decode.py, hf/cache.py's FixedLayer), so one
step, recorded once in a CUDA graph, serves every later step: the host only replays it. Block-gate routings record
a second graph for the steps that start a query block (they select its kept blocks); dense needs one.

The first step of each kind runs eagerly (it warms up every kernel and library the graph records), the next is
recorded, and the rest replay. Without CUDA (or with graphs=False) every step runs eagerly through the same code,
which is how the CPU tests check the tokens.
"""
from __future__ import annotations

import inspect
import time
from contextlib import contextmanager

import torch

from gatelab.attention.compiled import compile_once, raise_recompile_limit
from gatelab.attention.fixed_decode import FixedDecode, check_fixed_routing
from gatelab.config import GatelabError, Routing
from gatelab.hf.cache import cache_keyword, fixed_kv_cache


def decode_step(forward, tok: torch.Tensor, fixed: FixedDecode, where: dict, cache_kw: dict) -> torch.Tensor:
    """One greedy step: the model's forward of tok (B, 1) at fixed.position, the next token written back into tok and
    the position advanced, in place; returns the next token (B,)."""
    logits = forward(tok, use_cache=True, **where, **cache_kw).logits
    nxt = logits[:, -1].argmax(-1)
    tok.copy_(nxt[:, None])
    fixed.advance()
    return nxt


RECOMPILE_LIMIT = 64  # compiled steps: one graph per routing and batch


class _Steps:
    """One decoding step of `model` (input ids `tok` (B, 1) at fixed.position; the next token written back into
    `tok` and the position advanced, on the device), eager or from a CUDA graph per kind of step; compiled: the steps
    that do not start a query block through torch.compile (their small kernels fused), compiled once per process,
    routing and batch."""

    def __init__(self, model, cache, fixed: FixedDecode, tok: torch.Tensor, graphs: bool, compiled: bool = False):
        self.model, self.cache, self.fixed, self.tok, self.graphs = model, cache, fixed, tok, graphs
        self.kw = {cache_keyword(model): cache}
        self.where = dict(position_ids=fixed.position.view(1, 1))
        if "cache_position" in inspect.signature(type(model).forward).parameters:  # older transformers also take it
            self.where["cache_position"] = fixed.position
        if compiled:
            raise_recompile_limit(RECOMPILE_LIMIT)
        self.compiled_step = compile_once("decode_step", decode_step) if compiled else decode_step
        self.seen: dict[bool, int] = {}
        self.recorded: dict[bool, tuple] = {}
        self.pool = None

    def forward(self) -> torch.Tensor:
        """One step; compiled unless it starts a query block (one step in block_size: not worth a compilation)."""
        forward = getattr(self.model, "gatelab_eager_forward", None) or self.model.forward
        step = decode_step if self.fixed.selecting else self.compiled_step
        return step(forward, self.tok, self.fixed, self.where, self.kw)

    def __call__(self, selecting: bool) -> torch.Tensor:
        self.fixed.selecting = selecting
        if selecting in self.recorded:
            graph, out = self.recorded[selecting]
            graph.replay()
            return out
        self.seen[selecting] = self.seen.get(selecting, 0) + 1
        if not self.graphs:
            return self.forward()
        if self.seen[selecting] > 1:
            return self._record(selecting)
        side = torch.cuda.Stream()  # warm-up on a side stream, as CUDA graph capture asks
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = self.forward()
        torch.cuda.current_stream().wait_stream(side)
        return out

    def _record(self, selecting: bool) -> torch.Tensor:
        """Record this kind of step in a CUDA graph (nothing runs while recording), then replay it for this step."""
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.forward()
        self.pool = graph.pool()
        self.recorded[selecting] = (graph, out)
        graph.replay()
        return out


class FixedDecoder:
    """Greedy decoding of one batch under a routing over a cache of fixed size: prefill(ids) gives the first new
    token, then each step() the next, (B,) on the model's device (a replayed graph's output: copy it to keep it).
    Use through fixed_decoding(...), which sets the routing and clears the decoding state afterwards."""

    def __init__(self, model, routing: Routing, capacity: int, graphs: bool, compiled: bool = False):
        self.model, self.routing, self.graphs, self.compiled = model, routing, graphs, compiled
        self.capacity, self.position, self.steps = capacity, 0, None
        self.fixed: FixedDecode | None = None

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        if self.graphs and not ids.is_cuda:
            raise GatelabError("CUDA graphs need the model and the prompt on a CUDA device")
        B, T = ids.shape
        if T + 1 > self.capacity:
            raise GatelabError(f"a prompt of {T} tokens leaves no room in a cache of {self.capacity} positions")
        self.fixed = FixedDecode(torch.zeros(1, dtype=torch.long, device=ids.device), self.capacity,
                                 self.routing.block_size if self.routing.is_block else 1)
        cache = fixed_kv_cache(self.model, self.fixed)
        self.model.gatelab.fixed = self.fixed
        logits = self.model(ids, use_cache=True, position_ids=torch.arange(T, device=ids.device)[None],
                            **{cache_keyword(self.model): cache}).logits
        tok = logits[:, -1].argmax(-1, keepdim=True)
        self.fixed.set_position(T)
        self.fixed.stepping = True
        self.position = T
        self.steps = _Steps(self.model, cache, self.fixed, tok, self.graphs, self.compiled)
        return tok[:, 0]

    def step(self) -> torch.Tensor:
        if self.steps is None:
            raise GatelabError("FixedDecoder.step before prefill")
        if self.position >= self.capacity:
            raise GatelabError(f"the cache of {self.capacity} positions is full")
        r = self.routing
        out = self.steps(r.is_block and self.position % r.block_size == 0)
        self.position += 1
        return out


@contextmanager
def fixed_decoding(model, routing: Routing, capacity: int, graphs: bool = False, compiled: bool = False):
    """A FixedDecoder for `model` (gatelab attached) under a dense or block-gate routing, with a cache of `capacity`
    positions (the prompt and every new token); graphs: replay the steps from CUDA graphs; compiled: the steps through
    torch.compile (but those that start a query block), recorded compiled with graphs."""
    ctl = getattr(model, "gatelab", None)
    if ctl is None:
        raise GatelabError("attach_gates or attach_block_gates (or load_gates) first")
    routing.validate()
    check_fixed_routing(routing)
    try:
        with torch.no_grad(), ctl.routing(routing):
            yield FixedDecoder(model, routing, capacity, graphs, compiled)
    finally:
        ctl.fixed = None


GRAPH_WARM_STEPS = 3  # the first steps of a dense decoding: the eager warm-up, the recording, the first replay


def steady_window(prompt_len: int, steps: int, routing: Routing) -> tuple[int, int] | None:
    """The steps (start, stop) of a decoding of `steps` steps after a prompt of prompt_len tokens that run as every
    later one does: from the first step after each kind of step has been recorded (dense: GRAPH_WARM_STEPS; block:
    the step after the second one that starts a query block, whose graph is recorded then), over whole query blocks
    for a block routing, so that the steps starting a block weigh as in a long decoding (one in block_size). None
    when the decoding ends before such a window."""
    if not routing.is_block:
        return (GRAPH_WARM_STEPS, steps) if steps > GRAPH_WARM_STEPS else None
    bs = routing.block_size
    start = max(GRAPH_WARM_STEPS, (-prompt_len) % bs + bs + 1)
    stop = start + (steps - start) // bs * bs
    return (start, stop) if stop > start else None


def fixed_greedy(model, ids: torch.Tensor, routing: Routing, max_new_tokens: int,
                 graphs: bool | None = None, compiled: bool = False, timings: dict | None = None) -> torch.Tensor:
    """The greedy continuation (B, max_new_tokens) of ids (B, T) under a dense or block-gate routing, decoding over a
    cache of T + max_new_tokens positions; graphs: replay the steps from CUDA graphs (default: on CUDA); compiled:
    the steps through torch.compile. timings: a dict that receives the wall seconds of the prefill (prefill_s), of
    the steps before steady_window's (warm_s: warm-ups, recordings, compilation) and of the steady_steps steps in it
    (steady_s; 0 steps when the decoding ends before it), the device synchronised at those points only."""
    B, T = ids.shape
    graphs = ids.is_cuda if graphs is None else graphs
    steps = max_new_tokens - 1
    start, stop = steady_window(T, steps, routing) or (steps, steps)

    def now() -> float:
        if timings is not None and ids.is_cuda:
            torch.cuda.synchronize(ids.device)
        return time.perf_counter()

    out = torch.empty(B, max_new_tokens, dtype=torch.long, device=ids.device)
    with fixed_decoding(model, routing, T + max_new_tokens, graphs, compiled) as decoder:
        clock = [now()]
        out[:, 0] = decoder.prefill(ids)
        clock.append(now())
        for i in range(steps):  # step i decodes token i + 1
            if timings is not None and i in (start, stop):
                clock.append(now())
            out[:, i + 1] = decoder.step()
        while timings is not None and len(clock) < 4:  # the window ends with the decoding, or there is none
            clock.append(now())
    if timings is not None:
        timings.update(prefill_s=clock[1] - clock[0], warm_s=clock[2] - clock[1], steady_s=clock[3] - clock[2],
                       steady_steps=stop - start, window=[start, stop])
    return out
