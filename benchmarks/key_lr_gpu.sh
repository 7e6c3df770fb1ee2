#!/usr/bin/env bash
# Key adapters under base_lr_shared on the GPU: the paper trace at 33.7k with random q/k/v/o adapters (shared k_proj
# and v_proj A), the prefill's keys rebuilt on chip per key tile (default) vs materialised once per reader
# (LRAGENT_KEY_LR_PREFILL=materialize), beside the q/v-only figure; then the key-adapter kernel tests on the GPU.
# Device call: OUT=$OUT bash benchmarks/key_lr_gpu.sh   (about 4 minutes)
set -u
OUT=${OUT:-results/key_lr_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$(pwd):${PYTHONPATH:-}
T="python3 -m lragent.bench.trace --model dummy:llama-3.1-8b --device cuda --no-plots --run-timeout 90 --ctx 8192"
$T --systems base_lr_shared --out "$OUT/qv" 2>&1 | grep -A1 "^system" | head -2
for mode in on_chip materialize; do
  LRAGENT_KEY_LR_PREFILL=$mode $T --systems base_lr_shared --adapter-targets q_proj,k_proj,v_proj,o_proj \
    --out "$OUT/qkvo_$mode" 2>&1 | grep -A1 "^system" | sed -n 2p | sed "s/^/$mode: /"
done
timeout 120 python3 -m pytest tests/test_key_adapters.py -q -p no:cacheprovider -rfEs 2>&1 | tail -3
