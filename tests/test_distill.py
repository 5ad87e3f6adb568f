"""Post-hoc gates: frozen model, each loss, gate export/attach, diagnostics."""
import json

import pytest
import torch

from gatelab.attention.masks import causal_mask
from gatelab.cli.main import main
from gatelab.config import GatelabError
from gatelab.data import TokenData
from gatelab.diagnostics.analyze import analyze, attention_statistics, gate_gradient_norms
from gatelab.model import GPT
from gatelab.training.checkpoint import load_model, load_state
from gatelab.diagnostics.probes import attention_logits, gate_f1, layer_inputs
from gatelab.training.distill import distill_config, distill_loss, kl_rows
from gatelab.training.gate_files import attach_gate
from gatelab.training.train import train
from tests.conftest import tiny_model_config, tiny_train_config


@pytest.fixture
def base(token_corpus, tmp_path):
    """A small dense checkpoint trained briefly, so its attention is not uniform."""
    cfg = tiny_train_config(token_corpus, steps=30)
    train(cfg, tmp_path / "base", progress=False)
    return tmp_path / "base" / "checkpoint"


def metric(run, key):
    return [json.loads(line)[key] for line in (run / "metrics.jsonl").read_text().splitlines()
            if key in json.loads(line)]


@pytest.mark.parametrize("loss", ["kl", "bce", "task"])
def test_distillation_freezes_the_model_and_lowers_its_loss(base, tmp_path, loss):
    cfg = distill_config(base, loss, k=4, d_gate=8, steps=40, batch_size=8, lr=1e-2,
                         overrides=dict(device="cpu", log_every=1))
    train(cfg, tmp_path / "gate", progress=False)
    losses = metric(tmp_path / "gate", "loss")
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    if loss != "task":
        f1 = metric(tmp_path / "gate", "f1")
        assert sum(f1[-5:]) / 5 > sum(f1[:5]) / 5
    before = load_state(base)
    after = load_state(tmp_path / "gate" / "checkpoint")
    for key, value in before.items():
        assert torch.equal(value, after[key]), f"{key} changed during distillation"
    meta = json.loads((tmp_path / "gate" / "gate.json").read_text())
    assert meta["d_gate"] == 8 and meta["k"] == 4 and meta["loss"] == loss and len(meta["base_sha256"]) == 64


def test_kl_is_zero_when_the_gate_reproduces_the_attention_logits():
    cfg = tiny_model_config(gate="learned", d_gate=8)  # d_gate == d_head == 32 / 4
    model = GPT(cfg)
    C, H, D = cfg.d_model, cfg.n_head, cfg.d_head
    for block in model.blocks:
        torch.nn.init.zeros_(block.attn.qkv.bias)  # the bilinear gate has no bias
        W = block.attn.qkv.weight  # (3C, C): rows [0:C] are W_q, [C:2C] W_k
        block.attn.gate.wq.data = W[:C].view(H, D, C).transpose(1, 2).clone()
        block.attn.gate.wk.data = W[C:2 * C].view(H, D, C).transpose(1, 2).clone()
    x = torch.randint(0, 97, (2, 32))
    loss, f1 = distill_loss(model, x, "kl", k=4)
    assert float(loss.detach()) < 1e-5
    assert f1 == pytest.approx(1.0)
    inputs = layer_inputs(model, x)
    S = attention_logits(model.blocks[0].attn, inputs[0])
    G = model.blocks[0].attn.gate(inputs[0])
    assert torch.allclose(S, G, atol=1e-5)
    assert float(kl_rows(50 * S, torch.zeros_like(S), causal_mask(32, "cpu"))) > 0.01


def test_gate_f1_counts_overlap_over_rows_with_more_than_k_keys():
    T, k = 8, 2
    causal = causal_mask(T, "cpu")
    S = torch.arange(T, dtype=torch.float32).expand(1, 1, T, T).clone()  # oracle: the two latest keys
    assert float(gate_f1(S, S.clone(), causal, k)) == 1.0
    # the two earliest keys: row 2 (keys 0-2) shares key 1 with the oracle, rows 3-7 share nothing
    assert float(gate_f1(S, -S, causal, k)) == pytest.approx(0.5 / 6)
    G = S.clone()
    G[..., 0] = 100.0  # key 0 always first: one of two right in every row with > 2 keys
    assert float(gate_f1(S, G, causal, k)) == pytest.approx(0.5)


def test_attach_gate_refuses_other_shapes_and_other_bases(base, tmp_path, token_corpus, capsys):
    cfg = distill_config(base, "kl", k=4, d_gate=8, steps=3, batch_size=4, overrides=dict(device="cpu"))
    train(cfg, tmp_path / "gate", progress=False)
    model, _ = load_model(base)
    with pytest.raises(GatelabError, match="another shape"):
        attach_gate(GPT(tiny_model_config(n_layer=3)), tmp_path / "gate")
    with pytest.raises(GatelabError, match="not a gate"):
        attach_gate(model, tmp_path)
    other = tiny_train_config(token_corpus, steps=3, seed=1)
    train(other, tmp_path / "other", progress=False)
    with pytest.raises(GatelabError, match="another checkpoint"):
        attach_gate(model, tmp_path / "gate", tmp_path / "other" / "checkpoint")
    capsys.readouterr()
    attach_gate(model, tmp_path / "gate", tmp_path / "other" / "checkpoint", allow_other_base=True)
    assert "WARNING" in capsys.readouterr().err
    meta = attach_gate(model, tmp_path / "gate", base)
    assert meta["loss"] == "kl" and len(model.gates()) == 2


