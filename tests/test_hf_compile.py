"""The compiled whole-sequence forward (gatelab.hf.compile): the same logits as the eager forward for dense and block
routings, no T x T mask while tracing an unpadded prompt, and generation steps left eager. Graphs are counted with a
backend that runs them as traced (no code generation), so the tests check the tracing, not inductor."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from gatelab.config import GatelabError, Routing  # noqa: E402
from gatelab.hf import compile as hf_compile  # noqa: E402
from gatelab.hf.adapter import attach_block_gates, attach_gates  # noqa: E402

from .test_hf import tiny  # noqa: E402

BS, T = 4, 24


class CountingBackend:
    """A torch.compile backend that runs each traced graph as it is and counts them."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def test_compiled_forward_gives_the_eager_logits_for_dense_and_block_routings():
    torch._dynamo.reset()
    model = tiny("llama")
    ctl = attach_block_gates(model, d_gate=8, gate="random", block_size=BS)
    ids = torch.randint(1, 101, (2, T), generator=torch.Generator().manual_seed(0))
    routings = [Routing(), Routing(mode="block-gate", block_size=BS, block_k=1)]
    with torch.no_grad():
        eager = []
        for r in routings:
            with ctl.routing(r):
                eager.append(model(ids, use_cache=False).logits)
        backend = CountingBackend()
        hf_compile.compile_prefill(model, backend=backend)
        for r, ref in zip(routings, eager):
            with ctl.routing(r):
                torch.testing.assert_close(model(ids, use_cache=False).logits, ref, rtol=1e-5, atol=1e-5)
    assert backend.graphs >= len(routings)
    assert not torch.equal(eager[0], eager[1]), "block_k=1 should change the logits"


def test_generation_steps_stay_eager():
    torch._dynamo.reset()
    model = tiny("llama")
    ctl = attach_block_gates(model, d_gate=8, gate="random", block_size=BS)
    ids = torch.randint(1, 101, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), ctl.routing(Routing()):
        plain = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
        backend = CountingBackend()
        hf_compile.compile_prefill(model, backend=backend)
        again = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(plain, again) and backend.graphs == 0


def test_no_mask_while_tracing_an_unpadded_prompt(monkeypatch):
    seen = []
    monkeypatch.setattr(hf_compile.torch.compiler, "is_compiling", lambda: True)
    assert hf_compile.causal_skip_while_compiling(batch_size=1, cache_position=None, kv_length=T, q_length=T,
                                                  attention_mask=None) is None
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    monkeypatch.setitem(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, "sdpa", lambda *a, **kw: seen.append(kw) or "m")
    padded = torch.ones(1, T, dtype=torch.bool)
    assert hf_compile.causal_skip_while_compiling(q_length=T, kv_length=T, attention_mask=padded) == "m"
    assert hf_compile.causal_skip_while_compiling(q_length=1, kv_length=T, attention_mask=None) == "m"
    assert len(seen) == 2


def test_compile_prefill_refuses_a_model_without_gatelab_and_an_unknown_mode():
    model = tiny("llama")
    with pytest.raises(GatelabError, match="attach gatelab"):
        hf_compile.compile_prefill(model)
    attach_gates(model, gate="none")
    with pytest.raises(GatelabError, match="compile mode"):
        hf_compile.compile_prefill(model, mode="fast")


def test_cli_hf_eval_compile(tmp_path, monkeypatch, capsys):
    """`hf-eval --compile --compile-mode reduce-overhead` passes its mode to compile_prefill and gives the eager
    perplexities (the compile backend replaced by the counting one, which takes no mode)."""
    import gatelab.hf.corpus as hf_corpus
    import gatelab.hf.gate_files as hf_gate_files
    from gatelab.cli.main import main

    class Tok:
        eos_token_id = 0

    ids = torch.randint(0, 101, (400,), generator=torch.Generator().manual_seed(0)).tolist()
    monkeypatch.setattr(hf_gate_files, "load_pretrained", lambda *a, **kw: (tiny("llama"), Tok()))
    monkeypatch.setattr(hf_corpus, "encode_corpus", lambda *a, **kw: ids)
    backend = CountingBackend()
    real = hf_compile.compile_prefill
    modes = []
    monkeypatch.setattr(hf_compile, "compile_prefill",
                        lambda model, mode: (modes.append(mode), real(model, backend=backend))[1])
    monkeypatch.setattr("gatelab.cli.commands.hf.compile_prefill", hf_compile.compile_prefill)
    torch._dynamo.reset()
    cmd = ["hf-eval", "--model", str(tmp_path), "--routing", "block-random", "--block-size", "4", "--block-k", "1",
           "--context", "32", "--batch-size", "4", "--max-tokens", "256", "--device", "cpu", "--quiet"]
    assert main(cmd) == 0
    eager = capsys.readouterr().out
    assert main(cmd + ["--compile", "--compile-mode", "reduce-overhead"]) == 0
    out, err = capsys.readouterr()
    assert out == eager and backend.graphs >= 1 and modes == ["reduce-overhead"]
    assert "reduce-overhead replays CUDA graphs, which need a CUDA device" in err  # on CPU: said, not silent
    assert main(cmd + ["--compile-mode", "max-autotune"]) == 2  # a mode without --compile would be ignored
    assert "add --compile" in capsys.readouterr().err and modes == ["reduce-overhead"]
