#!/usr/bin/env bash
# Issue 3 on the GPU machine (the `device` tool): the ScienceQA adapter sets, then the agent pipeline's accuracy per
# sharing scheme in float32 (comparable with the CPU path), many questions batched through one engine per scheme.
#
#   scripts/gpu_issue3.sh prepare         HERE, once: .w/issue3/bundle.tgz (~2 MB: tokenizer, ScienceQA trajectories,
#                                         HotpotQA/ScienceQA question files, gguf + rank-bm25 wheels)
#   scripts/gpu_issue3.sh stage           call 1, carry .w/train/smol.part00: the first GGUF half to $GGUF_DIR (/root)
#   scripts/gpu_issue3.sh train           call 2, carry .w/train/smol.part01 .w/issue3: model assembled + converted,
#                                         ScienceQA independent + shared-A sets trained (adapters_scienceqa.tgz), then
#                                         eval-scienceqa in the time left
#   scripts/gpu_issue3.sh eval-hotpotqa   carry .w/issue3 (warm machine): hotpotqa_easy + hotpotqa_medium (200 questions
#                                         in flight): shared-A x all four schemes, independent x {non_shared,
#                                         base_lr_shared forced}; one process per run, all at once on the GPU
#   scripts/gpu_issue3.sh eval-scienceqa  carry .w/issue3 (warm machine, adapters from `train`): both grade files,
#                                         the same six runs with the ScienceQA sets
#   scripts/gpu_issue3.sh eval            eval-hotpotqa then eval-scienceqa, sharing one budget
#
# Any eval mode also assembles and converts the model itself when the call carries .w/train/smol.part01 and
# $GGUF_DIR/smol.part00 is there (so `stage` + `eval-hotpotqa` works without `train`).
# Every eval run is bounded: each process gets `--time-budget` up to the call's deadline (BUDGET seconds after the
# script starts, minus the merge), questions still in flight then are halted and reported as time-limited ("cut %");
# a process that overstays is killed. Results are merged and written to $OUT after each group:
#   train.log, adapters_scienceqa.tgz, eval_<group>.json.gz (summaries + every question with its trajectory),
#   eval_<group>.png, eval_<group>.log (progress of every run, GPU memory/utilisation samples, the table).
#
# Settings (environment): BUDGET (s, default 570: the whole call), LIMIT (questions per file; all), WORKERS (256),
# MAX_ITERS (45), GREEDY (1), SEED (42), DTYPE (float32), DEVICE (cuda), PAR (processes at once, 6), KV (KV cache per
# process, e.g. 8G; default: 85% of the free GPU memory / PAR - 3 GiB), EXTRA (more `lragent eval` arguments),
# SCHEMES (shared-A schemes, default all four), MODEL (default $GGUF_DIR/smol.gguf when it exists), PY (python3),
# W (work dir, /root/issue3), GGUF_DIR (/root), OUT (set by the device tool; default results/gpu_issue3), and the
# training ones of scripts/train_adapters.sh (STEPS, BATCH, MAX_LEN, SAMPLE=0 here).
# Local CPU smoke run: W=/tmp/i3 OUT=/tmp/i3/out GGUF_DIR=/tmp/i3 MODEL=smollm2-135m-instruct DEVICE=cpu KV=512M \
#   LIMIT=2 PAR=2 MAX_ITERS=3 PY=.venv/bin/python OMP_NUM_THREADS=1 scripts/gpu_issue3.sh eval-hotpotqa
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MODE=${1:-}
BUDGET=${BUDGET:-570}
W=${W:-/root/issue3}
GGUF_DIR=${GGUF_DIR:-/root}
OUT=${OUT:-$ROOT/results/gpu_issue3}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-float32}
PAR=${PAR:-6}
WORKERS=${WORKERS:-256}
MAX_ITERS=${MAX_ITERS:-45}
SEED=${SEED:-42}
SCHEMES=${SCHEMES:-non_shared full_shared base_shared base_lr_shared}
BUNDLE=.w/issue3/bundle.tgz
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"

