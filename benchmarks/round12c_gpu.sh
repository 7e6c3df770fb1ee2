#!/usr/bin/env bash
# Twelfth GPU session, third call: GQA-packed prefill (each key / value tile read once per kv head) with the gathered
# route's final policy, checked and measured against the unpacked kernel (LRAGENT_PREFILL_GQA_PACK=0)
#   1. GPU tests: kernels (matrix, prefill, packing), value_lr_prefill, key adapters' gathered route, prefill and
#      decode CUDA graphs
#   2. lragent bench kernels --only prefill over short and long chunks, packed and unpacked
#   3. lragent bench trace, base_lr_shared, 1.9k and 33.7k, greedy and sampled packed, greedy unpacked
# Device call: OUT=$OUT bash benchmarks/round12c_gpu.sh
ROUND=round12c DEADLINE=${DEADLINE:-575}
source "$(dirname "$0")/gpu_call.sh"
step tests 170 python3 -m pytest tests/test_value_lr_prefill.py tests/test_kernels.py tests/test_key_adapters.py \
  tests/test_prefill_graphs.py tests/test_cuda_graphs.py -q -n 8 -p no:cacheprovider -rfEs \
  -k "value or gpu_matrix or tma or prefill or gathered or gqa or graph"
tail -n 8 "$R/tests.log" >> "$S"
K="python3 -m lragent.bench.kernels --only prefill --prefill-new 32,256,1024,8192 --prefill-prefixes 0,8192,32768"
step kern 80 $K --json "$R/kern.json"
echo "== kern (packed)" >> "$S"; grep "^prefill\|^card" "$R/kern.log" >> "$S"
step kern_unpacked 80 env LRAGENT_PREFILL_GQA_PACK=0 $K --json "$R/kern_unpacked.json"
echo "== kern_unpacked" >> "$S"; grep "^prefill\|^card" "$R/kern_unpacked.log" >> "$S"
T="python3 -m lragent.bench.trace --model dummy:llama-3.1-8b --device cuda --no-plots --run-timeout 100 \
  --ctx ${CTX:-256,8192} --systems base_lr_shared"
step trace 60 $T --out "$R/trace"
step trace_sampled 60 $T --temperature 0.9 --top-p 0.75 --top-k 40 --out "$R/trace_sampled"
step trace_unpacked 60 env LRAGENT_PREFILL_GQA_PACK=0 $T --out "$R/trace_unpacked"
for f in trace trace_sampled trace_unpacked; do echo "== $f" >> "$S"; grep -A3 "^system" "$R/$f.log" | head -4 >> "$S";
  grep -i "error\|Traceback" "$R/$f.log" | head -5 >> "$S"; done
tar czf "$OUT/$ROUND.tgz" -C "$R" .
cat "$S"
