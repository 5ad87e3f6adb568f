"""What a new user meets first: a fast command line, data that cannot be silently swapped, corrupt files and
non-finite results refused, paths and messages that say what they mean."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from gatelab.hf.corpus import encode_corpus

REPO = Path(__file__).resolve().parents[1]


def test_cli_imports_no_torch():
    """`gatelab --help` and argument errors answer without importing torch (under 1 s instead of 4-5 s)."""
    code = "import sys, gatelab.cli as c; c.build_parser(); print(sorted(m for m in sys.modules if m in " \
           "('torch', 'numpy', 'transformers', 'safetensors', 'matplotlib')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_demo_stays_small():
    """The demo finishes in under 3 minutes on 2 CPU cores: at most ~100K training tokens per model (a step of
    8 x 128 tokens takes about 0.5 s there) and 8,192 evaluation tokens per routing; the CLI's default agrees."""
    from gatelab.cli.main import build_parser
    from gatelab.reproduce import demo as experiments
    m = experiments.DEMO_MODEL
    assert experiments.DEMO_STEPS * experiments.DEMO_BATCH * m["context"] <= 110_000
    assert experiments.DEMO_EVAL_TOKENS <= 8192 and m["n_layer"] <= 2 and m["d_model"] <= 128
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert sub.choices["demo"].parse_args([]).steps == experiments.DEMO_STEPS


# ----------------------------------------------------------------------------------------------------------
# helpers

def _err(capsys) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith("gatelab: error: ")
    return err[0]


@pytest.fixture
def trained(tmp_path):
    from gatelab.training.train import train
    from tests.conftest import tiny_train_config, write_token_corpus
    corpus = write_token_corpus(tmp_path / "corpus")
    train(tiny_train_config(corpus, steps=3), tmp_path / "run", progress=False)
    return tmp_path / "run" / "checkpoint"


# ----------------------------------------------------------------------------------------------------------
# 1. data is fingerprinted: a checkpoint refuses data it was not trained on

def _book(path: Path, word: str, n: int = 300) -> str:
    path.write_text("\n\n".join(f"Paragraph {i} is about the {word} and its {word}s, number {i}." for i in range(n)))
    return str(path)


def test_each_text_source_is_prepared_into_its_own_folder(tmp_path, monkeypatch, capsys):
    from gatelab.cli.main import main
    monkeypatch.chdir(tmp_path)
    a, b = _book(tmp_path / "a.txt", "whale"), _book(tmp_path / "b.txt", "ship")
    assert main(["prepare", "--corpus", "text", "--source", a, "--context", "16", "--quiet"]) == 0
    assert main(["prepare", "--corpus", "text", "--source", b, "--context", "16", "--quiet"]) == 0
    folders = sorted(p.name for p in (tmp_path / "data" / "prepared").iterdir())
    assert len(folders) == 2 and all(f.startswith("text-") for f in folders), folders
    metas = [json.loads((tmp_path / "data" / "prepared" / f / "meta.json").read_text()) for f in folders]
    assert {m["fingerprint"]["source"] for m in metas} == {a, b}
    assert metas[0]["fingerprint"]["id"] != metas[1]["fingerprint"]["id"]
    assert set(metas[0]["fingerprint"]["sha256"]) == {"train", "validation", "test"}
    capsys.readouterr()
    # a named folder holding other data is not replaced silently
    assert main(["prepare", "--corpus", "text", "--source", a, "--context", "16", "--name", "mine", "--quiet"]) == 0
    before = (tmp_path / "data" / "prepared" / "mine" / "train.bin").read_bytes()
    capsys.readouterr()
    assert main(["prepare", "--corpus", "text", "--source", b, "--context", "16", "--name", "mine", "--quiet"]) == 2
    assert "already holds other prepared data" in _err(capsys)
    assert (tmp_path / "data" / "prepared" / "mine" / "train.bin").read_bytes() == before


def test_checkpoints_record_their_data_and_refuse_other_data(trained, tmp_path, capsys):
    from gatelab.cli.main import main
    from tests.conftest import write_token_corpus
    trainer = json.loads((trained / "trainer.json").read_text())
    fp = trainer["data_fingerprint"]
    assert len(fp["id"]) == 16 and set(fp["sha256"]) == {"train", "validation", "test"}
    other = write_token_corpus(tmp_path / "other", seed=1)
    for cmd in (["eval", str(trained)], ["analyze", str(trained), "--k", "4", "--batches", "1"],
                ["audit", str(trained), "--k", "4"], ["distill", str(trained), "--k", "4", "--out", str(tmp_path / "g")]):
        assert main(cmd + ["--data", str(other)]) == 2, cmd
        err = _err(capsys)
        assert "is not the data" in err and "checkpoint" in err and "--allow-other-data" in err, err
    assert not (tmp_path / "g").exists()
    assert main(["eval", str(trained), "--quiet", "--data", str(other), "--allow-other-data"]) == 0
    assert "WARNING" in capsys.readouterr().err
    # the same folder prepared again with other tokens: the default data is refused too
    write_token_corpus(tmp_path / "corpus", seed=2)
    assert main(["eval", str(trained), "--quiet"]) == 2
    assert "is not the data checkpoint" in _err(capsys)


