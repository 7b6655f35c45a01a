#!/usr/bin/env bash
# Wall time of each quick preset on this CPU, one after another, into a fresh folder
# (no resume). Appends one CSV row per experiment to experiments/results/preset_times.csv.
#   scripts/time_presets.sh [NAME...]      (default: every experiment in reproduce.py)
# THREADS=1 CORE=0 pins the runs to one core with one thread: a preset that finishes in
# time there finishes in time on the whole CPU, even while other work shares it.
set -uo pipefail
cd "$(dirname "$0")/.."
VPY=$(scripts/bootstrap.sh | tail -n 1)
NAMES=("$@")
if [ ${#NAMES[@]} -eq 0 ]; then
  mapfile -t NAMES < <("$VPY" experiments/reproduce.py list | awk '{print $1}' | grep -v figure1a)
fi
OUT=experiments/results/preset_times.csv
mkdir -p experiments/results runs/timing
[ -f "$OUT" ] || echo "experiment,preset,seconds,exit_code,threads,core,load_before,commit,date" > "$OUT"
PIN=(env)
[ -n "${THREADS:-}" ] && PIN+=(OMP_NUM_THREADS="$THREADS")
[ -n "${CORE:-}" ] && PIN+=(taskset -c "$CORE")
for name in "${NAMES[@]}"; do
  rm -rf "runs/timing/$name"
  bash scripts/get_data.sh >/dev/null 2>&1 || true
  load=$(cut -d' ' -f1 /proc/loadavg)
  start=$(date +%s.%N)
  "${PIN[@]}" "$VPY" experiments/reproduce.py "$name" --preset quick \
    --out "runs/timing/$name" > "runs/timing/$name.log" 2>&1
  rc=$?
  secs=$(echo "$(date +%s.%N) - $start" | bc)
  printf '%s,quick,%.0f,%d,%s,%s,%s,%s,%s\n' "$name" "$secs" "$rc" "${THREADS:-default}" "${CORE:-any}" \
    "$load" "$(git rev-parse --short HEAD)" "$(date -u +%FT%TZ)" | tee -a "$OUT"
done
