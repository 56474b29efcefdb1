# The two commands of the README:
#   make demo   set up (venv, torch, build) and run the main job (examples/sweep_digits.py)
#   make test   set up and run the whole test suite (ruff lint + format check, pytest)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.modelbatch-built
SOURCES := pyproject.toml CMakeLists.txt scripts/setup.sh $(wildcard csrc/*.cpp csrc/*.h)

.PHONY: setup demo test lint bench bench-quick bench-suite bench-suite-quick bench-gpu gpu wheel wheel-smoke clean

setup: $(STAMP)

$(STAMP): $(SOURCES)
	VENV=$(VENV) bash scripts/setup.sh
	touch $@

demo: setup
	$(PY) examples/sweep_digits.py

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/bench.py
	$(PY) benchmarks/bench_dropout.py
	$(PY) benchmarks/bench_amp.py
	$(PY) benchmarks/bench_rnn.py
	$(PY) benchmarks/bench_optim.py
	$(PY) benchmarks/bench_linear.py
	$(PY) benchmarks/bench_fused_mlp.py

bench-quick: setup
	$(PY) benchmarks/bench.py --quick

# The training-step suite (4 workloads x N x 5 methods, benchmarks/suite.py) and its
# figures -> benchmarks/results/cpu/suite[_quick].{csv,md}, *_throughput/_memory.png
bench-suite: setup
	$(PY) benchmarks/suite.py
	$(PY) benchmarks/plot.py benchmarks/results/cpu/suite.csv

bench-suite-quick: setup
	$(PY) benchmarks/suite.py --quick
	$(PY) benchmarks/plot.py benchmarks/results/cpu/suite_quick.csv

# Release artifacts in dist/: the sdist and, built from it as pip does, the wheel,
# against the installed torch (no isolation). The wheel's CMake tree lies in the
# unpacked sdist's temporary directory, never in this checkout's build/.
wheel: setup
	$(PY) -m build --no-isolation --outdir dist .

# Build both, install the wheel into a fresh venv and use it from outside the checkout.
wheel-smoke: setup
	PYTHON=$(PY) bash scripts/wheel_smoke.sh

# On a CUDA machine: tests (CUDA included) + every benchmark (bench*.py, suite.py and
# its plots) -> benchmarks/results/<gpu>/
bench-gpu:
	VENV=$(VENV) bash scripts/gpu_check.sh

gpu: bench-gpu

clean:
	rm -rf build dist $(VENV)
