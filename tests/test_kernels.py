"""The Triton kernels (src/gatelab/kernels/) against the torch reference, run on CPU under Triton's interpreter.

Triton decides at import whether kernels are interpreted, so the comparisons run in a child process with
TRITON_INTERPRET=1. Exact: the same keep-sets (no ties in these scores), exactly k keys per row, the same
thresholds, random-topk's subsets from the in-kernel hash, and whole routed-attention outputs.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gatelab.attention.backend import Backend
from gatelab.attention.masks import causal_mask
from gatelab.config import GatelabError
from gatelab.kernels.topk import causal_topk_keep, topk_keep_mask
from gatelab.kernels.triton_support import _INTERPRET, available

triton = pytest.importorskip("triton")
SRC = str(Path(__file__).resolve().parents[1] / "src")


def run_interpreted(code: str) -> str:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


SHAPES = [(2, 2, 40, 40, 8, "float32"), (1, 3, 17, 33, 5, "bfloat16"), (1, 2, 30, 30, 1, "float32"),
          (1, 1, 100, 100, 99, "float32"), (2, 1, 9, 9, 3, "float16")]


def test_kernel_selection_matches_the_reference_exactly():
    out = run_interpreted(f"""
        import torch
        from gatelab.kernels import block_mass, hashing, head_loss, soft_gate, topk, triton_support
        from gatelab.attention import blocks, masks, soft
        from gatelab.attention.attend import GateScores, attend
        from gatelab.attention.backend import Backend
        assert triton_support.available(torch.zeros(1))
        torch.manual_seed(0)
        for B, H, T, S, k, dt in {SHAPES!r}:
            x = torch.randn(B, H, T, S).to(getattr(torch, dt))
            x[0, 0, -1, :3] = torch.tensor([float("inf"), -float("inf"), -0.0]).to(x.dtype)
            causal = topk.causal_rows(T, S, None)
            keep = topk.causal_topk_keep(x, k)
            ref = topk.topk_keep_mask(x, k, causal)
            assert torch.equal(keep, ref), (B, H, T, S, k, dt)
            assert torch.equal(keep.sum(-1), causal.sum(-1).clamp(max=k).expand(B, H, T)), "exactly k per row"
            tau = topk.causal_kth_largest(x, k)
            want = topk.row_topk(x.float().masked_fill(~causal, float("-inf")), k)[0][..., -1:]
            want = want.masked_fill(causal.sum(-1, keepdim=True) <= k, float("-inf"))
            assert torch.equal(tau, want), (B, H, T, S, k, dt)
        for layer, H, T, S, k, seed in [(3, 2, 20, 20, 4, 7), (0, 4, 33, 33, 10, 2**40 + 5), (1, 1, 8, 24, 3, 0)]:
            rows = hashing.random_row_hashes(layer, H, T, seed, S - T)[None]
            keep = topk.hashed_topk_keep(rows, k, S)
            ref = topk.topk_keep_mask(hashing.fixed_random_scores(layer, H, T, S, seed)[None], k,
                                         topk.causal_rows(T, S, None))
            assert torch.equal(keep, ref), (layer, H, T, S, k, seed)
        print("ok")
    """)
    assert out.strip().endswith("ok")


def test_kernel_ties_keep_exactly_k_and_only_top_scores():
    out = run_interpreted("""
        import torch
        from gatelab.kernels import block_mass, hashing, head_loss, soft_gate, topk, triton_support
        from gatelab.attention import blocks, masks, soft
        from gatelab.attention.attend import GateScores, attend
        from gatelab.attention.backend import Backend
        x = torch.zeros(1, 1, 12, 12)
        x[..., ::3] = 1.0  # many equal scores: the threshold value is tied
        keep = topk.causal_topk_keep(x, 3)
        rows = torch.arange(12)
        assert torch.equal(keep.sum(-1)[0, 0], (rows + 1).clamp(max=3)), keep.sum(-1)
        ones = (x == 1) & torch.ones(12, 12, dtype=torch.bool).tril()
        # a row with >= 3 ones keeps only ones; rows with fewer keep all their ones
        assert bool(((keep & ~ones).sum(-1)[0, 0][ones.sum(-1)[0, 0] >= 3] == 0).all())
        print("ok")
    """)
    assert out.strip().endswith("ok")


def test_attend_with_kernels_equals_attend_on_the_references():
    """Every hard mode and topk-sigmoid through attend: the Triton kernels against Backend(kernels=False), in one
    interpreted process."""
    out = run_interpreted("""
        import torch
        from gatelab.attention.attend import GateScores, attend
        from gatelab.attention.backend import Backend
        from gatelab.config import Routing
        for mode in ("oracle-topk", "gate-topk", "random-topk", "soft-gate-topk-sigmoid"):
            torch.manual_seed(1)
            B, H, T, D = 2, 2, 24, 8
            q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
            G = torch.randn(B, H, T, T)
            r = (Routing(mode="soft-gate", k=5, soft_mask="topk-sigmoid") if mode.startswith("soft")
                 else Routing(mode=mode, k=5))
            fast = attend(q, k, v, r, gate=GateScores(lambda: G))
            ref = attend(q, k, v, r, gate=GateScores(lambda: G), backend=Backend(kernels=False))
            # the same keep-sets; SDPA may take another CPU kernel for a batch-expanded mask (1e-7 apart)
            torch.testing.assert_close(fast, ref, rtol=1e-6, atol=1e-6, msg=mode)
            print("ok", mode)
    """)
    assert [line.split()[1] for line in out.strip().splitlines() if line.startswith("ok")] == [
        "oracle-topk", "gate-topk", "random-topk", "soft-gate-topk-sigmoid"]


SPILL_FREE_BACKWARD = """
        import triton
        key = ["T", "D", "DG", "RENORM"]
        from gatelab.kernels import soft_gate as sg
        fwd = sg._TUNERS[False][0]
        tuned = {}
        for name, tiles in sg.SOFT_SPILL_FREE_TILES.items():
            (m, n, w), = tiles
            tuner = triton.autotune([triton.Config(dict(BLOCK_M=m, BLOCK_N=n), num_warps=w)], key=key)
            tuned[name] = tuner(getattr(sg, f"_soft_bwd_{name}_kernel"))
        sg._TUNERS[False] = (fwd, tuned["kv"], tuned["q"])
