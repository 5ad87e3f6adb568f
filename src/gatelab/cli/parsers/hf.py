"""Arguments of the commands on a Hugging Face causal LM: hf-eval, hf-distill and generate."""
from __future__ import annotations

from gatelab.cli.arguments import (
    CORPORA, NONNEG_FLOAT, NONNEG_INT, POS_FLOAT, POS_INT, SPLITS, add_block_gate_args, add_routing_args, csv_of
)
from gatelab.config import COMPILE_MODES, DEFAULT_POSITION, DEFAULT_READING, POSITION_HELP, POSITIONS, READINGS

COMMANDS = "gatelab.cli.commands.hf"
# routings whose decoding steps attend over a KV cache (the gate routings score the whole sequence at once)
GENERATE_ROUTINGS = ("dense", "oracle-topk", "random-topk", "block-gate", "block-oracle", "block-random")


def add_hf_eval(sub) -> None:
    p = sub.add_parser("hf-eval", help="perplexity of a local Hugging Face causal LM under gatelab routings")
    p.add_argument("--model", required=True, help="a local model folder (or the folder holding --gguf)")
    p.add_argument("--gguf", help="a GGUF file inside --model (dequantised on load; needs `pip install gguf`)")
    add_routing_args(p)
    p.add_argument("--corpus", default="bundled", choices=CORPORA)
    p.add_argument("--source")
    p.add_argument("--split", default="validation", choices=SPLITS)
    p.add_argument("--context", type=POS_INT, default=512)
    p.add_argument("--batch-size", type=POS_INT, default=4)
    p.add_argument("--max-tokens", type=NONNEG_INT, default=0, help="evaluate only about this many tokens (0 = all)")
    p.add_argument("--gate", help="gates saved by `gatelab hf-distill` (token gates for gate-topk / soft-gate, "
                   "block gates for block-gate / block-soft)")
    p.add_argument("--position", choices=POSITIONS, help="the variant --gate must be (default: the one its "
                   "gate.json records); a gate of another variant is refused")
    p.add_argument("--long-docs", action="store_true", help="evaluate only documents longer than --context, each "
                   "in whole --context windows (none crosses a document boundary)")
    p.add_argument("--allow-other-base", action="store_true")
    p.add_argument("--compile", action="store_true", help="run the model's forward through torch.compile (one "
                   "graph per routing; the first window of each routing pays the compile)")
    p.add_argument("--compile-mode", choices=COMPILE_MODES,
                   help="torch.compile mode with --compile (default: default; reduce-overhead: CUDA graphs, on a "
                   "CUDA device)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=f"{COMMANDS}:run_hf_eval")


def add_hf_distill(sub) -> None:
    p = sub.add_parser("hf-distill", help="train gates on a frozen (or partly unfrozen) Hugging Face causal LM",
                       description="Train gates on a frozen (or partly unfrozen) Hugging Face causal LM; writes "
                       "OUT/gate.{safetensors,json} (the variant recorded), OUT/metrics.jsonl, OUT/done.json; resumes "
                       "from OUT/checkpoint.pt. Gate variants (--position): " + POSITION_HELP + ". Until convergence: "
                       "--eval-every N --patience P evaluates the objective on held-out training windows every N "
                       "steps and stops after P evaluations without improvement (--steps is then the cap).")
    p.add_argument("--model", required=True)
    p.add_argument("--gguf")
    p.add_argument("--loss", choices=("kl", "bce", "task"), default="kl",
                   help="kl: KL(dense attention || softmax(G)); bce: G vs the oracle top-k mask; "
                        "task: LM loss through the soft gate (default kl)")
    p.add_argument("--reading", default=DEFAULT_READING,
                   choices=tuple(READINGS),
                   help=f"--loss task: the soft-gate reading trained through (default {DEFAULT_READING})")
    p.add_argument("--position", choices=POSITIONS,
                   help=f"gate variant (default {DEFAULT_POSITION}): {POSITION_HELP}. Block gates (--block-size) "
                        f"read qk (the default: the model's own post-RoPE queries and keys pooled per block and "
                        f"head, as SeerAttention) or none (the layer input X pooled per block)")
    p.add_argument("--k", type=POS_INT, default=64, help="token gates: the k of the bce objective's oracle top-k "
                   "and of the F1 logged (block gates use --block-k)")
    p.add_argument("--d-gate", type=POS_INT, default=32)
    p.add_argument("--steps", type=POS_INT, default=1000, help="training steps (with --patience: the most)")
    p.add_argument("--eval-every", type=NONNEG_INT, default=0, help="every N steps, the objective (and F1) on held-out "
                   "windows (the last --eval-batches x --batch-size windows of the training split, never trained "
                   "on) goes to metrics.jsonl as val_loss; the best evaluation's gates are kept (default 0: off)")
    p.add_argument("--patience", type=NONNEG_INT, default=0, help="stop after this many evaluations in a row without "
                   "improvement (needs --eval-every; default 0: train all --steps)")
    p.add_argument("--min-delta", type=NONNEG_FLOAT, default=0.002, help="an improvement lowers the best held-out value "
                   "by more than this fraction (default 0.002)")
    p.add_argument("--eval-batches", type=POS_INT, default=2, help="held-out batches (default 2)")
    p.add_argument("--no-step-f1", action="store_true", help="leave the per-step training F1 out of the log (it "
                   "costs a top-k per layer and step; the held-out evaluations still report F1)")
    p.add_argument("--batch-size", type=POS_INT, default=8)
    p.add_argument("--context", type=POS_INT, default=512)
    p.add_argument("--lr", type=POS_FLOAT, default=1e-3)
    p.add_argument("--seed", type=NONNEG_INT, default=0)
    p.add_argument("--unfreeze-layers", type=csv_of(NONNEG_INT), help="layers whose q/k/v/o projections also train "
                   "(the paper's Tables 7-8)")
    add_block_gate_args(p)
    p.add_argument("--long-docs", action="store_true", help="train on the documents longer than --context only")
    p.add_argument("--corpus", default="bundled", choices=CORPORA)
    p.add_argument("--source")
    p.add_argument("--out", required=True, help="the run's folder: a run there with other settings is refused "
                   "(OUT/run.json), a finished one is skipped, an interrupted one resumes")
    p.add_argument("--fresh", action="store_true", help="remove the run files in --out and start over")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=f"{COMMANDS}:run_hf_distill")


