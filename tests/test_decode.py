"""Generation with block routing and a KV cache: each new token reads only its query block's kept key blocks.
Greedy decoding with every block kept is dense greedy decoding, token for token; with fewer blocks, decoding keeps
exactly the blocks (and gives the logits) of a whole-sequence forward pass over the same tokens."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from gatelab.config import Routing  # noqa: E402
from gatelab.hf.adapter import attach_block_gates  # noqa: E402

from .test_hf import tiny  # noqa: E402

BS, PROMPT, NEW = 4, 10, 14


def greedy(model, ctl, routing, ids, new=NEW):
    with torch.no_grad(), ctl.routing(routing):
        return model.generate(ids, max_new_tokens=new, do_sample=False, min_new_tokens=new,
                              pad_token_id=0)[0, ids.shape[1]:]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("position", ["qk", "none"])
def test_every_block_kept_decodes_like_dense(family, position):
    model = tiny(family)
    ctl = attach_block_gates(model, d_gate=8, gate="random", block_size=BS, position=position)
    ids = torch.randint(1, 101, (1, PROMPT), generator=torch.Generator().manual_seed(3))
    dense = greedy(model, ctl, Routing(), ids)
    for mode in ("block-gate", "block-oracle", "block-random"):
        full = greedy(model, ctl, Routing(mode=mode, block_size=BS, block_k=64), ids)
        assert torch.equal(full, dense), mode


@pytest.mark.parametrize("mode", ["block-gate", "block-oracle", "block-random"])
def test_decoding_keeps_the_blocks_of_a_whole_sequence_pass(mode):
    """Teacher forcing the decoded tokens through one forward pass without a cache, under the same sparse routing,
    gives the decoded tokens back as its greedy choices, with the same logits."""
    model = tiny("llama", seed=1)
    ctl = attach_block_gates(model, d_gate=8, gate="random", block_size=BS, position="qk")
    r = Routing(mode=mode, block_size=BS, block_k=1)
    ids = torch.randint(1, 101, (1, PROMPT), generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), ctl.routing(r):
        out = model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
        seq = out.sequences
        whole = model(seq[:, :-1], use_cache=False).logits
    decoded = torch.stack(out.logits, dim=1)[0]
    torch.testing.assert_close(decoded, whole[0, PROMPT - 1:], rtol=1e-4, atol=1e-4)
    assert torch.equal(whole[0, PROMPT - 1:].argmax(-1), seq[0, PROMPT:])
    dense = greedy(model, ctl, Routing(), ids)
    assert not torch.equal(dense, seq[0, PROMPT:]) or mode == "block-random", "block_k=1 should change something"


def test_decoding_reads_only_the_kept_blocks():
    """A key outside the kept blocks cannot change a decoded token's output: poisoning its value leaves it."""
    from gatelab.attention.block_decode import BlockDecodeCache, block_decode_attention
    torch.manual_seed(0)
    B, H, D, S = 1, 2, 8, 21  # the new query at position 20, block 5 of 4-token blocks
    q_all = torch.randn(B, H, S, D)
    k, v = torch.randn(B, H, S, D), torch.randn(B, H, S, D)
    cache = BlockDecodeCache()
    cache.extend(q_all, None, 0)
    r = Routing(mode="block-random", block_size=BS, block_k=2, seed=3)
    out = block_decode_attention(q_all[:, :, -1:], k, v, r, cache)
    kept = cache.kept[5]
    assert kept.shape[-1] == 6 and bool(kept[..., 5].all()) and int(kept[0, 0].sum()) == 3
    dropped = [j for j in range(5) if not bool(kept[0, :, j].any())]
    assert dropped, kept
    v2 = v.clone()
    for j in dropped:
        v2[:, :, j * BS:(j + 1) * BS] = 1e4
    assert torch.equal(block_decode_attention(q_all[:, :, -1:], k, v2, r, cache), out)
    masked = torch.zeros(B, H, 1, S, dtype=torch.bool)
    for h in range(H):
        for j in range(6):
            if kept[0, h, j] if kept.dim() == 3 else kept[h, j]:
                masked[0, h, 0, j * BS:min((j + 1) * BS, S)] = True
    ref = torch.nn.functional.scaled_dot_product_attention(q_all[:, :, -1:], k, v, attn_mask=masked)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


class CharTokenizer:
    """One token per character code modulo the tiny vocabulary: enough for the command's plumbing."""

    def __call__(self, text, return_tensors=None):
        ids = torch.tensor([[1 + ord(c) % 100 for c in text]])
        return type("Encoding", (), {"input_ids": ids})()

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(96 + i % 26) for i in ids)


