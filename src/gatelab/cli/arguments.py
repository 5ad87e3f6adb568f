"""Argument types and the argument groups several commands share, and the parser whose errors are one line.

Light on purpose: it imports argparse and gatelab.config only, so that `gatelab --help` does not load torch.
"""
from __future__ import annotations

import argparse
import math
import sys

from gatelab.config import ALL_ROUTING_MODES, BLOCK_POOLS, DEFAULT_READING, READINGS, SOFT_MASKS

CORPORA = ("bundled", "wikitext-103", "wikitext-2", "text")
SPLITS = ("train", "validation", "test")


class Parser(argparse.ArgumentParser):
    """argparse, with the one-line error of every other user error: `gatelab: error: ...`, exit status 2."""

    def error(self, message: str):
        where = self.prog.removeprefix("gatelab").strip()
        print(f"gatelab: error: {where + ': ' if where else ''}{message} (see `{self.prog} --help`)",
              file=sys.stderr)
        sys.exit(2)


def number(kind, lo=None, lo_open=False):
    """An argparse type: an int or float, optionally >= lo (> lo when lo_open)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if lo is not None and (value <= lo if lo_open else value < lo):
            raise argparse.ArgumentTypeError(f"must be {'>' if lo_open else '>='} {lo}, got {text}")
        return value
    return parse


POS_INT, NONNEG_INT, POS_FLOAT = number(int, 1), number(int, 0), number(float, 0, lo_open=True)
NONNEG_FLOAT = number(float, 0)


def csv_of(kind):
    """An argparse type: a comma-separated list of `kind` values, at least one."""
    def parse(text: str):
        items = [x.strip() for x in text.split(",") if x.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        try:
            return [kind(x) for x in items]
        except (ValueError, argparse.ArgumentTypeError):
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of "
                                             f"{'integers' if kind in (int, POS_INT, NONNEG_INT) else 'names'}"
                                             f"{' >= 1' if kind is POS_INT else ' >= 0' if kind is NONNEG_INT else ''}"
                                             f", got {text!r}") from None
    return parse


def gpu_count(text: str) -> str:
    """An argparse type: a number of GPUs >= 1, or 'all'."""
    if text == "all":
        return text
    try:
        return str(POS_INT(text))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a number of GPUs >= 1 or 'all', got {text!r}") from None


def key_value(text: str) -> tuple[str, str]:
    """An argparse type: KEY=VALUE, an sbatch option without its --."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or key.strip().startswith("-"):
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (an sbatch option without its --), got {text!r}")
    return key.strip(), value


def add_routing_args(p: argparse.ArgumentParser, modes_default: str = "dense") -> None:
    p.add_argument("--routing", type=csv_of(str), default=[modes_default],
                   help=f"comma-separated routing modes: {', '.join(ALL_ROUTING_MODES)} (default {modes_default})")
    p.add_argument("--k", type=csv_of(int), default=None,
                   help="comma-separated k values for the top-k and soft-gate routings (default 64; an error with "
                        "dense routing alone, which uses no k)")
    p.add_argument("--reading", choices=tuple(READINGS), default=DEFAULT_READING,
                   help=f"soft-gate reading (default {DEFAULT_READING}: chosen by the reading study, README)")
    p.add_argument("--soft-mask", choices=SOFT_MASKS, default=None, help="soft-gate mask, overriding --reading's")
    p.add_argument("--soft-temperature", type=POS_FLOAT, default=1.0)
    p.add_argument("--soft-renormalize", action="store_true", help="soft-gate: renormalise A*m per row (overriding "
                   "--reading's choice)")
    p.add_argument("--random-seed", type=NONNEG_INT, default=0, help="seed of random-topk's fixed subsets")
    p.add_argument("--block-size", type=POS_INT, help="block routings: tokens per block (default: the block gate's "
                   "own, else 64)")
    p.add_argument("--block-k", type=csv_of(POS_INT), default=[4], help="block routings: comma-separated numbers of "
                   "earlier key blocks kept per query block besides the diagonal (default 4)")


def add_block_gate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--block-size", type=POS_INT, help="train a block gate instead: tokens per block (e.g. 128); its "
                   "loss is kl (against each block row's pooled attention mass) or bce (against the oracle blocks)")
    p.add_argument("--block-k", type=POS_INT, default=8, help="block gate: earlier key blocks kept per query block, for "
                   "the F1 it logs and the bce target (default 8)")
    p.add_argument("--block-pool", choices=BLOCK_POOLS, default="mean",
                   help="block gate key pooling: mean, or max-min (SeerAttention's; default mean)")


def add_other_data_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-other-data", action="store_true", help="use --data even though its fingerprint differs "
                   "from the data the checkpoint (or gate) was trained on (a warning instead of an error)")


def add_reference_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reference", action="store_true",
                   help="plain reference path: no torch.compile, unfused output-head loss (same results to float "
                        "rounding, slower)")
