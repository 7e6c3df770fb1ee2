#!/usr/bin/env bash
# Issue 6's GPU load test in one device call: scripts/load_test.py against dummy Llama-3.1-8B (bf16, CUDA) for
# base_lr_shared, then non_shared, each scheme under a hard time bound, the whole script under TOTAL_S seconds.
#
# GPU machine (from the repo root; the wheels in .whl/ are carried, see the device README's recipe):
#     bash scripts/gpu_load_test.sh                      # writes to $OUT (default results/gpu_load)
# Local CPU smoke test (the venv already has the server's packages, so no wheels):
#     INSTALL_WHEELS=0 PY=.venv/bin/python MODEL=dummy:smollm2-135m DEVICE=cpu DTYPE=float32 KV_CACHE_BYTES=64M \
#       AGENTS=2 ROUNDS=1 CONTEXT_WORDS=40 OBS_WORDS=10 GEN_TOKENS=4 bash scripts/gpu_load_test.sh
#
# Writes to $OUT: env.txt (GPU, versions, wheel install), <scheme>.log (load test + server stderr),
# load_test_gpu_<scheme>.json (every round; rewritten after each round), summary.txt (one LOADTEST line and rc per
# scheme). Exit status: 0 when every scheme ran and passed (0 errors, nothing left running).
set -u
cd "$(dirname "$0")/.."

OUT=${OUT:-results/gpu_load}
PY=${PY:-python3}
INSTALL_WHEELS=${INSTALL_WHEELS:-1}
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/site}
MODEL=${MODEL:-dummy:llama-3.1-8b}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
KV_CACHE_BYTES=${KV_CACHE_BYTES:-16G}      # 'auto': GPU_MEM_UTIL of the card (warm-up then fills all of it: slow)
GPU_MEM_UTIL=${GPU_MEM_UTIL:-}
MAX_MODEL_LEN=${MAX_MODEL_LEN:-8192}
SCHEMES=${SCHEMES:-base_lr_shared non_shared}
AGENTS=${AGENTS:-16}                       # concurrent trajectories (x3 roles: plan, action, reflect)
ROUNDS=${ROUNDS:-3}
ITERATIONS=${ITERATIONS:-2}                # plan/action pairs, then reflect: 5 requests per trajectory
CONTEXT_WORDS=${CONTEXT_WORDS:-1500}       # token-id prompts: ~CONTEXT_WORDS+40 tokens of context
OBS_WORDS=${OBS_WORDS:-200}
GEN_TOKENS=${GEN_TOKENS:-16}
MAX_SECONDS=${MAX_SECONDS:-80}             # load_test: no new request after this (warm-up included, start-up not)
STARTUP_TIMEOUT=${STARTUP_TIMEOUT:-150}    # server start: weights, KV pool, Triton JIT
SCHEME_TIMEOUT=${SCHEME_TIMEOUT:-170}      # hard bound per scheme (SIGTERM, SIGKILL 25 s later)
TOTAL_S=${TOTAL_S:-330}                    # hard bound for all schemes together
SERVER_ARGS=${SERVER_ARGS:-}               # extra server flags, e.g. "--enforce-eager"

start=$(date +%s)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{
    echo "date: $(date -u +%FT%TZ)  host: $(hostname)  git: $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo '+dirty')"
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv 2>&1 || echo "no nvidia-smi"
} >"$OUT/env.txt"

if [ "$INSTALL_WHEELS" = 1 ]; then
    if ! $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
        >>"$OUT/env.txt" 2>&1; then
        echo "wheel install failed (is $WHEELS carried?)" | tee -a "$OUT/env.txt"
        exit 2
    fi
    export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! $PY - >>"$OUT/env.txt" 2>&1 <<'EOF'
import importlib, platform
import torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
for name in ("triton", "transformers", "fastapi", "starlette", "uvicorn", "pydantic", "openai", "prometheus_client"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", getattr(module, "VERSION", "?")), module.__file__)
    except ImportError as exc:
        print(name, "MISSING", exc)
import lragent.server.app, openai  # noqa: E401  the server's and the client's imports
print("imports ok")
EOF
then
    cat "$OUT/env.txt"
    echo "import check failed"
    exit 2
fi
cat "$OUT/env.txt"
echo "setup: $(($(date +%s) - start)) s"

kv_args=(--kv-cache-bytes "$KV_CACHE_BYTES")
[ -n "$GPU_MEM_UTIL" ] && kv_args+=(--gpu-memory-utilization "$GPU_MEM_UTIL")
server_args=()
for a in $SERVER_ARGS; do server_args+=("--server-arg=$a"); done

status=0
: >"$OUT/summary.txt"
for scheme in $SCHEMES; do
    left=$((start + TOTAL_S - $(date +%s)))
    if [ "$left" -lt 60 ]; then
        echo "$scheme: skipped, ${left} s left of TOTAL_S=$TOTAL_S" | tee -a "$OUT/summary.txt"
        status=1
        continue
    fi
    bound=$((left < SCHEME_TIMEOUT ? left : SCHEME_TIMEOUT))
    t0=$(date +%s)
    echo "== $scheme (bound ${bound} s)"
    timeout -k 25 "$bound" $PY scripts/load_test.py --model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" \
        --sharing "$scheme" "${kv_args[@]}" --max-model-len "$MAX_MODEL_LEN" "${server_args[@]}" \
        --agents "$AGENTS" --rounds "$ROUNDS" --iterations "$ITERATIONS" --context-words "$CONTEXT_WORDS" \
        --observation-words "$OBS_WORDS" --gen-tokens "$GEN_TOKENS" --api tokens \
        --max-seconds "$MAX_SECONDS" --startup-timeout "$STARTUP_TIMEOUT" --request-timeout 120 \
        --json "$OUT/load_test_gpu_$scheme.json" 2>&1 | tee "$OUT/$scheme.log"
    rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] || status=1
    line=$(grep '^LOADTEST' "$OUT/$scheme.log" | tail -1)
    echo "$scheme: rc=$rc in $(($(date +%s) - t0)) s${line:+ $line}" | tee -a "$OUT/summary.txt"
    [ "$rc" = 124 ] && echo "$scheme: stopped at its ${bound} s bound (rounds finished so far are in the JSON)"
done
echo "total: $(($(date +%s) - start)) s" | tee -a "$OUT/summary.txt"
exit $status
