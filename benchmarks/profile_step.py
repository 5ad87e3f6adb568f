#!/usr/bin/env python3
"""Where a training step's GPU time goes: torch.profiler over a few steps of the benchmark's training step,
the top kernels by total device time.

    PYTHONPATH=src python benchmarks/profile_step.py --mode dense --variant fast [--batch 16] [--out DIR]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from bench_train import VARIANTS  # noqa: E402

from gatelab.config import ModelConfig, Routing, TrainConfig  # noqa: E402
from gatelab.evaluate import autocast_for  # noqa: E402
from gatelab.model import GPT  # noqa: E402
from gatelab.train import make_optimizer, step_loss  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", default="dense")
    ap.add_argument("--variant", choices=list(VARIANTS) + ["compiled-unfused"], default="fast")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype, compiled, fused = VARIANTS.get(args.variant, ("auto", True, False))
    routing = Routing(mode=args.mode, k=args.k)
    torch.manual_seed(0)
    model = GPT(ModelConfig(gate="learned" if routing.needs_gate else "none")).to(device)
    cfg = TrainConfig(model=model.cfg, routing=routing, dtype=dtype, compile=compiled, fused_loss=fused)
    opt = make_optimizer(model, cfg, device)
    run_model = torch.compile(model) if compiled else model
    x = torch.randint(0, 50257, (args.batch, 512), device=device)

    def step():
        with autocast_for(device, dtype):
            loss, _ = step_loss(run_model, x, x, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                            torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    print(f"== {args.variant} {routing.label()} batch {args.batch}: per step, top kernels by device time")
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=70))


if __name__ == "__main__":
    main()
