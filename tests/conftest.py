"""Test setup shared by all test files.

* Without a CUDA device the Triton kernels run in Triton's interpreter on CPU
  tensors. ``TRITON_INTERPRET`` is read when a kernel is decorated, so it is
  set here, at import time, before any test imports ``modelbatch.kernels``.
* The CPU tests check the C++ kernels of ``modelbatch._C``. Were it not loaded,
  the ops would silently run the pure-torch references and every CPU test
  would compare the reference with itself, so the session stops instead.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import modelbatch  # after TRITON_INTERPRET is set


def pytest_sessionstart(session):
    if not modelbatch.c_extension_loaded():
        pytest.exit(
            "modelbatch._C (the C++ CPU kernels) is not loaded, so the tests would only "
            f"compare the pure-torch reference with itself: {modelbatch.backend_info()['_C']}. "
            "Rebuild it with `pip install --no-build-isolation -e .` against the installed torch.",
            returncode=1,
        )


@pytest.fixture
def triton_device() -> str:
    """Where the Triton kernels run: "cpu" under the interpreter, else "cuda"."""
    from modelbatch.kernels import adam

    if adam._interpreting(adam._adam_kernel):
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip("no CUDA device and TRITON_INTERPRET is off: the Triton kernels cannot run")
