#!/usr/bin/env bash
# GPU smoke test: every CLI path of gatelab under every routing mode and soft-gate reading, a few steps each, on the
# fast path (torch.compile, CUDA graphs, fused loss) and on the reference path (--reference). CPU CI cannot see
# CUDA-only failures (the renormalised soft gate once crashed only on the GPU); run this on a GPU after changing
# routing, model, train, distill, hf or kernels, and commit its output.
#
#   bash scripts/gpu_smoke.sh [OUT_DIR]        # default /tmp/gatelab-gpu-smoke; JOBS=N checks at a time per lane (default 6)
#   ONLY='^(prepare|hf-.*)$' bash scripts/gpu_smoke.sh   # only the checks whose names match; name the checks they
#   read too: distill-*, eval-*, analyze-*, audit-* and exp3-* read train-fast-dense, train-fast-soft-*-learned and
#   train-fast-soft-sigmoid-random (section 1), and the distill-* gates (section 2)
#
# Writes OUT_DIR/summary.md (one line per check: PASS/FAIL, seconds) and OUT_DIR/logs/<check>.log, and exits
# non-zero if any check failed. Works on CPU too (slowly, and then it proves nothing about CUDA).
set -uo pipefail
OUT=${1:-/tmp/gatelab-gpu-smoke}
JOBS=${JOBS:-6}
rm -rf "$OUT"; mkdir -p "$OUT/logs" "$OUT/runs"
R=$OUT/runs
GL=(python -m gatelab)
export PYTHONUNBUFFERED=1
# a small model of the paper's shape family (head dim 64, as in the 31M model), k = 16 of 128 keys
TINY=(model.n_layer=2 model.d_model=128 model.n_head=2 model.d_mlp=256 model.context=128 model.d_gate=16 steps=6
      batch_size=4 warmup_steps=2 eval_every=3 eval_tokens=2048 checkpoint_every=3 log_every=1)
MODES=(dense oracle-topk gate-topk soft-gate random-topk stochastic)
READINGS=(sigmoid sigmoid-renorm topk-sigmoid topk-sigmoid-renorm)
reading_overrides() {  # the routing.* overrides of a soft-gate reading
  case $1 in
    sigmoid) echo "routing.soft_mask=sigmoid routing.soft_renormalize=false" ;;
    sigmoid-renorm) echo "routing.soft_mask=sigmoid routing.soft_renormalize=true" ;;
    topk-sigmoid) echo "routing.soft_mask=topk-sigmoid routing.soft_renormalize=false" ;;
    topk-sigmoid-renorm) echo "routing.soft_mask=topk-sigmoid routing.soft_renormalize=true" ;;
  esac
}

check() {  # check NAME CMD...: run CMD, log it, record PASS/FAIL with its time (ONLY=REGEX: only matching names)
  local name=$1; shift
  if [ -n "${ONLY:-}" ] && ! [[ $name =~ $ONLY ]]; then return 0; fi
  local t0=$SECONDS
  if "$@" >"$OUT/logs/$name.log" 2>&1; then echo "PASS $name $((SECONDS - t0))" >>"$OUT/results.txt"
  else echo "FAIL $name $((SECONDS - t0))" >>"$OUT/results.txt"; tail -5 "$OUT/logs/$name.log" | sed "s/^/  [$name] /"; fi
}
pool() {  # run "check" calls from stdin lines, JOBS at a time
  while read -r line; do
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
    eval "check $line" &
  done
  wait
}
T0=$SECONDS
python - <<'EOF' >"$OUT/environment.txt" 2>&1
import platform, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "python", platform.python_version())
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (no CUDA: this run proves nothing about GPU paths)")
EOF
cat "$OUT/environment.txt"

# prepare and info, then three independent lanes side by side: sections 1-3 (pools of JOBS checks), the
# reproduction suite's smoke protocol (one process, JOBS runs at a time) and the Hugging Face section (pools of JOBS),
# so the script takes about as long as its longest lane rather than the sum of all three.
check prepare "${GL[@]}" prepare
check info "${GL[@]}" info

reproduce_lane() {
  local parallel=(--gpus 2 --device cpu)  # without CUDA: two CPU processes
  python -c "import torch; exit(not torch.cuda.is_available())" && parallel=(--jobs-per-gpu "$JOBS")
  check reproduce-smoke "${GL[@]}" reproduce --protocol smoke --out "$R/reproduce-smoke" --runs "$R/reproduce-smoke-runs" "${parallel[@]}" --quiet
  check report-smoke "${GL[@]}" report --protocol smoke --out "$R/reproduce-smoke"
}

