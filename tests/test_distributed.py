"""Data-parallel training under torchrun (gloo, CPU): 2 ranks give the losses of 1 process on the same global
batch, write one set of outputs, and resume on another number of ranks."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gatelab.config import Routing, to_dict

from .conftest import tiny_train_config

pytestmark = pytest.mark.slow  # torchrun-style gloo process groups

REPO = Path(__file__).resolve().parents[1]


def _losses(run):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _gatelab(args, nproc, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
                 str(29_500 + os.getpid() % 500), "-m", "gatelab"] if nproc > 1 else [sys.executable, "-m", "gatelab"])
    r = subprocess.run(launcher + args, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


@pytest.mark.parametrize("routing", [Routing(), Routing(mode="gate-topk", k=4)], ids=["dense", "hard-gate"])
def test_two_gloo_ranks_match_one_process(token_corpus, tmp_path, routing):
    gate = "learned" if routing.needs_gate else "none"
    cfg = tiny_train_config(token_corpus, steps=8, routing=routing, checkpoint_every=4, eval_every=4,
                            eval_tokens=512)
    cfg.model.gate = gate
    (tmp_path / "cfg.json").write_text(json.dumps(to_dict(cfg)))
    _gatelab(["train", "--config", "cfg.json", "--out", "one", "--quiet"], 1, tmp_path)
    r = _gatelab(["train", "--config", "cfg.json", "--out", "two", "--quiet"], 2, tmp_path)
    assert r.stdout.count('"steps": 8') == 1, "only rank 0 prints the summary"
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 8
    # the same global batch, gradients averaged over 2 ranks of 2 rows instead of summed over 4 rows in one
    # process: equal up to the order of fp32 sums, which 8 Adam steps amplify to ~1e-6 relative
    assert two == pytest.approx(one, rel=1e-4)
    assert json.loads((tmp_path / "two" / "done.json").read_text())["world_size"] == 2


def test_resume_on_another_number_of_ranks(token_corpus, tmp_path):
    cfg = tiny_train_config(token_corpus, steps=8, checkpoint_every=4)
    (tmp_path / "cfg.json").write_text(json.dumps(to_dict(cfg)))
    _gatelab(["train", "--config", "cfg.json", "--out", "full", "--quiet"], 1, tmp_path)
    # two ranks stop after their first checkpoint (killed, in effect): emulate with stop_after through the API
    env_run = tmp_path / "split"
    code = ("import json,sys; from gatelab.config import train_config_from_dict; from gatelab.training.train import train; "
            "from gatelab.training import distributed; "
            f"cfg=train_config_from_dict(json.load(open('cfg.json'))); train(cfg, '{env_run}', progress=False, "
            "stop_after=4); distributed.cleanup()")
    (tmp_path / "stop4.py").write_text(code)
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                        str(29_000 + os.getpid() % 500), "stop4.py"], env=env, capture_output=True, text=True,
                       cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert not (env_run / "done.json").exists()
    _gatelab(["train", "--config", "cfg.json", "--out", str(env_run), "--resume", "--quiet"], 1, tmp_path)
    assert _losses(env_run) == pytest.approx(_losses(tmp_path / "full"), rel=1e-4)


def test_batch_not_divisible_by_ranks_is_refused(token_corpus, tmp_path):
    cfg = tiny_train_config(token_corpus, steps=2, batch_size=3)
    (tmp_path / "cfg.json").write_text(json.dumps(to_dict(cfg)))
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                        str(28_500 + os.getpid() % 500), "-m", "gatelab", "train", "--config", "cfg.json", "--out",
                        "x", "--quiet"], env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode != 0
    assert "batch_size 3 is not divisible by the 2 data-parallel ranks" in r.stderr


def test_gate_distillation_under_two_ranks_matches_one_process(token_corpus, tmp_path):
    from gatelab.training.train import train
    train(tiny_train_config(token_corpus, steps=4), tmp_path / "base", progress=False)
    args = ["distill", str(tmp_path / "base" / "checkpoint"), "--loss", "kl", "--k", "4", "--steps", "5",
            "--batch-size", "4", "--quiet", "device=cpu", "log_every=1"]
    _gatelab(args + ["--out", "one"], 1, tmp_path)
    _gatelab(args + ["--out", "two"], 2, tmp_path)
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-4)
    assert (tmp_path / "two" / "gate.safetensors").is_file()
