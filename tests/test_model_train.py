"""Model size, training and exact resume (checkpoint files: test_checkpoint.py; evaluation: test_evaluate.py)."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gatelab.config import GatelabError, ModelConfig, Routing, to_dict
from gatelab.model import GPT
from gatelab.training.checkpoint import load_model
from gatelab.training.train import lr_at, train
from tests.conftest import TINY_VOCAB, model_poisoned_at_call, tiny_model_config, tiny_train_config

REPO = Path(__file__).resolve().parents[1]


def test_paper_model_parameter_counts():
    model = GPT(ModelConfig(gate="learned"))
    assert model.num_params() == 30_601_728  # the paper's "31M" (docs/method.md)
    assert model.num_params(gates=True) == 393_216  # 6 x 4 x 2 x 256 x 32


def test_width_not_divisible_by_heads():
    with pytest.raises(GatelabError, match="not divisible"):
        GPT(ModelConfig(d_model=250, n_head=4))


def test_lr_schedule():
    from gatelab.config import TrainConfig
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(100, cfg) == pytest.approx(0.1)
    assert lr_at(55, cfg) == pytest.approx(0.55)


def losses(run: Path) -> list:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def test_training_lowers_loss_and_matches_reference_values(token_corpus, tmp_path):
    cfg = tiny_train_config(token_corpus, steps=30, eval_every=10, eval_tokens=512)
    summary = train(cfg, tmp_path / "run", progress=False)
    ls = losses(tmp_path / "run")
    assert len(ls) == 30
    assert ls[0] == pytest.approx(math.log(TINY_VOCAB), abs=0.1)
    assert ls[-1] < ls[0] - 1.0
    assert summary["final_val_ppl"] < TINY_VOCAB / 4
    # rerunning a finished run skips it
    again = train(cfg, tmp_path / "run", progress=False)
    assert again["skipped"]


@pytest.mark.parametrize("routing,gate", [(Routing(mode="soft-gate", k=4), "random"),
                                          (Routing(mode="gate-topk", k=4), "random")])
def test_frozen_random_gates_are_bit_identical_after_training(token_corpus, tmp_path, routing, gate):
    cfg = tiny_train_config(token_corpus, model=tiny_model_config(gate=gate), routing=routing, steps=5)
    torch.manual_seed(cfg.seed)
    before = [p.detach().clone() for p in GPT(cfg.model).gate_parameters()]
    train(cfg, tmp_path / "run", progress=False)
    model, _ = load_model(tmp_path / "run" / "checkpoint")
    after = model.gate_parameters()
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    # ...while the rest of the model did train
    torch.manual_seed(cfg.seed)
    fresh = GPT(cfg.model)
    assert not torch.equal(fresh.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)


def test_learned_soft_gate_trains(token_corpus, tmp_path):
    cfg = tiny_train_config(token_corpus, model=tiny_model_config(gate="learned"),
                            routing=Routing(mode="soft-gate", k=4), steps=5)
    torch.manual_seed(cfg.seed)
    before = [p.detach().clone() for p in GPT(cfg.model).gate_parameters()]
    train(cfg, tmp_path / "run", progress=False)
    model, _ = load_model(tmp_path / "run" / "checkpoint")
    assert all(not torch.equal(a, b) for a, b in zip(before, model.gate_parameters()))


def test_resume_in_process_is_bitwise_identical(token_corpus, tmp_path):
    cfg = tiny_train_config(token_corpus, routing=Routing(mode="stochastic", k=4), steps=12)
    train(cfg, tmp_path / "full", progress=False)
    assert train(cfg, tmp_path / "split", progress=False, stop_after=6) == dict(stopped_at=6)
    train(cfg, tmp_path / "split", progress=False)
    assert losses(tmp_path / "full") == losses(tmp_path / "split")


@pytest.mark.slow
def test_sigkill_then_resume_gives_identical_losses(token_corpus, tmp_path):
    """A real `gatelab train` process killed with SIGKILL mid-run, then resumed with --resume."""
    steps = 200
    cfg = tiny_train_config(token_corpus, steps=steps, checkpoint_every=5)
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(to_dict(cfg)))
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    cmd = [sys.executable, "-m", "gatelab", "train", "--config", str(cfg_file), "--quiet"]
    subprocess.run(cmd + ["--out", str(tmp_path / "full")], check=True, env=env, capture_output=True)
    proc = subprocess.Popen(cmd + ["--out", str(tmp_path / "killed")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until it is past its second checkpoint, then kill it mid-run
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 12:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "done.json").exists(), "the run finished before it could be killed"
    r = subprocess.run(cmd + ["--out", str(tmp_path / "killed"), "--resume"], env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert losses(tmp_path / "full") == losses(tmp_path / "killed")
    assert len(losses(tmp_path / "killed")) == steps


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(token_corpus, tmp_path):
    cfg = tiny_train_config(token_corpus, steps=20, checkpoint_every=2)
    model = model_poisoned_at_call(cfg, 6)
    with pytest.raises(GatelabError, match=r"non-finite loss at step 6 of 20.*step 4"):
        train(cfg, tmp_path / "run", progress=False, model=model)
    ckpt = json.loads((tmp_path / "run" / "checkpoint" / "trainer.json").read_text())
    assert ckpt["step"] == 4
    good, _ = load_model(tmp_path / "run" / "checkpoint")
    assert all(torch.isfinite(p).all() for p in good.parameters())


def test_resume_with_another_config_is_refused(token_corpus, tmp_path):
    cfg = tiny_train_config(token_corpus, steps=4, checkpoint_every=2)
    train(cfg, tmp_path / "run", progress=False, stop_after=2)
    other = tiny_train_config(token_corpus, steps=4, checkpoint_every=2, lr=1e-2)
    with pytest.raises(GatelabError, match="another config"):
        train(other, tmp_path / "run", progress=False)


@pytest.mark.parametrize("gate,routing,expected", [
    ("none", Routing(), [4.6074324, 4.2863202, 4.0368309, 3.9746649]),
    ("learned", Routing(mode="soft-gate", k=4, soft_mask="topk-sigmoid"), [4.5929499, 4.2599916, 4.0105343, 3.9454608]),
    ("learned", Routing(mode="soft-gate", k=4), [4.5924878, 4.2584958, 4.0099769, 3.9416277]),  # the default reading
])
def test_reference_loss_values(token_corpus, tmp_path, gate, routing, expected):
    """Regression values for a tiny model, seed 0, CPU fp32 (recorded with torch 2.13.0): any change to the
    model, routing, initialisation, data order or optimiser shows up here."""
    cfg = tiny_train_config(token_corpus, model=tiny_model_config(gate=gate), routing=routing, steps=10)
    train(cfg, tmp_path / "run", progress=False)
    assert losses(tmp_path / "run")[::3] == pytest.approx(expected, abs=1e-4)


def test_overrides_parse_values_and_keep_the_word_none():
    from gatelab.config import load_train_config
    cfg = load_train_config(None, ["model.gate=none", "steps=7", "compile=false", "routing.soft_temperature=0.5",
                                   "model.gate_init_std=null", "routing.mode=dense"])
    assert cfg.model.gate == "none" and cfg.steps == 7 and cfg.compile is False
    assert cfg.routing.soft_temperature == 0.5 and cfg.model.gate_init_std is None


def test_run_files_follow_the_umask(token_corpus, tmp_path):
    """Checkpoint files (safetensors writes 0600) and JSON written atomically (tempfile: 0600) get the mode the
    umask gives new files."""
    import os

    from gatelab.config import write_json
    old = os.umask(0o022)
    try:
        train(tiny_train_config(token_corpus, steps=2), tmp_path / "run", progress=False)
        os.umask(0o027)
        write_json(tmp_path / "x.json", {"a": 1})
    finally:
        os.umask(old)
    files = [f for f in (tmp_path / "run").rglob("*") if f.is_file()]
    assert {f.name for f in files} == {"config.json", "done.json", "metrics.jsonl", "model.safetensors",
                                       "optimizer.safetensors", "trainer.json"}
    assert {f.name: f.stat().st_mode & 0o777 for f in files} == {f.name: 0o644 for f in files}
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o640
