#!/usr/bin/env bash
# The block-sparse attention measurements on one GPU, each step a few minutes (outputs under $OUT, default
# /tmp/gatelab-out; copy them into the repository as each step says).
#
#   bash benchmarks/drivers/block_gpu.sh bench      # attention + end-to-end prefill speed, SmolLM2-135M-shaped random weights
#                                        #   -> $OUT/benchmarks/results/block-<gpu>.{json,md}
#                                        #   (copy to benchmarks/results/)
#   bash benchmarks/drivers/block_gpu.sh smollm2    # after benchmarks/drivers/smollm2_parts.sh (model in /tmp/smollm2): distil a
#                                        #   block gate at 8K (STEPS, default 300; STEPS=auto: as many as fit
#                                        #   DISTILL_SECONDS, from a 20-step probe), evaluate dense / oracle / gate /
#                                        #   random blocks at 8K
#                                        #   -> $OUT/block/  (copy to results/block/)
#   bash benchmarks/drivers/block_gpu.sh bench-model  # after smollm2, on the same machine: the real model's prefill latency and
#                                        #   perplexity at 2K/4K/8K beside each setting, with its distilled gates
#                                        #   -> $OUT/benchmarks/results-smollm2/ (copy the .md/.json to
#                                        #   benchmarks/results/ under another name, e.g. block-smollm2-<gpu>.*)
#   bash benchmarks/drivers/block_gpu.sh ablation [SEEDS]   # the block absorption ablation on the 31M GPT (compact protocol,
#                                        #   2,000 steps; SEEDS 1 by default, 3 is the protocol's; GPUS=N runs units
#                                        #   concurrently on N GPUs) -> $OUT/compact/units/block-*  (copy them to
#                                        #   results/compact/units/, then `gatelab report --protocol compact` here)
#
# Every step is bounded: bench by --budget-minutes, the others by their step counts; each writes what it finished.
set -euo pipefail
OUT=${OUT:-/tmp/gatelab-out}
mkdir -p "$OUT"
export PYTHONPATH=/tmp/site:${PWD}/src:${PYTHONPATH:-}
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
GATES=${GATES:-/tmp/block/smollm2-gates-b128}  # DISTILL_ARGS: more hf-distill flags (e.g. --block-pool max-min)
case "${1:-}" in
  bench)
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
    python benchmarks/bench_block.py --budget-minutes "${BUDGET:-4}" --out "$OUT/benchmarks/results";;
  smollm2)
    mkdir -p "$OUT/block"
    python - <<'EOF' | tee "$OUT/block/model-context.txt"
from gatelab.hf.gate_files import load_pretrained
m, _ = load_pretrained("/tmp/smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
print("max_position_embeddings", m.config.max_position_embeddings)
EOF
    # the gates (40 MB, and a 120 MB resume checkpoint) stay in /tmp; their metadata and curves come back
    distill() { python -m gatelab hf-distill --model /tmp/smollm2 --gguf "$GGUF" --block-size 128 --block-k 8 \
                  --context 8192 --batch-size 1 --lr 1e-3 --long-docs --quiet ${DISTILL_ARGS:-} "$@" 2>&1 | tail -3; }
    steps=${STEPS:-300}
    if [ "$steps" = auto ]; then  # as many steps as fit DISTILL_SECONDS, from a 20-step probe's time per step
      rm -rf /tmp/block/probe && distill --steps 20 --out /tmp/block/probe
      steps=$(python -c "import json; d = json.load(open('/tmp/block/probe/done.json')); \
print(max(20, int(${DISTILL_SECONDS:-300} / (d['train_s'] / d['steps'])) // 50 * 50))")
      cp /tmp/block/probe/done.json "$OUT/block/probe-done.json"
      echo "auto: $steps steps in about ${DISTILL_SECONDS:-300} s"
    fi
    distill --steps "$steps" --out "$GATES"
    mkdir -p "$OUT/block/$(basename "$GATES")"
    cp "$GATES"/{gate.json,metrics.jsonl,done.json} "$OUT/block/$(basename "$GATES")/"
    # block_k 3 / 8 / 18 of 64 blocks skip 88.0% / 74.0% / 49.8% of the causal block tiles at 8,192 tokens
    python -m gatelab hf-eval --model /tmp/smollm2 --gguf "$GGUF" --gate "$GATES" \
      --routing dense,block-gate,block-oracle,block-random --block-k 3,8,18 --context 8192 --batch-size 1 \
      --split test --long-docs --json "$OUT/block/smollm2-eval-8k.json" --quiet | tee "$OUT/block/smollm2-eval-8k.md";;
  bench-model)  # after `smollm2` on the same machine: prefill and perplexity of the real model with its gates
    python benchmarks/bench_block.py --model /tmp/smollm2 --gguf "$GGUF" --gate "$GATES" --skip attention --ppl \
      --budget-minutes "${BUDGET:-3}" --out "$OUT/benchmarks/results-smollm2";;
  ablation)
    status=0
    python -m gatelab reproduce --protocol compact --only block --seeds "${2:-1}" ${GPUS:+--gpus "$GPUS"} \
      --runs /tmp/runs-compact --no-report --quiet > "$OUT/ablation.log" 2>&1 || status=$?
    tail -20 "$OUT/ablation.log"
    mkdir -p "$OUT/compact/units" && cp -r results/compact/units/block-* "$OUT/compact/units/" 2>/dev/null || true
    [ -d /tmp/runs-compact/logs ] && cp -r /tmp/runs-compact/logs "$OUT/compact/" || true
    exit $status;;
  *) echo "usage: $0 bench|smollm2|bench-model|ablation [SEEDS]" >&2; exit 2;;
esac
