#!/usr/bin/env bash
# Thirteenth GPU session, second call: cascade decode as a default? (start-up, the trace, 16 rows over 32k)
#   1. (TESTS=1) tests/test_cascade_graph.py, tests/test_async_scheduling.py on the GPU
#   2. lragent bench decode, 16 rows over one 32k shared prefix, plain / cascade (async scheduling on, the default)
#   3. engine start-up and the batch-1 step with cascade on; the FP8 batch-1 step (async on)
#   4. lragent bench trace, base_lr_shared, 1.9k and 33.7k, cascade on; 1.9k with 16 trajectories, cascade on / off
# Device call: OUT=$OUT bash benchmarks/round13b_gpu.sh
ROUND=${ROUND:-round13b} DEADLINE=${DEADLINE:-450}
source "$(dirname "$0")/gpu_call.sh"
if [ -n "${TESTS:-}" ]; then
  step tests 60 python3 -m pytest tests/test_cascade_graph.py tests/test_async_scheduling.py -q -n 8 -p no:cacheprovider -rfEs
  tail -n 4 "$R/tests.log" >> "$S"
fi
C="python3 -m lragent.bench.decode --model dummy:llama-3.1-8b --device cuda --batch 16 --prompt-len 32768 \
  --shared-prefix 32256 --new-tokens 64"
step casc_plain 60 $C --out "$R/casc_plain.json"
step casc_on 60 $C --cascade-decode --out "$R/casc_on.json"
D="python3 -m lragent.bench.decode --model dummy:llama-3.1-8b --device cuda --floor --batch 1 --prompt-len 4096"
step dec_casc 40 $D --cascade-decode --out "$R/dec_casc.json"
step dec_plain 40 $D --out "$R/dec_plain.json"
step dec_fp8 40 $D --quantization fp8 --out "$R/dec_fp8.json"
for f in casc_plain casc_on dec_casc dec_plain dec_fp8; do echo "== $f" >> "$S";
  grep "ms/step\|engine ready\|tok/s\|Traceback\|Error" "$R/$f.log" | head -8 >> "$S"; done
T="python3 -m lragent.bench.trace --model dummy:llama-3.1-8b --device cuda --no-plots --run-timeout 100 \
  --systems base_lr_shared"
step trace_casc 50 $T --ctx 256,8192 --cascade-decode --out "$R/trace_casc"
step trace16_casc 50 $T --ctx 256 --concurrent 16 --cascade-decode --out "$R/trace16_casc"
step trace16 50 $T --ctx 256 --concurrent 16 --out "$R/trace16"
for f in trace_casc trace16_casc trace16; do echo "== $f" >> "$S"; grep -A3 "^system" "$R/$f.log" | head -4 >> "$S";
  grep -i "error\|Traceback" "$R/$f.log" | head -5 >> "$S"; done
tar czf "$OUT/$ROUND.tgz" -C "$R" .
cat "$S"
