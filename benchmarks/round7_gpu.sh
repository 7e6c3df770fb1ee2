#!/usr/bin/env bash
# Seventh GPU session, first device call (<= 10 min): the one-launch kernels of this session on the card
#   1. GPU tests: split-K LoRA shrink reduced by its last split, the FP8 GEMV's SiLU prologue and last-split reduce,
#      CUDA-graph decode parity (every scheme), one-launch decode counters
#   2. FP8 GEMV tiles with UNROLL 1 / 2 per Llama-3.1-8B projection, fused SiLU vs silu_mul + GEMV (fp8_gemm_sweep)
#   3. batch-1 4k decode step vs its floor, bf16 and fp8, greedy and sampled, with the kernel profile
# Device call: OUT=$OUT bash benchmarks/round7_gpu.sh (SWEEP=0: without step 2)
ROUND=round7 DEADLINE=${DEADLINE:-560}
source "$(dirname "$0")/gpu_call.sh"
if [[ -f .w/agents/smol.xz.part00 ]]; then
  mkdir -p /root && cp .w/agents/smol.xz.part00 /root/ && echo "staged smol.xz.part00" | tee -a "$S"
fi
step tests 170 python3 -m pytest ${TESTS:-tests/test_kernels.py tests/test_fp8_gemm.py tests/test_fp8.py \
  tests/test_decode_one_launch.py tests/test_cuda_graphs.py} -q -n 6 -p no:cacheprovider -rfEs
tail -n 15 "$R/tests.log" >> "$S"
if [[ ${SWEEP:-1} == 1 ]]; then
  step fp8_sweep 120 python3 benchmarks/fp8_gemm_sweep.py --rows 1
  cat "$R/fp8_sweep.log" >> "$S"
fi
if [[ ${SHRINK:-0} == 1 ]]; then
  step shrink_sweep 60 python3 benchmarks/shrink_sweep.py
  cat "$R/shrink_sweep.log" >> "$S"
fi
M="--model dummy:llama-3.1-8b --device cuda"
F="python3 -m lragent.bench.decode $M --floor --batch 1 --prompt-len 4096"
SAMPLED="--temperature 0.9 --top-p 0.75 --top-k 40"
step floor_bf16 50 $F --profile --out "$R/floor_bf16.json"
step floor_fp8 50 $F --quantization fp8 --profile --out "$R/floor_fp8.json"
step floor_fp8_sampled 45 $F --quantization fp8 $SAMPLED --out "$R/floor_fp8_sampled.json"
step floor_bf16_sampled 45 $F $SAMPLED --out "$R/floor_bf16_sampled.json"
step floor_fp8_2launch 45 env LRAGENT_FP8_GEMV_REDUCE=kernel $F --quantization fp8 --out "$R/floor_fp8_2launch.json"
for f in floor_bf16 floor_fp8 floor_fp8_sampled floor_bf16_sampled floor_fp8_2launch; do
  echo "$f: $(grep 'ms/step' "$R/$f.log" | tail -1)" >> "$S"
  grep -o '"top_kernels_ms".*' "$R/$f.log" | head -1 | cut -c1-600 >> "$S"
  grep -h "host split" "$R/$f.log" | cut -c1-400 >> "$S"
  grep -o '"gap_short_ms.*longest_waits_us[^]]*]]' "$R/$f.log" | head -1 | cut -c1-500 >> "$S"
done
tar czf "$OUT/round7.tgz" -C "$R" .
cat "$S"