def test_checkpoints_without_a_fingerprint_still_evaluate(trained, capsys):
    from gatelab.cli.main import main
    trainer = json.loads((trained / "trainer.json").read_text())
    del trainer["data_fingerprint"]
    (trained / "trainer.json").write_text(json.dumps(trainer))
    assert main(["eval", str(trained), "--quiet"]) == 0


def test_distilled_gates_record_their_data(trained, tmp_path):
    from gatelab.cli.main import main
    assert main(["distill", str(trained), "--k", "4", "--d-gate", "8", "--steps", "2", "--batch-size", "2",
                 "--out", str(tmp_path / "g"), "--quiet", "device=cpu"]) == 0
    meta = json.loads((tmp_path / "g" / "gate.json").read_text())
    assert meta["data_fingerprint"]["id"] == json.loads((trained / "trainer.json").read_text())[
        "data_fingerprint"]["id"]


# ----------------------------------------------------------------------------------------------------------
# 2. damaged values and non-finite results are errors

def _damage(f: Path) -> None:
    """0xff bytes over the first tensor values after the safetensors header (the header stays intact)."""
    raw = bytearray(f.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")
    raw[start:start + 64] = b"\xff" * 64
    f.write_bytes(bytes(raw))


def test_checkpoint_with_damaged_values_is_refused(trained, tmp_path, capsys):
    from gatelab.cli.main import main
    _damage(trained / "model.safetensors")
    assert main(["eval", str(trained), "--quiet", "--json", str(tmp_path / "e.json")]) == 2
    assert "non-finite values" in _err(capsys)
    assert not (tmp_path / "e.json").exists()


def test_gate_with_damaged_values_is_refused(tmp_path):
    import torch
    from safetensors.torch import save_file

    from gatelab.config import GatelabError
    from gatelab.training.gate_files import read_gate
    (tmp_path / "gate.json").write_text(json.dumps(dict(format="gatelab-gate-v1")))
    save_file({"blocks.0.wq": torch.tensor([[1.0, float("nan")]])}, str(tmp_path / "gate.safetensors"))
    with pytest.raises(GatelabError, match="non-finite values"):
        read_gate(tmp_path)


def test_non_finite_perplexity_is_an_error(trained, tmp_path, capsys, monkeypatch):
    import gatelab.diagnostics.evaluate
    from gatelab.cli.main import main
    monkeypatch.setattr(gatelab.diagnostics.evaluate, "perplexity",
                        lambda *a, **k: dict(routing="dense", nll=float("nan"), ppl=float("nan"), tokens=10))
    assert main(["eval", str(trained), "--quiet", "--json", str(tmp_path / "e.json")]) == 2
    assert "non-finite" in _err(capsys)
    assert not (tmp_path / "e.json").exists() and "nan" not in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------
# 3. a config's data path does not depend on the working directory

def test_config_data_resolves_against_the_config_folder(tmp_path, monkeypatch):
    from gatelab.config import PROJECT_ROOT, load_train_config
    from tests.conftest import write_token_corpus
    write_token_corpus(tmp_path / "proj" / "corpus")
    (tmp_path / "proj" / "c.json").write_text(json.dumps({"data": "corpus", "steps": 3}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert Path(load_train_config(str(tmp_path / "proj" / "c.json")).data) == tmp_path / "proj" / "corpus"
    assert load_train_config(str(tmp_path / "proj" / "c.json"), ["data=mine"]).data == "mine"  # typed: cwd
    cfg = load_train_config(str(PROJECT_ROOT / "experiments" / "dense-2k.json"))
    assert Path(cfg.data) == PROJECT_ROOT / "data" / "prepared" / "bundled"
    monkeypatch.chdir(tmp_path / "proj")  # run from the config's folder: the path stays as written
    assert load_train_config("c.json").data == "corpus"


def test_missing_data_error_names_the_absolute_path(tmp_path, monkeypatch, capsys):
    from gatelab.cli.main import main
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "c.json").write_text(json.dumps({"data": "data/prepared/nothing", "device": "cpu"}))
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", "cfgs/c.json", "--out", str(tmp_path / "run")]) == 2
    err = _err(capsys)
    assert str(tmp_path / "cfgs" / "data" / "prepared" / "nothing") in err and "--out" in err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------------------
# 4. audit: no gap share when the oracle is no better than random

def test_audit_gap_share_only_when_the_oracle_beats_random():
    from argparse import Namespace

    from gatelab.cli.commands.evaluate import _print_audit
    from gatelab.diagnostics.analyze import audit_summary
    s = audit_summary(64, learned=40.0, rand=40.02, oracle=40.019)
    assert s["random_to_oracle_gap_closed"] is None and s["gap_too_small"]
    assert audit_summary(64, learned=90.0, rand=100.0, oracle=80.0)["random_to_oracle_gap_closed"] == \
        pytest.approx(0.5)
    args = Namespace(k=64, json=None, checkpoint="c", model=None, gate=None)
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        _print_audit(dict(rows=[], summary=s), args)
    out = buf.getvalue()
    assert "too small to measure" in out and "% of the random-to-oracle gap" not in out


# ----------------------------------------------------------------------------------------------------------
# 5. hf-distill tokenises the corpus once per tokenizer

def test_encode_corpus_is_cached_per_tokenizer(tmp_path, monkeypatch, capsys):

    class VocabTokenizer:  # a tokenizer with a vocabulary, counting its calls
        eos_token_id = 0
        calls = 0

        def __init__(self, shift=0):
            self.shift = shift

        def get_vocab(self):
            return {"shift": self.shift}

        def __call__(self, text, add_special_tokens=False):
            VocabTokenizer.calls += 1
            return {"input_ids": [len(w) + self.shift for w in text.split()]}
    monkeypatch.setenv("GATELAB_TOKEN_CACHE", str(tmp_path / "cache"))
    src = _book(tmp_path / "t.txt", "whale")
    first = encode_corpus(VocabTokenizer(), "text", "train", src, context=16, progress=True)
    assert "tokenising text" in capsys.readouterr().err  # progress while it builds the cache
    calls = VocabTokenizer.calls
    assert encode_corpus(VocabTokenizer(), "text", "train", src, context=16) == first
    assert VocabTokenizer.calls == calls  # read from the cache
    other = encode_corpus(VocabTokenizer(shift=1), "text", "train", src, context=16)  # another tokenizer
    assert VocabTokenizer.calls > calls and other != first
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2


# ----------------------------------------------------------------------------------------------------------
# 6. the project speaks for itself

def _text(paths) -> dict:
    skip = {"report.py", "reproduce.py", "test_user_guards.py", "test_reproduce.py"}  # rewritten separately
    return {p: p.read_text() for p in paths if p.is_file() and p.name not in skip}


def _user_facing() -> dict:
    """What a user reads: the READMEs, the method document, the package's text, the notes beside the results."""
    results = [p for p in (REPO / "results").rglob("*.md") if p.name in ("NOTES.md", "README.md")
               and not {"compact", "compact-4k"} & set(p.relative_to(REPO).parts)]
    return _text([REPO / "README.md", REPO / "docs" / "method.md", REPO / "benchmarks" / "README.md", *results,
                  *sorted((REPO / "src" / "gatelab").glob("*.py"))])


def test_text_speaks_of_the_project_only():
    import re
    words = re.compile(r"\bSPEC\b|SPEC\.md|\b[Ii]ssue #?\d+|device (minutes|calls?|time|tool|session)|this session|"
                       r"session's|64 MiB|smallers")
    bad = {str(p.relative_to(REPO)): m.group(0) for p, t in _user_facing().items() for m in [words.search(t)] if m}
    assert not bad, bad
    code = _text([*sorted((REPO / "scripts").glob("*")), *sorted((REPO / "tests").glob("*.py")),
                  *sorted((REPO / "benchmarks").glob("*.py"))])
    bad = {str(p.relative_to(REPO)) for p, t in code.items() if re.search(r"\bSPEC\b|SPEC\.md", t)}
    assert not bad, bad
    # the user tools and the measurement drivers say how to run them, not how they were once run
    build = re.compile(r"device (tool|calls?)|FILES[_]AT|carry \[|[.]carry\b|[Ii]ssue #?\d+")
    tools = _text([*sorted((REPO / "scripts").glob("*")), *sorted((REPO / "benchmarks" / "drivers").glob("*"))])
    assert len(tools) > 15
    bad = {str(p.relative_to(REPO)): m.group(0) for p, t in tools.items() for m in [build.search(t)] if m}
    assert not bad, bad
    assert "SPEC" not in subprocess.run([sys.executable, "-m", "gatelab", "reproduce", "--help"], capture_output=True,
                                        text=True).stdout
    method = (REPO / "docs" / "method.md").read_text()
    assert all(w in method for w in ("Routing modes", "readings", "Losses", "Diagnostics", "48.73", "37.32"))


def test_committed_gpu_logs_hold_no_machine_paths():
    import re
    bad = [str(p.relative_to(REPO)) for p in (REPO / "results" / "gpu-smoke").rglob("*") if p.is_file() and
           re.search(r"/work/|/opt/|/root/|/home/|torchinductor_\w+/", p.read_text(errors="replace"))]
    assert not bad, bad


# ----------------------------------------------------------------------------------------------------------
# 7. smaller things

def test_hf_eval_on_a_folder_that_is_no_model_says_so(tmp_path, capsys):
    from gatelab.cli.main import main
    (tmp_path / "notes.txt").write_text("not a model")
    assert main(["hf-eval", "--model", str(tmp_path), "--quiet"]) == 2
    err = _err(capsys)
    assert "is not a Hugging Face model folder" in err and not err.rstrip().endswith(":")


def test_json_that_cannot_be_written_is_refused_before_the_work(trained, tmp_path, capsys, monkeypatch):
    import gatelab.diagnostics.evaluate
    from gatelab.cli.main import main
    called = []
    monkeypatch.setattr(gatelab.diagnostics.evaluate, "perplexity", lambda *a, **k: called.append(1))
    (tmp_path / "afile").write_text("")
    assert main(["eval", str(trained), "--quiet", "--json", str(tmp_path / "afile" / "e.json")]) == 2
    assert "cannot write there" in _err(capsys) and not called


def test_a_failed_write_names_the_file_not_its_temporary(tmp_path, monkeypatch):
    import tempfile

    from gatelab.config import GatelabError, write_json

    def denied(*a, dir=None, **k):
        raise PermissionError(13, "Permission denied", str(Path(dir) / ".e.json.vhfr1ymi.tmp"))
    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(GatelabError) as e:
        write_json(tmp_path / "e.json", {})
    assert str(tmp_path / "e.json") in str(e.value) and ".tmp" not in str(e.value)


def test_non_finite_loss_message_names_the_step_the_bar_shows(tmp_path, capsys):
    from gatelab.config import GatelabError
    from gatelab.training.train import train
    from tests.conftest import model_poisoned_at_call, tiny_train_config, write_token_corpus
    cfg = tiny_train_config(write_token_corpus(tmp_path / "c"), steps=20, checkpoint_every=2, log_every=1)
    model = model_poisoned_at_call(cfg, 6)
    with pytest.raises(GatelabError, match="non-finite loss at step 6 of 20"):
        train(cfg, tmp_path / "run", progress=True, model=model)
    assert capsys.readouterr().err.strip().splitlines()[-1].count("6/20") == 1


def test_distill_progress_shows_no_perplexity_for_a_gate_loss(trained, tmp_path, capsys):
    from gatelab.cli.main import main
    assert main(["distill", str(trained), "--k", "4", "--d-gate", "8", "--steps", "2", "--batch-size", "2",
                 "--out", str(tmp_path / "g"), "device=cpu"]) == 0
    err = capsys.readouterr().err
    assert "loss=" in err and "ppl=" not in err and "f1=" in err


def test_concentration_plot_keeps_entropy_off_the_mass_axis_and_the_legend_off_the_bars():
    from gatelab.diagnostics.analyze import concentration_figure
    rows = [dict(layer=i, entropy_ratio=0.3 + 0.1 * i, top4_mass=0.95, top8_mass=0.99) for i in range(3)]
    rows.append(dict(layer="all", entropy_ratio=0.4, top4_mass=0.95, top8_mass=0.99))
    fig = concentration_figure(rows, [4, 8], "t")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        heights = [p.get_height() for p in ax.patches]
        if "mass" in ax.get_ylabel():
            assert all(h >= 90 for h in heights), heights  # only masses, in %
        else:
            assert "entropy" in ax.get_ylabel() and all(h < 1 for h in heights)
        legend = ax.get_legend()
        if legend is not None:
            box = legend.get_window_extent(renderer)
            assert not any(box.overlaps(p.get_window_extent(renderer)) for a in fig.axes for p in a.patches)


def test_byte_order_marks_inside_a_text_are_dropped(tmp_path):
    from gatelab.data import gpt2_tokenizer, prepare
    parts = [_book(tmp_path / f"{i}.txt", w, 100) for i, w in enumerate(("whale", "ship", "sea"))]
    joined = b"".join(b"\xef\xbb\xbf" + Path(p).read_bytes() + b"\n\n" for p in parts)  # cat of BOM files
    (tmp_path / "all.txt").write_bytes(joined)
    prepare("text", tmp_path / "out", source=str(tmp_path / "all.txt"), context=9, progress=False)
    import numpy as np
    toks = np.concatenate([np.fromfile(tmp_path / "out" / f"{s}.bin", dtype=np.uint16)
                           for s in ("train", "validation", "test")])
    assert "\ufeff" not in gpt2_tokenizer().decode(toks.tolist())
