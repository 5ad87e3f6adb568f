#!/usr/bin/env bash
# The training step of every routing mode and an HF token-mode evaluation, timed for two versions of gatelab in one
# run on one GPU: BEFORE (a checkout of the earlier code, e.g. `git worktree add /tmp/before <commit>`) and this
# checkout. Outputs under $OUT (default /tmp/gatelab-out): <gpu>-batch16-{before,after}.{json,md}, hf-{before,after}.jsonl.
#
#   BEFORE=/tmp/before bash benchmarks/drivers/layout_compare.sh
set -uo pipefail
OUT=${OUT:-/tmp/gatelab-out}
BEFORE=${BEFORE:?BEFORE: a checkout of the code to compare against}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
MODES=${MODES:-dense,gate-topk,oracle-topk,random-topk,stochastic,soft-gate,soft-gate:sigmoid-renorm,soft-gate:topk-sigmoid}
FLAGS=(--batches 16 --compiled-modes none --skip-extra --no-check --steps "${STEPS:-30}" --modes "$MODES"
       --sort-modes none --flexhard-modes none --chunk-modes none --soft-modes none --eager-modes none
       --padvocab-modes none --headkernel-modes none --threshold-modes none)
for round in $(seq "${ROUNDS:-1}"); do  # ROUNDS > 1 alternates the two versions, so that drift hits both alike
  PYTHONPATH=$BEFORE/src python "$BEFORE/benchmarks/bench_train.py" "${FLAGS[@]}" --tag "before-$round" --out "$OUT"
  PYTHONPATH=$PWD/src python benchmarks/bench_train.py "${FLAGS[@]}" --tag "after-$round" --out "$OUT"
done
PYTHONPATH=$BEFORE/src python benchmarks/drivers/hf_token_eval.py ${HF_ARGS:-} --out "$OUT/hf-before.jsonl"
PYTHONPATH=$PWD/src python benchmarks/drivers/hf_token_eval.py ${HF_ARGS:-} --out "$OUT/hf-after.jsonl"
