#!/usr/bin/env bash
# Sparse inference on one GPU (benchmarks/bench_inference.py) in the three runs its targets read
# (benchmarks/inference_targets.py), each writing inference-<gpu>-<tag>.{json,md} under $OUT (default
# /tmp/gatelab-out) after every row:
#   decode     8 x 32K: decode tokens/s and attention per step, dense (in-place and DynamicCache) and block-gate at
#              0 / 50 / 75 / 87.5% block sparsity, profiled
#   prefill8k  8 x 8K: eager prefill, the selection and one layer's attention (the selection target), profiled
#   prefill32k 1 x 32K: eager and compiled prefill, the selection and attention, profiled
# SmolLM2-135M-shaped random weights; MODEL_ARGS="--model DIR --gguf FILE --gate GATES" for a real model.
#
#   bash benchmarks/drivers/inference_gpu.sh [decode prefill8k prefill32k]
set -uo pipefail
OUT=${OUT:-/tmp/gatelab-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src
B=(python benchmarks/bench_inference.py --out "$OUT" ${MODEL_ARGS:-})
status=0
for part in "${@:-decode prefill8k prefill32k}"; do
  for p in $part; do
    case $p in
      decode) "${B[@]}" --tag decode --contexts 32768 --batches 8 --skip prefill --profile \
                --budget-minutes "${DECODE_MINUTES:-3}" || status=1;;
      prefill8k) "${B[@]}" --tag prefill8k --contexts 8192 --batches 8 --skip decode --sparsities 0.5,0.75,0.875 --profile \
                   --budget-minutes "${PREFILL8K_MINUTES:-2}" || status=1;;
      prefill32k) "${B[@]}" --tag prefill32k --contexts 32768 --batches 1 --skip decode,selection-compiled \
                    --sparsities 0.5,0.75,0.875 --compile --profile --budget-minutes "${PREFILL32K_MINUTES:-4}" \
                    || status=1;;
      *) echo "unknown part $p (decode, prefill8k, prefill32k)" >&2; exit 2;;
    esac
  done
done
exit $status
