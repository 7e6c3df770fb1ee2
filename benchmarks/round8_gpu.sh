#!/usr/bin/env bash
# Eighth GPU session, one device call (<= 10 min): the FP8 matmul with the weights streamed (no L2 reuse)
#   1. GPU tests of the FP8 kernels (the swap-AB tile among them)
#   2. benchmarks/fp8_stream_sweep.py: GEMV, tiled x W^T and swap-AB W x^T tiles against bf16, 1 and 8 rows
# Device call: OUT=$OUT bash benchmarks/round8_gpu.sh [ROWS=1,8] [SHAPES=qkv,o,gate_up,down]
ROUND=round8 DEADLINE=${DEADLINE:-560}
source "$(dirname "$0")/gpu_call.sh"
step tests 150 python3 -m pytest ${TESTS:-tests/test_fp8_gemm.py} -q -n 6 -p no:cacheprovider -rfEs
tail -n 8 "$R/tests.log" >> "$S"
step sweep ${SWEEP_S:-360} python3 benchmarks/fp8_stream_sweep.py --rows ${ROWS:-1,8} --shapes ${SHAPES:-qkv,o,gate_up,down}
grep -E "BEST|bf16|default|failed|Error" "$R/sweep.log" >> "$S"
tar czf "$OUT/$ROUND.tgz" -C "$R" .
cat "$S"
