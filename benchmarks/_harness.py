"""Shared benchmark harness: timing, machine facts and CSV rows.

Every row records the device, torch version, thread count and git commit, so a
figure is never separated from what produced it. Timings are medians of repeats
after warm-up; on CUDA the harness synchronises around each repeat.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_time(
    fn: Callable[[], object],
    *,
    repeats: int = 20,
    warmup: int = 3,
    device: str = "cpu",
    min_time: float = 0.0,
) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs.

    With ``min_time`` > 0, repeats are added until their total exceeds it (stabler
    medians for very short calls).
    """
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    total = 0.0
    while len(times) < repeats or total < min_time:
        t0 = time.perf_counter()
        fn()
        sync(device)
        dt = time.perf_counter() - t0
        times.append(dt)
        total += dt
        if len(times) > 50 * max(repeats, 1):
            break
    return statistics.median(times)


def interleaved_times(
    fns: dict[str, Callable[[], object]],
    *,
    repeats: int = 15,
    warmup: int = 3,
    device: str = "cpu",
    block: int = 1,
) -> dict[str, float]:
    """Median seconds per call of each function, timed in interleaved rounds.

    Each round times every function once (``block`` back-to-back calls, averaged),
    so a slow spell of a shared machine
    (other tenants, frequency changes) hits all methods alike instead of whichever
    happened to run at that moment.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(block):
                fn()
            sync(device)
            times[k].append((time.perf_counter() - t0) / block)
    return {k: statistics.median(v) for k, v in times.items()}


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=True,
        ).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def context(device: str) -> dict[str, str]:
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "threads": str(torch.get_num_threads()),
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
    }


def measured_sgemm_gflops(device: str = "cpu", n: int = 2048) -> float:
    """The machine's float32 GEMM rate (GFLOP/s) measured on an n x n x n matmul."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    t = median_time(lambda: a @ b, repeats=7, warmup=2, device=device)
    return 2 * n**3 / t / 1e9


def measured_copy_gbs(device: str = "cpu", numel: int = 1 << 25) -> float:
    """The machine's memory bandwidth (GB/s, read + write) on a large tensor copy."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), repeats=7, warmup=2, device=device)
    return 2 * 4 * numel / t / 1e9


def write_csv(path: Path, rows: list[dict[str, object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    return path


def results_dir(device: str) -> Path:
    if device.startswith("cuda"):
        gpu = torch.cuda.get_device_name(torch.device(device)).replace(" ", "-")
        return RESULTS / gpu
    return RESULTS / "cpu"


def threads_from_env() -> None:
    n = os.environ.get("MB_BENCH_THREADS")
    if n:
        torch.set_num_threads(int(n))


def standard_args(doc: str, repeats: int = 9) -> tuple[argparse.Namespace, dict[str, str]]:
    """The command line shared by the benchmark scripts (``--device``, ``--quick``,
    ``--threads``, ``--repeats``), applied (thread count, ``MB_BENCH_THREADS``), and
    the run's context for the result rows."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="one small case (a smoke test)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=repeats)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads_from_env()
    return args, context(args.device)
