"""gatelab.hf on tiny random-weight Llama and Qwen3 models built in code (no downloads)."""
import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from gatelab.config import GatelabError, Routing  # noqa: E402
from gatelab.hf.adapter import attach_block_gates, attach_gates, set_trainable
from gatelab.hf.gate_files import load_gates, save_gates  # noqa: E402
from tests.test_routing import HARD_MODES  # noqa: E402

T = 24


def tiny(family: str, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if family == "llama":
        cfg = transformers.LlamaConfig(**common)
        model = transformers.LlamaForCausalLM(cfg)
    elif family == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    elif family == "gemma3":  # sliding-window layers (window 8 < T) next to global ones, q/k norms, scaled queries
        cfg = transformers.Gemma3TextConfig(**common, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                                            layer_types=["sliding_attention", "full_attention"])
        model = transformers.Gemma3ForCausalLM(cfg)
    else:
        cfg = transformers.Qwen3Config(**common, head_dim=16)
        model = transformers.Qwen3ForCausalLM(cfg)
    return model.eval()


FAMILIES = ["llama", "qwen3", "qwen2", "gemma3"]


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_routing_reproduces_the_unpatched_model(family):
    model = tiny(family)
    ids = torch.randint(0, 101, (2, T))
    with torch.no_grad():
        reference = model(ids).logits
        gated = attach_gates(model, d_gate=8)
        with gated.routing(Routing()):
            ours = model(ids).logits
        with gated.routing(Routing(mode="oracle-topk", k=T)):
            oracle_all = model(ids).logits
    assert torch.allclose(reference, ours, atol=1e-5)
    assert torch.allclose(reference, oracle_all, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", HARD_MODES)
def test_hard_topk_keeps_exactly_k_allowed_keys(family, mode):
    model = tiny(family)
    gated = attach_gates(model, d_gate=8)
    ids = torch.randint(0, 101, (2, T))
    k = 5
    with torch.no_grad(), gated.routing(Routing(mode=mode, k=k)):
        out = model(ids, output_attentions=True)
    assert len(out.attentions) == model.config.num_hidden_layers
    for A in out.attentions:
        kept = (A > 0).sum(-1)
        assert torch.equal(kept, torch.clamp(torch.arange(T) + 1, max=k).expand_as(kept))
        assert torch.all(A.triu(1) == 0)


def test_padding_keys_are_never_selected():
    model = tiny("llama")
    gated = attach_gates(model, d_gate=8)
    ids = torch.randint(0, 101, (2, T))
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, :6] = 0  # left padding of the second sequence
    with torch.no_grad(), gated.routing(Routing(mode="gate-topk", k=4)):
        out = model(ids, attention_mask=mask, output_attentions=True)
    assert len(out.attentions) == model.config.num_hidden_layers
    for A in out.attentions:
        assert torch.all(A[1, :, 6:, :6] == 0)
        kept = (A[1, :, 6:] > 0).sum(-1)
        assert torch.equal(kept, torch.clamp(torch.arange(T - 6) + 1, max=4).expand_as(kept))


def test_gate_gradients_zero_under_hard_topk_nonzero_under_soft():
    model = tiny("qwen3")
    gated = attach_gates(model, d_gate=8)
    set_trainable(model, layers=[])
    ids = torch.randint(0, 101, (2, T))
    grads = {}
    for mode in ("gate-topk", "soft-gate"):
        with gated.routing(Routing(mode=mode, k=4)):
            loss = model(ids, labels=ids).loss
        if not loss.requires_grad:  # no path from the loss to any trainable parameter at all
            grads[mode] = 0.0
            continue
        g = torch.autograd.grad(loss, gated.gate_parameters(), allow_unused=True)
        grads[mode] = sum(0.0 if x is None else float(x.abs().sum()) for x in g)
    assert grads["gate-topk"] == 0.0 and grads["soft-gate"] > 0


def test_set_trainable_unfreezes_only_the_chosen_layers_and_gates():
    model = tiny("llama")
    attach_gates(model, d_gate=8)
    names = set_trainable(model, layers=[1])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith("gatelab_gates") or ".layers.1.self_attn." in n for n in trainable)
    assert any(".layers.1.self_attn.q_proj" in n for n in trainable) and "gates" in names
    with pytest.raises(GatelabError, match="does not exist"):
        set_trainable(model, layers=[7])


