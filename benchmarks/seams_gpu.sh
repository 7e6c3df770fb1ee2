#!/usr/bin/env bash
# One device call for the architecture-seams issue: the GPU tests on this tree, then the paper trace at 33.7k
# (dummy Llama-3.1-8B, bf16, base_lr_shared, greedy) on the code before the change and after it, interleaved
# (before, after, before, after) on the same machine.
# Here, first: mkdir -p .w/before && git archive <before-commit> lragent pyproject.toml | tar -x -C .w/before
# Device call: carry [".w/before"], command: OUT=$OUT bash benchmarks/seams_gpu.sh
set -u
OUT=${OUT:-results/seams}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
ROOT=$(pwd)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
start=$(date +%s)
timeout ${TEST_TIMEOUT:-300} $PY -m pytest tests/test_kernels.py tests/test_fused_ops.py \
  -q -n ${NPROC:-8} -p no:cacheprovider -rfEs >"$OUT/tests.log" 2>&1
echo "kernel tests rc=$? in $(( $(date +%s) - start )) s"; tail -3 "$OUT/tests.log"
# engines sized by gpu_memory_utilization must not share the card with other test processes: one at a time
start=$(date +%s)
timeout ${TEST_TIMEOUT:-300} $PY -m pytest tests/test_cuda_graphs.py tests/test_engine_release.py \
  -q -p no:cacheprovider -rfEs >"$OUT/tests_serial.log" 2>&1
echo "engine tests rc=$? in $(( $(date +%s) - start )) s"; tail -3 "$OUT/tests_serial.log"
trace() {  # $1 = tree (before|after), $2 = round
  local dir=$ROOT; [[ $1 == before ]] && dir=$ROOT/.w/before
  (cd "$dir" && timeout ${TRACE_TIMEOUT:-120} $PY -m lragent.bench.trace --model dummy:llama-3.1-8b --device cuda \
     --no-plots --ctx 8192 --systems base_lr_shared --run-timeout 60 --out "$OUT/t" >"$OUT/t.log" 2>&1)
  echo "trace $1 round $2 rc=$?"; grep -A1 "^system" "$OUT/t.log" | sed -n 2p
  mv "$OUT/t/trace.json" "$OUT/trace_$1_$2.json"; rm -rf "$OUT/t" "$OUT/t.log"
}
for round in $(seq ${ROUNDS:-2}); do trace before $round; trace after $round; done
