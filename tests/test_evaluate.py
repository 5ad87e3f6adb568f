"""Evaluation: token-weighted perplexity over non-overlapping chunks."""
import math

import pytest
import torch

from gatelab.config import Routing
from gatelab.data import TokenData
from gatelab.diagnostics.evaluate import perplexity
from gatelab.model import GPT
from tests.conftest import TINY_VOCAB, tiny_model_config


def test_uniform_model_perplexity_is_vocab_size(token_corpus):
    model = GPT(tiny_model_config())
    torch.nn.init.zeros_(model.lm_head.weight)
    res = perplexity(model, TokenData(token_corpus, "validation"), Routing())
    assert res["tokens"] == 3_000 - 1
    assert math.isclose(res["ppl"], TINY_VOCAB, rel_tol=1e-5)


def test_perplexity_is_exp_of_the_token_weighted_mean_nll(token_corpus):
    """100 tokens at context 32: three full chunks (batched) and a short one of 4, each token predicted once."""
    torch.manual_seed(0)
    model = GPT(tiny_model_config())
    data = TokenData(token_corpus, "validation")
    res = perplexity(model, data, Routing(), batch_size=2, max_tokens=100)
    tokens = torch.from_numpy(data.tokens[:101].astype("int64"))
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, 100, 32):  # each chunk alone, its log-probabilities by hand
            x, y = tokens[start:min(start + 32, 100)], tokens[start + 1:min(start + 32, 100) + 1]
            logits = model(x[None])[0][0].double()
            logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
            total -= float(logp.gather(-1, y[:, None]).sum())
            count += len(y)
    assert count == res["tokens"] == 100
    assert res["nll"] == pytest.approx(total / count, rel=1e-5)
    assert res["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert res["routing"] == Routing().label()
    assert model.training  # evaluation leaves the model in the mode it found it in
