#!/usr/bin/env bash
# Ninth GPU session, third call: prefill graphs of up to 32 sequences (mixed with other trajectories' decode rows)
#   1. GPU tests of tests/test_prefill_graphs.py (five schemes)
#   2. lragent bench trace, base_lr_shared, 1.9k with 1 and 16 concurrent trajectories, prefill graphs on and off;
#      33.7k with one trajectory, prefill graphs on
# Device call: OUT=$OUT bash benchmarks/round9c_gpu.sh
ROUND=round9c DEADLINE=${DEADLINE:-540}
source "$(dirname "$0")/gpu_call.sh"
step tests 150 python3 -m pytest tests/test_prefill_graphs.py -q -n 5 -p no:cacheprovider -rfEs
tail -n 6 "$R/tests.log" >> "$S"
T="python3 -m lragent.bench.trace --model dummy:llama-3.1-8b --device cuda --no-plots --run-timeout 100 \
  --systems base_lr_shared"
step c16_graphs 120 $T --ctx 256 --concurrent 1,16 --out "$R/c16_graphs"
step c16_eager 120 $T --ctx 256 --concurrent 1,16 --cuda-graph-prefill-tokens 0 --out "$R/c16_eager"
[[ -n "${T33:-}" ]] && step t33_graphs 90 $T --ctx 8192 --out "$R/t33_graphs"
for f in c16_graphs c16_eager t33_graphs; do echo "== $f" >> "$S"; grep -A3 "^system" "$R/$f.log" | head -4 >> "$S";
  grep -i "error\|Traceback" "$R/$f.log" | head -5 >> "$S"; done
tar czf "$OUT/$ROUND.tgz" -C "$R" .
cat "$S"
