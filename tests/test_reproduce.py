"""The reproduction suite end to end on the smoke protocol: units, skip-finished, report.

These tests run the smoke protocol's units at a smaller size than `gatelab reproduce --protocol smoke` (fewer
steps, batch 2, 256 evaluation tokens): a step of its tiny model is dominated by the 50,257-way output head, and
the pipeline, not the numbers, is what they check."""
import json
from dataclasses import replace

import pytest
import torch

import gatelab.reproduce.suite as reproduce_module
from gatelab.reproduce.suite import PROTOCOLS, reproduce

SMALLER = dict(steps=4, batch_size=2, eval_every=2, eval_tokens=256, distill_steps=3, task_steps=3,
               task_eval_every=1, warmup_steps=1)


@pytest.fixture
def small_smoke(monkeypatch):
    monkeypatch.setitem(reproduce_module.PROTOCOLS, "smoke", replace(PROTOCOLS["smoke"], **SMALLER))


@pytest.mark.slow
def test_smoke_protocol_runs_resumes_and_reports(workdir, small_smoke):
    out = workdir / "results"
    first = reproduce("smoke", out=str(out), only=["baseline", "exp2"], progress=False, device="cpu")
    assert set(first) == {"dense", "dense-s1", "exp2-hard-learned", "exp2-hard-random", "exp2-gradient-check"}
    assert all(s.startswith("ran") for s in first.values())
    assert (out / "runs" / "dense" / "checkpoint" / "model.safetensors").is_file()  # --runs defaults to OUT/runs
    assert not (workdir / "runs").exists()
    # a second, full run skips what is finished and runs the rest
    status = reproduce("smoke", out=str(out), progress=False, device="cpu")
    assert len(status) == 47
    assert all(status[n] == "done (skipped)" for n in first)
    assert sum(s.startswith("ran") for s in status.values()) == 42
    report = (out / "REPORT.md").read_text()
    for heading in ("## Verdicts", "## The soft-gate reading study", "Experiment 1 (Table 1)", "Experiment 2",
                    "Table 2", "Table 3", "## Table 4", "## Table 5", "## Figure 1",
                    "## Block routing: absorbed like token routing?", "## The regime study",
                    "### Experiment 1 with power", "## Criteria and their history"):
        assert heading in report
    assert "**Block routing (beyond the paper): " in report
    assert "not run" not in report.split("## Block routing: absorbed")[1].split("## The regime study")[0]
    # every cell of the smoke grid ran, and the regime verdict judged it
    assert "not run" not in report.split("## The regime study")[1].split("Cost = perplexity")[0]
    assert "**Regime study (beyond the paper): " in report and (out / "regime_costs.png").stat().st_size > 1000
    # the block ablation: the learned soft block gate trained, the frozen one did not; the post-hoc gate deployed
    unit = lambda n: json.loads((out / "units" / n / "result.json").read_text())  # noqa: E731
    # Experiments 3 and 4 at every seed, each seed paired with its own dense run; the regime cells' settings
    exp4 = report.split("## Experiment 4")[1].split("## Table 4")[0]
    assert "| 0 | " in exp4 and "| 1 | " in exp4 and "95% CI" in exp4
    assert "| 1 | " in report.split("## Experiment 3")[1].split("## Experiment 4")[0]
    assert unit("exp3-bce-on-exp1-sigmoid-learned-s1")["base"] == "exp1-sigmoid-learned-s1"
    assert unit("exp3-bce-on-dense-s1")["base"] == "dense-s1" and unit("dense-s1")["config"]["seed"] == 1
    assert all(unit(n)["finished_at"].endswith("Z") for n in ("dense", "exp4-stochastic-s1", "regime-data4-dense"))
    assert unit("regime-data4-soft-sigmoid")["config"]["train_fraction"] == 0.25
    assert unit("regime-scale10-soft-sigmoid")["config"]["routing"]["soft_temperature"] == 0.1
    assert unit("regime-base-random-topk")["config"]["routing"]["mode"] == "random-topk"
    assert unit("block-soft-learned-s0")["gate_params_unchanged_from_init"] is False
    assert unit("block-soft-random-s0")["gate_params_unchanged_from_init"] is True
    post = unit("block-posthoc-kl")
    assert 0.0 <= post["val_f1"] <= 1.0 and list(post["evals"]) == ["block-gate@b=8,k=2"]
    assert set(unit("block-on-dense")["evals"]) == {"dense", "block-oracle@b=8,k=2", "block-random@b=8,k=2"}
    assert "not run" not in report.split("## Table 5")[0]
    # the study is complete, so the written rule chose a reading and the report says which (on this tiny model it
    # may differ from the default, which the report then flags)
    assert "he rule chooses `" in report and "The study is not complete" not in report
    assert report.count("reproduced") >= 4
    assert (out / "figure2a_gate_only.png").stat().st_size > 1000
    assert (out / "units" / "fig1-concentration" / "concentration.png").is_file()
    hard = json.loads((out / "units" / "exp2-hard-learned" / "result.json").read_text())
    assert hard["gate_params_unchanged_from_init"] is True
    grads = json.loads((out / "units" / "exp2-gradient-check" / "result.json").read_text())["gate_gradients"]
    assert next(g for g in grads if g["routing"] == "gate-topk")["exactly_zero"]


