#!/usr/bin/env bash
# Thirteenth GPU session, first call: async scheduling (a decode step queued before the previous one's tokens are
# on the host)
#   1. (TESTS=1) GPU tests: async scheduling against the waiting engine, decode / prefill / cascade graphs, sampler
#   2. lragent bench decode --floor, batch 1, 4k context: async on and off, greedy and sampled
#   3. lragent bench trace, base_lr_shared, 1.9k and 33.7k: async on and off (greedy), on (sampled)
# Device call: OUT=$OUT bash benchmarks/round13_gpu.sh
ROUND=${ROUND:-round13} DEADLINE=${DEADLINE:-520}
source "$(dirname "$0")/gpu_call.sh"
if [ -n "${TESTS:-}" ]; then
  step tests 150 python3 -m pytest tests/test_async_scheduling.py tests/test_cuda_graphs.py tests/test_sampler_gpu.py \
    tests/test_prefill_graphs.py tests/test_cascade_graph.py tests/test_isolation.py -q -n 8 -p no:cacheprovider -rfEs
  tail -n 6 "$R/tests.log" >> "$S"
fi
D="python3 -m lragent.bench.decode --model dummy:llama-3.1-8b --device cuda --floor --batch 1 --prompt-len 4096"
SMP="--temperature 0.9 --top-p 0.75 --top-k 40"
step dec_async 40 $D --async-scheduling --out "$R/dec_async.json"
step dec_sync 40 $D --no-async-scheduling --out "$R/dec_sync.json"
step dec_async_s 40 $D --async-scheduling $SMP --out "$R/dec_async_s.json"
step dec_sync_s 40 $D --no-async-scheduling $SMP --out "$R/dec_sync_s.json"
for f in dec_async dec_sync dec_async_s dec_sync_s; do echo "== $f" >> "$S";
  grep "ms/step\|engine ready\|host split\|Traceback\|Error" "$R/$f.log" | head -6 >> "$S"; done
T="python3 -m lragent.bench.trace --model dummy:llama-3.1-8b --device cuda --no-plots --run-timeout 100 \
  --ctx ${CTX:-256,8192} --systems base_lr_shared"
step trace_async 50 $T --async-scheduling --out "$R/trace_async"
step trace_sync 50 $T --no-async-scheduling --out "$R/trace_sync"
step trace_async_s 50 $T --async-scheduling $SMP --out "$R/trace_async_s"
for f in trace_async trace_sync trace_async_s; do echo "== $f" >> "$S"; grep -A3 "^system" "$R/$f.log" | head -4 >> "$S";
  grep -i "error\|Traceback" "$R/$f.log" | head -5 >> "$S"; done
tar czf "$OUT/$ROUND.tgz" -C "$R" .
cat "$S"
