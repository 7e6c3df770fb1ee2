#!/usr/bin/env bash
# Fourteenth GPU session, third call: the add + RMSNorm prologue of the FP8 gate/up GEMV; close() releasing memory
#   1. the engine-release tests alone (the three-engines budget test among them), then the FP8 kernel and engine
#      tests (the prologue against add_rms_norm + GEMV compiled, with and without PDL; the engine's tokens)
#   2. batch-1 decode step at 4k, dummy Llama-3.1-8B: bf16, fp8, fp8 with LRAGENT_FP8_NORM_PROLOGUE=0
# Device call: OUT=$OUT bash benchmarks/round14c_gpu.sh
ROUND=${ROUND:-round14c} DEADLINE=${DEADLINE:-380}
source "$(dirname "$0")/gpu_call.sh"
step release 70 python3 -m pytest tests/test_engine_release.py -q -p no:cacheprovider -rfEs
tail -n 4 "$R/release.log" >> "$S"
step fp8_tests 110 python3 -m pytest tests/test_fp8_gemm.py tests/test_fp8.py -q -n 8 -p no:cacheprovider -rfEs
tail -n 6 "$R/fp8_tests.log" >> "$S"
D="python3 -m lragent.bench.decode --model dummy:llama-3.1-8b --device cuda --floor --batch 1 --prompt-len 4096"
step bf16 40 $D --out "$R/bf16.json"
step fp8 50 $D --quantization fp8 --out "$R/fp8.json"
step fp8_noprologue 45 env LRAGENT_FP8_NORM_PROLOGUE=0 $D --quantization fp8 --out "$R/fp8_noprologue.json"
for f in bf16 fp8 fp8_noprologue; do
  echo "== $f" >> "$S"; grep -A2 "step ms" "$R/$f.log" | tail -2 >> "$S"
  grep -i "error\|Traceback" "$R/$f.log" | head -3 >> "$S"; done
tar czf "$OUT/$ROUND.tgz" -C "$R" .
cat "$S"
