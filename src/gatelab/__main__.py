"""TODO-DOC"""
from __future__ import annotations

import sys

from gatelab.cli.main import main

sys.exit(main())
