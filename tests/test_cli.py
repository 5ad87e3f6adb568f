"""The command line: --help everywhere, one-line errors with exit code 2 for bad input."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from gatelab.cli.main import build_parser, main
from gatelab.config import to_dict
from gatelab.training.train import train
from tests.conftest import tiny_train_config

REPO = Path(__file__).resolve().parents[1]


def test_every_subcommand_has_help(capsys):
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name in sub.choices:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        assert "usage: gatelab " + name in capsys.readouterr().out


def test_info_prints_the_paper_counts(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "30,601,728" in out and "393,216" in out and "1.28%" in out


@pytest.fixture
def trained(token_corpus, tmp_path):
    cfg = tiny_train_config(token_corpus, steps=3)
    train(cfg, tmp_path / "run", progress=False)
    return tmp_path / "run" / "checkpoint"


def _err(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("gatelab: error: ")
    return err[0]


@pytest.mark.parametrize("args,match", [
    (["--routing", "sparse"], "unknown routing mode 'sparse'"),
    (["--routing", "oracle-topk", "--k", "0"], "k must be >= 1"),
    (["--routing", "oracle-topk", "--k", "33"], "larger than the context"),
    (["--routing", "gate-topk", "--k", "4"], "needs a gate"),
])
def test_eval_bad_input(trained, capsys, args, match):
    assert main(["eval", str(trained), "--quiet", *args]) == 2
    assert match in _err(capsys)


def test_eval_table_and_json(trained, tmp_path, capsys):
    out_json = tmp_path / "res.json"
    assert main(["eval", str(trained), "--quiet", "--routing", "dense,oracle-topk,random-topk,stochastic",
                 "--k", "4,8", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert out.count("\n| ") >= 7 and "oracle-topk" in out
    rows = json.loads(out_json.read_text())["results"]
    assert [(r["routing"], r["k"]) for r in rows] == [("dense", None), ("oracle-topk", 4), ("oracle-topk", 8),
                                                     ("random-topk", 4), ("random-topk", 8), ("stochastic", 4),
                                                     ("stochastic", 8)]
    assert all(r["ppl"] > 1 for r in rows)


def test_train_bad_config(tmp_path, token_corpus, capsys):
    assert main(["train", "--out", str(tmp_path / "r"), "model.d_model=30", "model.n_head=4"]) == 2
    assert "not divisible" in _err(capsys)
    assert main(["train", "--out", str(tmp_path / "r"), "model.widht=3"]) == 2
    assert "unknown config key" in _err(capsys)
    assert main(["train", "--out", str(tmp_path / "r"), "routing.mode=soft-gate"]) == 2
    assert "needs a gate" in _err(capsys)
    cfg = tmp_path / "c.json"
    cfg.write_text("{not json")
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "r")]) == 2
    assert "cannot parse" in _err(capsys)


def test_eval_corrupt_checkpoint(trained, capsys):
    f = trained / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    assert main(["eval", str(trained), "--quiet"]) == 2
    assert "corrupt or truncated" in _err(capsys)
    assert main(["eval", str(trained.parent / "missing"), "--quiet"]) == 2
    assert "does not exist" in _err(capsys)


def test_eval_checkpoint_of_another_config(trained, capsys):
    trainer = json.loads((trained / "trainer.json").read_text())
    trainer["config"]["model"]["d_model"] = 64
    (trained / "trainer.json").write_text(json.dumps(trainer))
    assert main(["eval", str(trained), "--quiet"]) == 2
    assert "another model config" in _err(capsys)


@pytest.mark.slow
def test_train_cli_end_to_end_and_skip(tmp_path, token_corpus):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(to_dict(tiny_train_config(token_corpus, steps=3))))
    cmd = [sys.executable, "-m", "gatelab", "train", "--config", str(cfg), "--out", str(tmp_path / "r"), "--quiet"]
    env = {"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"}
    first = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stderr
    second = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert "already finished" in second.stdout
    bad = subprocess.run(cmd[:3] + ["eval", str(tmp_path / "nope")], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


def test_eval_k_with_dense_routing_alone_is_an_error(trained, capsys):
    """--k means nothing to dense routing: say so instead of ignoring it (k out of range stays an error too)."""
    assert main(["eval", str(trained), "--quiet", "--k", "100000"]) == 2
    assert "--k 100000 is unused" in _err(capsys)
    assert main(["eval", str(trained), "--quiet", "--routing", "dense,oracle-topk", "--k", "100000"]) == 2
    assert "larger than the context" in _err(capsys)
    assert main(["eval", str(trained), "--quiet", "--routing", "dense,oracle-topk", "--k", "4"]) == 0


def _bad_inputs(ckpt, tmp):
    """CLI inputs a user can get wrong, per subcommand (none of them needs real work before it is refused)."""
    listed = tmp / "list.json"
    listed.write_text("[1, 2]")
    return [
        [], ["nonsense"], ["train"], ["train", "--out", str(tmp / "r"), "--config", str(tmp)],
        ["train", "--out", str(tmp / "r"), "--config", str(listed)], ["train", "--out", str(tmp / "r"), "--bogus"],
        ["info", "model.n_layer=abc"], ["info", "steps"],
        ["eval", ckpt, "--batch-size", "0"], ["eval", ckpt, "--max-tokens", "-1"], ["eval", ckpt, "--device", "gpu"],
        ["eval", ckpt, "--routing", ""], ["eval", ckpt, "--routing", "oracle-topk", "--k", "abc"],
        ["eval", ckpt, "--routing", "oracle-topk", "--k", ","], ["eval", ckpt, "--soft-temperature", "0"],
        ["eval", ckpt, "--soft-temperature", "nan"], ["eval", ckpt, "--random-seed", "-1"],
        ["eval", ckpt, "--split", "dev"], ["eval", ckpt, "--json", str(tmp)], ["eval", ckpt, "--gate", str(tmp)],
        ["eval", ckpt, "--data", str(tmp / "none")],
        ["analyze", ckpt, "--batches", "0"], ["analyze", ckpt, "--k", "0"], ["analyze", ckpt, "--batch-size", "-2"],
        ["audit", ckpt, "--k", "0"], ["audit"], ["audit", ckpt, "--max-tokens", "x"],
        ["distill", ckpt, "--out", str(tmp / "d"), "--steps", "0"], ["distill", ckpt, "--out", str(tmp / "d"),
                                                                      "--lr", "-1"],
        ["distill", ckpt, "--out", str(tmp / "d"), "lr=abc"], ["distill", ckpt, "--out", str(tmp / "d"), "--k", "99"],
        ["distill", str(tmp / "none"), "--out", str(tmp / "d")],
        ["reproduce", "--gpus", "abc"], ["reproduce", "--gpus", "0"], ["reproduce", "--budget-minutes", "-1"],
        ["reproduce", "--seeds", "0"], ["reproduce", "--steps", "0"], ["reproduce", "--protocol", "tiny"],
        ["reproduce", "--suite", "pretrained"], ["reproduce", "--suite", "pretrained", "--model", str(tmp / "none")],
        ["report", "--protocol", "tiny"], ["demo", "--steps", "0"], ["demo", "--steps", "x"],
        ["prepare", "--context", "0"], ["prepare", "--corpus", "text"], ["prepare", "--corpus", "nope"],
        ["prepare", "--corpus", "text", "--source", str(tmp / "none.txt")],
        ["hf-eval", "--model", str(tmp / "none"), "--batch-size", "0"], ["hf-eval", "--model", str(tmp / "none")],
        ["hf-distill", "--model", str(tmp / "none"), "--out", str(tmp / "h"), "--steps", "0"],
        ["hf-distill", "--model", str(tmp / "none"), "--out", str(tmp / "h"), "--unfreeze-layers", "-1"],
    ]


def test_every_bad_cli_input_is_one_line_and_exit_2(trained, tmp_path, capsys, monkeypatch):
    """The README's promise: a user error prints one line `gatelab: error: ...` and exits with status 2, whatever
    the subcommand and whichever argument is wrong (argparse's usage errors included), and creates nothing."""
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    for args in _bad_inputs(str(trained), tmp_path):
        before = sorted(p.name for p in tmp_path.iterdir())
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("gatelab: error: "), (args, err)
        assert sorted(p.name for p in tmp_path.iterdir()) == before, args

