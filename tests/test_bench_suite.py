"""Smoke test of the benchmark suite (``benchmarks/suite.py``) and its plots.

Not a timed test (benchmarks are scripts, DESIGN.md convention 9): a ``--tiny`` run
is checked for completeness only. Every (workload, method) has a row, a method that
ran has a positive finite step time, a method that failed says why, the markdown and
both figures are written, and the max-N search brackets its answer consistently.
"""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "suite.py"
PLOT = ROOT / "benchmarks" / "plot.py"
WORKLOADS = ["mlp", "cnn", "lstm", "transformer"]
METHODS = ["sequential", "torchfunc", "concurrent", "modelbatch", "trainstep"]


def _run(script: Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert proc.returncode == 0, (
        f"{script.name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def suite_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("suite")
    _run(
        SUITE,
        "--quick",
        "--tiny",
        "--workload",
        *WORKLOADS,
        "--models",
        "2",
        "--out",
        str(out),
        timeout=600,
    )
    return out


def test_every_workload_and_method_has_a_row(suite_out):
    rows = [r for r in _rows(suite_out / "suite_tiny.csv") if r["kind"] == "step"]
    keys = [(r["workload"], r["method"]) for r in rows]
    assert sorted(keys) == sorted((w, m) for w in WORKLOADS for m in METHODS)
    for r in rows:
        assert r["N"] == "2"
        assert r["status"] in ("ok", "failed"), r
        if r["status"] == "ok":
            step_ms, samples = float(r["step_ms"]), float(r["samples_per_s"])
            assert math.isfinite(step_ms) and step_ms > 0, r
            assert math.isfinite(samples) and samples > 0, r
            assert r["device"] and r["torch"] and r["commit"] and r["threads"]
        else:
            assert r["reason"].strip(), f"failed without a reason: {r}"
    by = {(r["workload"], r["method"]): r for r in rows}
    for w in WORKLOADS:  # the library's own eager path and the baselines run everywhere
        for m in ("sequential", "concurrent", "modelbatch"):
            assert by[(w, m)]["status"] == "ok", by[(w, m)]
        assert by[(w, "modelbatch")]["forward_path"] == "vmap"


def test_markdown_lists_every_workload(suite_out):
    md = (suite_out / "suite_tiny.md").read_text()
    for w in WORKLOADS:
        assert f"## {w}:" in md
    assert "ModelBatch" in md and "TrainStep" in md


def test_plot_writes_both_figures(suite_out):
    pytest.importorskip("matplotlib")
    _run(PLOT, str(suite_out / "suite_tiny.csv"), timeout=120)
    for name in ("suite_tiny_throughput.png", "suite_tiny_memory.png"):
        data = (suite_out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_max_n_search_brackets_its_answer(tmp_path):
    tol = 0.25
    _run(
        SUITE,
        "--tiny",
        "--workload",
        "mlp",
        "--max-n-only",
        "--max-n-methods",
        "modelbatch",
        "--mem-limit-gb",
        "0.1",
        "--max-n-start",
        "16",
        "--max-n-tol",
        str(tol),
        "--out",
        str(tmp_path),
        timeout=300,
    )
    (row,) = [r for r in _rows(tmp_path / "suite_tiny_maxn.csv") if r["kind"] == "max_n"]
    assert row["status"] == "ok", row
    max_n = int(row["N"])
    assert max_n > 0
    probes = [(int(n), res) for n, res in (p.split(":") for p in row["max_n_probes"].split())]
    fits = [n for n, res in probes if res == "ok"]
    fails = [n for n, res in probes if res == "fail"]
    assert fits and fails, probes
    # Monotone: every N that fitted is below every N that did not.
    assert max(fits) < min(fails), probes
    assert max_n == max(fits)
    assert min(fails) - max_n <= max(1, tol * max_n), probes
    assert float(row["peak_mem_mb"]) <= 0.1 * 1024
