"""The `gatelab` command line: its parser, built from the command families' parsers in gatelab.cli.parsers,
and main(), which runs the chosen command from gatelab.cli.commands. Each subcommand has --help; user errors
print one line and exit 2.

Only the chosen command's module is imported (by name, when it runs), so `gatelab --help` does not load torch.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from gatelab.cli.arguments import Parser
from gatelab.cli.parsers import evaluate, hf, reproduce, train
from gatelab.config import GatelabError, check_writable
from gatelab.progress import keep_freed_memory

# in the order `gatelab --help` lists them
SUBCOMMANDS = (reproduce.add_demo, train.add_info, train.add_prepare, train.add_train, evaluate.add_eval,
               evaluate.add_audit, hf.add_hf_eval, hf.add_hf_distill, hf.add_generate, reproduce.add_reproduce,
               reproduce.add_report,
               train.add_distill, evaluate.add_analyze)


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="gatelab", description="Learned sparse-attention routing, and whether it "
                                 "beats a random one (reproduces arXiv 2603.02227).")
    sub = ap.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return ap


def command(target: str):
    """The function a parser named as its `run` default, "package.module:function", imported now."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
    except SystemExit as e:  # argparse: --help exits 0 (let it), a usage error printed its line (Parser.error)
        if e.code == 2:
            return 2
        raise
    # argparse cannot take `key=value` overrides after options that follow another positional; accept them
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        try:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        except SystemExit as e:
            return e.code
    keep_freed_memory()
    try:
        if getattr(args, "json", None):  # refuse before the work, not after it
            check_writable(args.json, "--json")
        command(args.run)(args)
    except GatelabError as e:
        print(f"gatelab: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path the user gave that cannot be read or written (permissions, a folder, disk full)
        where = f": {e.filename}" if e.filename else ""
        print(f"gatelab: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gatelab: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
