"""Shared benchmark harness: timing, machine facts and CSV rows.

Every row records the device, torch version, thread count and git commit, so a
figure is never separated from what produced it. Timings are medians of repeats
after warm-up; on CUDA the harness synchronises around each repeat. Also: peak
memory of a piece of work (:class:`PeakMemory`: CUDA allocator statistics, or the
CPU process's resident-set high-water mark), an address-space cap for out-of-memory
probes (:func:`limit_address_space`) and GPU utilisation (:class:`GpuUtilSampler`).
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
        torch.cuda.synchronize(torch.device(device))  # "cuda": the current device


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
    self_timed: frozenset[str] | set[str] = frozenset(),
) -> dict[str, float]:
    """Median seconds per call of each function, timed in interleaved rounds.

    Each round times every function once (``block`` back-to-back calls, averaged),
    so a slow spell of a shared machine
    (other tenants, frequency changes) hits all methods alike instead of whichever
    happened to run at that moment. The functions named in ``self_timed`` time
    themselves: they return their own seconds (e.g. work in other processes, whose
    messages to and from this one are not part of the work).
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            own = 0.0
            t0 = time.perf_counter()
            for _ in range(block):
                r = fn()
                if k in self_timed:
                    own += float(r or 0.0)
            sync(device)
            dt = own if k in self_timed else time.perf_counter() - t0
            times[k].append(dt / block)
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
    """benchmarks/results/<gpu-name> or /cpu; MB_BENCH_OUT overrides it (the GPU
    script's CPU smoke run writes everything into one temporary folder)."""
    if os.environ.get("MB_BENCH_OUT"):
        return Path(os.environ["MB_BENCH_OUT"])
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


# ------------------------------------------------------------------------ memory
# torch keeps no statistics for its CPU allocator, and tracemalloc sees none of the
# tensor memory, so on the CPU a method's memory is read from the kernel: the
# process's resident set (VmRSS) and its high-water mark (VmHWM), which Linux lets a
# process reset to the current RSS (``/proc/self/clear_refs``). Freed heap memory
# stays resident (and ModelBatch's allocator tuning keeps it in the heap on
# purpose), so before each reading the free heap is handed back with malloc_trim:
# otherwise a method would reuse a previous method's pages without showing them.


def _proc_status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def rss_bytes() -> int | None:
    """The process's resident set now (Linux), else None."""
    return _proc_status_bytes("VmRSS")


def peak_rss_bytes() -> int | None:
    """The process's resident-set high-water mark (Linux; see :func:`reset_peak_rss`)."""
    return _proc_status_bytes("VmHWM")


def vm_size_bytes() -> int | None:
    """The process's virtual address space now (Linux), else None."""
    return _proc_status_bytes("VmSize")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    if not platform.system() == "Linux":
        return
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(ctypes.c_size_t(0))
    except (OSError, AttributeError):
        pass


def release_memory(device: str = "cpu") -> None:
    """Collect garbage and give freed memory back (glibc's heap; CUDA's cache), so the
    next reading of the process's memory shows only what is alive."""
    import gc

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    else:
        _malloc_trim()


class PeakMemory:
    """Peak memory of one piece of work over a baseline taken at :meth:`start`.

    * CUDA: ``torch.cuda.max_memory_allocated`` (reset with
      ``reset_peak_memory_stats``) minus ``memory_allocated`` at the start: tensor
      memory only, exact.
    * CPU (Linux): the resident-set high-water mark minus the resident set at the
      start, free heap trimmed at both points: every byte the work keeps or touches
      (tensors, and also Python objects, compiled code, thread stacks); resolution
      about a page, noise a few MB.
    * elsewhere: ``None`` (``method == "n/a"``).

    :meth:`restart_peak` drops what was freed since the start and restarts the
    high-water mark from what is alive now (the baseline stays), so a one-time
    transient (compilation, first-call set-up) can be left out of the peak.
    """

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.baseline: int | None = None
        if device.startswith("cuda"):
            self.method = "cuda_max_memory_allocated"
        elif rss_bytes() is not None and reset_peak_rss():
            self.method = "rss_high_water_mark"
        else:
            self.method = "n/a"

    def start(self) -> PeakMemory:
        release_memory(self.device)
        if self.method == "cuda_max_memory_allocated":
            dev = torch.device(self.device)
            self.baseline = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        elif self.method == "rss_high_water_mark":
            self.baseline = rss_bytes()
            reset_peak_rss()
        return self

    def restart_peak(self) -> None:
        release_memory(self.device)
        if self.method == "cuda_max_memory_allocated":
            torch.cuda.reset_peak_memory_stats(torch.device(self.device))
        elif self.method == "rss_high_water_mark":
            reset_peak_rss()

    def peak_bytes(self) -> int | None:
        """Peak bytes above the baseline since the (re)start, or None."""
        if self.baseline is None:
            return None
        if self.method == "cuda_max_memory_allocated":
            sync(self.device)
            peak = torch.cuda.max_memory_allocated(torch.device(self.device))
        else:
            peak = peak_rss_bytes()
        return None if peak is None else max(peak - self.baseline, 0)


