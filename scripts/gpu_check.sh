#!/usr/bin/env bash
# The one command a CUDA machine needs: build against the machine's torch, run the
# whole test suite (CUDA tests included: they run whenever a GPU is visible, and the
# Triton kernels then run compiled, not interpreted), and run the benchmarks on the
# GPU, writing everything under benchmarks/results/<gpu-name>/: bench.py, the other
# bench_*.py, the training-step suite (benchmarks/suite.py: all workloads with
# SUITE_ARGS, default --quick; then float16 AMP on the CNN with SUITE_AMP_ARGS,
# default every N of the full run) and its figures (benchmarks/plot.py).
#
# Lent GPU machines may have no package index: when scikit-build-core is missing
# the extension is built with CMake + ninja directly and staged on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if "$PYTHON" -c "import scikit_build_core" >/dev/null 2>&1 || "$PYTHON" -m pip download --no-deps -q -d /tmp/mb-probe scikit-build-core >/dev/null 2>&1; then
  VENV=${VENV:-.venv} bash scripts/setup.sh
  PY=${VENV:-.venv}/bin/python
else
  echo "gpu_check: no scikit-build-core and no index; building with CMake directly"
  B=build/direct
  cmake -S . -B "$B" -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v "$PYTHON")"
  cmake --build "$B"
  rm -rf "$B/stage" && mkdir -p "$B/stage"
  cp -r python/modelbatch "$B/stage/modelbatch"
  cp -r kernels "$B/stage/modelbatch/kernels"
  cp "$B"/_C*.so "$B/stage/modelbatch/"
  export PYTHONPATH="$PWD/$B/stage:$PWD/tests"
  PY=$PYTHON
fi
GPU=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))")
OUT=benchmarks/results/$GPU
mkdir -p "$OUT"
"$PY" -c "import modelbatch, json; print(json.dumps(modelbatch.backend_info(), indent=1))" | tee "$OUT/backend.txt"
"$PY" -m pytest -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/pytest.txt" || true
"$PY" benchmarks/bench.py --device cuda --out "$OUT" 2>&1 | tee "$OUT/bench.txt"
"$PY" benchmarks/bench_dropout.py --device cuda 2>&1 | tee "$OUT/bench_dropout.txt"
"$PY" benchmarks/bench_amp.py --device cuda 2>&1 | tee "$OUT/bench_amp.txt"
"$PY" benchmarks/bench_rnn.py --device cuda 2>&1 | tee "$OUT/bench_rnn.txt"
"$PY" benchmarks/bench_optim.py --device cuda 2>&1 | tee "$OUT/bench_optim.txt"
"$PY" benchmarks/bench_linear.py --device cuda 2>&1 | tee "$OUT/bench_linear.txt"
"$PY" benchmarks/bench_fused_mlp.py --device cuda 2>&1 | tee "$OUT/bench_fused_mlp.txt"
# Word splitting of the two argument lists is intended.
# shellcheck disable=SC2086
"$PY" benchmarks/suite.py --device cuda ${SUITE_ARGS---quick} --out "$OUT" --name suite \
  2>&1 | tee "$OUT/suite.txt"
# shellcheck disable=SC2086
"$PY" benchmarks/suite.py --device cuda --amp ${SUITE_AMP_ARGS---workload cnn} --out "$OUT" \
  --name suite_amp 2>&1 | tee "$OUT/suite_amp.txt"
if "$PY" -c "import matplotlib" >/dev/null 2>&1; then
  for csv in "$OUT/suite.csv" "$OUT/suite_amp.csv"; do
    "$PY" benchmarks/plot.py "$csv"
  done
else
  echo "gpu_check: matplotlib missing, figures skipped (run benchmarks/plot.py on the CSVs later)"
fi
