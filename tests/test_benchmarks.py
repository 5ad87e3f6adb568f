"""The benchmark harness runs end to end (tiny model, CPU) and writes its JSON and markdown."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the benchmark scripts end to end, in subprocesses

REPO = Path(__file__).resolve().parents[1]


def test_bench_train_smoke(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_train.py"), "--model", "tiny", "--steps", "1",
                        "--warmup", "1", "--batches", "2", "--modes", "dense,soft-gate,gate-topk", "--k", "8",
                        "--out", str(tmp_path)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "cpu.json").read_text())
    kinds = [(row["kind"], row["routing"]) for row in data["rows"]]
    assert data["rows"][0]["variant"] == "reference" and kinds[0] == ("train", "dense")
    assert data["checks"] and all(c["ok"] for c in data["checks"])
    assert ("train", "gate-topk@k=8") in kinds and kinds[-2][0] == "distill-kl" and kinds[-1][0] == "eval"
    assert all(row["step_ms"] > 0 for row in data["rows"])
    assert "vs eager fp32" in (tmp_path / "cpu.md").read_text()


def test_bench_block_smoke(tmp_path):
    """bench_block.py on CPU at tiny sizes: the flex path against the masked one, end-to-end prefill, perplexity."""
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_block.py"), "--smoke", "--ppl", "--out",
                        str(tmp_path)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((tmp_path / "block-cpu.json").read_text())
    assert data["device"] == "cpu" and data["block_size"] == 16
    for row in data["attention"]:  # the share of the 8 x 9 / 2 causal block tiles the kept blocks skip
        kept = sum(1 + min(row["block_k"], i) for i in range(8))
        assert row["n_blocks"] == 8 and abs(row["sparsity"] - (1 - kept / 36)) < 1e-4
    assert [row["target_sparsity"] for row in data["attention"]] == [0.5, 0.75]
    assert all(row["flex_ms"] > 0 and row["dense_ms"] > 0 and row["gate_and_mask_ms"] > 0 for row in data["attention"])
    assert len(data["checks"]) == 2 and all(c["ok"] for c in data["checks"])
    # 8 blocks with block_k >= 1: 50% and 75% both come out as block_k 1, timed and scored once
    assert [(row["tokens"], row["block_k"]) for row in data["e2e"]] == [(128, 1)]
    assert all(row["block_ms"] > 0 for row in data["e2e"])
    assert [row["routing"] for row in data["ppl"]] == ["dense", "block-oracle@b=16,k=1", "block-random@b=16,k=1",
                                                       "block-gate@b=16,k=1"]
    md = (tmp_path / "block-cpu.md").read_text()
    assert "## Targets" in md and "8x8192 at 87.5% block sparsity: not measured" in md


def test_bench_inference_tiny_runs_on_cpu(tmp_path):
    """bench_inference.py --tiny on CPU: prefill and decode rows for dense and block-gate with finite times, and the
    block routing that keeps every block decodes dense's greedy tokens."""
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_inference.py"), "--tiny", "--graph-steps",
                        "40", "--no-block-factors-kernel", "--out", str(tmp_path)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
    data = json.loads((tmp_path / "inference-cpu.json").read_text())
    assert data["device"] == "cpu" and data["finished"] and data["block_size"] == 16
    assert data["backend"]["block_factors_kernel"] is False  # the flag turns the default off
    assert not any(row.get("errors") or row.get("skipped") for row in data["prefill"] + data["decode"])
    for kind, key in (("prefill", "eager_ms"), ("decode", "tokens_per_s")):
        rows = data[kind]
        assert {row["routing"].split("@")[0] for row in rows} == {"dense", "block-gate"}, kind
        assert all(math.isfinite(row[key]) and row[key] > 0 for row in rows), kind
        assert all(row["peak_mib"] is None for row in rows), kind  # CUDA only
    assert all(math.isfinite(row["attention_ms"]) for row in data["prefill"])
    assert all(row["eager_min_ms"] <= row["eager_ms"] <= row["eager_max_ms"] for row in data["prefill"])
    assert all(row["row_s"] > 0 for row in data["prefill"] + data["decode"])  # each row's own wall time
    assert all(row["selection_ms"] > 0 for row in data["prefill"] if row["block_k"] is not None)
    assert all(row.get("compiled_ms") is None and row.get("attention_tflops") is None for row in data["prefill"])
    full = [row for row in data["decode"] if row["sparsity"] == 0.0 and row["block_k"] is not None]
    assert full and all(row["same_tokens_as_dense"] for row in full)
    assert all(len(row["tokens"][0]) == data["new_tokens"] + 1 for row in data["decode"] if row["kv_cache"] == "in-place")
    assert {row["sparsity"] for row in data["decode"] if row["block_k"] is not None} > {0.0}
    dynamic = [row for row in data["decode"] if "DynamicCache" in row["kv_cache"]]
    assert len(dynamic) == 2 and all(row["same_tokens_as_dense"] and row["routing"] == "dense" for row in dynamic)
    fixed = [row for row in data["decode"] if row["kv_cache"] == "fixed, eager"]  # CUDA graphs' steps, eager on CPU
    eager_block = [row for row in data["decode"] if row["block_k"] is not None and row["kv_cache"] == "in-place"]
    assert len(fixed) == len(dynamic) + len(eager_block)  # beside the dense and every block-gate row, per batch
    assert all(len(row["tokens"][0]) == data["graph_steps"] + 1 and row["tokens_per_s"] > 0 for row in fixed)
    assert all(row["same_tokens_as_dense"] for row in fixed if row["sparsity"] == 0.0)
    # timed from the step after the block-starting steps' graph is recorded (step 16 of a prompt of 256), one block
    assert {tuple(row["window"]) for row in fixed if row["block_k"] is not None} == {(17, 33)}
    assert {tuple(row["window"]) for row in fixed if row["block_k"] is None} == {(3, 40)}
    assert all(row["timed_steps"] == row["window"][1] - row["window"][0] and row["warm_ms"] > 0 for row in fixed)
    md = (tmp_path / "inference-cpu.md").read_text()
    assert "## Prefill" in md and "## Decode" in md and "bench_inference.py --tiny" in md
    first = data["prefill"][0]  # the median with the fastest and slowest call beside it
    assert f"| {first['eager_ms']:.2f} ({first['eager_min_ms']:.2f}-{first['eager_max_ms']:.2f}) |" in md
    assert "| decode tokens/s 8x32768 at 87.5% | - | >= 1.5 | not measured |" in md


