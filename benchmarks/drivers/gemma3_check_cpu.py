"""CPU check that Gemma-3-270M (GGUF from benchmarks/drivers/gemma3_parts.sh prepare, in /tmp/gemma3) loads and runs through the
adapter with the rope and qk gates: dense routing gives the unpatched perplexity on the first 1,024 bundled
validation tokens; an untrained gate and the oracle at k = 64 run. Output in
results/pretrained/position-probes-cpu.md. Usage: PYTHONPATH=/tmp/site:src python benchmarks/drivers/gemma3_check_cpu.py
"""
import time

import torch

torch.set_num_threads(2)
from gatelab.config import Routing
from gatelab.hf.adapter import attach_gates
from gatelab.hf.corpus import encode_corpus
from gatelab.hf.evaluate import hf_perplexity
from gatelab.hf.gate_files import load_pretrained

t0 = time.time()
model, tok = load_pretrained("/tmp/gemma3", "gemma-3-270m-q4_k_m.gguf")
cfg = model.config
print(type(model).__name__, cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
      getattr(cfg, "head_dim", None), cfg.vocab_size, getattr(cfg, "sliding_window", None), getattr(cfg, "layer_types", None)[:6],
      getattr(cfg, "rope_parameters", None), f"load {time.time()-t0:.0f}s", flush=True)
ids = encode_corpus(tok, "bundled", "validation")
print("validation tokens", len(ids), "bos", tok.bos_token_id, "eos", tok.eos_token_id, flush=True)
ref = hf_perplexity(model, ids, Routing(), context=512, batch_size=1, max_tokens=1024)
for pos in ("rope", "qk"):
    ctl = attach_gates(model, d_gate=32, position=pos)
    d = hf_perplexity(model, ids, Routing(), context=512, batch_size=1, max_tokens=1024)
    g = hf_perplexity(model, ids, Routing(mode="gate-topk", k=64), context=512, batch_size=1, max_tokens=1024)
    print(pos, "unpatched dense", round(ref["ppl"], 4), "adapter dense", round(d["ppl"], 4), "random-init gate-topk@64", round(g["ppl"], 2), flush=True)
o = hf_perplexity(model, ids, Routing(mode="oracle-topk", k=64), context=512, batch_size=1, max_tokens=1024)
print("oracle@64", round(o["ppl"], 4), f"total {time.time()-t0:.0f}s")
