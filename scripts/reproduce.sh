#!/usr/bin/env bash
# The main job: set up the environment, then run the quick reproductions on embedded
# default data (no downloads) and print their R_med tables:
#   1. Theorem 1 (two-layer linear network, Adam vs SGD+M, d = 16..256)  -> runs/theorem1/
#   2. Adam vs SGD+M on a small transformer classifier                    -> runs/demo/
set -euo pipefail
cd "$(dirname "$0")/.."
VPY=$(scripts/bootstrap.sh | tail -n 1)
"$VPY" experiments/theorem1_linear.py --preset quick --out runs/theorem1
"$VPY" experiments/quick_demo.py --out runs/demo
