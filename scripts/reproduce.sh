#!/usr/bin/env bash
# The main job: set up the environment, then run the quick reproduction on
# embedded default data and print the R_med table. Arguments go to the driver.
set -euo pipefail
cd "$(dirname "$0")/.."
VPY=$(scripts/bootstrap.sh | tail -n 1)
exec "$VPY" experiments/quick_demo.py --out runs/demo "$@"
