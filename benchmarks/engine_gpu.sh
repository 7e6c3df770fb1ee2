#!/usr/bin/env bash
# The GPU engine path on the device: CUDA-graph decode tests, then decode step time against the bandwidth floor
# (batch 1/8/32 at 4k context, graphs vs eager) for dummy SmolLM2-135M and dummy Llama-3.1-8B in bf16.
#   OUT=results/engine_gpu MODELS="dummy:smollm2-135m dummy:llama-3.1-8b" benchmarks/engine_gpu.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-results/engine_gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
[ -n "${SKIP_TESTS:-}" ] || timeout -s ABRT "${TEST_S:-150}" python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda_graphs.py 2>&1 \
    | tail -25 | tee "$OUT/tests.log"
floor() { timeout -s ABRT "${FLOOR_S:-120}" python3 -m lragent.bench.decode --floor --device cuda --prompt-len 4096 --new-tokens 64 "$@"; }
for model in ${MODELS:-dummy:smollm2-135m dummy:llama-3.1-8b}; do
    tag=${model#dummy:}
    floor --model "$model" --batch ${BATCHES:-1 8 32} --out "$OUT/floor_${tag}.json" 2>&1 | tee -a "$OUT/floor.log"
    floor --model "$model" --batch ${EAGER_BATCHES:-1 32} --enforce-eager --out "$OUT/floor_${tag}_eager.json" 2>&1 | tee -a "$OUT/floor.log"
done
echo "total: $SECONDS s"
