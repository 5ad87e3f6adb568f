#!/usr/bin/env python3
"""Row-wise top-k of attention-shaped scores on the GPU: torch.topk against a full row sort (routing.row_topk),
for the shapes of the paper's model (batch x 4 heads x 512 x 512), fp32 and bf16, k = 64 / 128 / 256.

    PYTHONPATH=src python benchmarks/bench_topk.py
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from gatelab.routing import row_topk  # noqa: E402


def ms(fn, reps=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main():
    print(f"# row top-k on {torch.cuda.get_device_name()} (torch {torch.__version__})\n")
    print("| shape | dtype | k | topk ms | sort ms | topk / sort | same values |")
    print("|---|---|---|---|---|---|---|")
    for batch in (16, 64):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(batch, 4, 512, 512, device="cuda").to(dtype)
            for k in (64, 128, 256):
                a, b = ms(lambda: row_topk(x, k, "topk")), ms(lambda: row_topk(x, k, "sort"))
                same = torch.equal(row_topk(x, k, "topk")[0], row_topk(x, k, "sort")[0])
                print(f"| {batch}x4x512x512 | {str(dtype)[6:]} | {k} | {a:.3f} | {b:.3f} | {a / b:.2f}x | {same} |")


if __name__ == "__main__":
    main()
