#!/usr/bin/env bash
# Thirteenth GPU session, fourth call: the GPU tests on the final defaults; FlashInfer's prefill beside ours
#   1. GPU tests of the engine paths async scheduling and cascade-by-default touch (call 3 ran out of time)
#   2. FlashInfer 0.2.5 (sdist carried in .w/fi, JIT-built with the machine's nvcc) vs SDPA, 8k new tokens
#   3. ours at the same shape: lragent bench kernels --only prefill --prefill-new 8k --prefill-prefixes 0
# Device call (carry .w/fi): OUT=$OUT bash benchmarks/round13d_gpu.sh
ROUND=${ROUND:-round13d} DEADLINE=${DEADLINE:-540}
source "$(dirname "$0")/gpu_call.sh"
step tests 250 python3 -m pytest tests/test_cuda_graphs.py tests/test_prefill_graphs.py tests/test_async_scheduling.py \
  tests/test_cascade_graph.py tests/test_key_adapters.py tests/test_fp8.py tests/test_engine_release.py -q -n 12 \
  -p no:cacheprovider -rfEs
tail -n 8 "$R/tests.log" >> "$S"
step ours 40 python3 -m lragent.bench.kernels --only prefill --prefill-new 8k --prefill-prefixes 0 --decode-layers 0 \
  --json "$R/ours.json"
echo "== ours" >> "$S"; grep "^prefill\|^card" "$R/ours.log" >> "$S"
step fi_install 60 pip install -q --no-deps --no-build-isolation --target /tmp/fi_site .w/fi/ninja-*.whl \
  .w/fi/flashinfer_python-0.2.5.tar.gz
tail -n 5 "$R/fi_install.log" >> "$S"
step fi 200 env PATH=/tmp/fi_site/bin:$PATH PYTHONPATH=/tmp/fi_site:$PYTHONPATH MAX_JOBS=16 \
  python3 benchmarks/flashinfer_probe.py
echo "== flashinfer" >> "$S"; grep -v "^\s*$" "$R/fi.log" | grep -v "^  " | tail -n 12 >> "$S"
tar czf "$OUT/$ROUND.tgz" -C "$R" .
cat "$S"
