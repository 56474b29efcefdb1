"""``modelbatch::small_bmm``: many small batched matrix products at once.

``small_bmm(a, b, trans_a, trans_b, bias)`` returns the contiguous ``[N, M, P]``
tensor ``op(a[n]) @ op(b[n]) (+ bias[n])`` for every model ``n``, where ``op``
transposes the last two dims when its flag is set: ``a`` is ``[N, M, K]`` (``[N, K,
M]`` with ``trans_a``), ``b`` is ``[N, K, P]`` (``[N, P, K]`` with ``trans_b``),
``bias`` is ``[N, P]`` (added to every row) or None. Inputs may have any strides,
batch stride 0 included (a shared input ``x.expand(N, M, K)`` is read, never copied).

On the CPU a C++ register-blocked kernel (``csrc/small_bmm.cpp``) runs float32 and
float64 products of the sizes where it beats MKL's ``bmm`` (1.3x to 2.5x on the
layers of small MLPs, about 1.8x at 32 x 32 x 32: benchmarks/bench_small_bmm.py);
other dtypes and sizes fall back to ``torch.bmm`` / ``torch.baddbmm`` inside the op. Elsewhere the
pure-torch :func:`reference` runs. No autograd formula is registered: callers (the
linear op's forward and backward) use it for their GEMMs.

``MODELBATCH_SMALL_BMM_ISA=avx2`` (read per call) limits the CPU kernel to AVX2 on
an AVX-512 machine and ``=none`` sends every call to ``torch.bmm``: for tests and
benchmarks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from modelbatch import _backend
from modelbatch.ops._registry import IMPL


def reference(a: Tensor, b: Tensor, trans_a: bool, trans_b: bool, bias: Tensor | None) -> Tensor:
    """Pure-torch oracle (and non-CPU kernel) of ``small_bmm``."""
    x = a.transpose(1, 2) if trans_a else a
    y = b.transpose(1, 2) if trans_b else b
    if bias is None:
        return torch.bmm(x, y).contiguous()
    return torch.baddbmm(bias.unsqueeze(1), x, y).contiguous()


def _fake(a, b, trans_a, trans_b, bias):
    torch._check(a.dim() == 3 and b.dim() == 3, lambda: "small_bmm: a and b must be 3-D")
    m = a.shape[2] if trans_a else a.shape[1]
    p = b.shape[1] if trans_b else b.shape[2]
    return a.new_empty((a.shape[0], m, p))


torch.library.register_fake("modelbatch::small_bmm")(_fake)
IMPL.impl("small_bmm", reference, "CUDA")
if not _backend.c_extension_loaded():
    IMPL.impl("small_bmm", reference, "CPU")


def small_bmm(
    a: Tensor,
    b: Tensor,
    trans_a: bool = False,
    trans_b: bool = False,
    bias: Tensor | None = None,
) -> Tensor:
    """``op(a) @ op(b) (+ bias)`` per model: ``torch.ops.modelbatch.small_bmm``."""
    return torch.ops.modelbatch.small_bmm(a, b, trans_a, trans_b, bias)
