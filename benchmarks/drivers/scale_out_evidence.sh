#!/usr/bin/env bash
# Evidence for data-parallel training and GPU sweeps, on a machine with 2 GPUs:
#   bash benchmarks/drivers/scale_out_evidence.sh [OUT]        (default OUT: results/scale-out)
# 1. the same dense run (global batch 16 x 512, seed 0, 600 steps) on 1 GPU and under torchrun on 2 GPUs;
# 2. the same 4 compact units (300 training steps each) run one after another on 1 GPU and with --gpus 2.
# Both sides compile from scratch (Inductor caches off), so neither profits from the other's compilation.
set -euo pipefail
OUT=${1:-results/scale-out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 TORCHINDUCTOR_FORCE_DISABLE_CACHES=1
export PYTHONUNBUFFERED=1
python3 -m gatelab prepare --quiet
(nvidia-smi --query-gpu=name --format=csv,noheader || echo cpu) > "$OUT/gpus.txt"
W=/tmp/gatelab-scale-out
rm -rf "$W" && mkdir -p "$W"
clock() { date +%s.%N; }
run() {  # run a command, logging its output and wall time
  local name=$1; shift; local t0; t0=$(clock)
  "$@" > "$W/$name.log" 2>&1 || { tail -20 "$W/$name.log"; exit 1; }
  echo "$name $(python3 -c "print($(clock) - $t0)")" >> "$W/wall.txt"
}
# STEPS, SWEEP_STEPS, PROTOCOL, COMPILE, EXTRA (train overrides) and SWEEP_ARGS shrink the run for a CPU dry run
common=(--config experiments/dense-2k.json --quiet steps=${STEPS:-600} eval_every=${STEPS:-600} checkpoint_every=${STEPS:-600}
        log_every=10 compile=${COMPILE:-true} ${EXTRA:-})
run ddp-1gpu python3 -m gatelab train "${common[@]}" --out "$W/ddp1"
run ddp-2gpu torchrun --nproc-per-node 2 -m gatelab train "${common[@]}" --out "$W/ddp2"
units=dense,exp2-hard-learned,exp2-hard-random,exp4-stochastic
sweep=(python3 -m gatelab reproduce --protocol "${PROTOCOL:-compact}" --steps "${SWEEP_STEPS:-300}" --only "$units" --no-report
       --quiet ${SWEEP_ARGS:-})
run sweep-1gpu "${sweep[@]}" --out "$W/sw1" --runs "$W/sw1-runs"
run sweep-2gpu "${sweep[@]}" --out "$W/sw2" --runs "$W/sw2-runs" --gpus 2
python3 benchmarks/drivers/scale_out_summary.py "$W" "$OUT"
