#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment; safe to run repeatedly.
#
# * torch: an importable torch is kept (a CUDA build on a GPU machine, say);
#   otherwise torch==2.13.0 is installed (a CPU build on this kind of machine).
# * the package is installed editable with --no-build-isolation, so its optional
#   C++ extension builds against that torch (an isolated build would pull a
#   multi-GB CUDA torch); a failed extension build leaves a working install.
# Prints the path of the environment's python on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${FASTHESS_VENV:-.venv}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "bootstrap: keeping the torch installed for $PY ($("$PY" -c 'import torch; print(torch.__version__)'))" >&2
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
VPY="$VENV/bin/python"
"$VPY" -m pip install -q --upgrade pip >&2

if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  echo "bootstrap: installing torch==${FASTHESS_TORCH:-2.13.0}" >&2
  "$VPY" -m pip install -q "torch==${FASTHESS_TORCH:-2.13.0}" >&2
fi
"$VPY" -m pip install -q -r requirements/test.txt >&2

# Rebuild the package only when its build inputs changed.
stamp="$VENV/.fasthess-build"
digest=$(cat setup.py pyproject.toml $(find csrc -type f | sort) 2>/dev/null | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$digest" ] || ! "$VPY" -c "import fasthess" >/dev/null 2>&1; then
  echo "bootstrap: building fasthess (pip install -e . --no-build-isolation)" >&2
  "$VPY" -m pip install -q -e . --no-build-isolation >&2
  echo "$digest" > "$stamp"
fi
"$VPY" -c "import fasthess, fasthess.kernels.registry as r; print('bootstrap: fasthess', fasthess.__version__, 'C++ extension:', 'built' if r.extension_loaded() else 'NOT built')" >&2
echo "$VPY"
