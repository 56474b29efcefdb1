"""CPU allocator tuning for many-model training.

A ModelBatch step on the CPU allocates and frees a few dozen tensors of megabytes
(activations and gradients of all N models). glibc serves such sizes with fresh
``mmap`` pages, or trims its heap back to the OS right after they are freed, so
every step page-faults its working set in again; in a virtual machine one fault
costs about a microsecond, which adds up to several milliseconds per step: more
than the arithmetic of a small model. Raising glibc's trim threshold and serving
every block from the heap (no ``mmap``: its threshold cannot exceed 32 MiB, and the
recurrent layers of many models allocate hundreds of megabytes per step, whose
faults cost a third of a step) keeps freed memory in the heap for reuse (the effect
jemalloc or tcmalloc give when preloaded). The cost: the process keeps its peak
heap instead of returning it.

``ModelBatch`` applies this once, the first time it runs on the CPU, unless the
environment sets ``MODELBATCH_TUNE_MALLOC=0``. ``backend_info()`` reports the state.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4

_state: dict[str, object] = {"applied": False, "reason": "not applied yet"}


def tune_cpu_allocator(force: bool = False) -> bool:
    """Keep freed tensor memory in glibc's heap for reuse. Returns True if applied.

    Idempotent; a no-op (returning False) off Linux/glibc, or when
    ``MODELBATCH_TUNE_MALLOC=0`` unless ``force``.
    """
    if _state["applied"]:
        return True
    if not force and os.environ.get("MODELBATCH_TUNE_MALLOC", "1") == "0":
        _state["reason"] = "disabled by MODELBATCH_TUNE_MALLOC=0"
        return False
    if not sys.platform.startswith("linux"):
        _state["reason"] = "only glibc (Linux) is tuned"
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        _state["reason"] = "no glibc mallopt"
        return False
    ok = all(
        mallopt(param, value) == 1
        for param, value in (
            (_M_MMAP_THRESHOLD, 32 << 20),  # glibc's maximum: blocks below it come from the heap
            (_M_MMAP_MAX, 0),  # and the larger ones too
            (_M_TRIM_THRESHOLD, 1 << 30),  # never give the top of the heap back mid-training
            (_M_TOP_PAD, 64 << 20),  # grow the heap in large steps
        )
    )
    _state["applied"] = ok
    _state["reason"] = "no mmap, trim threshold 1 GiB" if ok else "mallopt failed"
    return ok


def allocator_info() -> str:
    return ("tuned: " if _state["applied"] else "default: ") + str(_state["reason"])
