#!/usr/bin/env bash
# Ninth GPU session, second call (<= 10 min): CUDA graphs for short prefill chunks (issue 17 part 2)
#   1. GPU tests: prefill graphs against eager (greedy tokens, replays counted), the decode graph tests
#   2. lragent bench trace, base_lr_shared, the paper trace at 1.9k and 33.7k, with prefill graphs (the default) and
#      without (--cuda-graph-prefill-tokens 0), one after the other
# Device call: OUT=$OUT bash benchmarks/round9b_gpu.sh
ROUND=round9b DEADLINE=${DEADLINE:-570}
source "$(dirname "$0")/gpu_call.sh"
step tests 200 python3 -m pytest ${TESTS:-tests/test_prefill_graphs.py tests/test_cuda_graphs.py} -q -n 4 \
  -p no:cacheprovider -rfEs
tail -n 8 "$R/tests.log" >> "$S"
T="python3 -m lragent.bench.trace --model dummy:llama-3.1-8b --device cuda --no-plots --run-timeout 100 \
  --ctx ${CTX:-256,8192} --systems base_lr_shared"
step trace_graphs 150 $T --out "$R/trace_graphs"
step trace_eager 150 $T --cuda-graph-prefill-tokens 0 --out "$R/trace_eager"
for f in trace_graphs trace_eager; do echo "== $f" >> "$S"; grep -A3 "^system" "$R/$f.log" | head -4 >> "$S";
  grep -i "warm-up\|error\|Traceback" "$R/$f.log" | head -5 >> "$S"; done
tar czf "$OUT/$ROUND.tgz" -C "$R" .
cat "$S"
