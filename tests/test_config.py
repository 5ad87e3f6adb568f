"""Every config value is type- and range-checked before anything is written: one line, exit 2, no run directory.

The grid below is built from the dataclasses themselves (their fields, annotations, LIMITS and CHOICES), so a field
added later is covered too, and a numeric or string field added without a declared range or choice fails
test_every_field_is_classified.
"""
import dataclasses
import json
import math
import typing

import pytest

from gatelab.cli.main import main
from gatelab.config import GatelabError, Limit, ModelConfig, Routing, TrainConfig, load_train_config
from gatelab.training.train import train

CLASSES = {"": TrainConfig, "model.": ModelConfig, "routing.": Routing}
FREE_TEXT = {(TrainConfig, "data"), (TrainConfig, "init_from")}  # paths, checked where they are used


def _kinds(cls, name):
    hint = typing.get_type_hints(cls)[name]
    return typing.get_args(hint) or (hint,)


def plain_fields(cls):
    return [f.name for f in dataclasses.fields(cls) if f.name not in ("model", "routing")]


def bad_values(cls, name) -> list:
    """Values of the wrong type, outside the field's range or outside its choices."""
    kinds = _kinds(cls, name)
    bad = [[1], {"a": 1}]
    if type(None) not in kinds:
        bad.append(None)
    if bool not in kinds:
        bad.append(True)
    if str not in kinds:
        bad.append("abc")
    if int in kinds and float not in kinds:
        bad += [2.5, "7"]
    if float in kinds:
        bad += [math.nan, math.inf]
    if bool in kinds and str not in kinds:
        bad += [1, "yes"]
    if str in kinds and cls.CHOICES.get(name) is not None:
        bad.append("bogus")
    limit = cls.LIMITS.get(name)
    if limit is not None:
        step = 1 if int in kinds and float not in kinds else 0.5
        bad.append(limit.lo if limit.lo_open else limit.lo - step)
        bad.append(limit.lo - 1000)
        if limit.hi is not None:
            bad.append(limit.hi if limit.hi_open else limit.hi + step)
    return bad


GRID = [(prefix + name, value) for prefix, cls in CLASSES.items() for name in plain_fields(cls)
        for value in bad_values(cls, name)]


def test_every_field_is_classified():
    """Numbers carry a range (LIMITS), strings a set of choices (CHOICES) unless they are paths."""
    for cls in CLASSES.values():
        for name in plain_fields(cls):
            kinds = _kinds(cls, name)
            if int in kinds or float in kinds:
                assert isinstance(cls.LIMITS.get(name), Limit), f"{cls.__name__}.{name} has no LIMITS entry"
            elif str in kinds and (cls, name) not in FREE_TEXT:
                assert cls.CHOICES.get(name) is not None, f"{cls.__name__}.{name} has no CHOICES entry"
    assert len(GRID) > 150


@pytest.mark.parametrize("key,value", GRID, ids=[f"{k}={json.dumps(v)}" for k, v in GRID])
def test_bad_value_is_one_line_exit_2_and_writes_nothing(key, value, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--quiet", f"{key}={json.dumps(value)}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gatelab: error: "), err
    assert key in err[0]
    assert not out.exists()
    with pytest.raises(GatelabError):  # the same through the API
        load_train_config(None, [f"{key}={json.dumps(value)}"])


@pytest.mark.parametrize("override,match", [
    ("model.n_layer=abc", "model.n_layer must be an integer, got 'abc'"),
    ("steps=abc", "steps must be an integer"),
    ("model.n_layer=2.5", "model.n_layer must be an integer, got 2.5"),
    ("lr=-1", "lr must be > 0"),
    ("checkpoint_every=0", "checkpoint_every must be >= 1"),
    ("log_every=0", "log_every must be >= 1"),
    ("model=3", "model must be a section"),
    ("device=gpu", "device must be auto, cpu, cuda, cuda:N or mps"),
])
def test_the_issue_rows(override, match, tmp_path, token_corpus, capsys):
    """The overrides that crashed with a traceback (or after training had started)."""
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--quiet", f"data={token_corpus}", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err
    assert not out.exists()


def test_values_at_the_edges_are_accepted_and_train(tmp_path, token_corpus):
    """0 where 0 means something (no warm-up, no periodic evaluation, whole-split evaluation, no clipping, no
    weight decay, min_lr 0), integral floats for ints (2e1), ints for floats."""
    cfg = load_train_config(None, [f"data={token_corpus}", "steps=3", "warmup_steps=0", "eval_every=0",
                                   "eval_tokens=0", "grad_clip=0", "weight_decay=0", "min_lr=0", "lr=1",
                                   "model.n_layer=1e0", "model.d_model=32", "model.n_head=2", "model.d_mlp=32",
                                   "model.context=16", "model.vocab_size=97", "log_every=1", "checkpoint_every=1",
                                   "device=cpu", "beta1=0"])
    assert cfg.model.n_layer == 1 and isinstance(cfg.model.n_layer, int) and isinstance(cfg.lr, float)
    summary = train(cfg, tmp_path / "run", progress=False)
    assert summary["steps"] == 3


def test_data_and_init_from_are_checked_before_the_run_directory(tmp_path, token_corpus, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), f"data={tmp_path / 'nowhere'}"]) == 2
    assert "gatelab prepare" in capsys.readouterr().err
    assert main(["train", "--out", str(out), f"data={token_corpus}", f"init_from={tmp_path / 'nope'}"]) == 2
    assert "not a gatelab checkpoint" in capsys.readouterr().err
    assert not out.exists()


def test_limit_reads_as_its_message():
    assert str(Limit(1)) == ">= 1" and str(Limit(0, lo_open=True)) == "> 0" and str(Limit(0, hi=1)) == ">= 0 and < 1"
    assert 0.5 in Limit(0, hi=1) and 1 not in Limit(0, hi=1) and 0 not in Limit(0, lo_open=True)
