import json

import numpy as np
import pytest
import torch

from gatelab.config import ModelConfig, Routing, TrainConfig

TINY_VOCAB = 97


def tiny_model_config(**kw) -> ModelConfig:
    base = dict(n_layer=2, d_model=32, n_head=4, d_mlp=64, context=32, vocab_size=TINY_VOCAB, d_gate=8)
    base.update(kw)
    return ModelConfig(**base)


def write_token_corpus(folder, n_train=20_000, n_val=3_000, n_test=3_000, vocab=TINY_VOCAB, seed=0):
    """A prepared corpus of a repeating pattern plus noise: learnable, so losses fall."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, n in (("train", n_train), ("validation", n_val), ("test", n_test)):
        base = np.arange(n) % 13 * 7 % vocab
        noise = rng.integers(0, vocab, size=n)
        toks = np.where(rng.random(n) < 0.2, noise, base).astype(np.uint16)
        toks.tofile(folder / f"{split}.bin")
        counts[split] = n
    (folder / "meta.json").write_text(json.dumps(dict(corpus="synthetic", vocab_size=vocab, tokens=counts,
                                                      tokenizer="synthetic", dtype="uint16")))
    return folder


@pytest.fixture
def token_corpus(tmp_path):
    return write_token_corpus(tmp_path / "corpus")


def tiny_train_config(data, **kw) -> TrainConfig:
    model = kw.pop("model", tiny_model_config())
    routing = kw.pop("routing", Routing())
    base = dict(model=model, routing=routing, data=str(data), steps=12, batch_size=4, lr=3e-3, min_lr=3e-4,
                warmup_steps=2, eval_every=0, checkpoint_every=4, log_every=1, seed=0, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def prepared_bundled():
    """The bundled corpus tokenised where gatelab keeps it (data/prepared/bundled in the checkout), once per
    session and only when it is not current already."""
    from gatelab.data import REPO_ROOT, prepare
    folder = REPO_ROOT / "data" / "prepared" / "bundled"
    prepare("bundled", folder, progress=False)
    return folder


@pytest.fixture
def workdir(tmp_path, monkeypatch, prepared_bundled):
    """A fresh working directory whose data/prepared/bundled is the session's prepared bundled corpus (a link),
    so that end-to-end tests (demo, reproduce) read the relative paths they use and write only here."""
    link = tmp_path / "data" / "prepared" / "bundled"
    link.parent.mkdir(parents=True)
    link.symlink_to(prepared_bundled, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def model_poisoned_at_call(cfg: TrainConfig, call: int):
    """A GPT of cfg (seeded as train seeds it) whose final LayerNorm output turns NaN on its `call`-th forward,
    which feeds the loss on both the fused and the reference path: a non-finite loss at step `call`."""
    from gatelab.model import GPT
    torch.manual_seed(cfg.seed)
    model = GPT(cfg.model)
    calls = {"n": 0}

    def poison(_module, _inputs, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] == call else output
    model.ln_f.register_forward_hook(poison)
    return model
