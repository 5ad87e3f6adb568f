"""How attention and the loss are computed: one typed value, passed down from the model to every kernel call.

None of these choices changes what is computed (beyond float rounding); they choose between a Triton kernel and its
torch reference, or between two attention paths. The defaults are the fastest measured on the GPU
(benchmarks/README.md, "Opt-in paths, timed"). The environment is read here and nowhere else:
`Backend.from_env()` turns the `GATELAB_*` variables into a Backend, and `default_backend()` reads them once.

    model.backend = dataclasses.replace(model.backend, kernels=False)   # the torch references only
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, fields

from gatelab.config import GatelabError

HARD_ATTENTION = ("sdpa", "flex")
SOFT_ATTENTION = ("fused", "explicit", "flex")
TOPK_THRESHOLD = ("factors", "scores")
BLOCK_ATTENTION = ("auto", "flex", "masked")
LOSS_KERNELS = ("torch", "triton")


@dataclass(frozen=True)
class Backend:
    """kernels: the Triton selection and soft-gate kernels where they apply (CUDA, or Triton's CPU interpreter);
    False: the torch references everywhere (GATELAB_KERNELS=0).
    hard_attention: how a hard routing applies its keep-mask: a boolean mask to SDPA, or flex_attention with the
    mask as a score_mod (compiled code only) (GATELAB_HARD_ATTENTION).
    soft_attention: the soft gate on CUDA: the fused flash-style kernel (16-bit inputs), the explicit torch form,
    or flex_attention for renormalised readings (GATELAB_SOFT_ATTENTION).
    topk_threshold: topk-sigmoid's row threshold from the gate's two factors in registers, or from G formed in
    memory (GATELAB_TOPK_THRESHOLD).
    factor_tau: that threshold kernel's (rows per program, causal row segment, coarse bits) (GATELAB_FACTOR_TAU).
    soft_spill_free_tiles: the soft-gate backward autotuner also tries two tiles that do not spill registers
    (GATELAB_SOFT_SPILL_FREE_TILES=1).
    block_attention: block routings' attention path: auto (flex_attention on CUDA where it skips work), flex,
    masked (a token mask to SDPA).
    compile_blocks: block routing's inference path (gate scores, block lists) compiled on CUDA
    (GATELAB_COMPILE_BLOCKS=1).
    block_factors_kernel: a block gate's factors at eager inference in one Triton launch (kernels.block_factors)
    instead of the torch pooling and projections, where the kernel serves (GATELAB_BLOCK_FACTORS_KERNEL=0 turns it
    off; kernels=False does too: factors_kernel).
    loss_kernel: the output head's loss in chunked torch products, or Triton kernels (GATELAB_LOSS_KERNEL).
    loss_vocab_multiple: the fused loss pads the vocabulary with zero rows to a multiple of this
    (GATELAB_LOSS_VOCAB_MULTIPLE)."""

    kernels: bool = True
    hard_attention: str = "sdpa"
    soft_attention: str = "fused"
    topk_threshold: str = "factors"
    factor_tau: tuple[int, int, int] = (16, 128, 20)
    soft_spill_free_tiles: bool = False
    block_attention: str = "auto"
    compile_blocks: bool = False
    block_factors_kernel: bool = True
    loss_kernel: str = "torch"
    loss_vocab_multiple: int = 64

    def __post_init__(self):
        for name, choices in (("hard_attention", HARD_ATTENTION), ("soft_attention", SOFT_ATTENTION),
                              ("topk_threshold", TOPK_THRESHOLD), ("block_attention", BLOCK_ATTENTION),
                              ("loss_kernel", LOSS_KERNELS)):
            if getattr(self, name) not in choices:
                raise GatelabError(f"backend {name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        if len(self.factor_tau) != 3:
            raise GatelabError(f"backend factor_tau must be (ROWS, SEGMENT, COARSE), got {self.factor_tau}")
        rows, segment, coarse = self.factor_tau
        if not (1 <= rows <= 64 and rows & (rows - 1) == 0) or segment < 0 or not 1 <= coarse <= 32:
            raise GatelabError(f"backend factor_tau {self.factor_tau}: ROWS must be a power of two of 1..64, "
                               f"SEGMENT >= 0 and COARSE in 1..32")
        if self.loss_vocab_multiple < 1:
            raise GatelabError(f"backend loss_vocab_multiple must be >= 1, got {self.loss_vocab_multiple}")

    @property
    def factors_kernel(self) -> bool:
        """Whether a block gate's factors may come from their Triton kernel: block_factors_kernel and kernels."""
        return self.kernels and self.block_factors_kernel

    @classmethod
    def from_env(cls, env=None) -> "Backend":
        """The Backend the GATELAB_* variables of `env` (default os.environ) describe; unset ones keep the default."""
        env = os.environ if env is None else env
        d = cls()

        def parsed(name: str, default, parse):
            text = env.get(name)
            try:
                return default if text is None else parse(text)
            except ValueError:
                raise GatelabError(f"{name}={text!r} is malformed (default: {default})") from None

        return cls(kernels=env.get("GATELAB_KERNELS", "1") != "0",
                   hard_attention=env.get("GATELAB_HARD_ATTENTION", d.hard_attention),
                   soft_attention=env.get("GATELAB_SOFT_ATTENTION", d.soft_attention),
                   topk_threshold=env.get("GATELAB_TOPK_THRESHOLD", d.topk_threshold),
                   factor_tau=parsed("GATELAB_FACTOR_TAU", d.factor_tau,
                                     lambda t: tuple(int(v) for v in t.split(",", 2))),
                   soft_spill_free_tiles=env.get("GATELAB_SOFT_SPILL_FREE_TILES", "0") == "1",
                   compile_blocks=env.get("GATELAB_COMPILE_BLOCKS", "0") == "1",
                   block_factors_kernel=env.get("GATELAB_BLOCK_FACTORS_KERNEL", "1") != "0",
                   loss_kernel=env.get("GATELAB_LOSS_KERNEL", d.loss_kernel),
                   loss_vocab_multiple=parsed("GATELAB_LOSS_VOCAB_MULTIPLE", d.loss_vocab_multiple, int))

    def describe(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@functools.cache
def default_backend() -> Backend:
    """The environment's Backend, read once per process."""
    return Backend.from_env()
