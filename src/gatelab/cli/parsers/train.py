"""Arguments of the training commands: info, prepare, train and distill."""
from __future__ import annotations

from gatelab.cli.arguments import (
    CORPORA, NONNEG_INT, POS_FLOAT, POS_INT, add_block_gate_args, add_other_data_arg, add_reference_arg
)
from gatelab.config import DEFAULT_READING, READINGS

COMMANDS = "gatelab.cli.commands.train"


def add_info(sub) -> None:
    p = sub.add_parser("info", help="parameter counts of a model config")
    p.add_argument("--config", help="JSON or TOML train config")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.n_layer=4")
    p.set_defaults(run=f"{COMMANDS}:run_info")


def add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="tokenise a corpus into uint16 token files")
    p.add_argument("--corpus", default="bundled", choices=CORPORA)
    p.add_argument("--source", help="wikitext: folder with wiki.{train,valid,test}.raw; text: a file or folder")
    p.add_argument("--out", help="output folder (default data/prepared/bundled for the bundled corpus, else "
                   "data/prepared/CORPUS-HASH, HASH a short hash of --source's path, or data/prepared/NAME)")
    p.add_argument("--name", help="prepare into data/prepared/NAME")
    p.add_argument("--context", type=POS_INT, default=512,
                   help="the model context you will train with (default 512, the model's default): the train split "
                        "must hold one window of context+1 tokens and validation and test 2 tokens each; a text "
                        "corpus whose documents are too few or too long to split 98/1/1 with a full window in every "
                        "split is cut by tokens instead")
    p.add_argument("--force", action="store_true", help="tokenise again even if the output is current, and replace "
                   "an output folder that holds other data (runs trained on that data will then refuse it)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=f"{COMMANDS}:run_prepare")


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model (resumes automatically from a checkpoint in --out)")
    p.add_argument("--config", help="JSON or TOML train config (see experiments/)")
    p.add_argument("--out", required=True, help="run directory")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="require a checkpoint in --out and continue it")
    g.add_argument("--fresh", action="store_true", help="ignore any checkpoint in --out and start over")
    p.add_argument("--quiet", action="store_true")
    add_reference_arg(p)
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=500 routing.mode=soft-gate")
    p.set_defaults(run=f"{COMMANDS}:run_train")


def add_distill(sub) -> None:
    p = sub.add_parser("distill", help="train fresh gate projections on a frozen checkpoint (post-hoc gates)")
    p.add_argument("checkpoint", help="the frozen base checkpoint (RUN/checkpoint)")
    p.add_argument("--loss", choices=("kl", "bce", "task"), default="kl",
                   help="kl: KL(dense attention || softmax(G)); bce: G vs the oracle top-k mask; "
                        "task: LM loss through the soft gate (default kl)")
    p.add_argument("--k", type=POS_INT, default=64)
    p.add_argument("--d-gate", type=POS_INT, default=32)
    p.add_argument("--steps", type=POS_INT, default=1000)
    p.add_argument("--batch-size", type=POS_INT, default=16)
    p.add_argument("--lr", type=POS_FLOAT, default=1e-3)
    p.add_argument("--seed", type=NONNEG_INT, default=0, help="gate initialisation and batch order")
    p.add_argument("--random-control", action="store_true",
                   help="task loss control: write the frozen random gate of the same initialisation, train nothing")
    p.add_argument("--reading", choices=tuple(READINGS), default=None,
                   help=f"--loss task: the soft-gate reading trained through (default {DEFAULT_READING}, the "
                        f"reading study's choice; README)")
    p.add_argument("--data", help="prepared corpus folder (default: the base checkpoint's)")
    add_other_data_arg(p)
    add_block_gate_args(p)
    p.add_argument("--out", required=True, help="run directory; the gate is written to OUT/gate.{json,safetensors}")
    p.add_argument("--fresh", action="store_true", help="ignore a checkpoint in --out and start over")
    p.add_argument("--quiet", action="store_true")
    add_reference_arg(p)
    p.add_argument("overrides", nargs="*", help="train-config overrides, e.g. eval_every=250 device=cpu")
    p.set_defaults(run=f"{COMMANDS}:run_distill")
