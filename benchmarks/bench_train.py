#!/usr/bin/env python3
"""Training-step, distillation and evaluation throughput of gatelab, side by side with an eager fp32
reference of the same model, in one run on one device.

    PYTHONPATH=src python benchmarks/bench_train.py                      # the paper's model, on the GPU
    PYTHONPATH=src python benchmarks/bench_train.py --model tiny --steps 3 --warmup 1   # a CPU smoke

Writes benchmarks/results/<device>.json and .md (device name, torch version, command). Per routing mode and
batch: tokens/s, median step time, peak memory; "vs reference" is our step time over the eager fp32 dense
step at the same batch. MFU uses FLOPs/token = 6 N + 12 L T d (N = parameters excluding the embedding
lookups, i.e. with the untied output head; L layers, T context, d width) against the chip's dense bf16 peak.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import re
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from gatelab.attention.backend import Backend, default_backend  # noqa: E402
from gatelab.config import READINGS, ModelConfig, Routing, TrainConfig, soft_gate_routing  # noqa: E402
from gatelab.devices import autocast_for  # noqa: E402
from gatelab.kernels import head_loss  # noqa: E402
from gatelab.model import GPT  # noqa: E402
from gatelab.training.distributed import Context  # noqa: E402
from gatelab.training.train import make_optimizer, wrap_for_training  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense, SXM datasheet
MODELS = {"paper": {}, "tiny": dict(n_layer=2, d_model=64, n_head=4, d_mlp=128, context=64, d_gate=8)}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def flops_per_token(model: GPT) -> float:
    cfg = model.cfg
    n = model.num_params() - model.wte.weight.numel() - model.wpe.weight.numel()
    return 6 * n + 12 * cfg.n_layer * cfg.context * cfg.d_model


def time_steps(fn, device, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


VARIANTS = {  # name: (dtype, TrainConfig.compile, fused_loss)
    "reference": ("fp32", False, False),  # eager fp32, full logits: the plain reference implementation
    "eager-bf16": ("auto", False, False),  # gatelab's path before the fast path (bf16 autocast, eager)
    "compiled": ("auto", "default", True),  # torch.compile without CUDA graphs, fused output-head loss
    "fast": ("auto", "auto", True),  # the default on one GPU: bf16, torch.compile with CUDA graphs, fused loss
    "fast-sort": ("auto", "auto", True),  # "fast" without the Triton kernels (row sort, scatter, explicit soft gate)
    "fast-flexhard": ("auto", "auto", True),  # "fast" with hard keep-masks applied by flex_attention, not SDPA
    "fast-chunk8k": ("auto", "auto", True),  # "fast" with the fused loss over 8,192 rows at once (default 2,048)
    "fast-explicit": ("auto", "auto", True),  # "fast" with the soft gate's explicit path (G, S, mask in memory)
    "fast-fused": ("auto", "auto", True),  # "fast" with the soft gate's fused kernel (kernels/soft_gate.py)
    "fast-threshold": ("auto", "auto", True),  # "fast" with topk-sigmoid's other threshold source (TOPK_THRESHOLD)
    "fast-padvocab": ("auto", "auto", True),  # "fast" with the fused loss's other vocabulary padding (1 or 64)
    "fast-headkernel": ("auto", "auto", True),  # "fast" with the fused loss on kernels.fused_head_loss (Triton)
    "compiled-unfused": ("auto", "default", False),  # profile_step.py only: what the fused loss replaces
}


def variant_backend(variant: str) -> Backend:
    """The attention and loss Backend of a variant: the default (the environment's) with the variant's change."""
    d = default_backend()
    change = dict(kernels=variant not in ("fast-sort", "eager-bf16", "reference"),
                  hard_attention="flex" if variant == "fast-flexhard" else "sdpa")
    change["soft_attention"] = {"fast-explicit": "explicit", "fast-fused": "fused",
                                "fast-threshold": "fused"}.get(variant, d.soft_attention)
    if variant == "fast-threshold":  # topk-sigmoid's other threshold source than the default's
        change["topk_threshold"] = "scores" if d.topk_threshold == "factors" else "factors"
    if variant == "fast-padvocab":  # the other padding than the default's (64 since the H100 run; 1 before)
        change["loss_vocab_multiple"] = 1 if d.loss_vocab_multiple != 1 else 64
    if variant == "fast-headkernel":
        change["loss_kernel"] = "triton"
    return replace(d, **change)


@contextlib.contextmanager
def variant_switches(variant: str):
    """The fused loss's chunk size of a variant; compiled graphs are dropped around it so none is reused across."""
    saved = head_loss.LOSS_CHUNK_ROWS
    if variant == "fast-chunk8k":
        head_loss.LOSS_CHUNK_ROWS = 8192
    torch._dynamo.reset()
    try:
        yield
    finally:
        head_loss.LOSS_CHUNK_ROWS = saved


def parse_mode(text: str, k: int) -> Routing:
    """'soft-gate:topk-sigmoid' is the soft gate under a named reading; a plain mode name is Routing(mode, k)."""
    mode, _, reading = text.partition(":")
    if mode == "soft-gate" and reading:
        return soft_gate_routing(reading, k)
    if reading:
        raise SystemExit(f"only soft-gate takes a reading (one of {', '.join(READINGS)}), got {text!r}")
    return Routing(mode=mode, k=k)


def train_step(mcfg: dict, routing: Routing, batch: int, device, variant: str):
    """gatelab's own training step (the objective module `train` builds, backward, clipping, fused AdamW) on a
    fixed random batch. Returns (step function, model, torch.compile mode or None, list the losses go to,
    gradient function: one forward and backward from the current weights -> (loss, flat gradient))."""
    dtype, compiled, fused = VARIANTS[variant]
    gate = "learned" if routing.needs_gate else "none"
    torch.manual_seed(0)
    model = GPT(ModelConfig(**mcfg, gate=gate)).to(device)
    model.backend = variant_backend(variant)
    cfg = TrainConfig(model=model.cfg, routing=routing, dtype=dtype, compile=compiled, fused_loss=fused)
    opt = make_optimizer(model, cfg, device)
    run_objective, mode = wrap_for_training(model, cfg, Context(device=device), device)
    graphs = mode is not None and "reduce-overhead" in mode
    T = model.cfg.context
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, model.cfg.vocab_size, (batch, T), generator=g).to(device)
    y = torch.randint(0, model.cfg.vocab_size, (batch, T), generator=g).to(device)
    losses = []

    def forward_backward():
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        torch.manual_seed(0)  # stochastic routing draws the same masks in every variant
        with autocast_for(device, dtype):
            loss, _ = run_objective(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        return loss

    def step():
        loss = forward_backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        losses.append(loss.detach().clone())

    def gradient():
        loss = forward_backward()
        flat = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None]).clone()
        opt.zero_grad(set_to_none=True)
        return float(loss), flat
    return step, model, mode, losses, gradient


