"""`gatelab reproduce --executor slurm` against a real single-node Slurm (tests/slurm_cluster.py; skipped, with the
reason, where the cluster cannot start; with GATELAB_REQUIRE_SLURM=1, as in .ci/run after installing Slurm, that
is a failure instead): the smoke protocol's jobs with their dependencies, a job killed mid-unit and the sweep
resumed, the results equal to a local run's; the units' states; bad options refused before any submission."""
import json
import os
import re
import subprocess
import time
from dataclasses import replace

import pytest
import torch

import gatelab.reproduce.suite as reproduce_module
from gatelab.cli.main import main
from gatelab.reproduce.suite import PROTOCOLS, reproduce

from .slurm_cluster import LocalSlurm, unavailable
from .test_reproduce import SMALLER

pytestmark = pytest.mark.slow  # jobs on a local Slurm cluster

# the smoke protocol at the test size, with training long enough (40 steps, a checkpoint every 8) to kill a job
# between its first checkpoint and its end (scancel: SIGTERM, which submitit lets pass, then SIGKILL 2 s later)
LONGER = dict(SMALLER, steps=40, eval_every=8)
ONLY = "dense,exp2"  # dense; exp2-hard-learned and -random; exp2-gradient-check, which needs exp2-hard-learned


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    required = os.environ.get("GATELAB_REQUIRE_SLURM") == "1"
    reason = unavailable()
    if reason:
        (pytest.fail if required else pytest.skip)(f"no single-node Slurm: {reason}")
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        cluster.stop()
        (pytest.fail if required else pytest.skip)(f"cannot start a single-node Slurm: {e}")
    before = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    yield cluster
    cluster.stop()
    if before is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = before


