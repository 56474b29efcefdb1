"""``modelbatch::amp_unscale_``: per-model non-finite check and unscaling of the
stacked gradients of N models, for :class:`modelbatch.amp.GradScaler`.

``amp_unscale_(grads, found_inf, inv_scale, write=True)``: ``grads`` are
contiguous ``[N, ...]`` stacks of one dtype (float32, float16, bfloat16 or
float64) on one device; ``found_inf`` (float32 ``[N]``, updated in place) and
``inv_scale`` (float32 ``[N]``) are on that device. For model i:

* if any element of model i's slices of ``grads`` is inf or NaN,
  ``found_inf[i] = 1`` (it is never reset to 0: calls over several lists of
  grads accumulate, as torch's ``found_inf`` does);
* if ``write``, every element becomes ``dtype(opmath(g) * inv_scale[i])``, the
  arithmetic of ``torch._amp_foreach_non_finite_check_and_unscale_``. With
  ``write=False`` the grads are only checked (the fused optimizer step then
  unscales them, see :mod:`modelbatch.ops.adam`).

Nothing is read back to the host: the per-model skip decisions stay on the
device. Kernels: C++ on CPU (``csrc/amp.cpp``), Triton on CUDA
(``kernels/amp.py``), and :func:`reference` here.
"""

from __future__ import annotations

import torch

from modelbatch.ops._registry import register, unscale_grads

Tensors = list[torch.Tensor]


def reference(
    grads: Tensors, found_inf: torch.Tensor, inv_scale: torch.Tensor, write: bool = True
) -> None:
    """Pure-torch per-model non-finite check (and unscale when ``write``)."""
    for g in grads:
        if g.numel() == 0:
            continue
        n = g.shape[0]
        bad = (~torch.isfinite(g.reshape(n, -1))).any(dim=1)
        found_inf.copy_(torch.where(bad.to(found_inf.device), 1.0, found_inf))
    if write:
        unscale_grads(grads, inv_scale)


def _cuda(*args) -> None:
    from modelbatch.kernels import amp as triton_amp

    triton_amp.amp_unscale_(*args)


register("amp_unscale_", reference, _cuda)


def amp_unscale_(
    grads: Tensors, found_inf: torch.Tensor, inv_scale: torch.Tensor, write: bool = True
) -> None:
    """Dispatch to the kernel for the tensors' device (see module docstring)."""
    torch.ops.modelbatch.amp_unscale_(grads, found_inf, inv_scale, write)
