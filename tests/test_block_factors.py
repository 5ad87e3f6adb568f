"""A block gate's factors in one kernel (kernels/block_factors.py) against its torch reference, and the reference
against the gates' torch paths; the kernel runs on CPU under Triton's interpreter, in a child process (Triton
decides at import whether kernels are interpreted).

float32 and float16 only for the kernel: the interpreter converts float32 to bfloat16 by truncation, not rounding,
so a bfloat16 factor there can differ from the reference by more than the GPU's one rounding.
"""
import math

import pytest
import torch

from gatelab.attention.gates import BlockGate, qk_block_factors
from gatelab.config import GatelabError
from gatelab.kernels.block_factors import block_factors, block_factors_fits, block_factors_reference

from .test_block_select import FACTORS_SPY, run_python

triton = pytest.importorskip("triton")


# Each check runs in one shared child process, the kernel's launches counted (FACTORS_SPY: factor_launches).
SETUP = FACTORS_SPY + """
import torch
from gatelab.attention.gates import BlockGate
"""

KERNEL_CHECK = """
def kernel_check():
    g = torch.Generator().manual_seed(3)
    # (B, source heads for q, for k, heads H, T, C, d_gate, block_size)
    shapes = [(2, 6, 2, 6, 96, 20, 12, 48), (1, 1, 1, 4, 64, 80, 16, 16), (2, 3, 3, 3, 40, 8, 5, 40)]
    for B, HQ, HK, H, T, C, DG, BS in shapes:
        for pool in ("mean", "max-min"):
            for dtype in (torch.float32, torch.float16):
                q = torch.randn(B, T, HQ, C, generator=g).transpose(1, 2).to(dtype)  # strided, as attention's
                k = torch.randn(B, HK, T, C, generator=g).to(dtype)
                wq = torch.randn(H, C, DG, generator=g) / C ** 0.5
                wk = torch.randn(H, C * (2 if pool == "max-min" else 1), DG, generator=g) / C ** 0.5
                n = len(factor_launches)
                got = bf.block_factors(q, k, wq, wk, BS, pool)
                assert len(factor_launches) == n + 1 and factor_launches[-1] == (T // BS, B * H, 2)
                want = bf.block_factors_reference(q, k, wq, wk, BS, pool)
                for a, b in zip(got, want):
                    assert a.shape == (B, H, T // BS, DG) and a.dtype == dtype
                    if dtype == torch.float32:
                        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
                    else:  # one rounding of float32 sums that differ in their last bits
                        ulp = 2.0 ** (torch.floor(torch.log2(b.float().abs().clamp_min(2 ** -14))) - 10)
                        assert ((a.float() - b.float()).abs() <= ulp).all(), (B, H, T, pool)
"""

GATE_CHECK = """
def gate_check():
    torch.manual_seed(0)
    B, H, HK, T, D, BS = 2, 4, 2, 32, 8, 8
    q, k, x = torch.randn(B, H, T, D), torch.randn(B, HK, T, D), torch.randn(B, T, 24)
    qk = BlockGate(24, H, 8, pool="max-min", reads="qk", head_dim=D)
    xg = BlockGate(24, H, 8)
    n = len(factor_launches)
    with torch.no_grad():
        qk.factors(x, BS, q=q, k=k)
        assert len(factor_launches) == n  # not asked
        got = qk.factors(x, BS, q=q, k=k, kernel=True)
        assert len(factor_launches) == n + 1
        for a, b in zip(got, bf.block_factors(q, k, qk.wq, qk.wk, BS, "max-min")):
            assert torch.equal(a, b)
        got = xg.factors(x, BS, kernel=True)
        assert len(factor_launches) == n + 3
        for a, b in zip(got, bf.block_factors(x[:, None], x[:, None], xg.wq, xg.wk, BS, "mean")):
            assert torch.equal(a, b)
        qk.factors(x, BS, torch.ones(1, T, dtype=torch.bool), q=q, k=k, kernel=True)  # a padding mask
        qk.factors(x[:, :30], BS, q=q[:, :, :30], k=k[:, :, :30], kernel=True)  # a partial last block
        qk.factors(x, BS, q=q, k=k, compiled=True, kernel=True)  # Backend.compile_blocks
        assert len(factor_launches) == n + 4
        assert not bf.block_factors_fits(q, k, torch.randn(3, D, 8), qk.wk, BS)  # 3 heads over 4 query heads
        assert not bf.block_factors_fits(q, k, qk.wq, torch.randn(H, 3 * D, 8), BS)
        assert not bf.block_factors_fits(q, k.half(), qk.wq, qk.wk, BS)
    qk.factors(x, BS, q=q, k=k, kernel=True)  # the gate's weights want a gradient
    assert len(factor_launches) == n + 4
"""

