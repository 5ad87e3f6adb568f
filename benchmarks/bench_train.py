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
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from gatelab.config import ModelConfig, Routing, TrainConfig  # noqa: E402
from gatelab.evaluate import autocast_for  # noqa: E402
from gatelab.model import GPT  # noqa: E402
from gatelab.distributed import Context  # noqa: E402
from gatelab.train import make_optimizer, wrap_for_training  # noqa: E402

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
    "compiled-unfused": ("auto", "default", False),  # profile_step.py only: what the fused loss replaces
}


def train_step(mcfg: dict, routing: Routing, batch: int, device, variant: str):
    """gatelab's own training step (the objective module `train` builds, backward, clipping, fused AdamW) on a
    fixed random batch. Returns (step function, model, torch.compile mode or None, list the losses go to)."""
    dtype, compiled, fused = VARIANTS[variant]
    gate = "learned" if routing.needs_gate else "none"
    torch.manual_seed(0)
    model = GPT(ModelConfig(**mcfg, gate=gate)).to(device)
    cfg = TrainConfig(model=model.cfg, routing=routing, dtype=dtype, compile=compiled, fused_loss=fused)
    opt = make_optimizer(model, cfg, device)
    run_objective, mode = wrap_for_training(model, cfg, Context(device=device), device)
    graphs = mode is not None and "reduce-overhead" in mode
    T = model.cfg.context
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, model.cfg.vocab_size, (batch, T), generator=g).to(device)
    y = torch.randint(0, model.cfg.vocab_size, (batch, T), generator=g).to(device)
    losses = []

    def step():
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        torch.manual_seed(0)  # stochastic routing draws the same masks in every variant
        with autocast_for(device, dtype):
            loss, _ = run_objective(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        losses.append(loss.detach().clone())
    return step, model, mode, losses


def bench_train(mcfg: dict, routing: Routing, batch: int, device, variant: str, steps: int, warmup: int) -> dict:
    """Times `train_step` of one variant: the first step (compilation included) and the median of `steps`."""
    step, model, mode, losses = train_step(mcfg, routing, batch, device, variant)
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
    from gatelab.distill import distill_loss
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=list(MODELS), default="paper")
    ap.add_argument("--batches", default="16,64")
    ap.add_argument("--modes", default="dense,soft-gate,gate-topk,oracle-topk,stochastic")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--eager-modes", default="dense,soft-gate",
                    help="modes also timed on the eager bf16 path, to show what each fast-path part buys")
    ap.add_argument("--compiled-modes", default="dense",
                    help="modes also timed compiled without CUDA graphs, to show what the graphs buy")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    mcfg = MODELS[args.model]
    k = min(args.k, ModelConfig(**mcfg).context)
    rows, checks = [], []
    batches = [int(b) for b in args.batches.split(",")]

    def show(r):
        print(f"{r['variant']:10s} {r['routing']:40s} batch {r['batch']:3d}: {r['tokens_per_s']:12,.0f} tok/s "
              f"{r['step_ms']:8.2f} ms ({r.get('vs_reference', 1):.2f}x the reference) first step "
              f"{r['first_step_s']:.1f} s", flush=True)
    for batch in batches:
        ref = bench_train(mcfg, Routing(), batch, device, "reference", args.steps, args.warmup)
        rows.append(ref)
        show(ref)
        for mode in args.modes.split(","):
            routing = Routing(mode=mode, k=k)
            variants = ["fast"] + (["eager-bf16"] if mode in args.eager_modes.split(",") else []) + \
                (["compiled"] if mode in args.compiled_modes.split(",") and device.type == "cuda" else [])
            for variant in variants:
                r = bench_train(mcfg, routing, batch, device, variant, args.steps, args.warmup)
                r["vs_reference"] = ref["step_ms"] / r["step_ms"]
                rows.append(r)
                show(r)
            eager = next((x for x in rows if x["batch"] == batch and x["routing"] == routing.label()
                          and x["variant"] == "eager-bf16"), None)
            fast = next(x for x in rows if x["batch"] == batch and x["routing"] == routing.label()
                        and x["variant"] == "fast")
            if mode == "dense" or eager is not None:  # the fast path's first loss against the plain path's
                other = eager if eager is not None else ref
                checks.append(dict(routing=routing.label(), batch=batch, fast=fast["first_loss"],
                                   plain=other["first_loss"], plain_variant=other["variant"],
                                   ok=abs(fast["first_loss"] - other["first_loss"]) < 2e-2 * abs(other["first_loss"])))
    rows.append(bench_distill(mcfg, k, 16, device, args.steps, args.warmup))
    rows.append(bench_eval(mcfg, 16, device, args.steps, args.warmup))
    peak = next((v for key, v in PEAK_BF16_TFLOPS.items() if key in name), None)
    for r in rows:
        if r["kind"] == "train" and peak:
            r["mfu"] = r["tokens_per_s"] * r["flops_per_token"] / (peak * 1e12)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(device=name, torch=torch.__version__, command=" ".join(sys.argv), model=args.model,
                peak_bf16_tflops=peak, checks=checks, rows=rows)
    (out / f"{slug}.json").write_text(json.dumps(meta, indent=1) + "\n")
    lines = [f"# gatelab benchmark on {name} (torch {torch.__version__})", "", f"`{meta['command']}`", "",
             "Step = gatelab's training step (loss, backward, gradient clipping, AdamW) on random tokens; median of "
             f"{args.steps} steps after {args.warmup} warm-up steps. *reference*: eager fp32 with full logits; "
             "*eager-bf16*: bf16 autocast, eager; *compiled*: bf16, torch.compile (default mode), fused "
             "output-head loss; *fast*: the default on one GPU, as *compiled* plus CUDA graphs (mode "
             "reduce-overhead). MFU: FLOPs/token = 6N + 12LTd against the chip's dense bf16 peak "
             f"({peak} TFLOP/s).", "",
             "| kind | variant | routing | batch | tokens/s | step ms | vs eager fp32 | compile | first step s | "
             "peak GiB | MFU |", "|---|---|---|---|---|---|---|---|---|---|---|"]

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)
    for r in rows:
        rate = fmt(r.get("tokens_per_s"), ",.0f") if "tokens_per_s" in r else f"{r['steps_per_s']:.1f} steps/s"
        ratio = fmt(r.get("vs_reference", 1.0), ".2f") + "x" if r["kind"] == "train" else "-"
        lines.append(f"| {r['kind']} | {r.get('variant', '-')} | {r['routing']} | {r['batch']} | {rate} | "
                     f"{r['step_ms']:.2f} | {ratio} | {r.get('compile', '-')} | {fmt(r.get('first_step_s'), '.1f')} | "
                     f"{fmt(r.get('peak_mem_gib'), '.2f')} | {fmt(r.get('mfu'), '.1%')} |")
    lines += ["", "Fast path vs plain path, loss of the first step on the same weights and batch (bf16 tolerance 2%):",
              "", "| routing | batch | fast | plain | plain variant | ok |", "|---|---|---|---|---|---|"]
    lines += [f"| {c['routing']} | {c['batch']} | {c['fast']:.5f} | {c['plain']:.5f} | {c['plain_variant']} | "
              f"{c['ok']} |" for c in checks]
    (out / f"{slug}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not all(c["ok"] for c in checks):
        sys.exit("fast path disagrees with the plain path (see the table above)")


if __name__ == "__main__":
    main()