def available_memory_bytes() -> int | None:
    """What the kernel says can still be allocated without swapping (MemAvailable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def limit_address_space(extra_bytes: int) -> int | None:
    """Cap this process's address space (``RLIMIT_AS``) at its current size plus
    ``extra_bytes``: allocations beyond it fail (torch raises), like running out of
    memory. Relative to the current size, because importing torch alone maps far
    more address space than it uses. Returns the limit set, or None if impossible."""
    try:
        import resource
    except ImportError:
        return None
    size = vm_size_bytes()
    if size is None:
        return None
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = size + int(extra_bytes)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    return limit


# --------------------------------------------------------------- GPU utilisation
class GpuUtilSampler:
    """Mean GPU utilisation (% of time a kernel ran, as NVML reports it) over the
    ``with`` block, sampled every ``interval`` seconds on the given CUDA devices.

    Uses pynvml when importable, else polls ``nvidia-smi``; with neither,
    ``available`` is False, ``mean`` stays None and ``note`` says why. NVML averages
    over its own sample period (1/6 s to 1 s by GPU), so use windows of a second or
    more.
    """

    def __init__(self, devices: list[int] | None = None, interval: float = 0.05) -> None:
        self.devices = devices if devices is not None else [0]
        self.interval = interval
        self.samples: list[float] = []
        self.mean: float | None = None
        self.source = None
        self.note = ""
        self._nvml = None
        self._handles: list = []
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handles = [self._handle(pynvml, d) for d in self.devices]
            self.source = "pynvml"
        except Exception as err:  # ImportError or NVML missing: try nvidia-smi
            import shutil

            if shutil.which("nvidia-smi"):
                self.source = "nvidia-smi"
            else:
                self.note = f"GPU utilisation omitted: no pynvml ({err}) and no nvidia-smi"
        self.available = self.source is not None

    @staticmethod
    def _handle(pynvml, device: int):
        # torch's device i is not NVML's device i under CUDA_VISIBLE_DEVICES: match UUIDs.
        try:
            uuid = str(torch.cuda.get_device_properties(device).uuid)
            return pynvml.nvmlDeviceGetHandleByUUID(
                uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
            )
        except Exception:
            return pynvml.nvmlDeviceGetHandleByIndex(device)

    def _nvidia_smi_ids(self) -> str:
        vis = os.environ.get("CUDA_VISIBLE_DEVICES")
        if vis:
            ids = [s.strip() for s in vis.split(",")]
            return ",".join(ids[d] for d in self.devices if d < len(ids))
        return ",".join(str(d) for d in self.devices)

    def __enter__(self) -> GpuUtilSampler:
        import threading

        self.samples = []
        self._stop = threading.Event()
        self._proc = None
        if self.source == "pynvml":

            def poll() -> None:
                while not self._stop.is_set():
                    for h in self._handles:
                        self.samples.append(float(self._nvml.nvmlDeviceGetUtilizationRates(h).gpu))
                    self._stop.wait(self.interval)

            self._thread = threading.Thread(target=poll, daemon=True)
            self._thread.start()
        elif self.source == "nvidia-smi":
            ms = max(int(self.interval * 1000), 50)
            self._proc = subprocess.Popen(
                [
                    "nvidia-smi",
                    "--query-gpu=utilization.gpu",
                    "--format=csv,noheader,nounits",
                    f"--id={self._nvidia_smi_ids()}",
                    f"--loop-ms={ms}",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
        return self

    def __exit__(self, *exc) -> None:
        if self.source == "pynvml":
            self._stop.set()
            self._thread.join()
        elif self._proc is not None:
            self._proc.terminate()
            out, _ = self._proc.communicate(timeout=10)
            for line in out.splitlines():
                try:
                    self.samples.append(float(line.strip()))
                except ValueError:
                    pass
        if self.samples:
            self.mean = statistics.fmean(self.samples)
        elif self.available:
            self.note = f"GPU utilisation: no samples from {self.source}"
