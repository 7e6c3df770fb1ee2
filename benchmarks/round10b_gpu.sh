#!/usr/bin/env bash
# Tenth GPU session, second call (<= 10 min), issue 17 part 1: page-run prefill tiles through TMA descriptors
#   1. GPU tests: the kernel matrix (pages of 64 / 128 now take the TMA tiles) and the forced-TMA small cases
#   2. lragent bench kernels --only prefill at pages of 16 (pointer tiles), 64 and 128 (TMA tiles; 128 also with
#      LRAGENT_PREFILL_TMA=0, the pointer tiles on the same pages)
#   3. lragent bench trace, base_lr_shared, 1.9k and 33.7k, greedy, pages of 64 and 128 (TMA)
# Device call: OUT=$OUT bash benchmarks/round10b_gpu.sh
ROUND=round10b DEADLINE=${DEADLINE:-570}
source "$(dirname "$0")/gpu_call.sh"
step tests 170 python3 -m pytest tests/test_kernels.py -q -n 4 -p no:cacheprovider -rfEs -k "gpu_matrix or tma or prefill"
tail -n 6 "$R/tests.log" >> "$S"
K="python3 -m lragent.bench.kernels --only prefill --prefill-new 1024,8192 --prefill-prefixes 0,32768"
step kern16 60 $K --block-size 16 --json "$R/kern16.json"
step kern64 60 $K --block-size 64 --json "$R/kern64.json"
step kern128 60 $K --block-size 128 --json "$R/kern128.json"
LRAGENT_PREFILL_TMA=0 step kern128_ptr 60 $K --block-size 128 --json "$R/kern128_ptr.json"
for f in kern16 kern64 kern128 kern128_ptr; do echo "== $f" >> "$S"; grep "^prefill" "$R/$f.log" >> "$S"; done
T="python3 -m lragent.bench.trace --model dummy:llama-3.1-8b --device cuda --no-plots --run-timeout 100 \
  --ctx ${CTX:-256,8192} --systems base_lr_shared"
step trace64 100 $T --block-size 64 --out "$R/trace64"
step trace128 100 $T --block-size 128 --out "$R/trace128"
for f in trace64 trace128; do echo "== $f" >> "$S"; grep -A3 "^system" "$R/$f.log" | head -4 >> "$S";
  grep -i "error\|Traceback" "$R/$f.log" | head -5 >> "$S"; done
tar czf "$OUT/$ROUND.tgz" -C "$R" .
cat "$S"
