#!/usr/bin/env bash
# Tenth GPU session, third call: which TMA prefill cases are wrong (one process per case), and LR rows through TMA
#   1. benchmarks/tma_check.py: TMA / pointer tiles against the float64 reference, dtypes x ranks x pages
#   2. lragent bench kernels --only prefill at pages of 64 / 128, LR rows through TMA (auto) and not (kv); the LR
#      rows through TMA read wrong values (check.log) and were removed after this call
# Device call: OUT=$OUT bash benchmarks/round10c_gpu.sh
ROUND=round10c DEADLINE=${DEADLINE:-570}
source "$(dirname "$0")/gpu_call.sh"
step check 200 python3 benchmarks/tma_check.py --jobs 8
cat "$R/check.log" >> "$S"
K="python3 -m lragent.bench.kernels --only prefill --prefill-new 1024,8192 --prefill-prefixes 0,32768"
step kern64 60 $K --block-size 64 --json "$R/kern64.json"
step kern128 60 $K --block-size 128 --json "$R/kern128.json"
LRAGENT_PREFILL_TMA=kv step kern64_kv 60 $K --block-size 64 --json "$R/kern64_kv.json"
for f in kern64 kern128 kern64_kv; do echo "== $f" >> "$S"; grep "^prefill" "$R/$f.log" >> "$S"; done
tar czf "$OUT/$ROUND.tgz" -C "$R" .
cat "$S"
