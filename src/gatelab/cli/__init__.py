"""The `gatelab` command line (the console script runs gatelab.cli:main).

main.py builds the parser and dispatches; arguments.py holds the argument types and shared argument groups;
parsers/ defines each command family's arguments (light: no torch, so --help is fast); commands/ holds what each
command does, imported only when it runs.
"""
from gatelab.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
