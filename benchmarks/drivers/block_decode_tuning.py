"""The block-decoding kernel's launch settings compared on one decoding step's shapes: programs per launch (how the
kept blocks are split), warps and pipeline stages per program.

Shapes: SmolLM2-135M's attention (9 query heads, 3 key/value heads, head size 64), bf16, batch 8, a 32K cache,
block size 128, each query head keeping its own random 32 earlier blocks and its own (what a step at 32K reads in
the decode benchmark's 75% row, whose sparsity counts the causal tiles of the whole sequence; --kept 16: the 87.5%
row; per head, as a block gate selects, so the three heads of a group read different blocks). Each setting: GPU
time per call, 30 calls captured in one CUDA graph and replayed (the gaps between a step's layers included), the
bytes of keys and values read per call over that time, and the largest difference from the torch reference. Dense
attention over the same cache (SDPA with a mask, as dense decoding runs it) for scale.

    PYTHONPATH=src python benchmarks/drivers/block_decode_tuning.py [--json FILE]
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

from gatelab.attention.fixed_decode import dense_fixed_step
from gatelab.kernels.block_decode import block_decode, block_decode_reference

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_inference import graph_ms  # noqa: E402

PROGRAMS = (576, 1024, 2048, 4096, 8192)
WARPS = (2, 4, 8)
STAGES = (1, 2, 3)


def setup(B: int, context: int, kept: int, bs: int = 128, H: int = 9, Hk: int = 3, D: int = 64):
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    cap = context + 256
    q = torch.randn(B, H, 1, D, device=dev, dtype=dt)
    k = torch.randn(B, Hk, cap, D, device=dev, dtype=dt)
    v = torch.randn(B, Hk, cap, D, device=dev, dtype=dt)
    pos = torch.tensor([context + 63], device=dev)
    own = (context + 63) // bs
    earlier = torch.rand(B, H, own, device=dev).argsort(-1)[..., :kept].sort(-1).values
    idx = torch.cat([earlier, torch.full((B, H, 1), own, device=dev)], -1).to(torch.int32).contiguous()
    valid = torch.arange(cap, device=dev) <= pos
    return q, k, v, idx, pos, valid


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--kept", type=int, default=32, help="earlier blocks kept per query head")
    ap.add_argument("--json", help="write the rows here too")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2
    q, k, v, idx, pos, valid = setup(args.batch, args.context, args.kept)
    B, H, _, D = q.shape
    ref = block_decode_reference(q, k, v, idx, pos, 128).float()
    read = B * H * idx.shape[-1] * 128 * D * 2 * k.element_size()
    rows = [dict(name="dense, sdpa with a mask", us=1e3 * graph_ms(lambda: dense_fixed_step(q, k, v, valid), 50, 30),
                 bytes=B * k.shape[1] * int(pos + 1) * D * 2 * k.element_size())]
    for programs, warps, stages in itertools.product(PROGRAMS, WARPS, STAGES):
        call = lambda: block_decode(q, k, v, idx, pos, 128, target_programs=programs,  # noqa: E731
                                    num_warps=warps, num_stages=stages)
        err = (call().float() - ref).abs().max().item()
        rows.append(dict(name=f"block, programs {programs}, warps {warps}, stages {stages}",
                         us=1e3 * graph_ms(call, 50, 30), bytes=read, max_err=err))
    for r in rows:
        r["tb_per_s"] = r["bytes"] / r["us"] / 1e6
        print(f"{r['name']:44s} {r['us']:8.2f} us  {r['tb_per_s']:5.2f} TB/s  err {r.get('max_err', 0):.1e}")
    best = min(rows[1:], key=lambda r: r["us"])
    print(f"fastest: {best['name']}, {best['us']:.2f} us; dense / fastest {rows[0]['us'] / best['us']:.2f}x",
          flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=torch.cuda.get_device_name(0), torch=torch.__version__,
                                                   batch=B, context=args.context, kept=args.kept, rows=rows),
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
