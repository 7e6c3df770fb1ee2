#!/usr/bin/env bash
# Eighth GPU session (<= 10 min): the batch-1 decode kernel after the merge kernel's D slices
#   1. GPU tests of the decode kernels (merge slices, one-launch merge, graphs)
#   2. benchmarks/decode_probe.py --sweep at 4k and 8k (merge slices x splits x tiles, `bench kernels` timing)
#   3. lragent bench kernels, decode only, batch 1 / 8, 8k / 32k (the issue's decode-kernel target)
#   4. the engine's batch-1 4k step, bf16 and fp8, with the kernel profile
# Device call: OUT=$OUT bash benchmarks/round8c_gpu.sh
ROUND=round8c DEADLINE=${DEADLINE:-570}
source "$(dirname "$0")/gpu_call.sh"
step tests 120 python3 -m pytest ${TESTS:-tests/test_decode_one_launch.py tests/test_kernels.py} -q -n 8 -p no:cacheprovider -k "decode or merge" -rfEs
tail -n 6 "$R/tests.log" >> "$S"
for ctx in 4096 8192; do
  step sweep_$ctx 75 python3 benchmarks/decode_probe.py --ctx $ctx --sweep
  sort -t: -k2 -n "$R/sweep_$ctx.log" | grep merge_block | head -8 >> "$S"
  grep -E "merge_block_d +(0|32) splits +[0-9]+ block_n  64 warps 4 stages 2" "$R/sweep_$ctx.log" >> "$S"
done
step kernels 90 python3 -m lragent.bench.kernels --only decode --decode-batches 1,8 --decode-contexts 4k,8k,32k --json "$R/kernels.json"
grep -E "^decode" "$R/kernels.log" >> "$S"
M="--model dummy:llama-3.1-8b --device cuda"
F="python3 -m lragent.bench.decode $M --floor --batch 1 --prompt-len 4096"
step fp8 50 $F --quantization fp8 --profile --out "$R/fp8.json"
step bf16 50 $F --profile --out "$R/bf16.json"
for f in fp8 bf16; do
  echo "$f: $(grep 'ms/step' "$R/$f.log" | tail -1)" >> "$S"
  grep -o '"top_kernels_ms[^}]*' "$R/$f.log" | head -1 | cut -c1-600 >> "$S"
done
tar czf "$OUT/$ROUND.tgz" -C "$R" .
cat "$S"
