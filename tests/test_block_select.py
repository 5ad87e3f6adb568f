"""The fused block selection (kernels/block_select.py) against its torch reference and the attention package's block
lists, run on CPU under Triton's interpreter.

Triton decides at import whether kernels are interpreted, so the kernel runs in a child process with
TRITON_INTERPRET=1. Exact: the four BlockMask index tensors equal, element for element, with many tied scores
(small integer factors), rows that keep every earlier block (block_k >= i), nb not a power of two, -0.0, infinities
and NaN; then the BlockMask built from them and the attention output through the wired block-gate path.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gatelab.attention.blocks import block_lists, previous_block_rows, select_blocks
from gatelab.kernels.block_select import block_select_reference

triton = pytest.importorskip("triton")
SRC = str(Path(__file__).resolve().parents[1] / "src")


# Child-process code that counts the block factors kernel's launches (factor_launches) by wrapping its launcher.
FACTORS_SPY = """
from gatelab.kernels import block_factors as bf

factor_launches = []
_factors_kernel = bf._block_factors_kernel


class _FactorsSpy:
    def __getitem__(self, grid):
        factor_launches.append(grid)
        return _factors_kernel[grid]


bf._block_factors_kernel = _FactorsSpy()
"""


def run_python(code: str, interpret: bool = True) -> str:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


# (B, H, nb, d_gate, block_k, dtype, values): "ints" are factors in {-1, 0, 1} (scores tie everywhere), "eighths"
# multiples of 1/8 (exact products and sums in float32 whatever the summation order, few ties)
CASES = [(2, 3, 7, 8, 2, "float32", "ints"), (1, 2, 20, 16, 5, "bfloat16", "ints"),
         (1, 1, 33, 40, 40, "float32", "eighths"), (2, 2, 16, 32, 0, "float16", "ints"),
         (1, 2, 1, 4, 3, "float32", "ints"), (1, 1, 70, 5, 9, "float32", "ints"),
         (3, 2, 12, 64, 11, "bfloat16", "eighths"), (1, 3, 45, 1, 6, "float16", "ints"),
         (1, 1, 130, 48, 17, "bfloat16", "ints"), (2, 1, 2, 16, 1, "float32", "eighths"),
         (1, 2, 24, 8, 4, "float32", "zeros")]


def test_the_reference_ranks_by_score_then_lower_block_and_is_the_attention_packages_selection():
    """In plain torch, no kernel: block_select_reference's lists are block_lists(previous_block_rows(G)), and its
    choice in each row is the block_k earlier blocks first in (score descending, block ascending) order."""
    g = torch.Generator().manual_seed(3)
    for B, H, nb, dg, k in [(2, 3, 9, 4, 3), (1, 2, 17, 2, 5), (1, 1, 6, 3, 10), (1, 1, 5, 2, 0)]:
        gq = torch.randint(-1, 2, (B, H, nb, dg), generator=g).float()
        gk = torch.randint(-1, 2, (B, H, nb, dg), generator=g).float()
        ref = block_select_reference(gq, gk, k)
        G = gq @ gk.transpose(-1, -2)
        for got, want in zip(ref, block_lists(previous_block_rows(G), k)):
            assert got.dtype == want.dtype == torch.int32 and torch.equal(got, want)
        kk = max(0, min(k, nb - 1))
        for b in range(B):
            for h in range(H):
                for i in range(nb):
                    row = G[b, h, i - 1] if i else torch.zeros(nb)
                    order = sorted(range(nb), key=lambda j: (j >= i, -float(row[j]) if j < i else 0.0, j))
                    want = sorted(order[:kk]) + [0] * (nb - kk)
                    assert ref[3][b, h, i].tolist() == want, (B, H, nb, dg, k, b, h, i)
                    assert ref[2][b, h, i] == min(i, kk)
                    assert ref[1][b, h, i].tolist() == [i] + [0] * (nb - 1) and ref[0][b, h, i] == 1
        keep = select_blocks(previous_block_rows(G), k)
        assert torch.equal(keep.sum(-1), 1 + ref[2])  # the diagonal plus min(i, kk) earlier blocks


@pytest.mark.slow
def test_kernel_lists_equal_the_reference_and_the_attention_package_exactly():
    out = run_python(f"""
        import torch
        from gatelab.attention.blocks import block_lists, previous_block_rows
        from gatelab.kernels.block_select import block_select, block_select_fits, block_select_reference
        g = torch.Generator().manual_seed(0)

        def factor(shape, values, dt):
            if values == "ints":
                x = torch.randint(-1, 2, shape, generator=g).float()
            elif values == "eighths":
                x = torch.randint(-16, 17, shape, generator=g).float() / 8
            else:
                x = torch.zeros(shape)
            return x.to(dt)

        def check(gq, gk, k, tag, tiles=((16, 20),)):
            G = gq.float() @ gk.float().transpose(-1, -2)
            ref = block_select_reference(gq, gk, k)
            att = block_lists(previous_block_rows(G), k)
            for a, b in zip(ref, att):
                assert torch.equal(a, b), ("reference != attention package", tag)
            assert block_select_fits(gq, gk), tag
            for tile in tiles:
                got = block_select(gq, gk, k, tile=tile)
                for name, a, b in zip(("kv_num", "kv_idx", "full_num", "full_idx"), got, ref):
                    assert a.dtype == torch.int32 and a.shape == b.shape and a.is_contiguous(), (name, tag)
                    assert torch.equal(a, b), (name, tag, tile, (a != b).nonzero()[:5].tolist())

        n = 0
        for B, H, nb, dg, k, dt, values in {CASES!r}:
            dt = getattr(torch, dt)
            gq, gk = factor((B, H, nb, dg), values, dt), factor((B, H, nb, dg), values, dt)
            tiles = ((16, 20), (16, 32), (32, 1), (16, 6)) if nb in (20, 33, 70) else ((16, 20),)
            check(gq, gk, k, (B, H, nb, dg, k, str(dt), values), tiles)
            n += 1
        # several block_k on one input, from none through one that keeps every earlier block in every row
        gq, gk = factor((2, 2, 19, 16), "ints", torch.float32), factor((2, 2, 19, 16), "ints", torch.float32)
        for k in (0, 1, 2, 3, 8, 17, 18, 19, 50):
            check(gq, gk, k, ("block_k", k))
            n += 1
        # factors as strided views (a head-major layout read through transposes)
        gq = factor((3, 2, 21, 24), "ints", torch.bfloat16).transpose(0, 1)
        gk = factor((21, 2, 3, 24), "ints", torch.bfloat16).permute(1, 2, 0, 3)
        assert not gq.is_contiguous() and not gk.is_contiguous()
        check(gq, gk, 4, "strided")
        # -0.0 ties +0.0, infinities, and NaN (ranked above everything, ties among NaNs to the lower block)
        gq = torch.ones(1, 1, 12, 1)
        gk = torch.tensor([0.0, -0.0, 1.0, -0.0, 0.0, float("inf"), float("-inf"), -0.0, float("nan"), 0.0,
                           -float("nan"), -1.0]).view(1, 1, 12, 1)  # NaNs of either sign
        gq[0, 0, 7] = -1.0
        gq[0, 0, 9] = 0.0  # 0 * inf: a NaN made by the product itself
        for k in (1, 2, 3, 5, 8, 11):
            check(gq, gk, k, ("specials", k))
        print("ok", n)
    """)
    assert out.split()[:2] == ["ok", str(len(CASES) + 9)]


@pytest.mark.slow
def test_fits_and_the_fallback_without_triton_running():
    """The predicate under the interpreter (dtypes, shapes, the block limit), and on plain CPU: not served, and
    block_select returns the reference's tensors."""
    run_python("""
        import torch
        from gatelab.kernels.block_select import (MAX_SELECT_BLOCKS, block_select, block_select_fits,
                                                  block_select_reference)
        x = torch.zeros(1, 2, 8, 16)
        assert block_select_fits(x, x) and block_select_fits(x.bfloat16(), x.bfloat16()) and block_select_fits(x)
        assert not block_select_fits(x, x.half())  # mixed dtypes
        assert not block_select_fits(x, x[:, :, :4])  # different shapes
        assert not block_select_fits(x.double(), x.double()) and not block_select_fits(x.int(), x.int())
        assert not block_select_fits(x[0], x[0])  # not (B, H, nb, d_gate)
        assert not block_select_fits(torch.zeros(1, 1, 0, 4))
        big = torch.zeros(1, 1, MAX_SELECT_BLOCKS + 1, 16)
        assert not block_select_fits(big, big) and block_select_fits(big[:, :, 1:], big[:, :, 1:])
        print("ok")
    """)
    run_python("""
        import torch
        from gatelab.kernels.block_select import block_select, block_select_fits, block_select_reference
        g = torch.Generator().manual_seed(1)
        gq, gk = (torch.randint(-1, 2, (2, 3, 10, 8), generator=g).float() for _ in range(2))
        assert not block_select_fits(gq, gk)  # CPU, no interpreter
        for a, b in zip(block_select(gq, gk, 3), block_select_reference(gq, gk, 3)):
            assert torch.equal(a, b)
        print("ok")
    """, interpret=False)


