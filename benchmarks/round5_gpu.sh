#!/usr/bin/env bash
# Fifth GPU session, one device call (<= 10 min): the GPU tests of what was built since the last call, then
#   1. key-LR decode attention against plain decode over tile shapes (issue 16), the 33.7k trace q/v vs q/k/v/o
#      (keys materialised once per layer for prefill, the default now) with a decode profile
#   2. one-launch split-KV decode (LRAGENT_DECODE_MERGE=last_split) vs two launches, % of copy bandwidth (issue 17)
#   3. batch-1 decode step vs its floor: bf16 and fp8 through the Triton W8A16 kernel, both profiled (issue 17;
#      fp8 through _scaled_mm, LRAGENT_FP8_GEMM=torch, was measured in the call before: 7.38 ms vs 5.99 bf16)
#   4. cascade decode at engine level, 16 rows over one 32k shared prefix, with and without --cascade-decode
#   5. STAGE=1: the first half of the embedded model staged for scripts/gpu_agents.sh (carry .w/agents/smol.xz.part00)
# Everything lands in $OUT/round5.tgz (the device returns at most 8 files) and a summary in $OUT/summary.txt.
# Device call: OUT=$OUT STAGE=1 bash benchmarks/round5_gpu.sh
ROUND=round5 DEADLINE=${DEADLINE:-560}
source "$(dirname "$0")/gpu_call.sh"
if [[ ${STAGE:-0} == 1 && -f .w/agents/smol.xz.part00 ]]; then
  mkdir -p /root && cp .w/agents/smol.xz.part00 /root/ && echo "staged smol.xz.part00" | tee -a "$S"
fi
TESTS="tests/test_key_adapters.py tests/test_decode_one_launch.py tests/test_fp8_gemm.py tests/test_fp8.py"
[[ -f tests/test_cascade_graph.py ]] && TESTS+=" tests/test_cascade_graph.py tests/test_cascade.py tests/test_cuda_graphs.py"
step tests 90 python3 -m pytest $TESTS -q -n 6 -p no:cacheprovider -rfEs
tail -n 12 "$R/tests.log" >> "$S"
step klr_sweep 70 python3 benchmarks/key_lr_decode_sweep.py --ctx 33792 --batch 1
cat "$R/klr_sweep.log" >> "$S"
step merge 50 python3 -m lragent.bench.kernels --only none --merge-compare 0,32,64,128 --decode-batches 1,8 \
  --decode-contexts 8k,32k --json "$R/merge.json"
grep -A12 "^| batch" "$R/merge.log" | head -14 >> "$S"; tail -n 3 "$R/merge.log" >> "$S"
M="--model dummy:llama-3.1-8b --device cuda"
F="python3 -m lragent.bench.decode $M --floor --batch 1 --prompt-len 4096"
step floor_bf16 45 $F --profile --out "$R/floor_bf16.json"
step floor_fp8 45 $F --quantization fp8 --profile --out "$R/floor_fp8.json"
for f in floor_bf16 floor_fp8; do echo "$f: $(grep 'ms/step' "$R/$f.log" | tail -1)" >> "$S"; done
T="python3 -m lragent.bench.trace $M --no-plots --run-timeout 80 --ctx 8192 --systems base_lr_shared"
step trace_qv 70 $T --out "$R/trace_qv"
step trace_qkvo 90 $T --adapter-targets q_proj,k_proj,v_proj,o_proj --profile-decode 32768 --out "$R/trace_qkvo"
for f in trace_qv trace_qkvo; do grep -A1 "^system" "$R/$f.log" | sed -n 2p >> "$S"; grep "^decode profile" "$R/$f.log" | cut -c1-1500 >> "$S"; done
D="python3 -m lragent.bench.decode $M --no-hf --batch 16 --prompt-len 32768 --shared-prefix 32256 --new-tokens 64"
step shared_plain 50 $D --out "$R/shared_plain.json"
step shared_cascade 60 $D --cascade-decode --out "$R/shared_cascade.json"
for f in shared_plain shared_cascade; do echo "$f: $(grep -h '^DECODE' "$R/$f.log")" >> "$S"; done
tar czf "$OUT/round5.tgz" -C "$R" .
cat "$S"