def gradient_check(mcfg: dict, routing: Routing, batch: int, device, fast_gradient) -> dict:
    """The fast variant's first loss and gradient (fast_gradient: its `gradient` function, called before any step)
    against the eager bf16 path without the Triton kernels on the same weights and batch: relative error and cosine.
    Stochastic routing draws its subsets differently on the two paths, so only its loss is compared."""
    t0 = time.perf_counter()
    loss_fast, g_fast = fast_gradient()
    compile_s = time.perf_counter() - t0
    with variant_switches("eager-bf16"):
        _, _, _, _, plain_gradient = train_step(mcfg, routing, batch, device, "eager-bf16")
        loss_plain, g_plain = plain_gradient()
    rel = float((g_fast - g_plain).norm() / g_plain.norm())
    cos = float(torch.nn.functional.cosine_similarity(g_fast, g_plain, dim=0))
    same_masks = routing.mode != "stochastic"
    ok = abs(loss_fast - loss_plain) < 2e-2 * abs(loss_plain) and (not same_masks or (cos > 0.99 and rel < 0.1))
    return dict(routing=routing.label(), batch=batch, fast=loss_fast, plain=loss_plain, plain_variant="eager-bf16",
                grad_rel_err=rel if same_masks else None, grad_cos=cos if same_masks else None, ok=ok,
                compile_s=compile_s)