@pytest.fixture
def one_thread(monkeypatch, request):
    """One thread here and in every job (the jobs inherit the environment), so that float sums run in the same
    order in both runs."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))


def _slurm(workdir, out: str, *extra: str) -> list[str]:
    config = workdir / "slurm.json"
    config.write_text(json.dumps(dict(poll_seconds=0.5, time=15)))
    return ["reproduce", "--protocol", "smoke", "--device", "cpu", "--only", ONLY, "--out", str(workdir / out),
            "--executor", "slurm", "--slurm-config", str(config), "--quiet", *extra]


def _wait_for(ready, timeout: float, what: str):
    t0 = time.time()
    while not ready():
        assert time.time() - t0 < timeout, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.1)


def _evals(out) -> dict:
    return {d.name: json.loads((d / "result.json").read_text()).get("evals")
            for d in sorted((out / "units").iterdir())}


def _report(out) -> str:
    """REPORT.md without its line of wall times."""
    return "\n".join(x for x in (out / "REPORT.md").read_text().splitlines() if not x.startswith("Units finished"))


def test_smoke_through_slurm_killed_and_resumed_equals_local(workdir, monkeypatch, slurm_cluster, one_thread,
                                                              capsys):
    monkeypatch.setitem(reproduce_module.PROTOCOLS, "smoke", replace(PROTOCOLS["smoke"], **LONGER))
    local = reproduce("smoke", out=str(workdir / "local"), only=ONLY.split(","), progress=False, device="cpu")
    assert len(local) == 4 and all(s.startswith("ran") for s in local.values())

    # submit and return: four jobs, the gradient check after exp2-hard-learned's job (afterok)
    assert main(_slurm(workdir, "slurm", "--slurm-no-wait")) == 0
    jobs = json.loads((workdir / "slurm" / "runs" / "slurm" / "jobs.json").read_text())
    assert set(jobs) == set(local)
    dep = slurm_cluster.run("scontrol", "show", "job", jobs["exp2-gradient-check"]["job"]).stdout
    assert f"afterok:{jobs['exp2-hard-learned']['job']}" in dep, dep
    assert "afterok" not in slurm_cluster.run("scontrol", "show", "job", jobs["dense"]["job"]).stdout

    # kill dense's job between its first checkpoint (step 8) and its end (step 40)
    runs = workdir / "slurm" / "runs"
    _wait_for(lambda: (runs / "dense" / "checkpoint").exists(), 300, "dense's first checkpoint")
    assert slurm_cluster.run("scancel", jobs["dense"]["job"]).returncode == 0
    _wait_for(lambda: jobs["dense"]["job"] not in slurm_cluster.jobs(), 60, "the cancelled job to end")
    assert not (runs / "dense" / "done.json").exists(), "the job finished before it was killed"
    capsys.readouterr()
    assert main(_slurm(workdir, "slurm", "--status")) == 0
    dense = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("dense "))
    assert re.search(r"dense +failed +Slurm job \d+\S* CANCELLED.*resumes from its checkpoint", dense), dense

    # the same command again: waits for the jobs still in Slurm, resubmits dense only, which resumes
    assert main(_slurm(workdir, "slurm")) == 0
    printed = capsys.readouterr().out
    again = json.loads((runs / "slurm" / "jobs.json").read_text())
    assert again["dense"]["job"] != jobs["dense"]["job"]
    assert all(again[n]["job"] == jobs[n]["job"] for n in jobs if n != "dense")
    assert re.search(r"dense +ran as Slurm job", printed), printed
    log = (runs / "logs" / "dense.log").read_text()  # the resumed job's log: its bar starts at a checkpoint
    assert re.search(r"train dense: +[2468]0%\|[^|]*\| [1-3]?[2468]/40 ", log), log[-3000:]
    assert _evals(workdir / "slurm") == _evals(workdir / "local")
    assert _report(workdir / "slurm") == _report(workdir / "local")

    # a third call finds everything done and submits nothing
    capsys.readouterr()
    assert main(_slurm(workdir, "slurm", "--status")) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "4 done, 0 running, 0 pending, 0 failed, 0 not submitted"


def test_bad_slurm_options_are_refused_before_submitting(workdir, slurm_cluster, capsys):
    before = slurm_cluster.run("squeue", "--noheader", "--states=all", "--format=%i").stdout.split()
    for extra, message in [(["--slurm-partition", "nosuch"], "Slurm refuses the job options (--partition=nosuch"),
                           (["--slurm-param", "qos-nonsense=1"], "Slurm refuses the job options"),
                           (["--slurm-param", "time=5"], "--slurm-param time is set by gatelab"),
                           (["--gpus", "2"], "--gpus applies to --executor local"),
                           (["--slurm-gpus-per-job", "2", "--slurm-tasks-per-job", "1"], "one rank per GPU")]:
        assert main(_slurm(workdir, "out", *extra)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("gatelab: error: ") and message in err[0], (extra, err)
    assert slurm_cluster.run("squeue", "--noheader", "--states=all", "--format=%i").stdout.split() == before
    assert not (workdir / "out" / "runs" / "slurm").exists()


def test_slurm_options_from_a_file_and_flags(tmp_path):
    from gatelab.config import GatelabError
    from gatelab.reproduce.slurm import options_from
    cfg = tmp_path / "slurm.toml"
    cfg.write_text('partition = "gpu"\ntime = 30\nsetup = ["source venv/bin/activate"]\n[params]\naccount = "lab"\n')
    opts = options_from(str(cfg), time=60, params={"mem": "32G"}, gpus_per_job=None)
    assert (opts.partition, opts.time, opts.params, opts.setup) == ("gpu", 60, {"account": "lab", "mem": "32G"},
                                                                   ["source venv/bin/activate"])
    assert (opts.gpus("cpu"), opts.gpus("auto"), opts.ranks("auto")) == (0, 1, 1)
    assert options_from(gpus_per_job=4).ranks("cuda") == 4 and options_from(tasks_per_job=2).ranks("cpu") == 2
    for bad, message in [(dict(time=0), "time must be an integer >= 1"), (dict(time="1h"), "time must be"),
                         (dict(poll_seconds=0), "poll_seconds must be a number > 0"),
                         (dict(params={"dependency": "afterok:1"}), "--slurm-param dependency is set by gatelab"),
                         (dict(setup="module load x"), "setup must be a list")]:
        with pytest.raises(GatelabError, match=message):
            options_from(**bad)
    cfg.write_text('partitions = "gpu"\n')
    with pytest.raises(GatelabError, match="unknown Slurm option.*partitions"):
        options_from(str(cfg))


def test_status_lists_units_and_slurm_flags_need_the_slurm_executor(workdir, capsys, monkeypatch):
    out = workdir / "r"
    (out / "units" / "dense").mkdir(parents=True)
    (out / "units" / "dense" / "result.json").write_text("{}")
    (out / "runs" / "exp2-hard-learned" / "checkpoint").mkdir(parents=True)
    assert main(["reproduce", "--protocol", "smoke", "--only", ONLY, "--out", str(out), "--status"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["dense", "done"]
    assert lines[1].split("  ")[0] == "exp2-hard-learned" and lines[1].endswith("resumes from its checkpoint")
    assert lines[-1] == "1 done, 0 running, 0 pending, 0 failed, 3 not submitted"
    assert main(["reproduce", "--protocol", "smoke", "--slurm-partition", "gpu"]) == 2
    assert capsys.readouterr().err.strip() == "gatelab: error: --slurm-partition applies to --executor slurm"
    assert main(["reproduce", "--protocol", "smoke", "--executor", "slurm", "--slurm-param", "mem"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err
    monkeypatch.setenv("PATH", str(workdir))  # no sbatch here
    assert main(["reproduce", "--protocol", "smoke", "--executor", "slurm", "--out", str(out)]) == 2
    assert "needs Slurm's sbatch, squeue, srun on PATH" in capsys.readouterr().err


def _losses(run) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_a_training_unit_over_two_ranks_is_one_job_of_two_tasks(workdir, monkeypatch, slurm_cluster, one_thread):
    """--slurm-tasks-per-job 2 on CPU nodes: dense trains as one job of two gloo ranks (srun), each computing half
    of every batch; the losses equal one process's up to the order of float sums."""
    monkeypatch.setitem(reproduce_module.PROTOCOLS, "smoke", replace(PROTOCOLS["smoke"], **SMALLER))
    reproduce("smoke", out=str(workdir / "local"), only=["dense"], progress=False, device="cpu", report=False)
    args = _slurm(workdir, "ddp", "--slurm-tasks-per-job", "2", "--no-report")
    assert main([x if x != ONLY else "dense" for x in args]) == 0
    runs = workdir / "ddp" / "runs"
    job = json.loads((runs / "slurm" / "jobs.json").read_text())["dense"]["job"]
    assert (runs / "slurm" / "logs" / f"{job}_1_log.out").is_file()  # the second task's log
    assert json.loads((runs / "dense" / "done.json").read_text())["world_size"] == 2
    assert _losses(runs / "dense") == pytest.approx(_losses(workdir / "local" / "runs" / "dense"), rel=1e-4)
    assert _evals(workdir / "ddp")["dense"] == pytest.approx(_evals(workdir / "local")["dense"], rel=1e-4)


