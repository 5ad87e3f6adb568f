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
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_inference.py"), "--tiny", "--out",
                        str(tmp_path)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
    data = json.loads((tmp_path / "inference-cpu.json").read_text())
    assert data["device"] == "cpu" and data["finished"] and data["block_size"] == 16
    assert not any(row.get("errors") or row.get("skipped") for row in data["prefill"] + data["decode"])
    for kind, key in (("prefill", "eager_ms"), ("decode", "tokens_per_s")):
        rows = data[kind]
        assert {row["routing"].split("@")[0] for row in rows} == {"dense", "block-gate"}, kind
        assert all(math.isfinite(row[key]) and row[key] > 0 for row in rows), kind
        assert all(row["peak_mib"] is None for row in rows), kind  # CUDA only
    assert all(math.isfinite(row["attention_ms"]) for row in data["prefill"])
    assert all(row["selection_ms"] > 0 for row in data["prefill"] if row["block_k"] is not None)
    assert all(row.get("compiled_ms") is None and row.get("attention_tflops") is None for row in data["prefill"])
    full = [row for row in data["decode"] if row["sparsity"] == 0.0 and row["block_k"] is not None]
    assert full and all(row["same_tokens_as_dense"] for row in full)
    assert all(len(row["tokens"][0]) == data["new_tokens"] + 1 for row in data["decode"])
    assert {row["sparsity"] for row in data["decode"] if row["block_k"] is not None} > {0.0}
    md = (tmp_path / "inference-cpu.md").read_text()
    assert "## Prefill" in md and "## Decode" in md and "bench_inference.py --tiny" in md
