#!/usr/bin/env bash
# Ninth GPU session, one device call (<= 10 min): issue 17's targets re-measured on the current code
#   1. lragent bench kernels: prefill attention with the LR term vs the bf16 matmul rate and SDPA; decode attention
#      at batch 1 / 8, 8k / 32k, against copy bandwidth
#   2. lragent bench decode --floor, batch 1, 4k context: bf16 and FP8 weights
#   3. lragent bench trace, base_lr_shared, the paper trace at 1.9k and 33.7k (--ctx 256,8192) against its floor
#   4. 16 rows over one 32k shared prefix, with and without --cascade-decode
# Device call: OUT=$OUT bash benchmarks/round9_gpu.sh
ROUND=round9 DEADLINE=${DEADLINE:-570}
source "$(dirname "$0")/gpu_call.sh"
M="--model dummy:llama-3.1-8b --device cuda"
step kernels 100 python3 -m lragent.bench.kernels --json "$R/kernels.json"
grep -E "^\||floor|%|x " "$R/kernels.log" | head -60 >> "$S"
F="python3 -m lragent.bench.decode $M --floor --batch 1 --prompt-len 4096"
step floor_bf16 50 $F --out "$R/floor_bf16.json"
step floor_fp8 60 $F --quantization fp8 --out "$R/floor_fp8.json"
for f in floor_bf16 floor_fp8; do echo "$f: $(grep 'ms/step' "$R/$f.log" | tail -1)" >> "$S"; done
step trace 150 python3 -m lragent.bench.trace $M --no-plots --run-timeout 100 --ctx 256,8192 \
  --systems base_lr_shared --out "$R/trace"
grep -B1 -A4 "^system" "$R/trace.log" >> "$S"; grep -i "floor" "$R/trace.log" | head -10 >> "$S"
D="python3 -m lragent.bench.decode $M --no-hf --batch 16 --prompt-len 32768 --shared-prefix 32256 --new-tokens 64"
step shared_plain 60 $D --out "$R/shared_plain.json"
step shared_cascade 70 $D --cascade-decode --out "$R/shared_cascade.json"
for f in shared_plain shared_cascade; do echo "$f: $(grep -h '^DECODE\|ms/step' "$R/$f.log" | tail -2)" >> "$S"; done
tar czf "$OUT/$ROUND.tgz" -C "$R" .
cat "$S"
