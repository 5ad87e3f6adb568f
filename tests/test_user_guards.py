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


def test_demo_stays_small():
    """The demo finishes in under 3 minutes on 2 CPU cores: at most ~100K training tokens per model (a step of
    8 x 128 tokens takes about 0.5 s there) and 8,192 evaluation tokens per routing; the CLI's default agrees."""
    from gatelab import experiments
    from gatelab.cli import build_parser
    m = experiments.DEMO_MODEL
    assert experiments.DEMO_STEPS * experiments.DEMO_BATCH * m["context"] <= 110_000
    assert experiments.DEMO_EVAL_TOKENS <= 8192 and m["n_layer"] <= 2 and m["d_model"] <= 128
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert sub.choices["demo"].parse_args([]).steps == experiments.DEMO_STEPS