def test_generate_command_decodes_and_compares_with_dense(tmp_path, monkeypatch, capsys):
    import json

    import gatelab.hf.gate_files as hf_gate_files
    from gatelab.cli.main import main
    from gatelab.hf.gate_files import save_gates
    model = tiny("llama")
    attach_block_gates(model, d_gate=8, gate="random", block_size=BS, position="qk")
    save_gates(model, tmp_path / "gates")
    monkeypatch.setattr(hf_gate_files, "load_pretrained", lambda *a, **kw: (tiny("llama"), CharTokenizer()))
    (tmp_path / "prompt.txt").write_text("the quick brown fox")
    base = ["generate", "--model", str(tmp_path), "--gate", str(tmp_path / "gates"), "--prompt-file",
            str(tmp_path / "prompt.txt"), "--max-new-tokens", "9", "--device", "cpu", "--allow-other-base"]
    main(base + ["--block-k", "64", "--compare", "--json", str(tmp_path / "full.json")])
    full = json.loads((tmp_path / "full.json").read_text())
    assert full["agreement"] == 1.0 and full["first_difference"] == 9 and len(full["tokens"][0]) == 9
    assert "agreement with dense greedy 1.000 (no difference)" in capsys.readouterr().err
    assert abs(full["ppl_routed"] - full["ppl_dense"]) < 1e-6 * full["ppl_dense"]
    main(base + ["--block-k", "1", "--compare", "--json", str(tmp_path / "sparse.json")])
    sparse = json.loads((tmp_path / "sparse.json").read_text())
    assert sparse["dense_tokens"] == full["dense_tokens"] and 0.0 <= sparse["agreement"] <= 1.0
    assert "agreement with dense greedy" in capsys.readouterr().err
    import functools

    import gatelab.attention.compiled as compiled_fns
    monkeypatch.setattr(compiled_fns, "_COMPILED", {})  # compiled with aot_eager: inductor's code generation is slow
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    main(base + ["--block-k", "1", "--compile", "--json", str(tmp_path / "compiled.json")])  # fixed cache, compiled
    compiled = json.loads((tmp_path / "compiled.json").read_text())
    assert compiled["tokens"] == sparse["tokens"] and compiled["seconds"] > 0
    assert "9 new tokens after 19 in" in capsys.readouterr().err
    main(base[:-4] + ["20", "--device", "cpu", "--allow-other-base", "--block-k", "1", "--compile", "--json",
                      str(tmp_path / "long.json")])  # long enough for a steady window: whole blocks after step 6
    long = json.loads((tmp_path / "long.json").read_text())
    assert long["tokens"][0][:9] == compiled["tokens"][0] and long["window"] == [6, 18] and long["steady_s"] > 0
    assert "steady decoding: " in capsys.readouterr().err
    assert main(base[:6] + [str(tmp_path / "missing.txt"), "--device", "cpu"]) == 2
    assert "gatelab: error: --prompt-file" in capsys.readouterr().err
    for routing in ("soft-gate", "block-soft", "gate-topk"):  # no decoding step over a cache: refused at once
        assert main(base + ["--routing", routing]) == 2
        assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["oracle-topk", "random-topk"])
def test_token_routings_decode_with_the_cache_as_a_whole_pass_does(mode):
    """Oracle and random top-k need no gate: generating with the KV cache (queries at the last T of S positions)
    keeps, per new token, the keys a whole-sequence pass keeps in that row."""
    from gatelab.hf.adapter import attach_gates
    model = tiny("llama", seed=2)
    ctl = attach_gates(model, gate="none")
    r = Routing(mode=mode, k=5)
    ids = torch.randint(1, 101, (1, PROMPT), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), ctl.routing(r):
        out = model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
        whole = model(out.sequences[:, :-1], use_cache=False).logits
    torch.testing.assert_close(torch.stack(out.logits, dim=1)[0], whole[0, PROMPT - 1:], rtol=1e-4, atol=1e-4)


