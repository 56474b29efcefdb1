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


def check_dtype_device(op: str, x: torch.Tensor, named) -> None:
    """``x`` floating point and every ``(name, tensor)`` of ``named`` (None skipped) of
    its dtype and on its device; raises ValueError naming the first mismatch."""
    for name, t in named:
        if t is not None and t.dtype != x.dtype:
            raise ValueError(f"{op}: {name} is {t.dtype}, x is {x.dtype} (one dtype for all)")
        if t is not None and t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device}, x is on {x.device} (one device)")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{op}: x must be a floating-point tensor, got {x.dtype}")


def store_model_grads(k: int, shared: bool, out, part, need) -> None:
    """Write model ``k``'s ``(grad_x, grad_weight, grad_bias)`` ``part`` into the
    stacked ``out`` where ``need`` says so; the gradient of a shared input is the sum
    over the models (the first model's is copied, the others added)."""
    gx, gw, gb = out
    pgx, pgw, pgb = part
    need_x, need_w, need_b = need
    if need_x:
        if not shared:
            gx[k].copy_(pgx)
        elif k == 0:
            gx.copy_(pgx)
        else:
            gx.add_(pgx)
    if need_w:
        gw[k].copy_(pgw)
    if need_b:
        gb[k].copy_(pgb)
