"""`python -m gatelab`: the command line."""
from __future__ import annotations

import sys

from gatelab.cli.main import main

sys.exit(main())
