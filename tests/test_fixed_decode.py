"""Decoding over a cache of fixed size with the position on the device (attention/fixed_decode.py, hf/graphed.py):
the steps a CUDA graph replays, run eagerly on CPU. They give the tokens of decoding with the growing cache: dense
greedy for dense, and for a block-gate routing the same kept blocks (so the same tokens and logits) as the
whole-sequence pass over the decoded tokens."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from gatelab.attention.fixed_decode import (  # noqa: E402
    FixedBlockLayer, FixedDecode, block_fixed_prefill, dense_fixed_step, select_kept
)
from gatelab.attention.blocks import block_lists, previous_block_rows  # noqa: E402
from gatelab.config import GatelabError, Routing  # noqa: E402
from gatelab.hf.adapter import attach_block_gates  # noqa: E402
from gatelab.hf.generate import greedy  # noqa: E402
from gatelab.hf.graphed import GRAPH_WARM_STEPS, fixed_greedy, steady_window  # noqa: E402

from .test_hf import tiny  # noqa: E402

BS = 4


def prompt(T: int, B: int = 1, seed: int = 3) -> torch.Tensor:
    return torch.randint(1, 101, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("position", ["qk", "none"])
@pytest.mark.parametrize("T", [8, 10])  # a prompt of whole blocks (the first step starts a block), and not
def test_fixed_cache_decodes_as_the_growing_cache_does(position, T):
    model = tiny("llama", seed=1)
    ctl = attach_block_gates(model, d_gate=8, gate="random", block_size=BS, position=position)
    ids = prompt(T, B=2)
    for routing in (Routing(), Routing(mode="block-gate", block_size=BS, block_k=1),
                    Routing(mode="block-gate", block_size=BS, block_k=64)):
        assert torch.equal(fixed_greedy(model, ids, routing, 15), greedy(model, ids, routing, 15)), routing.label()
    assert ctl.fixed is None  # cleared after decoding


def test_block_gate_steps_keep_the_blocks_of_the_whole_sequence_pass():
    """Teacher forcing the decoded tokens through one cache-free forward under the same routing gives them back as
    its greedy choices: each step read the blocks the whole-sequence selection keeps."""
    model = tiny("qwen3", seed=2)
    ctl = attach_block_gates(model, d_gate=8, gate="random", block_size=BS, position="qk")
    r = Routing(mode="block-gate", block_size=BS, block_k=1)
    ids = prompt(9, seed=5)
    new = fixed_greedy(model, ids, r, 16)
    seq = torch.cat([ids, new], 1)
    with torch.no_grad(), ctl.routing(r):
        whole = model(seq[:, :-1], use_cache=False).logits
    assert torch.equal(whole[0, 8:].argmax(-1), new[0])
    assert not torch.equal(new, fixed_greedy(model, ids, Routing(), 16)), "block_k=1 should change something"


def test_dense_fixed_step_ignores_the_cache_past_the_position():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 1, 8), torch.randn(2, 2, 12, 8), torch.randn(2, 2, 12, 8)
    fixed = FixedDecode(torch.zeros(1, dtype=torch.long), 12)
    fixed.set_position(6)
    out = dense_fixed_step(q, k, v, fixed.valid)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 7:], v2[:, :, 7:] = 1e4, -1e4
    assert torch.equal(dense_fixed_step(q, k2, v2, fixed.valid), out)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k[:, :, :7].repeat_interleave(3, 1),
                                                           v[:, :, :7].repeat_interleave(3, 1))
    torch.testing.assert_close(out, ref)


def test_the_per_step_values_follow_the_position():
    """valid and offset, computed once per step for every layer, are those of the current position after each move."""
    fixed = FixedDecode(torch.zeros(1, dtype=torch.long), 10, 4)
    fixed.set_position(5)
    for p in range(5, 10):
        assert fixed.valid.tolist() == [i <= p for i in range(10)] and int(fixed.offset) == p % 4
        fixed.advance()
    assert int(fixed.position) == 10


def test_block_prefill_refuses_a_state_counting_other_blocks():
    from gatelab.attention.gates import BlockGate
    gate = BlockGate(16, 2, 4, reads="qk", head_dim=8)
    q, k = torch.randn(1, 2, 8, 8), torch.randn(1, 1, 8, 8)
    with pytest.raises(GatelabError, match="blocks of 1 positions"):
        block_fixed_prefill(FixedDecode(torch.zeros(1, dtype=torch.long), 16), 0, gate,
                            Routing(mode="block-gate", block_size=4, block_k=1), q, k, None)


def test_select_kept_is_the_whole_sequence_rule_with_ties_to_the_lower_block():
    """The kept list of query block i from factors equals block_lists' row i (previous block's row, stable
    descending ranking), ties included; rows with fewer earlier blocks than block_k pad with -1."""
    torch.manual_seed(0)
    B, H, nb, dg, block_k = 2, 3, 7, 4, 3
    gq = torch.randint(-2, 3, (B, H, nb, dg)).float()  # small integers: many tied scores
    gk = torch.randint(-2, 3, (B, H, nb, dg)).float()
    _, _, full_num, full_idx = block_lists(previous_block_rows(gq @ gk.transpose(-1, -2)), block_k)
    for i in range(nb):
        layer = FixedBlockLayer(torch.zeros(1), gk.clone(), torch.zeros(B, H, block_k + 1, dtype=torch.int32))
        layer.gk[:, :, i:] = 99.0  # blocks not complete yet must not count
        select_kept(layer, gq[:, :, i - 1] if i else torch.zeros(B, H, dg), torch.tensor([i]), block_k)
        n = min(i, block_k)
        assert torch.equal(layer.kept[..., :n], full_idx[:, :, i, :n]), i
        assert (layer.kept[..., n:block_k] == -1).all() and (layer.kept[..., -1] == i).all()
        assert int(full_num[0, 0, i]) == n


def test_prefill_sets_up_the_first_steps_block():
    """After a prompt of 10 positions (blocks of 4): the complete blocks' key factors, the ring holding block 2's
    two queries, and block 2's kept list; after 8 positions the ring holds block 1 (the first step starts block 2)."""
    torch.manual_seed(0)
    from gatelab.attention.gates import BlockGate
    gate = BlockGate(16, 2, 4, reads="qk", head_dim=8)
    r = Routing(mode="block-gate", block_size=4, block_k=1)
    for P in (10, 8):
        q, k = torch.randn(1, 2, P, 8), torch.randn(1, 1, P, 8)
        fixed = FixedDecode(torch.zeros(1, dtype=torch.long), 16, 4)
        block_fixed_prefill(fixed, 0, gate, r, q, k, None)
        layer = fixed.layers[0]
        gq, gk = gate.factors(None, 4, None, q=q[:, :, :8], k=k[:, :, :8])
        torch.testing.assert_close(layer.gk[:, :, :2], gk.float())
        assert (layer.gk[:, :, 2:] == 0).all() and layer.gk.shape[2] == 4
        start = 8 if P == 10 else 4
        assert torch.equal(layer.ring[:, :, :P - start], q[:, :, start:])
        best = int((gk[0, :, :2].float() @ gq[0, :, 1].float()[:, :, None]).squeeze(-1).argmax(-1)[0])
        assert layer.kept[0, 0].tolist() == [best, 2]


