"""Every fast path against the plain reference path: forward values and gradients (CPU, allclose)."""
import json

import pytest
import torch
import torch.nn.functional as F

from gatelab.config import ModelConfig, Routing, same_run, to_dict
from gatelab.kernels.head_loss import linear_cross_entropy
from gatelab.model import GPT
from gatelab.training.train import train

from .conftest import tiny_train_config

MODES = [Routing(), Routing(mode="soft-gate", k=8), Routing(mode="soft-gate", k=8, soft_renormalize=True),
         Routing(mode="gate-topk", k=8), Routing(mode="oracle-topk", k=8), Routing(mode="random-topk", k=8)]


def _inputs(n=300, c=16, v=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, c, generator=g, requires_grad=True)
    w = torch.randn(v, c, generator=g, requires_grad=True)
    return h, w, torch.randint(0, v, (n,), generator=g)


@pytest.mark.parametrize("chunk_rows,vocab_multiple", [(1, 1), (64, 1), (299, 1), (300, 1), (4096, 1), (64, 8),
                                                       (300, 64), (4096, 97)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_cross_entropy_matches_unfused_loss_and_gradients(chunk_rows, vocab_multiple, reduction):
    """Every chunking, and the vocabulary (97) padded to a multiple of 8 (104), 64 (128) or 97 (none needed)."""
    h, w, t = _inputs()
    ref = F.cross_entropy(F.linear(h, w).float(), t, reduction=reduction)
    gh, gw = torch.autograd.grad(2.5 * ref, (h, w))
    out = linear_cross_entropy(h, w, t, reduction=reduction, chunk_rows=chunk_rows, vocab_multiple=vocab_multiple)
    fh, fw = torch.autograd.grad(2.5 * out, (h, w))  # the incoming gradient (2.5) is applied in backward
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-5)
    for fast, ref_grad in ((fh, gh), (fw, gw)):  # fp32 sums in another order: tolerance relative to the scale
        torch.testing.assert_close(fast, ref_grad, rtol=1e-5, atol=1e-5 * ref_grad.abs().max().item())


def test_linear_cross_entropy_frozen_head_and_no_grad():
    h, w, t = _inputs()
    w.requires_grad_(False)
    out = linear_cross_entropy(h, w, t)
    (gh,) = torch.autograd.grad(out, (h,))
    torch.testing.assert_close(gh, torch.autograd.grad(F.cross_entropy(h @ w.t(), t), (h,))[0])
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, t), F.cross_entropy(h @ w.t(), t))


@pytest.mark.parametrize("vocab_multiple", [1, 64])
def test_linear_cross_entropy_under_bf16_autocast_matches_autocast_reference(vocab_multiple):
    h, w, t = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(F.linear(h, w).float(), t)
        out = linear_cross_entropy(h, w, t, chunk_rows=64, vocab_multiple=vocab_multiple)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    with pytest.raises(Exception, match="vocab_multiple"):
        linear_cross_entropy(h, w, t, vocab_multiple=-1)


def _model(gate="learned"):
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=2, d_model=32, n_head=2, d_mlp=64, context=32, vocab_size=101, d_gate=8,
                           gate=gate))


def _loss_and_grads(model, fn, x, routing, **kw):
    model.zero_grad(set_to_none=True)
    _, loss = fn(x, x, routing=routing, **kw)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("routing", MODES, ids=lambda r: r.label())
def test_fused_loss_matches_reference_for_every_routing(routing):
    model = _model()
    x = torch.randint(0, 101, (3, 32), generator=torch.Generator().manual_seed(1))
    ref_loss, ref_grads = _loss_and_grads(model, model, x, routing)
    loss, grads = _loss_and_grads(model, model, x, routing, fused_loss=True)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("routing", [Routing(mode="soft-gate", k=8), Routing(mode="gate-topk", k=8)],
                         ids=lambda r: r.mode)
def test_compiled_fused_step_matches_eager_reference(routing):
    model = _model()
    x = torch.randint(0, 101, (2, 32), generator=torch.Generator().manual_seed(2))
    ref_loss, ref_grads = _loss_and_grads(model, model, x, routing)
    loss, grads = _loss_and_grads(model, torch.compile(model), x, routing, fused_loss=True)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_speed_fields_do_not_change_which_run_it_is(token_corpus, tmp_path):
    fast = tiny_train_config(token_corpus, steps=4)
    ref = tiny_train_config(token_corpus, steps=4, compile=False, fused_loss=False)
    assert same_run(to_dict(fast), to_dict(ref))
    assert not same_run(to_dict(fast), to_dict(tiny_train_config(token_corpus, steps=5)))
    first = train(fast, tmp_path / "run", progress=False)
    again = train(ref, tmp_path / "run", progress=False)  # finished: recognised and skipped
    assert again["skipped"] and again["steps"] == first["steps"] == 4
    # and the reference path trains to the same losses
    train(ref, tmp_path / "ref", progress=False)
    read = lambda d: [r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())  # noqa: E731
                      if "loss" in r]
    assert read(tmp_path / "run") == pytest.approx(read(tmp_path / "ref"), rel=1e-5)


@pytest.mark.parametrize("k", [1, 5, 32])
def test_row_topk_by_sort_matches_torch_topk(k):
    from gatelab.kernels.topk import row_topk
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(k))
    (v1, i1), (v2, i2) = row_topk(x, k, "topk"), row_topk(x, k, "sort")
    assert torch.equal(v1, v2) and torch.equal(i1, i2)  # no ties among random floats: the same keys
