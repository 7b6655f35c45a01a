#!/usr/bin/env bash
# The main job: set up the environment, then run the quick reproductions on embedded
# default data (no downloads) and print their R_med tables:
#   1. Theorem 1 (two-layer linear network, Adam vs SGD+M, d = 16..256)  -> runs/theorem1/
#   2. Adam vs SGD+M on a small transformer classifier                    -> runs/demo/
# With arguments, runs one named reproduction instead (experiments/reproduce.py), e.g.
#   scripts/reproduce.sh table2b --preset quick      scripts/reproduce.sh list
set -euo pipefail
cd "$(dirname "$0")/.."
VPY=$(scripts/bootstrap.sh | tail -n 1)
if [ $# -gt 0 ]; then
  exec "$VPY" experiments/reproduce.py "$@"
fi
"$VPY" experiments/theorem1_linear.py --preset quick --out runs/theorem1
"$VPY" experiments/quick_demo.py --out runs/demo
