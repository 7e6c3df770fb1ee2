#!/usr/bin/env bash
# One device call for the Triton kernels: the GPU test matrix, then `lragent bench kernels` (pass --sweep for the tile sweep).
# Usage on the GPU machine, from the repo root: OUT=results bash benchmarks/kernels_gpu.sh [extra bench args]
set -u
OUT=${OUT:-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
start=$(date +%s)
timeout ${TEST_TIMEOUT:-360} $PY -m pytest tests/test_kernels.py -v -n ${NPROC:-12} -p no:cacheprovider -rfE >"$OUT/tests.log" 2>&1
echo "tests rc=$? in $(( $(date +%s) - start )) s"; grep -c " PASSED " "$OUT/tests.log"; grep -E "FAILED|ERROR| passed| failed" "$OUT/tests.log" | tail -25
start=$(date +%s)
timeout ${BENCH_TIMEOUT:-200} $PY -m lragent.bench.kernels --json "$OUT/bench_kernels.json" "$@" 2>&1 | tee "$OUT/bench.log" | grep -v "^sweep\|^decode \|^prefill \|^lora "
echo "bench rc=${PIPESTATUS[0]} in $(( $(date +%s) - start )) s"