def test_distill_then_deploy_through_the_cli(base, tmp_path, capsys):
    out = tmp_path / "gate"
    assert main(["distill", str(base), "--loss", "bce", "--k", "4", "--d-gate", "8", "--steps", "5",
                 "--batch-size", "4", "--out", str(out), "--quiet", "device=cpu"]) == 0
    capsys.readouterr()
    assert main(["eval", str(base), "--gate", str(out), "--routing", "dense,oracle-topk,gate-topk", "--k", "4,8",
                 "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "gate-topk | 4" in table and "gate-topk | 8" in table
    # rerunning the finished distillation skips it
    assert main(["distill", str(base), "--loss", "bce", "--k", "4", "--d-gate", "8", "--steps", "5",
                 "--batch-size", "4", "--out", str(out), "--quiet", "device=cpu"]) == 0
    assert "already finished" in capsys.readouterr().out
    # gate routing without a gate, k beyond the context, a gate from another model
    assert main(["eval", str(base), "--routing", "gate-topk", "--quiet"]) == 2
    assert main(["distill", str(base), "--k", "99", "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "larger than the context" in capsys.readouterr().err


def test_random_control_writes_the_frozen_initial_gate(base, tmp_path):
    assert main(["distill", str(base), "--loss", "task", "--k", "4", "--d-gate", "8", "--random-control",
                 "--out", str(tmp_path / "rand"), "--quiet", "device=cpu"]) == 0
    meta = json.loads((tmp_path / "rand" / "gate.json").read_text())
    assert meta["frozen_random"] and meta["loss"] == "task"


def test_analyze_gradients_concentration_and_outputs(base, tmp_path):
    model, _ = load_model(base)
    model.blocks[0].attn.gate = None
    from gatelab.attention.gates import BilinearGate
    for b in model.blocks:
        b.attn.gate = BilinearGate(32, 4, 8)
    data = TokenData(tmp_path / "corpus", "validation")
    xs = [torch.stack([c[0] for c in list(data.chunks(32))[:4]])]
    ys = [torch.stack([c[1] for c in list(data.chunks(32))[:4]])]
    grads = {g["routing"]: g for g in gate_gradient_norms(model, xs[0], ys[0], 4)}
    assert grads["gate-topk"]["exactly_zero"] and not grads["gate-topk"]["gradient_path"]
    assert grads["soft-gate"]["gate_grad_norm"] > 0
    for mode in ("dense", "oracle-topk", "random-topk", "stochastic"):
        assert grads[mode]["exactly_zero"]
    stats = attention_statistics(model, xs, [4, 32])
    overall = stats[-1]
    assert overall["layer"] == "all"
    assert 0 < overall["top4_mass"] < 1 and 0 < overall["entropy_ratio"] < 1
    assert "top32_mass" in overall  # k == T: no row has more than k keys, reported as 0 rows averaged
    res = analyze(model, data, [4, 8], tmp_path / "an", batches=2, batch_size=2, title="t")
    assert (tmp_path / "an" / "concentration.png").stat().st_size > 1000
    assert json.loads((tmp_path / "an" / "analysis.json").read_text())["ks"] == [4, 8]
    assert res["layers"][-1]["top8_mass"] >= res["layers"][-1]["top4_mass"]


def test_audit_hard_gate_equals_random_and_distilled_gate_beats_it(token_corpus, tmp_path, capsys):
    from gatelab.config import Routing as R
    cfg = tiny_train_config(token_corpus, model=tiny_model_config(gate="learned"), routing=R(mode="gate-topk", k=4),
                            steps=6)
    train(cfg, tmp_path / "hard", progress=False)
    assert main(["audit", str(tmp_path / "hard" / "checkpoint"), "--k", "4", "--json", str(tmp_path / "a.json"),
                 "--device", "cpu"]) == 0
    res = json.loads((tmp_path / "a.json").read_text())
    # a hard top-k gate never receives a gradient, so the "learned" gate is its frozen initialisation
    assert res["summary"]["learned_vs_random"] == 0.0
    assert "frozen random gate" in capsys.readouterr().out
    # the paper's control: the same run with its random gate frozen from the start. Hard top-k trains both alike
    # (the learned gate gets no gradient), so the two models are one and the gap is exactly zero
    control = tiny_train_config(token_corpus, model=tiny_model_config(gate="random"), routing=R(mode="gate-topk", k=4),
                                steps=6)
    train(control, tmp_path / "control", progress=False)
    assert main(["audit", str(tmp_path / "hard" / "checkpoint"), "--control", str(tmp_path / "control" / "checkpoint"),
                 "--k", "4", "--json", str(tmp_path / "c.json"), "--device", "cpu"]) == 0
    res = json.loads((tmp_path / "c.json").read_text())
    assert res["summary"]["learned_vs_control"] == {"gate-topk@k=4": 0.0}
    assert "control trained with a frozen random gate" in capsys.readouterr().out
    dense = tiny_train_config(token_corpus, steps=30)
    train(dense, tmp_path / "dense", progress=False)
    base = tmp_path / "dense" / "checkpoint"
    train(distill_config(base, "kl", k=4, d_gate=8, steps=40, batch_size=8, lr=1e-2, overrides=dict(device="cpu")),
          tmp_path / "kl", progress=False)
    assert main(["audit", str(base), "--gate", str(tmp_path / "kl"), "--k", "4", "--json",
                 str(tmp_path / "b.json"), "--device", "cpu"]) == 0
    res = json.loads((tmp_path / "b.json").read_text())
    assert res["summary"]["learned_vs_random"] > 0
    assert main(["audit", str(base), "--k", "4"]) == 2  # no gate: a clear error
    assert main(["audit", str(tmp_path / "hard" / "checkpoint"), "--control", str(base), "--k", "4",
                 "--device", "cpu"]) == 2  # a control without a gate: a clear error
