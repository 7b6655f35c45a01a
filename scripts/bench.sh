#!/usr/bin/env bash
# Benchmarks: set up the environment plus the tools compared against, then run
# the sampled-diagonal benchmark on both models. Arguments go to the driver
# (e.g. --preset paper on a big machine).
set -euo pipefail
cd "$(dirname "$0")/.."
VPY=$(scripts/bootstrap.sh | tail -n 1)
"$VPY" -m pip install -q --no-deps -r requirements/bench.txt >&2
for model in encoder seq2seq; do
  "$VPY" benchmarks/sampled_diag.py --model "$model" "$@"
done
