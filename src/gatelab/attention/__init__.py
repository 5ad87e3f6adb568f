"""Attention under every routing mode. The entry point is `attend` (attend.py), shared by the GPT (model.py) and the
Hugging Face adapter (hf/adapter.py); how it computes is a `Backend` (backend.py).

    attend.py           the routing-mode switch: dense, hard top-k, soft gate, block routings
    hard.py             hard modes' keep-masks (oracle, gate, random, stochastic top-k)
    soft.py             the soft gate in each reading (fused kernel, flex, explicit)
    gates.py            the bilinear token gate and the block gate
    position_gates.py   gates that see position (rope, qk) for RoPE models
    blocks.py           block selection: scores per (query block, key block), previous-block rows, top-k blocks
    block_attention.py  attention over the selected blocks (flex_attention or a token mask)
    flex.py             flex_attention and its BlockMask
    masks.py            causal and allowed-key masks
"""
from gatelab.attention.attend import GateScores, attend
from gatelab.attention.backend import Backend, default_backend

__all__ = ["Backend", "GateScores", "attend", "default_backend"]
