"""Every routing mode: which keys are kept, and where gradients flow."""
import math

import pytest
import torch

from gatelab.attention.attend import GateScores, attend
from gatelab.attention.hard import RandomMaskCache
from gatelab.attention.masks import causal_mask
from gatelab.attention.soft import soft_gate_mask
from gatelab.config import GatelabError, Routing
from gatelab.kernels.topk import topk_keep_mask
from gatelab.model import GPT
from tests.conftest import tiny_model_config

HARD_MODES = ["oracle-topk", "gate-topk", "random-topk", "stochastic"]


def attention_weights(mode, k, T=24, B=2, H=3, seed=0, **routing_kw):
    """Run attend with V = identity, so that each output row *is* that row's attention weights."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, T, generator=g)
    kk = torch.randn(B, H, T, T, generator=g)
    v = torch.eye(T).expand(B, H, T, T)
    G = torch.randn(B, H, T, T, generator=g)
    return attend(q, kk, v, Routing(mode=mode, k=k, **routing_kw), gate=GateScores(lambda: G),
                  random_masks=RandomMaskCache()), q, kk, G


@pytest.mark.parametrize("mode", HARD_MODES)
@pytest.mark.parametrize("k", [1, 5, 8, 23, 24, 40])
def test_hard_modes_keep_exactly_min_k_causal_keys(mode, k):
    A, *_ = attention_weights(mode, k)
    T = A.shape[-1]
    kept = (A > 0).sum(-1)  # (B, H, T)
    expected = torch.clamp(torch.arange(T) + 1, max=k)
    assert torch.equal(kept, expected.expand_as(kept))
    assert torch.all(A.triu(1) == 0), "a future key received weight"
    assert torch.allclose(A.sum(-1), torch.ones_like(A.sum(-1)), atol=1e-5)


@pytest.mark.parametrize("mode,score_index", [("oracle-topk", 1), ("gate-topk", 3)])
def test_topk_modes_keep_the_largest_scores(mode, score_index):
    k, T = 5, 24
    out = attention_weights(mode, k, T=T)
    A = out[0]
    if mode == "oracle-topk":
        scores = out[1] @ out[2].transpose(-1, -2)
    else:
        scores = out[3]
    masked = scores.masked_fill(~causal_mask(T, "cpu"), float("-inf"))
    for i in range(k, T):
        chosen = set(torch.nonzero(A[0, 0, i]).flatten().tolist())
        best = set(masked[0, 0, i].topk(k).indices.tolist())
        assert chosen == best


def test_random_topk_is_fixed_and_seeded_stochastic_is_fresh():
    a1, *_ = attention_weights("random-topk", 4)
    a2, *_ = attention_weights("random-topk", 4)
    assert torch.equal(a1 > 0, a2 > 0)
    m0 = RandomMaskCache().get(0, 3, 24, 4, seed=0, device="cpu")
    m1 = RandomMaskCache().get(0, 3, 24, 4, seed=1, device="cpu")
    m0_layer1 = RandomMaskCache().get(1, 3, 24, 4, seed=0, device="cpu")
    assert not torch.equal(m0, m1) and not torch.equal(m0, m0_layer1)
    s1, *_ = attention_weights("stochastic", 4)
    s2, *_ = attention_weights("stochastic", 4)
    assert not torch.equal(s1 > 0, s2 > 0)
    assert torch.equal((s1 > 0)[..., :4, :], (s2 > 0)[..., :4, :])  # rows with <= k keys keep all


def test_oracle_with_k_at_least_context_equals_dense():
    torch.manual_seed(0)
    model = GPT(tiny_model_config()).eval()
    x = torch.randint(0, 97, (2, 32))
    dense, _ = model(x, routing=Routing())
    for k in (32, 64):
        oracle, _ = model(x, routing=Routing(mode="oracle-topk", k=k))
        assert torch.allclose(dense, oracle, atol=1e-5)
    sparse, _ = model(x, routing=Routing(mode="oracle-topk", k=4))
    assert not torch.allclose(dense, sparse, atol=1e-3)


def _gate_grads(routing, gate="learned"):
    torch.manual_seed(0)
    model = GPT(tiny_model_config(gate=gate))
    x = torch.randint(0, 97, (2, 32))
    _, loss = model(x, x, routing=routing)
    grads = torch.autograd.grad(loss, model.gate_parameters(), allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(model.gate_parameters(), grads)]


def test_gate_gradient_is_exactly_zero_under_hard_topk_and_nonzero_under_soft():
    hard = _gate_grads(Routing(mode="gate-topk", k=4))
    assert all(torch.count_nonzero(g) == 0 for g in hard)
    for soft_mask in ("topk-sigmoid", "sigmoid"):
        for renorm in (False, True):
            soft = _gate_grads(Routing(mode="soft-gate", k=4, soft_mask=soft_mask, soft_renormalize=renorm))
            assert all(torch.count_nonzero(g) > 0 for g in soft), (soft_mask, renorm)


def test_soft_gate_readings():
    T, k = 16, 4
    G = torch.randn(2, 3, T, T)
    causal = causal_mask(T, "cpu")
    m = soft_gate_mask(G, Routing(mode="soft-gate", k=k, soft_mask="topk-sigmoid"), causal)
    assert torch.all(m[..., :k, :][causal[:k].expand(2, 3, k, T)] == 1.0), "rows with <= k keys keep all"
    assert torch.all(m.triu(1) == 0)
    # rows with more than k keys: the k-th largest causal score sits exactly at sigmoid(0) = 0.5
    for i in range(k, T):
        row = m[0, 0, i, : i + 1]
        assert torch.isclose(row.sort(descending=True).values[k - 1], torch.tensor(0.5))
    plain = soft_gate_mask(G, Routing(mode="soft-gate", k=k, soft_mask="sigmoid", soft_temperature=2.0), causal)
    assert torch.allclose(plain[causal.expand_as(plain)], torch.sigmoid(G / 2.0)[causal.expand_as(G)])
    # renormalised reading == softmax(S + log m)
    q, kk, v = (torch.randn(2, 3, T, 8) for _ in range(3))
    r = Routing(mode="soft-gate", k=k, soft_renormalize=True)
    out = attend(q, kk, v, r, gate=GateScores(lambda: G))
    S = q @ kk.transpose(-1, -2) / math.sqrt(8)
    ref = torch.softmax((S + torch.log(soft_gate_mask(G, r, causal))).masked_fill(~causal, float("-inf")), -1) @ v
    assert torch.allclose(out, ref, atol=1e-5)
    # not renormalised: softmax(S) * m
    r = Routing(mode="soft-gate", k=k)
    out = attend(q, kk, v, r, gate=GateScores(lambda: G))
    ref = (torch.softmax(S.masked_fill(~causal, float("-inf")), -1) * soft_gate_mask(G, r, causal)) @ v
    assert torch.allclose(out, ref, atol=1e-5)


def test_topk_keep_mask_on_ties_still_keeps_k():
    scores = torch.zeros(1, 1, 10, 10)
    keep = topk_keep_mask(scores, 3, causal_mask(10, "cpu"))
    assert keep.sum(-1).flatten().tolist() == [1, 2, 3] + [3] * 7


def test_gate_modes_without_gate_fail_clearly():
    model = GPT(tiny_model_config())
    x = torch.randint(0, 97, (1, 8))
    with pytest.raises(GatelabError, match="needs a gate"):
        model(x, routing=Routing(mode="gate-topk", k=4))


@pytest.mark.parametrize("bad,match", [
    (dict(mode="sparse"), None), (dict(k=0), None), (dict(soft_mask="relu"), None), (dict(soft_temperature=0.0), None),
    (dict(mode="oracle-topk", k=33), "larger than the context"),  # token routing: k beyond the context
    (dict(mode="block-gate", block_size=0), "block_size"), (dict(mode="block-gate", block_k=0), "block_k"),
    (dict(mode="block-gate", block_size=64), "larger than the context"),  # block routing: a block beyond it
    (dict(mode="block-gate", block_size=2.5), "block_size")])
def test_bad_routing_is_rejected(bad, match):
    """Token and block routings alike: a bad setting is refused at a context of 32."""
    with pytest.raises(GatelabError, match=match):
        Routing(**bad).validate(32)


@pytest.mark.parametrize("soft_mask", ["sigmoid", "topk-sigmoid"])
def test_renormalised_soft_gate_on_a_frozen_model_trains_only_the_gate(soft_mask):
    """Gate-only task training (Table 5) under a renormalised reading: q/k/v need no gradient, the mask does. The
    explicit softmax path it takes (fused SDPA kernels fail there on CUDA) equals SDPA's forward, and the gradient
    reaches the gate and nothing else."""
    torch.manual_seed(0)
    model = GPT(tiny_model_config(gate="learned"))
    gate_ids = {id(p) for p in model.gate_parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in gate_ids)
    routing = Routing(mode="soft-gate", k=4, soft_mask=soft_mask, soft_renormalize=True)
    x = torch.randint(0, 97, (2, 32))
    _, loss = model(x, x, routing=routing)
    loss.backward()
    assert all(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in model.gate_parameters())
    assert all(p.grad is None for p in model.parameters() if id(p) not in gate_ids)
    with torch.no_grad():  # nothing needs a gradient: the SDPA path; same loss
        _, plain = model(x, x, routing=routing)
    assert torch.allclose(loss, plain, atol=1e-5), (float(loss), float(plain))


def test_random_topk_subsets_do_not_depend_on_the_sequence_length():
    """The fixed subset of (layer, head, row) is the same whatever the chunk length: a prefix of a sequence
    keeps exactly the keys the full sequence keeps in those rows (in the GPT's cache and in the HF adapter's path)."""
    from gatelab.attention.hard import hard_keep
    for layer, seed, k in ((0, 0, 4), (3, 7, 9)):
        full = RandomMaskCache().get(layer, 3, 64, k, seed=seed, device="cpu")
        for T in (5, 24, 63):
            assert torch.equal(RandomMaskCache().get(layer, 3, T, k, seed=seed, device="cpu"), full[..., :T, :T])
        hf_keep = lambda T, S: hard_keep(  # noqa: E731 - queries at the last T of S positions (a KV cache)
            torch.zeros(1, 3, T, 1), torch.zeros(1, 3, S, 1), Routing(mode="random-topk", k=k, seed=seed), None,
            allowed=causal_mask(S, "cpu")[S - T:], layer=layer, fast=False, random_masks=RandomMaskCache())
        assert torch.equal(hf_keep(64, 64), full[None])
        assert torch.equal(hf_keep(24, 24), full[None, :, :24, :24])
        assert torch.equal(hf_keep(10, 40), full[None, :, 30:40, :40])


def test_random_topk_prefix_gives_the_same_model_outputs():
    torch.manual_seed(0)
    model = GPT(tiny_model_config()).eval()
    x = torch.randint(0, 97, (2, 32))
    r = Routing(mode="random-topk", k=4, seed=3)
    with torch.no_grad():
        full, _ = model(x, routing=r)
        prefix, _ = model(x[:, :20], routing=r)
    assert torch.allclose(full[:, :20], prefix, atol=1e-5)


def test_random_topk_scores_are_exact_integer_hashes():
    """The scores come from int64 arithmetic that never overflows (the same on every device): the tensor path
    equals the same hash in Python's unbounded integers, over the whole 32-bit range."""
    from gatelab.kernels.hashing import _mix32, fixed_random_scores
    x = torch.cat([torch.randint(0, 2 ** 32, (2000,), generator=torch.Generator().manual_seed(0)),
                   torch.tensor([0, 1, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1])])
    assert _mix32(x).tolist() == [_mix32(int(v)) for v in x]
    s = fixed_random_scores(2, 4, 50, 50, seed=5)
    assert s.dtype == torch.float64 and 0 <= s.min() and s.max() < 1
    assert torch.equal(s * 2 ** 32, (s * 2 ** 32).round())  # whole multiples of 2^-32: exact, no float rounding
    assert all(len(set(row.tolist())) == 50 for row in s.reshape(-1, 50))  # no ties within a row