def test_gates_save_load_roundtrip_and_refuse_other_models(tmp_path, capsys):
    model = tiny("llama")
    gated = attach_gates(model, d_gate=8, seed=3)
    ids = torch.randint(0, 101, (1, T))
    r = Routing(mode="gate-topk", k=4)
    with torch.no_grad(), gated.routing(r):
        before = model(ids).logits
    save_gates(model, tmp_path / "g")
    fresh = tiny("llama")
    ctl = load_gates(fresh, tmp_path / "g")
    with torch.no_grad(), ctl.routing(r):
        after = fresh(ids).logits
    assert torch.equal(before, after)
    with pytest.raises(GatelabError, match="another model"):
        load_gates(tiny("qwen3"), tmp_path / "g")
    with pytest.raises(GatelabError, match="other weights.*--allow-other-base"):
        load_gates(tiny("llama", seed=1), tmp_path / "g")
    load_gates(tiny("llama", seed=1), tmp_path / "g", allow_other_base=True)
    assert "WARNING" in capsys.readouterr().err  # used anyway, loudly


def test_gates_load_onto_a_half_precision_copy_of_their_weights(tmp_path, capsys):
    model = tiny("llama")
    attach_gates(model, d_gate=8, seed=3)
    save_gates(model, tmp_path / "g")
    for dtype in (torch.bfloat16, torch.float16):  # the same weights, rounded: neither refused nor warned about
        assert load_gates(tiny("llama").to(dtype), tmp_path / "g").gates is not None
    assert "WARNING" not in capsys.readouterr().err
    with pytest.raises(GatelabError, match="other weights"):
        load_gates(tiny("llama", seed=1).to(torch.bfloat16), tmp_path / "g")
    meta_path = tmp_path / "g" / "gate.json"  # a gate.json written before the rounded fingerprints were recorded
    meta = json.loads(meta_path.read_text())
    del meta["base_sha256_rounded"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(GatelabError, match="or on these weights in float32: its gate.json was written before"):
        load_gates(tiny("llama").to(torch.bfloat16), tmp_path / "g")
    load_gates(tiny("llama"), tmp_path / "g")  # float32, as before


def test_gate_routing_without_gates_is_a_clear_error():
    model = tiny("llama")
    gated = attach_gates(model, gate="none")
    with pytest.raises(GatelabError, match="needs gates"), gated.routing(Routing(mode="soft-gate", k=4)):
        model(torch.randint(0, 101, (1, 8)))


def test_hf_perplexity_of_a_uniform_model_is_the_vocab_size():
    from gatelab.hf.evaluate import hf_perplexity
    model = tiny("llama")
    torch.nn.init.zeros_(model.lm_head.weight)
    ids = torch.randint(0, 101, (300,)).tolist()
    res = hf_perplexity(model, ids, Routing(), context=64, batch_size=2)
    assert res["tokens"] == 299
    assert res["ppl"] == pytest.approx(101, rel=1e-5)
    with pytest.raises(GatelabError, match="attach_gates"):
        hf_perplexity(model, ids, Routing(mode="oracle-topk", k=4), context=64)
    attach_gates(model, gate="none")
    assert hf_perplexity(model, ids, Routing(mode="oracle-topk", k=4), context=64)["ppl"] == pytest.approx(101,
                                                                                                          rel=1e-5)


def test_hf_perplexity_matches_the_models_own_loss():
    from gatelab.hf.evaluate import hf_perplexity
    model = tiny("qwen3")
    ids = torch.randint(0, 101, (65,)).tolist()
    res = hf_perplexity(model, ids, Routing(), context=64)
    with torch.no_grad():
        loss = model(torch.tensor([ids[:64]]), labels=torch.tensor([ids[:64]])).loss  # HF shifts the labels
    x, y = torch.tensor([ids[:64]]), torch.tensor([ids[1:65]])
    with torch.no_grad():
        manual = torch.nn.functional.cross_entropy(model(x).logits[0], y[0])
    assert res["nll"] == pytest.approx(float(manual), abs=1e-5)
    assert float(loss) > 0


def test_encode_corpus_and_load_errors(tmp_path):
    from gatelab.hf.corpus import encode_corpus
    from gatelab.hf.gate_files import load_pretrained

    class WordTokenizer:
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [len(w) for w in text.split()]}
    src = tmp_path / "t.txt"
    src.write_text("\n\n".join(f"para {i} with some words" for i in range(300)))
    ids = encode_corpus(WordTokenizer(), "text", "validation", str(src))
    assert 0 in ids and len(ids) > 10
    with pytest.raises(GatelabError, match="does not exist"):
        load_pretrained(tmp_path / "nope")
    with pytest.raises(GatelabError, match="does not exist"):
        load_pretrained(tmp_path, gguf_file="missing.gguf")


