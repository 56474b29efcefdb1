"""Registration helpers shared by the op modules."""

from __future__ import annotations

from collections.abc import Callable

import torch

from modelbatch import _backend

IMPL = torch.library.Library("modelbatch", "IMPL")


def register(name: str, reference: Callable, cuda: Callable) -> None:
    """Register the fake, CUDA and (when ``_C`` is missing) CPU kernels of ``name``."""
    torch.library.register_fake(f"modelbatch::{name}")(lambda *args, **kwargs: None)
    IMPL.impl(name, cuda, "CUDA")
    if not _backend.c_extension_loaded():
        IMPL.impl(name, reference, "CPU")


def model_view(v: torch.Tensor, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A per-model vector ``[N]`` shaped ``[N, 1, ...]`` to broadcast over ``like``."""
    return v.to(device=like.device, dtype=dtype).view((-1,) + (1,) * (like.dim() - 1))


def opmath(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels compute in: float32 for half types, the dtype otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def unscale_grads(grads: list[torch.Tensor], inv_scale: torch.Tensor) -> None:
    """``g = dtype(opmath(g) * inv_scale[i])`` in place for model i's slice of every
    grad: the unscaling of ``torch._amp_foreach_non_finite_check_and_unscale_``."""
    for g in grads:
        dt = opmath(g.dtype)
        g.copy_(g.to(dt) * model_view(inv_scale, g, torch.float32).to(dt))


def keep_mask(found_inf: torch.Tensor | None, steps: torch.Tensor) -> torch.Tensor:
    """``[N]`` bool on ``steps``' device: the models that step (``found_inf == 0``)."""
    if found_inf is None:
        return torch.ones(steps.shape, dtype=torch.bool, device=steps.device)
    return found_inf.to(steps.device) == 0
