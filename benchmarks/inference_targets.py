"""The speed and quality targets bench_inference.py judges its rows by, written before the GPU runs they judge.

Each target names the rows it reads (context, batch, target block sparsity), the ratio it computes and the bound.
A target whose rows are missing (not run, failed, over budget) reads "not measured"; none is judged on other rows.

- selection: the block selection (every layer's gate, top-k block lists and BlockMask, eager: the calls the routed
  forward makes) per layer, over one layer's block-sparse attention on the same inputs, <= 0.15, at 8 x 8K and
  1 x 32K, at every measured block sparsity of 50, 75 and 87.5% (met only if met at all three; each ratio shown).
- prefill-32k: compiled dense prefill time over compiled block-gate prefill time, batch 1, 32K tokens, 87.5% block
  sparsity, >= 1.5 (SmolLM2-shaped random weights or a real model alike).
- prefill-real-8k: with a real model and its gates (--model): compiled dense over compiled block-gate prefill time,
  batch 1, 8K tokens, 50% block sparsity, >= 1.0, and perplexity under block-gate <= 1.01 x dense's (both met).
- decode-attention-32k: one layer's attention per decode step, dense over block-gate, batch 8, 32K tokens of
  context, 87.5% block sparsity, >= 4.
- decode-e2e-32k: decode tokens/s, block-gate over dense (both with the in-place KV cache), batch 8, 32K tokens,
  87.5% block sparsity, >= 1.5.

Revised after the first run (benchmarks/results/inference/, run 1), shown beside the first and not replacing it:
- decode-attention-32k (GPU time): the same ratio and bound (>= 4) on the attention's GPU time, one call captured in
  a CUDA graph and replayed (attention_step_gpu_ms). Why: the first criterion's per-call time launches and
  synchronises each call, and on the H200 host one decode attention call costs 0.1-0.4 ms of host time against tens
  of microseconds of GPU work, so it compares launch overheads, not attention. The first criterion's verdict stays
  in the table.

Added after run 3 (the real model at 8K and the rows below had not run), judged beside the first decode-e2e-32k
and not replacing it:
- decode-e2e-32k (CUDA graphs): decode tokens/s of block-gate with every step replayed from a CUDA graph over a cache
  of fixed size (gatelab.hf.graphed; rows with kv_cache "fixed, CUDA graphs"), over the *fastest* dense decoding of
  the same run (in-place cache, transformers' DynamicCache, or the same CUDA-graphed decoding, whichever gives the
  most tokens/s), batch 8, 32K tokens, 87.5% block sparsity, >= 1.5.
  What each reading predicts, from run 3's profiles (a dense step 4.2 ms of GPU kernels, of which attention 1.9 ms;
  a block step at 87.5% 2.9 ms): if the steps are bound by host launches and graphs remove that bound, both sides
  approach their GPU time, and the ratio approaches 4.2 / 2.9 = 1.45, on the bound; below it if the graphed masked
  dense attention costs less than flash does per step or the block path's extra launches (ring writes, the combine
  kernel) weigh more inside a graph; the target needs the block step's GPU time at or under 2.8 ms.

Added after run 4 (whose CUDA-graphed rows gave 1.265, missed; that verdict stays beside this one), before the runs
it judges:
- decode-e2e-32k (compiled CUDA graphs): the same ratio and bound (>= 1.5, 8 x 32K, 87.5%) for block-gate with every
  step run through torch.compile and replayed from a CUDA graph (rows with kv_cache "fixed, CUDA graphs, compiled"),
  over the fastest dense decoding of the same run, the compiled and graphed dense steps included.
  What each reading predicts, from run 4 (graphed, not compiled: dense 4.77 ms per step, block 3.77 ms, against
  4.2 and 2.9 ms of eager GPU kernel time; about 1,300 kernels per step): if each small kernel's own time inside the
  graph is what remains, fusing the elementwise work (norms, rotary embedding, activations, residuals) cuts about the
  same time from both steps and the ratio rises (at 1.5 ms cut from each: 3.27 / 2.27 = 1.44; at 2 ms: 1.6); if the
  matrix products and the attention dominate what remains, the ratio stays near run 4's 1.27.
  Its first run (benchmarks/results/inference/inference-nvidia-h200-decode-compiled-run1.*): dense 2.84 ms per
  step, block 2.02 ms, 1.409, missed; that verdict stands.
  Before the second run, two corrections, neither touching the criterion:
  (1) A prediction first written here counted 33 kept blocks per step for the 87.5% row; the row keeps 17 at 32K
  (its sparsity counts the causal tiles of the whole sequence), which the kernel's launch already split one block per
  program, so the launch change (block_decode_tuning.py) leaves that row as it was.
  (2) The graphed rows timed every step after the third. A block row's steps that start a query block (one in 128)
  have their own graph, recorded at the second such step, step 128 of the run: that recording (and its
  synchronisation) fell inside the timed steps of block rows only. Rows are now timed from the step after it, over
  whole query blocks (bench_inference.steady_window); the steps before are reported as warm_ms.
  What each reading predicts for the second run: if the recording was the block rows' extra cost (about 0.5 ms per
  step above what the attention saving explains in both run 4 and this run 1), the compiled block step drops to about
  1.5 ms and the ratio rises to about 2.84 / 1.5 = 1.9 (met); if not, it stays near 1.41 (missed). Dense rows should
  not move (their window changes only by its length).

Before the real model's second run (run R2; the criterion prefill-real-8k unchanged): run R (0.267, missed) left
the block selection outside the compiled graph. It is now one custom operator inside it, and on random weights of
the same shape (run P8) the compiled block prefill at 1 x 8K, 50% took 13.20 ms against dense's 18.57 ms (1.41x).
The gate is distilled again by run R's command (seed 0); the gate's weights do not change what the forward computes,
so the speed side should follow run P8.
What each reading predicts: if the host time of run R's selection was the whole gap, the compiled speed-up at
1 x 8K, 50% is about 1.2-1.45 (met on speed); if the real model's loading (dequantized GGUF weights) or its
tokenizer's prompts add work to the block path alone, it stays below 1. The perplexity side is a coin flip: run R
gave 27.715 / 27.441 = 1.00998 against <= 1.01, and a distillation on the GPU is not bitwise repeatable, so a
ratio from about 1.005 to 1.015 is expected, either side of the bound. At 2K and 4K (no target) the gate's fixed
cost weighs more against a cheaper dense attention: speed-ups at or below the 8K row's.
Run R2 (benchmarks/results/inference/inference-nvidia-h200-real8k.*): compiled dense 20.36 ms, block-gate at 50%
34.24 ms, 0.595, missed; perplexity ratio 1.0099 (met). The speed prediction was wrong: one profiled call is
11.34 ms of GPU kernels for dense and 9.54 ms for block at 50%, so both sides wait on the host at batch 1, and the
wall time varies between runs and rows by more than the GPU saving. The 4K rows were 1.24-1.32x, not at or below
the 8K row's. The distillation repeated run R's gate exactly.

Before a run with the whole prefill replayed from a CUDA graph (COMPILE_MODE=reduce-overhead, both rows; the
criterion unchanged, its verdict shown beside run R2's): if the host is what separates the rows, each approaches
its GPU kernel time and the ratio at 1 x 8K, 50% approaches run R2's 11.34 / 9.54 = 1.19 (met); if the block path's
BlockMask or selection cannot be captured (a graph break leaves them outside), the block row keeps its host cost
and stays below 1.
Run R3 (inference-nvidia-h200-real8k-graphs.*, the gate distilled again by run R's command, same final loss): with
CUDA graphs, compiled dense 13.27 ms (12.83-13.56), block-gate at 50% 11.43 ms (11.25-11.92): 1.161, met, with the
perplexity ratio 1.0099 (met); one profiled call is 11.11 / 9.50 ms of GPU kernels (1.17). The host reading held. The distillation's metrics equal run R's file line for line.
Run R2's verdict in torch.compile's default mode (0.595, missed) stands beside it.

Before the selection's next run (the criterion selection unchanged), with --block-factors-kernel (opt-in,
Backend.block_factors_kernel) beside the default: a block gate's factors at eager inference are then one Triton
launch (kernels/block_factors.py) instead of about nine operator calls, so a layer's selection is two kernel
launches (factors, block lists) and the BlockMask, which launches nothing. Run 3 measured 0.33-0.55 ms per
layer for 11 launches (30-50 us each). If each launch's host time is what remains, a layer's selection drops to
about 0.1-0.2 ms, and the ratios become, at 50 / 75 / 87.5%: 8 x 8K about 0.11-0.21 / 0.14-0.28 / 0.3-0.6, 1 x 32K
about 0.06-0.12 / 0.1-0.2 / 0.19-0.38: still missed at 87.5% in both shapes (the target takes the worst of the
three), met at 50% at 1 x 32K. If a Triton launch costs the host more than a torch operator's, less is gained.
Run F (inference-nvidia-h200-{prefill8k,prefill32k}-factors-kernel.*, beside -runF.* without it): 8 x 8K 0.177 /
0.281 / 0.475, 1 x 32K 0.091 / 0.190 / 0.336: inside the predicted ranges but for 8 x 8K at 75% (0.2806, just
above 0.28), missed in both shapes (met at 50% at 1 x 32K). The selection of every layer took 4.67-4.98 ms against 22.66-26.47 ms without the kernel at 8 x 8K (the
two on different machines of one kind), and 4.59-5.24 ms against 10.38-11.36 ms at 1 x 32K (one machine, one process after the other).
Before the runs that follow run F (no criterion changes; the factors kernel is now the default, so their eager rows
use it):
- 1 x 128K (prefill128k; no target at this length, the prefill-32k criterion's shape extended): the dense attention
  grows as T^2 and the rest of the model as T. From run L's 64K rows (attention 10.9 ms of 365 ms per compiled call)
  the compiled dense call takes about 1.3-1.5 s, and the ratios rise above 64K's: about 1.6-1.9x at 50% and 4.5-6x at
  87.5%. If the selection kernel's register spills at 1,024 blocks (kernel-resources-sm90.md) cost more than the
  attention saves, the 87.5% row falls below 64K's 4.13x instead.
- The real SmolLM2 with CUDA graphs (COMPILE_MODE=reduce-overhead) at 8 x 8K and 1 x 2K (no target; the
  prefill-real-8k criterion reads 1 x 8K only): at 8 x 8K the GPU is busy without graphs too, so the ratio at 50%
  stays near run R's default-mode 1.26 (about 1.15-1.35); at 1 x 2K attention is a small share of the model's time
  and the block path adds its selection kernels, so about 0.9-1.1.
Run X (inference-nvidia-h200-prefill128k.*): compiled dense 1,379.81 ms; block-gate 1.66x at 50% and 5.01x at 87.5%
(eager 1.60x and 4.04x): all three inside their predicted ranges. Run R4 (inference-nvidia-h200-real8k-b8-graphs.*,
the gate distilled again: its metrics.jsonl, not committed again, equals results/block/smollm2-8k-qk-h200/metrics.jsonl
byte for byte): 8 x 8K with CUDA graphs, 1.25x at 50% (inside 1.15-1.35;
run R's default mode gave 1.26x) and 1.74x at 88%, perplexities as in runs R2 and R3 (run R: 27.715 / 30.419). The 1 x 2K rows did not run (no
device time left).
Before the real model's 2K and 4K rows with CUDA graphs (COMPILE_MODE=reduce-overhead, batch 1 and 8, block
sparsity about 50% and the most the context allows: k=4 and k=1 of 16 blocks at 2K, k=9 and k=1 of 32 at 4K; no
target at these lengths, no criterion changes). Scaled from run R4's profile at 8 x 8K (dense attention about 50 of
78.5 ms of GPU kernels, the rest of the model about 28.5 ms; the selection 3.65 ms, growing with the tokens): at
8 x 4K the attention is about a quarter of 8K's per token and the rest half, so about 1.05-1.25x at 50% and
1.3-1.6x at k=1; at 8 x 2K attention is a small share and flex runs less efficiently on 16 blocks, so about
0.95-1.15x at 50% and 1.05-1.25x at k=1. At batch 1 the graphed rows approach their GPU kernel times, as in run R3
(1 x 8K, 1.16x): 1 x 4K about 1.0-1.15x at 50%, 1 x 2K about 0.9-1.1x (as written above). If the GPU is idle
between kernels at batch 1 even inside a graph, every batch-1 ratio sits near 1. Perplexities: the same gate and
tokens as the default-mode 4K rows (run R2: 28.330 dense, 28.741 at k=9), so equal to them up to the last digit's
rounding; the 2K rows have no earlier value.
Run R5 (inference-nvidia-h200-real-2k-4k-graphs.*, -real-4k-b8-graphs.*, -real-4k-b1-graphs.*, and
-real-2k-b1-graphs-repeat.*, four calls on one machine): 8 x 4K 1.06x / 1.31x, 8 x 2K 1.01x / 1.06x, 1 x 4K 1.01x at
50% (and 1.01x at k=1): inside their ranges, each near the lower end. 1 x 2K 0.69x / 0.87x, and 0.80x / 0.82x in a
second call: below the range in both. There the block path is slower on the GPU as well (3.13 / 2.88 ms of kernels
against dense's 2.59 ms in both calls): flex at 16 blocks does not beat SDPA, which the prediction assumed it would.
Perplexities at 4K as predicted (28.330, 28.741, 46.046); at 2K 28.582 dense, 29.376 at k=4, 42.851 at k=1.
"""
from __future__ import annotations