def _losses(folder):
    import json
    return [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("loss", ["kl", "bce", "task"])
def test_train_gates_freezes_the_model_and_learns(tmp_path, loss):
    from gatelab.hf.distill import train_gates
    model = tiny("llama")
    attach_gates(model, d_gate=8)
    set_trainable(model, layers=[])
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("gatelab")}
    gates_before = [p.detach().clone() for p in model.gatelab.gate_parameters()]
    ids = torch.randint(0, 101, (3000,)).tolist()
    kw = dict(loss=loss, k=4, steps=25, batch_size=4, context=32, lr=1e-2, progress=False)
    train_gates(model, ids, tmp_path / "g", **kw)
    ls = _losses(tmp_path / "g")
    assert len(ls) == 25
    if loss != "task":
        assert sum(ls[-5:]) < sum(ls[:5])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    assert not any(torch.equal(a, b) for a, b in zip(gates_before, model.gatelab.gate_parameters()))
    assert (tmp_path / "g" / "gate.json").is_file() and (tmp_path / "g" / "done.json").is_file()
    assert train_gates(model, ids, tmp_path / "g", **kw)["skipped"]


@pytest.mark.parametrize("reading", ["sigmoid-renorm", "topk-sigmoid"])
def test_task_loss_trains_through_the_reading_it_is_given(tmp_path, reading):
    """The first logged task loss is the model's loss under that reading on the first batch (and not the other's)."""
    import json

    from gatelab.config import READINGS
    from gatelab.data import sample_windows
    from gatelab.hf.distill import train_gates
    model = tiny("llama")
    # large gate scores: the readings give clearly different losses (thresholds below measured on the pre-RoPE gate)
    attach_gates(model, d_gate=8, init_std=1.0, position="none")
    set_trainable(model, layers=[])
    ids = torch.randint(0, 101, (3000,), generator=torch.Generator().manual_seed(0)).tolist()
    x, y = sample_windows(np.asarray(ids, dtype=np.int64), 0, 4, 32, 0)
    expect = {}
    with torch.no_grad():
        for name in READINGS:
            with model.gatelab.routing(Routing(mode="soft-gate", k=4, **READINGS[name])):
                logits = model(x, use_cache=False).logits
            expect[name] = float(torch.nn.functional.cross_entropy(logits.reshape(-1, 101), y.reshape(-1)))
    soft = Routing(mode="soft-gate", k=4, **READINGS[reading])
    train_gates(model, ids, tmp_path / "g", loss="task", k=4, steps=1, batch_size=4, context=32, progress=False,
                soft_routing=soft)
    first = _losses(tmp_path / "g")[0]
    assert abs(first - expect[reading]) < 5e-5  # the readings' losses lie 4e-4 to 3e-3 apart on this tiny model
    assert all(abs(first - v) > 2e-4 for name, v in expect.items() if name != reading)
    assert json.loads((tmp_path / "g" / "gate.json").read_text())["routing"]["soft_renormalize"] == \
        READINGS[reading]["soft_renormalize"]
    with pytest.raises(GatelabError, match="soft-gate"):
        train_gates(model, ids, tmp_path / "h", loss="task", k=4, steps=1, context=32, progress=False,
                    soft_routing=Routing(mode="gate-topk", k=4))


def interrupted(model, forwards: int, call) -> None:
    """call(model), interrupted (KeyboardInterrupt) in the model's forward number `forwards`."""
    calls = {"n": 0}

    def die(*_):
        calls["n"] += 1
        if calls["n"] == forwards:
            raise KeyboardInterrupt
    hook = model.lm_head.register_forward_hook(die)
    with pytest.raises(KeyboardInterrupt):
        call(model)
    hook.remove()


def test_train_gates_resumes_exactly_after_an_interruption(tmp_path):
    from gatelab.hf.distill import train_gates
    ids = torch.randint(0, 101, (3000,)).tolist()
    kw = dict(loss="kl", k=4, steps=10, batch_size=2, context=32, lr=1e-2, checkpoint_every=5, progress=False)

    def fresh():
        model = tiny("qwen3")
        attach_gates(model, d_gate=8, seed=1)
        set_trainable(model, layers=[])
        return model
    train_gates(fresh(), ids, tmp_path / "full", **kw)
    interrupted(fresh(), 7, lambda model: train_gates(model, ids, tmp_path / "cut", **kw))
    train_gates(fresh(), ids, tmp_path / "cut", **kw)
    assert _losses(tmp_path / "full") == _losses(tmp_path / "cut")


