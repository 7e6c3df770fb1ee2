#!/usr/bin/env bash
# Fourteenth GPU session, second call: GPU tests on the final head (penalty history, lazy block pools)
#   1. the three-engines budget test alone (nothing else on the card; pools now make their blocks when used)
#   2. the engine paths' GPU tests: graphs, cascade, async scheduling, release, sharing, key adapters, FP8
# Device call: OUT=$OUT bash benchmarks/round14b_gpu.sh
ROUND=${ROUND:-round14b} DEADLINE=${DEADLINE:-560}
source "$(dirname "$0")/gpu_call.sh"
step budget 240 python3 -m pytest tests/test_engine_release.py -q -p no:cacheprovider -rfEs -k three_engines --durations=3
tail -n 8 "$R/budget.log" >> "$S"
step tests 280 python3 -m pytest tests/test_cuda_graphs.py tests/test_prefill_graphs.py tests/test_async_scheduling.py \
  tests/test_cascade_graph.py tests/test_key_adapters.py tests/test_fp8.py tests/test_engine_release.py \
  tests/test_penalty_history.py tests/test_sharing.py tests/test_block_pool.py -q -n 12 -p no:cacheprovider -rfEs \
  -k "not three_engines and not embedded_model"
tail -n 8 "$R/tests.log" >> "$S"
tar czf "$OUT/$ROUND.tgz" -C "$R" .
cat "$S"
