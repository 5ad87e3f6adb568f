"""Diagnostics: top-k attention mass and the entropy ratio, against hand computations."""
import math

import pytest
import torch

from gatelab.diagnostics.analyze import attention_statistics
from gatelab.model import GPT
from tests.conftest import tiny_model_config


def test_uniform_attention_statistics_are_exact():
    model = GPT(tiny_model_config())
    for b in model.blocks:  # zero Q/K: every row attends uniformly over its causal keys
        torch.nn.init.zeros_(b.attn.qkv.weight)
        torch.nn.init.zeros_(b.attn.qkv.bias)
    x = torch.randint(0, 97, (2, 32))
    overall = attention_statistics(model, [x], [4])[-1]
    assert overall["entropy_ratio"] == pytest.approx(1.0, abs=1e-5)
    expected = sum(4 / (i + 1) for i in range(4, 32)) / 28  # rows with > 4 keys: top-4 of i+1 equal weights
    assert overall["top4_mass"] == pytest.approx(expected, abs=1e-5)
    assert math.isfinite(overall["top4_mass"])


def test_top_k_mass_and_entropy_ratio_match_a_hand_computation():
    torch.manual_seed(0)
    model = GPT(tiny_model_config(n_layer=1)).eval()
    torch.nn.init.normal_(model.blocks[0].attn.qkv.weight, std=0.5)  # a peaked, non-uniform attention
    B, T, H, k = 2, 16, 4, 3
    x = torch.randint(0, 97, (B, T))
    rows = attention_statistics(model, [x], [k, T])
    with torch.no_grad():  # attention of layer 0 from the embeddings, by hand
        attn = model.blocks[0].attn
        xn = model.blocks[0].ln1(model.wte(x) + model.wpe(torch.arange(T)))
        q, kk, _ = (xn @ attn.qkv.weight.T + attn.qkv.bias).split(32, dim=-1)
        q, kk = (t.view(B, T, H, 8).transpose(1, 2).double() for t in (q, kk))
        S = q @ kk.transpose(-1, -2) / math.sqrt(8)
        S = S.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        A = torch.softmax(S, dim=-1)
    masses, ratios = [], []
    for b in range(B):
        for h in range(H):
            for i in range(T):
                row = A[b, h, i, : i + 1]
                if i + 1 > k:  # rows with more than k causal keys
                    masses.append(float(row.sort(descending=True).values[:k].sum()))
                if i >= 1:  # rows with at least 2 keys
                    ratios.append(float(-(row * row.log()).sum()) / math.log(i + 1))
    assert len(masses) == B * H * (T - k)
    layer0, overall = rows[0], rows[-1]
    assert layer0["layer"] == 0 and overall["layer"] == "all"
    assert layer0[f"top{k}_mass"] == pytest.approx(sum(masses) / len(masses), abs=1e-5)
    assert layer0["entropy_ratio"] == pytest.approx(sum(ratios) / len(ratios), abs=1e-5)
    assert 0.3 < layer0[f"top{k}_mass"] < 0.99  # not the uniform case above
    assert layer0[f"top{T}_mass"] == 0.0  # k == T: no row has more than k keys
    assert overall[f"top{k}_mass"] == layer0[f"top{k}_mass"]  # one layer: the average is the layer
