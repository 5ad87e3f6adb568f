#!/usr/bin/env python3
"""Block-gate distillation's teacher on the GPU: the pooled attention mass of every (query block, key block) pair,
attention/blocks.py's block_attention_mass, the chunked torch path (softmax over T x T logits in chunks of 2^27 weights) against
kernels/block_mass.py (one Triton kernel, two passes over the keys, nothing T x T in memory), bf16, at
SmolLM2-135M's attention shape (9 query heads, 3 key/value heads, head dim 64, block 128) and the 31M GPT's (4
heads, head dim 64, batch 16 x 512, block 64). Each row also compares both against the torch path on fp32 inputs.

    PYTHONPATH=src python benchmarks/bench_block_mass.py [--out benchmarks/results]
"""
import argparse
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from bench_topk import ms  # noqa: E402

from gatelab.attention import blocks  # noqa: E402
from gatelab.kernels import block_mass  # noqa: E402

SHAPES = [(1, 9, 3, 2048, 128), (1, 9, 3, 8192, 128), (4, 9, 3, 8192, 128), (16, 4, 4, 512, 64)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    name = torch.cuda.get_device_name()
    lines = [f"# Pooled block attention mass on {name} (torch {torch.__version__})", "",
             "`PYTHONPATH=src python benchmarks/bench_block_mass.py`; ms per layer (CUDA events, 20 calls after 3), "
             "bf16 q and k; max |diff| of each against the torch path on the same inputs in fp32.", "",
             "| B x H (kv) x T, block | torch chunked ms | kernel ms | torch / kernel | max diff torch bf16 | "
             "max diff kernel |", "|---|---|---|---|---|---|"]
    ok = True
    for B, H, Hk, T, bs in SHAPES:
        torch.manual_seed(0)
        q = torch.randn(B, H, T, 64, device="cuda", dtype=torch.bfloat16) * 2
        k = torch.randn(B, Hk, T, 64, device="cuda", dtype=torch.bfloat16) * 2
        assert block_mass.block_mass_fits(q, k, bs), "the kernel does not serve this shape"
        fused = lambda: blocks.block_attention_mass(q, k, bs)  # noqa: E731
        # causal but for the last query's own key: not plain causal, so the torch path serves it (same work)
        not_plain = torch.ones(1, 1, T, T, dtype=torch.bool, device="cuda").tril()
        not_plain[..., -1, -1] = False
        t_torch = ms(lambda: blocks.block_attention_mass(q, k, bs, not_plain))
        t_kernel = ms(fused)
        ref = blocks.block_attention_mass(q.float(), k.float(), bs, not_plain)
        d_torch = float((blocks.block_attention_mass(q, k, bs, not_plain) - ref).abs().max())
        ref_causal = blocks.block_attention_mass(q.float(), k.float(), bs)
        d_kernel = float((fused() - ref_causal).abs().max())
        ok &= d_kernel < 1e-2
        lines.append(f"| {B} x {H} ({Hk}) x {T}, {bs} | {t_torch:.3f} | {t_kernel:.3f} | {t_torch / t_kernel:.1f}x | "
                     f"{d_torch:.2e} | {d_kernel:.2e} |")
        print(lines[-1], flush=True)
    lines += ["", "The torch path here is timed on a mask that is causal except for the last query's own key (so it "
              "cannot take the kernel): the same amount of work as plain causal attention."]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    (out / f"block-mass-{slug}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
