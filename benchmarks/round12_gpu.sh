#!/usr/bin/env bash
# Twelfth GPU session, first call: prefill over materialised values (value_lr_prefill) and heaviest-first tiles
#   1. GPU tests: value_lr_prefill, the kernel matrix's prefill cases (pages of 16-128)
#   2. lragent bench kernels --only prefill: the engine's route per shape, both routes and the LR-free kernel;
#      again with the query tiles in order (LRAGENT_PREFILL_HEAVY_FIRST=0) at 8k new tokens
#   3. lragent bench trace, base_lr_shared, 1.9k and 33.7k, greedy and sampled
# Device call: OUT=$OUT bash benchmarks/round12_gpu.sh
ROUND=round12 DEADLINE=${DEADLINE:-570}
source "$(dirname "$0")/gpu_call.sh"
step tests_kernels 150 python3 -m pytest tests/test_value_lr_prefill.py tests/test_kernels.py -q -n 6 \
  -p no:cacheprovider -rfEs -k "value or gpu_matrix or tma or prefill"
tail -n 6 "$R/tests_kernels.log" >> "$S"
step kern 110 python3 -m lragent.bench.kernels --only prefill --json "$R/kern.json"
echo "== kern" >> "$S"; grep "^prefill\|^card" "$R/kern.log" >> "$S"
step kern_inorder 40 env LRAGENT_PREFILL_HEAVY_FIRST=0 python3 -m lragent.bench.kernels --only prefill \
  --prefill-new 4096,8192 --prefill-prefixes 0,8192 --json "$R/kern_inorder.json"
echo "== kern_inorder" >> "$S"; grep "^prefill\|^card" "$R/kern_inorder.log" >> "$S"
T="python3 -m lragent.bench.trace --model dummy:llama-3.1-8b --device cuda --no-plots --run-timeout 100 \
  --ctx ${CTX:-256,8192} --systems base_lr_shared"
step trace 80 $T --out "$R/trace"
step trace_sampled 80 $T --temperature 0.9 --top-p 0.75 --top-k 40 --out "$R/trace_sampled"
for f in trace trace_sampled; do echo "== $f" >> "$S"; grep -A3 "^system" "$R/$f.log" | head -4 >> "$S";
  grep -i "error\|Traceback" "$R/$f.log" | head -5 >> "$S"; done
tar czf "$OUT/$ROUND.tgz" -C "$R" .
cat "$S"
