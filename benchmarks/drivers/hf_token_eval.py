#!/usr/bin/env python3
"""Time an evaluation of a Hugging Face model under gatelab's token routings (dense, oracle / gate / random top-k,
the soft gate), on a SmolLM2-135M-shaped Llama with random weights built in code, and print one JSON line per
routing: milliseconds per window, tokens/s and perplexity. Runs against whichever gatelab is on PYTHONPATH, so the
same command times two versions side by side (benchmarks/drivers/layout_compare.sh).

    PYTHONPATH=src python benchmarks/drivers/hf_token_eval.py --context 1024 --windows 16 --out hf.jsonl
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import transformers

from gatelab.config import Routing
from gatelab.hf import attach_gates, hf_perplexity

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**dict(SMOLLM2, num_hidden_layers=args.layers),
                                   max_position_embeddings=args.context)
    model = transformers.LlamaForCausalLM(cfg).to(device="cuda", dtype=torch.bfloat16).eval()
    gated = attach_gates(model, d_gate=32, gate="random")
    ids = torch.randint(0, cfg.vocab_size, (args.context * args.windows + 1,),
                        generator=torch.Generator().manual_seed(1)).tolist()
    routings = [Routing(), Routing(mode="oracle-topk", k=args.k), Routing(mode="gate-topk", k=args.k),
                Routing(mode="random-topk", k=args.k), Routing(mode="soft-gate", k=args.k)]
    lines = []
    for r in routings:
        def run():
            with gated.routing(r):
                return hf_perplexity(model, ids, r, context=args.context, batch_size=args.batch, progress=False)
        run()  # warm-up (autotuning, caches)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        ppl = run()
        torch.cuda.synchronize()
        s = time.perf_counter() - t0
        row = dict(routing=r.label(), context=args.context, windows=args.windows, batch=args.batch,
                   ms_per_window=1000 * s / args.windows, tokens_per_s=args.context * args.windows / s,
                   ppl=ppl if not isinstance(ppl, dict) else ppl.get("ppl"), gpu=torch.cuda.get_device_name())
        print(json.dumps(row), flush=True)
        lines.append(json.dumps(row))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
