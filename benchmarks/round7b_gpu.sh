#!/usr/bin/env bash
# Seventh GPU session, later calls (<= 10 min): PDL and the grouped q/v shrink on the card
#   1. GPU tests of the kernels touched (FP8 GEMV with PDL, fused ops, LoRA shrink, graphs, one-launch decode)
#   2. batch-1 4k decode step vs its floor: fp8 (PDL on, with the kernel profile), fp8 with LRAGENT_PDL=0, fp8 with
#      the one-launch decode merge, fp8 sampled, bf16 greedy and sampled
# Device call: OUT=$OUT bash benchmarks/round7b_gpu.sh (STAGE=1 also stages the embedded model's first part)
ROUND=round7b DEADLINE=${DEADLINE:-560}
source "$(dirname "$0")/gpu_call.sh"
if [[ ${STAGE:-0} == 1 && -f .w/agents/smol.xz.part00 ]]; then
  mkdir -p /root && cp .w/agents/smol.xz.part00 /root/ && echo "staged smol.xz.part00" | tee -a "$S"
fi
step tests 170 python3 -m pytest ${TESTS:-tests/test_kernels.py tests/test_fp8_gemm.py tests/test_fp8.py \
  tests/test_fused_ops.py tests/test_decode_one_launch.py tests/test_cuda_graphs.py} -q -n 6 -p no:cacheprovider -rfEs
tail -n 15 "$R/tests.log" >> "$S"
M="--model dummy:llama-3.1-8b --device cuda"
F="python3 -m lragent.bench.decode $M --floor --batch 1 --prompt-len 4096"
SAMPLED="--temperature 0.9 --top-p 0.75 --top-k 40"
step fp8 50 $F --quantization fp8 --profile --out "$R/fp8.json"
step fp8_nopdl 40 env LRAGENT_PDL=0 $F --quantization fp8 --out "$R/fp8_nopdl.json"
step fp8_lastsplit 40 env LRAGENT_DECODE_MERGE=last_split $F --quantization fp8 --out "$R/fp8_lastsplit.json"
step fp8_sampled 40 $F --quantization fp8 $SAMPLED --out "$R/fp8_sampled.json"
step bf16 45 $F --profile --out "$R/bf16.json"
step bf16_sampled 40 $F $SAMPLED --out "$R/bf16_sampled.json"
for f in fp8 fp8_nopdl fp8_lastsplit fp8_sampled bf16 bf16_sampled; do
  echo "$f: $(grep 'ms/step' "$R/$f.log" | tail -1)" >> "$S"
  grep -o '"kernel_launches[^}]*' "$R/$f.log" | head -1 | cut -c1-700 >> "$S"
  grep -o '"gap_short_ms[^]]*' "$R/$f.log" | head -1 | cut -c1-120 >> "$S"
  grep -h "host split" "$R/$f.log" | cut -c1-300 >> "$S"
  grep -h "Error\|error" "$R/$f.log" | head -3 >> "$S"
done
tar czf "$OUT/round7b.tgz" -C "$R" .
cat "$S"
