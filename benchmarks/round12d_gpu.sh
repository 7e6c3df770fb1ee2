#!/usr/bin/env bash
# Twelfth GPU session, fourth call: final figures with GQA packing for short chunks only ("auto") and bench kernels
# running split-KV as the engine does (max_context passed)
#   1. GPU tests: the packing test both ways, the kernel matrix's prefill cases
#   2. lragent bench kernels --only prefill: default shapes, then short chunks (32 / 256 new) auto, 1 and 0
#   3. lragent bench trace, base_lr_shared, 1.9k and 33.7k, greedy and sampled
# Device call: OUT=$OUT bash benchmarks/round12d_gpu.sh
ROUND=round12d DEADLINE=${DEADLINE:-560}
source "$(dirname "$0")/gpu_call.sh"
step tests 100 python3 -m pytest tests/test_kernels.py -q -n 8 -p no:cacheprovider -rfEs -k "gqa or gpu_matrix"
tail -n 4 "$R/tests.log" >> "$S"
step kern 90 python3 -m lragent.bench.kernels --only prefill --json "$R/kern.json"
echo "== kern" >> "$S"; grep "^prefill\|^card" "$R/kern.log" >> "$S"
K="python3 -m lragent.bench.kernels --only prefill --prefill-new 32,256 --prefill-prefixes 1024,8192,32768"
for m in auto 1 0; do
  step short_$m 45 env LRAGENT_PREFILL_GQA_PACK=$m $K --json "$R/short_$m.json"
  echo "== short pack=$m" >> "$S"; grep "^prefill" "$R/short_$m.log" >> "$S"
done
T="python3 -m lragent.bench.trace --model dummy:llama-3.1-8b --device cuda --no-plots --run-timeout 100 \
  --ctx ${CTX:-256,8192} --systems base_lr_shared"
step trace 60 $T --out "$R/trace"
step trace_sampled 60 $T --temperature 0.9 --top-p 0.75 --top-k 40 --out "$R/trace_sampled"
for f in trace trace_sampled; do echo "== $f" >> "$S"; grep -A3 "^system" "$R/$f.log" | head -4 >> "$S";
  grep -i "error\|Traceback" "$R/$f.log" | head -5 >> "$S"; done
tar czf "$OUT/$ROUND.tgz" -C "$R" .
cat "$S"
