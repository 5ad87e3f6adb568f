#!/usr/bin/env bash
# Sparse inference on one GPU (benchmarks/bench_inference.py) in the three runs its targets read
# (benchmarks/inference_targets.py), each writing inference-<gpu>-<tag>.{json,md} under $OUT (default
# /tmp/gatelab-out) after every row:
#   decode     8 x 32K: decode tokens/s and attention per step, dense (in-place and DynamicCache) and block-gate at
#              0 / 50 / 75 / 87.5% block sparsity, profiled; each also with CUDA-graphed steps over a cache of fixed
#              size (320 steps)
#   decode-compiled  8 x 32K at 87.5%: the same rows for dense and block-gate, plus CUDA-graphed steps compiled
#              (torch.compile) for both (SKIP=eager-decode: the graphed rows alone; GRAPH_STEPS=N)
#   prefill8k  8 x 8K: eager prefill, the selection and one layer's attention (the selection target), profiled
#   prefill32k 1 x 32K: eager and compiled prefill, the selection and attention, profiled
#   prefill8k-compiled  1 x 8K at 50 / 87.5%: eager and compiled prefill (the selection inside the compiled graph),
#              the selection eager and compiled (the real-model target's shape, on random weights)
#   prefill-long  1 x 16K, 64K and 128K (RoPE extended): eager and compiled prefill, dense and block-gate at 50 / 87.5%
#   prefill128k   the 128K rows of prefill-long alone
#   real8k     the real SmolLM2-135M at 8K (REAL_CONTEXTS=2048,4096,8192: also 2K and 4K; REAL_TAG: the files'
#              tag, default real8k), batch 1 and 8 (REAL_BATCHES, REAL_SPARSITIES: default 1,8 and 0.5,0.75,0.875): eager and
#              compiled prefill with perplexity beside each
#              row (the real-model target), after benchmarks/drivers/smollm2_parts.sh (model in /tmp/smollm2) and a
#              qk block gate distilled there (GATES=DIR, e.g. from `DISTILL_ARGS="--position qk"
#              bash benchmarks/drivers/block_gpu.sh smollm2`)
# SmolLM2-135M-shaped random weights but for real8k; MODEL_ARGS="--model DIR --gguf FILE --gate GATES" puts a real
# model under the other parts. COMPILE_MODE=reduce-overhead compiles the prefill parts with CUDA graphs (default:
# torch.compile's default mode). A block gate's factors at eager inference come from the Triton kernel by default
# (Backend.block_factors_kernel); FACTORS_KERNEL=0 computes them in torch instead (--no-block-factors-kernel, the
# files' tags gain -torch-factors), FACTORS_KERNEL=1 asks for the kernel explicitly (tags gain -factors-kernel).
#
#   bash benchmarks/drivers/inference_gpu.sh [decode prefill8k prefill32k]   # GATES=DIR ... real8k
set -uo pipefail
OUT=${OUT:-/tmp/gatelab-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src
case ${FACTORS_KERNEL:-} in
  1) S=-factors-kernel FK=--block-factors-kernel;;
  0) S=-torch-factors FK=--no-block-factors-kernel;;
  *) S= FK=;;
esac
B=(python benchmarks/bench_inference.py --out "$OUT" ${MODEL_ARGS:-} $FK)
status=0
for part in "${@:-decode prefill8k prefill32k}"; do
  for p in $part; do
    case $p in
      decode) "${B[@]}" --tag decode$S --contexts 32768 --batches 8 --skip prefill --profile \
                --budget-minutes "${DECODE_MINUTES:-4}" || status=1;;
      decode-compiled) "${B[@]}" --tag decode-compiled$S --contexts 32768 --batches 8 --sparsities 0.875 \
                         --skip prefill,dynamic-cache${SKIP:+,$SKIP} --graph-compile --graph-steps "${GRAPH_STEPS:-320}" \
                         --budget-minutes "${DECODE_MINUTES:-3}" || status=1;;
      prefill8k) "${B[@]}" --tag prefill8k$S --contexts 8192 --batches 8 --skip decode --sparsities 0.5,0.75,0.875 --profile \
                   --budget-minutes "${PREFILL8K_MINUTES:-2}" || status=1;;
      prefill32k) "${B[@]}" --tag prefill32k$S --contexts 32768 --batches 1 --skip decode,selection-compiled \
                    --sparsities 0.5,0.75,0.875 --compile --compile-mode "${COMPILE_MODE:-default}" --profile \
                    --budget-minutes "${PREFILL32K_MINUTES:-4}" || status=1;;
      prefill8k-compiled) "${B[@]}" --tag prefill8k-compiled$S --contexts 8192 --batches 1 --sparsities 0.5,0.875 \
                            --skip decode --compile --compile-mode "${COMPILE_MODE:-default}" \
                            --budget-minutes "${PREFILL8K_MINUTES:-3}" || status=1;;
      prefill128k) "${B[@]}" --tag prefill128k$S --contexts 131072 --batches 1 --sparsities 0.5,0.875 \
                     --skip decode,selection-compiled --compile --compile-mode "${COMPILE_MODE:-default}" --iters 5 \
                     --budget-minutes "${LONG_MINUTES:-6}" || status=1;;
      prefill-long) "${B[@]}" --tag prefill-long$S --contexts 16384,65536,131072 --batches 1 --sparsities 0.5,0.875 \
                      --skip decode,selection-compiled --compile --compile-mode "${COMPILE_MODE:-default}" --iters 5 \
                      --budget-minutes "${LONG_MINUTES:-6}" || status=1;;
      real8k) [ -n "${GATES:-}" ] || { echo "real8k needs GATES=DIR (a qk block gate for /tmp/smollm2)" >&2; exit 2; }
              PYTHONPATH=/tmp/site:$PYTHONPATH python benchmarks/bench_inference.py --out "$OUT" --tag "${REAL_TAG:-real8k}" \
                --model /tmp/smollm2 --gguf SmolLM2-135M-Instruct.Q4_1.gguf --gate "$GATES" --contexts "${REAL_CONTEXTS:-8192}" \
                --batches "${REAL_BATCHES:-1,8}" --sparsities "${REAL_SPARSITIES:-0.5,0.75,0.875}" --compile \
                --compile-mode "${COMPILE_MODE:-default}" --profile \
                --skip decode,selection-compiled \
                --budget-minutes "${REAL8K_MINUTES:-6}" || status=1;;
      *) echo "unknown part $p (decode, decode-compiled, prefill8k, prefill8k-compiled, prefill32k, prefill-long," \
              "prefill128k, real8k)" >&2; exit 2;;
    esac
  done
done
exit $status
