"""Gate variants (none / rope / qk) on tiny random-weight Llama, Qwen2, Qwen3 and Gemma3 models built in code, and
post-hoc training until the held-out objective stops improving."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from gatelab.attention.position_gates import POSITIONS, RopeGate, frequency_index, gate_scores  # noqa: E402
from gatelab.config import GatelabError, Routing  # noqa: E402
from gatelab.hf.adapter import attach_gates, set_trainable  # noqa: E402
from gatelab.hf.distill import capture_layers, train_gates
from gatelab.hf.gate_files import load_gates, read_gate_meta, save_gates

from .test_hf import FAMILIES, T, interrupted, tiny  # noqa: E402


def _logits_and_cos(model, ids, layer=0, position_ids=None):
    """The model's own attention logits S (B, H, T, T) at `layer` and the gate's captured inputs there."""
    ctl = model.gatelab
    ctl.capture = []
    with torch.no_grad(), ctl.routing(Routing()):
        model(ids, position_ids=position_ids, use_cache=False)
    cap, ctl.capture = ctl.capture, None
    return cap[layer]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("position", ["rope", "qk"])
def test_variants_route_on_every_family(family, position):
    """Dense routing is untouched by the variant; gate-topk keeps exactly k allowed keys (also through Gemma3's
    sliding-window layers); the soft gate gives the variant's gate a gradient."""
    model = tiny(family)
    ids = torch.randint(0, 101, (2, T))
    with torch.no_grad():
        reference = model(ids).logits
    gated = attach_gates(model, d_gate=8, position=position)
    assert gated.position == position and all(type(g).__name__ == ("RopeGate" if position == "rope" else "QKGate")
                                              for g in gated.gates)
    with torch.no_grad(), gated.routing(Routing()):
        assert torch.allclose(model(ids).logits, reference, atol=1e-5)
    k = 5
    with torch.no_grad(), gated.routing(Routing(mode="gate-topk", k=k)):
        out = model(ids, output_attentions=True, use_cache=False)
    assert len(out.attentions) == model.config.num_hidden_layers
    for A in out.attentions:
        kept = (A > 0).sum(-1)
        assert torch.equal(kept, torch.clamp(torch.arange(T) + 1, max=k).expand_as(kept))
    set_trainable(model, layers=[])
    with gated.routing(Routing(mode="soft-gate", k=4)):
        loss = model(ids, labels=ids, use_cache=False).loss
    grads = torch.autograd.grad(loss, gated.gate_parameters(), allow_unused=True)
    assert sum(0.0 if g is None else float(g.abs().sum()) for g in grads) > 0


def test_frequency_index_spans_the_spectrum():
    assert frequency_index(32, 16).tolist() == [round(i * 31 / 15) for i in range(16)]
    assert frequency_index(32, 16)[0] == 0 and frequency_index(32, 16)[-1] == 31
    assert frequency_index(32, 32).tolist() == list(range(32))
    assert sorted(set(frequency_index(4, 8).tolist())) == [0, 1, 2, 3]  # wider than head_dim: repeats
    with pytest.raises(GatelabError, match="even"):
        attach_gates(tiny("llama"), d_gate=7, position="rope")
    with pytest.raises(GatelabError, match="position"):
        attach_gates(tiny("llama"), d_gate=8, position="alibi")