say() { echo "[gpu_issue3 ${SECONDS}s] $*"; }
die() { say "ERROR: $*"; exit "${2:-1}"; }

prepare() {  # here, not on the device
    local b; b=$(mktemp -d)
    mkdir -p "$b/tok" "$b/data" "$b/questions" "$b/whl" .w/issue3
    local tok=.w/train/tok
    [[ -f $tok/tokenizer.json ]] || tok=${LRAGENT_CACHE_DIR:-$HOME/.cache/lragent}/smollm2-135m-instruct
    cp "$tok"/tokenizer.json "$tok"/tokenizer_config.json "$b/tok/" || die "no tokenizer in $tok (run make setup)"
    cp "$tok"/chat_template.jinja "$b/tok/" 2>/dev/null
    local shared=${SHARED_DATA:-$ROOT/../shared/data}
    cp "$shared"/trajectories/scienceqa_{plan,action,reflect}.json "$b/data/" || die "no trajectories under $shared"
    cp "$shared"/hotpotqa/*.jsonl "$shared"/scienceqa/*.jsonl "$b/questions/" || die "no question files under $shared"
    if ls .w/train/whl/gguf-*.whl >/dev/null 2>&1; then cp .w/train/whl/gguf-*.whl "$b/whl/"
    else python3 -m pip download -q --no-deps --only-binary=:all: -d "$b/whl" gguf==0.19.0 || die "gguf wheel"; fi
    python3 -m pip download -q --no-deps --only-binary=:all: -d "$b/whl" rank-bm25==0.2.2 || die "rank-bm25 wheel"
    tar czf "$BUNDLE" -C "$b" . && rm -rf "$b"
    say "wrote $BUNDLE ($(du -h "$BUNDLE" | cut -f1)): $(tar tzf "$BUNDLE" | grep -v '/$' | tr '\n' ' ')"
}

setup() {  # unpack the bundle (when carried) and make its wheels importable
    mkdir -p "$W"
    if [[ -f $BUNDLE ]]; then tar xzf "$BUNDLE" -C "$W" || die "bad $BUNDLE"; fi
    [[ -d $W/whl ]] || die "no $W/whl: carry .w/issue3 (made here by: scripts/gpu_issue3.sh prepare)"
    if ! PYTHONPATH=$W/site "$PY" -c "import gguf, rank_bm25" 2>/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$W/site" "$W"/whl/*.whl || die "pip" 4
    fi
    export PYTHONPATH=$W/site${PYTHONPATH:+:$PYTHONPATH}
}

ensure_model() {  # the converted model in the lragent cache (from the two GGUF halves), its tokenizer replaced
    if [[ -z ${MODEL:-} ]]; then
        if [[ ! -f $GGUF_DIR/smol.gguf && -f .w/train/smol.part01 ]]; then
            [[ -f $GGUF_DIR/smol.part00 ]] || die "no $GGUF_DIR/smol.part00: the machine went cold; run 'stage' first" 3
            cat "$GGUF_DIR/smol.part00" .w/train/smol.part01 > "$GGUF_DIR/smol.gguf.tmp" && \
                mv "$GGUF_DIR/smol.gguf.tmp" "$GGUF_DIR/smol.gguf" || die "cat" 3
        fi
        [[ -f $GGUF_DIR/smol.gguf ]] || die "no $GGUF_DIR/smol.gguf: the machine went cold; run 'stage' then 'train' (or an eval mode carrying .w/train/smol.part01)" 3
        MODEL=$GGUF_DIR/smol.gguf
    fi
    local dir
    dir=$("$PY" -c "from lragent.models.hub import resolve_model; print(resolve_model('$MODEL'))" 2>&1 | tail -1)
    [[ -f $dir/config.json ]] || die "model conversion failed: $dir" 5
    if [[ $MODEL == *.gguf && -f $W/tok/tokenizer.json ]]; then cp "$W"/tok/* "$dir/"; fi  # the CPU box's tokenizer
    say "model $MODEL -> $dir"
    export MODEL
}

train() {
    say "training the ScienceQA sets into $W/ad"
    PY=$PY MODEL=$MODEL DATA_DIR=$W/data SAMPLE=${SAMPLE:-0} TASKS=scienceqa DEVICE=${TRAIN_DEVICE:-auto} \
        scripts/train_adapters.sh "$W/ad" 2>&1 | tr '\r' '\n' | awk '/100%\|/ || !/it\/s/' | tee -a "$OUT/train.log"
    local rc=${PIPESTATUS[0]}
    tar czf "$OUT/adapters_scienceqa.tgz" -C "$W/ad" . 2>/dev/null
    say "training rc $rc; wrote $OUT/adapters_scienceqa.tgz ($(du -h "$OUT/adapters_scienceqa.tgz" | cut -f1))" \
        | tee -a "$OUT/train.log"
    return "$rc"
}

kv_default() {  # KV cache bytes per process
    if [[ -n ${KV:-} ]]; then echo "$KV"; return; fi
    "$PY" -c "
import torch
if not torch.cuda.is_available(): print('1G'); raise SystemExit
free, _ = torch.cuda.mem_get_info(); print(max(1 << 30, int(0.85 * free / $PAR - 3 * 2**30)))"
}

find_set() {  # first folder holding plan/action/reflect named $1 under $W/ad or lragent/adapters
    local d
    for d in "$W/ad/$1" "lragent/adapters/$1"; do
        [[ -d $d/plan && -d $d/action && -d $d/reflect ]] && { echo "$d"; return 0; }
    done
    return 1
}

# eval_group NAME DEADLINE_S "files..." "job..."   (job = SETDIR:SCHEME[:force])
eval_group() {
    local name=$1 deadline=$2 files=$3 jobs=$4
    local dir=$W/eval_$name log=$OUT/eval_$name.log kv job
    rm -rf "$dir"; mkdir -p "$dir"
    kv=$(kv_default)
    say "eval $name: deadline ${deadline}s, KV $kv per process, $PAR at once, workers $WORKERS, max iterations $MAX_ITERS" \
        | tee -a "$log"
    local smi_pid=""
    if command -v nvidia-smi >/dev/null && [[ $DEVICE == cuda* ]]; then
        nvidia-smi --query-gpu=timestamp,memory.used,memory.total,utilization.gpu --format=csv,noheader -l 15 \
            > "$dir/smi.csv" 2>/dev/null &
        smi_pid=$!
    fi
    local pids=() tags=() base=0 setdir scheme force
    [[ -n $smi_pid ]] && base=1
    for job in $jobs; do
        IFS=: read -r setdir scheme force <<< "$job"
        while (( $(jobs -rp | wc -l) - base >= PAR )); do sleep 2; done
        local left=$(( deadline - SECONDS ))
        if (( left < 60 )); then say "skip $setdir $scheme: ${left}s left" | tee -a "$log"; continue; fi
        local tag; tag=$(basename "$setdir")_$scheme
        local args=("$ROOT/$setdir" --sharing "$scheme")
        [[ $setdir == /* ]] && args=("$setdir" --sharing "$scheme")
        [[ -n $force ]] && args+=(--force)
        [[ ${GREEDY:-1} == 1 ]] && args+=(--greedy)
        # the process's own budget ends 45 s before the kill: imports come first, a round may overrun, the report
        (
            COLUMNS=200 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} timeout -k 5 "$left" "$PY" -m lragent.eval.cli $files \
                --adapters "${args[@]}" --model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" --kv-cache-bytes "$kv" \
                --workers "$WORKERS" --max-iterations "$MAX_ITERS" --seed "$SEED" --together --save-trajectories \
                --time-budget $(( left - 45 )) ${LIMIT:+--limit "$LIMIT"} ${EXTRA:-} --out "$dir/$tag" 2>&1
            echo "exit $?"
        ) | sed -u "s/^/[$tag] /" >> "$log" &
        pids+=($!)
        tags+=("$tag")
        say "started $tag (budget $(( left - 45 ))s)" | tee -a "$log"
    done
    wait "${pids[@]}" 2>/dev/null
    [[ -n $smi_pid ]] && kill "$smi_pid" 2>/dev/null
    local results=() tag
    for tag in "${tags[@]}"; do [[ -f $dir/$tag/eval.json ]] && results+=("$dir/$tag/eval.json"); done
    if (( ${#results[@]} == 0 )); then say "eval $name: no results" | tee -a "$log"; return 1; fi
    COLUMNS=200 "$PY" -m lragent.eval.cli --merge "${results[@]}" --out "$dir/merged" 2>&1 | grep -v '^wrote' >> "$log"
    gzip -c "$dir/merged/eval.json" > "$OUT/eval_$name.json.gz"
    cp "$dir/merged/eval.png" "$OUT/eval_$name.png" 2>/dev/null
    if [[ -s $dir/smi.csv ]]; then
        { echo "GPU samples (timestamp, memory used, total, utilisation):"; cat "$dir/smi.csv"; } >> "$log"
    fi
    say "eval $name done: $OUT/eval_$name.{json.gz,png,log}" | tee -a "$log"
    grep -h " acc [0-9].* wall" "$log" | sed 's/^/  /'
}

eval_hotpotqa() {
    local deadline=$1 jobs="" s q=$W/questions
    local shared; shared=$(find_set hotpotqa-shared-a) || die "no hotpotqa-shared-a adapters"
    local indep; indep=$(find_set hotpotqa-independent) || die "no hotpotqa-independent adapters"
    for s in $SCHEMES; do jobs+="$shared:$s "; done
    jobs+="$indep:non_shared $indep:base_lr_shared:force"
    eval_group hotpotqa "$deadline" "$q/hotpotqa_easy.jsonl $q/hotpotqa_medium.jsonl" "$jobs"
}

eval_scienceqa() {
    local deadline=$1 jobs="" s q=$W/questions
    local shared indep
    if ! shared=$(find_set scienceqa-shared-a) || ! indep=$(find_set scienceqa-independent); then
        say "no ScienceQA adapter sets under $W/ad or lragent/adapters: run 'train' first (same warm machine)"
        return 1
    fi
    for s in $SCHEMES; do jobs+="$shared:$s "; done
    jobs+="$indep:non_shared $indep:base_lr_shared:force"
    eval_group scienceqa "$deadline" "$q/scienceqa_grade1-4.jsonl $q/scienceqa_grade5-8.jsonl" "$jobs"
}

MERGE_S=25  # merge + gzip + copy at the end of a group
case $MODE in
    prepare)
        prepare ;;
    stage)
        [[ -f .w/train/smol.part00 ]] || die "carry .w/train/smol.part00"
        mkdir -p "$GGUF_DIR" && cp .w/train/smol.part00 "$GGUF_DIR/" || die "copy"
        say "staged $(ls -la "$GGUF_DIR/smol.part00")" ;;
    train)
        setup; ensure_model
        train || say "training failed (see train.log)"
        if (( BUDGET - SECONDS > 150 )); then eval_scienceqa $(( BUDGET - MERGE_S ))
        else say "no time left for eval-scienceqa ($(( BUDGET - SECONDS ))s)"; fi ;;
    eval-hotpotqa)
        setup; ensure_model; eval_hotpotqa $(( BUDGET - MERGE_S )) ;;
    eval-scienceqa)
        setup; ensure_model; eval_scienceqa $(( BUDGET - MERGE_S )) ;;
    eval)
        setup; ensure_model
        eval_hotpotqa $(( SECONDS + (BUDGET - SECONDS) * 65 / 100 - MERGE_S ))
        eval_scienceqa $(( BUDGET - MERGE_S )) ;;
    *)
        sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 2 ;;
esac
say "done ($SECONDS s); \$OUT: $(ls "$OUT" | tr '\n' ' ')"
