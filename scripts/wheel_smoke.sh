#!/usr/bin/env bash
# Release smoke test: what `pip install modelbatch-*.tar.gz` gives a user.
#
#   bash scripts/wheel_smoke.sh [WORKDIR]
#
# 1. builds the sdist, then the wheel FROM the sdist (as pip does), with
#    `python -m build --no-isolation` against the torch already installed, into
#    WORKDIR/dist (CMake's build tree in WORKDIR/build, never the checkout's build/);
# 2. checks both file lists (the sdist has csrc/, kernels/, python/, CMakeLists.txt
#    and every tracked file of those; the wheel has modelbatch/_C*.so and
#    modelbatch/kernels/*.py, nothing outside the package, no bytecode);
# 3. creates a FRESH virtual environment (WORKDIR/venv) that sees the installed
#    torch and its dependencies (links to the entries of the build interpreter's
#    site-packages, without the checkout's editable modelbatch) and installs the
#    wheel there with its dependencies, offline, under a constraint pinning torch;
# 4. from an empty directory (the checkout is not importable; `python -I`), imports
#    modelbatch, checks that it and modelbatch._C come from the fresh venv, that the
#    C++ extension is loaded, trains 8 tiny MLPs with modelbatch.optim.Adam (every
#    model's loss must fall), exports one as a plain module, and runs the Triton
#    Adam kernel of modelbatch.kernels (on CPU under TRITON_INTERPRET=1) against the
#    C++ kernel;
# 5. checks that the checkout's build outputs were left alone and its editable
#    install still imports.
#
# PYTHON: the interpreter with torch, build and scikit-build-core (default:
# .venv/bin/python). WORKDIR: kept when given (tests read the artifacts there);
# otherwise a temporary directory removed at exit. Exits non-zero on any failure.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
if [ $# -ge 1 ]; then
  mkdir -p "$1"
  WORK=$(cd "$1" && pwd)
else
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/modelbatch-wheel-smoke.XXXXXX")
  trap 'rm -rf "$WORK"' EXIT
fi
case "$WORK/" in
  "$ROOT"/*) echo "wheel_smoke: WORKDIR must lie outside the checkout ($ROOT)" >&2; exit 2 ;;
esac
rm -rf "$WORK/dist" "$WORK/build" "$WORK/venv" "$WORK/deps" "$WORK/run"
mkdir -p "$WORK/run"
t0=$(date +%s)
step() { echo "wheel_smoke: [$(($(date +%s) - t0))s] $*"; }

"$PY" -c "import torch, build, scikit_build_core" || {
  echo "wheel_smoke: $PY needs torch, build and scikit-build-core (pip install build)" >&2
  exit 2
}

# What a build must not touch in the checkout: its build outputs.
touch "$WORK/.start"
had_dist=0
[ -e "$ROOT/dist" ] && had_dist=1

# ------------------------------------------------------------------ 1. build
step "building the sdist and, from it, the wheel (against $("$PY" -c 'import torch; print("torch", torch.__version__)'))"
if ! "$PY" -m build --no-isolation --outdir "$WORK/dist" -Cbuild-dir="$WORK/build" "$ROOT" \
  > "$WORK/build.log" 2>&1; then
  tail -n 60 "$WORK/build.log"
  echo "wheel_smoke: FAILED: python -m build (full log: $WORK/build.log)" >&2
  exit 1
fi
SDIST=$(ls "$WORK"/dist/modelbatch-*.tar.gz)
WHEEL=$(ls "$WORK"/dist/modelbatch-*.whl)
step "built $(basename "$SDIST") and $(basename "$WHEEL")"

# ------------------------------------------------------- 2. the file lists
TRACKED=""
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  TRACKED=$(git -C "$ROOT" ls-files -- csrc kernels python CMakeLists.txt pyproject.toml)
fi
SDIST="$SDIST" WHEEL="$WHEEL" TRACKED="$TRACKED" "$PY" - <<'EOF'
import os
import sys
import tarfile
import zipfile

errors = []
with tarfile.open(os.environ["SDIST"]) as tf:
    names = tf.getnames()
root = names[0].split("/")[0]
sdist = {n[len(root) + 1 :] for n in names if n.startswith(root + "/")}
needed = ["pyproject.toml", "CMakeLists.txt", "PKG-INFO", "python/modelbatch/__init__.py"]
for need in needed + ["kernels/__init__.py", "kernels/adam.py"]:
    if need not in sdist:
        errors.append(f"sdist lacks {need}")
if not any(n.startswith("csrc/") and n.endswith(".cpp") for n in sdist):
    errors.append("sdist has no csrc/*.cpp")
tracked = [t for t in os.environ["TRACKED"].splitlines() if t]
missing = [t for t in tracked if t not in sdist]
if missing:
    errors.append(f"sdist lacks tracked files {missing[:10]}")
bad = [n for n in sdist if "__pycache__" in n or n.endswith((".pyc", ".so"))]
bad += [n for n in sdist if n.split("/")[0] in ("build", "dist", ".venv", ".git")]
if bad:
    errors.append(f"sdist holds build outputs {sorted(bad)[:10]}")

with zipfile.ZipFile(os.environ["WHEEL"]) as zf:
    wheel = set(zf.namelist())
dist_info = next((n.split("/")[0] for n in wheel if ".dist-info/" in n), "")
outside = [n for n in wheel if n.split("/")[0] not in ("modelbatch", dist_info)]
if outside:
    errors.append(f"wheel holds files outside the package: {sorted(outside)[:10]}")
if not any(n.startswith("modelbatch/_C") and n.endswith(".so") for n in wheel):
    errors.append("wheel lacks modelbatch/_C*.so")
bad = [n for n in wheel if "__pycache__" in n or n.endswith(".pyc")]
if bad:
    errors.append(f"wheel holds bytecode {sorted(bad)[:10]}")
# Every Python file of the sources is in the wheel, at its package path, and no other.
want = set()
for n in sdist:
    if n.endswith(".py") and n.startswith("python/modelbatch/"):
        want.add("modelbatch/" + n[len("python/modelbatch/") :])
    elif n.endswith(".py") and n.startswith("kernels/"):
        want.add("modelbatch/kernels/" + n[len("kernels/") :])
have = {n for n in wheel if n.endswith(".py")}
if want != have:
    errors.append(f"wheel .py files differ: missing {sorted(want - have)}, extra {sorted(have - want)}")
for e in errors:
    print(f"wheel_smoke: {e}", file=sys.stderr)
if errors:
    sys.exit(1)
print(f"wheel_smoke: sdist {len(sdist)} files, wheel {len(wheel)} files: contents OK")
EOF

# ------------------------------------------------ 3. a fresh virtual environment
step "creating a fresh virtual environment in $WORK/venv"
# --without-pip: the venv's own bundled pip and setuptools would shadow the installed
# ones (torch requires a newer setuptools than ensurepip brings).
"$PY" -m venv --without-pip "$WORK/venv"
VPY=$WORK/venv/bin/python
# The installed torch (and numpy, tqdm, triton, pip, ...) stay where they are: the
# venv sees them through a directory of links to the build interpreter's
# site-packages entries, leaving out any modelbatch (the checkout's editable install).
"$PY" - "$WORK/deps" <<'EOF'
import os
import site
import sys

deps = sys.argv[1]
os.makedirs(deps)
dirs = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
for d in dirs:
    if not os.path.isdir(d):
        continue
    for name in sorted(os.listdir(d)):
        low = name.lower()
        if low.startswith(("modelbatch", "_editable", "__editable__", "__pycache__")):
            continue
        if low.endswith(".pth"):  # path hooks (the editable install's among them)
            continue
        link = os.path.join(deps, name)
        if not os.path.lexists(link):  # the first on sys.path wins, as for imports
            os.symlink(os.path.join(d, name), link)
EOF
PURELIB=$("$VPY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$WORK/deps" > "$PURELIB/_modelbatch_smoke_deps.pth"
# As scripts/setup.sh does: the torch now installed, pinned.
"$PY" -c "import torch; print('torch==' + torch.__version__)" > "$WORK/constraints.txt"

step "installing the wheel with its dependencies (offline, torch pinned)"
# --no-index: every dependency must already be satisfied by the installed packages;
# nothing is fetched (an unpinned torch would pull gigabytes of CUDA wheels).
"$VPY" -m pip install --quiet --no-index -c "$WORK/constraints.txt" "$WHEEL"

# --------------------------------------------- 4. use it from outside the tree
step "smoke test from $WORK/run"
cat > "$WORK/run/smoke.py" <<'EOF'
import importlib.metadata
import json
import os
import sys

import torch

if not torch.cuda.is_available():
    # Read when a Triton kernel is decorated: before modelbatch.kernels is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import modelbatch
import torch.nn.functional as F
from torch import nn

prefix = os.path.realpath(sys.prefix)


def check(ok, what):
    if not ok:
        sys.exit(f"wheel_smoke: FAILED: {what}")


def inside_venv(path):
    return os.path.realpath(path).startswith(prefix + os.sep)


check(inside_venv(modelbatch.__file__), f"modelbatch imported from {modelbatch.__file__}")
check(
    importlib.metadata.version("modelbatch") == modelbatch.__version__,
    "the installed version is not modelbatch.__version__",
)
info = modelbatch.backend_info()
print(json.dumps(info, indent=1))
check(modelbatch.c_extension_loaded(), f"modelbatch._C is not loaded: {info['_C']}")
check(inside_venv(modelbatch._backend._C.__file__), f"_C from {modelbatch._backend._C.__file__}")
check(info["cpu"].startswith("C++"), f"the CPU backend is {info['cpu']!r}")

# 8 tiny MLPs, each with its own learning rate, on one shared regression task.
torch.manual_seed(0)
n = 8
models = [nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1)) for _ in range(n)]
batch = modelbatch.ModelBatch(models, seeds=0)
opt = modelbatch.optim.Adam(batch, lr=torch.logspace(-2, -1.3, n))
x = torch.randn(64, 4)
y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1
first = None
for _ in range(40):
    opt.zero_grad()
    losses = batch.compute_loss(batch(x), y, F.mse_loss, reduction="none")  # [n]
    losses.sum().backward()
    opt.step()
    first = losses.detach().clone() if first is None else first
last = losses.detach()
print("loss per model: first", [round(v, 3) for v in first.tolist()])
print("                 last", [round(v, 3) for v in last.tolist()])
check(bool((last < 0.5 * first).all()), "some model's loss did not fall")
alone = batch.model(3)
check(type(alone) is nn.Sequential, "batch.model(3) is not the original class")
torch.testing.assert_close(alone(x), batch(x)[3])

# modelbatch.kernels: the Triton Adam kernel against the C++ one, 3 models.
import modelbatch.kernels.adam as triton_adam  # noqa: E402

check(inside_venv(triton_adam.__file__), f"modelbatch.kernels from {triton_adam.__file__}")
device = "cpu" if triton_adam._interpreting(triton_adam._adam_kernel) else "cuda"
g = torch.Generator().manual_seed(1)
shapes = [(3, 5), (3, 4, 2)]
params = [torch.randn(s, generator=g) for s in shapes]
grads = [torch.randn(s, generator=g) for s in shapes]
# lr, beta1, beta2, eps, weight_decay, amsgrad: one value per model.
hps = [[1e-3, 1e-2, 3e-2], [0.9] * 3, [0.999] * 3, [1e-8] * 3, [0.0, 0.01, 0.1], [0.0] * 3]
hps = [torch.tensor(v, dtype=torch.float64) for v in hps]


def run(fn, dev):
    p = [t.clone().to(dev) for t in params]
    state = ([torch.zeros_like(t) for t in p], [torch.zeros_like(t) for t in p], [])
    steps = torch.zeros(3, dtype=torch.float64, device=dev)
    for _ in range(2):
        fn(p, [t.to(dev) for t in grads], *state, steps, *(h.to(dev) for h in hps), True)
    return [t.cpu() for t in p]


for a, b in zip(run(triton_adam.adam_step, device), run(torch.ops.modelbatch.adam_step, "cpu")):
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
mode = "interpreter" if device == "cpu" else "CUDA"
print(f"Triton adam kernel ({mode}) matches the C++ kernel")
print("wheel_smoke: smoke test passed")
EOF
(cd "$WORK/run" && "$VPY" -I smoke.py)

# ------------------------------------------------- 5. the checkout is untouched
changed=""
if [ -d "$ROOT/build" ]; then
  changed=$(find "$ROOT/build" -newer "$WORK/.start" -print -quit)
fi
if [ "$had_dist" = 0 ] && [ -e "$ROOT/dist" ]; then changed="$changed $ROOT/dist"; fi
stray=$(find "$ROOT/python" "$ROOT/kernels" -name "_C*.so" -print -quit)
if [ -n "$changed$stray" ]; then
  echo "wheel_smoke: FAILED: the build wrote into the checkout: $changed $stray" >&2
  exit 1
fi
if [ -x "$ROOT/.venv/bin/python" ]; then
  (cd "$WORK/run" && "$ROOT/.venv/bin/python" -c \
    "import modelbatch; assert modelbatch.c_extension_loaded(), modelbatch.backend_info()") || {
    echo "wheel_smoke: FAILED: the checkout's .venv no longer imports modelbatch" >&2
    exit 1
  }
fi
step "OK: sdist and wheel build, install and run ($(basename "$WHEEL"))"
