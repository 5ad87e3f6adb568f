"""The pretrained-model suite end to end on a tiny random Llama (CPU): every table's units, skip, report."""
import json

import numpy as np
import pytest

pytest.importorskip("transformers")

from gatelab.attention.position_gates import DEFAULT_POSITION  # noqa: E402
from gatelab.hf.adapter import attach_gates, set_trainable  # noqa: E402
from gatelab.reproduce.pretrained import PROTOCOLS, PretrainedSuite, middle_layers
from gatelab.reproduce.report.pretrained import write_pretrained_report  # noqa: E402

from .test_hf import tiny  # noqa: E402


def test_middle_layers():
    assert middle_layers(30, 0) == [] and middle_layers(30, 1) == [14] and middle_layers(30, 2) == [14, 15]
    assert middle_layers(30, 8) == list(range(11, 19)) and middle_layers(2, 2) == [0, 1]


def test_smoke_suite_runs_skips_and_reports(tmp_path):
    p = PROTOCOLS["smoke"]
    rng = np.random.default_rng(0)
    train_ids, val_ids = rng.integers(0, 101, 4000).tolist(), rng.integers(0, 101, 600).tolist()
    loads = []

    def load():
        loads.append(1)
        return tiny("llama")
    suite = PretrainedSuite(p, load, train_ids, val_ids, tmp_path / "out", tmp_path / "runs", "tiny-llama",
                            progress=False)
    status = suite.run()
    # table9, table6 KL x 2 + BCE x 3, table7 x 3, table8 x 4, the variant study 3 x 1, Table 6 BCE of a variant x 2
    assert len(status) == len(suite.units) == 1 + 2 + 2 + 1 + 3 + 4 + 3 + 2 and len(loads) == 1
    assert all(s.startswith("ran") for s in status.values()), status
    res = {n: json.loads((tmp_path / "out" / "units" / n / "result.json").read_text()) for n in suite.units}
    # Table 7: only the middle layer trains, and only it is gated; the random gate stays as initialised
    assert res["table7-learned"]["unfrozen_layers"] == [0] and res["table7-none"]["gate"] == "none"
    assert res["table7-learned"]["position"] == "none"  # Tables 7-8 keep the paper's (pre-RoPE) gate form
    assert res["table8-n0-random"]["summary"] is None  # nothing trainable: evaluated, not trained
    assert len(res["table8-n1-learned"]["curve"]) == p.task_steps
    assert set(res["table6-kl-d4"]["evals"]) == {"gate-topk@k=4", "gate-topk@k=8"}
    assert 0.0 <= res["table6-bce-d4-k4"]["val_f1"]["4"] <= 1.0
    # every unit started from the pristine weights: a second suite's dense eval equals the first's
    again = PretrainedSuite(p, load, train_ids, val_ids, tmp_path / "out", tmp_path / "runs", "tiny-llama",
                            progress=False).run()
    assert all(s == "done (skipped)" for s in again.values())
    # the variant study: every variant, trained until the held-out KL stopped improving, F1 per layer
    for pos in ("none", "rope", "qk"):
        r = res[f"pos-{pos}-kl-d4"]
        assert r["position"] == pos and set(r["evals"]) == {"gate-topk@k=4", "gate-topk@k=8"}
        assert r["summary"]["max_steps"] == p.converge_max_steps and r["val_curve"]
        assert len(r["val_f1_layers"]["4"]) == 2 and r["val_f1"]["4"] == pytest.approx(np.mean(r["val_f1_layers"]["4"]))
        gate = json.loads((tmp_path / "runs" / f"pos-{pos}-kl-d4" / "gate.json").read_text())
        assert gate["position"] == pos
    rerun = res[f"table6-{DEFAULT_POSITION}-bce-d4-k8"]  # Table 6 again, with the default variant
    assert rerun["position"] == DEFAULT_POSITION and rerun["k"] == 8
    report = write_pretrained_report(tmp_path / "out", p).read_text()
    for heading in ("## Table 9", "## Table 6", "## Table 7", "## Table 8", "## Gate variants",
                    f"## Table 6 with {DEFAULT_POSITION} gates", "F1 at k = 4 per layer"):
        assert heading in report
    study = report.split("## Gate variants")[1].split("F1 at k = 4 per layer")[0]
    assert sum(line.startswith(("| none |", "| rope |", "| qk |")) for line in study.splitlines()) == 3 * 2
    assert (tmp_path / "out" / "figure3_gap_vs_unfrozen.png").stat().st_size > 1000
    assert (tmp_path / "out" / "position_gates_heldout_kl.png").stat().st_size > 1000


def test_units_start_from_pristine_weights(tmp_path):
    """After a unit fine-tunes layers, the next unit sees the original weights and no leftover gates."""
    p = PROTOCOLS["smoke"]
    suite = PretrainedSuite(p, lambda: tiny("llama"), list(range(100)) * 40, list(range(100)) * 6, tmp_path / "o",
                            tmp_path / "r", "tiny", progress=False)
    m = suite.fresh_model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    attach_gates(m, d_gate=4, gate="learned")
    set_trainable(m, layers=[1])
    for q in m.parameters():
        if q.requires_grad:
            q.data.add_(1.0)
    m2 = suite.fresh_model()
    assert m2 is m and not hasattr(m2, "gatelab_gates")
    assert all((m2.state_dict()[k] == v).all() for k, v in before.items())
    assert not any(q.requires_grad for q in m2.parameters())


