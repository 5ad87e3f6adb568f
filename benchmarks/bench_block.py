#!/usr/bin/env python3
"""Block-sparse attention speed: dense SDPA (flash) against gatelab's block-sparse flex_attention
path, with the block gate's own selections, at SmolLM2-135M's attention shape.

    PYTHONPATH=src python benchmarks/bench_block.py --budget-minutes 4                  # GPU, random weights
    PYTHONPATH=src python benchmarks/bench_block.py --model DIR --gguf FILE --gate GATES --ppl   # the real model
    PYTHONPATH=src python benchmarks/bench_block.py --smoke --out /tmp/b                 # tiny, on CPU

Three measurements, in this order (a --budget-minutes run skips what it has no time left for, and says so):
  attention  one layer's attention at batch x tokens (default 1x2K, 1x4K, 1x8K, 8x8K, 1x32K; 9 query heads,
             3 key/value heads, head dim 64, bf16): dense SDPA with is_causal (the faster of grouped-query SDPA
             and SDPA on repeated keys/values) vs flex_attention over the kept blocks, forward (and forward +
             backward for --backward-shapes); the block gate's cost (pooling, scores, top-k) and the BlockMask's
             construction are timed apart and added in "with gate"; peak memory of each
  e2e        prefill latency of the whole model (SmolLM2-135M-shaped random weights, or --model) at each
             --contexts length, batch 1, logits of the last position only: dense (gatelab's SDPA path) vs block-gate
             routing (gate, selection, BlockMask and flex_attention in every layer); peak memory
  ppl        (--ppl) perplexity beside each setting: dense, block-oracle, block-random and, with --gate, the
             distilled block gate, on the long documents of the bundled test split (with --model), in whole
             windows of each context
Block sparsity s = the share of the causal (query block, key block) tiles that the block path skips (dense flash
computes all nb (nb + 1) / 2 of them); block_k is chosen per length to come closest to each target s, and the
achieved s is reported with it. Writes <out>/block-<device>.json and .md with the device name and the command.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from gatelab.attention.block_attention import block_sparse_attention  # noqa: E402
from gatelab.attention.blocks import previous_block_rows, select_blocks  # noqa: E402
from gatelab.attention.flex import block_mask_from_scores, build_block_mask, compiled_flex  # noqa: E402
from gatelab.attention.gates import BlockGate  # noqa: E402
from gatelab.config import Routing  # noqa: E402

SMOLLM2 = dict(layers=30, hidden=576, heads=9, kv_heads=3, head_dim=64, intermediate=1536, vocab=49152)
TINY = dict(layers=2, hidden=32, heads=2, kv_heads=1, head_dim=16, intermediate=64, vocab=101)
TARGETS = [("8x8192", 0.875, 2.0), ("1x32768", 0.875, 2.5)]  # the targets: attention forward vs dense flash


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, iters: int, warmup: int, absolute_peak: bool = False,
          spread: dict | None = None) -> tuple[float, float]:
    """(median ms, peak MiB allocated during the timed calls: above what was allocated before them, or with
    absolute_peak everything, weights and caches included; None off CUDA). A dict given as spread receives the
    fastest and slowest call (min_ms, max_ms)."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = 0 if absolute_peak else torch.cuda.memory_allocated()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(1000 * (time.perf_counter() - t0))
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20 if device.type == "cuda" else None
    if spread is not None:
        spread.update(min_ms=min(times), max_ms=max(times))
    return statistics.median(times), peak