"""


@pytest.mark.parametrize("tiles", ["interpreter", "spill-free-backward"])
def test_fused_soft_gate_kernel_matches_the_explicit_soft_gate_in_every_reading(tiles):
    """soft_gate.soft_gate_attention (one flash-style kernel each way) against the explicit soft gate in fp32, for
    both masks x both renormalisations: the output and the gradients of q, k, v and both gate projections; T = 40
    is not a multiple of the tile (16 under the interpreter), so edge tiles are covered. fp16: Triton's interpreter
    cannot multiply bf16 tiles (numpy has no bf16); bf16 is checked on the GPU by benchmarks/bench_train.py.
    spill-free-backward: the backward kernels on the tiles GATELAB_SOFT_SPILL_FREE_TILES adds (query and key tiles
    of different sizes: 64 x 16 and 64 x 32)."""
    out = run_interpreted("""
        import math
        import torch
        from gatelab.kernels import block_mass, hashing, head_loss, soft_gate, topk, triton_support
        from gatelab.attention import blocks, masks, soft
        from gatelab.attention.attend import GateScores, attend
        from gatelab.attention.backend import Backend
        from gatelab.config import Routing
""" + (SPILL_FREE_BACKWARD if tiles == "spill-free-backward" else "") + """
        torch.manual_seed(0)
        B, H, T, D, DG = 1, 2, 40, 16, 16
        causal = masks.causal_mask(T, None)
        for mask in ("sigmoid", "topk-sigmoid"):
            for renorm in (False, True):
                r = Routing(mode="soft-gate", k=8, soft_mask=mask, soft_renormalize=renorm, soft_temperature=0.7)
                leaves = [torch.randn(B, H, T, n).half().requires_grad_() for n in (D, D, D, DG, DG)]
                q, k, v, gq0, gk0 = leaves
                dout = torch.randn(B, H, T, D)

                def reference():
                    G = (gq0.float() / math.sqrt(DG)) @ gk0.float().transpose(-1, -2)
                    S = q.float() @ k.float().transpose(-1, -2) / math.sqrt(D)
                    if renorm:
                        return torch.softmax(S + soft.soft_gate_mask(G, r, causal, log=True), -1) @ v.float()
                    A = torch.softmax(S.masked_fill(~causal, float("-inf")), -1)
                    return (A * soft.soft_gate_mask(G, r, causal)) @ v.float()

                def fused():
                    gq = gq0 / math.sqrt(DG)
                    tau = None
                    if mask == "topk-sigmoid":
                        tau = topk.causal_kth_largest((gq.float() @ gk0.float().transpose(-1, -2)).detach(), r.k)
                    return soft_gate.soft_gate_attention(q, k, v, gq, gk0, r.soft_temperature, renorm, tau)

                got = []
                for fn in (reference, fused):
                    for t in leaves:
                        t.grad = None
                    o = fn()
                    o.float().backward(dout)
                    got.append([o.detach().float()] + [t.grad.float() for t in leaves])
                for name, a, b in zip(("out", "dq", "dk", "dv", "dgq", "dgk"), *got):
                    rel = float((a - b).norm() / a.norm())
                    assert rel < 3e-3, (mask, renorm, name, rel)
        # dispatch: routed_attention takes the kernel when asked for it and given the gate's factors
        r = Routing(mode="soft-gate", k=8)
        q, k, v, gq, gk = (torch.randn(B, H, T, n).half() for n in (D, D, D, DG, DG))
        gate = GateScores(lambda: gq @ gk.transpose(-1, -2), lambda: (gq, gk))
        fused = attend(q, k, v, r, gate=gate, backend=Backend(soft_attention="fused"))
        assert torch.equal(fused, soft_gate.soft_gate_attention(q, k, v, gq, gk, 1.0, False))
        explicit = attend(q.float(), k.float(), v.float(), r, backend=Backend(soft_attention="explicit"),
                          gate=GateScores(lambda: gq.float() @ gk.float().transpose(-1, -2)))
        torch.testing.assert_close(fused.float(), explicit, rtol=5e-3, atol=5e-3)
        # topk-sigmoid through the dispatch: the threshold from the factors, then the same kernel
        # (either threshold source: G formed in memory, or in registers from the factors)
        r = Routing(mode="soft-gate", k=8, soft_mask="topk-sigmoid")
        explicit = attend(q.float(), k.float(), v.float(), r, backend=Backend(soft_attention="explicit"),
                          gate=GateScores(lambda: gq.float() @ gk.float().transpose(-1, -2)))
        taus = dict(factors=topk.factor_kth_largest(gq, gk, 8),
                    scores=topk.causal_kth_largest((gq @ gk.transpose(-1, -2)).float(), 8))
        for source, tau in taus.items():
            fused = attend(q, k, v, r, gate=gate, backend=Backend(soft_attention="fused", topk_threshold=source))
            assert torch.equal(fused, soft_gate.soft_gate_attention(q, k, v, gq, gk, 1.0, False, tau)), source
            torch.testing.assert_close(fused.float(), explicit, rtol=5e-3, atol=5e-3)
        print("ok")
    """)
    assert out.strip().endswith("ok")


def test_factor_threshold_kernel_matches_the_threshold_of_formed_scores():
    """topk-sigmoid's row threshold from the gate's two projections (G formed in registers, never in memory)
    equals the reference threshold of G formed in fp32: the same k-th largest causal score in every row, -inf in
    rows with <= k causal keys; T not a multiple of the 16-row tile, k = 1, and k = T - 1."""
    out = run_interpreted("""
        import torch
        from gatelab.kernels import block_mass, hashing, head_loss, soft_gate, topk, triton_support
        from gatelab.attention import blocks, masks, soft
        from gatelab.attention.attend import GateScores, attend
        from gatelab.attention.backend import Backend
        torch.manual_seed(3)
        for B, H, T, DG, k in [(1, 2, 40, 16, 8), (2, 1, 17, 32, 1), (1, 1, 33, 16, 32), (1, 1, 64, 64, 20)]:
            gq, gk = torch.randn(B, H, T, DG).half(), torch.randn(B, H, T, DG).half()
            tau = topk.factor_kth_largest(gq, gk, k)
            G = gq.float() @ gk.float().transpose(-1, -2)
            want = topk.row_kth_largest(G, k, topk.causal_rows(T, T, None))
            assert tau.shape == (B, H, T, 1) and tau.dtype == torch.float32
            few = torch.arange(T) + 1 <= k
            assert bool(torch.isinf(tau[..., few, 0]).all()) and bool((tau[..., few, 0] < 0).all())
            torch.testing.assert_close(tau, want, rtol=1e-6, atol=1e-6)
            # exactly k causal scores of G reach each threshold (no ties in random scores)
            causal = topk.causal_rows(T, T, None)
            reach = ((G >= tau) & causal).sum(-1)[..., ~few]
            assert bool((reach == k).all()), (B, H, T, DG, k)
        print("ok")
    """)
    assert out.strip().endswith("ok")


@pytest.mark.slow
def test_factor_threshold_kernel_settings_give_the_same_threshold():
    """Every setting bench_threshold.py times (rows per program, causal row segments launched with only the keys
    their rows see, coarse bits before the exact refinement) gives the reference threshold exactly, also where
    scores tie (factors on a coarse grid make many equal G values, so the refinement counts ties). One child
    process runs the four settings."""
    out = run_interpreted("""
        import torch
        from gatelab.kernels import topk
        for rows, segment, coarse in [(16, 0, 16), (16, 16, 32), (8, 16, 20), (32, 32, 16)]:
            seg = topk._causal_segments(70, segment)
            assert seg[0][0] == 0 and seg[-1][1] == 70 and all(a[1] == b[0] for a, b in zip(seg, seg[1:]))
            assert len(seg) == {0: 1, 16: 4, 32: 3}[segment]
            torch.manual_seed(5)
            for T, k, ties in [(70, 9, False), (70, 9, True), (40, 1, True), (33, 32, False)]:
                gq, gk = torch.randn(1, 2, T, 16), torch.randn(1, 2, T, 16)
                if ties:
                    gq, gk = gq.round(), (gk > 0).float()
                gq, gk = gq.half(), gk.half()
                G = gq.float() @ gk.float().transpose(-1, -2)
                want = topk.row_kth_largest(G, k, topk.causal_rows(T, T, None))
                got = topk.factor_kth_largest(gq, gk, k, (rows, segment, coarse))
                assert torch.equal(got, want), ((rows, segment, coarse), T, k, ties, (got - want).abs().max())
        print("ok")
    """)
    assert out.strip().endswith("ok")


@pytest.mark.slow
def test_stochastic_kernel_keeps_fresh_uniform_subsets():
    out = run_interpreted("""
        import torch
        from gatelab.kernels import block_mass, hashing, head_loss, soft_gate, topk, triton_support
        from gatelab.attention import blocks, masks, soft
        from gatelab.attention.attend import GateScores, attend
        from gatelab.attention.backend import Backend
        torch.manual_seed(0)
        B, H, T, k = 1, 1, 64, 8
        counts = torch.zeros(T)
        draws = []
        for _ in range(50):
            keep = topk.hashed_topk_keep(torch.randint(0, 1 << 32, (B, H, T)), k, T)
            assert torch.equal(keep.sum(-1)[0, 0], torch.arange(1, T + 1).clamp(max=k))
            counts += keep[0, 0, -1].float()
            draws.append(keep[0, 0, -1])
        assert not torch.equal(draws[0], draws[1])  # fresh each call
        # each of the last row's 64 keys is kept with probability 8/64: 6.25 of 50 draws, sd ~2.3; a fixed subset
        # would give 50 for 8 keys and 0 for the rest. Uniform draws leave a key out of all 50 with probability
        # 0.875^50 = 0.0013 and keep one more than 20 times with probability under 1e-6
        assert (counts > 0).sum() >= 48 and counts.max() <= 20, counts
        print("ok")
    """)
    assert out.strip().endswith("ok")


def test_block_mass_kernel_matches_the_chunked_torch_mass():
    """kernels.block_attention_mass_fused (block-gate distillation's teacher in one kernel) against blocks'
    chunked torch path on the same inputs in fp32: T a multiple of the block and not, grouped-query keys, and an
    explicit causal mask (what an HF model passes) takes the kernel while a padding mask keeps the torch path."""
    out = run_interpreted("""
        import torch
        from gatelab.kernels import block_mass, hashing, head_loss, soft_gate, topk, triton_support
        from gatelab.attention import blocks, masks, soft
        from gatelab.attention.attend import GateScores, attend
        from gatelab.attention.backend import Backend
        torch.manual_seed(0)
        for B, H, Hk, T, D, bs in [(1, 2, 2, 64, 16, 16), (2, 4, 2, 40, 16, 16), (1, 1, 1, 96, 32, 32)]:
            q, k = torch.randn(B, H, T, D).half(), torch.randn(B, Hk, T, D).half()
            assert block_mass.block_mass_fits(q, k, bs)
            got = blocks.block_attention_mass(q, k, bs, scale=0.3)
            want = blocks.block_attention_mass(q.float(), k.float(), bs, scale=0.3)
            assert not block_mass.block_mass_fits(q.float(), k.float(), bs)
            torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-4)
            nb = want.shape[-1]
            assert torch.equal(got.triu(1), torch.zeros_like(got)), "no mass above the diagonal block"
            rows = got.sum(-1)
            torch.testing.assert_close(rows, torch.ones_like(rows))
            causal = blocks.causal_rows(T, T, q.device)[None, None].expand(B, 1, T, T)
            assert torch.equal(blocks.block_attention_mass(q, k, bs, causal, scale=0.3), got)
            padded = causal.clone()
            padded[0, :, :, :3] = False
            assert not blocks._plain_causal(padded, T)
            torch.testing.assert_close(blocks.block_attention_mass(q, k, bs, padded, scale=0.3),
                                       blocks.block_attention_mass(q.float(), k.float(), bs, padded, scale=0.3),
                                       rtol=2e-2, atol=2e-3)
        print("ok")
    """)
    assert out.strip().endswith("ok")


def test_kernels_stay_off_on_cpu_without_the_interpreter():
    assert not _INTERPRET
    assert not available(torch.zeros(1))
    x = torch.randn(1, 2, 10, 10)
    assert torch.equal(causal_topk_keep(x, 3), topk_keep_mask(x, 3, causal_mask(10, None)))


@pytest.mark.slow
def test_fused_head_kernels_match_cross_entropy_and_its_gradients():
    """linear_cross_entropy on the fused head kernels (kernels/head_loss.py: logits tile by tile, never
    stored) against F.cross_entropy in fp32 on the same fp16 values: the loss and both gradients, over chunkings that
    split rows unevenly, vocabulary slices that are empty (97 columns in 8 slices of 128) or uneven (300 in 2),
    a padded vocabulary, a frozen head, no gradient at all, and the operator under torch.compile."""
    out = run_interpreted("""
        import torch
        import torch.nn.functional as F
        from gatelab.kernels import block_mass, hashing, head_loss, soft_gate, topk, triton_support
        from gatelab.attention import blocks, masks, soft
        from gatelab.attention.attend import GateScores, attend
        from gatelab.attention.backend import Backend

        def lce(*args, **kwargs):
            return head_loss.linear_cross_entropy(*args, kernel="triton", **kwargs)

        torch.manual_seed(0)
        for n, C, V, chunk, mult, splits in [(40, 16, 97, 16, 1, 8), (37, 32, 300, 64, 64, 2), (5, 16, 300, 2, 1, 3)]:
            head_loss.LOSS_SPLITS = splits
            h = torch.randn(n, C).half().requires_grad_()
            w = (0.5 * torch.randn(V, C)).half().requires_grad_()
            t = torch.randint(0, V, (n,))
            assert head_loss.fused_head_fits(h, w)
            ref = F.cross_entropy(h.float() @ w.float().t(), t, reduction="sum")
            rh, rw = torch.autograd.grad(1.5 * ref, (h, w))
            got = lce(h, w, t, reduction="sum", chunk_rows=chunk, vocab_multiple=mult)
            gh, gw = torch.autograd.grad(1.5 * got, (h, w))
            assert abs(float(got) - float(ref)) <= 1e-4 * abs(float(ref)), (n, V, float(got), float(ref))
            for name, a, b in (("grad_h", gh, rh), ("grad_w", gw, rw)):
                rel = float((a.float() - b.float()).norm() / b.float().norm())
                assert rel < 5e-3, (n, V, name, rel)
        head_loss.LOSS_SPLITS = 8
        h, w, t = torch.randn(20, 16).half(), torch.randn(50, 16).half(), torch.randint(0, 50, (20,))
        ref = F.cross_entropy(h.float() @ w.float().t(), t)
        with torch.no_grad():
            assert abs(float(lce(h, w, t)) - float(ref)) < 1e-4
        hg = h.clone().requires_grad_()
        (gh,) = torch.autograd.grad(lce(hg, w, t), (hg,))  # frozen head: grad_h only
        (rh,) = torch.autograd.grad(F.cross_entropy(hg.float() @ w.float().t(), t), (hg,))
        assert float((gh.float() - rh).norm() / rh.norm()) < 5e-3
        # traced by torch.compile the kernels stay one opaque operator (its fake implementation gives the shapes):
        # the same loss and gradients as eager
        hg, wg = h.clone().requires_grad_(), w.clone().requires_grad_()
        compiled = torch.compile(lce, backend="aot_eager", fullgraph=True)
        got = compiled(hg, wg, t)
        cgh, cgw = torch.autograd.grad(got, (hg, wg))
        hg, wg = h.clone().requires_grad_(), w.clone().requires_grad_()
        want = lce(hg, wg, t)
        egh, egw = torch.autograd.grad(want, (hg, wg))
        assert torch.equal(got, want) and torch.equal(cgh, egh) and torch.equal(cgw, egw)
        print("ok")
    """)
    assert out.strip().endswith("ok")


@pytest.mark.slow
def test_every_kernel_config_compiles_for_the_h100_without_a_gpu():
    """scripts/kernel_resources.py compiles each Triton kernel at each config gatelab launches for sm_90 (Triton's
    bundled ptxas, no GPU): a kernel that would fail to compile on the H100 fails here, on CPU CI, training and
    inference kernels alike (the selection at 128K tokens is left to the report). The threshold-from-factors kernel,
    the head kernels' log-sum-exp pass, the block factors and the block-decoding kernels also keep every register on
    chip."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import kernel_resources
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("this Triton has no NVIDIA backend tools")
    names = []
    for fn, note, sig, cx, w, st in kernel_resources.kernel_grid(long_context=False):  # 128K: the report only
        r = kernel_resources.compile_report(fn, sig, cx, w, st, 90)
        name = fn.fn.__name__
        assert "error" not in r, (name, note, r)
        assert r["regs"] and r["regs"] <= 255, (name, note, r)
        if name in ("_factor_tau_kernel", "_lce_lse_kernel", "_block_factors_kernel", "_block_decode_kernel"):
            assert r["stack"] == 0, (name, note, r)
        names.append(name)
    assert {"_topk_rows_kernel", "_factor_tau_kernel", "_soft_fwd_kernel", "_soft_bwd_kv_kernel", "_soft_bwd_q_kernel",
            "_block_mass_kernel", "_lce_lse_kernel", "_lce_grad_kernel", "_block_factors_kernel",
            "_block_select_kernel", "_block_decode_kernel", "_combine_kernel"} <= set(names)