def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="greedy generation from a Hugging Face causal LM under a routing",
                       description="Greedy generation with the KV cache under a routing. Block routings (with "
                       "block gates from `gatelab hf-distill --block-size`, or block-oracle / block-random) read "
                       "only each query block's kept key blocks. --compare also generates densely and reports the "
                       "agreement and both continuations' perplexity under the dense model.")
    p.add_argument("--model", required=True, help="a local model folder (or the folder holding --gguf)")
    p.add_argument("--gguf", help="a GGUF file inside --model")
    p.add_argument("--gate", help="gates saved by `gatelab hf-distill` (block gates for block-gate)")
    p.add_argument("--prompt-file", required=True, help="a UTF-8 text file holding the prompt")
    p.add_argument("--max-new-tokens", type=POS_INT, default=64, help="tokens to generate (default 64)")
    p.add_argument("--routing", default="block-gate", choices=GENERATE_ROUTINGS, help="the routings that decode with "
                   "a KV cache (default block-gate)")
    p.add_argument("--k", type=POS_INT, default=64, help="k of a token routing")
    p.add_argument("--block-size", type=POS_INT, default=None, help="block size (default: the gate's)")
    p.add_argument("--block-k", type=POS_INT, default=4, help="earlier key blocks kept per query block")
    p.add_argument("--compare", action="store_true", help="also generate densely: agreement and perplexities")
    p.add_argument("--cuda-graphs", action="store_true", help="decode over a cache of fixed size, each step replayed "
                   "from a CUDA graph (dense and block-gate routings; CUDA): no per-kernel host launches")
    p.add_argument("--compile", action="store_true", help="decode over a cache of fixed size, each step through "
                   "torch.compile (dense and block-gate routings; with --cuda-graphs, the compiled step is replayed)")
    p.add_argument("--allow-other-base", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="write the result here")
    p.set_defaults(run=f"{COMMANDS}:run_generate")