hf_lane() {  # 4. Hugging Face adapter on a tiny random Llama with its own tokenizer (scripts/make_tiny_hf.py)
  check make-tiny-hf python scripts/make_tiny_hf.py "$R/tiny-llama"
  printf 'It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness' >"$R/prompt.txt"
  HF=(--model "$R/tiny-llama" --context 128)
  {
    echo "hf-eval ${GL[*]} hf-eval ${HF[*]} --routing dense,oracle-topk,random-topk,stochastic --k 16 --max-tokens 4096 --quiet"
    for loss in kl bce; do
      echo "hf-distill-$loss ${GL[*]} hf-distill ${HF[*]} --loss $loss --k 16 --d-gate 16 --steps 4 --batch-size 2 --out $R/hf-$loss --quiet"
    done
    for reading in "${READINGS[@]}"; do
      echo "hf-distill-task-$reading ${GL[*]} hf-distill ${HF[*]} --loss task --reading $reading --k 16 --d-gate 16 --steps 4 --batch-size 2 --out $R/hf-task-$reading --quiet"
    done
    for pos in rope qk; do
      echo "hf-distill-kl-$pos ${GL[*]} hf-distill ${HF[*]} --loss kl --position $pos --k 16 --d-gate 16 --steps 4 --batch-size 2 --eval-every 2 --patience 2 --out $R/hf-kl-$pos --quiet"
    done
    echo "hf-distill-block ${GL[*]} hf-distill ${HF[*]} --loss kl --block-size 16 --block-k 2 --d-gate 16 --steps 4 --batch-size 2 --out $R/hf-block --quiet"
    echo "hf-distill-block-qk ${GL[*]} hf-distill ${HF[*]} --loss kl --position qk --block-size 16 --block-k 2 --d-gate 16 --steps 4 --batch-size 2 --out $R/hf-block-qk --quiet"
    echo "hf-distill-task-unfrozen ${GL[*]} hf-distill ${HF[*]} --loss task --k 16 --d-gate 16 --steps 4 --batch-size 2 --unfreeze-layers 1,2 --out $R/hf-task-unfrozen --quiet"
  } | pool
  {
    echo "hf-eval-gate ${GL[*]} hf-eval ${HF[*]} --gate $R/hf-kl --routing gate-topk,soft-gate,oracle-topk --k 16 --max-tokens 4096 --quiet"
    for reading in "${READINGS[@]}"; do
      echo "hf-eval-task-$reading ${GL[*]} hf-eval ${HF[*]} --gate $R/hf-task-$reading --routing soft-gate --reading $reading --k 16 --max-tokens 4096 --quiet"
    done
    for pos in rope qk; do
      echo "hf-eval-gate-$pos ${GL[*]} hf-eval ${HF[*]} --gate $R/hf-kl-$pos --position $pos --routing gate-topk,soft-gate --k 16 --max-tokens 4096 --quiet"
    done
    echo "hf-eval-block ${GL[*]} hf-eval ${HF[*]} --gate $R/hf-block --routing dense,block-gate,block-oracle,block-random,block-soft --block-k 1,2 --max-tokens 4096 --quiet"
    echo "hf-eval-block-qk ${GL[*]} hf-eval ${HF[*]} --gate $R/hf-block-qk --position qk --routing block-gate,block-soft --block-k 1,2 --max-tokens 4096 --quiet"
    echo "hf-eval-block-qk-compiled env GATELAB_COMPILE_BLOCKS=1 ${GL[*]} hf-eval ${HF[*]} --gate $R/hf-block-qk --position qk --routing block-gate --block-k 1,2 --max-tokens 4096 --quiet"
    echo "hf-eval-block-qk-torch-factors env GATELAB_BLOCK_FACTORS_KERNEL=0 ${GL[*]} hf-eval ${HF[*]} --gate $R/hf-block-qk --position qk --routing block-gate --block-k 1,2 --max-tokens 4096 --quiet"
    echo "hf-eval-block-qk-torch-compile ${GL[*]} hf-eval ${HF[*]} --gate $R/hf-block-qk --position qk --routing dense,block-gate --block-k 1,2 --max-tokens 4096 --compile --quiet"
    for bk in 1 64; do  # generation with the KV cache reading each query block's kept blocks; 64: every block
      echo "hf-generate-block-k$bk ${GL[*]} generate --model $R/tiny-llama --gate $R/hf-block-qk --prompt-file $R/prompt.txt --max-new-tokens 40 --block-k $bk --compare --json $R/hf-generate-k$bk.json"
    done
    for bk in 1 64; do  # the same, each step replayed from a CUDA graph over a cache of fixed size
      echo "hf-generate-graphs-block-k$bk ${GL[*]} generate --model $R/tiny-llama --gate $R/hf-block-qk --prompt-file $R/prompt.txt --max-new-tokens 60 --block-k $bk --cuda-graphs --compare --json $R/hf-generate-graphs-k$bk.json"
    done
    echo "hf-generate-graphs-compiled ${GL[*]} generate --model $R/tiny-llama --gate $R/hf-block-qk --prompt-file $R/prompt.txt --max-new-tokens 60 --block-k 2 --cuda-graphs --compile --compare"
    echo "hf-generate-dense ${GL[*]} generate --model $R/tiny-llama --routing dense --prompt-file $R/prompt.txt --max-new-tokens 40"
    echo "hf-audit-rope ${GL[*]} audit --model $R/tiny-llama --gate $R/hf-kl-rope --k 16 --max-tokens 4096"
    echo "hf-audit ${GL[*]} audit --model $R/tiny-llama --gate $R/hf-kl --k 16 --max-tokens 4096"
  } | pool
  check hf-generate-every-block-is-dense python -c "import json, sys; d = json.load(open(sys.argv[1])); assert d['agreement'] == 1.0, d" "$R/hf-generate-k64.json"
  check hf-generate-graphs-every-block-is-dense python -c "import json, sys; d = json.load(open(sys.argv[1])); assert d['agreement'] == 1.0, d" "$R/hf-generate-graphs-k64.json"
  check hf-reproduce-smoke "${GL[@]}" reproduce --suite pretrained --protocol smoke --model "$R/tiny-llama" --out "$R/hf-suite" --runs "$R/hf-suite-runs" --quiet
}
reproduce_lane &
hf_lane &

