set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$(pwd)
T="python3 -m lragent.bench.trace --model dummy:llama-3.1-8b --device cuda --no-plots --run-timeout 100"
s=$SECONDS
timeout 70 python3 -m pytest tests/test_sampler_fast.py -q -n 4 -p no:cacheprovider -rfEs 2>&1 | tail -4
echo "[tests $((SECONDS-s)) s]"
timeout 80 $T --ctx 8192 --systems base_lr_shared --temperature 0.9 --top-p 0.75 --top-k 40 --out $OUT/t33_sampled 2>&1 | grep -A2 "^system" | head -3
echo "[sampled $((SECONDS-s)) s]"
timeout $((250 - (SECONDS-s))) $T --ctx 8192 --systems droidspeak --out $OUT/t33_droidspeak 2>&1 | grep -v "^\s*$" | grep -A2 "^system\|Error" | head -6
echo "[done $((SECONDS-s)) s]"
