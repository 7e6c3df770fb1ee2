#!/usr/bin/env bash
# Reproduce the shipped role adapters: lragent/adapters/<task>-{independent,shared-a}/{plan,action,reflect}/.
#
#   scripts/train_adapters.sh [OUT_ROOT]        (default OUT_ROOT: lragent/adapters)
#
# Per task: an independent set (each role its own A and B on q_proj and v_proj), then a shared-A set (the paper's
# recipe: the independent plan adapter is reused as is, action and reflect are trained with its v_proj lora_A loaded
# and frozen), then a bit-equality check of the shared A, then greedy samples (HF + PEFT) on training prompts.
# Settings (environment): PY, MODEL, BASE_NAME, TASKS, DATA_DIR, DEVICE, STEPS, BATCH, MAX_LEN, LR, SEED, SAMPLE.
# Measured on one H200 (bf16 autocast, 2026-11-27): 30-44 s per role, about 5 minutes for a task's two sets including
# model load and tokenisation. CPU: a 2-core box managed ~40 s per step of 2 x 512 tokens, so the defaults (200 steps
# of 8 x 1024 per role) would take tens of hours there; for a CPU smoke run use e.g. STEPS=20 BATCH=2 MAX_LEN=512 SAMPLE=0.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-lragent/adapters}
if [[ -z "${PY:-}" ]]; then [[ -x .venv/bin/python ]] && PY=.venv/bin/python || PY=python3; fi
MODEL=${MODEL:-smollm2-135m-instruct}
BASE_NAME=${BASE_NAME:-HuggingFaceTB/SmolLM2-135M-Instruct}
TASKS=${TASKS:-hotpotqa scienceqa}
COMMON=(--model "$MODEL" --base-name "$BASE_NAME" --device "${DEVICE:-auto}" --max-steps "${STEPS:-200}"
        --batch-size "${BATCH:-8}" --max-seq-len "${MAX_LEN:-1024}" --lr "${LR:-5e-4}" --seed "${SEED:-42}"
        --rank 8 --alpha 16 --targets q_proj,v_proj --save-dtype float16)
[[ -n "${DATA_DIR:-}" ]] && COMMON+=(--data-dir "$DATA_DIR")

for task in $TASKS; do
    "$PY" -m lragent.train --task "$task" --mode independent --out "$OUT/$task-independent" "${COMMON[@]}"
    "$PY" -m lragent.train --task "$task" --mode shared-a --plan-from "$OUT/$task-independent/plan" \
        --out "$OUT/$task-shared-a" "${COMMON[@]}"
    "$PY" -m lragent.train check "$OUT/$task-shared-a" --module v_proj
    if [[ "${SAMPLE:-1}" == 1 ]]; then
        for kind in independent shared-a; do
            "$PY" -m lragent.train sample "$OUT/$task-$kind" --task "$task" --model "$MODEL" \
                ${DATA_DIR:+--data-dir "$DATA_DIR"} --json "$OUT/$task-$kind/samples.json"
        done
    fi
done
"$PY" -m lragent.train manifest "$OUT"
