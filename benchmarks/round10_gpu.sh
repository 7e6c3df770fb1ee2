#!/usr/bin/env bash
# Tenth GPU session, first call (<= 10 min), issue 17:
#   1. benchmarks/prefill_tma_probe.py: prefill attention with page-sized tiles through TMA descriptors, against the
#      engine's kernel and SDPA's flash backend
#   2. lragent bench trace, base_lr_shared, 1.9k and 33.7k, sampled (T 0.9, top-p 0.75, top-k 40), with prefill
#      graphs (the default) and without; the warm-up lines give a fresh process's start-up with and without them
#   3. the same trace, greedy, with 64-token pages (what reuse and time a larger page costs)
# Device call: OUT=$OUT bash benchmarks/round10_gpu.sh
ROUND=round10 DEADLINE=${DEADLINE:-570}
source "$(dirname "$0")/gpu_call.sh"
step probe 170 python3 benchmarks/prefill_tma_probe.py --out "$OUT/probe.json"
grep -v "^\s*$" "$R/probe.log" | tail -n 60 >> "$S"
T="python3 -m lragent.bench.trace --model dummy:llama-3.1-8b --device cuda --no-plots --run-timeout 100 \
  --ctx ${CTX:-256,8192} --systems base_lr_shared"
SAMPLED="--temperature 0.9 --top-p 0.75 --top-k 40"
step sampled_graphs 120 $T $SAMPLED --out "$R/sampled_graphs"
step sampled_eager 120 $T $SAMPLED --cuda-graph-prefill-tokens 0 --out "$R/sampled_eager"
step greedy_pages64 110 $T --block-size 64 --out "$R/greedy_pages64"
for f in sampled_graphs sampled_eager greedy_pages64; do echo "== $f" >> "$S"; grep -A3 "^system" "$R/$f.log" | head -4 >> "$S";
  grep -i "warm-up\|ready\|error\|Traceback" "$R/$f.log" | head -5 >> "$S"; done
tar czf "$OUT/$ROUND.tgz" -C "$R" .
cat "$S"