@pytest.mark.parametrize("rope_parameters", [None, dict(rope_type="yarn", factor=4.0,
                                                        original_max_position_embeddings=16)])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_rope_gate_with_the_models_projections_reproduces_its_attention_logits(family, rope_parameters):
    """A rope gate of d_gate = head_dim given one head's q_proj/k_proj (and their biases: Qwen2 has them) computes
    exactly that head's attention logits S, at shifted absolute positions too and under YaRN scaling (whose
    attention_scaling multiplies cos and sin): the gate rotates with the model's own cos/sin."""
    model = tiny(family)
    if rope_parameters:
        cfg = model.config
        cfg.rope_parameters = dict(cfg.rope_parameters, **rope_parameters)
        model = type(model)(cfg).eval()
    d = model.config.hidden_size // model.config.num_attention_heads
    ctl = attach_gates(model, d_gate=d, position="rope")
    attn = model.model.layers[0].self_attn
    groups = model.config.num_attention_heads // model.config.num_key_value_heads
    gate = ctl.gates[0]
    with torch.no_grad():
        for h in range(model.config.num_attention_heads):
            kv = h // groups
            gate.wq[h] = attn.q_proj.weight[h * d:(h + 1) * d].T
            gate.wk[h] = attn.k_proj.weight[kv * d:(kv + 1) * d].T
            if attn.q_proj.bias is not None:
                gate.bq[h] = attn.q_proj.bias[h * d:(h + 1) * d]
                gate.bk[h] = attn.k_proj.bias[kv * d:(kv + 1) * d]
    ids = torch.randint(0, 101, (2, T))
    for offset in (0, 37):
        c = _logits_and_cos(model, ids, position_ids=torch.arange(T)[None].expand(2, T) + offset)
        with torch.no_grad():
            G = gate_scores(gate, c["inputs"])
        assert torch.allclose(G, c["S"], atol=1e-4), float((G - c["S"]).abs().max())
    if rope_parameters:
        assert model.model.rotary_emb.attention_scaling != 1.0


@pytest.mark.parametrize("family", FAMILIES)
def test_qk_gate_with_identity_maps_is_the_oracle(family):
    """A qk gate whose maps are the identity (d_gate = head_dim) reads the model's own post-RoPE q and k (key heads
    repeated to the query heads): its top-k is the oracle's."""
    model = tiny(family)
    d = model.model.layers[0].self_attn.head_dim
    ctl = attach_gates(model, d_gate=d, position="qk")
    with torch.no_grad():
        for g in ctl.gates:
            g.wq.copy_(torch.eye(d).expand_as(g.wq))
            g.wk.copy_(torch.eye(d).expand_as(g.wk))
    ids = torch.randint(0, 101, (2, T))
    with torch.no_grad():
        for mode in ("oracle-topk", "gate-topk"):
            with ctl.routing(Routing(mode=mode, k=5)):
                if mode == "oracle-topk":
                    oracle = model(ids, use_cache=False).logits
                else:
                    gate = model(ids, use_cache=False).logits
    assert torch.allclose(oracle, gate, atol=1e-5)


def _previous_k_recall(G, allowed, k):
    """Share of the rows with more than k allowed keys whose top-k gate scores are exactly the k most recent keys."""
    T_ = G.shape[-1]
    idx = G.masked_fill(~allowed, float("-inf")).topk(k, dim=-1).indices
    t = torch.arange(T_)[:, None]
    hit = ((idx <= t) & (idx > t - k)).all(-1)  # (B, H, T)
    return hit[:, :, k:].float().mean().item()


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
@pytest.mark.slow
def test_rope_gate_learns_the_previous_k_tokens_at_every_absolute_offset(family):
    """Trained (on random tokens, positions 0..47) towards attention spread over the k most recent keys, the rope
    gate picks exactly those keys in (nearly) every row, at every absolute offset up to far beyond what it saw and
    beyond the model's max_position_embeddings; the pre-RoPE gate, trained the same way, cannot tell recent keys from
    old ones (it sees no position)."""
    k, n, steps = 4, 48, 300
    t = torch.arange(n)
    recent = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - k)
    target = recent.float() / recent.float().sum(-1, keepdim=True)
    recall = {}
    for position in ("rope", "none"):
        model = tiny(family)
        ctl = attach_gates(model, d_gate=8, position=position, seed=0)
        set_trainable(model, layers=[])
        opt = torch.optim.Adam(ctl.gate_parameters(), lr=3e-2)
        g = torch.Generator().manual_seed(0)
        for _ in range(steps):
            loss = 0.0
            for c in capture_layers(model, torch.randint(0, 101, (4, n), generator=g)):
                G = gate_scores(ctl.gates[c["layer"]], c["inputs"]).float()
                logp = torch.log_softmax(G.masked_fill(~c["allowed"], float("-inf")), -1)
                loss = loss - (target * logp.masked_fill(~recent, 0.0)).sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        for offset in (0, 1, 5, 300, 3000):
            ids = torch.randint(0, 101, (4, n), generator=g)
            c_all = []
            ctl.capture = []
            with torch.no_grad(), ctl.routing(Routing()):
                model(ids, position_ids=t[None].expand(4, n) + offset, use_cache=False)
            c_all, ctl.capture = ctl.capture, None
            with torch.no_grad():
                recall[position, offset] = min(_previous_k_recall(gate_scores(ctl.gates[c["layer"]], c["inputs"]),
                                                                  c["allowed"], k) for c in c_all)
    for offset in (0, 1, 5, 300, 3000):
        assert recall["rope", offset] >= 0.98, recall
        assert recall["none", offset] <= 0.75, recall  # chance is about 0.2; learning "self" adds some


