#!/usr/bin/env bash
# The gate-variant study on SmolLM2-135M (one GPU): the study and Table 6 of the chosen variant, as resumable units of
# `gatelab reproduce --suite pretrained` (pos-{none,rope,qk}-kl-d{32,64}; table6-VARIANT-bce-d32-k{64,128,256}).
# Run from the repository root on the GPU machine, after benchmarks/drivers/smollm2_parts.sh has assembled
# /tmp/smollm2; each step below fits a 10-minute job:
#
#   here:                     bash benchmarks/drivers/smollm2_parts.sh prepare
#   GPU machine:              bash benchmarks/drivers/smollm2_parts.sh receive
#   here:                     bash benchmarks/drivers/smollm2_parts.sh next
#   GPU machine (590 s):
#       bash benchmarks/drivers/smollm2_parts.sh receive && bash benchmarks/drivers/smollm2_parts.sh assemble && bash benchmarks/drivers/position_gate_study.sh study 6
#   GPU machine, twice more (/tmp/smollm2 and runs/ are still there), 590 s each:
#       bash benchmarks/drivers/position_gate_study.sh study 7        # until it prints "study: all units done"
#   then, with the variant V the table picks (and config.DEFAULT_POSITION set to it):
#       bash benchmarks/drivers/position_gate_study.sh table6 V 7     # Table 6 with V gates (BCE at k = 64/128/256)
#   optionally Gemma-3-270M (copied with benchmarks/drivers/gemma3_parts.sh; /tmp/gemma3): Table 9 and the KL gates
#   at d_gate 32 of the pre-RoPE variant and of V, into results/pretrained-gemma3/:
#       bash benchmarks/drivers/position_gate_study.sh gemma V 7
#
# `study MINUTES` / `table6 V MINUTES` start no new unit after MINUTES (a unit takes about 1.5-2 minutes for a KL
# gate, longer for BCE); a unit cut by a time limit resumes from its checkpoint in the next step while the
# machine keeps its disk. MAX_STEPS=N caps the steps of each gate (default: the protocol's 800); every step copies
# REPORT.md, the plots and the units' results to $OUT/pretrained/ when OUT is set: copy them over
# results/pretrained/ (`cp -r $OUT/pretrained/. results/pretrained/`) and rebuild the report with
# `gatelab report --suite pretrained`.
set -euo pipefail
if [ "${1:-}" = gemma ]; then
  MODEL=${MODEL:-/tmp/gemma3}; GGUF=${GGUF:-gemma-3-270m-q4_k_m.gguf}
  RESULTS=${RESULTS:-results/pretrained-gemma3}; RUNS=${RUNS:-runs/pretrained-gemma3}
fi
MODEL=${MODEL:-/tmp/smollm2}
GGUF=${GGUF:-SmolLM2-135M-Instruct.Q4_1.gguf}
RESULTS=${RESULTS:-results/pretrained}  # PROTOCOL=smoke RESULTS=/tmp/x RUNS=/tmp/y: a quick CPU check of the commands
RUNS=${RUNS:-runs/pretrained}
export PYTHONPATH=/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}
suite() {
  python -m gatelab reproduce --suite pretrained --protocol "${PROTOCOL:-compact}" --model "$MODEL" --gguf "$GGUF" \
    --out "$RESULTS" --runs "$RUNS" --quiet ${MAX_STEPS:+--max-steps "$MAX_STEPS"} "$@"
}
collect() {
  [ -n "${OUT:-}" ] || return 0
  mkdir -p "$OUT/pretrained/units"
  cp "$RESULTS"/REPORT.md "$RESULTS"/*.png "$OUT/pretrained/" 2>/dev/null || true
  for d in "$RESULTS"/units/table9 "$RESULTS"/units/pos-* "$RESULTS"/units/table6-*-bce-*; do
    [ -f "$d/result.json" ] && cp -r "$d" "$OUT/pretrained/units/"
  done
  return 0
}
trap collect EXIT
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader 2>/dev/null || true
case "${1:-}" in
  study)
    suite --only positions --budget-minutes "${2:-6}" | tee /tmp/position_study.status
    if ! grep -q "not started" /tmp/position_study.status; then echo "study: all units done"; fi;;
  table6)
    V=${2:?usage: $0 table6 none|rope|qk [MINUTES]}
    suite --position "$V" --only "table6-$V-bce" --budget-minutes "${3:-6}";;
  gemma)
    V=${2:?usage: $0 gemma none|rope|qk [MINUTES]}
    suite --only "table9,pos-none-kl-d32,pos-$V-kl-d32" --budget-minutes "${3:-6}";;
  *) echo "usage: $0 study [MINUTES] | table6 VARIANT [MINUTES] | gemma VARIANT [MINUTES]" >&2; exit 2;;
esac
