#!/usr/bin/env bash
# What this project built but has not yet measured on a GPU, in one device call (<= 10 min), most needed first:
#   0. the GPU tests of the key LR, cascade and FP8 (tests/test_key_adapters.py, test_cascade.py, test_fp8.py)
#   1. key adapters under base_lr_shared: the 33.7k trace with q/k/v/o adapters, prefill keys rebuilt on chip
#      (default) vs materialised once per reader (LRAGENT_KEY_LR_PREFILL=materialize), the keys' RoPE cos / sin
#      computed on chip (default) vs read from tables (LRAGENT_KEY_LR_TRIG=table), beside q/v only (issue 16)
#   2. cascade decode at engine level: 16 rows over one 32k shared prefix, decode tok/s with and without
#      --cascade-decode (issue 17's >= 3x per step)
#   3. FP8 weights: batch-1 decode step against the bandwidth floor, bf16 vs fp8 (issue 17's <= 0.6x), with a
#      kernel breakdown of the fp8 step
# Device call: OUT=$OUT bash benchmarks/pending_gpu.sh (carry .w/whl)
set -u
OUT=${OUT:-results/pending_gpu}
DEADLINE=${DEADLINE:-585}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$(pwd):${PYTHONPATH:-}
if [[ -d .w/whl ]]; then  # the wheels the GPU machine lacks (carry .w/whl), see benchmarks/round_gpu.sh
  pip install -q --no-index --no-deps --target /tmp/site .w/whl/*.whl 2>&1 | tail -1
  export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
step() {  # step LABEL SECONDS CMD...: bounded by SECONDS and the call's deadline; output to $OUT/LABEL.log
  local label=$1 limit=$2; shift 2
  local left=$(( DEADLINE - SECONDS )); (( limit > left )) && limit=$left
  if (( limit < 20 )); then echo "[$SECONDS s] skip $label"; return; fi
  timeout -k 5 "$limit" "$@" > "$OUT/$label.log" 2>&1
  echo "[$SECONDS s] $label rc=$?"
}
M="--model dummy:llama-3.1-8b --device cuda"
step tests 110 python3 -m pytest tests/test_key_adapters.py tests/test_cascade.py tests/test_fp8.py -q -n 4 \
  -p no:cacheprovider -rfEs
tail -n 4 "$OUT/tests.log"
T="python3 -m lragent.bench.trace $M --no-plots --run-timeout 90 --ctx 8192 --systems base_lr_shared"
QKVO="--adapter-targets q_proj,k_proj,v_proj,o_proj"
step trace_qv 80 $T --out "$OUT/trace_qv"
step trace_qkvo_on_chip 80 $T $QKVO --out "$OUT/trace_qkvo_on_chip"
LRAGENT_KEY_LR_PREFILL=materialize step trace_qkvo_materialize 80 $T $QKVO --out "$OUT/trace_qkvo_materialize"
LRAGENT_KEY_LR_PREFILL=materialize LRAGENT_KEY_LR_TRIG=table step trace_qkvo_materialize_table 80 $T $QKVO \
  --out "$OUT/trace_qkvo_materialize_table"
for f in trace_qv trace_qkvo_on_chip trace_qkvo_materialize trace_qkvo_materialize_table; do grep -A1 "^system" "$OUT/$f.log" | sed -n 2p; done
D="python3 -m lragent.bench.decode $M --no-hf --batch 16 --prompt-len 32768 --shared-prefix 32256 --new-tokens 64"
step decode_shared_plain 55 $D --out "$OUT/decode_shared_plain.json"
step decode_shared_cascade 55 $D --cascade-decode --out "$OUT/decode_shared_cascade.json"
grep -h "^DECODE" "$OUT"/decode_shared_*.log
F="python3 -m lragent.bench.decode $M --floor --batch 1 --prompt-len 4096"
step floor_bf16 45 $F --out "$OUT/floor_bf16.json"
step floor_fp8 60 $F --quantization fp8 --profile --out "$OUT/floor_fp8.json"
tail -n 4 "$OUT/floor_bf16.log" "$OUT/floor_fp8.log"
