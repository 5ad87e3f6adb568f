#!/usr/bin/env python3
"""Where a training step's GPU time goes: torch.profiler over a few steps of the benchmark's training step,
the top kernels by total device time.

    PYTHONPATH=src python benchmarks/profile_step.py --mode dense --variant compiled [--batch 16] [--steps 5]
    PYTHONPATH=src python benchmarks/profile_step.py --mode soft-gate:topk-sigmoid --variant compiled

--mode takes bench_train's spelling (a soft-gate reading after a colon). Profile *compiled* rather than *fast*: under
CUDA graphs the profiler sees graph replays, not the kernels inside them.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from bench_train import VARIANTS, parse_mode, train_step  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", default="dense", help="a routing mode, soft-gate:READING for a soft-gate reading")
    ap.add_argument("--variant", choices=list(VARIANTS), default="fast")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    routing = parse_mode(args.mode, args.k)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    step, *_ = train_step({}, routing, args.batch, device, args.variant)
    for _ in range(3):
        step()
    sync()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                            torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
        sync()
    print(f"== {args.variant} {routing.label()} batch {args.batch}: per step, top kernels by device time")
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=70))


if __name__ == "__main__":
    main()
