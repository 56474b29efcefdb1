"""Loads the compiled kernels and says which backend each op uses.

``modelbatch._C`` holds the op schemas and the C++ CPU kernels. If it cannot be
loaded (a source checkout that was never built, an ABI mismatch), the ops are
defined from Python with the pure-torch reference kernels and a warning says so:
nothing falls back silently, and :func:`backend_info` reports what is in use.
"""

from __future__ import annotations

import warnings

import torch

C_ERROR: str | None = None
try:
    from modelbatch import _C  # noqa: F401  (importing registers the ops)
except ImportError as exc:  # pragma: no cover - exercised only on a broken build
    C_ERROR = f"{type(exc).__name__}: {exc}"
    from modelbatch.ops._schemas import SCHEMAS

    _LIB = torch.library.Library("modelbatch", "DEF")
    for _schema in SCHEMAS.values():
        _LIB.define(_schema)
    warnings.warn(
        "modelbatch._C could not be loaded, so the C++ CPU kernels are unavailable and "
        f"the pure-torch reference kernels are used instead ({C_ERROR}). Rebuild with "
        "`pip install --no-build-isolation .` against the installed torch.",
        RuntimeWarning,
        stacklevel=2,
    )


def c_extension_loaded() -> bool:
    """True when ``modelbatch._C`` (the C++ kernels) is loaded."""
    return C_ERROR is None


def backend_info() -> dict[str, str]:
    """Which kernel each device uses, and why; for users and for tests.

    Returns a dict with keys ``"_C"`` (build string or load error), ``"cpu"``,
    ``"cuda"`` and ``"cpu_allocator"`` (see :mod:`modelbatch.allocator`).
    """
    if C_ERROR is None:
        c_info = torch.ops.modelbatch.build_info()
        cpu = "C++ kernels (modelbatch._C)"
    else:
        c_info = f"not loaded: {C_ERROR}"
        cpu = "pure-torch reference (modelbatch._C not loaded)"
    try:
        import triton  # noqa: F401

        cuda = "Triton kernels (modelbatch.kernels)"
    except ImportError:
        cuda = "pure-torch reference (triton is not installed)"
    from modelbatch.allocator import allocator_info

    return {"_C": c_info, "cpu": cpu, "cuda": cuda, "cpu_allocator": allocator_info()}