def bench_train(mcfg: dict, routing: Routing, batch: int, device, variant: str, steps: int, warmup: int,
                checks: list | None = None) -> dict:
    """Times `train_step` of one variant: the first step (compilation included) and the median of `steps`.
    checks: when given, the variant's first gradient is compared with the plain path's first (gradient_check)."""
    with variant_switches(variant):
        step, model, mode, losses, gradient = train_step(mcfg, routing, batch, device, variant)
        check = gradient_check(mcfg, routing, batch, device, gradient) if checks is not None else None
        if check is not None:
            checks.append(dict(check, variant=variant))
        return _time_train(step, model, mode, losses, routing, batch, device, variant, steps, warmup)


def _time_train(step, model, mode, losses, routing, batch, device, variant, steps, warmup) -> dict:
    dtype, _, fused = VARIANTS[variant]
    T = model.cfg.context
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    step()  # the first step (compilation included)
    sync(device)
    first_s = time.perf_counter() - t0
    times = time_steps(step, device, steps, max(warmup - 1, 0))
    med = statistics.median(times)
    return dict(kind="train", variant=variant, routing=routing.label(), batch=batch, dtype=dtype,
                compile=mode or "off", fused_loss=fused, step_ms=1000 * med, first_step_s=first_s,
                tokens_per_s=batch * T / med, flops_per_token=flops_per_token(model), first_loss=float(losses[0]),
                peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None)


def bench_distill(mcfg: dict, k: int, batch: int, device, steps: int, warmup: int) -> dict:
    from gatelab.training.distill import distill_loss
    torch.manual_seed(0)
    model = GPT(ModelConfig(**mcfg, gate="learned")).to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.gate_parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.gate_parameters(), lr=1e-3)
    x = torch.randint(0, model.cfg.vocab_size, (batch, model.cfg.context), device=device)

    def step():
        with autocast_for(device):
            loss, _ = distill_loss(model, x, "kl", min(k, model.cfg.context))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    med = statistics.median(time_steps(step, device, steps, warmup))
    return dict(kind="distill-kl", routing=f"gate k={k}", batch=batch, steps_per_s=1 / med, step_ms=1000 * med)


@torch.no_grad()
def bench_eval(mcfg: dict, batch: int, device, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    model = GPT(ModelConfig(**mcfg)).to(device).eval()
    x = torch.randint(0, model.cfg.vocab_size, (batch, model.cfg.context), device=device)

    def step():
        with autocast_for(device):
            model(x, x, reduction="sum")
    med = statistics.median(time_steps(step, device, steps, warmup))
    return dict(kind="eval", routing="dense", batch=batch, tokens_per_s=batch * model.cfg.context / med,
                step_ms=1000 * med)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=list(MODELS), default="paper")
    ap.add_argument("--batches", default="16,64")
    ap.add_argument("--modes", default="dense,soft-gate,soft-gate:topk-sigmoid,soft-gate:sigmoid-renorm,gate-topk,"
                    "oracle-topk,random-topk,stochastic",
                    help="routing modes; soft-gate:READING names a soft-gate reading (soft-gate alone: the default)")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--eager-modes", default="dense",
                    help="modes also timed on the eager bf16 path, to show what each fast-path part buys")
    ap.add_argument("--sort-modes", default="soft-gate:topk-sigmoid,gate-topk,oracle-topk,stochastic",
                    help="modes also timed as fast-sort (without the Triton kernels: the row sort and explicit soft gate)")
    ap.add_argument("--flexhard-modes", default="gate-topk",
                    help="modes also timed as fast-flexhard (the keep-mask applied by flex_attention, not SDPA)")
    ap.add_argument("--chunk-modes", default="dense",
                    help="modes also timed as fast-chunk8k (the fused loss over 8,192 rows at once)")
    ap.add_argument("--soft-modes", default="soft-gate,soft-gate:sigmoid-renorm,soft-gate:topk-sigmoid",
                    help="modes also timed with the soft gate's other attention path(s) (fast-explicit / fast-fused)")
    ap.add_argument("--padvocab-modes", default="dense",
                    help="modes also timed as fast-padvocab (the fused loss's vocabulary with the other padding than the "
                         "default's: unpadded when the default pads to 64, padded when it does not)")
    ap.add_argument("--headkernel-modes", default="dense",
                    help="modes also timed as fast-headkernel (the fused loss on the Triton head kernels)")
    ap.add_argument("--threshold-modes", default="soft-gate:topk-sigmoid",
                    help="modes also timed as fast-threshold (topk-sigmoid's row threshold from the other source: "
                         "G in memory or the gate's factors in registers, default_backend().topk_threshold)")
    ap.add_argument("--no-check", action="store_true", help="skip the gradient check of each fast variant")
    ap.add_argument("--skip-extra", action="store_true", help="skip the distillation and evaluation rows")
    ap.add_argument("--tag", default="", help="suffix of the output files' names")
    ap.add_argument("--compiled-modes", default="dense",
                    help="modes also timed compiled without CUDA graphs, to show what the graphs buy")
    ap.add_argument("--out", default="benchmarks/results")
    return ap.parse_args(argv)


