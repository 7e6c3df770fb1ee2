#!/usr/bin/env bash
# Reproduce the shipped role adapters: lragent/adapters/<task>-{independent,shared-a}/{plan,action,reflect}/.
#
#   scripts/train_adapters.sh [OUT_ROOT]        (default OUT_ROOT: lragent/adapters)
#
# Per task: an independent set (each role its own A and B on q_proj and v_proj), then a shared-A set (the paper's
# recipe: the independent plan adapter is reused as is, action and reflect are trained with its v_proj lora_A loaded
# and frozen), then a bit-equality check of the shared A, then greedy samples (HF + PEFT) on training prompts.
# Settings (environment): PY, MODEL, BASE_NAME, TASKS, DATA_DIR, DEVICE, STEPS, BATCH, MAX_LEN, LR, SEED, SAMPLE,
# HELDOUT, EVAL_EVERY, PATIENCE, MAX_TIME, PARALLEL (1: one process per role, side by side; see below),
# OPTION_PERMS (--option-permutations K: option-permuted copies of each ScienceQA training example; default 3 for
# scienceqa, set by the trainer; 0 turns it off).
# Shipped sets and how they were trained (per-step losses, machine and versions in each set's train_log.json):
# - hotpotqa-{independent,shared-a}: the then defaults (200 steps of 8 x 1024 tokens per role, lr 5e-4, bf16) on one
#   H200, 2026-11-27: 30-44 s per role, about 5 minutes for the task's two sets including model load and tokenisation.
# - scienceqa-{independent,shared-a}: on the 2-core CPU box (float32, OMP_NUM_THREADS=2, shared with other jobs),
#   2026-11-28, with
#       OMP_NUM_THREADS=2 TASKS=scienceqa DEVICE=cpu STEPS=45 BATCH=4 MAX_LEN=576 scripts/train_adapters.sh
#   ~9-10 s per step, 380-450 s per role; the whole run (both sets, shared-A check, samples, manifest) took 35 min
#   (2109 s). Loss, mean of the first -> last 10 steps: plan 3.93 -> 1.78, action 4.01 -> 1.90, reflect 2.02 -> 1.11
#   (independent); action 3.61 -> 1.84, reflect 1.86 -> 1.09 (shared-A); no step skipped. With MAX_LEN 576 every
#   truncated ScienceQA example keeps its prompt's head (system prompt + question, up to 443 tokens); 512 would not.
#   These sets are short CPU runs (180 examples seen per role) and weaker than 200-step GPU training.
#   A first GPU attempt at the defaults (H200, bf16) went to NaN (plan at step 90, action at 55; shared-A inherited
#   plan's NaN A). Most likely cause: left padding gave fully masked attention rows, which fused CUDA SDPA kernels can
#   turn into NaN that leaks into real tokens (torch's CPU SDPA returns 0 there: the same batches are finite on CPU).
#   The trainer now masks padding so that no row is empty, skips (and logs) steps with a non-finite loss or gradient,
#   and refuses to save non-finite weights (lragent/train/batching.py, loop.py, recipes.py).
# CPU speed: the defaults would take many hours on 2 cores; for a smoke run use e.g.
# STEPS=20 BATCH=2 MAX_LEN=512 EVAL_EVERY=10 SAMPLE=0.
#
# Held-out split and early stopping (since 2026-12): HELDOUT (default 0.1) of the questions, chosen by a hash of the
# question text and the seed, are never trained on (all their examples, every role; the shared-A run holds out the
# same questions as the independent one). Every EVAL_EVERY steps the mean output-token loss on them is logged
# (train_log.json: eval_steps, eval_losses; dashed in loss_curve.png); the best measured checkpoint is the one saved,
# and training stops after PATIENCE measurements without improvement. The defaults are for one GPU (one H200, bf16):
# up to STEPS=1000 steps of BATCH=8 x MAX_LEN=2048 tokens per role (2048 keeps 90% of the reflect prompts whole;
# 1024 truncated 53% of them and 576, the CPU setting of the shipped ScienceQA sets, 93%), lr 5e-4.
#
#   scripts/train_adapters.sh                                  # all four sets on the first GPU
#   CUDA_VISIBLE_DEVICES=0 TASKS=scienceqa scripts/train_adapters.sh /tmp/adapters   # one task, elsewhere
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-lragent/adapters}
if [[ -z "${PY:-}" ]]; then [[ -x .venv/bin/python ]] && PY=.venv/bin/python || PY=python3; fi
MODEL=${MODEL:-smollm2-135m-instruct}
BASE_NAME=${BASE_NAME:-HuggingFaceTB/SmolLM2-135M-Instruct}
TASKS=${TASKS:-hotpotqa scienceqa}
COMMON=(--model "$MODEL" --base-name "$BASE_NAME" --device "${DEVICE:-auto}" --max-steps "${STEPS:-1000}"
        --batch-size "${BATCH:-8}" --max-seq-len "${MAX_LEN:-2048}" --lr "${LR:-5e-4}" --seed "${SEED:-42}"
        --rank 8 --alpha 16 --targets q_proj,v_proj --save-dtype float16
        --heldout-fraction "${HELDOUT:-0.1}" --eval-every "${EVAL_EVERY:-25}" --patience "${PATIENCE:-4}")
