"""The Triton kernels on a real GPU at the training step's shapes (skipped without CUDA; CI has none).

The CPU tests run these kernels under Triton's interpreter at tiny shapes, which cannot see out-of-bounds
accesses, register limits or torch.compile around them (the head kernels ran right eagerly and faulted compiled
until they became one custom operator). On the device, one test per process so that a CUDA fault names its test:
`bash scripts/cuda_tests.sh` (also a check of scripts/gpu_smoke.sh).
"""
import pytest
import torch
import torch.nn.functional as F

from gatelab.kernels.head_loss import fused_head_fits, linear_cross_entropy
from gatelab.kernels.topk import causal_rows, factor_kth_largest, row_kth_largest

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# the 31M model's training step: 16 x 512 rows of width 256 against the GPT-2 vocabulary
ROWS, WIDTH, VOCAB = 16 * 512, 256, 50257


def _head_inputs(seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    h = torch.randn(ROWS, WIDTH, device="cuda", generator=g).bfloat16()
    w = (0.05 * torch.randn(VOCAB, WIDTH, device="cuda", generator=g)).bfloat16()
    t = torch.randint(0, VOCAB, (ROWS,), device="cuda", generator=g)
    return h, w, t


def _loss_and_grads(h, w, t, kernel, compile_it=False):
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()

    def fn(a, b, c):
        return linear_cross_entropy(a, b, c, kernel=kernel)

    if compile_it:
        torch._dynamo.reset()
        fn = torch.compile(fn)
    loss = fn(hh, ww, t)
    gh, gw = torch.autograd.grad(loss, (hh, ww))
    torch.cuda.synchronize()
    return float(loss), gh.float(), gw.float()


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("compile_it", [False, True], ids=["eager", "compiled"])
def test_head_kernels_match_the_torch_loss_at_the_training_shape(compile_it):
    h, w, t = _head_inputs()
    assert fused_head_fits(h, w)
    ref_loss, ref_gh, ref_gw = _loss_and_grads(h, w, t, "torch")
    loss, gh, gw = _loss_and_grads(h, w, t, "triton", compile_it)
    exact = F.cross_entropy(h.float() @ w.float().t(), t)
    assert abs(loss - float(exact)) < 1e-3 * float(exact), (loss, float(exact), ref_loss)
    assert _rel(gh, ref_gh) < 2e-2 and _rel(gw, ref_gw) < 2e-2, (_rel(gh, ref_gh), _rel(gw, ref_gw))


def test_factor_threshold_matches_the_threshold_of_formed_scores_at_the_training_shape():
    B, H, T, DG, k = 16, 8, 512, 32, 64
    g = torch.Generator(device="cuda").manual_seed(1)
    gq = torch.randn(B, H, T, DG, device="cuda", generator=g).bfloat16()
    gk = torch.randn(B, H, T, DG, device="cuda", generator=g).bfloat16()
    tau = factor_kth_largest(gq, gk, k)
    torch.cuda.synchronize()
    want = row_kth_largest(gq.float() @ gk.float().transpose(-1, -2), k, causal_rows(T, T, "cuda"))
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(tau), finite)
    torch.testing.assert_close(tau[finite], want[finite], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pool", ["mean", "max-min"])
def test_block_factors_kernel_at_prefill_shapes(pool):
    """A block gate's factors in one kernel against its torch reference at SmolLM2's shapes (bf16, 128-token blocks):
    a qk gate over 8 x 8K (9 query heads on 3 key heads, queries through a transposed view) and an X gate over
    1 x 32K (576 features); each factor within one bf16 rounding plus the float32 sums' reordering error, 2^-18 of the
    factor's largest magnitude (a near-zero factor left by cancellation carries the error of its larger terms)."""
    from gatelab.kernels.block_factors import block_factors, block_factors_fits, block_factors_reference
    g = torch.Generator(device="cuda").manual_seed(0)
    cases = [(8, 9, 3, 8192, 64), (1, 1, 1, 32768, 576)]
    for B, HQ, HK, T, C in cases:
        q = torch.randn(B, T, HQ, C, device="cuda", generator=g).bfloat16().transpose(1, 2)
        k = torch.randn(B, HK, T, C, device="cuda", generator=g).bfloat16()
        wq = torch.randn(9, C, 32, device="cuda", generator=g) / C ** 0.5
        wk = torch.randn(9, C * (2 if pool == "max-min" else 1), 32, device="cuda", generator=g) / C ** 0.5
        assert block_factors_fits(q, k, wq, wk, 128)
        got = block_factors(q, k, wq, wk, 128, pool)
        want = block_factors_reference(q, k, wq, wk, 128, pool)
        torch.cuda.synchronize()
        for a, b in zip(got, want):
            ulp = 2.0 ** (torch.floor(torch.log2(b.float().abs().clamp_min(2 ** -100))) - 7)
            err = (a.float() - b.float()).abs() - ulp - 2.0 ** -18 * b.float().abs().amax()
            assert (err <= 0).all(), (B, HQ, T, C, pool, float(err.max()))


@pytest.mark.parametrize("B, H, Hk, S, n", [(8, 9, 3, 32769, 17), (1, 32, 8, 8193, 5), (2, 9, 3, 4097, 33)])
def test_block_decode_kernel_at_decoding_shapes(B, H, Hk, S, n):
    """The block-decoding kernel against its torch reference at SmolLM2 and Llama-like decoding shapes (128-token
    blocks, head size 64, a cache with room past the filled part), split over programs and in one."""
    import gatelab.kernels.block_decode as kb
    g = torch.Generator(device="cuda").manual_seed(0)
    bs, D = 128, 64
    q = torch.randn(B, H, 1, D, device="cuda", generator=g).bfloat16()
    k, v = (torch.randn(B, Hk, S + 300, D, device="cuda", generator=g).bfloat16()[:, :, :S] for _ in range(2))
    own = (S - 1) // bs
    scores = torch.rand(B, H, own, device="cuda", generator=g)
    earlier = scores.topk(min(n - 1, own), dim=-1).indices.sort(-1).values
    idx = torch.cat([earlier, torch.full((B, H, 1), own, device="cuda")], -1).to(torch.int32)
    idx[:, ::2, 0] = -1  # rows keeping one block fewer
    ref = kb.block_decode_reference(q, k, v, idx, S - 1, bs)
    for programs in (kb.TARGET_PROGRAMS, 1):
        kb.TARGET_PROGRAMS, saved = programs, kb.TARGET_PROGRAMS
        try:
            got = kb.block_decode(q, k, v, idx, S - 1, bs)
        finally:
            kb.TARGET_PROGRAMS = saved
        torch.cuda.synchronize()
        torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("position", ["qk", "none"])
def test_decoding_steps_replayed_from_cuda_graphs_give_the_eager_steps_tokens(position):
    """hf/graphed.py: the steps replayed from CUDA graphs (both kinds, the steps that start a query block included:
    several of them after the one recorded) give the tokens of the same steps run eagerly, for dense and block-gate;
    every block kept gives dense's tokens."""
    transformers = pytest.importorskip("transformers")  # noqa: F841
    from gatelab.config import Routing
    from gatelab.hf.adapter import attach_block_gates
    from gatelab.hf.graphed import fixed_greedy

    from .test_hf import tiny
    model = tiny("llama", seed=1).cuda()
    attach_block_gates(model, d_gate=8, gate="random", block_size=16, position=position)
    ids = torch.randint(1, 101, (3, 40), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    dense = fixed_greedy(model, ids, Routing(), 90, graphs=True)
    assert torch.equal(dense, fixed_greedy(model, ids, Routing(), 90, graphs=False))
    for block_k in (1, 2):
        r = Routing(mode="block-gate", block_size=16, block_k=block_k)
        assert torch.equal(fixed_greedy(model, ids, r, 90, graphs=True), fixed_greedy(model, ids, r, 90, graphs=False))
    every = fixed_greedy(model, ids, Routing(mode="block-gate", block_size=16, block_k=64), 90, graphs=True)
    assert torch.equal(every, dense)
    r = Routing(mode="block-gate", block_size=16, block_k=2)  # the steps compiled (the Triton kernel inside), graphed
    assert torch.equal(fixed_greedy(model, ids, r, 90, graphs=True, compiled=True),
                       fixed_greedy(model, ids, r, 90, graphs=False))