SELECTION_SHAPES = ((8192, 8), (32768, 1))
SELECTION_SPARSITIES = (0.5, 0.75, 0.875)
SELECTION_MAX = 0.15
PREFILL_32K_MIN = 1.5
REAL_8K_SPEED_MIN, REAL_8K_PPL_MAX = 1.0, 1.01
DECODE_ATTENTION_MIN, DECODE_E2E_MIN = 4.0, 1.5


GRAPHED_CACHE = "fixed, CUDA graphs"
COMPILED_GRAPHED_CACHE = "fixed, CUDA graphs, compiled"


def _row(rows: list, kind: str, T: int, B: int, sparsity: float | None, cache: str = "in-place") -> dict | None:
    """The row of a kind at (T, B) with that KV cache: dense when sparsity is None, else the block row aimed at that
    sparsity."""
    for r in rows:
        if (r.get("kind") == kind and r["context"] == T and r["batch"] == B and "skipped" not in r
                and r.get("kv_cache", "in-place") == cache):
            if (sparsity is None and r.get("block_k") is None) or (
                    sparsity is not None and r.get("target_sparsity") == sparsity and r.get("block_k") is not None):
                return r
    return None


def _ratio(num, den) -> float | None:
    return num / den if num and den else None


def _verdict(name: str, value: float | None, bound: float, above: bool, what: str) -> dict:
    met = None if value is None else (value >= bound if above else value <= bound)
    return dict(target=name, what=what, value=value, bound=(">= " if above else "<= ") + f"{bound:g}",
                met=met)


