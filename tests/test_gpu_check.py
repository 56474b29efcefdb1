"""The one command a GPU run needs (``make bench-gpu`` = ``scripts/gpu_check.sh``),
run end to end as a CPU smoke test (``MB_GPU_CHECK_DEVICE=cpu``): every step it
takes on a GPU (backend report, tests, every benchmark script, the suite and its
plots) runs and writes its files into the one output folder."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(sys.platform != "linux", reason="the script is bash for the Linux GPU hosts")
def test_gpu_command_runs_end_to_end_on_cpu(tmp_path):
    env = {
        **os.environ,
        "MB_GPU_CHECK_DEVICE": "cpu",
        "MB_GPU_CHECK_OUT": str(tmp_path),
        "PYTHON": sys.executable,
    }
    run = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    files = {p.name for p in tmp_path.iterdir()}
    for name in ["backend.txt", "pytest.txt", "bench_quick.md", "bench_mlp_quick.csv",
                 "fused_mlp_quick.md", "optim_quick.md", "linear_quick.md", "rnn_quick.md",
                 "dropout_quick.md", "amp_quick.md", "suite.csv", "suite.md",
                 "suite_amp.csv"]:  # fmt: skip
        assert name in files, (name, sorted(files))
    assert "passed" in (tmp_path / "pytest.txt").read_text()
    assert "modelbatch._C built with torch" in (tmp_path / "backend.txt").read_text()
    rows = list(csv.DictReader((tmp_path / "suite.csv").open()))
    assert {r["method"] for r in rows} >= {"sequential", "torchfunc", "modelbatch", "trainstep"}
    assert all(r["device"] for r in rows)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert {"suite_throughput.png", "suite_memory.png"} <= files