RUN = """
import traceback
for name, check in (("kernel", kernel_check), ("gate", gate_check)):
    try:
        check()
        print("ok", name)
    except Exception:
        print("failed", name, traceback.format_exc().replace(chr(10), " | "))
"""


@pytest.fixture(scope="module")
def child_output() -> str:
    return run_python(SETUP + KERNEL_CHECK + GATE_CHECK + RUN)


def check_passed(output: str, name: str) -> None:
    lines = [line for line in output.splitlines() if line.split()[1:2] == [name]]
    assert lines == [f"ok {name}"], lines


def test_the_kernel_gives_the_reference_factors(child_output):
    """qk gates (query heads in groups over key heads, queries read through a transposed view) and X gates (one
    source for every head, more features than one tile), mean and max-min keys, blocks longer than a token tile and
    not a multiple of it, d_gate not a power of two: float32 to float32 accuracy, float16 within one rounding."""
    check_passed(child_output, "kernel")


def test_the_gate_uses_the_kernel_only_when_asked_and_where_it_serves(child_output):
    """BlockGate.factors (qk and X gates) runs the kernel when asked (Backend.block_factors_kernel) at eager inference
    on whole blocks and gives its factors; not asked, a padding mask, a gradient or Backend.compile_blocks keep the
    torch path (the wiring into the models: tests/test_block_select.py)."""
    check_passed(child_output, "gate")


@pytest.mark.parametrize("pool", ["mean", "max-min"])
def test_the_reference_is_the_gates_torch_path(pool):
    """block_factors_reference computes what the gates' torch paths compute (float32: to float32 accuracy): the qk
    gate's qk_block_factors and the X gate's pooled, projected, scaled factors."""
    g = torch.Generator().manual_seed(1)
    B, H, HK, T, D, BS = 2, 6, 3, 48, 16, 16
    q, k = torch.randn(B, H, T, D, generator=g), torch.randn(B, HK, T, D, generator=g)
    wq = torch.randn(H, D, 8, generator=g)
    wk = torch.randn(H, D * (2 if pool == "max-min" else 1), 8, generator=g)
    for a, b in zip(block_factors_reference(q, k, wq, wk, BS, pool), qk_block_factors(q, k, wq, wk, BS, pool)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    gate = BlockGate(20, H, 8, pool=pool)
    x = torch.randn(B, T, 20, generator=g)
    with torch.no_grad():
        gq, gk = gate._x_factors(x, BS, None)
        want = (gq / math.sqrt(8), gk)
        got = block_factors_reference(x[:, None], x[:, None], gate.wq, gate.wk, BS, pool)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_where_the_kernel_cannot_serve_the_reference_answers_and_bad_pooling_is_refused():
    """Without Triton's interpreter (this process) CPU tensors get the reference; an unknown pooling is an error."""
    q, k = torch.randn(1, 2, 16, 4), torch.randn(1, 1, 16, 4)
    wq, wk = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    for a, b in zip(block_factors(q, k, wq, wk, 8), block_factors_reference(q, k, wq, wk, 8)):
        assert torch.equal(a, b)
    with pytest.raises(GatelabError, match="max-min"):
        block_factors(q, k, wq, wk, 8, "max")
    assert not block_factors_fits(q, k, wq, wk, 8)  # CPU without the interpreter
