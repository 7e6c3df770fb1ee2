# Sourced by the benchmarks/round*_gpu.sh scripts (one device call each): ROUND names the call; sets OUT, R (the
# logs' folder), S (the summary) and `step`, which bounds each command by its own limit and the call's DEADLINE.
set -u
OUT=${OUT:-results/$ROUND}
R=/tmp/$ROUND
mkdir -p "$OUT" "$R"
export PYTHONUNBUFFERED=1 PYTHONPATH=$(pwd):${PYTHONPATH:-}
S=$OUT/summary.txt
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$S"
step() {  # step LABEL SECONDS CMD...: bounded by SECONDS and the call's deadline; output to $R/LABEL.log
  local label=$1 limit=$2; shift 2
  local left=$(( DEADLINE - SECONDS )); (( limit > left )) && limit=$left
  if (( limit < 15 )); then echo "[$SECONDS s] skip $label" | tee -a "$S"; return; fi
  timeout -k 5 "$limit" "$@" > "$R/$label.log" 2>&1
  echo "[$SECONDS s] $label rc=$?" | tee -a "$S"
}
