#!/usr/bin/env python3
"""A hard routing's keep-mask on the GPU, from attention-shaped scores (batch x 4 heads x 512 x 512, the paper's
model), fp32 and bf16, k = 64 / 128 / 256, three ways: torch.topk + scatter, a full row sort + scatter (the
reference, kernels/topk.py's topk_keep_mask), and its causal_topk_keep (the sort-free Triton kernel), plus the kernel's
stochastic mask (hashed in-kernel, no score tensor) against torch.rand + the reference. Each kernel mask is checked
against the reference's on the same scores (ties aside: `same` counts rows whose keep-sets differ).

    PYTHONPATH=src python benchmarks/bench_topk.py [--out benchmarks/results]
"""
import argparse
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from gatelab.attention.masks import causal_mask
from gatelab.kernels import topk as kernels  # noqa: E402
from gatelab.kernels.topk import row_topk, topk_keep_mask  # noqa: E402
from gatelab.kernels.triton_support import available  # noqa: E402


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


def topk_mask(x, k, causal):
    idx = row_topk(x.masked_fill(~causal, float("-inf")), k, "topk")[1]
    return torch.zeros_like(x, dtype=torch.bool).scatter_(-1, idx, True) & causal


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    name = torch.cuda.get_device_name()
    assert available(torch.zeros(1, device="cuda")), "Triton kernels are off (install triton)"
    lines = [f"# Keep-mask of a hard routing on {name} (torch {torch.__version__})", "",
             "`PYTHONPATH=src python benchmarks/bench_topk.py`; ms per call, CUDA events, 20 calls after 3; the "
             "kernel's keep-set against the sort reference's on the same scores (rows that differ, of all rows).", "",
             "| shape | dtype | k | topk+scatter ms | sort+scatter ms (reference) | kernel ms | sort / kernel | "
             "rows differing |", "|---|---|---|---|---|---|---|---|"]
    causal = causal_mask(512, "cuda")
    for batch in (16, 64):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(batch, 4, 512, 512, device="cuda").to(dtype)
            for k in (64, 128, 256):
                a = ms(lambda: topk_mask(x, k, causal))
                b = ms(lambda: topk_keep_mask(x, k, causal))
                c = ms(lambda: kernels.causal_topk_keep(x, k))
                diff = int((kernels.causal_topk_keep(x, k) != topk_keep_mask(x, k, causal)).any(-1).sum())
                lines.append(f"| {batch}x4x512x512 | {str(dtype)[6:]} | {k} | {a:.3f} | {b:.3f} | {c:.3f} | "
                             f"{b / c:.1f}x | {diff} of {batch * 4 * 512} |")
        for k in (64,):
            a = ms(lambda: topk_keep_mask(torch.rand(batch, 4, 512, 512, device="cuda"), k, causal))
            c = ms(lambda: kernels.hashed_topk_keep(torch.randint(0, 1 << 32, (batch, 4, 512), device="cuda"), k, 512))
            lines.append(f"| {batch}x4x512x512 stochastic | rand / hash | {k} | - | {a:.3f} | {c:.3f} | {a / c:.1f}x | "
                         "(different draws) |")
    text = "\n".join(lines)
    print(text)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"topk-{slug}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