def test_fixed_decoding_refuses_other_routings_and_sliding_windows():
    model = tiny("llama")
    attach_block_gates(model, d_gate=8, gate="random", block_size=BS)
    with pytest.raises(GatelabError, match="dense and block-gate"):
        fixed_greedy(model, prompt(8), Routing(mode="block-random", block_size=BS, block_k=1), 4)
    with pytest.raises(GatelabError, match="CUDA device"):
        fixed_greedy(model, prompt(8), Routing(), 4, graphs=True)
    gemma = tiny("gemma3")
    attach_block_gates(gemma, d_gate=8, gate="random", block_size=BS)
    with pytest.raises(GatelabError, match="sliding-window"):
        fixed_greedy(gemma, prompt(8), Routing(), 4)


def test_compiled_steps_decode_the_eager_steps_tokens(monkeypatch):
    """The steps through torch.compile (one graph, no graph break; steps that start a query block run uncompiled)
    give the eager steps' tokens.
    Compiled here with the aot_eager backend (tracing and functionalization, no code generation, which takes half a
    minute on CPU); the CUDA tests compile with inductor."""
    import functools

    import gatelab.attention.compiled as compiled
    from torch._dynamo.utils import counters
    monkeypatch.setattr(compiled, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    model = tiny("llama", seed=1)
    attach_block_gates(model, d_gate=8, gate="random", block_size=BS, position="qk")
    r = Routing(mode="block-gate", block_size=BS, block_k=1)
    ids = prompt(7)
    counters.clear()
    assert torch.equal(fixed_greedy(model, ids, r, 8, compiled=True), fixed_greedy(model, ids, r, 8))
    assert not counters["graph_break"]


def test_steady_window_is_whole_blocks_after_every_recording():
    """Dense from the step after its recording; block from the step after the second step that starts a query block
    (the one recorded), over whole blocks, for prompts ending on and inside a block; None when the decoding ends
    before such a window."""
    block = Routing(mode="block-gate", block_size=16, block_k=2)
    assert steady_window(256, 40, Routing()) == (GRAPH_WARM_STEPS, 40)
    assert steady_window(256, 40, block) == (17, 33)  # block-starting steps 0 (warm-up), 16 (recorded), 32
    assert steady_window(250, 60, block) == (23, 55)  # they are steps 6, 22, 38, 54: two whole blocks from 23
    assert steady_window(250, 38, block) is None and steady_window(256, GRAPH_WARM_STEPS, Routing()) is None


@pytest.mark.parametrize("routing", [Routing(), Routing(mode="block-gate", block_size=BS, block_k=1)],
                         ids=["dense", "block"])
def test_fixed_greedy_reports_the_steady_windows_time_and_the_same_tokens(routing):
    model = tiny("llama", seed=2)
    attach_block_gates(model, d_gate=8, gate="random", block_size=BS, position="qk")
    ids = prompt(9)
    t: dict = {}
    new = fixed_greedy(model, ids, routing, 20, timings=t)
    assert torch.equal(new, fixed_greedy(model, ids, routing, 20))
    window = steady_window(9, 19, routing)
    assert t["window"] == list(window) and t["steady_steps"] == window[1] - window[0] > 0
    assert all(t[k] > 0 for k in ("prefill_s", "warm_s", "steady_s"))
    short: dict = {}
    fixed_greedy(model, ids, routing, 3, timings=short)  # ends before any steady window
    assert short["steady_steps"] == 0 and short["warm_s"] > 0