# 1. demo-sized training under every routing mode and reading, fast and reference paths
{
  for path in fast reference; do
    flag=""; [ $path = reference ] && flag="--reference"
    for mode in "${MODES[@]}"; do
      gate=none; [ $mode = gate-topk ] && gate=learned
      if [ $mode = soft-gate ]; then
        for reading in "${READINGS[@]}"; do for g in learned random; do
          echo "train-$path-soft-$reading-$g ${GL[*]} train --out $R/train-$path-soft-$reading-$g --quiet $flag ${TINY[*]} routing.mode=soft-gate routing.k=16 model.gate=$g $(reading_overrides $reading)"
        done; done
      else
        echo "train-$path-$mode ${GL[*]} train --out $R/train-$path-$mode --quiet $flag ${TINY[*]} routing.mode=$mode routing.k=16 model.gate=$gate"
      fi
    done
    for mode in block-oracle block-gate block-random block-soft; do
      echo "train-$path-$mode ${GL[*]} train --out $R/train-$path-$mode --quiet $flag ${TINY[*]} routing.mode=$mode routing.block_size=16 routing.block_k=2 model.block_gate=learned"
    done
  done
  # the paths beside the defaults (README, "Opt-in fast paths"): the output head on the Triton kernels, and
  # topk-sigmoid's threshold from G formed in memory (the default forms it from the gate's factors)
  echo "train-fast-optin-head env GATELAB_LOSS_KERNEL=triton ${GL[*]} train --out $R/train-fast-optin-head --quiet ${TINY[*]} routing.mode=dense"
  echo "train-fast-alt-threshold env GATELAB_TOPK_THRESHOLD=scores ${GL[*]} train --out $R/train-fast-alt-threshold --quiet ${TINY[*]} routing.mode=soft-gate routing.k=16 model.gate=learned $(reading_overrides topk-sigmoid)"
  echo "train-fast-alt-unpadded env GATELAB_LOSS_VOCAB_MULTIPLE=1 ${GL[*]} train --out $R/train-fast-alt-unpadded --quiet ${TINY[*]} routing.mode=dense"
  echo "cuda-tests bash scripts/cuda_tests.sh"
} | pool