def test_random_topk_subsets_are_uniform():
    """Over layers and heads, every causal key of a row is kept about equally often (k / (i + 1))."""
    T, k, layers, H = 64, 8, 40, 4
    counts = sum(RandomMaskCache().get(layer, H, T, k, seed=0, device="cpu").float().sum(0) for layer in range(layers))
    row = counts[T - 1]  # H * layers draws of k keys out of T
    expected = H * layers * k / T
    assert abs(row.mean() - expected) < 1e-6
    assert row.std() < 2 * (H * layers * (k / T) * (1 - k / T)) ** 0.5  # binomial spread, not clumped
    early, late = row[: T // 2].sum(), row[T // 2:].sum()
    assert abs(early - late) < 0.15 * (early + late)


READINGS = [dict(soft_mask="sigmoid", soft_renormalize=False), dict(soft_mask="sigmoid", soft_renormalize=True),
            dict(soft_mask="topk-sigmoid", soft_renormalize=False),
            dict(soft_mask="topk-sigmoid", soft_renormalize=True)]


@pytest.mark.parametrize("reading", READINGS, ids=lambda r: f"{r['soft_mask']}-renorm{r['soft_renormalize']}")
def test_flex_soft_gate_matches_the_explicit_soft_gate(reading):
    """The compiled training step's soft gate (flex_attention, log m as a score_mod; the non-renormalised reading via
    the ratio of two log-sum-exps) computes the explicit reference's output (forward on CPU: flex_attention has no
    CPU backward; the GPU benchmark compares gradients)."""
    from gatelab.attention.soft import soft_gate_flex_attention
    from gatelab.kernels.topk import causal_kth_largest
    g = torch.Generator().manual_seed(3)
    B, H, T, D = 2, 2, 20, 8
    q, k, v = (torch.randn(B, H, T, D, generator=g) for _ in range(3))
    G = torch.randn(B, H, T, T, generator=g) * 2
    r = Routing(mode="soft-gate", k=6, soft_temperature=0.5, **reading)
    tau = causal_kth_largest(G, r.k) if r.soft_mask == "topk-sigmoid" else None
    fast = soft_gate_flex_attention(q, k, v, G, r, tau)
    ref = attend(q, k, v, r, gate=GateScores(lambda: G))
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["oracle-topk", "random-topk"])
def test_flex_hard_mask_matches_sdpa_with_the_mask(mode):
    """The keep-mask applied as a flex_attention score_mod (-inf outside it) equals SDPA with the boolean mask."""
    from gatelab.attention.flex import causal_flex_attention
    g = torch.Generator().manual_seed(4)
    B, H, T, D = 2, 2, 20, 8
    q, k, v = (torch.randn(B, H, T, D, generator=g) for _ in range(3))
    keep = topk_keep_mask(torch.randn(B if mode == "oracle-topk" else 1, H, T, T, generator=g), 5, causal_mask(T, None))
    keep4 = keep.expand(B, H, T, T)
    fast = causal_flex_attention(q, k, v, lambda s, b, h, i, j: torch.where(keep4[b, h, i, j], s, float("-inf")))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["oracle-topk", "random-topk", "stochastic", "dense"])
def test_queries_at_the_end_of_a_longer_key_sequence_see_their_causal_keys(mode):
    """attend with T queries at the last T of S keys (a KV cache) and no mask is attend with the explicit causal
    rows as the allowed keys (gate routings refuse a partial query sequence)."""
    from gatelab.kernels.topk import causal_rows
    g = torch.Generator().manual_seed(7)
    q, kk, v = torch.randn(2, 3, 4, 8, generator=g), torch.randn(2, 3, 11, 8, generator=g), torch.randn(2, 3, 11, 8)
    G = torch.randn(2, 3, 4, 11, generator=g)
    r = Routing(mode=mode, k=3)
    torch.manual_seed(0)
    plain = attend(q, kk, v, r, gate=GateScores(lambda: G))
    torch.manual_seed(0)
    explicit = attend(q, kk, v, r, gate=GateScores(lambda: G), allowed=causal_rows(4, 11, "cpu")[None, None])
    torch.testing.assert_close(plain, explicit)