def test_gathered_decoding_reads_each_query_heads_own_key_value_head():
    """Grouped-query heads: the kept positions are gathered from key/value head h // G without copying the cache to
    the query heads, and give SDPA over the repeated cache masked to the kept blocks."""
    from gatelab.attention.block_decode import BlockDecodeCache, block_decode_attention
    from gatelab.attention.masks import repeat_kv
    torch.manual_seed(1)
    B, H, Hk, D, S = 2, 4, 2, 8, 23  # the new query at position 22, block 5 of 4-token blocks
    q_all = torch.randn(B, H, S, D)
    k, v = torch.randn(B, Hk, S, D), torch.randn(B, Hk, S, D)
    cache = BlockDecodeCache()
    cache.extend(q_all, None, 0)
    r = Routing(mode="block-oracle", block_size=BS, block_k=2)
    out = block_decode_attention(q_all[:, :, -1:], k, v, r, cache)
    kept = cache.kept[5].expand(B, H, 6)
    assert bool((kept.sum(-1) == 3).all()) and not bool(kept[0].eq(kept[0, :1]).all()), "heads choose differently"
    mask = kept.repeat_interleave(BS, dim=-1)[..., :S, None].transpose(-1, -2)
    ref = torch.nn.functional.scaled_dot_product_attention(q_all[:, :, -1:], repeat_kv(k, H), repeat_kv(v, H),
                                                           attn_mask=mask)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_dense_decoding_step_reads_grouped_heads_without_a_mask():
    from gatelab.attention.attend import dense_attention
    from gatelab.attention.masks import repeat_kv
    torch.manual_seed(2)
    q, k, v = torch.randn(2, 6, 1, 8), torch.randn(2, 2, 17, 8), torch.randn(2, 2, 17, 8)
    ref = torch.nn.functional.scaled_dot_product_attention(q, repeat_kv(k, 6), repeat_kv(v, 6))
    torch.testing.assert_close(dense_attention(q, k, v), ref, rtol=1e-5, atol=1e-6)


def test_append_in_place_copies_the_history_a_logarithmic_number_of_times():
    from gatelab.attention.block_decode import append_in_place
    buf, grown, ref = None, 0, []
    for i in range(1000):
        new = torch.full((1, 2, 1, 3), float(i))
        before = None if buf is None else buf.data_ptr()
        buf = append_in_place(buf, new, 2, i)
        grown += buf.data_ptr() != before
        ref.append(new)
    assert torch.equal(buf[:, :, :1000], torch.cat(ref, 2))
    assert grown <= 32, grown  # 1.25 ** 31 > 1000
    assert append_in_place(None, new, 2, 0, capacity=50).shape[2] == 50


def test_in_place_cache_matches_the_dynamic_cache_and_keeps_its_buffer():
    from gatelab.hf.cache import InPlaceLayer, cache_keyword, kv_cache
    from gatelab.hf.generate import greedy as routed_greedy
    model = tiny("llama")
    ctl = attach_block_gates(model, d_gate=8, gate="random", block_size=BS)
    ids = torch.randint(1, 101, (2, PROMPT), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        plain = model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    assert torch.equal(routed_greedy(model, ids, Routing(), NEW), plain[:, PROMPT:])
    cache = kv_cache(model, PROMPT + NEW)
    assert all(isinstance(layer, InPlaceLayer) for layer in cache.layers)
    with torch.no_grad(), ctl.routing(Routing()):
        out = model(ids, use_cache=True, **{cache_keyword(model): cache})
        ptrs = [layer.keys.data_ptr() for layer in cache.layers]
        tok = out.logits[:, -1:].argmax(-1)
        for _ in range(NEW - 1):
            tok = model(tok, use_cache=True, **{cache_keyword(model): cache}).logits[:, -1:].argmax(-1)
    assert [layer.keys.data_ptr() for layer in cache.layers] == ptrs
    assert cache.get_seq_length() == PROMPT + NEW - 1


def test_in_place_layer_follows_crops_and_reorders():
    from gatelab.hf.cache import InPlaceLayer
    torch.manual_seed(3)
    layer, ref_k = InPlaceLayer(), torch.randn(3, 2, 5, 4)
    layer.update(ref_k, ref_k + 1)
    for _ in range(4):
        step = torch.randn(3, 2, 1, 4)
        k, v = layer.update(step, step + 1)
        ref_k = torch.cat([ref_k, step], 2)
    assert torch.equal(k, ref_k) and torch.equal(v, ref_k + 1)
    layer.crop(-3)
    step = torch.randn(3, 2, 1, 4)
    k, _ = layer.update(step, step + 1)
    ref_k = torch.cat([ref_k[:, :, :-3], step], 2)
    assert torch.equal(k, ref_k)
    layer.batch_select_indices(torch.tensor([2, 0]))
    step = torch.randn(2, 2, 1, 4)
    k, v = layer.update(step, step + 1)
    ref_k = torch.cat([ref_k[[2, 0]], step], 2)
    assert torch.equal(k, ref_k) and torch.equal(v, ref_k + 1)


def test_generate_command_refuses_cuda_graphs_without_cuda(tmp_path, monkeypatch, capsys):
    import gatelab.hf.gate_files as hf_gate_files
    from gatelab.cli.main import main
    monkeypatch.setattr(hf_gate_files, "load_pretrained", lambda *a, **kw: (tiny("llama"), CharTokenizer()))
    (tmp_path / "prompt.txt").write_text("the quick brown fox")
    assert main(["generate", "--model", str(tmp_path), "--prompt-file", str(tmp_path / "prompt.txt"), "--routing",
                 "dense", "--device", "cpu", "--cuda-graphs"]) == 2
    assert "--cuda-graphs needs a CUDA device" in capsys.readouterr().err
