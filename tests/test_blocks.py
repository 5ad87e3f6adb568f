"""Block routing: block selection, the flex_attention path against a dense reference, block-random's
prefix consistency, gradients, post-hoc block gates on gatelab's GPT and on Hugging Face models."""
import json
import math
from dataclasses import replace

import pytest
import torch

from gatelab.attention.block_attention import block_routed_attention, block_sparse_attention
from gatelab.attention.blocks import (
    block_attention_mass, block_lists, block_random_scores, previous_block_rows, select_blocks
)
from gatelab.attention.flex import block_mask_from_scores, build_block_mask
from gatelab.attention.gates import BlockGate, pool_blocks, qk_block_scores
from gatelab.config import GatelabError, ModelConfig, Routing
from gatelab.model import GPT
from tests.conftest import tiny_model_config, tiny_train_config

# one shape for every flex call on CPU, so the compiled kernel is built once per process
B, H, HK, T, D, BS = 2, 4, 2, 64, 16, 16


def reference_attention(q, k, v, keep_blocks, block_size, allowed=None):
    """Plain softmax attention with the block selection expanded to a token mask by hand."""
    Hq, Tq = q.shape[1], q.shape[2]
    k = k.repeat_interleave(Hq // k.shape[1], dim=1)
    v = v.repeat_interleave(Hq // v.shape[1], dim=1)
    mask = torch.zeros(keep_blocks.shape[0], Hq, Tq, Tq, dtype=torch.bool)
    for i in range(Tq):
        for j in range(i + 1):
            mask[:, :, i, j] = keep_blocks[:, :, i // block_size, j // block_size]
    if allowed is not None:
        mask = mask & allowed
    S = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    A = torch.softmax(S.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
    return A @ v


def qkv(seed=0, b=B, t=T):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, H, t, D, generator=g), torch.randn(b, HK, t, D, generator=g),
            torch.randn(b, HK, t, D, generator=g))


# ------------------------------------------------------------------------------------------------------------
# selection

@pytest.mark.parametrize("k", [1, 2, 3, 7, 12])
def test_block_masks_keep_k_earlier_blocks_plus_the_diagonal(k):
    nb = 9
    scores = torch.randn(2, 3, nb, nb)
    keep = select_blocks(scores, k)
    assert keep.shape == (2, 3, nb, nb)
    assert torch.all(keep.diagonal(dim1=-2, dim2=-1)), "the diagonal block is always kept"
    assert not torch.any(keep.triu(1)), "a future block was kept"
    earlier = (keep & ~torch.eye(nb, dtype=torch.bool)).sum(-1)
    expected = torch.clamp(torch.arange(nb), max=k)  # fewer where causality leaves fewer
    assert torch.equal(earlier, expected.expand_as(earlier))
    # the kept earlier blocks are the highest-scoring ones
    for i in range(nb):
        if i > k:
            chosen = set(torch.nonzero(keep[0, 1, i, :i]).flatten().tolist())
            assert chosen == set(scores[0, 1, i, :i].topk(k).indices.tolist())


def test_block_attention_mass_is_the_pooled_dense_attention():
    q, k, _ = qkv()
    t = 56  # not a multiple of the block size: the last block is shorter
    q, k = q[:, :, :t], k[:, :, :t]
    mass = block_attention_mass(q, k, BS, chunk_elements=1)  # one query block per chunk
    kr = k.repeat_interleave(H // HK, dim=1)
    A = torch.softmax((q @ kr.transpose(-1, -2) / math.sqrt(D)).masked_fill(
        ~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf")), -1)
    nb = math.ceil(t / BS)
    expected = torch.zeros(B, H, nb, nb)
    for i in range(nb):
        for j in range(nb):
            expected[:, :, i, j] = A[:, :, i * BS:(i + 1) * BS, j * BS:(j + 1) * BS].sum(-1).mean(-1)
    assert torch.allclose(mass, expected, atol=1e-6)
    assert torch.allclose(mass.sum(-1), torch.ones(B, H, nb), atol=1e-5)


def test_block_random_is_prefix_consistent_and_seeded():
    short, long = block_random_scores(2, 3, 8, seed=0, device="cpu"), block_random_scores(2, 3, 32, 0, "cpu")
    assert torch.equal(short, long[..., :8, :8])
    assert torch.equal(select_blocks(short, 2), select_blocks(long, 2)[..., :8, :8])
    assert not torch.equal(short, block_random_scores(2, 3, 8, seed=1, device="cpu"))
    assert not torch.equal(short, block_random_scores(3, 3, 8, seed=0, device="cpu"))
    assert 0.0 <= float(long.min()) and float(long.max()) < 1.0 and abs(float(long.mean()) - 0.5) < 0.05
    # end to end: under block-random the first 32 tokens of a 64-token input get the logits of the 32 tokens alone
    torch.manual_seed(0)
    model = GPT(tiny_model_config(context=64)).eval()
    x = torch.randint(0, 97, (2, 64))
    r = Routing(mode="block-random", block_size=8, block_k=2)
    with torch.no_grad():
        full, _ = model(x, routing=r)
        prefix, _ = model(x[:, :32], routing=r)
    assert torch.allclose(full[:, :32], prefix, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# the two attention paths

def test_flex_path_and_masked_path_match_a_dense_masked_reference():
    q, k, v = qkv()
    keep = select_blocks(torch.randn(B, H, T // BS, T // BS), 2)
    ref = reference_attention(q, k, v, keep, BS)
    with torch.no_grad():
        flex = block_sparse_attention(q, k, v, keep, BS, backend="flex")
    masked = block_sparse_attention(q, k, v, keep, BS, backend="masked")
    assert torch.allclose(flex, ref, atol=1e-5), float((flex - ref).abs().max())
    assert torch.allclose(masked, ref, atol=1e-5), float((masked - ref).abs().max())
    # a selection shared by the whole batch (block-random's (1, H, nb, nb)) broadcasts on both paths
    shared = select_blocks(torch.rand(1, H, T // BS, T // BS), 1)
    with torch.no_grad():
        flex = block_sparse_attention(q, k, v, shared, BS, backend="flex")
    assert torch.allclose(flex, reference_attention(q, k, v, shared.expand(B, -1, -1, -1), BS), atol=1e-5)
    assert torch.allclose(block_sparse_attention(q, k, v, shared, BS, backend="masked"), flex, atol=1e-5)
    # auto is the masked path on CPU (flex_attention has no backward there)
    assert torch.equal(block_sparse_attention(q, k, v, keep, BS), masked)


def test_block_mask_lists_the_chosen_blocks_as_full_and_only_the_diagonal_as_partial():
    keep = select_blocks(torch.randn(B, H, T // BS, T // BS), 2)
    bm = build_block_mask(keep, BS, T)
    nb = T // BS
    assert torch.equal(bm.kv_num_blocks, torch.ones(B, H, nb, dtype=torch.int32))
    assert torch.equal(bm.kv_indices[..., 0], torch.arange(nb, dtype=torch.int32).expand(B, H, nb))
    assert torch.equal(bm.full_kv_num_blocks, torch.clamp(torch.arange(nb), max=2).to(torch.int32).expand(B, H, nb))
    assert torch.equal(bm.to_dense().bool(), keep)
    with pytest.raises(GatelabError, match="multiple of block_size"):
        build_block_mask(keep[..., :3, :3], BS, 40)


def test_masked_path_handles_short_last_blocks_and_the_models_own_mask():
    q, k, v = qkv(1)
    t = 50
    q, k, v = q[:, :, :t], k[:, :, :t], v[:, :, :t]
    keep = select_blocks(torch.randn(B, H, 4, 4), 1)
    allowed = torch.ones(B, 1, t, t, dtype=torch.bool)
    allowed[1, :, :, :5] = False  # left padding of the second sequence
    out = block_sparse_attention(q, k, v, keep, BS, allowed=allowed)
    assert torch.allclose(out, reference_attention(q, k, v, keep, BS, allowed), atol=1e-5)
    with pytest.raises(GatelabError, match="multiple of block_size"):
        block_sparse_attention(q, k, v, keep, BS, backend="flex")
    with pytest.raises(GatelabError, match="causal"):
        block_sparse_attention(q[:, :, :48], k[:, :, :48], v[:, :, :48], keep[..., :3, :3], BS,
                               allowed=allowed[..., :48, :48], backend="flex")


@pytest.mark.parametrize("k", [0, 1, 2, 3, 5])
def test_block_mask_from_scores_is_the_selection_and_flex_on_it_matches_the_reference(k):
    """The BlockMask a routing builds straight from top-k indices lists exactly select_blocks' blocks (the
    diagonal partial, the rest full), with or without the backward pass's query-side lists, and compiled flex
    over it (causal mask_mod only) gives the dense masked reference."""
    nb = T // BS
    scores = previous_block_rows(torch.randn(B, H, nb, nb))
    keep = select_blocks(scores, k)
    bm = block_mask_from_scores(scores, k, BS, T)
    assert torch.equal(bm.to_dense().bool(), keep)
    assert torch.equal(bm.full_kv_num_blocks, torch.arange(nb).clamp(max=min(k, nb - 1)).to(torch.int32).expand(
        B, H, nb))
    assert torch.equal(bm.kv_num_blocks, torch.ones(B, H, nb, dtype=torch.int32))
    assert block_mask_from_scores(scores, k, BS, T, backward=False).q_indices is None
    assert bm.q_indices is not None
    q, k_, v = qkv(5)
    with torch.no_grad():
        out = block_routed_attention(q, k_, v, Routing(mode="block-oracle", block_size=BS, block_k=max(k, 1)),
                                     backend="flex")
        oracle = select_blocks(previous_block_rows(block_attention_mass(q, k_, BS)), max(k, 1))
        assert torch.allclose(out, reference_attention(q, k_, v, oracle, BS), atol=1e-5)
        # the keep-mask form with either mask_mod: the same blocks
        for mod in ("causal", "selection"):
            assert torch.equal(build_block_mask(keep, BS, T, mask_mod=mod).to_dense().bool(), keep)


@pytest.mark.parametrize("pool", ["mean", "max-min"])
def test_compiled_inference_selection_equals_the_eager_one(pool):
    """The inference path compiles a qk gate's scores and the block lists on CUDA (Backend.compile_blocks); compiled here
    on CPU, both give exactly the eager results, for every block_k including 0 and one above the earlier blocks."""
    torch.manual_seed(11)
    gate = BlockGate(32, H, 8, pool=pool, reads="qk", head_dim=D)
    q, k_, _ = qkv(4)
    with torch.no_grad():
        eager = qk_block_scores(q, k_, gate.wq, gate.wk, BS, pool)
        assert torch.equal(eager, gate(None, BS, q=q, k=k_))
        compiled = torch.compile(qk_block_scores, dynamic=False)(q, k_, gate.wq, gate.wk, BS, pool)
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    scores = previous_block_rows(torch.randn(B, H, T // BS, T // BS))
    lists = torch.compile(block_lists, dynamic=False)
    for k in (0, 1, 2, 7):
        for got, want in zip(lists(scores, k), block_lists(scores, k)):
            assert got.dtype == want.dtype and torch.equal(got, want), k


def test_every_block_mode_routes_through_its_scores():
    q, k, v = qkv(2)
    x = torch.randn(B, T, 32)
    gate = BlockGate(32, H, 8)
    nb = T // BS
    # gate and oracle rank query block i's earlier blocks by the previous block's row (causal); random by its own
    for mode, scores in (("block-oracle", previous_block_rows(block_attention_mass(q, k, BS))),
                         ("block-gate", previous_block_rows(gate(x, BS))),
                         ("block-random", block_random_scores(3, H, nb, 0, "cpu"))):
        r = Routing(mode=mode, block_size=BS, block_k=1)
        out = block_routed_attention(q, k, v, r, gate_scores=lambda: gate(x, BS), layer=3)
        expected = reference_attention(q, k, v, select_blocks(scores, 1).expand(B, -1, -1, -1), BS)
        assert torch.allclose(out, expected, atol=1e-5), mode
    everything = Routing(mode="block-oracle", block_size=BS, block_k=nb)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                             is_causal=True)
    assert torch.allclose(block_routed_attention(q, k, v, everything), dense, atol=1e-5)
    with pytest.raises(GatelabError, match="needs a block gate"):
        block_routed_attention(q, k, v, Routing(mode="block-gate", block_size=BS))


def test_soft_block_gate_readings():
    q, k, v = qkv(3)
    G = torch.randn(B, H, T // BS, T // BS)
    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    S = q @ kr.transpose(-1, -2) / math.sqrt(D)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for renorm in (False, True):
        r = Routing(mode="block-soft", block_size=BS, block_k=1, soft_mask="topk-sigmoid", soft_renormalize=renorm)
        out = block_routed_attention(q, k, v, r, gate_scores=lambda: G)
        # by hand: m = sigmoid(P - tau) over earlier blocks, P[i] = G[i - 1] (the previous block's row: causal),
        # tau the row's best earlier score; diagonal m = 1
        m = torch.zeros(B, H, T // BS, T // BS)
        for i in range(T // BS):
            m[..., i, i] = 1.0
            if i == 1:
                m[..., i, 0] = 1.0  # one earlier block, k = 1: kept whole
            elif i > 1:
                row = G[..., i - 1, :i]
                tau = row.max(-1, keepdim=True).values
                m[..., i, :i] = torch.sigmoid(row - tau)
        mt = m.repeat_interleave(BS, -1).repeat_interleave(BS, -2) * causal
        if renorm:
            ref = torch.softmax(S + torch.log(mt), -1) @ vr
        else:
            ref = (torch.softmax(S.masked_fill(~causal, float("-inf")), -1) * mt) @ vr
        assert torch.allclose(out, ref, atol=1e-5), renorm


# ------------------------------------------------------------------------------------------------------------
# the GPT: gradients, pooling, config

def _block_gate_grads(routing, pool="mean"):
    torch.manual_seed(0)
    model = GPT(tiny_model_config(block_gate="learned", block_pool=pool))
    x = torch.randint(0, 97, (2, 32))
    _, loss = model(x, x, routing=routing)
    params = model.gate_parameters()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


@pytest.mark.parametrize("pool", ["mean", "max-min"])
def test_gradient_reaches_the_soft_block_gate_and_is_exactly_zero_for_the_hard_one(pool):
    hard = _block_gate_grads(Routing(mode="block-gate", block_size=8, block_k=1), pool)
    assert hard and all(torch.count_nonzero(g) == 0 for g in hard)
    for reading in (dict(), dict(soft_renormalize=True), dict(soft_mask="sigmoid", soft_renormalize=True)):
        soft = _block_gate_grads(Routing(mode="block-soft", block_size=8, block_k=1, **reading), pool)
        assert all(torch.count_nonzero(g) > 0 for g in soft), reading


def test_block_gate_pooling():
    x = torch.randn(2, 20, 6)
    assert torch.allclose(pool_blocks(x, 8, "mean")[:, 2], x[:, 16:].mean(1))
    assert torch.equal(pool_blocks(x, 8, "max")[:, 1], x[:, 8:16].amax(1))
    assert torch.equal(pool_blocks(x, 8, "min")[:, 2], x[:, 16:].amin(1))
    torch.manual_seed(0)
    mean, maxmin = BlockGate(6, 2, 4, "mean"), BlockGate(6, 2, 4, "max-min")
    assert mean.wk.shape == (2, 6, 4) and maxmin.wk.shape == (2, 12, 4)
    assert mean(x, 8).shape == maxmin(x, 8).shape == (2, 2, 3, 3)
    with pytest.raises(GatelabError, match="pooling"):
        BlockGate(6, 2, 4, "median")


def test_block_config_validation_and_labels(token_corpus):
    with pytest.raises(GatelabError, match="block_pool"):
        ModelConfig(block_pool="avg").validate()
    with pytest.raises(GatelabError, match="block_gate"):
        ModelConfig(block_gate="yes").validate()
    with pytest.raises(GatelabError, match="needs a block gate"):
        tiny_train_config(token_corpus, routing=Routing(mode="block-soft", block_size=8)).validate()
    assert Routing(mode="block-gate", block_size=128, block_k=8).label() == "block-gate@b=128,k=8"
    assert Routing(mode="block-soft", block_size=8, block_k=2, soft_mask="topk-sigmoid", soft_renormalize=True).label() == \
        "block-soft[topk-sigmoid,t=1,renorm]@b=8,k=2"
    model = GPT(tiny_model_config())
    with pytest.raises(GatelabError, match="needs a block gate"):
        model(torch.randint(0, 97, (1, 16)), routing=Routing(mode="block-gate", block_size=8, block_k=1))


def test_older_run_configs_are_still_the_same_run(token_corpus):
    """Fields added since a run was written (model.block_gate, routing.block_size...) count at their defaults."""
    from gatelab.config import same_run, to_dict
    new = to_dict(tiny_train_config(token_corpus))
    old = json.loads(json.dumps(new))
    for key in ("block_gate", "block_pool"):
        del old["model"][key]
    for key in ("block_size", "block_k"):
        del old["routing"][key]
    assert same_run(old, new) and same_run(new, old)
    old["routing"]["k"] = 3
    assert not same_run(old, new)


def test_post_hoc_block_gate_on_the_gpt_trains_exports_and_reloads(tmp_path, token_corpus):
    from gatelab.cli.main import main
    from gatelab.training.checkpoint import load_model
    from gatelab.training.distill import distill_config
    from gatelab.training.gate_files import attach_gate
    from gatelab.training.train import train
    base_cfg = tiny_train_config(token_corpus, steps=4)
    train(base_cfg, tmp_path / "dense", progress=False)
    block = Routing(mode="block-gate", block_size=8, block_k=1)
    cfg = distill_config(tmp_path / "dense" / "checkpoint", "kl", d_gate=8, steps=20, batch_size=4, lr=1e-2,
                         block=block, block_pool="max-min", overrides=dict(device="cpu", log_every=1))
    assert cfg.model.block_gate == "learned" and cfg.model.gate == "none" and cfg.routing == block
    train(cfg, tmp_path / "gate", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "gate" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 20 and all("f1" in r for r in rows)
    assert sum(r["loss"] for r in rows[-5:]) < sum(r["loss"] for r in rows[:5])
    meta = json.loads((tmp_path / "gate" / "gate.json").read_text())
    assert meta["format"] == "gatelab-block-gate-v1" and meta["block_pool"] == "max-min" and meta["block_size"] == 8
    # the base weights did not move; the exported gate reproduces the distilled model's block-gate outputs
    trained, _ = load_model(tmp_path / "gate" / "checkpoint")
    base, _ = load_model(tmp_path / "dense" / "checkpoint")
    x = torch.randint(0, 97, (2, 32))
    with torch.no_grad():
        dense_before, _ = base(x)
        attach_gate(base, tmp_path / "gate", tmp_path / "dense" / "checkpoint")
        assert torch.equal(base(x)[0], dense_before)
        assert torch.equal(base(x, routing=block)[0], trained(x, routing=block)[0])
    assert main(["eval", str(tmp_path / "dense" / "checkpoint"), "--gate", str(tmp_path / "gate"), "--routing",
                 "dense,block-gate,block-oracle,block-random", "--block-k", "1,2", "--max-tokens", "256",
                 "--device", "cpu", "--quiet", "--json", str(tmp_path / "eval.json")]) == 0
    labels = [r["label"] for r in json.loads((tmp_path / "eval.json").read_text())["results"]]
    assert labels == ["dense", "block-gate@b=8,k=1", "block-gate@b=8,k=2", "block-oracle@b=8,k=1",
                      "block-oracle@b=8,k=2", "block-random@b=8,k=1", "block-random@b=8,k=2"]
    assert main(["eval", str(tmp_path / "dense" / "checkpoint"), "--routing", "block-gate", "--device", "cpu",
                 "--quiet"]) == 2  # no block gate: a clear one-line error


# ------------------------------------------------------------------------------------------------------------
# Hugging Face models

def _tiny_llama(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=H, num_key_value_heads=HK, max_position_embeddings=128)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_hf_dense_routing_runs_through_sdpa_and_matches_the_unpatched_model_with_padding():
    from gatelab.hf.adapter import attach_gates
    model = _tiny_llama()
    ids = torch.randint(0, 101, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :7] = 0
    with torch.no_grad():
        reference = model(ids, attention_mask=mask).logits
        ctl = attach_gates(model, gate="none")
        with ctl.routing(Routing()):
            out = model(ids, attention_mask=mask, output_attentions=True)
    assert torch.allclose(out.logits[0], reference[0], atol=1e-5)
    assert torch.allclose(out.logits[1, 7:], reference[1, 7:], atol=1e-5)
    assert all(a is None for a in out.attentions), "dense routing no longer materialises attention weights"


def test_hf_block_routings_flex_equals_masked_and_all_blocks_equal_dense():
    from gatelab.hf.adapter import attach_block_gates
    model = _tiny_llama()
    ids = torch.randint(0, 101, (B, T))
    with torch.no_grad():
        dense = model(ids).logits
        ctl = attach_block_gates(model, d_gate=8, gate="random", block_size=BS)
        for mode in ("block-oracle", "block-gate", "block-random"):
            r = Routing(mode=mode, block_size=BS, block_k=1)
            outs = {}
            for backend in ("masked", "flex"):
                ctl.backend = replace(ctl.backend, block_attention=backend)
                with ctl.routing(r):
                    outs[backend] = model(ids, use_cache=False).logits
            assert torch.allclose(outs["flex"], outs["masked"], atol=1e-5), mode
            assert not torch.allclose(outs["masked"], dense, atol=1e-3), mode
        ctl.backend = replace(ctl.backend, block_attention="auto")
        with ctl.routing(Routing(mode="block-oracle", block_size=BS, block_k=T // BS)):
            assert torch.allclose(model(ids, use_cache=False).logits, dense, atol=1e-5)
        with pytest.raises(GatelabError, match="token gates"), ctl.routing(Routing(mode="gate-topk", k=4)):
            model(ids, use_cache=False)


def test_hf_block_routing_never_reads_padding_keys():
    from gatelab.hf.adapter import attach_block_gates
    model = _tiny_llama()
    ctl = attach_block_gates(model, d_gate=8, block_size=BS)
    ids = torch.randint(0, 101, (B, T))
    other = ids.clone()
    other[1, :9] = (other[1, :9] + 1) % 101  # change only the padded tokens
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :9] = 0
    for mode in ("block-oracle", "block-random", "block-soft"):
        with torch.no_grad(), ctl.routing(Routing(mode=mode, block_size=BS, block_k=2)):
            a = model(ids, attention_mask=mask, use_cache=False).logits
            b = model(other, attention_mask=mask, use_cache=False).logits
        assert torch.allclose(a[1, 9:], b[1, 9:], atol=1e-5), mode


@pytest.mark.parametrize("position", ["none", "qk"])
def test_hf_block_gates_distil_save_and_reload(tmp_path, position):
    from gatelab.hf.adapter import attach_block_gates, set_trainable
    from gatelab.hf.distill import captured_gate_objective, train_gates
    from gatelab.hf.gate_files import load_gates, save_gates
    model = _tiny_llama()
    # the tiny model's pooled queries and keys are small, so a qk gate at init 0.5 already scores blocks almost
    # uniformly, about as close to its near-uniform attention mass as it can get: start it far off instead
    attach_block_gates(model, d_gate=8, gate="learned", pool="max-min", block_size=BS, seed=2,
                       init_std=0.5 if position == "none" else 4.0, position=position)
    assert all(g.reads == ("qk" if position == "qk" else "x") for g in model.gatelab.gates)
    set_trainable(model, layers=[])
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("gatelab")}
    ids = torch.randint(0, 101, (3000,), generator=torch.Generator().manual_seed(0)).tolist()
    held_out = torch.randint(0, 101, (4, T), generator=torch.Generator().manual_seed(1))
    kl_before = float(captured_gate_objective(model, held_out, "kl", 1)[0].detach())
    train_gates(model, ids, tmp_path / "g", loss="kl", k=1, steps=25, batch_size=2, context=T, lr=5e-2,
                progress=False)
    rows = [json.loads(line) for line in (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 25 and all(0.0 <= r["f1"] <= 1.0 for r in rows)
    kl_after = float(captured_gate_objective(model, held_out, "kl", 1)[0].detach())
    assert kl_after < 0.95 * kl_before, (kl_before, kl_after)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    meta = json.loads((tmp_path / "g" / "gate.json").read_text())
    assert (meta["gate_type"], meta["block_pool"], meta["block_size"], meta["block_k"]) == ("block", "max-min", BS, 1)
    assert "k" not in meta and json.loads((tmp_path / "g" / "done.json").read_text())["block_k"] == 1
    assert meta["position"] == position
    x = torch.randint(0, 101, (1, T))
    r = Routing(mode="block-gate", block_size=BS, block_k=1)
    with torch.no_grad(), model.gatelab.routing(r):
        before = model(x, use_cache=False).logits
    fresh = _tiny_llama()
    ctl = load_gates(fresh, tmp_path / "g")
    assert ctl.gate_type == "block" and all(g.is_block_gate for g in ctl.gates)
    with torch.no_grad(), ctl.routing(r):
        assert torch.equal(fresh(x, use_cache=False).logits, before)
    with pytest.raises(GatelabError, match="other weights"):
        load_gates(_tiny_llama(seed=1), tmp_path / "g")
    with pytest.raises(GatelabError, match="cannot be loaded as"):
        load_gates(_tiny_llama(), tmp_path / "g", position="none" if position == "qk" else "qk")
    save_gates(fresh, tmp_path / "again")
    again = json.loads((tmp_path / "again" / "gate.json").read_text())
    assert (again["gate_type"], again["position"]) == ("block", position)


def test_block_gate_reading_qk_pools_the_attention_queries_and_keys():
    """reads="qk": G[h] = (mean-pooled q[h] W_gq[h]) (pooled k[h // group] W_gk[h])^T / sqrt(d_gate), x ignored;
    the padding a valid mask excludes is not pooled; a gate reading qk refuses to run without q and k."""
    torch.manual_seed(0)
    Bq, H, Hk, Tq, D, bs = 2, 4, 2, 12, 8, 4
    gate = BlockGate(16, H, 6, "mean", reads="qk", head_dim=D)
    q, k = torch.randn(Bq, H, Tq, D), torch.randn(Bq, Hk, Tq, D)
    x = torch.randn(Bq, Tq, 16)
    G = gate(x, bs, q=q, k=k)
    pq = q.view(Bq, H, Tq // bs, bs, D).mean(3)
    pk = k.repeat_interleave(H // Hk, dim=1).view(Bq, H, Tq // bs, bs, D).mean(3)
    want = torch.einsum("bhnc,hcd->bhnd", pq, gate.wq) @ torch.einsum("bhnc,hcd->bhnd", pk, gate.wk).transpose(-1, -2)
    torch.testing.assert_close(G, want / 6 ** 0.5)
    assert torch.equal(G, gate(torch.zeros_like(x), bs, q=q, k=k)), "x is not read"
    valid = torch.ones(1, Tq, dtype=torch.bool)
    valid[0, :2] = False
    q2, k2 = q.clone(), k.clone()
    q2[..., :2, :] += 5.0
    k2[..., :2, :] -= 5.0
    assert torch.equal(gate(x, bs, valid, q=q, k=k), gate(x, bs, valid, q=q2, k=k2))
    with pytest.raises(GatelabError, match="queries and keys"):
        gate(x, bs)
    with pytest.raises(GatelabError, match="head_dim"):
        BlockGate(16, H, 6, reads="qk")


def test_block_gate_saved_as_rope_before_variants_loads_as_none(tmp_path):
    """Block gates saved before block gates had variants recorded position "rope" (the token gates' default)
    though they read X; reading them gives "none", what they are."""
    from gatelab.hf.adapter import attach_block_gates
    from gatelab.hf.gate_files import load_gates, read_gate_meta, save_gates
    model = _tiny_llama()
    attach_block_gates(model, d_gate=8, gate="random", block_size=BS, position="none")
    save_gates(model, tmp_path / "g")
    meta = json.loads((tmp_path / "g" / "gate.json").read_text())
    assert meta["position"] == "none"
    meta["position"] = "rope"
    (tmp_path / "g" / "gate.json").write_text(json.dumps(meta))
    assert read_gate_meta(tmp_path / "g")["position"] == "none"
    ctl = load_gates(_tiny_llama(), tmp_path / "g", position="none")
    assert all(g.reads == "x" for g in ctl.gates)


def _local_hf_model(folder):
    """A tiny Llama and a word-level tokenizer saved as a local Hugging Face folder, and a text corpus of 120
    documents of 150 words for it."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = [f"w{i}" for i in range(99)]
    vocab = {"[UNK]": 0, "</s>": 100, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>")
    fast.save_pretrained(folder / "model")
    _tiny_llama().save_pretrained(folder / "model")
    rng = torch.Generator().manual_seed(0)
    (folder / "docs").mkdir()
    for d in range(120):
        idx = torch.randint(0, 99, (150,), generator=rng).tolist()
        (folder / "docs" / f"{d:03d}.txt").write_text(" ".join(words[i] for i in idx))
    return folder / "model", folder / "docs"


def test_hf_cli_distils_a_block_gate_and_evaluates_it_on_long_documents(tmp_path):
    from gatelab.cli.main import main
    from gatelab.hf.adapter import DEFAULT_BLOCK_POSITION
    model_dir, docs = _local_hf_model(tmp_path)
    common = ["--model", str(model_dir), "--corpus", "text", "--source", str(docs), "--context", str(T),
              "--device", "cpu", "--quiet"]
    assert main(["hf-distill", *common, "--block-size", str(BS), "--block-k", "1", "--steps", "3", "--batch-size",
                 "2", "--long-docs", "--out", str(tmp_path / "gates")]) == 0
    meta = json.loads((tmp_path / "gates" / "gate.json").read_text())
    assert (meta["block_size"], meta["position"]) == (BS, DEFAULT_BLOCK_POSITION)
    assert main(["hf-distill", *common, "--block-size", str(BS), "--position", "rope", "--steps", "1",
                 "--out", str(tmp_path / "rope")]) == 2  # block gates read X (none) or the model's q/k (qk)
    out = tmp_path / "eval.json"
    assert main(["hf-eval", *common, "--gate", str(tmp_path / "gates"), "--routing", "dense,block-gate,block-oracle",
                 "--block-k", "1,2", "--split", "test", "--long-docs", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["label"] for r in res["results"]] == ["dense", f"block-gate@b={BS},k=1", f"block-gate@b={BS},k=2",
                                                    f"block-oracle@b={BS},k=1", f"block-oracle@b={BS},k=2"]
    assert res["long_docs"] and all(r["tokens"] == 2 * T for r in res["results"])  # one 150-word document
    assert main(["hf-distill", *common, "--block-size", str(BS), "--loss", "task", "--steps", "1",
                 "--out", str(tmp_path / "bad")]) == 2


@pytest.mark.parametrize("mode", ["block-random", "block-soft", "block-gate", "block-oracle"])
def test_block_selection_is_causal(mode):
    """A token never moves the outputs of earlier tokens of its own query block (it did, by 0.003-0.34, when each
    query block was ranked by its own pooled row); block-random's fixed selection cannot see later tokens."""
    from gatelab.diagnostics.causality import future_token_influence
    assert future_token_influence(mode) == 0.0
    if mode == "block-soft":
        for reading in ("sigmoid-renorm", "topk-sigmoid", "topk-sigmoid-renorm"):
            assert future_token_influence(mode, reading) == 0.0


@pytest.mark.parametrize("pool", ["mean", "max-min"])
def test_whole_block_pooling_reads_strided_inputs_like_the_masked_path(pool):
    """Whole blocks with every token valid are pooled through a view (heads transposed, keys on their own heads, then
    repeated): the same pooled values and qk gate factors as the padded, masked path it skips."""
    from gatelab.attention.gates import _qk_projections, pool_blocks
    torch.manual_seed(0)
    B, H, Hk, T, D, bs = 2, 4, 2, 24, 8, 4
    q = torch.randn(B, T, H, D).transpose(1, 2)  # strided, as a model's projected queries are
    k = torch.randn(B, T, Hk, D).transpose(1, 2)
    wq, wk = torch.randn(H, D, 5), torch.randn(H, 2 * D if pool == "max-min" else D, 5)
    every = torch.ones(1, T, dtype=torch.bool)
    for how in ("mean", "max", "min"):
        x = q.reshape(B * H, T, D)
        torch.testing.assert_close(pool_blocks(x, bs, how), pool_blocks(x, bs, how, every), rtol=0, atol=1e-6)
    fast = _qk_projections(q, k, wq, wk, bs, pool, None)
    masked = _qk_projections(q, k, wq, wk, bs, pool, every)
    for a, b in zip(fast, masked):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
