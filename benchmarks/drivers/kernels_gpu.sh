#!/usr/bin/env bash
# The Triton kernels' GPU measurements (outputs under $OUT, default /tmp/gatelab-out; copy them to
# benchmarks/results/ or results/gpu-smoke/ as each step says). Each step fits a 10-minute job.
#
#   bash benchmarks/drivers/kernels_gpu.sh smoke   # the GPU smoke's training, distillation and evaluation checks of every token
#                                       #   routing mode and reading (compiled and reference paths) -> $OUT/smoke-kernels.md
#   bash benchmarks/drivers/kernels_gpu.sh topk    # the keep-mask kernel vs topk / sort -> $OUT/topk-<gpu>.md
#   bash benchmarks/drivers/kernels_gpu.sh train   # the training step of every routing mode (MODES, TAG, EXTRA: more bench_train flags), fast vs fast-sort (before the
#                                       #   kernels) vs flex hard masks, with the in-run gradient check
#                                       #   -> $OUT/<gpu>-batch16.{json,md}
#   bash benchmarks/drivers/kernels_gpu.sh opt-in  # the switches beside the defaults (README, "Switches"), each beside its default in
#                                       #   one run: topk-sigmoid's other threshold source (fast-threshold), the fused
#                                       #   loss with the other vocabulary padding (fast-padvocab) and on the
#                                       #   Triton head kernels (fast-headkernel), and the block
#                                       #   prefill with compiled gate scores and block lists (bench_block e2e)
#                                       #   -> $OUT/<gpu>-batch16-opt-in.{json,md}, $OUT/block/block-<gpu>.{json,md}
#   bash benchmarks/drivers/kernels_gpu.sh tune    # topk-sigmoid's threshold kernel under each setting (bench_threshold.py), the
#                                       #   fastest exact one then timed in the step beside the threshold from G in
#                                       #   memory; the soft-gate kernels' spill-free backward tiles beside the default
#                                       #   lists (soft_kernel_check.py --compare-tiles, then the step with them)
#                                       #   -> $OUT/threshold-<gpu>.*, soft-tiles.txt, <gpu>-batch16-{threshold-tuned,spill-free-tiles}.*
set -uo pipefail
OUT=${OUT:-/tmp/gatelab-out}
mkdir -p "$OUT"
export PYTHONPATH=${PWD}/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1
case "${1:-}" in
  smoke)
    ONLY=${ONLY:-'^(prepare|train-(fast|reference)-(dense|oracle-topk|gate-topk|random-topk|stochastic|soft-.*)|distill-.*|eval-.*)$'} \
      JOBS=${JOBS:-10} bash scripts/gpu_smoke.sh /tmp/smoke-kernels > /tmp/smoke-kernels.log 2>&1
    status=$?
    cp /tmp/smoke-kernels/summary.md "$OUT/smoke-kernels.md"
    grep '^FAIL' /tmp/smoke-kernels/results.txt | awk '{print $2}' | head -4 | while read -r n; do
      tail -60 "/tmp/smoke-kernels/logs/$n.log" > "$OUT/FAIL-$n.log"; done
    head -1 "$OUT/smoke-kernels.md"; exit $status;;
  topk)
    python benchmarks/bench_topk.py --out "$OUT";;
  train)
    python benchmarks/bench_train.py --batches 16 --compiled-modes none --skip-extra --tag "${TAG:-batch16}" --out "$OUT" \
      ${MODES:+--modes "$MODES"} ${EXTRA:-};;
  opt-in)
    status=0
    python benchmarks/bench_train.py --batches 16 --modes dense,soft-gate:topk-sigmoid --compiled-modes none \
      --skip-extra --eager-modes none --sort-modes none --flexhard-modes none --chunk-modes none --soft-modes none \
      --threshold-modes soft-gate:topk-sigmoid --padvocab-modes dense --headkernel-modes dense,soft-gate:topk-sigmoid \
      --tag batch16-opt-in --out "$OUT" || status=$?
    python benchmarks/bench_block.py --skip attention --budget-minutes "${BUDGET:-2}" --out "$OUT/block" || status=$?
    exit $status;;
  tune)
    status=0
    python benchmarks/bench_threshold.py --out "$OUT" 2>&1 | grep -E "^\||Fastest" || status=1
    best=$(python -c "import json,glob; b=json.load(open(glob.glob('$OUT/threshold-*.json')[0]))['best']; print(f\"{b['rows']},{b['segment']},{b['coarse']}\")")
    echo "fastest exact threshold setting: $best"
    python benchmarks/drivers/soft_kernel_check.py --compare-tiles 2>&1 | grep -v Warn | tee "$OUT/soft-tiles.txt"
    common=(--batches 16 --compiled-modes none --skip-extra --eager-modes none --sort-modes none --flexhard-modes none
            --chunk-modes none --soft-modes none --padvocab-modes none --headkernel-modes none --out "$OUT")
    GATELAB_FACTOR_TAU=$best python benchmarks/bench_train.py "${common[@]}" --modes dense,soft-gate:topk-sigmoid \
      --threshold-modes soft-gate:topk-sigmoid --tag batch16-threshold-tuned > "$OUT/bench-log.txt" 2>&1 || status=1
    GATELAB_SOFT_SPILL_FREE_TILES=1 GATELAB_FACTOR_TAU=$best python benchmarks/bench_train.py "${common[@]}" \
      --modes dense,soft-gate,soft-gate:topk-sigmoid --threshold-modes none --tag batch16-spill-free-tiles \
      >> "$OUT/bench-log.txt" 2>&1 || status=1
    grep -hE "^\| train|FAILED" "$OUT"/*threshold-tuned.md "$OUT"/*spill-free-tiles.md
    exit $status;;
  *) echo "usage: $0 smoke|topk|train|opt-in|tune" >&2; exit 2;;
esac