def test_another_soft_gate_reading_gets_its_own_units_and_tables(tmp_path):
    p = PROTOCOLS["smoke"]
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 101, 3000).tolist()
    args = (p, lambda: tiny("llama"), ids, ids[:600], tmp_path / "out", tmp_path / "runs", "tiny")
    PretrainedSuite(*args, progress=False).run(only=["table8-n1"])
    other = PretrainedSuite(*args, progress=False, reading="sigmoid-renorm")
    assert "table8-n1-learned-sigmoid-renorm" in other.units and "table9" in other.units
    other.run(only=["table8-n1"])
    res = json.loads((tmp_path / "out" / "units" / "table8-n1-random-sigmoid-renorm" / "result.json").read_text())
    assert res["reading"] == "sigmoid-renorm" and "renorm" in next(iter(res["evals"]))
    report = write_pretrained_report(tmp_path / "out", p).read_text()
    assert "## Table 8 / Figure 3: n middle layers unfrozen, soft gates on all layers (soft-gate reading sigmoid)" \
        in report and "(soft-gate reading sigmoid-renorm)" in report


def test_loss_trend_and_paired_gap_average_tenths_and_flag_divergence():
    from gatelab.reproduce.report.pretrained import _loss_trend, _paired_gap
    flat = dict(curve=[(i + 1, 5.0 if i < 10 else 4.0) for i in range(100)])
    assert _loss_trend(flat) == "5.00 -> 4.00"
    rising = dict(curve=[(i + 1, 5.0 + i / 50) for i in range(100)])  # first tenth mean 5.09, last 6.89
    assert _loss_trend(rising) == "5.09 -> 6.89 (diverged)"
    assert _loss_trend(dict(curve=[])) == "not trained" and _loss_trend(None) == "-"
    # the paired gap (random - learned) by tenth: rising - flat
    assert _paired_gap(flat, rising).split() == ["0.090", "1.290", "1.490", "1.690", "1.890", "2.090", "2.290",
                                                 "2.490", "2.690", "2.890"]
    assert _paired_gap(flat, dict(curve=[])) == "-"


def test_table6_of_another_variant_gets_its_own_units(tmp_path):
    from gatelab.config import GatelabError
    p = PROTOCOLS["smoke"]
    ids = np.random.default_rng(2).integers(0, 101, 3000).tolist()
    suite = PretrainedSuite(p, lambda: tiny("qwen3"), ids, ids[:600], tmp_path / "out", tmp_path / "runs", "tiny",
                            progress=False, position="rope")
    assert "table6-rope-bce-d4-k4" in suite.units and "table6-none-bce-d4-k4" not in suite.units
    assert [u.name for u in suite.select(["positions"])] == ["pos-none-kl-d4", "pos-rope-kl-d4", "pos-qk-kl-d4"]
    suite.run(only=["pos-rope-kl-d4", "table6-rope-bce-d4-k4"])
    report = write_pretrained_report(tmp_path / "out", p).read_text()
    table = report.split("## Table 6 with rope gates")[1].split("##")[0]
    assert "| kl | 4 | - | 4 |" in table and "| bce | 4 | 4 | 4 |" in table
    with pytest.raises(GatelabError, match="position"):
        PretrainedSuite(p, lambda: tiny("qwen3"), ids, ids, tmp_path / "o", tmp_path / "r", "tiny", position="alibi")


def test_gap_closed_and_steps_taken():
    from gatelab.reproduce.report.pretrained import _gap_closed, _steps_taken
    t9 = dict(evals={"random-topk@k=64": 440.0, "oracle-topk@k=64": 40.0})
    assert _gap_closed(60.0, t9, 64) == pytest.approx(0.95) and _gap_closed(60.0, None, 64) is None
    assert _gap_closed(60.0, t9, 128) is None
    assert _steps_taken(dict(summary=dict(steps=350, max_steps=1000, best_step=300))) == "350/1000 (best 300)"
    assert _steps_taken(dict(summary=dict(steps=500))) == "500"


def _pos_unit(root, pos, d, ppls):
    unit = root / "units" / f"pos-{pos}-kl-d{d}"
    unit.mkdir(parents=True)
    evals = {f"gate-topk@k={k}": v for k, v in ppls.items()}
    (unit / "result.json").write_text(json.dumps(dict(table="positions", position=pos, d_gate=d, evals=evals)))


def test_choose_position_follows_the_written_rule(tmp_path):
    from gatelab.reproduce.report.pretrained import choose_position, position_scores
    t9 = tmp_path / "units" / "table9"
    t9.mkdir(parents=True)
    (t9 / "result.json").write_text(json.dumps(dict(table="table9", evals={"oracle-topk@k=64": 40.0,
                                                                           "oracle-topk@k=128": 38.0})))
    _pos_unit(tmp_path, "none", 32, {64: 60.0, 128: 45.0})
    _pos_unit(tmp_path, "rope", 32, {64: 44.0, 128: 39.0})
    assert choose_position(tmp_path) == DEFAULT_POSITION  # qk has not run: the default stays
    _pos_unit(tmp_path, "qk", 32, {64: 44.5, 128: 40.0})
    scores = position_scores(tmp_path)
    assert scores["rope"] == pytest.approx(((44 / 40) * (39 / 38)) ** 0.5)
    assert scores["qk"] == pytest.approx(((44.5 / 40) * (40 / 38)) ** 0.5)
    assert choose_position(tmp_path) == "rope"  # 1.0625 < 1.0822 (qk) < 1.2990 (none)
    _pos_unit(tmp_path, "qk", 64, {64: 41.0, 128: 38.5})
    assert choose_position(tmp_path) == DEFAULT_POSITION  # unequal unit counts: the study is incomplete
