#!/usr/bin/env bash
# Eighth GPU session, second kind of call (<= 10 min):
#   1. the engine's decode step at batch 8 (4k context), bf16 and fp8 (the streamed-sweep tiles of DECODE_TILES)
#   2. Nsight Compute on the batch-1 decode kernel and its merge, 4k and 8k context (benchmarks/decode_probe.py)
# Device call: OUT=$OUT bash benchmarks/round8b_gpu.sh [STEPS=0] [NCU=0]
ROUND=round8b DEADLINE=${DEADLINE:-560}
source "$(dirname "$0")/gpu_call.sh"
M="--model dummy:llama-3.1-8b --device cuda"
F="python3 -m lragent.bench.decode $M --floor --prompt-len 4096"
if [[ ${STEPS:-1} == 1 ]]; then
  step fp8_b8 60 $F --batch 8 --quantization fp8 --out "$R/fp8_b8.json"
  step bf16_b8 60 $F --batch 8 --out "$R/bf16_b8.json"
  step fp8_b8_torch 60 env LRAGENT_FP8_GEMM=torch $F --batch 8 --quantization fp8 --out "$R/fp8_b8_torch.json"
  for f in fp8_b8 bf16_b8 fp8_b8_torch; do echo "$f: $(grep 'ms/step' "$R/$f.log" | tail -1)" >> "$S"; done
fi
if [[ ${NCU:-1} == 1 ]]; then
  for ctx in 4096 8192; do
    step probe_$ctx 30 python3 benchmarks/decode_probe.py --ctx $ctx
    grep "us per call" "$R/probe_$ctx.log" >> "$S"
    step ncu_$ctx 90 ncu --clock-control none -k regex:_decode --launch-skip 4 --launch-count 2 \
      --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
      --section MemoryWorkloadAnalysis python3 benchmarks/decode_probe.py --ctx $ctx --calls 6
    grep -E "_decode|Duration|Throughput|Occupancy|Registers|Grid Size|Block Size|Waves|Stall|Warp Cycles|Issued|Eligible|L2 Hit|Mem Busy|Max Bandwidth|DRAM" "$R/ncu_$ctx.log" | head -90 >> "$S"
  done
fi
tar czf "$OUT/$ROUND.tgz" -C "$R" .
cat "$S"
