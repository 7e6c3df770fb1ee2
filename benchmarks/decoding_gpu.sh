#!/usr/bin/env bash
# Issue 13 on the GPU machine, in device calls of under 10 minutes each:
#   PART=a: first vs second trace of a fresh process (33.7k, greedy and sampled), 16 x 9.1k greedy vs sampled and
#           JSON-schema vs unconstrained decode at batch 32 on the same engine (benchmarks/first_vs_second_gpu.py);
#           the GPU tests (kernels, fused ops, sampler vs its reference, structured masks, stacked_lr, CUDA graphs,
#           warm-up, engine release).
#   PART=sampler: a second process on the now warm Triton disk cache, and the sampler alone.
#   PART=b: the same comparisons through `lragent bench trace` / `bench decode`: the paper trace greedy vs sampled at 33.7k and 16 x 9.1k; JSON-schema vs unconstrained decode at batch 32.
# Here, first: the wheels structured output needs (the device image lacks them) into .w/whl, the SmolLM2 tokenizer
# files into .w/tok (dummy weights have no tokenizer; the JSON run borrows it):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .w/whl \
#     xgrammar apache-tvm-ffi pydantic pydantic-core annotated-types typing-inspection
# Device call: carry [".w/whl", ".w/tok"], command: PART=a OUT=$OUT bash benchmarks/decoding_gpu.sh
set -u
OUT=${OUT:-results/decoding_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
export PYTHONPATH=$(pwd):${PYTHONPATH:-}  # scripts under benchmarks/ import the package from this tree
if [[ -d .w/whl ]]; then
  pip install -q --no-index --no-deps --target /tmp/site .w/whl/*.whl 2>&1 | tail -1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch, triton, xgrammar; print('torch', torch.__version__, 'triton', triton.__version__, 'xgrammar', xgrammar.__version__)"
timed() {  # $1 = label, rest = command; prints rc and seconds
  local label=$1; shift; local start=$(date +%s)
  "$@"; echo "$label rc=$? in $(( $(date +%s) - start )) s"
}
if [[ ${PART:-a} == a ]]; then
  export TRITON_CACHE_DIR=$(mktemp -d)  # a fresh machine: nothing compiled yet
  timed "first vs second (fresh Triton cache)" timeout ${FVS_TIMEOUT:-200} $PY benchmarks/first_vs_second_gpu.py \
    --ctx 8192 --tokenizer .w/tok --json-schema benchmarks/sampling_cpu/long_array_schema.json \
    --out "$OUT/first_vs_second.json"
  unset TRITON_CACHE_DIR
  timed "parallel tests" timeout ${TEST_TIMEOUT:-150} $PY -m pytest ${PARALLEL_TESTS:-tests/test_kernels.py \
    tests/test_fused_ops.py tests/test_sampler_gpu.py tests/test_stacked_lr.py} -q -n ${NPROC:-8} -p no:cacheprovider -rfEs >"$OUT/tests.log" 2>&1
  tail -3 "$OUT/tests.log"
  timed "engine tests" timeout ${TEST_TIMEOUT:-150} $PY -m pytest tests/test_cuda_graphs.py tests/test_engine_release.py \
    tests/test_warmup.py -v --timeout 90 --durations 0 -p no:cacheprovider -rfEs >"$OUT/tests_serial.log" 2>&1
  tail -3 "$OUT/tests_serial.log"
elif [[ ${PART} == sampler ]]; then
  timed "first vs second (disk cache warm)" timeout 150 $PY benchmarks/first_vs_second_gpu.py --ctx 8192 \
    --out "$OUT/first_vs_second_cached.json"
  timed "sampler" timeout 150 $PY -m lragent.bench.sampler --device cuda --json "$OUT/sampler.json"
else
  for decoding in greedy sampled; do
    flags=""; [[ $decoding == sampled ]] && flags="--temperature 0.9 --top-p 0.75 --top-k 40"
    timed "trace 33.7k $decoding" timeout 150 $PY -m lragent.bench.trace --model dummy:llama-3.1-8b --device cuda \
      --no-plots --ctx 8192 --systems base_lr_shared --run-timeout 90 $flags --out "$OUT/t33_$decoding" \
      >"$OUT/t33_$decoding.log" 2>&1
    grep -A1 "^system" "$OUT/t33_$decoding.log" | sed -n 2p
    timed "trace 16 x 9.1k $decoding" timeout 150 $PY -m lragent.bench.trace --model dummy:llama-3.1-8b --device cuda \
      --no-plots --ctx 2048 --concurrent 16 --systems base_lr_shared --run-timeout 90 $flags \
      --out "$OUT/t9_$decoding" >"$OUT/t9_$decoding.log" 2>&1
    grep -A1 "^system" "$OUT/t9_$decoding.log" | sed -n 2p
  done
  for schema in none benchmarks/sampling_cpu/long_array_schema.json; do
    flags=""; [[ $schema != none ]] && flags="--json-schema $schema"
    timed "decode b32 json=$schema" timeout 120 $PY -m lragent.bench.decode --model dummy:llama-3.1-8b --device cuda \
      --batch 32 --prompt-len 512 --new-tokens 128 --no-hf --tokenizer .w/tok --sharing base_lr_shared \
      --temperature 0.9 --top-p 0.75 --top-k 40 $flags --out "$OUT/decode_$(basename $schema .json).json" \
      2>"$OUT/decode_$(basename $schema .json).err" | tail -3
  done
fi
