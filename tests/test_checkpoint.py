"""Checkpoints: bitwise round trips of weights, optimizer and RNG state, and clear errors for damaged files."""
import json

import pytest
import torch

from gatelab.config import GatelabError, to_dict
from gatelab.model import GPT
from gatelab.training.checkpoint import (
    find_checkpoint, load_model, load_optimizer, load_state, load_weights, rng_state, save_checkpoint, set_rng_state
)
from gatelab.training.train import train
from tests.conftest import tiny_model_config, tiny_train_config


def test_weights_and_optimizer_round_trip_bitwise(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_model_config(gate="learned")
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    model(x, x)[1].backward()
    opt.step()
    save_checkpoint(tmp_path / "ckpt", model, dict(config=dict(model=to_dict(cfg)), step=1), opt)
    loaded, trainer = load_model(tmp_path / "ckpt")
    assert trainer["step"] == 1 and "optimizer" in trainer
    own, back = model.state_dict(), loaded.state_dict()
    assert own.keys() == back.keys()
    assert all(torch.equal(own[k], back[k]) for k in own)
    fresh = torch.optim.AdamW(loaded.parameters(), lr=1e-3)
    load_optimizer(fresh, load_state(tmp_path / "ckpt", "optimizer.safetensors"), trainer["optimizer"])
    before, after = opt.state_dict()["state"], fresh.state_dict()["state"]
    assert before.keys() == after.keys()
    for pid in before:
        assert all(torch.equal(torch.as_tensor(before[pid][n]), torch.as_tensor(after[pid][n])) for n in before[pid])
    # a second save swaps the directory in whole: no .tmp or .old copy is left behind
    save_checkpoint(tmp_path / "ckpt", model, dict(config=dict(model=to_dict(cfg)), step=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert json.loads((tmp_path / "ckpt" / "trainer.json").read_text())["step"] == 2


def test_find_checkpoint_falls_back_to_the_old_copy(tmp_path):
    cfg = tiny_model_config()
    save_checkpoint(tmp_path / "ckpt", GPT(cfg), dict(config=dict(model=to_dict(cfg)), step=3))
    (tmp_path / "ckpt").rename(tmp_path / "ckpt.old")  # a kill between the two renames of the swap
    assert find_checkpoint(tmp_path / "ckpt") == tmp_path / "ckpt.old"
    assert load_model(tmp_path / "ckpt")[1]["step"] == 3
    assert find_checkpoint(tmp_path / "none") is None


def test_rng_state_round_trip():
    torch.manual_seed(1)
    state = rng_state()
    first = torch.rand(5)
    torch.manual_seed(2)
    set_rng_state(state)
    assert torch.equal(torch.rand(5), first)


def test_checkpoint_errors(token_corpus, tmp_path):
    cfg = tiny_train_config(token_corpus, steps=2)
    train(cfg, tmp_path / "run", progress=False)
    ckpt = tmp_path / "run" / "checkpoint"
    with pytest.raises(GatelabError, match="does not exist"):
        load_model(tmp_path / "nope")
    # weights made for another config
    with pytest.raises(GatelabError, match="another model config"):
        load_weights(GPT(tiny_model_config(d_model=64)), load_state(ckpt), str(ckpt))
    # a truncated weights file
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(GatelabError, match="corrupt or truncated"):
        load_model(ckpt)
