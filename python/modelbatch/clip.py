"""Per-model gradient clipping."""

from __future__ import annotations

from typing import Any

import torch

from modelbatch.core import ModelBatch
from modelbatch.optim._base import per_model


@torch.no_grad()
def clip_grad_norm_(batch: ModelBatch, max_norm: Any, norm_type: float = 2.0) -> torch.Tensor:
    """Clip each model's gradients by its own total norm, as
    ``torch.nn.utils.clip_grad_norm_`` would clip that model alone.

    Args:
        batch: the ModelBatch whose stacked ``.grad`` are clipped in place.
        max_norm: a scalar or N values (one per model).
        norm_type: the p of the p-norm (``inf`` allowed).

    Returns:
        The ``[N]`` total gradient norms before clipping.
    """
    n = batch.num_models
    grads = [p.grad for p in batch.parameters() if p.grad is not None]
    max_norm = per_model("max_norm", max_norm, n)
    if not grads:
        return torch.zeros(n)
    device = grads[0].device
    norms = torch.stack(
        [torch.linalg.vector_norm(g.reshape(n, -1), norm_type, dim=1) for g in grads], dim=1
    )
    total = torch.linalg.vector_norm(norms, norm_type, dim=1)  # [N]
    limit = torch.from_numpy(max_norm).to(device=device, dtype=total.dtype)
    coef = torch.clamp(limit / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype).view((n,) + (1,) * (g.dim() - 1)))
    return total
