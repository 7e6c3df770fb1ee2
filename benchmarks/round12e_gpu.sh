#!/usr/bin/env bash
# Twelfth GPU session, fifth call: prefill split-KV only when the grid is under an eighth of a wave, from 2k keys
#   1. (TESTS=1) GPU tests: the kernel matrix, prefill graphs (split counts sized for padded sequences)
#   2. lragent bench kernels --only prefill: default shapes and short chunks (32 / 256 new after 1k-32k)
#   3. lragent bench trace, base_lr_shared, 1.9k and 33.7k, greedy and sampled
# Device call: OUT=$OUT bash benchmarks/round12e_gpu.sh
ROUND=round12e DEADLINE=${DEADLINE:-250}
source "$(dirname "$0")/gpu_call.sh"
if [ -n "${TESTS:-}" ]; then
  step tests 90 python3 -m pytest tests/test_kernels.py tests/test_prefill_graphs.py -q -n 8 -p no:cacheprovider \
    -rfEs -k "gpu_matrix or gqa or graph"
  tail -n 4 "$R/tests.log" >> "$S"
fi
step kern 35 python3 -m lragent.bench.kernels --only prefill --json "$R/kern.json"
echo "== kern" >> "$S"; grep "^prefill\|^card" "$R/kern.log" >> "$S"
step short 25 python3 -m lragent.bench.kernels --only prefill --prefill-new 32,256 --prefill-prefixes 1024,8192,32768 \
  --json "$R/short.json"
echo "== short" >> "$S"; grep "^prefill" "$R/short.log" >> "$S"
T="python3 -m lragent.bench.trace --model dummy:llama-3.1-8b --device cuda --no-plots --run-timeout 100 \
  --ctx ${CTX:-256,8192} --systems base_lr_shared"
step trace 45 $T --out "$R/trace"
step trace_sampled 45 $T --temperature 0.9 --top-p 0.75 --top-k 40 --out "$R/trace_sampled"
for f in trace trace_sampled; do echo "== $f" >> "$S"; grep -A3 "^system" "$R/$f.log" | head -4 >> "$S";
  grep -i "error\|Traceback" "$R/$f.log" | head -5 >> "$S"; done
tar czf "$OUT/$ROUND.tgz" -C "$R" .
cat "$S"