def test_pretrained_units_run_as_jobs(workdir, slurm_cluster, one_thread, capsys):
    """--suite pretrained through Slurm: the job rebuilds the suite from the model folder and the cached tokens, and
    Table 9's unit gives the local run's numbers."""
    import numpy as np

    from gatelab.reproduce.pretrained import reproduce_pretrained

    from .test_blocks import _local_hf_model
    model, _ = _local_hf_model(workdir)
    rng = np.random.default_rng(0)
    ids = {"train": rng.integers(0, 101, 4000, dtype=np.int32), "validation": rng.integers(0, 101, 600, dtype=np.int32)}
    for out in ("local", "slurm"):  # the tokenised corpus, cached where the suite keeps it
        (workdir / out / "runs" / "tokens").mkdir(parents=True)
        for split, tokens in ids.items():
            np.save(workdir / out / "runs" / "tokens" / f"{split}.npy", tokens)
    reproduce_pretrained(str(model), protocol="smoke", out=str(workdir / "local"), only=["table9"], device="cpu",
                         progress=False, report=False)
    args = ["reproduce", "--suite", "pretrained", "--model", str(model), "--protocol", "smoke", "--only", "table9",
            "--device", "cpu", "--out", str(workdir / "slurm"), "--executor", "slurm", "--no-report", "--quiet",
            "--slurm-config", str(workdir / "slurm.json")]
    (workdir / "slurm.json").write_text(json.dumps(dict(poll_seconds=0.5, time=15)))
    assert main(args) == 0
    assert re.search(r"table9 +ran as Slurm job", capsys.readouterr().out)
    assert _evals(workdir / "slurm") == _evals(workdir / "local")
