"""Triton where it is installed: the import, its CPU interpreter (the tests), and whether a kernel can serve a tensor."""
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
