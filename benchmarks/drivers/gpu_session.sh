#!/usr/bin/env bash
# One GPU machine, many runs at once, driven in steps of about 10 minutes (each step fits a 10-minute job): the
# runs start as background process sessions (they outlive the step that starts them while the machine keeps
# running), each step waits, reports progress and packs everything finished so far into $OUT/session.tgz. The
# runs work in a copy of the repository (/tmp/repo), so changes to the working tree between steps never reach them.
#
#   step 1 (with SmolLM2's first part in .parts/):  bash benchmarks/drivers/gpu_session.sh start-31m 540
#        the compact suite's Experiments 2 and 4 and the block ablation (--jobs-per-gpu 8), and the full GPU
#        smoke (scripts/gpu_smoke.sh), then waits until 540 s into the step
#   here: bash benchmarks/drivers/smollm2_parts.sh next
#   step 2 (with .parts/ and .whl/):               bash benchmarks/drivers/gpu_session.sh start-smollm2 540
#        assembles SmolLM2 and starts the gate-variant study (pos-{none,rope,qk}, three processes), then Table 6
#        with the variant the study picks (pretrained.choose_position) and Tables 7-8 under the default reading;
#        beside them the block gate at 8K (benchmarks/drivers/block_gpu.sh smollm2, bench-model)
#   COMPACT_ONLY=block picks the compact experiments of start-31m; ONLY='regex' limits the smoke to those checks
#   (on a fresh machine, step 1 can be just: bash benchmarks/drivers/smollm2_parts.sh receive)
#   later steps:                                   bash benchmarks/drivers/gpu_session.sh wait 560
#
# Then, on your machine: tar xzf session.tgz -C /tmp/session, and copy units into results/ (see the README's commands).
set -uo pipefail
OUT=${OUT:-/tmp/gatelab-out}
mkdir -p "$OUT"
REPO=${REPO:-/tmp/repo}
T0=$SECONDS
export PYTHONUNBUFFERED=1
daemon() {  # daemon NAME CMD: run CMD in its own process session from /tmp/repo, logging to /tmp/logs/NAME.log
  local name=$1; shift
  mkdir -p /tmp/logs
  (cd "$REPO" && setsid nohup bash -c "$*; echo \"exit \$? at \$(date +%T)\" >> /tmp/logs/$name.done" \
     > "/tmp/logs/$name.log" 2>&1 < /dev/null &)
  echo "started $name"
}
collect() {  # everything finished so far -> $OUT/session.tgz, and a progress summary on stdout
  local files=()
  for d in /tmp/compact/units/* "$REPO"/results/pretrained/units/* /tmp/pretrained-gemma3/units/*; do
    [ -f "$d/result.json" ] && files+=("$d")
  done
  for f in /tmp/smoke/summary.md /tmp/smoke/results.txt /tmp/smoke/environment.txt /tmp/smoke/logs /tmp/blockout \
           /tmp/logs "$REPO"/results/pretrained/REPORT.md; do
    [ -e "$f" ] && files+=("$f")
  done
  [ ${#files[@]} -gt 0 ] && tar czf "$OUT/session.tgz" "${files[@]}" 2>/dev/null
  echo "== $(date +%T), $((SECONDS - T0)) s into the step"
  nvidia-smi --query-gpu=name,utilization.gpu,memory.used --format=csv,noheader 2>/dev/null
  for l in /tmp/logs/*.log; do [ -e "$l" ] || continue
    echo "-- $(basename "$l") $(cat "${l%.log}.done" 2>/dev/null)"; tail -c 600 "$l" | tr '\r' '\n' | tail -3; done
  [ -f /tmp/smoke/results.txt ] && echo "smoke: $(grep -c ^PASS /tmp/smoke/results.txt) pass, $(grep -c ^FAIL /tmp/smoke/results.txt) fail" \
    && grep ^FAIL /tmp/smoke/results.txt
  ls /tmp/compact/units 2>/dev/null | tr '\n' ' '; echo
  ls "$REPO"/results/pretrained/units 2>/dev/null | grep -E "^pos-|^table6-.*-bce|^table[78]-" | tr '\n' ' '; echo
  ls -la "$OUT"
}
make_repo() { [ -d $REPO/src ] || { mkdir -p $REPO && tar --exclude=./.parts --exclude=./.whl -cf - . | tar -xf - -C $REPO; }; }
wait_until() { while [ $((SECONDS - T0)) -lt "$1" ]; do sleep 10; done; }

case "${1:-}" in
  start-31m)
    make_repo
    bash benchmarks/drivers/smollm2_parts.sh receive
    (cd $REPO && PYTHONPATH=$REPO/src python -m gatelab prepare) || exit 1
    daemon compact "PYTHONPATH=$REPO/src python -m gatelab reproduce --protocol compact --only ${COMPACT_ONLY:-exp2,exp4,block} \
      --jobs-per-gpu ${COMPACT_JOBS:-8} --out /tmp/compact --runs /tmp/runs-compact --no-report --quiet"
    daemon smoke "PYTHONPATH=$REPO/src JOBS=${SMOKE_JOBS:-6} bash scripts/gpu_smoke.sh /tmp/smoke"
    wait_until "${2:-540}"; collect;;
  start-smollm2)
    make_repo
    bash benchmarks/drivers/smollm2_parts.sh receive && bash benchmarks/drivers/smollm2_parts.sh assemble || exit 1
    cp -r .whl $REPO/ 2>/dev/null
    PT="PYTHONPATH=/tmp/site:$REPO/src python -m gatelab reproduce --suite pretrained --protocol compact \
      --model /tmp/smollm2 --gguf SmolLM2-135M-Instruct.Q4_1.gguf --runs /tmp/runs-pretrained --no-report --quiet"
    # the tokens are cached once (table9 is done already, so this only tokenises), then three variant processes
    daemon pos-none "$PT --only table9 && $PT --only pos-none && touch /tmp/logs/pos-none.ok \
      && while [ ! -e /tmp/logs/pos-rope.ok ] || [ ! -e /tmp/logs/pos-qk.ok ]; do sleep 5; done \
      && V=\$(PYTHONPATH=$REPO/src python -c 'from gatelab.reproduce.report.pretrained import choose_position; print(choose_position(\"results/pretrained\"))') \
      && echo chosen \$V && $PT --position \$V --only table6-\$V-bce"
    daemon pos-rope "while [ ! -e /tmp/runs-pretrained/tokens/validation.npy ]; do sleep 5; done; $PT --only pos-rope \
      && touch /tmp/logs/pos-rope.ok && $PT --only table7 && $PT --only table8"
    daemon pos-qk "while [ ! -e /tmp/runs-pretrained/tokens/validation.npy ]; do sleep 5; done; $PT --only pos-qk \
      && touch /tmp/logs/pos-qk.ok"
    daemon block8k "export OUT=/tmp/blockout; mkdir -p \$OUT; bash benchmarks/drivers/block_gpu.sh smollm2 && BUDGET=3 bash benchmarks/drivers/block_gpu.sh bench-model"
    wait_until "${2:-540}"; collect;;
  wait) wait_until "${2:-560}"; collect;;
  collect) collect;;
  *) echo "usage: $0 start-31m [SECONDS] | start-smollm2 [SECONDS] | wait [SECONDS] | collect" >&2; exit 2;;
esac
