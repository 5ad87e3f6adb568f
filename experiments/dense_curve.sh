#!/usr/bin/env bash
# Measure the dense model's validation curve on the bundled corpus (how long before it overfits the ~7M
# tokens), then time one 1,000-step KL distillation on the final checkpoint and analyse its attention.
# Usage: OUT=results/dense-curve bash experiments/dense_curve.sh [STEPS]
set -euo pipefail
STEPS=${1:-12000}
OUT=${OUT:-results/dense-curve}
RUNS=${RUNS:-runs/dense-curve}
mkdir -p "$OUT"
gl() { python3 -m gatelab "$@"; }
gl prepare --quiet
gl train --config experiments/dense-2k.json --out "$RUNS/dense" --quiet steps="$STEPS" warmup_steps=500 \
   eval_every=500 checkpoint_every=2000
cp "$RUNS/dense/metrics.jsonl" "$OUT/dense-metrics.jsonl"
gl analyze "$RUNS/dense/checkpoint" --k 64,128,256 --batches 8 --out "$OUT/analysis"
start=$(date +%s)
gl distill "$RUNS/dense/checkpoint" --loss kl --k 64 --steps 1000 --out "$RUNS/kl-64" --quiet
echo "kl-64 distillation wall time: $(( $(date +%s) - start )) s" | tee "$OUT/distill-walltime.txt"
cp "$RUNS/kl-64/metrics.jsonl" "$OUT/kl-64-metrics.jsonl"
gl eval "$RUNS/dense/checkpoint" --gate "$RUNS/kl-64" --routing dense,oracle-topk,random-topk,gate-topk --k 64 \
   --quiet --json "$OUT/eval-kl-64.json"
