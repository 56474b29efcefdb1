"""Fused per-model Adam and AdamW."""

from __future__ import annotations

from typing import Any, ClassVar

from modelbatch.core import ModelBatch
from modelbatch.ops import adam as adam_op
from modelbatch.optim._base import FusedOptimizer

HParam = Any  # a scalar, a length-N sequence or a 1-D tensor


class Adam(FusedOptimizer):
    """Adam for every model of a ModelBatch, one fused kernel per (device, dtype).

    Each hyper-parameter is a scalar (all models) or N values (one per model);
    ``betas`` is a pair ``(beta1, beta2)`` whose members are scalars or N values.
    Model i follows ``torch.optim.Adam`` with its own values exactly.
    ``param_groups[i]`` is model i's group: schedulers from ``torch.optim.lr_scheduler``
    drive each model's ``"lr"`` (and ``"betas"``) unchanged.
    """

    _hparams: ClassVar[dict[str, tuple[str, ...]]] = {
        "lr": ("lr",),
        "betas": ("beta1", "beta2"),
        "eps": ("eps",),
        "weight_decay": ("weight_decay",),
        "amsgrad": ("amsgrad",),
    }
    _flags: ClassVar[tuple[str, ...]] = ("amsgrad",)
    _decoupled = False

    def __init__(
        self,
        batch: ModelBatch,
        lr: HParam = 1e-3,
        betas: tuple[HParam, HParam] = (0.9, 0.999),
        eps: HParam = 1e-8,
        weight_decay: HParam = 0.0,
        amsgrad: HParam = False,
    ) -> None:
        super().__init__(
            batch,
            {
                "lr": lr,
                "betas": betas,
                "eps": eps,
                "weight_decay": weight_decay,
                "amsgrad": amsgrad,
            },
        )

    def _validate_model(self, i: int) -> None:
        v = self._vec
        if not v["lr"][i] >= 0.0:
            raise ValueError(f"Invalid learning rate for model {i}: {v['lr'][i]}")
        if not v["eps"][i] >= 0.0:
            raise ValueError(f"Invalid epsilon value for model {i}: {v['eps'][i]}")
        for k in ("beta1", "beta2"):
            if not 0.0 <= v[k][i] < 1.0:
                raise ValueError(f"Invalid {k} for model {i}: {v[k][i]}")
        if not v["weight_decay"][i] >= 0.0:
            raise ValueError(f"Invalid weight_decay value for model {i}: {v['weight_decay'][i]}")

    def _extra_state(self) -> bool:
        return bool(self._vec["amsgrad"].any())

    def _state_lists(self, idx, extra):
        keys = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if extra else ())
        lists = [[self._state_of(k, key) for k in idx] for key in keys]
        return lists if extra else [*lists, []]

    def _kernel(self, params, grads, states, steps, hp, inv_scale, found_inf) -> None:
        exp_avg, exp_avg_sq, max_exp_avg_sq = states
        adam_op.adam_step(
            params,
            grads,
            exp_avg,
            exp_avg_sq,
            max_exp_avg_sq,
            steps,
            hp("lr"),
            hp("beta1"),
            hp("beta2"),
            hp("eps"),
            hp("weight_decay"),
            hp("amsgrad"),
            self._decoupled,
            inv_scale,
            found_inf,
        )


class AdamW(Adam):
    """AdamW (decoupled weight decay, default 1e-2) for every model of a ModelBatch;
    see :class:`Adam`. Model i follows ``torch.optim.AdamW`` with its own values."""

    _decoupled = True

    def __init__(
        self,
        batch: ModelBatch,
        lr: HParam = 1e-3,
        betas: tuple[HParam, HParam] = (0.9, 0.999),
        eps: HParam = 1e-8,
        weight_decay: HParam = 1e-2,
        amsgrad: HParam = False,
    ) -> None:
        super().__init__(batch, lr, betas, eps, weight_decay, amsgrad)


__all__ = ["Adam", "AdamW"]