def selection_targets(data: dict) -> list[dict]:
    layers = data.get("layers") or 1
    out = []
    for T, B in SELECTION_SHAPES:
        values = []
        for s in SELECTION_SPARSITIES:
            r = _row(data["prefill"], "prefill", T, B, s)
            values.append(None if r is None else _ratio((r.get("selection_ms") or 0) / layers, r.get("attention_ms")))
        worst = None if None in values else max(values)
        shown = ", ".join("-" if v is None else f"{v:.3f}" for v in values)
        out.append(_verdict(f"selection {B}x{T}", worst, SELECTION_MAX, False,
                            f"selection per layer / block attention per layer at 50 / 75 / 87.5%: {shown}"))
    return out


def evaluate(data: dict) -> list[dict]:
    """Every target's value and verdict (met: True, False, or None when its rows are missing)."""
    pre, dec = data["prefill"], data["decode"]
    out = selection_targets(data)
    dense, sparse = _row(pre, "prefill", 32768, 1, None), _row(pre, "prefill", 32768, 1, 0.875)
    out.append(_verdict("prefill 1x32768 at 87.5%", _ratio((dense or {}).get("compiled_ms"),
                                                         (sparse or {}).get("compiled_ms")),
                        PREFILL_32K_MIN, True, "compiled dense ms / compiled block-gate ms"))
    if data.get("real_model"):
        dense, sparse = _row(pre, "prefill", 8192, 1, None), _row(pre, "prefill", 8192, 1, 0.5)
        speed = _ratio((dense or {}).get("compiled_ms"), (sparse or {}).get("compiled_ms"))
        ppl = _ratio((sparse or {}).get("ppl"), (dense or {}).get("ppl"))
        both = None if speed is None or ppl is None else min(speed / REAL_8K_SPEED_MIN, REAL_8K_PPL_MAX / ppl)
        v = _verdict("real model 1x8192 at 50%", both, 1.0, True,
                     f"compiled speed-up {'-' if speed is None else f'{speed:.3f}'} (>= {REAL_8K_SPEED_MIN:g}), "
                     f"ppl ratio {'-' if ppl is None else f'{ppl:.4f}'} (<= {REAL_8K_PPL_MAX:g}); value: the "
                     "smaller margin, met at >= 1")
        out.append(v)
    dense, sparse = _row(dec, "decode", 32768, 8, None), _row(dec, "decode", 32768, 8, 0.875)
    out.append(_verdict("decode attention 8x32768 at 87.5%", _ratio((dense or {}).get("attention_step_ms"),
                                                                  (sparse or {}).get("attention_step_ms")),
                        DECODE_ATTENTION_MIN, True, "dense attention ms / block-gate attention ms per step"))
    out.append(_verdict("decode attention, GPU time (revised after run 1) 8x32768 at 87.5%",
                        _ratio((dense or {}).get("attention_step_gpu_ms"), (sparse or {}).get("attention_step_gpu_ms")),
                        DECODE_ATTENTION_MIN, True, "the same ratio on the GPU time (CUDA graph replay)"))
    out.append(_verdict("decode tokens/s 8x32768 at 87.5%", _ratio((sparse or {}).get("tokens_per_s"),
                                                                 (dense or {}).get("tokens_per_s")),
                        DECODE_E2E_MIN, True, "block-gate tokens/s / dense tokens/s"))
    out.append(graphed_decode_target(dec))
    out.append(graphed_decode_target(dec, COMPILED_GRAPHED_CACHE, "compiled CUDA graphs (added after run 4)"))
    return out


