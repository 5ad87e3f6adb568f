"""The pretrained-model suite end to end on a tiny random Llama (CPU): every table's units, skip, report."""
import json

import numpy as np
import pytest

pytest.importorskip("transformers")

from gatelab.hf import attach_gates, set_trainable  # noqa: E402
from gatelab.pretrained import PROTOCOLS, PretrainedSuite, middle_layers, write_pretrained_report  # noqa: E402

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
    assert len(status) == len(suite.units) == 1 + 2 + 2 + 1 + 3 + 4 and len(loads) == 1
    assert all(s.startswith("ran") for s in status.values()), status
    res = {n: json.loads((tmp_path / "out" / "units" / n / "result.json").read_text()) for n in suite.units}
    # Table 7: only the middle layer trains, and only it is gated; the random gate stays as initialised
    assert res["table7-learned"]["unfrozen_layers"] == [0] and res["table7-none"]["gate"] == "none"
    assert res["table8-n0-random"]["summary"] is None  # nothing trainable: evaluated, not trained
    assert len(res["table8-n1-learned"]["curve"]) == p.task_steps
    assert set(res["table6-kl-d4"]["evals"]) == {"gate-topk@k=4", "gate-topk@k=8"}
    assert 0.0 <= res["table6-bce-d4-k4"]["val_f1"]["4"] <= 1.0
    # every unit started from the pristine weights: a second suite's dense eval equals the first's
    again = PretrainedSuite(p, load, train_ids, val_ids, tmp_path / "out", tmp_path / "runs", "tiny-llama",
                            progress=False).run()
    assert all(s == "done (skipped)" for s in again.values())
    report = write_pretrained_report(tmp_path / "out", p).read_text()
    for heading in ("## Table 9", "## Table 6", "## Table 7", "## Table 8"):
        assert heading in report
    assert (tmp_path / "out" / "figure3_gap_vs_unfrozen.png").stat().st_size > 1000


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
    from gatelab.pretrained import _loss_trend, _paired_gap
    flat = dict(curve=[(i + 1, 5.0 if i < 10 else 4.0) for i in range(100)])
    assert _loss_trend(flat) == "5.00 -> 4.00"
    rising = dict(curve=[(i + 1, 5.0 + i / 50) for i in range(100)])  # first tenth mean 5.09, last 6.89
    assert _loss_trend(rising) == "5.09 -> 6.89 (diverged)"
    assert _loss_trend(dict(curve=[])) == "not trained" and _loss_trend(None) == "-"
    # the paired gap (random - learned) by tenth: rising - flat
    assert _paired_gap(flat, rising).split() == ["0.090", "1.290", "1.490", "1.690", "1.890", "2.090", "2.290",
                                                 "2.490", "2.690", "2.890"]
    assert _paired_gap(flat, dict(curve=[])) == "-"
