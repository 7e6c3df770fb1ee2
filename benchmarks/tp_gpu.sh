#!/usr/bin/env bash
# Issue 18's multi-GPU measurements, for when a multi-GPU kind is lent (not yet: none has been).
#   kind nvidia-h200-x2: OUT=$OUT bash benchmarks/tp_gpu.sh 2   TP=1 vs TP=2, dummy Llama-3.1-8B: the decode step at
#                        batch 1 (target TP=2 <= 0.6x TP=1) and the paper trace at 33.7k (target TP=2 faster)
#   kind nvidia-h200-x4: OUT=$OUT bash benchmarks/tp_gpu.sh 4   TP=4, dummy Llama-3.1-70B, the 33.7k trace under all
#                        four schemes (target: it runs)
set -u
OUT=${OUT:-results/tp_gpu}
N=${1:-2}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$(pwd):${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
if [[ $N == 2 ]]; then
  for tp in 1 2; do
    timeout 150 python3 -m lragent.bench.decode --model dummy:llama-3.1-8b --device cuda --floor --batch 1 \
      --prompt-len 4096 -tp $tp --out "$OUT/decode_tp$tp.json" 2>&1 | tail -n 3
    timeout 200 python3 -m lragent.bench.trace --model dummy:llama-3.1-8b --device cuda --no-plots --ctx 8192 \
      --systems base_lr_shared -tp $tp --out "$OUT/trace_tp$tp" 2>&1 | grep -A1 "^system" | sed -n 2p
  done
else
  timeout 560 python3 -m lragent.bench.trace --model dummy:llama-3.1-70b --device cuda --no-plots --ctx 8192 \
    --systems non_shared,full_shared,base_shared,base_lr_shared -tp "$N" --run-timeout 120 \
    --out "$OUT/trace_70b_tp$N" 2>&1 | grep -A5 "^system"
fi
