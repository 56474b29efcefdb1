"""Triton kernel of ``modelbatch::amp_unscale_``: per-model non-finite check and
unscaling of the stacked gradients of N models (for the mixed-precision
``GradScaler``).

Shapes. ``grads`` are contiguous ``[N, ...]`` stacks: model ``i`` owns the
elements ``[i * per_model, (i + 1) * per_model)`` of each tensor. All share one
dtype (float32, float16, bfloat16 or float64) and one device. ``found_inf``
(updated in place) and ``inv_scale`` are contiguous float32 ``[N]`` vectors on
that device.

Semantics (those of ``modelbatch.ops.amp.reference`` and ``csrc/amp.cpp``, that
is of ``torch._amp_foreach_non_finite_check_and_unscale_``, per model):

* if any element of model i's slices is inf or NaN, ``found_inf[i] = 1``. It is
  never reset to 0, so calls over several lists of grads accumulate;
* if ``write``, every element becomes ``dtype(opmath(g) * inv_scale[i])``, with
  opmath float32 for float32 / float16 / bfloat16 and float64 for float64
  (rounded to nearest even, bfloat16 too: see ``_to_storage``). With
  ``write=False`` the grads are only checked (the optimizer step then unscales
  them, see ``kernels/adam.py``).

Why it is built this way: the multi-tensor launch of ``kernels/adam.py`` (one
launch for the whole list through a device table of data pointers, grid
``(cdiv(max_numel, BLOCK), num_tensors)``, model of an element
``offset // per_model_numel``). ``inv_scale`` serves directly as the kernel's
per-model scalars table and ``found_inf`` is passed as one more pointer. A block
may span several models: its lanes holding a non-finite value each store 1.0 to
their model's ``found_inf`` (a masked store; concurrent writers all write the
same value, so no atomics are needed). Non-finite means "all exponent bits set",
tested on the bits, which no compiler flag can optimise away. Nothing is read
back to the host, so the call never synchronises and can be captured in a CUDA
graph.

On CUDA this is the op's kernel; on CPU tensors it runs only under
``TRITON_INTERPRET=1`` (how the tests check it without a GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .adam import (
    Tensors,
    _block,
    _check_scaler_vector,
    _check_stacked,
    _interpreting,
    _launch,
    _to_storage,
    check_kernel_device,
)

_NAME = "modelbatch.kernels.amp.amp_unscale_"


@triton.jit
def _amp_unscale_kernel(
    table,  # int64 [2, T]: pointers of grads; numels
    inv_scale,  # float32 [N]
    t0,  # first tensor of this launch
    T,  # number of tensors (row length of table)
    N,  # number of models
    found_inf,  # float32 [N], set to 1.0 for the models with a non-finite grad
    DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr,
    INT64: tl.constexpr,
    BLOCK: tl.constexpr,
    WRITE: tl.constexpr,
):
    t, offs, mask, model = _block(table, 1, t0, T, N, BLOCK, INT64)

    g_ptr = tl.load(table + t).to(tl.pointer_type(DTYPE))
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(COMPUTE)  # exact: inf, NaN kept
    if COMPUTE == tl.float64:
        exp = g.to(tl.int64, bitcast=True) & 0x7FF0000000000000
        bad = exp == 0x7FF0000000000000
    else:
        exp = g.to(tl.int32, bitcast=True) & 0x7F800000
        bad = exp == 0x7F800000
    tl.store(found_inf + model, tl.full([BLOCK], 1.0, tl.float32), mask=mask & bad)
    if WRITE:
        inv = tl.load(inv_scale + model, mask=mask, other=1.0).to(COMPUTE)
        tl.store(g_ptr + offs, _to_storage(g * inv, DTYPE), mask=mask)


def amp_unscale_(
    grads: Tensors, found_inf: torch.Tensor, inv_scale: torch.Tensor, write: bool = True
) -> None:
    """Per-model non-finite check of ``grads`` into ``found_inf`` and, when
    ``write``, in-place unscaling by ``inv_scale``; see the module docstring.
    One launch, no host synchronisation. Raises ValueError, changing nothing, on
    bad input."""
    op = _NAME
    interpreting = _interpreting(_amp_unscale_kernel)
    grads = list(grads)
    if grads and grads[0].dim() >= 1:
        n = grads[0].shape[0]
    elif isinstance(found_inf, torch.Tensor) and found_inf.dim() == 1:
        n = found_inf.shape[0]
    else:
        shape = tuple(found_inf.shape) if isinstance(found_inf, torch.Tensor) else type(found_inf)
        raise ValueError(f"{op}: found_inf must be a float32 [N] per-model tensor, got {shape}")
    _check_stacked(op, grads, n, "grads", interpreting)
    device = grads[0].device if grads else found_inf.device
    _check_scaler_vector(op, found_inf, n, "found_inf", device)
    _check_scaler_vector(op, inv_scale, n, "inv_scale", device)
    check_kernel_device(op, device, interpreting)
    _launch(_amp_unscale_kernel, [grads], inv_scale, n, found_inf, WRITE=bool(write))