@pytest.mark.parametrize("position", ["rope", "qk"])
def test_variant_save_load_roundtrip_and_refusal(tmp_path, position):
    model = tiny("qwen3")
    gated = attach_gates(model, d_gate=8, seed=3, position=position)
    with torch.no_grad():  # non-zero biases, so that they must round-trip too
        for p in gated.gate_parameters():
            p.add_(0.1 * torch.randn_like(p))
    ids = torch.randint(0, 101, (1, T))
    r = Routing(mode="gate-topk", k=4)
    with torch.no_grad(), gated.routing(r):
        before = model(ids, use_cache=False).logits
    save_gates(model, tmp_path / "g")
    assert json.loads((tmp_path / "g" / "gate.json").read_text())["position"] == position
    fresh = tiny("qwen3")
    ctl = load_gates(fresh, tmp_path / "g", position=position)
    assert ctl.position == position
    with torch.no_grad(), ctl.routing(r):
        assert torch.equal(before, fresh(ids, use_cache=False).logits)
    assert load_gates(tiny("qwen3"), tmp_path / "g").position == position  # no position given: the saved one
    for other in POSITIONS:
        if other != position:
            with pytest.raises(GatelabError, match=f"is a '{position}' gate.*cannot be loaded as a '{other}'"):
                load_gates(tiny("qwen3"), tmp_path / "g", position=other)


def test_gates_saved_before_variants_load_as_pre_rope(tmp_path):
    model = tiny("llama")
    attach_gates(model, d_gate=8, position="none")
    save_gates(model, tmp_path / "g")
    meta = json.loads((tmp_path / "g" / "gate.json").read_text())
    del meta["position"]  # what a gate saved before variants existed looks like
    (tmp_path / "g" / "gate.json").write_text(json.dumps(meta))
    assert read_gate_meta(tmp_path / "g")["position"] == "none"
    assert load_gates(tiny("llama"), tmp_path / "g", position="none").position == "none"
    with pytest.raises(GatelabError, match="cannot be loaded as a 'rope'"):
        load_gates(tiny("llama"), tmp_path / "g", position="rope")
    meta["position"] = "rope"  # a file that lies about its variant: the weights do not fit
    (tmp_path / "g" / "gate.json").write_text(json.dumps(meta))
    with pytest.raises(GatelabError, match="do not fit a 'rope' gate"):
        load_gates(tiny("llama"), tmp_path / "g")


def test_rope_gate_refuses_an_interleaved_rotary_layout():
    gate = RopeGate(8, 2, 4)
    cos = torch.rand(1, 5, 8)  # not cat(c, c)
    with pytest.raises(GatelabError, match="rotate_half"):
        gate(torch.randn(1, 5, 8), cos, torch.rand(1, 5, 8))


