"""What a new user meets first: a fast command line, data that cannot be silently swapped, corrupt files and
non-finite results refused, paths and messages that say what they mean."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_cli_imports_no_torch():
    """`gatelab --help` and argument errors answer without importing torch (under 1 s instead of 4-5 s)."""
    code = "import sys, gatelab.cli as c; c.build_parser(); print(sorted(m for m in sys.modules if m in " \
           "('torch', 'numpy', 'transformers', 'safetensors', 'matplotlib')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
