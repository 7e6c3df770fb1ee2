#!/usr/bin/env bash
# Sixth GPU session, first device call (<= 10 min):
#   1. GPU tests of what was built since the last call (prompt log-probs on CUDA; the FP8 kernels, GEMV included)
#   2. FP8 W8A16 at decode sizes over tile shapes, the GEMV kernel included (benchmarks/fp8_gemm_sweep.py; never
#      run on a GPU before), and the batch-1 4k decode step vs its floor: bf16, fp8 tiled, fp8 with the GEMV
#   3. the first half of the embedded model staged for scripts/gpu_agents.sh (carry .w/agents/smol.xz.part00)
# Everything lands in $OUT/round6.tgz and a summary in $OUT/summary.txt.
# Device call: OUT=$OUT bash benchmarks/round6_gpu.sh
ROUND=round6 DEADLINE=${DEADLINE:-540}
source "$(dirname "$0")/gpu_call.sh"
if [[ -f .w/agents/smol.xz.part00 ]]; then
  mkdir -p /root && cp .w/agents/smol.xz.part00 /root/ && echo "staged smol.xz.part00" | tee -a "$S"
fi
step tests 120 python3 -m pytest tests/test_prompt_logprobs.py tests/test_fp8_gemm.py tests/test_fp8.py -q -n 4 \
  -p no:cacheprovider -rfEs
tail -n 12 "$R/tests.log" >> "$S"
step fp8_sweep 150 python3 benchmarks/fp8_gemm_sweep.py --rows 1,8
cat "$R/fp8_sweep.log" >> "$S"
M="--model dummy:llama-3.1-8b --device cuda"
F="python3 -m lragent.bench.decode $M --floor --batch 1 --prompt-len 4096"
step floor_bf16 50 $F --profile --out "$R/floor_bf16.json"
step floor_fp8 50 $F --quantization fp8 --profile --out "$R/floor_fp8.json"
step floor_fp8_gemv 50 env LRAGENT_FP8_GEMV=1 $F --quantization fp8 --profile --out "$R/floor_fp8_gemv.json"
for f in floor_bf16 floor_fp8 floor_fp8_gemv; do echo "$f: $(grep 'ms/step' "$R/$f.log" | tail -1)" >> "$S"; done
tar czf "$OUT/round6.tgz" -C "$R" .
cat "$S"
