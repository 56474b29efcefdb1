"""The digits sweep example (examples/sweep_digits.py) runs end to end in --quick mode."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sweep_digits.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("sweep_digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_sweep_digits_quick(tmp_path):
    sweep = _load_example()
    result = sweep.main(["--quick", "--out", str(tmp_path), "--no-progress"])

    assert result["num_models"] == 32
    for key in ("csv", "plot", "model"):
        path = Path(result[key])
        assert path.parent == tmp_path
        assert path.is_file() and path.stat().st_size > 0, key

    with open(result["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == result["num_models"]
    assert sorted(int(r["model"]) for r in rows) == list(range(result["num_models"]))

    # 10 classes: chance is 0.1. Three epochs of the quick grid reach ~0.97 at best
    # and every config is well above chance.
    assert result["best_val_acc"] > 0.9
    assert min(float(r["val_acc"]) for r in rows) > 0.5
    assert result["best_val_acc"] == max(float(r["val_acc"]) for r in rows)
    # The exported plain model scores exactly what the batched one did.
    assert result["reloaded_val_acc"] == result["best_val_acc"]
