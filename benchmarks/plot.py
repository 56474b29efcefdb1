"""Figures of a suite CSV (benchmarks/suite.py): throughput and peak memory against N.

    python benchmarks/plot.py benchmarks/results/cpu/suite.csv [--out DIR]

Writes ``<stem>_throughput.png`` (samples/s over all models) and ``<stem>_memory.png``
(peak MB), log-log, one panel per workload and one line per method, into ``--out``
(default: the CSV's folder). Failed methods have no points; the legend names the N
at which they failed, so a missing line is never silent.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on benchmark machines
import matplotlib.pyplot as plt

METHODS = {
    "sequential": ("sequential", "tab:gray"),
    "torchfunc": ("torch.func", "tab:blue"),
    "concurrent": ("concurrent", "tab:purple"),
    "modelbatch": ("ModelBatch", "tab:orange"),
    "trainstep": ("TrainStep", "tab:red"),
}


def load(path: Path) -> list[dict]:
    """The step rows of a suite CSV (max-N rows left out)."""
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("kind", "step") == "step"]


def _value(row: dict, key: str) -> float | None:
    try:
        v = float(row[key])
    except (KeyError, ValueError):
        return None
    return v if v > 0 else None  # log axes: nothing to draw at 0 (or below)


def plot(rows: list[dict], key: str, ylabel: str, path: Path) -> Path:
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    fig, axes = plt.subplots(
        1, max(len(workloads), 1), figsize=(4.3 * max(len(workloads), 1), 3.8), squeeze=False
    )
    for ax, wname in zip(axes[0], workloads):
        wrows = [r for r in rows if r["workload"] == wname]
        methods = [m for m in METHODS if any(r["method"] == m for r in wrows)]
        methods += sorted({r["method"] for r in wrows} - set(methods))
        drawn = False
        for m in methods:
            mrows = [r for r in wrows if r["method"] == m]
            pts = sorted(
                (int(r["N"]), v)
                for r in mrows
                if r["status"] == "ok" and (v := _value(r, key)) is not None
            )
            failed = sorted(int(r["N"]) for r in mrows if r["status"] != "ok")
            label, color = METHODS.get(m, (m, None))
            if failed:
                label += f" (failed at N={','.join(map(str, failed))})"
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            ax.plot(xs, ys, marker="o", ms=4, label=label, color=color)
            drawn = drawn or bool(pts)
        ax.set_xscale("log", base=2)
        if drawn:
            ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        batch = wrows[0].get("batch", "")
        ax.set_title(f"{wname} (batch {batch})" if batch else wname)
        ax.set_xlabel("N models")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    if rows:
        r = rows[0]
        fig.suptitle(
            f"{r.get('device', '')}; torch {r.get('torch', '')}; commit {r.get('commit', '')}; "
            f"{r.get('amp', '')}",
            fontsize=9,
        )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> list[Path]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", type=Path)
    ap.add_argument("--out", type=Path, help="folder for the PNGs (default: the CSV's)")
    args = ap.parse_args(argv)
    rows = load(args.csv)
    out = args.out or args.csv.parent
    stem = args.csv.stem
    paths = [
        plot(rows, "samples_per_s", "samples / s (all models)", out / f"{stem}_throughput.png"),
        plot(rows, "peak_mem_mb", "peak memory (MB)", out / f"{stem}_memory.png"),
    ]
    for p in paths:
        print(f"wrote {p}")
    return paths


if __name__ == "__main__":
    main()