@pytest.mark.parametrize("text,want", [("16,128,20", (16, 128, 20)), ("8,0,32", (8, 0, 32)), ("16,128", None),
                                       ("a,b,c", None), ("12,0,20", None), ("16,-1,20", None), ("16,0,33", None)])
def test_factor_threshold_setting_is_parsed_or_refused_clearly(text, want):
    if want is None:
        with pytest.raises(GatelabError, match="FACTOR_TAU|factor_tau"):
            Backend.from_env({"GATELAB_FACTOR_TAU": text})
    else:
        assert Backend.from_env({"GATELAB_FACTOR_TAU": text}).factor_tau == want


@pytest.mark.parametrize("env,want", [({}, True), ({"GATELAB_BLOCK_FACTORS_KERNEL": "0"}, False),
                                      ({"GATELAB_BLOCK_FACTORS_KERNEL": "1"}, True),
                                      ({"GATELAB_KERNELS": "0"}, False),
                                      ({"GATELAB_KERNELS": "0", "GATELAB_BLOCK_FACTORS_KERNEL": "1"}, False)])
def test_the_block_factors_kernel_is_on_by_default_and_off_with_the_kernels(env, want):
    """A block gate's factors come from their kernel unless GATELAB_BLOCK_FACTORS_KERNEL=0 or GATELAB_KERNELS=0."""
    backend = Backend.from_env(env)
    assert backend.factors_kernel is want
    assert backend.block_factors_kernel is (env.get("GATELAB_BLOCK_FACTORS_KERNEL", "1") == "1")