def show(r: dict) -> None:
    """One progress line per timed row."""
    print(f"{r['variant']:10s} {r['routing']:40s} batch {r['batch']:3d}: {r['tokens_per_s']:12,.0f} tok/s "
          f"{r['step_ms']:8.2f} ms ({r.get('vs_reference', 1):.2f}x the reference) first step "
          f"{r['first_step_s']:.1f} s", flush=True)


def write(args, name: str, rows: list, checks: list, failures: list) -> str:
    """Writes the JSON and markdown of every row so far (after each row: a killed run keeps what it measured)."""
    peak = next((v for key, v in PEAK_BF16_TFLOPS.items() if key in name), None)
    for r in rows:
        if r["kind"] == "train" and peak:
            r["mfu"] = r["tokens_per_s"] * r["flops_per_token"] / (peak * 1e12)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(device=name, torch=torch.__version__, command=" ".join(sys.argv), model=args.model,
                peak_bf16_tflops=peak, checks=checks, rows=rows, failures=failures)
    slug += f"-{args.tag}" if args.tag else ""
    (out / f"{slug}.json").write_text(json.dumps(meta, indent=1) + "\n")
    lines = [f"# gatelab benchmark on {name} (torch {torch.__version__})", "", f"`{meta['command']}`", "",
             "Step = gatelab's training step (loss, backward, gradient clipping, AdamW) on random tokens; median of "
             f"{args.steps} steps after {args.warmup} warm-up steps. *reference*: eager fp32 with full logits; "
             "*eager-bf16*: bf16 autocast, eager; *compiled*: bf16, torch.compile (default mode), fused "
             "output-head loss; *fast*: the default on one GPU, as *compiled* plus CUDA graphs (mode "
             "reduce-overhead). MFU: FLOPs/token = 6N + 12LTd against the chip's dense bf16 peak "
             f"({peak} TFLOP/s). *fast-sort*: *fast* without the Triton kernels (the row sort, the scattered mask, the "
             "explicit soft gate: the fast path before the selection kernel); *fast-flexhard*: *fast* with the keep-mask applied "
             "by flex_attention instead of SDPA's boolean mask; *fast-chunk8k*: *fast* with the fused loss over "
             "8,192 rows of logits at once (default 2,048); *fast-explicit* / *fast-fused*: *fast* with the soft gate's "
             "explicit path (G, S and the mask in memory) / its fused flash-style kernel "
             "(kernels/soft_gate.py); *fast-threshold*: *fast* with topk-sigmoid's other threshold "
             f"source than the default's ({default_backend().topk_threshold}: factors = G in registers from the gate's "
             "projections, scores = G in memory); *fast-padvocab*: *fast* with the fused loss's other vocabulary "
             f"padding than the default's ({default_backend().loss_vocab_multiple}); *fast-headkernel*: *fast* with "
             "the output head on the Triton kernels (kernels/head_loss.py). *step / dense*: the step time over "
             "*fast* dense's.",
             "", "| kind | variant | routing | batch | tokens/s | step ms | step / dense | vs eager fp32 | compile | "
             "first step s | peak GiB | MFU |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)
    for r in rows:
        rate = fmt(r.get("tokens_per_s"), ",.0f") if "tokens_per_s" in r else f"{r['steps_per_s']:.1f} steps/s"
        ratio = fmt(r.get("vs_reference", 1.0), ".2f") + "x" if r["kind"] == "train" else "-"
        vs_dense = fmt(r.get("vs_dense_fast"), ".2f") + ("x" if r.get("vs_dense_fast") else "")
        lines.append(f"| {r['kind']} | {r.get('variant', '-')} | {r['routing']} | {r['batch']} | {rate} | "
                     f"{r['step_ms']:.2f} | {vs_dense} | {ratio} | {r.get('compile', '-')} | "
                     f"{fmt(r.get('first_step_s'), '.1f')} | {fmt(r.get('peak_mem_gib'), '.2f')} | "
                     f"{fmt(r.get('mfu'), '.1%')} |")
    lines += ["", "Each fast variant against the plain path (eager bf16, no Triton kernels) on the same weights and batch: "
              "the first loss (within 2%) and the whole gradient (relative error < 0.1, cosine > 0.99; not for "
              "stochastic, whose two paths draw different subsets). *compile s*: the variant's first call.", "",
              "| variant | routing | batch | fast loss | plain loss | grad rel. err | grad cosine | compile s | ok |",
              "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {c['variant']} | {c['routing']} | {c['batch']} | {c['fast']:.5f} | {c['plain']:.5f} | "
              f"{fmt(c['grad_rel_err'], '.4f')} | {fmt(c['grad_cos'], '.5f')} | {c['compile_s']:.1f} | {c['ok']} |"
              for c in checks]
    lines += [f"\nFAILED: {f['variant']} {f['routing']} batch {f['batch']}: {f['error']}" for f in failures]
    (out / f"{slug}.md").write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


def variants(text: str, args, cuda: bool) -> list[str]:
    """The variants timed for one routing mode: fast, and each extra one whose --*-modes list names the mode."""
    def named(option: str, gpu_only: bool = True) -> bool:
        return text in getattr(args, option).split(",") and (cuda or not gpu_only)
    soft = [v for v in ("fast-explicit", "fast-fused") if v != f"fast-{default_backend().soft_attention}"]
    return (["fast"] + (["eager-bf16"] if named("eager_modes", False) else [])
            + (["compiled"] if named("compiled_modes") else [])
            + (["fast-sort"] if named("sort_modes", False) else [])
            + (["fast-flexhard"] if named("flexhard_modes", False) else [])
            + (["fast-chunk8k"] if named("chunk_modes") else [])
            + (["fast-threshold"] if named("threshold_modes") else [])
            + (["fast-padvocab"] if named("padvocab_modes") else [])
            + (["fast-headkernel"] if named("headkernel_modes") else [])
            + (soft if named("soft_modes") else []))  # the other soft-gate path(s) than fast's


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    mcfg = MODELS[args.model]
    k = min(args.k, ModelConfig(**mcfg).context)
    rows, checks, failures = [], [], []
    for batch in [int(b) for b in args.batches.split(",")]:
        ref = bench_train(mcfg, Routing(), batch, device, "reference", args.steps, args.warmup)
        rows.append(ref)
        show(ref)
        for text in args.modes.split(","):
            routing = parse_mode(text, k)
            for variant in variants(text, args, device.type == "cuda"):
                check = variant.startswith("fast") and not args.no_check
                try:
                    r = bench_train(mcfg, routing, batch, device, variant, args.steps, args.warmup,
                                    checks if check else None)
                except Exception as e:  # noqa: BLE001 - recorded, and the run goes on to the other variants
                    print(f"{variant} {routing.label()}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                    failures.append(dict(variant=variant, routing=routing.label(), batch=batch,
                                         error=f"{type(e).__name__}: {str(e)[:300]}"))
                    continue
                r["vs_reference"] = ref["step_ms"] / r["step_ms"]
                dense = next((x for x in rows if x["batch"] == batch and x["routing"] == "dense"
                              and x["variant"] == "fast"), None)
                r["vs_dense_fast"] = r["step_ms"] / dense["step_ms"] if dense else None
                rows.append(r)
                show(r)
                write(args, name, rows, checks, failures)
    if not args.skip_extra:
        rows.append(bench_distill(mcfg, k, 16, device, args.steps, args.warmup))
        rows.append(bench_eval(mcfg, 16, device, args.steps, args.warmup))
    print(write(args, name, rows, checks, failures))
    if failures:
        sys.exit(f"{len(failures)} variant(s) failed (listed above)")
    if not all(c["ok"] for c in checks):
        sys.exit("fast path disagrees with the plain path (see the table above)")

if __name__ == "__main__":
    main()