# 2. post-hoc gates on the dense checkpoint: kl, bce, task under every reading (+ the random control), both paths
BASE=$R/train-fast-dense/checkpoint
{
  for path in fast reference; do
    flag=""; [ $path = reference ] && flag="--reference"
    for loss in kl bce; do
      echo "distill-$path-$loss ${GL[*]} distill $BASE --loss $loss --k 16 --d-gate 16 --steps 6 --batch-size 4 --out $R/distill-$path-$loss --quiet $flag"
    done
    for reading in "${READINGS[@]}"; do
      echo "distill-$path-task-$reading ${GL[*]} distill $BASE --loss task --reading $reading --k 16 --d-gate 16 --steps 6 --batch-size 4 --out $R/distill-$path-task-$reading --quiet $flag eval_every=3 eval_tokens=2048"
    done
  done
  echo "distill-block-kl ${GL[*]} distill $BASE --loss kl --block-size 16 --block-k 2 --d-gate 16 --steps 6 --batch-size 4 --out $R/distill-block-kl --quiet"
  echo "distill-task-random-control ${GL[*]} distill $BASE --loss task --random-control --k 16 --d-gate 16 --out $R/distill-random-control --quiet"
} | pool

# 3. evaluation under every routing and reading, with the checkpoint's own gate and with distilled gates; analysis;
#    audit (in place and against a frozen-random control)
{
  for reading in "${READINGS[@]}"; do
    echo "eval-soft-$reading ${GL[*]} eval $R/train-fast-soft-$reading-learned/checkpoint --routing $(IFS=,; echo "${MODES[*]}") --k 8,16 --reading $reading --max-tokens 4096 --quiet"
    echo "eval-task-gate-$reading ${GL[*]} eval $BASE --gate $R/distill-fast-task-$reading --routing soft-gate,gate-topk --reading $reading --k 16 --max-tokens 4096 --quiet"
  done
  for loss in kl bce; do
    echo "eval-gate-$loss ${GL[*]} eval $BASE --gate $R/distill-fast-$loss --routing dense,oracle-topk,gate-topk --k 8,16,32 --max-tokens 4096 --quiet"
  done
  echo "eval-block-gate ${GL[*]} eval $BASE --gate $R/distill-block-kl --routing dense,block-gate,block-oracle,block-random --block-k 1,2 --max-tokens 4096 --quiet"
  echo "eval-block-gate-torch-factors env GATELAB_BLOCK_FACTORS_KERNEL=0 ${GL[*]} eval $BASE --gate $R/distill-block-kl --routing block-gate --block-k 1,2 --max-tokens 4096 --quiet"
  echo "analyze-gate ${GL[*]} analyze $BASE --gate $R/distill-fast-kl --k 8,16 --batches 2 --batch-size 4 --out $R/analyze-gate"
  echo "analyze-own ${GL[*]} analyze $R/train-fast-soft-sigmoid-learned/checkpoint --k 16 --batches 2 --batch-size 4 --out $R/analyze-own"
  echo "audit-gate ${GL[*]} audit $BASE --gate $R/distill-fast-kl --k 16 --max-tokens 4096"
  echo "audit-control ${GL[*]} audit $R/train-fast-soft-sigmoid-learned/checkpoint --control $R/train-fast-soft-sigmoid-random/checkpoint --k 16 --max-tokens 4096"
  echo "exp3-other-base ${GL[*]} eval $R/train-fast-soft-sigmoid-learned/checkpoint --gate $R/distill-fast-bce --allow-other-base --routing gate-topk --k 16 --max-tokens 4096 --quiet"
} | pool
wait  # the reproduce and HF lanes

# summary
sort -k2 "$OUT/results.txt" >"$OUT/results.sorted"
n_pass=$(grep -c '^PASS' "$OUT/results.sorted"); n_fail=$(grep -c '^FAIL' "$OUT/results.sorted")
{
  echo "# gatelab GPU smoke: $n_pass passed, $n_fail failed, $((SECONDS - T0)) s"
  echo
  echo "\`bash scripts/gpu_smoke.sh\` (JOBS=$JOBS checks at a time)."
  echo
  sed 's/^/    /' "$OUT/environment.txt"
  echo
  echo "| check | result | seconds |"
  echo "|---|---|---|"
  awk '{print "| " $2 " | " $1 " | " $3 " |"}' "$OUT/results.sorted"
} >"$OUT/summary.md"
cat "$OUT/summary.md"
[ "$n_fail" -eq 0 ]