def test_bench_loads_a_gate_distilled_in_float32_onto_the_bf16_copy_of_its_model(tmp_path, capsys):
    """--model DIR --gate GATES in bf16: the gate's own model, rounded, is neither refused nor warned about."""
    import argparse

    import torch
    from gatelab.hf import attach_block_gates, load_pretrained, save_gates
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_hf.py"), str(tmp_path / "m")],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    model, _ = load_pretrained(tmp_path / "m")
    attach_block_gates(model, d_gate=8, gate="learned", block_size=16)
    save_gates(model, tmp_path / "g")
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_block
    args = argparse.Namespace(model=str(tmp_path / "m"), gguf=None, gate=str(tmp_path / "g"), block_size=16)
    model, _, ctl = bench_block.load_model(args, None, torch.device("cpu"), torch.bfloat16)
    assert ctl.gate_type == "block" and next(model.parameters()).dtype == torch.bfloat16
    assert "WARNING" not in capsys.readouterr().err


def test_inference_targets_read_their_rows_and_judge_them():
    """The committed criteria: each target reads the rows it names and no other, and says not measured without them."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import inference_targets as it

    def pre(T, B, s, **kw):
        return dict(kind="prefill", context=T, batch=B, target_sparsity=s, block_k=None if s is None else 3, **kw)

    def dec(T, B, s, **kw):
        return dict(kind="decode", context=T, batch=B, target_sparsity=s, block_k=None if s is None else 3,
                    kv_cache="in-place", **kw)
    data = dict(layers=10, real_model=False, prefill=[
        pre(8192, 8, 0.5, selection_ms=1.0, attention_ms=1.0), pre(8192, 8, 0.75, selection_ms=1.0, attention_ms=0.8),
        pre(8192, 8, 0.875, selection_ms=1.0, attention_ms=0.5),
        pre(32768, 1, None, compiled_ms=30.0), pre(32768, 1, 0.875, compiled_ms=21.0)],
        decode=[dec(32768, 8, None, attention_step_ms=2.0, tokens_per_s=100.0),
                dict(dec(32768, 8, None, tokens_per_s=50.0), kv_cache="transformers DynamicCache"),
                dec(32768, 8, 0.875, attention_step_ms=0.4, tokens_per_s=160.0)])
    got = {t["target"]: t for t in it.evaluate(data)}
    sel = got["selection 8x8192"]
    assert sel["value"] == pytest.approx(0.2) and sel["met"] is False and "0.100, 0.125, 0.200" in sel["what"]
    assert got["selection 1x32768"]["met"] is None
    assert got["prefill 1x32768 at 87.5%"]["value"] == pytest.approx(30 / 21) and not got["prefill 1x32768 at 87.5%"]["met"]
    assert got["decode attention 8x32768 at 87.5%"]["met"] is True
    assert got["decode tokens/s 8x32768 at 87.5%"]["value"] == pytest.approx(1.6)  # the in-place dense row, not 50
    assert "real model 1x8192 at 50%" not in got
    data.update(real_model=True, prefill=data["prefill"] + [pre(8192, 1, None, compiled_ms=10.0, ppl=27.45),
                                                           pre(8192, 1, 0.5, compiled_ms=9.0, ppl=27.71)])
    real = {t["target"]: t for t in it.evaluate(data)}["real model 1x8192 at 50%"]
    assert real["met"] is True and "ppl ratio 1.0095" in real["what"]
    graphed = "decode tokens/s, CUDA graphs (added after run 3) 8x32768 at 87.5%"
    assert it.evaluate(data)[-2]["target"] == graphed and it.evaluate(data)[-2]["met"] is None
    data["decode"] += [dict(dec(32768, 8, None, tokens_per_s=120.0), kv_cache=it.GRAPHED_CACHE),
                       dict(dec(32768, 8, 0.875, tokens_per_s=170.0), kv_cache=it.GRAPHED_CACHE)]
    g = {t["target"]: t for t in it.evaluate(data)}[graphed]  # against the fastest dense row (the graphed one)
    assert g["value"] == pytest.approx(170 / 120) and g["met"] is False and it.GRAPHED_CACHE in g["what"]
    data["decode"] += [dict(dec(32768, 8, None, tokens_per_s=130.0), kv_cache=it.COMPILED_GRAPHED_CACHE),
                       dict(dec(32768, 8, 0.875, tokens_per_s=200.0), kv_cache=it.COMPILED_GRAPHED_CACHE)]
    c = it.evaluate(data)[-1]  # compiled: against the compiled dense row, the fastest now
    assert c["target"].startswith("decode tokens/s, compiled CUDA graphs") and c["value"] == pytest.approx(200 / 130)
    assert c["met"] is True
    assert {t["target"]: t for t in it.evaluate(data)}["decode tokens/s 8x32768 at 87.5%"]["value"] == pytest.approx(1.6)

