"""The compiled extension must be loaded: CI fails rather than fall back silently."""

from __future__ import annotations

import modelbatch
import torch
from modelbatch.ops._schemas import SCHEMAS


def test_c_extension_loaded():
    info = modelbatch.backend_info()
    assert modelbatch.c_extension_loaded(), info["_C"]
    assert info["cpu"] == "C++ kernels (modelbatch._C)"
    assert "built with torch " + torch.__version__.split("+")[0] in info["_C"]


def test_python_schemas_match_cpp():
    for name, schema in SCHEMAS.items():
        cpp = str(getattr(torch.ops.modelbatch, name).default._schema)
        assert cpp == "modelbatch::" + schema, (name, cpp)


def test_cpu_kernels_registered_in_cpp():
    for name in ("adam_step", "sgd_step"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"modelbatch::{name}", "CPU")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"modelbatch::{name}", "CUDA")
