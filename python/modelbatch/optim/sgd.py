"""Fused per-model SGD."""

from __future__ import annotations

from typing import Any, ClassVar

from modelbatch.core import ModelBatch
from modelbatch.ops import sgd as sgd_op
from modelbatch.optim._base import FusedOptimizer

HParam = Any  # a scalar, a length-N sequence or a 1-D tensor


class SGD(FusedOptimizer):
    """SGD (momentum, dampening, nesterov, weight decay) for every model of a
    ModelBatch, one fused kernel per (device, dtype).

    Each hyper-parameter is a scalar (all models) or N values (one per model).
    Model i follows ``torch.optim.SGD`` with its own values exactly; its momentum
    buffer starts as its first gradient.
    """

    _hparams: ClassVar[dict[str, tuple[str, ...]]] = {
        "lr": ("lr",),
        "momentum": ("momentum",),
        "dampening": ("dampening",),
        "weight_decay": ("weight_decay",),
        "nesterov": ("nesterov",),
    }
    _flags: ClassVar[tuple[str, ...]] = ("nesterov",)

    def __init__(
        self,
        batch: ModelBatch,
        lr: HParam = 1e-3,
        momentum: HParam = 0.0,
        dampening: HParam = 0.0,
        weight_decay: HParam = 0.0,
        nesterov: HParam = False,
    ) -> None:
        super().__init__(
            batch,
            {
                "lr": lr,
                "momentum": momentum,
                "dampening": dampening,
                "weight_decay": weight_decay,
                "nesterov": nesterov,
            },
        )

    def _validate_model(self, i: int) -> None:
        v = self._vec
        if not v["lr"][i] >= 0.0:
            raise ValueError(f"Invalid learning rate for model {i}: {v['lr'][i]}")
        if not v["momentum"][i] >= 0.0:
            raise ValueError(f"Invalid momentum value for model {i}: {v['momentum'][i]}")
        if not v["weight_decay"][i] >= 0.0:
            raise ValueError(f"Invalid weight_decay value for model {i}: {v['weight_decay'][i]}")
        if v["nesterov"][i] and (v["momentum"][i] <= 0 or v["dampening"][i] != 0):
            raise ValueError(
                f"Nesterov momentum requires a momentum and zero dampening (model {i})"
            )

    def _extra_state(self) -> bool:
        return bool(self._vec["momentum"].any())

    def _state_lists(self, idx, extra):
        return [[self._state_of(k, "momentum_buffer") for k in idx] if extra else []]

    def _kernel(self, params, grads, states, steps, hp, inv_scale, found_inf) -> None:
        sgd_op.sgd_step(
            params,
            grads,
            states[0],
            steps,
            hp("lr"),
            hp("momentum"),
            hp("dampening"),
            hp("weight_decay"),
            hp("nesterov"),
            inv_scale,
            found_inf,
        )
