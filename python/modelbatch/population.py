"""Population-based training's exploit step: copy one model slot over another.

``copy_model_(batch, optimizer, src, dst)`` makes model ``dst`` continue exactly
as model ``src`` would: its weights and buffers (BatchNorm statistics included),
its optimizer state (moments, momentum buffers and its own step counter, so
Adam's bias correction stays right) and, with ``hparams=True`` (the default),
its hyper-parameters (learning rate, betas, weight decay, ...; the "explore"
step then perturbs them through ``optimizer.param_groups[dst]``). ``dst`` keeps
its own random stream (its dropout masks stay independent of ``src``'s).

Supported optimizers: modelbatch's fused ``SGD`` / ``Adam`` / ``AdamW`` and
``PerModelOptimizer`` (any other ``torch.optim`` class), or None (weights only).
"""

from __future__ import annotations

import copy

import torch

from modelbatch.core import ModelBatch
from modelbatch.optim._base import FusedOptimizer
from modelbatch.optimizer import PerModelOptimizer


def _check_slot(name: str, value, n: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
        raise ValueError(f"{name} must be a model index in [0, {n}), got {value!r}")
    return value


@torch.no_grad()
def copy_model_(batch: ModelBatch, optimizer, src: int, dst: int, *, hparams: bool = True) -> None:
    """Copy model ``src``'s weights, buffers, optimizer state and (``hparams``) its
    hyper-parameters into slot ``dst``, in place. See the module docstring."""
    if not isinstance(batch, ModelBatch):
        raise ValueError(f"copy_model_ takes a ModelBatch, got {type(batch).__name__}")
    n = batch.num_models
    src, dst = _check_slot("src", src, n), _check_slot("dst", dst, n)
    if optimizer is not None and not isinstance(optimizer, (FusedOptimizer, PerModelOptimizer)):
        raise ValueError(
            "copy_model_ copies the state of modelbatch.optim.SGD / Adam / AdamW and of "
            f"PerModelOptimizer; got {type(optimizer).__name__}"
        )
    if optimizer is not None and getattr(optimizer, "batch", None) is not batch:
        raise ValueError("the optimizer does not belong to this ModelBatch")
    if src == dst:
        return
    for t in (*batch.stacked_params().values(), *batch.stacked_buffers().values()):
        t[dst] = t[src]
    if isinstance(optimizer, FusedOptimizer):
        for state in optimizer.state.values():
            for t in state.values():
                t[dst] = t[src]
        optimizer.steps[dst] = optimizer.steps[src]
    elif isinstance(optimizer, PerModelOptimizer):
        inner = optimizer.inner.state
        for s_view, d_view in zip(optimizer._views[src], optimizer._views[dst]):
            if s_view in inner:
                inner[d_view] = {
                    k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v)
                    for k, v in inner[s_view].items()
                }
            else:
                inner.pop(d_view, None)
    if hparams and optimizer is not None:
        group = optimizer.param_groups[src]
        for key, value in list(group.items()):
            if key != "params":
                optimizer.param_groups[dst][key] = copy.deepcopy(value)
