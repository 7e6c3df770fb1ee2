#!/usr/bin/env bash
# Tenth GPU session, fourth call: pages of 64 tokens by default on Hopper (TMA prefill tiles), checked and measured
#   1. GPU tests: the kernel matrix (pages of 64 / 128, rank 1 on the pointer tiles), then the engine's prefill and
#      decode graph tests at the new default pages (separate runs: a fault in one cannot poison the other)
#   2. benchmarks/tma_check.py (LR rows of a TMA tile now read as one page run too), lragent bench kernels --only
#      prefill, default shapes, pages of 64
#   3. lragent bench trace, base_lr_shared, 1.9k and 33.7k, greedy and sampled, default pages
# Device call: OUT=$OUT bash benchmarks/round10d_gpu.sh
ROUND=round10d DEADLINE=${DEADLINE:-560}
source "$(dirname "$0")/gpu_call.sh"
step tests_kernels 140 python3 -m pytest tests/test_kernels.py -q -n 4 -p no:cacheprovider -rfEs \
  -k "gpu_matrix or tma or prefill or default_block"
tail -n 6 "$R/tests_kernels.log" >> "$S"
step tests_engine 120 python3 -m pytest tests/test_prefill_graphs.py tests/test_cuda_graphs.py -q -n 4 \
  -p no:cacheprovider -rfEs
tail -n 6 "$R/tests_engine.log" >> "$S"
step check 75 python3 benchmarks/tma_check.py --jobs 8
cat "$R/check.log" >> "$S"
step kern64 50 python3 -m lragent.bench.kernels --only prefill --block-size 64 --json "$R/kern64.json"
echo "== kern64" >> "$S"; grep "^prefill" "$R/kern64.log" >> "$S"
T="python3 -m lragent.bench.trace --model dummy:llama-3.1-8b --device cuda --no-plots --run-timeout 100 \
  --ctx ${CTX:-256,8192} --systems base_lr_shared"
step trace 80 $T --out "$R/trace"
step trace_sampled 80 $T --temperature 0.9 --top-p 0.75 --top-k 40 --out "$R/trace_sampled"
for f in trace trace_sampled; do echo "== $f" >> "$S"; grep -A3 "^system" "$R/$f.log" | head -4 >> "$S";
  grep -i "error\|Traceback" "$R/$f.log" | head -5 >> "$S"; done
tar czf "$OUT/$ROUND.tgz" -C "$R" .
cat "$S"