def graphed_decode_target(dec: list, cache: str = GRAPHED_CACHE, name: str = "CUDA graphs (added after run 3)") -> dict:
    """decode-e2e-32k (CUDA graphs, or compiled CUDA graphs): the block-gate rows of that cache, tokens/s over the
    fastest dense decoding of the run."""
    sparse = _row(dec, "decode", 32768, 8, 0.875, cache)
    dense = [r for r in dec if r.get("kind") == "decode" and r["context"] == 32768 and r["batch"] == 8
             and r.get("block_k") is None and r.get("tokens_per_s") and "skipped" not in r]
    best = max(dense, key=lambda r: r["tokens_per_s"], default=None)
    what = f"block-gate ({cache}) tokens/s / the fastest dense tokens/s" + (f" ({best['kv_cache']})" if best else "")
    return _verdict(f"decode tokens/s, {name} 8x32768 at 87.5%",
                    _ratio((sparse or {}).get("tokens_per_s"), (best or {}).get("tokens_per_s")), DECODE_E2E_MIN,
                    True, what)


def markdown(targets: list[dict]) -> list[str]:
    lines = ["| target | value | bound | met | what |", "|---|---|---|---|---|"]
    for t in targets:
        met = "not measured" if t["met"] is None else "yes" if t["met"] else "**no**"
        value = "-" if t["value"] is None else f"{t['value']:.3f}"
        lines.append(f"| {t['target']} | {value} | {t['bound']} | {met} | {t['what']} |")
    return lines


def main(paths: list[str]) -> None:
    """The targets over the rows of several bench_inference.py JSON files (the runs they read are separate)."""
    import json
    data = dict(prefill=[], decode=[], layers=None, real_model=False)
    for p in paths:
        d = json.loads(open(p).read())
        data["prefill"] += d["prefill"]
        data["decode"] += d["decode"]
        data["layers"] = data["layers"] or d.get("layers")
        data["real_model"] = data["real_model"] or d.get("real_model", False)
    print("\n".join(markdown(evaluate(data))))


if __name__ == "__main__":
    import sys
    main(sys.argv[1:])