[[ -n "${DATA_DIR:-}" ]] && COMMON+=(--data-dir "$DATA_DIR")
[[ -n "${OPTION_PERMS:-}" ]] && COMMON+=(--option-permutations "$OPTION_PERMS")
[[ -n "${MAX_TIME:-}" ]] && COMMON+=(--max-time "$MAX_TIME")  # seconds per role run (a GPU call of fixed length)

train() { "$PY" -m lragent.train "$@" "${COMMON[@]}"; }

# PARALLEL=1: one process per role, side by side on the one GPU (a 135M model leaves most of an H200 idle): first
# every task's independent roles, then every task's shared-A action and reflect. Each role's output goes to
# $OUT/logs/<set>-<role>.log; the set's train_log.json gathers the roles (lragent/train/report.py write_log).
side_by_side() {  # side_by_side MODE ROLES...: one background run per task x role, then wait for all
    local mode=$1; shift
    local pids=() task role name extra
    mkdir -p "$OUT/logs"
    for task in $TASKS; do
        name=$task-$mode; extra=()
        [[ $mode == shared-a ]] && extra=(--plan-from "$OUT/$task-independent/plan")
        for role in "$@"; do
            train --task "$task" --mode "$mode" --roles "$role" --out "$OUT/$name" "${extra[@]}" \
                >"$OUT/logs/$name-$role.log" 2>&1 &
            pids+=($!)
        done
    done
    local failed=0
    for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
    tail -n 3 "$OUT"/logs/*-"$mode"-*.log
    return $failed
}

if [[ "${PARALLEL:-0}" == 1 ]]; then
    side_by_side independent plan action reflect
    side_by_side shared-a action reflect
else
    for task in $TASKS; do
        train --task "$task" --mode independent --out "$OUT/$task-independent"
        train --task "$task" --mode shared-a --plan-from "$OUT/$task-independent/plan" --out "$OUT/$task-shared-a"
    done
fi
for task in $TASKS; do
    "$PY" -m lragent.train check "$OUT/$task-shared-a" --module v_proj
    if [[ "${SAMPLE:-1}" == 1 ]]; then
        for kind in independent shared-a; do
            "$PY" -m lragent.train sample "$OUT/$task-$kind" --task "$task" --model "$MODEL" \
                ${DATA_DIR:+--data-dir "$DATA_DIR"} --json "$OUT/$task-$kind/samples.json"
        done
    fi
done
"$PY" -m lragent.train manifest "$OUT"