def test_hf_audit_random_control_is_of_the_gates_variant(tmp_path):
    from gatelab.hf.audit import hf_audit
    ids = torch.randint(0, 101, (3000,), generator=torch.Generator().manual_seed(0)).tolist()
    model = tiny("llama")
    attach_gates(model, d_gate=8, gate="learned", seed=3, position="rope")
    save_gates(model, tmp_path / "untrained", extra=dict(seed=3))
    res = hf_audit(model, tmp_path / "untrained", ids, k=4, context=T, batch_size=4, max_tokens=400)
    assert res["position"] == "rope" and model.gatelab.position == "rope"
    assert res["rows"][0]["ppl"] == res["rows"][1]["ppl"]  # an untrained gate equals its random control
    with pytest.raises(GatelabError, match="cannot be loaded as a 'qk'"):
        hf_audit(model, tmp_path / "untrained", ids, k=4, context=T, position="qk")


# ------------------------------------------------------------------------------------------------------------
# training until the held-out objective stops improving

def _rows(folder):
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


def _fresh(position="rope", family="qwen3"):
    model = tiny(family)
    attach_gates(model, d_gate=8, seed=1, position=position)
    set_trainable(model, layers=[])
    return model


CONVERGE = dict(loss="kl", k=4, steps=60, batch_size=2, context=32, lr=3e-2, checkpoint_every=7, progress=False,
                eval_every=5, patience=2, min_delta=0.2, eval_batches=2, step_f1=False)


def test_train_gates_stops_when_the_heldout_objective_stops_improving(tmp_path):
    from gatelab.hf.distill import _heldout_windows, heldout_objective
    ids = torch.randint(0, 101, (3000,), generator=torch.Generator().manual_seed(0)).tolist()
    model = _fresh()
    summary = train_gates(model, ids, tmp_path / "g", **CONVERGE)
    rows = _rows(tmp_path / "g")
    train_rows, val_rows = [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]
    assert all("f1" not in r for r in train_rows) and all(0 <= r["val_f1"] <= 1 for r in val_rows)
    assert [r["step"] for r in val_rows] == list(range(5, summary["steps"] + 1, 5))
    # the stopping rule, replayed on the logged curve, gives the summary's steps and best step
    best, ref, bad, stop = None, None, 0, None
    for r in val_rows:
        if best is None or r["val_loss"] < best[1]:
            best = (r["step"], r["val_loss"])
        if ref is None or r["val_loss"] < ref * (1 - CONVERGE["min_delta"]):
            ref, bad = r["val_loss"], 0
        else:
            bad += 1
        assert r["best_step"] == best[0]
        if bad >= CONVERGE["patience"]:
            stop = r["step"]
            break
    assert stop is not None and summary["stopped_early"] and summary["steps"] == stop < CONVERGE["steps"]
    assert summary["best_step"] == best[0] and summary["best_val_loss"] == best[1] and summary["train_s"] > 0
    assert len(train_rows) == stop
    # the gates kept are the best evaluation's: re-evaluated, they give its value
    windows, _ = _heldout_windows(ids, 4, 32)
    again = heldout_objective(model, windows, "kl", 4, 2, Routing(mode="soft-gate", k=4))[0]
    assert again == pytest.approx(best[1], rel=1e-5)
    meta = json.loads((tmp_path / "g" / "gate.json").read_text())
    assert meta["steps"] == stop and meta["max_steps"] == 60 and meta["best_step"] == best[0]
    # a finished run is skipped and restores the kept gates
    other = _fresh()
    assert train_gates(other, ids, tmp_path / "g", **CONVERGE)["skipped"]
    assert all(torch.equal(a, b) for a, b in zip(model.gatelab.gate_parameters(), other.gatelab.gate_parameters()))
    with pytest.raises(GatelabError, match="eval_every"):
        train_gates(_fresh(), ids, tmp_path / "h", loss="kl", k=4, steps=5, context=32, patience=2, progress=False)


