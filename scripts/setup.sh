#!/usr/bin/env bash
# Sets up everything ModelBatch needs on a fresh machine, idempotently:
#   a virtual environment (.venv), torch (the local CPU wheel torch==2.13.0 where no
#   torch is installed; an already installed torch, e.g. a CUDA build, is reused),
#   the build and dev tools, and modelbatch itself built against that torch.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_PIN=${TORCH_PIN:-torch==2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  if "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    echo "setup: reusing the torch installed in $PYTHON"
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    "$PYTHON" -m venv "$VENV"
  fi
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install --quiet "$TORCH_PIN"
fi
# Every later install is constrained to the torch now installed, so no package can
# replace it (an unpinned torch would pull several GB of CUDA wheels).
"$PY" -c "import torch; print('torch==' + torch.__version__)" > "$VENV/constraints.txt"
"$PY" -m pip install --quiet -c "$VENV/constraints.txt" \
  "scikit-build-core>=0.10" ninja "cmake>=3.24"
# --no-build-isolation: build against the torch above, never a freshly fetched one.
"$PY" -m pip install --quiet -c "$VENV/constraints.txt" --no-build-isolation -e ".[dev]"
"$PY" -c "import modelbatch, json; print(json.dumps(modelbatch.backend_info(), indent=1))"
