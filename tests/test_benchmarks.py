"""The benchmark harness runs end to end (tiny model, CPU) and writes its JSON and markdown."""
import json
import subprocess
import sys
from pathlib import Path

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