@pytest.mark.slow
def test_demo_main_job_runs(workdir):
    """The README's main job, shortened: prepare the bundled corpus (here already current), train both models,
    print the table."""
    from gatelab.reproduce.demo import run_demo
    tmp_path = workdir
    table = run_demo(tmp_path / "demo", steps=2, progress=False, eval_tokens=1024)
    rows = [line for line in table.splitlines() if line.startswith("| ") and "val_ppl" not in line]
    assert [r.split(" | ")[0] for r in rows] == ["| dense"] * 3 + ["| soft-gate-learned"] * 5
    assert (tmp_path / "data" / "prepared" / "bundled" / "train.bin").is_file()
    assert json.loads((tmp_path / "demo" / "results.json").read_text())["rows"][0]["tokens"] == 1024


@pytest.mark.slow
def test_sweep_over_two_workers_matches_the_sequential_run(workdir, monkeypatch, request):
    """`--gpus 2 --device cpu`: units as child processes on two workers, each as soon as its dependency is done;
    the results equal the in-process run's, and a second sweep skips everything. (--steps 4, which the children
    are given too, keeps it short.)"""
    tmp_path = workdir
    only = ["dense", "table4"]
    # one thread here and in each child, so that float sums run in the same order (an MKL product may change
    # with the number of threads); the children would otherwise get cores // workers threads each
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    seq = reproduce("smoke", out=str(tmp_path / "seq"), runs=str(tmp_path / "seq-runs"), only=only, progress=False,
                    device="cpu", report=False, steps=4)
    par = reproduce("smoke", out=str(tmp_path / "par"), runs=str(tmp_path / "par-runs"), only=only, progress=False,
                    device="cpu", report=False, gpus=2, steps=4)
    assert set(par) == set(seq) == {"dense", "table4-kl-8", "table4-kl-16", "table4-kl-32"}
    assert all(s.startswith("ran") and s.endswith("on cpu") for s in par.values()), par
    for name in seq:
        a = json.loads((tmp_path / "seq" / "units" / name / "result.json").read_text())
        b = json.loads((tmp_path / "par" / "units" / name / "result.json").read_text())
        assert a["evals"] == b["evals"], name
    assert (tmp_path / "par-runs" / "logs" / "table4-kl-8.log").is_file()
    again = reproduce("smoke", out=str(tmp_path / "par"), runs=str(tmp_path / "par-runs"), only=only, progress=False,
                      device="cpu", report=False, gpus=2, steps=4)
    assert all(s == "done (skipped)" for s in again.values())


def test_gpus_beyond_the_visible_ones_is_refused():
    import pytest

    from gatelab.config import GatelabError
    from gatelab.reproduce.workers import workers_for
    with pytest.raises(GatelabError, match="GPU"):
        workers_for(64, "auto")
    assert workers_for(3, "cpu") == ["cpu"] * 3 and workers_for(1, "cpu") is None
    assert workers_for(None, "cpu", per_gpu=2) == ["cpu"] * 2 and workers_for(2, "cpu", per_gpu=2) == ["cpu"] * 4
    with pytest.raises(GatelabError, match="jobs-per-gpu"):
        workers_for(None, "cpu", per_gpu=0)


def test_jobs_per_gpu_multiplies_the_workers_on_cuda(monkeypatch):
    """--gpus 2 --jobs-per-gpu 4 is 8 workers, 4 per GPU, spread over the GPUs first (on a machine with 2 GPUs)."""
    from gatelab.config import GatelabError
    from gatelab.reproduce.workers import workers_for
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert workers_for(2, "cuda", per_gpu=4) == ["0", "1"] * 4
    assert workers_for("all", "auto", per_gpu=2) == ["0", "1", "0", "1"]
    assert workers_for(None, "cuda", per_gpu=3) == ["0"] * 3
    assert workers_for(2, "cuda") == ["0", "1"] and workers_for(None, "cuda") is None
    with pytest.raises(GatelabError, match="only 2 GPU"):
        workers_for(3, "cuda", per_gpu=2)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(GatelabError, match="--jobs-per-gpu needs a GPU"):
        workers_for(None, "auto", per_gpu=2)


def test_reproduce_runs_default_under_out():
    from pathlib import Path

    from gatelab.reproduce.suite import output_folders
    assert output_folders(None, None, "smoke") == (Path("results/smoke"), Path("runs/smoke"))
    assert output_folders("/tmp/x", None, "smoke") == (Path("/tmp/x"), Path("/tmp/x/runs"))
    assert output_folders("/tmp/x", "/ckpt", "smoke") == (Path("/tmp/x"), Path("/ckpt"))
    assert output_folders(None, "/ckpt", "pretrained") == (Path("results/pretrained"), Path("/ckpt"))
    from gatelab.cli.main import build_parser
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert "OUT/runs" in sub.choices["reproduce"].format_help()
