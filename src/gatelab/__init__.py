"""gatelab: learned sparse-attention routing, and whether it beats a random one.

Reproduces "Routing Absorption in Sparse Attention: Why Random Gates Are Hard to Beat" (arXiv 2603.02227).
"""
from __future__ import annotations

__version__ = "0.1.0"
