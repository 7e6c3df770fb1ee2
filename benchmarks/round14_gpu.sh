#!/usr/bin/env bash
# Fourteenth GPU session, first call: penalised decoding on the device (PenaltyHistory) and async scheduling
#   1. GPU tests: penalty history (device rows against the host-list reference, HF's repetition penalty), async
#      scheduling, the samplers; the three-engines budget test alone (unconfirmed alone in the thirteenth session)
#   2. batch-1 and batch-8 decode steps at 4k, dummy Llama-3.1-8B: greedy, sampled, sampled with repetition and
#      frequency penalties with async scheduling and without
# Device call: OUT=$OUT bash benchmarks/round14_gpu.sh
ROUND=${ROUND:-round14} DEADLINE=${DEADLINE:-560}
source "$(dirname "$0")/gpu_call.sh"
step tests 120 python3 -m pytest tests/test_penalty_history.py tests/test_async_scheduling.py tests/test_sampler_gpu.py \
  tests/test_sampler_fast.py -q -n 4 -p no:cacheprovider -rfEs
tail -n 4 "$R/tests.log" >> "$S"
step budget 90 python3 -m pytest tests/test_engine_release.py -q -p no:cacheprovider -rfEs -k three_engines
tail -n 3 "$R/budget.log" >> "$S"
D="python3 -m lragent.bench.decode --model dummy:llama-3.1-8b --device cuda --floor --prompt-len 4096"
SAMPLED="--temperature 0.9 --top-p 0.75 --top-k 40"
PEN="--repetition-penalty 1.2 --frequency-penalty 0.3"
step b1_greedy 40 $D --batch 1 --out "$R/b1_greedy.json"
for b in 1 8; do
  step b${b}_sampled 40 $D --batch $b $SAMPLED --out "$R/b${b}_sampled.json"
  step b${b}_pen 40 $D --batch $b $SAMPLED $PEN --out "$R/b${b}_pen.json"
  step b${b}_pen_wait 40 $D --batch $b $SAMPLED $PEN --no-async-scheduling --out "$R/b${b}_pen_wait.json"
done
for f in b1_greedy b1_sampled b1_pen b1_pen_wait b8_sampled b8_pen b8_pen_wait; do
  echo "== $f" >> "$S"; grep -A2 "step ms" "$R/$f.log" | tail -3 >> "$S"
  grep -i "error\|Traceback" "$R/$f.log" | head -3 >> "$S"; done
tar czf "$OUT/$ROUND.tgz" -C "$R" .
cat "$S"
