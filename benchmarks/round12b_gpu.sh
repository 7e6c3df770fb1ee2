#!/usr/bin/env bash
# Twelfth GPU session, second call: the gathered prefill route (keys and values with the LR term in contiguous
#   scratches, 128-key tiles without the term) checked and measured
#   1. GPU tests: value_lr_prefill, the kernel matrix's prefill cases (pages of 16-128)
#   2. lragent bench kernels --only prefill: the engine's route per shape, both routes and the LR-free kernel
#   3. lragent bench trace, base_lr_shared, 1.9k and 33.7k, greedy and sampled
# Device call: OUT=$OUT bash benchmarks/round12_gpu.sh
ROUND=round12b DEADLINE=${DEADLINE:-570}
source "$(dirname "$0")/gpu_call.sh"
step tests_kernels 150 python3 -m pytest tests/test_value_lr_prefill.py tests/test_kernels.py tests/test_key_adapters.py -q -n 8 \
  -p no:cacheprovider -rfEs -k "value or gpu_matrix or tma or prefill or gathered"
tail -n 6 "$R/tests_kernels.log" >> "$S"
step kern 130 python3 -m lragent.bench.kernels --only prefill --json "$R/kern.json"
echo "== kern" >> "$S"; grep "^prefill\|^card" "$R/kern.log" >> "$S"
T="python3 -m lragent.bench.trace --model dummy:llama-3.1-8b --device cuda --no-plots --run-timeout 100 \
  --ctx ${CTX:-256,8192} --systems base_lr_shared"
step trace 80 $T --out "$R/trace"
step trace_sampled 80 $T --temperature 0.9 --top-p 0.75 --top-k 40 --out "$R/trace_sampled"
for f in trace trace_sampled; do echo "== $f" >> "$S"; grep -A3 "^system" "$R/$f.log" | head -4 >> "$S";
  grep -i "error\|Traceback" "$R/$f.log" | head -5 >> "$S"; done
tar czf "$OUT/$ROUND.tgz" -C "$R" .
cat "$S"
