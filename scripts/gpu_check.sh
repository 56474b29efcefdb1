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
#
# MB_GPU_CHECK_DEVICE=cpu runs the same pipeline as a smoke test on the CPU (what
# tests/test_gpu_check.py does): no build (the interpreter in $PYTHON has modelbatch),
# one test module, every benchmark with --quick (the suite --tiny on the MLP) and
# everything written to $MB_GPU_CHECK_OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DEVICE=${MB_GPU_CHECK_DEVICE:-cuda}
if [ "$DEVICE" = cpu ]; then
  PY=$PYTHON
  OUT=${MB_GPU_CHECK_OUT:?MB_GPU_CHECK_DEVICE=cpu needs MB_GPU_CHECK_OUT (a scratch folder)}
  QUICK=--quick
  BENCH_ARGS=${BENCH_ARGS---quick --models 1 16}
  TESTS=${MB_GPU_CHECK_TESTS:-tests/test_backend.py}
  SUITE_ARGS=${SUITE_ARGS---tiny --workload mlp --models 1 2}
  SUITE_AMP_ARGS=${SUITE_AMP_ARGS---tiny --workload cnn --models 1}
elif "$PYTHON" -c "import scikit_build_core" >/dev/null 2>&1 || "$PYTHON" -m pip download --no-deps -q -d /tmp/mb-probe scikit-build-core >/dev/null 2>&1; then
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
if [ "$DEVICE" != cpu ]; then
  GPU=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))")
  OUT=benchmarks/results/$GPU
  QUICK=
  BENCH_ARGS=${BENCH_ARGS-}
  TESTS=
fi
mkdir -p "$OUT"
export MB_BENCH_OUT=$OUT
"$PY" -c "import modelbatch, json; print(json.dumps(modelbatch.backend_info(), indent=1))" | tee "$OUT/backend.txt"
# Word splitting of the argument lists ($TESTS, $QUICK, $BENCH_ARGS, the suite's) is
# intended.
# shellcheck disable=SC2086
"$PY" -m pytest -q -rs -p no:cacheprovider $TESTS 2>&1 | tee "$OUT/pytest.txt" || true
# shellcheck disable=SC2086
"$PY" benchmarks/bench.py --device "$DEVICE" $BENCH_ARGS --out "$OUT" 2>&1 | tee "$OUT/bench.txt"
for b in dropout amp rnn optim linear fused_mlp; do
  # shellcheck disable=SC2086
  "$PY" "benchmarks/bench_$b.py" --device "$DEVICE" $QUICK 2>&1 | tee "$OUT/bench_$b.txt"
done
# shellcheck disable=SC2086
"$PY" benchmarks/suite.py --device "$DEVICE" ${SUITE_ARGS---quick} --out "$OUT" --name suite \
  2>&1 | tee "$OUT/suite.txt"
# shellcheck disable=SC2086
"$PY" benchmarks/suite.py --device "$DEVICE" --amp ${SUITE_AMP_ARGS---workload cnn} \
  --out "$OUT" --name suite_amp 2>&1 | tee "$OUT/suite_amp.txt"
if "$PY" -c "import matplotlib" >/dev/null 2>&1; then
  for csv in "$OUT/suite.csv" "$OUT/suite_amp.csv"; do
    "$PY" benchmarks/plot.py "$csv"
  done
else
  echo "gpu_check: matplotlib missing, figures skipped (run benchmarks/plot.py on the CSVs later)"
fi
