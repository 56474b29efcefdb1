"""The release artifacts: sdist and wheel build, install and run.

Runs ``scripts/wheel_smoke.sh`` once (it compiles the extension into a temporary
build tree: a minute or two on 2 cores): ``python -m build --no-isolation`` makes
the sdist and, from it, the wheel against the installed torch; the wheel is
installed into a fresh virtual environment and used from outside the checkout
(C++ extension loaded, 8 models trained, a Triton kernel run). Then the file
lists of both artifacts are checked here too.

Skipped only where the ``build`` package is missing (it is in the dev extra, so
``make test`` and CI have it).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "wheel_smoke.sh"
TIMEOUT_S = 1200

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("build") is None,
    reason="the `build` package is not installed (pip install build; it is in the dev extra)",
)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Run the smoke script once; (completed process, its work directory, seconds)."""
    work = tmp_path_factory.mktemp("wheel_smoke")
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("PYTHONPATH", None)
    t0 = time.perf_counter()
    proc = subprocess.run(
        ["bash", str(SCRIPT), str(work)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    return proc, work, time.perf_counter() - t0


def _artifact(work: Path, pattern: str) -> Path:
    found = sorted((work / "dist").glob(pattern))
    if len(found) != 1:
        pytest.fail(f"expected one {pattern} in {work / 'dist'}, found {found}")
    return found[0]


def test_wheel_smoke_script_passes(smoke):
    proc, _, seconds = smoke
    assert proc.returncode == 0, (
        f"scripts/wheel_smoke.sh exited {proc.returncode} after {seconds:.0f} s\n"
        f"--- stdout ---\n{proc.stdout[-8000:]}\n--- stderr ---\n{proc.stderr[-8000:]}"
    )
    out = proc.stdout
    assert "contents OK" in out
    assert "wheel_smoke: smoke test passed" in out
    assert "matches the C++ kernel" in out
    assert "OK: sdist and wheel build, install and run" in out
    print(f"wheel smoke: {seconds:.0f} s")


def test_wheel_contents(smoke):
    _, work, _ = smoke
    wheel = _artifact(work, "modelbatch-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    assert [n for n in names if re.fullmatch(r"modelbatch/_C\..*\.so", n)], names
    for need in (
        "modelbatch/__init__.py",
        "modelbatch/kernels/__init__.py",
        "modelbatch/kernels/adam.py",
        "modelbatch/ops/__init__.py",
        "modelbatch/optim/adam.py",
        "modelbatch/integrations/__init__.py",
    ):
        assert need in names, f"the wheel lacks {need}"
    tops = {n.split("/")[0] for n in names} - {"modelbatch"}
    assert len(tops) == 1 and re.fullmatch(r"modelbatch-[^/]+\.dist-info", *tops), tops
    dist_info = tops.pop()
    for bad in ("tests/", "benchmarks/", "examples/", "csrc/", "kernels/"):
        assert not [n for n in names if n.startswith(bad)], f"the wheel holds {bad}"
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    with zipfile.ZipFile(wheel) as zf:
        meta = zf.read(f"{dist_info}/METADATA").decode()
    assert "Requires-Dist: torch" in meta


def test_sdist_contents(smoke):
    _, work, _ = smoke
    sdist = _artifact(work, "modelbatch-*.tar.gz")
    with tarfile.open(sdist) as tf:
        names = [n.split("/", 1)[1] for n in tf.getnames() if "/" in n]
    for need in ("pyproject.toml", "CMakeLists.txt", "README.md", "PKG-INFO"):
        assert need in names, f"the sdist lacks {need}"
    cpp = {Path(n).name for n in names if n.startswith("csrc/") and n.endswith(".cpp")}
    assert cpp == {p.name for p in (ROOT / "csrc").glob("*.cpp")}
    headers = {Path(n).name for n in names if n.startswith("csrc/") and n.endswith(".h")}
    assert headers == {p.name for p in (ROOT / "csrc").glob("*.h")}
    kernels = {Path(n).name for n in names if n.startswith("kernels/") and n.endswith(".py")}
    assert kernels == {p.name for p in (ROOT / "kernels").glob("*.py")}
    assert "python/modelbatch/__init__.py" in names
    assert not [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".so"))]
    assert not [n for n in names if n.split("/")[0] in ("build", "dist", ".venv", ".git")]
