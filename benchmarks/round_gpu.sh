#!/usr/bin/env bash
# One device call (<= 10 min) for the GPU checks and measurements of issues 13, 16, 17 and 18, most needed first:
#   1. GPU tests: the fused Triton and CUDA-graph samplers against the torch path and the exact reference, the
#      cascade decode kernels against plain decode (tests/test_sampler_fast.py, test_sampler_gpu.py, test_cascade.py)
#   2. `lragent bench sampler --impl all`: every sampler implementation side by side (issue 13's 0.3 ms target)
#   3. `lragent bench trace`, dummy Llama-3.1-8B bf16, the paper trace at 9.1k and 33.7k under every scheme
#      (issue 16's table; base_lr_shared at TP=1 is issue 18's single-GPU regression check)
#   4. the same trace, base_lr_shared with random q/k/v/o adapters (shared k_proj and v_proj A): issue 16's target
#   5. benchmarks/cascade_gpu.py: 16 sequences over one 32k shared prefix, cascade vs plain decode (issue 17)
# Device call: carry [".w/whl"] (xgrammar & co for the structured-output GPU tests), command:
#   OUT=$OUT bash benchmarks/round_gpu.sh
# Each step is bounded (STEP_S, the call's DEADLINE); JSON and logs go to $OUT.
set -u
OUT=${OUT:-results/round_gpu}
DEADLINE=${DEADLINE:-565}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$(pwd):${PYTHONPATH:-}
if [[ -d .w/whl ]]; then
  pip install -q --no-index --no-deps --target /tmp/site .w/whl/*.whl 2>&1 | tail -1
  export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
step() {  # step LABEL SECONDS CMD...: run CMD bounded by SECONDS and the call's deadline, log to $OUT/LABEL.log
  local label=$1 limit=$2; shift 2
  local left=$(( DEADLINE - SECONDS )); (( limit > left )) && limit=$left
  if (( limit < 20 )); then echo "[$SECONDS s] skip $label"; return; fi
  local start=$SECONDS
  timeout -k 5 "$limit" "$@" > "$OUT/$label.log" 2>&1
  echo "[$SECONDS s] $label rc=$? in $(( SECONDS - start )) s"
}
T="$PY -m lragent.bench.trace --model dummy:llama-3.1-8b --device cuda --no-plots --run-timeout 60"
step tests 110 $PY -m pytest tests/test_sampler_fast.py tests/test_sampler_gpu.py tests/test_cascade.py -q -n 6 \
  -p no:cacheprovider -rfEs
tail -n 4 "$OUT/tests.log"
step sampler 90 $PY -m lragent.bench.sampler --device cuda --batch 1,32,256 --vocab 32k,128k,256k \
  --settings greedy,t0.9,t0.9-p0.75-k40,t0.9-penalties --impl all --json "$OUT/sampler_impls.json"
grep -E "^ *(batch|32 x 128k|1 x 128k|256 x 128k)|impl" "$OUT/sampler.log" | head -40
step trace_schemes 250 $T --ctx 2048,8192 --time-budget 230 \
  --systems base_lr_shared,stacked_lr,base_shared,full_shared,non_shared,droidspeak --out "$OUT/trace_schemes"
grep -B1 -A12 "^system" "$OUT/trace_schemes.log" | head -40
step trace_qkvo 70 $T --ctx 8192 --systems base_lr_shared --adapter-targets q_proj,k_proj,v_proj,o_proj \
  --out "$OUT/trace_qkvo"
grep -A3 "^system" "$OUT/trace_qkvo.log" | head -6
step cascade 60 $PY benchmarks/cascade_gpu.py
tail -n 12 "$OUT/cascade.log"
echo "done in $SECONDS s"
