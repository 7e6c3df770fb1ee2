#!/usr/bin/env bash
# Thirteenth GPU session, third call: issue 17's targets on the final defaults (async scheduling, cascade decode)
#   1. (TESTS=1) GPU tests of the engine paths the new defaults touch
#   2. lragent bench kernels --only decode: batch 1 / 8 at 4k / 8k / 32k, alone and per layer of a step
#   3. lragent bench trace, base_lr_shared, 1.9k and 33.7k, sampled (greedy: call 2)
#   4. what a FlashInfer / FlashAttention-3 comparison would need here (nvcc, the packages)
# Device call: OUT=$OUT bash benchmarks/round13c_gpu.sh
ROUND=${ROUND:-round13c} DEADLINE=${DEADLINE:-420}
source "$(dirname "$0")/gpu_call.sh"
if [ -n "${TESTS:-}" ]; then
  step tests 140 python3 -m pytest tests/test_cuda_graphs.py tests/test_prefill_graphs.py tests/test_async_scheduling.py \
    tests/test_cascade_graph.py tests/test_key_adapters.py tests/test_fp8.py tests/test_engine_release.py -q -n 8 \
    -p no:cacheprovider -rfEs
  tail -n 8 "$R/tests.log" >> "$S"
fi
step kern 120 python3 -m lragent.bench.kernels --only decode --decode-batches 1,8 --decode-contexts 4k,8k,32k \
  --json "$R/kern.json"
echo "== kern" >> "$S"; grep "^decode\|^card\|Traceback\|Error" "$R/kern.log" >> "$S"
T="python3 -m lragent.bench.trace --model dummy:llama-3.1-8b --device cuda --no-plots --run-timeout 100 \
  --ctx 256,8192 --systems base_lr_shared"
step trace_s 50 $T --temperature 0.9 --top-p 0.75 --top-k 40 --out "$R/trace_s"
echo "== trace_s" >> "$S"; grep -A3 "^system" "$R/trace_s.log" | head -4 >> "$S"
grep -i "error\|Traceback" "$R/trace_s.log" | head -5 >> "$S"
{ echo "== libraries"; which nvcc || echo "no nvcc on PATH"; ls /usr/local/cuda*/bin/nvcc 2>&1 | head -2;
  python3 -c "import flashinfer" 2>&1 | tail -1; python3 -c "import flash_attn_interface" 2>&1 | tail -1;
  python3 -c "import flash_attn" 2>&1 | tail -1; pip list 2>/dev/null | grep -i -E "flash|cuda-nvcc|nvidia-cuda" ; } >> "$S" 2>&1
tar czf "$OUT/$ROUND.tgz" -C "$R" .
cat "$S"
