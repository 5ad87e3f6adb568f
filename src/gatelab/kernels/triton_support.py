"""Row top-k selection without sorting: a Triton kernel and the torch reference it must match.

A hard routing keeps, in each causal row of a (B, H, T, S) score tensor, the k largest scores. The reference
(`routing.topk_keep_mask`) sorts every row and scatters k indices into a boolean mask; on an H100 that sort alone is
0.89 ms per layer at batch 16 x 512 (benchmarks/results/topk-*.md), most of what a gated step costs over dense.
The kernel here instead finds each row's k-th largest score by bisection on its bits: a float maps to a 32-bit
key with the same order, and 32 halvings of the key range, each one count over the row held in registers, give
the k-th largest key exactly. The keep-mask is then "key above it, or equal to it and among the first of the
ties", so it holds exactly k keys, like the reference; among tied scores the two may keep different keys.

The random modes need no score tensor at all: a key's score is a counter-based hash of its row's hash and its
position (routing.fixed_random_scores' construction), computed inside the kernel. The kernel runs on CUDA when
Triton is installed; everywhere else (and with GATELAB_KERNELS=0) the torch reference runs. Tests run the kernel
on CPU under Triton's interpreter (TRITON_INTERPRET=1).
"""
from __future__ import annotations

import os

import torch

try:  # Triton ships with CUDA builds of torch; CPU builds run the torch reference
    import triton
except ImportError:  # pragma: no cover - depends on the install
    triton = None


_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter (the tests)


def _interpreter_scalar_loop_bounds() -> None:
    """Triton's CPU interpreter (3.x) turns a kernel's scalars into one-element arrays and converts them with int(),
    which numpy 2.4 refuses for arrays of one dimension, so a loop bound like range(0, T, N) fails there. Make the
    interpreter's conversion take the one element. Interpreter (tests) only; compiled kernels are untouched."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_gatelab", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._gatelab = True
    interpreter._patch_lang_tensor = patched


if triton is not None and _INTERPRET:
    _interpreter_scalar_loop_bounds()


def _pow2(n: int, lo: int, hi: int) -> bool:
    """n is a power of two in [lo, hi]: the widths a kernel's tl.arange tiles can span."""
    return lo <= n <= hi and n & (n - 1) == 0


def available(t: torch.Tensor) -> bool:
    """Whether a Triton kernel can serve tensor t: Triton importable and t on CUDA (or on CPU under Triton's
    interpreter). Whether it should is the caller's choice (attention.backend.Backend.kernels)."""
    return triton is not None and (t.is_cuda or _INTERPRET)
