# The two commands of the README:
#   make demo   set up (venv, torch, build) and run the main job (examples/sweep_digits.py)
#   make test   set up and run the whole test suite (ruff lint + format check, pytest)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.modelbatch-built
SOURCES := pyproject.toml CMakeLists.txt scripts/setup.sh $(wildcard csrc/*.cpp csrc/*.h)

.PHONY: setup demo test lint bench bench-quick gpu wheel wheel-smoke clean

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

bench-quick: setup
	$(PY) benchmarks/bench.py --quick

# Release artifacts in dist/: the sdist and, built from it as pip does, the wheel,
# against the installed torch (no isolation). The wheel's CMake tree lies in the
# unpacked sdist's temporary directory, never in this checkout's build/.
wheel: setup
	$(PY) -m build --no-isolation --outdir dist .

# Build both, install the wheel into a fresh venv and use it from outside the checkout.
wheel-smoke: setup
	PYTHON=$(PY) bash scripts/wheel_smoke.sh

# On a CUDA machine: tests (CUDA included) + GPU benchmarks -> benchmarks/results/<gpu>/
gpu:
	VENV=$(VENV) bash scripts/gpu_check.sh

clean:
	rm -rf build dist $(VENV)
