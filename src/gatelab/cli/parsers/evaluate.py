"""Arguments of the commands that measure a checkpoint: eval, audit and analyze."""
from __future__ import annotations

from gatelab.cli.arguments import NONNEG_INT, POS_INT, SPLITS, add_other_data_arg, add_routing_args, csv_of
from gatelab.config import POSITIONS

COMMANDS = "gatelab.cli.commands.evaluate"


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity of a checkpoint under one or more routings")
    p.add_argument("checkpoint", help="a checkpoint directory (RUN/checkpoint)")
    add_routing_args(p)
    p.add_argument("--gate", help="a distilled gate (from `gatelab distill`) to use for gate routings")
    p.add_argument("--allow-other-base", action="store_true",
                   help="allow a gate distilled on another checkpoint (the paper's Experiment 3)")
    p.add_argument("--split", default="validation", choices=SPLITS)
    p.add_argument("--data", help="prepared corpus folder (default: the one the checkpoint was trained on)")
    add_other_data_arg(p)
    p.add_argument("--batch-size", type=POS_INT, default=16)
    p.add_argument("--max-tokens", type=NONNEG_INT, default=0, help="evaluate only about this many tokens (0 = all)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=NONNEG_INT, default=0, help="torch seed (stochastic routing)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=f"{COMMANDS}:run_eval")


def add_audit(sub) -> None:
    p = sub.add_parser("audit", help="does a learned gate beat a frozen random gate of the same form? "
                       "(learned, random, oracle and dense in one table)")
    p.add_argument("checkpoint", nargs="?", help="a gatelab checkpoint (RUN/checkpoint); or use --model")
    p.add_argument("--model", help="a local Hugging Face model folder (with --gate GATES from hf-distill)")
    p.add_argument("--gguf", help="with --model: a GGUF file inside it")
    p.add_argument("--gate", help="audit a distilled gate instead of the checkpoint's own")
    p.add_argument("--control", help="a checkpoint trained the same way with a frozen random gate (e.g. "
                   "runs/compact/exp1-sigmoid-random-s0/checkpoint): also compare against it, the paper's Experiment 1")
    p.add_argument("--allow-other-base", action="store_true",
                   help="accept a gate saved for another base model (its fingerprint differs)")
    p.add_argument("--position", choices=POSITIONS, help="with --model: the gate variant --gate must be (default: "
                   "the one its gate.json records; the random control is always of that variant)")
    p.add_argument("--k", type=POS_INT, default=64, help="keys kept per query under hard top-k (default 64)")
    p.add_argument("--split", default="validation", choices=SPLITS)
    p.add_argument("--data", help="prepared corpus folder (default: the checkpoint's)")
    add_other_data_arg(p)
    p.add_argument("--max-tokens", type=NONNEG_INT, default=0, help="evaluate only about this many tokens (0 = all)")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda when there is one)")
    p.add_argument("--json", help="also write the table and the summary to this JSON file")
    p.set_defaults(run=f"{COMMANDS}:run_audit")


def add_analyze(sub) -> None:
    p = sub.add_parser("analyze", help="attention concentration, gate F1 and gate gradients of a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--gate", help="a distilled gate to measure instead of the checkpoint's own")
    p.add_argument("--allow-other-base", action="store_true")
    p.add_argument("--k", type=csv_of(int), default=[64], help="comma-separated k values (default 64)")
    p.add_argument("--batches", type=POS_INT, default=4)
    p.add_argument("--batch-size", type=POS_INT, default=8)
    p.add_argument("--split", default="validation", choices=SPLITS)
    p.add_argument("--data", help="prepared corpus folder (default: the checkpoint's)")
    add_other_data_arg(p)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=NONNEG_INT, default=0)
    p.add_argument("--out", help="output folder (default: next to the checkpoint, analysis/)")
    p.set_defaults(run=f"{COMMANDS}:run_analyze")