def test_train_gates_refuses_a_folder_of_a_run_with_other_settings(tmp_path):
    """A finished run and an interrupted one are refused when called again with other settings (steps, lr, block
    size, the tokens), naming what differs; fresh=True starts over; a run folder from before run.json resumes."""
    import json

    from gatelab.hf.distill import RUN_FILE, train_gates
    ids = torch.randint(0, 101, (3000,), generator=torch.Generator().manual_seed(0)).tolist()
    kw = dict(loss="kl", k=2, steps=6, batch_size=2, context=32, lr=1e-2, checkpoint_every=3, progress=False)

    def blocks(block_size=16):
        model = tiny("llama")
        attach_block_gates(model, d_gate=8, gate="learned", block_size=block_size, seed=1)
        set_trainable(model, layers=[])
        return model
    train_gates(blocks(), ids, tmp_path / "g", **kw)
    saved = json.loads((tmp_path / "g" / RUN_FILE).read_text())
    assert saved["steps"] == 6 and saved["block_size"] == 16 and saved["tokens"] == 3000
    assert train_gates(blocks(), ids, tmp_path / "g", **kw)["skipped"]
    for change, model, ids_ in ((dict(steps=7), blocks(), ids), (dict(lr=2e-2), blocks(), ids),
                                ({}, blocks(32), ids), ({}, blocks(), ids[:-1])):
        with pytest.raises(GatelabError, match="other settings") as err:
            train_gates(model, ids_, tmp_path / "g", **dict(kw, **change))
        assert ("steps: 6 there, 7 here" in str(err.value)) == (change == dict(steps=7))
    assert "block_size: 16 there, 32 here" in _refusal(lambda: train_gates(blocks(32), ids, tmp_path / "g", **kw))
    # an interrupted run: the same refusal, and the checkpoint is left as it was
    interrupted(blocks(), 4, lambda model: train_gates(model, ids, tmp_path / "cut", **kw))
    before = (tmp_path / "cut" / "checkpoint.pt").read_bytes()
    assert "block_size" in _refusal(lambda: train_gates(blocks(32), ids, tmp_path / "cut", **kw))
    assert (tmp_path / "cut" / "checkpoint.pt").read_bytes() == before
    # fresh: the other settings train from step 0
    out = train_gates(blocks(32), ids, tmp_path / "cut", **dict(kw, steps=4), fresh=True)
    assert out["steps"] == 4 and not out.get("skipped") and len(_losses(tmp_path / "cut")) == 4
    assert json.loads((tmp_path / "cut" / RUN_FILE).read_text())["block_size"] == 32
    # a run folder written before run.json: resumed and skipped as before, the folder left without one
    (tmp_path / "g" / RUN_FILE).unlink()
    assert train_gates(blocks(), ids, tmp_path / "g", **kw)["skipped"]
    assert not (tmp_path / "g" / RUN_FILE).exists()


def _refusal(call) -> str:
    with pytest.raises(GatelabError) as err:
        call()
    return str(err.value)


def test_hf_audit_random_control_is_the_gates_exact_initialisation(tmp_path):
    """An untrained gate audits exactly equal to its random control; a KL-trained one is compared with it."""
    from gatelab.hf.audit import hf_audit
    from gatelab.hf.distill import train_gates
    ids = torch.randint(0, 101, (3000,), generator=torch.Generator().manual_seed(0)).tolist()
    model = tiny("llama")
    attach_gates(model, d_gate=8, gate="learned", seed=3)
    save_gates(model, tmp_path / "untrained", extra=dict(seed=3))
    res = hf_audit(model, tmp_path / "untrained", ids, k=4, context=T, batch_size=4, max_tokens=400)
    assert [r["model"] for r in res["rows"]] == ["learned gate", "random gate", "-", "-", "-"]
    assert res["rows"][0]["ppl"] == res["rows"][1]["ppl"] and res["summary"]["learned_vs_random"] == 0.0

    model = tiny("llama")
    attach_gates(model, d_gate=8, gate="learned", seed=3)
    set_trainable(model, layers=[])
    train_gates(model, ids, tmp_path / "kl", loss="kl", k=4, steps=30, batch_size=4, context=T, lr=1e-2, seed=3,
                progress=False)
    res = hf_audit(model, tmp_path / "kl", ids, k=4, context=T, batch_size=4, max_tokens=400)
    learned, rand, oracle = (r["ppl"] for r in res["rows"][:3])
    s = res["summary"]
    assert learned != rand and s["oracle_vs_random"] == pytest.approx((rand - oracle) / rand)
    if s["gap_too_small"]:  # random weights: the oracle may be hardly better than random; then no share is given
        from gatelab.diagnostics.analyze import MIN_ORACLE_GAIN
        assert s["random_to_oracle_gap_closed"] is None and s["oracle_vs_random"] < MIN_ORACLE_GAIN
    else:
        assert s["random_to_oracle_gap_closed"] == pytest.approx((rand - learned) / (rand - oracle))