def best_of(*measures):
    """The fastest of several (ms, MiB) measurements given as thunks; one that fails (a kernel this build lacks,
    out of memory) is left out."""
    results = []
    for measure in measures:
        try:
            results.append(measure())
        except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
            print(f"  (a dense variant failed: {type(e).__name__}: {str(e).splitlines()[0][:120]})", flush=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    if not results:
        raise RuntimeError("every dense variant failed")
    return min(results, key=lambda r: r[0])


def kept_tiles(nb: int, k: int) -> int:
    return sum(1 + min(k, i) for i in range(nb))


def block_k_for(nb: int, target: float, minimum: int = 0) -> tuple[int, float]:
    """The block_k whose skipped share of causal tiles comes closest to `target`, and that share."""
    causal = nb * (nb + 1) // 2
    best = min(range(minimum, nb), key=lambda k: abs(1 - kept_tiles(nb, k) / causal - target))
    return best, 1 - kept_tiles(nb, best) / causal


def distinct_block_ks(nb: int, targets, minimum: int = 0) -> list[tuple[float, int, float]]:
    """(target, block_k, achieved sparsity) for each target sparsity, leaving out a target whose block_k an earlier
    one already chose (at 2K tokens, 16 blocks, 75% and 87.5% both come out as block_k 1 when it must be >= 1)."""
    out, seen = [], set()
    for target in targets:
        bk, achieved = block_k_for(nb, target, minimum)
        if bk not in seen:
            seen.add(bk)
            out.append((target, bk, achieved))
    return out


def parse_shapes(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        b, t = item.lower().split("x")
        out.append((int(b), int(t)))
    return out


class Budget:
    def __init__(self, minutes: float | None):
        self.t0, self.limit = time.time(), None if minutes is None else 60 * minutes

    def over(self) -> bool:
        return self.limit is not None and time.time() - self.t0 > self.limit


# ------------------------------------------------------------------------------------------------------------
def attention_inputs(B: int, T: int, dims: dict, device, dtype) -> dict:
    """Random queries, keys, values and layer inputs of one shape (seeded), a block gate, and the keys and values
    repeated to every query head."""
    H, Hk, D, C = dims["heads"], dims["kv_heads"], dims["head_dim"], dims["hidden"]
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, H, T, D, device=device, dtype=dtype, generator=g)
    k = torch.randn(B, Hk, T, D, device=device, dtype=dtype, generator=g)
    v = torch.randn(B, Hk, T, D, device=device, dtype=dtype, generator=g)
    x = torch.randn(B, T, C, device=device, dtype=dtype, generator=g)
    torch.manual_seed(0)
    gate = BlockGate(C, H, 32).to(device)
    return dict(q=q, k=k, v=v, x=x, gate=gate, kr=k.repeat_interleave(H // Hk, 1), vr=v.repeat_interleave(H // Hk, 1))


def dense_timings(args, device, t: dict, with_bwd: bool) -> tuple:
    """Dense causal SDPA's (ms, MiB, kind), the faster of grouped heads and repeated key/value heads; with_bwd: also
    forward + backward (ms, MiB) and the output gradient it used."""
    q, k, v, kr, vr = t["q"], t["k"], t["v"], t["kr"], t["vr"]
    with torch.no_grad():
        dense = best_of(
            lambda: timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), device,
                          args.iters, args.warmup) + ("gqa",),
            lambda: timed(lambda: F.scaled_dot_product_attention(q, kr, vr, is_causal=True), device, args.iters,
                          args.warmup) + ("repeated kv",))
    if not with_bwd:
        return dense, None, None
    qg, kg, vg = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    krg, vrg = (x.detach().clone().requires_grad_(True) for x in (kr, vr))
    dout = torch.randn_like(q)
    dense_bwd = best_of(
        lambda: timed(lambda: F.scaled_dot_product_attention(qg, kg, vg, is_causal=True,
                                                             enable_gqa=True).backward(dout),
                      device, args.iters, args.warmup),
        lambda: timed(lambda: F.scaled_dot_product_attention(qg, krg, vrg, is_causal=True).backward(dout),
                      device, args.iters, args.warmup))
    return dense, dense_bwd, dout


def sparsity_row(args, device, dtype, flex, t: dict, target: float, dense: tuple, checks: list) -> dict:
    """One target sparsity at one shape: the gate and BlockMask build, flex over it (and over the keep-mask's
    BlockMask, the first measurement), checked against the masked path where it fits."""
    q, k, v, x, gate = t["q"], t["k"], t["v"], t["x"], t["gate"]
    B, _, T, _ = q.shape
    bs, nb, name = args.block_size, T // args.block_size, f"{B}x{T}"
    bk, achieved = block_k_for(nb, target)
    with torch.no_grad():
        scores = previous_block_rows(gate(x, bs).float())
        keep = select_blocks(scores, bk)
        # what a routing builds (attention/flex.py's block_mask_from_scores: top-k indices, causal mask_mod, no
        # query-side lists without a backward pass), and the keep-mask build before it (the first measurement:
        # select_blocks, argsort, a mask_mod that reads the keep-mask)
        bm = block_mask_from_scores(scores, bk, bs, T, backward=False)
        bm_keep = build_block_mask(keep, bs, T, mask_mod="selection")
        mask_ms = timed(lambda: block_mask_from_scores(previous_block_rows(gate(x, bs).float()), bk, bs, T,
                                                       backward=False), device, args.iters, args.warmup)[0]
        mask_keep_ms = timed(lambda: build_block_mask(select_blocks(previous_block_rows(gate(x, bs).float()), bk),
                                                      bs, T, mask_mod="selection"), device, args.iters, args.warmup)[0]
        fwd_ms, fwd_mib = timed(lambda: flex(q, k, v, block_mask=bm, enable_gqa=True), device, args.iters,
                                args.warmup)
        fwd_keep_ms = timed(lambda: flex(q, k, v, block_mask=bm_keep, enable_gqa=True), device, args.iters,
                            args.warmup)[0]
        if B * q.shape[1] * T * T <= 2 ** 31:  # the flex output against the masked path on the same selection
            ref = block_sparse_attention(q, k, v, keep, bs, backend="masked").float()
            err = float((flex(q, k, v, block_mask=bm, enable_gqa=True).float() - ref).abs().max())
            tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
            checks.append(dict(shape=name, block_k=bk, max_abs_err=err, tol=tol, ok=err <= tol))
    return dict(shape=name, batch=B, tokens=T, block_size=bs, n_blocks=nb, block_k=bk,
                target_sparsity=target, sparsity=round(achieved, 4),
                ideal_speedup=round(nb * (nb + 1) / 2 / kept_tiles(nb, bk), 2),
                dense_ms=dense[0], dense_kind=dense[2], dense_mib=dense[1], flex_ms=fwd_ms, flex_mib=fwd_mib,
                gate_and_mask_ms=mask_ms, speedup=dense[0] / fwd_ms,
                speedup_with_gate=dense[0] / (fwd_ms + mask_ms),
                flex_selection_mod_ms=fwd_keep_ms, gate_and_keep_mask_ms=mask_keep_ms, scores=scores)


def bench_attention(args, dims, device, dtype, budget: Budget, rows: list, checks: list) -> None:
    """Dense SDPA against flex over a block gate's selection, per shape and target sparsity (forward; forward +
    backward at --backward-shapes), priority shapes (the targets') first."""
    backward = {s for s in parse_shapes(args.backward_shapes)} if args.backward_shapes else set()
    shapes = parse_shapes(args.shapes)
    priority = [s for s in shapes if f"{s[0]}x{s[1]}" in {t[0] for t in TARGETS}]
    flex = compiled_flex()
    for B, T in priority + [s for s in shapes if s not in priority]:
        name = f"{B}x{T}"
        if budget.over():
            rows.append(dict(shape=name, skipped="budget"))
            continue
        t = attention_inputs(B, T, dims, device, dtype)
        with_bwd = (B, T) in backward and device.type == "cuda"
        dense, dense_bwd, dout = dense_timings(args, device, t, with_bwd)
        for target in args.sparsities:
            if budget.over():
                rows.append(dict(shape=name, target_sparsity=target, skipped="budget"))
                continue
            row = sparsity_row(args, device, dtype, flex, t, target, dense, checks)
            scores = row.pop("scores")
            if with_bwd:
                bm = block_mask_from_scores(scores, row["block_k"], args.block_size, T, backward=True)
                qg2, kg2, vg2 = (x.detach().clone().requires_grad_(True) for x in (t["q"], t["k"], t["v"]))
                fb_ms, fb_mib = timed(lambda: flex(qg2, kg2, vg2, block_mask=bm, enable_gqa=True).backward(dout),
                                      device, args.iters, args.warmup)
                row.update(dense_fwd_bwd_ms=dense_bwd[0], flex_fwd_bwd_ms=fb_ms, flex_fwd_bwd_mib=fb_mib,
                           dense_fwd_bwd_mib=dense_bwd[1], speedup_fwd_bwd=dense_bwd[0] / fb_ms)
            rows.append(row)
            print(f"[attention] {name} s={row['sparsity']:.3f} (k={row['block_k']}): dense {dense[0]:.3f} ms, flex "
                  f"{row['flex_ms']:.3f} ms ({dense[0] / row['flex_ms']:.2f}x), "
                  f"gate+mask {row['gate_and_mask_ms']:.3f} ms", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------------------
def load_model(args, dims, device, dtype):
    from gatelab.hf.adapter import attach_block_gates
    if args.model:
        from gatelab.hf.gate_files import load_gates, load_pretrained
        model, tok = load_pretrained(args.model, args.gguf, dtype=dtype, device=device)
        if args.gate:  # gate.json holds the fingerprint of the weights' bf16 copy too
            ctl = load_gates(model, args.gate)
        else:
            ctl = attach_block_gates(model, d_gate=32, gate="random", block_size=args.block_size)
        return model, tok, ctl
    import transformers
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=dims["vocab"], hidden_size=dims["hidden"],
                                   intermediate_size=dims["intermediate"], num_hidden_layers=dims["layers"],
                                   num_attention_heads=dims["heads"], num_key_value_heads=dims["kv_heads"],
                                   head_dim=dims["head_dim"], max_position_embeddings=max(args.contexts),
                                   tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    ctl = attach_block_gates(model, d_gate=32, gate="random", block_size=args.block_size)
    return model, None, ctl


def bench_e2e(args, model, ctl, device, budget: Budget, rows: list) -> None:
    bs = args.block_size
    vocab = model.config.vocab_size
    for T in args.contexts:
        if budget.over():
            rows.append(dict(tokens=T, skipped="budget"))
            continue
        ids = torch.randint(0, vocab, (1, T), generator=torch.Generator().manual_seed(T)).to(device)

        def run(routing):
            with torch.no_grad(), ctl.routing(routing):
                try:  # logits of the last position only, as a prefill for generation computes them
                    return model(ids, use_cache=False, logits_to_keep=1).logits
                except TypeError:  # transformers before logits_to_keep
                    return model(ids, use_cache=False).logits
        dense_ms, dense_mib = timed(lambda: run(Routing()), device, args.iters, args.warmup)
        nb = T // bs
        for target, bk, achieved in distinct_block_ks(nb, args.sparsities, minimum=1):
            if budget.over():
                rows.append(dict(tokens=T, target_sparsity=target, skipped="budget"))
                continue
            r = Routing(mode="block-gate", block_size=bs, block_k=bk)
            ms, mib = timed(lambda: run(r), device, args.iters, args.warmup)
            row = dict(tokens=T, block_size=bs, block_k=bk, target_sparsity=target, sparsity=round(achieved, 4),
                       dense_ms=dense_ms, dense_mib=dense_mib, block_ms=ms, block_mib=mib, speedup=dense_ms / ms,
                       compiled_selection=ctl.backend.compile_blocks)
            if device.type == "cuda":  # the same with the gate's scores and block lists compiled / eager: the other
                default = ctl.backend
                ctl.backend = replace(default, compile_blocks=not default.compile_blocks)
                try:
                    row["block_other_selection_ms"] = timed(lambda: run(r), device, args.iters, args.warmup)[0]
                finally:
                    ctl.backend = default
            rows.append(row)
            print(f"[e2e] {T} tokens s={achieved:.3f} (k={bk}): dense {dense_ms:.2f} ms, block-gate {ms:.2f} ms "
                  f"({dense_ms / ms:.2f}x; selection {'eager' if row['compiled_selection'] else 'compiled'}: "
                  f"{fmt(row.get('block_other_selection_ms'), 2)} ms)", flush=True)


def bench_ppl(args, model, tok, ctl, budget: Budget, rows: list) -> None:
    from gatelab.hf.corpus import encode_long_documents
    from gatelab.hf.evaluate import hf_perplexity_docs
    bs = args.block_size
    for T in args.contexts:
        if budget.over():
            rows.append(dict(tokens=T, skipped="budget"))
            continue
        if tok is not None:
            docs = encode_long_documents(tok, T, "bundled", args.ppl_split)
            source = f"bundled {args.ppl_split} documents longer than {T} tokens"
        else:  # random weights: a pipeline check, not a measurement of quality
            g = torch.Generator().manual_seed(1)
            docs = [torch.randint(0, model.config.vocab_size, (2 * T + 1,), generator=g).tolist()]
            source = "random tokens (random weights: pipeline check only)"
        nb = T // bs
        settings = [("dense", None, Routing())]
        for _, bk, achieved in distinct_block_ks(nb, args.sparsities, minimum=1):
            modes = ["block-oracle", "block-random"] + (["block-gate"] if args.gate or tok is None else [])
            settings += [(m, achieved, Routing(mode=m, block_size=bs, block_k=bk)) for m in modes]
        for mode, achieved, r in settings:
            if budget.over():
                rows.append(dict(tokens=T, routing=r.label(), skipped="budget"))
                continue
            res = hf_perplexity_docs(model, docs, r, T, batch_size=1, max_tokens=args.ppl_tokens)
            rows.append(dict(tokens=T, routing=r.label(), sparsity=None if achieved is None else round(achieved, 4),
                             ppl=res["ppl"], eval_tokens=res["tokens"], documents=res["documents"], source=source))
            print(f"[ppl] {T} {r.label()}: {res['ppl']:.3f} ({res['tokens']} tokens)", flush=True)


# ------------------------------------------------------------------------------------------------------------
def fmt(v, digits=3):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown(data: dict) -> str:
    lines = [f"# Block-sparse attention vs dense SDPA on {data['device']}", "",
             f"torch {data['torch']}; command: `{data['command']}`; {data['dims_note']}; block size "
             f"{data['block_size']}; dtype {data['dtype']}. Sparsity = share of the causal block tiles skipped; "
             f"ideal = causal tiles / kept tiles. Times are medians of {data['iters']} calls after {data['warmup']}.",
             "", "## Attention (one layer)", "",
             "*flex ms* and *gate + mask ms* are what a block routing runs (the BlockMask built straight from the "
             "top-k block indices, a causal mask_mod on the diagonal blocks); the *before* columns are the first "
             "build, timed in the same run: a keep-mask, argsort and a mask_mod that reads the keep-mask.", "",
             "| batch x tokens | sparsity (k) | ideal | dense ms | flex ms | speed-up | gate + mask ms | speed-up with "
             "gate | flex ms before | gate + mask ms before | dense / flex MiB | fwd+bwd dense ms | fwd+bwd flex ms | "
             "fwd+bwd speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["attention"]:
        if "skipped" in r:
            lines.append(f"| {r['shape']} | {fmt(r.get('target_sparsity'))} | skipped ({r['skipped']}) |"
                         + " |" * 11)
            continue
        lines.append(f"| {r['shape']} | {r['sparsity']:.3f} ({r['block_k']}) | {r['ideal_speedup']:.2f}x | "
                     f"{r['dense_ms']:.3f} | {r['flex_ms']:.3f} | {r['speedup']:.2f}x | {r['gate_and_mask_ms']:.3f} | "
                     f"{r['speedup_with_gate']:.2f}x | {fmt(r.get('flex_selection_mod_ms'))} | "
                     f"{fmt(r.get('gate_and_keep_mask_ms'))} | {fmt(r['dense_mib'], 0)} / {fmt(r['flex_mib'], 0)} | "
                     f"{fmt(r.get('dense_fwd_bwd_ms'))} | {fmt(r.get('flex_fwd_bwd_ms'))} | "
                     f"{fmt(r.get('speedup_fwd_bwd'), 2)}{'x' if r.get('speedup_fwd_bwd') else ''} |")
    lines += ["", "## End-to-end prefill (batch 1, whole model, gate + selection + BlockMask + flex in every layer)",
              "", "*block-gate ms*: the default path; *other selection ms*: the same run with the gate's scores and "
              "the block lists compiled if the default runs them eager, eager if it compiles them "
              "(Backend.compile_blocks, GATELAB_COMPILE_BLOCKS; *selection* says which the default is).",
              "", "| tokens | sparsity (k) | dense ms | block-gate ms | speed-up | selection | other selection ms | "
              "speed-up other | dense / block MiB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in data["e2e"]:
        if "skipped" in r:
            lines.append(f"| {r['tokens']} | {fmt(r.get('target_sparsity'))} | skipped ({r['skipped']}) |" + " |" * 6)
            continue
        other = r.get("block_other_selection_ms")
        which = "compiled" if r.get("compiled_selection") else "eager"
        lines.append(f"| {r['tokens']} | {r['sparsity']:.3f} ({r['block_k']}) | {r['dense_ms']:.2f} | "
                     f"{r['block_ms']:.2f} | {r['speedup']:.2f}x | {which} | {fmt(other, 2)} | "
                     f"{fmt(r['dense_ms'] / other if other else None, 2)}{'x' if other else ''} | "
                     f"{fmt(r['dense_mib'], 0)} / {fmt(r['block_mib'], 0)} |")
    if data["ppl"]:
        lines += ["", "## Perplexity beside each setting", "", "| tokens | routing | sparsity | ppl | tokens evaluated |",
                  "|---|---|---|---|---|"]
        for r in data["ppl"]:
            if "skipped" in r:
                lines.append(f"| {r['tokens']} | {r.get('routing', '')} | skipped ({r['skipped']}) | | |")
                continue
            lines.append(f"| {r['tokens']} | {r['routing']} | {fmt(r['sparsity'])} | {r['ppl']:.3f} | "
                         f"{r['eval_tokens']} |")
        lines += ["", f"Text: {data['ppl'][0].get('source', '')}."]
    lines += ["", "## Targets", ""] + [f"- {t}" for t in data["targets"]]
    lines += ["", "## Checks", ""] + [f"- {c['shape']} k={c['block_k']}: flex vs masked path max |diff| "
                                      f"{c['max_abs_err']:.2e} (tolerance {c['tol']:.0e}): {'ok' if c['ok'] else 'FAIL'}"
                                      for c in data["checks"]]
    return "\n".join(lines) + "\n"


def targets(attention: list) -> list[str]:
    out = []
    for shape, s, want in TARGETS:
        row = next((r for r in attention if r.get("shape") == shape and r.get("target_sparsity") == s
                    and "skipped" not in r), None)
        if row is None:
            out.append(f"{shape} at {100 * s:g}% block sparsity: not measured")
            continue
        got = row["speedup"]
        text = (f"{shape} at {100 * row['sparsity']:.1f}% block sparsity (k = {row['block_k']}): attention forward "
                f"{got:.2f}x dense (target >= {want}x): {'met' if got >= want else 'missed'}")
        if got < want:  # where the time goes
            text += (f". Where the time goes: dense {row['dense_ms']:.3f} ms, flex {row['flex_ms']:.3f} ms for "
                     f"{100 * (1 - row['sparsity']):.1f}% of the causal tiles (ideal {row['ideal_speedup']:.2f}x, so "
                     f"flex runs each kept tile at {row['ideal_speedup'] / got:.2f}x the time flash spends per tile); "
                     f"gate + BlockMask {row['gate_and_mask_ms']:.3f} ms on top")
        out.append(text)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (a check of the harness)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--shapes", default="1x2048,1x4096,1x8192,8x8192,1x32768", help="attention-only batch x tokens")
    ap.add_argument("--backward-shapes", default="1x8192,8x8192", help="shapes also timed forward + backward "
                    "(CUDA only: flex_attention has no backward on CPU); empty for none")
    ap.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",") if x], default=[2048, 4096, 8192],
                    help="end-to-end prefill lengths (batch 1)")
    ap.add_argument("--sparsities", type=lambda s: [float(x) for x in s.split(",") if x], default=[0.5, 0.75, 0.875])
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--model", help="a local Hugging Face model folder (default: SmolLM2-135M-shaped random weights)")
    ap.add_argument("--gguf", help="a GGUF file inside --model")
    ap.add_argument("--gate", help="block gates from `gatelab hf-distill --block-size` for --model")
    ap.add_argument("--ppl", action="store_true", help="also perplexity beside each setting")
    ap.add_argument("--ppl-split", default="test", choices=("validation", "test"))
    ap.add_argument("--ppl-tokens", type=int, default=0, help="stop each perplexity after about this many tokens")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: attention, e2e")
    ap.add_argument("--budget-minutes", type=float, help="start no new measurement after this many minutes")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    if args.smoke:
        dims = TINY
        args.device = "cpu" if args.device == "auto" else args.device
        args.shapes, args.backward_shapes, args.contexts = "1x128", "", [128]
        args.sparsities, args.block_size, args.iters, args.warmup = [0.5, 0.75], 16, 2, 1
    else:
        dims = SMOLLM2
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for name in ("recompile_limit", "cache_size_limit"):  # one compiled flex kernel per shape
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    budget = Budget(args.budget_minutes)
    skip = {s for s in args.skip.split(",") if s}
    attention, e2e, ppl, checks = [], [], [], []
    if "attention" not in skip:
        bench_attention(args, dims, device, dtype, budget, attention, checks)
    if "e2e" not in skip or args.ppl:
        model, tok, ctl = load_model(args, dims, device, dtype)
        if "e2e" not in skip:
            bench_e2e(args, model, ctl, device, budget, e2e)
        if args.ppl:
            bench_ppl(args, model, tok, ctl, budget, ppl)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    dims_note = (f"model {args.model}" if args.model else
                 f"{'tiny' if args.smoke else 'SmolLM2-135M'}-shaped: {dims['layers']} layers, {dims['heads']} query "
                 f"heads, {dims['kv_heads']} key/value heads, head dim {dims['head_dim']}")
    data = dict(device=name, torch=torch.__version__, command="python " + " ".join([sys.argv[0]] + sys.argv[1:]),
                dims_note=dims_note, dims=dims, dtype=str(dtype).replace("torch.", ""), block_size=args.block_size,
                iters=args.iters, warmup=args.warmup, attention=attention, e2e=e2e, ppl=ppl, checks=checks,
                targets=targets(attention))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = "block-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    (out / f"{slug}.json").write_text(json.dumps(data, indent=1) + "\n")
    (out / f"{slug}.md").write_text(markdown(data))
    print(markdown(data))
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