def test_train_gates_until_convergence_never_trains_on_the_heldout_windows(tmp_path, monkeypatch):
    import gatelab.hf.distill as hf_distill
    ids = list(range(3000))
    seen = []
    real = hf_distill.sample_windows

    def spy(tokens, *a, **kw):
        seen.append(len(tokens))
        return real(tokens, *a, **kw)
    monkeypatch.setattr(hf_distill, "sample_windows", spy)
    train_gates(_fresh(), [i % 101 for i in ids], tmp_path / "g", **dict(CONVERGE, steps=3, eval_every=3))
    assert set(seen) == {3000 - (2 * 2 * 32 + 1)}


def test_train_gates_until_convergence_resumes_exactly(tmp_path):
    """Killed after a few evaluations, resumed: the same curve, the same stop, the same gates."""
    ids = torch.randint(0, 101, (3000,), generator=torch.Generator().manual_seed(0)).tolist()
    full = _fresh()
    ref = train_gates(full, ids, tmp_path / "full", **CONVERGE)
    # training forwards and held-out forwards both count: the 17th is mid-way, between checkpoints
    interrupted(_fresh(), 17, lambda model: train_gates(model, ids, tmp_path / "cut", **CONVERGE))
    assert (tmp_path / "cut" / "checkpoint.pt").is_file() and not (tmp_path / "cut" / "done.json").is_file()
    resumed = _fresh()
    out = train_gates(resumed, ids, tmp_path / "cut", **CONVERGE)
    assert _rows(tmp_path / "full") == _rows(tmp_path / "cut")
    assert {k: v for k, v in out.items() if k != "train_s"} == {k: v for k, v in ref.items() if k != "train_s"}
    assert all(torch.equal(a, b) for a, b in zip(full.gatelab.gate_parameters(), resumed.gatelab.gate_parameters()))


def test_cli_hf_distill_eval_and_audit_with_a_variant(tmp_path, monkeypatch, capsys):
    """`hf-distill --position rope --eval-every --patience` records the variant and the steps taken; hf-eval and
    audit --model read it back and refuse another variant with a one-line error."""
    import gatelab.hf.corpus as hf_corpus
    import gatelab.hf.gate_files as hf_gate_files
    from gatelab.cli.main import main
    model_box = {}

    class Tok:
        eos_token_id = 0

    def load(path, gguf=None, device="cpu", **kw):
        model_box["m"] = tiny("llama")
        return model_box["m"], Tok()
    ids = torch.randint(0, 101, (3000,), generator=torch.Generator().manual_seed(0)).tolist()
    monkeypatch.setattr(hf_gate_files, "load_pretrained", load)
    monkeypatch.setattr(hf_corpus, "encode_corpus", lambda *a, **kw: ids)
    out = tmp_path / "gates"
    assert main(["hf-distill", "--model", str(tmp_path), "--position", "rope", "--k", "4", "--d-gate", "8",
                 "--steps", "40", "--eval-every", "5", "--patience", "2", "--min-delta", "0.05", "--batch-size",
                 "2", "--context", "32", "--lr", "0.03", "--no-step-f1", "--out", str(out), "--device", "cpu",
                 "--quiet"]) == 0
    summary = json.loads((out / "done.json").read_text())
    assert json.loads((out / "gate.json").read_text())["position"] == "rope" and summary["max_steps"] == 40
    capsys.readouterr()
    assert main(["hf-eval", "--model", str(tmp_path), "--gate", str(out), "--routing", "gate-topk", "--k", "4",
                 "--context", "32", "--max-tokens", "200", "--device", "cpu", "--quiet"]) == 0
    assert model_box["m"].gatelab.position == "rope"
    assert main(["hf-eval", "--model", str(tmp_path), "--gate", str(out), "--position", "none", "--routing",
                 "gate-topk", "--k", "4", "--context", "32", "--device", "cpu", "--quiet"]) == 2
    assert "is a 'rope' gate" in capsys.readouterr().err
    assert main(["audit", "--model", str(tmp_path), "--gate", str(out), "--position", "qk", "--k", "4",
                 "--device", "cpu"]) == 2
    assert "cannot be loaded as a 'qk' gate" in capsys.readouterr().err
