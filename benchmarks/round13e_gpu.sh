#!/usr/bin/env bash
# Thirteenth GPU session, fifth call: FlashInfer's ragged prefill on the gathered route (installed from .w/fi)
#   1. tests with flashinfer importable: the library against the exact reference, the engine's tokens with and
#      without it, the gathered route's kernel and engine tests; the three-engines budget test alone (call 4 ran it
#      beside 11 other GPU test processes)
#   2. lragent bench trace at 33.7k, base_lr_shared, with the library (auto) and without (triton)
# Device call (carry .w/fi): OUT=$OUT bash benchmarks/round13e_gpu.sh
ROUND=${ROUND:-round13e} DEADLINE=${DEADLINE:-400}
source "$(dirname "$0")/gpu_call.sh"
pip install -q --no-deps --no-build-isolation --target /tmp/fi_site .w/fi/ninja-*.whl \
  .w/fi/flashinfer_python-0.2.5.tar.gz > "$R/fi_install.log" 2>&1
export PATH=/tmp/fi_site/bin:$PATH PYTHONPATH=$PYTHONPATH:/tmp/fi_site MAX_JOBS=16
step fi_tests 200 python3 -m pytest tests/test_flashinfer_prefill.py tests/test_value_lr_prefill.py \
  tests/test_key_adapters.py -k "flashinfer or library or gathered or value_lr" -q -n 4 -p no:cacheprovider -rfEs
tail -n 6 "$R/fi_tests.log" >> "$S"
step budget 60 python3 -m pytest tests/test_engine_release.py -q -p no:cacheprovider -rfEs -k three_engines
tail -n 3 "$R/budget.log" >> "$S"
T="python3 -m lragent.bench.trace --model dummy:llama-3.1-8b --device cuda --no-plots --run-timeout 100 \
  --ctx 256,8192 --systems base_lr_shared"
step trace_fi 60 $T --out "$R/trace_fi"
step trace_triton 50 env LRAGENT_PREFILL_LIBRARY=triton $T --out "$R/trace_triton"
for f in trace_fi trace_triton; do echo "== $f" >> "$S"; grep -A3 "^system" "$R/$f.log" | head -4 >> "$S";
  grep -i "error\|Traceback" "$R/$f.log" | head -5 >> "$S"; done
tar czf "$OUT/$ROUND.tgz" -C "$R" .
cat "$S"
