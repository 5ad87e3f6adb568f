"""One decoding step's attention over a cache of fixed size, position read on the device (what a CUDA graph of a
whole decoding step needs), by each kernel that can serve it, against SDPA's flash over exactly the filled part.

Shapes: SmolLM2-135M's attention (9 query heads, 3 key/value heads, head size 64), bf16, batch 8, 32K positions
filled of a cache with room for 32K + 256. Each candidate's output is compared with the flash reference and timed as
GPU time per call (30 calls captured in one CUDA graph, replayed).

    PYTHONPATH=src python benchmarks/drivers/decode_kernel_probe.py [--batch 8] [--context 32768]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from gatelab.kernels.block_decode import block_decode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_inference import graph_ms  # noqa: E402


def candidates(q, kbuf, vbuf, pos, length: int, bs: int):
    """name -> a call returning (B, H, 1, D). kbuf, vbuf: (B, cap, Hk, D) (sequence-major, as a varlen kernel reads)."""
    B, H, _, D = q.shape
    cap, Hk = kbuf.shape[1], kbuf.shape[2]
    k, v = kbuf.transpose(1, 2), vbuf.transpose(1, 2)  # (B, Hk, cap, D) views
    dev = q.device
    out = {}

    def flash_exact():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k[:, :, :length], v[:, :, :length], enable_gqa=True)
    out["sdpa flash, exact length (reference)"] = flash_exact

    cu_q = torch.arange(B + 1, dtype=torch.int32, device=dev)
    cu_k = torch.arange(B + 1, dtype=torch.int32, device=dev) * cap
    used = torch.empty(B, dtype=torch.int32, device=dev)
    qp = torch.empty(B, H, D, dtype=q.dtype, device=dev)

    def varlen():
        used.copy_((pos + 1).expand(B))
        qp.copy_(q[:, :, 0])
        o = torch.ops.aten._flash_attention_forward(qp, kbuf.view(B * cap, Hk, D), vbuf.view(B * cap, Hk, D), cu_q,
                                                    cu_k, 1, cap, 0.0, False, False, scale=D ** -0.5,
                                                    seqused_k=used)[0]
        return o.view(B, H, 1, D)
    out["flash varlen, seqused_k"] = varlen

    ar = torch.arange(cap, device=dev)

    def sdpa_mask():
        mask = (ar <= pos).view(1, 1, 1, cap)
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    out["sdpa with a mask, gqa (efficient/cudnn)"] = sdpa_mask

    def sdpa_mask_repeat():
        mask = (ar <= pos).view(1, 1, 1, cap)
        kr, vr = k.repeat_interleave(H // Hk, 1), v.repeat_interleave(H // Hk, 1)
        return F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask)
    out["sdpa with a mask, heads repeated (transformers' static cache)"] = sdpa_mask_repeat

    from torch.nn.attention.flex_attention import BlockMask, flex_attention
    flex = torch.compile(flex_attention, dynamic=False)
    nbk = cap // bs
    kv_num = torch.empty(1, 1, 1, dtype=torch.int32, device=dev)
    kv_idx = torch.arange(nbk, dtype=torch.int32, device=dev).view(1, 1, 1, nbk)

    def flex_call():
        kv_num.copy_((pos // bs + 1).view(1, 1, 1))
        bm = BlockMask.from_kv_blocks(kv_num, kv_idx, BLOCK_SIZE=(bs, bs), seq_lengths=(1, cap),
                                      mask_mod=lambda b, h, qi, ki: ki <= pos[0])
        return flex(q, k, v, block_mask=bm, enable_gqa=True)
    out["flex_attention, BlockMask of the filled blocks"] = flex_call

    nb = cap // bs
    blocks = torch.arange(nb, dtype=torch.int32, device=dev)
    idx_all = torch.empty(B, H, nb, dtype=torch.int32, device=dev)

    def kernel_all():
        idx_all.copy_(torch.where(blocks <= pos // bs, blocks, -1).expand(B, H, nb))
        return block_decode(q, k, v, idx_all, pos, bs)
    out["gatelab block kernel, every filled block"] = kernel_all

    kept = (length // bs) // 8  # 87.5% of the earlier blocks skipped
    idx_sparse = torch.cat([torch.randperm(length // bs, device=dev)[:kept].sort().values,
                            (pos // bs).to(torch.long)]).to(torch.int32).expand(B, H, kept + 1).contiguous()
    out[f"gatelab block kernel, {kept + 1} blocks (87.5%)"] = lambda: block_decode(q, k, v, idx_sparse, pos, bs)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--json", help="write the rows here too")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    B, H, Hk, D, bs = args.batch, 9, 3, 64, 128
    length, cap = args.context + 64, args.context + 256
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(B, H, 1, D, device=dev, dtype=dt)
    kbuf = torch.randn(B, cap, Hk, D, device=dev, dtype=dt)
    vbuf = torch.randn(B, cap, Hk, D, device=dev, dtype=dt)
    kbuf[:, length:], vbuf[:, length:] = 100.0, 100.0  # past the position: must not be read
    pos = torch.tensor([length - 1], device=dev)
    rows = []
    ref = None
    for name, fn in candidates(q, kbuf, vbuf, pos, length, bs).items():
        row = dict(name=name)
        try:
            o = fn()
            ref = o.float() if ref is None else ref
            row["max_abs_diff"] = float((o.float() - ref).abs().max()) if "87.5" not in name else None
            row["gpu_ms"] = graph_ms(fn, replays=20, calls=30)
        except Exception as e:  # a candidate this torch cannot run: reported, the others go on
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(torch.__version__, torch.cuda.get_device_name())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(torch=torch.__version__, device=torch.cuda.get_device_name(), batch=B, context=length,
                           rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