@pytest.mark.slow
def test_block_mask_and_attention_from_the_kernel_lists_match_the_masked_path():
    """The BlockMask built from the kernel's lists (flex.block_mask_from_factors) is block_mask_from_scores' on the
    same scores and covers exactly select_blocks' blocks; the wired block-gate path (factors + Backend.kernels, no
    grad, flex) calls the kernel once per layer and gives the masked path's attention, on a bare attention call,
    on gatelab's GPT with a block gate and on a Hugging Face model with block gates, with the gate's factors from
    torch or from their kernel (Backend.block_factors_kernel)."""
    out = run_python(FACTORS_SPY + textwrap.dedent("""
        import dataclasses
        import torch
        from gatelab.attention import flex
        from gatelab.attention.backend import Backend
        from gatelab.attention.block_attention import block_routed_attention
        from gatelab.attention.blocks import previous_block_rows, select_blocks
        from gatelab.config import ModelConfig, Routing
        from gatelab.hf.adapter import attach_block_gates
        from gatelab.model import GPT
        from tests.test_hf import tiny

        calls = []
        kernel = flex.block_select
        flex.block_select = lambda *a, **kw: (calls.append(a[0].shape), kernel(*a, **kw))[1]

        B, H, HK, T, D, BS, DG = 2, 4, 2, 64, 16, 16, 8
        nb = T // BS
        g = torch.Generator().manual_seed(5)
        q, k, v = (torch.randn(B, h, T, D, generator=g) for h in (H, HK, HK))
        gq = torch.randint(-2, 3, (B, H, nb, DG), generator=g).float() / 4  # ties, exact products
        gk = torch.randint(-2, 3, (B, H, nb, DG), generator=g).float()
        G = gq @ gk.transpose(-1, -2)
        for block_k in (1, 2, 3):
            bm = flex.block_mask_from_factors(gq, gk, block_k, BS, T)
            want = flex.block_mask_from_scores(previous_block_rows(G), block_k, BS, T)
            for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks",
                         "q_indices", "full_q_num_blocks", "full_q_indices"):
                assert torch.equal(getattr(bm, name), getattr(want, name)), (name, block_k)
            assert torch.equal(bm.to_dense().bool(), select_blocks(previous_block_rows(G), block_k))
            assert flex.block_mask_from_factors(gq, gk, block_k, BS, T, backward=False).q_indices is None
            r = Routing(mode="block-gate", block_size=BS, block_k=block_k)
            with torch.no_grad():
                n = len(calls)
                fused = block_routed_attention(q, k, v, r, gate_scores=lambda: G, gate_factors=lambda: (gq, gk),
                                               kernels=True, backend="flex")
                assert len(calls) == n + 1
                masked = block_routed_attention(q, k, v, r, gate_scores=lambda: G, backend="masked")
                unfused = block_routed_attention(q, k, v, r, gate_scores=lambda: G, gate_factors=lambda: (gq, gk),
                                                 kernels=False, backend="flex")
                assert len(calls) == n + 1  # kernels off: the scores path
            torch.testing.assert_close(fused, masked, rtol=0, atol=1e-5)
            torch.testing.assert_close(fused, unfused, rtol=0, atol=1e-5)

        # gatelab's GPT with a learned block gate, and a Hugging Face model with block gates: kernels on (one
        # selection kernel per layer; with block_factors_kernel also one factors kernel per layer) and off agree;
        # kernels off launches neither, block_factors_kernel (the default) notwithstanding
        cfg = ModelConfig(n_layer=2, d_model=32, n_head=4, d_mlp=64, context=64, vocab_size=97, d_gate=8,
                          block_gate="learned")
        torch.manual_seed(0)
        model = GPT(cfg).eval()
        hf = tiny("llama")
        ctl = attach_block_gates(hf, d_gate=8, gate="random", block_size=BS)
        layers = cfg.n_layer + hf.config.num_hidden_layers
        idx = torch.randint(1, 97, (2, 64), generator=g)
        r = Routing(mode="block-gate", block_size=BS, block_k=1)
        outs = {}
        for kernels, factors in ((True, True), (True, False), (False, True)):
            backend = dataclasses.replace(Backend(), block_attention="flex", kernels=kernels,
                                          block_factors_kernel=factors)
            model.backend, ctl.backend = backend, backend
            n, m = len(calls), len(factor_launches)
            with torch.no_grad(), ctl.routing(r):
                outs[kernels, factors] = (model(idx, routing=r)[0], hf(idx, use_cache=False).logits)
            assert len(calls) - n == (layers if kernels else 0), (kernels, len(calls) - n)
            assert len(factor_launches) - m == (layers if kernels and factors else 0), (factors, len(factor_launches) - m)
        for a, b in zip(outs[True, True] + outs[True, False], outs[False, True] * 2):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
        print("ok")
    """))
    assert out.strip().endswith("ok")


def test_a_compiled_function_keeps_the_selection_in_its_graph():
    """block_select is one custom operator: torch.compile traces it without a graph break (the compiled block prefill
    stays one graph) and gives the eager lists."""
    import torch
    from torch._dynamo.utils import counters

    from gatelab.kernels.block_select import block_select
    g = torch.Generator().manual_seed(2)
    gq, gk = (torch.randint(-2, 3, (2, 3, 9, 8), generator=g).float() for _ in range(2))
    counters.clear()
    compiled = torch.compile(lambda a, b: [t + 0 for t in block_select(a * 1, b, 3)], backend="aot_eager",
                             fullgraph=True)
    for a, b in zip(compiled(gq, gk), block_select(gq, gk, 3)):
        assert torch.equal(a, b)
    assert not counters["graph_break"]
