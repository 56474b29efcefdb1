"""Population-based training's exploit step: copy one model slot over another.

``copy_model_(batch, optimizer, src, dst)`` makes model ``dst`` continue exactly
as model ``src`` would: its weights and buffers (BatchNorm statistics included),
its optimizer state (moments, momentum buffers and its own step counter, so
Adam's bias correction stays right) and, with ``hparams=True`` (the default),
its hyper-parameters (learning rate, betas, weight decay, ...; the "explore"
step then perturbs them through ``optimizer.param_groups[dst]``). ``dst`` keeps
its own random stream (its dropout masks stay independent of ``src``'s).

``select(batch, optimizer, indices, scaler=None)`` keeps a living population
small: it returns a new, smaller ModelBatch of the models ``indices`` with their
optimizer (and loss scaler), so finished or dead models stop costing compute
while every survivor continues bit for bit as if the others had never been
there (weights, buffers, random stream, optimizer state and step counter,
hyper-parameters, loss scale).

Supported optimizers: modelbatch's fused ``SGD`` / ``Adam`` / ``AdamW`` and
``PerModelOptimizer`` (any other ``torch.optim`` class), or None (weights only).
"""

from __future__ import annotations

import copy

import torch

from modelbatch.core import ModelBatch, model_indices
from modelbatch.optim._base import FusedOptimizer
from modelbatch.optimizer import PerModelOptimizer


def _check_slot(name: str, value, n: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
        raise ValueError(f"{name} must be a model index in [0, {n}), got {value!r}")
    return value


def _check_optimizer(where: str, batch: ModelBatch, optimizer) -> None:
    if optimizer is not None and not isinstance(optimizer, (FusedOptimizer, PerModelOptimizer)):
        raise ValueError(
            f"{where} copies the state of modelbatch.optim.SGD / Adam / AdamW and of "
            f"PerModelOptimizer; got {type(optimizer).__name__}"
        )
    if optimizer is not None and getattr(optimizer, "batch", None) is not batch:
        raise ValueError("the optimizer does not belong to this ModelBatch")


@torch.no_grad()
def copy_model_(batch: ModelBatch, optimizer, src: int, dst: int, *, hparams: bool = True) -> None:
    """Copy model ``src``'s weights, buffers, optimizer state and (``hparams``) its
    hyper-parameters into slot ``dst``, in place. See the module docstring."""
    if not isinstance(batch, ModelBatch):
        raise ValueError(f"copy_model_ takes a ModelBatch, got {type(batch).__name__}")
    n = batch.num_models
    src, dst = _check_slot("src", src, n), _check_slot("dst", dst, n)
    _check_optimizer("copy_model_", batch, optimizer)
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


def select(batch: ModelBatch, optimizer, indices, scaler=None) -> tuple:
    """Keep only the models ``indices`` (distinct, in ``[0, N)``, in the order wanted).

    Args:
        batch: the ModelBatch of N models.
        optimizer: its fused ``SGD`` / ``Adam`` / ``AdamW`` or ``PerModelOptimizer``,
            or None.
        indices: a list, tuple or 1-D integer tensor of ``k`` model indices.
        scaler: its :class:`modelbatch.amp.GradScaler`, or None.

    Returns ``(new_batch, new_optimizer)`` (``new_optimizer`` None without an
    optimizer), or ``(new_batch, new_optimizer, new_scaler)`` when ``scaler`` is
    given: model j of each is model ``indices[j]`` (see :meth:`ModelBatch.select`,
    ``FusedOptimizer.select``, ``PerModelOptimizer.select``, ``GradScaler.select``).
    The originals are left unchanged. Schedulers are not carried: build new ones on
    ``new_optimizer`` (its groups keep ``initial_lr``, so ``last_epoch`` resumes).
    """
    if not isinstance(batch, ModelBatch):
        raise ValueError(f"select takes a ModelBatch, got {type(batch).__name__}")
    _check_optimizer("select", batch, optimizer)
    if scaler is not None and getattr(scaler, "batch", None) is not batch:
        raise ValueError("the scaler does not belong to this ModelBatch")
    # Checked once here, so a bad selection fails before anything is built.
    rows = model_indices(indices, batch.num_models, "select")
    new_batch = batch.select(rows)
    new_opt = None if optimizer is None else optimizer.select(rows, batch=new_batch)
    if scaler is None:
        return new_batch, new_opt
    return new_batch, new_opt, scaler.select(rows, batch=new_batch)
