"""Per-model optimizer configuration (the seed API): ``OptimizerFactory`` and the
``create_*_configs`` helpers.

``create_optimizer`` returns the fused per-model optimizer for SGD, Adam and AdamW
(``torch.optim`` or ``modelbatch.optim`` classes) and, for any other
``torch.optim`` class, a :class:`PerModelOptimizer`: the torch optimizer itself,
with one parameter group per model (slower: it loops over models).
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Sequence
from typing import Any

import torch

from modelbatch import optim
from modelbatch.core import ModelBatch, model_indices
from modelbatch.optim._base import check_selected_batch

_FUSED: dict[type, type] = {
    torch.optim.SGD: optim.SGD,
    torch.optim.Adam: optim.Adam,
    torch.optim.AdamW: optim.AdamW,
    optim.SGD: optim.SGD,
    optim.Adam: optim.Adam,
    optim.AdamW: optim.AdamW,
}
# torch.optim options that select an implementation, not the arithmetic.
_IMPL_KEYS = {"foreach", "fused", "capturable", "differentiable"}


class PerModelOptimizer(torch.optim.Optimizer):
    """Any ``torch.optim`` optimizer over a ModelBatch, one parameter group per model.

    Group i holds leaf views of model i's slices of the stacked parameters; before
    each step their ``.grad`` are pointed at the matching slices of the stacked
    grads, so the wrapped optimizer updates the stacked storage in place. This loops
    over models in Python: prefer the fused optimizers where they apply.
    """

    def __init__(self, batch: ModelBatch, optimizer_cls: type, configs: Sequence[dict]) -> None:
        self.batch = batch
        self._stacked = [p for p in batch.parameters() if p.requires_grad]
        self._views: list[list[torch.Tensor]] = []
        for i in range(batch.num_models):
            views = []
            for p in self._stacked:
                v = p.detach()[i]
                v.requires_grad_(True)
                views.append(v)
            self._views.append(views)
        groups = [{"params": self._views[i], **cfg} for i, cfg in enumerate(configs)]
        self.inner = optimizer_cls(groups)
        self._share()

    def _share(self) -> None:
        # Share the inner optimizer's structures so schedulers see its groups (again
        # after a load_state_dict, which replaces its groups and state).
        self.defaults = self.inner.defaults
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state
        self._optimizer_step_pre_hooks = self.inner._optimizer_step_pre_hooks
        self._optimizer_step_post_hooks = self.inner._optimizer_step_post_hooks
        self._optimizer_state_dict_pre_hooks = self.inner._optimizer_state_dict_pre_hooks
        self._optimizer_state_dict_post_hooks = self.inner._optimizer_state_dict_post_hooks
        self._optimizer_load_state_dict_pre_hooks = self.inner._optimizer_load_state_dict_pre_hooks
        self._optimizer_load_state_dict_post_hooks = (
            self.inner._optimizer_load_state_dict_post_hooks
        )

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.batch.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure=None, *, skip=None):  # type: ignore[override]
        """Step every model; those with ``skip[i]`` true (``[N]`` bools, from
        :class:`modelbatch.amp.GradScaler`) are left out: their grads are hidden
        from the wrapped optimizer, which then leaves their state untouched."""
        n = len(self._views)
        if skip is not None:
            skip = torch.as_tensor(skip, device="cpu").bool()
            if skip.shape != (n,):
                raise ValueError(f"skip must be [N={n}] bools, got shape {tuple(skip.shape)}")
            skip = skip.tolist()
        for k, p in enumerate(self._stacked):
            g = p.grad
            for i, views in enumerate(self._views):
                views[k].grad = None if g is None or (skip and skip[i]) else g[i]
        return self.inner.step(closure)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)
        self._share()

    def select(
        self, indices: Sequence[int] | torch.Tensor, *, batch: ModelBatch
    ) -> PerModelOptimizer:
        """A new PerModelOptimizer (the same ``torch.optim`` class) over ``batch``
        holding models ``indices``.

        ``batch`` is the ModelBatch of the selected models, ``k = len(indices)`` of
        them (``old_batch.select(indices)``; see :func:`modelbatch.population.select`).
        Group j and the inner optimizer's state of group j's parameters (copies) are
        group ``indices[j]``'s here, so model j continues exactly as model
        ``indices[j]`` would have. This optimizer is left unchanged.
        """
        where = "PerModelOptimizer.select"
        rows = model_indices(indices, len(self._views), where)
        check_selected_batch(where, batch, len(rows), self._stacked)
        # Through the inner optimizer's own state_dict machinery: torch's load then
        # puts each state tensor where its parameter lives, as after a checkpoint.
        saved = self.inner.state_dict()
        n_params = len(self._stacked)
        groups, state = [], {}
        for j, i in enumerate(rows):
            group = copy.deepcopy(saved["param_groups"][i])
            ids = list(range(j * n_params, (j + 1) * n_params))
            for old, new in zip(group["params"], ids):
                if old in saved["state"]:
                    # Cloned: torch's load keeps tensors that already fit as they are.
                    state[new] = {
                        key: v.clone() if torch.is_tensor(v) else copy.deepcopy(v)
                        for key, v in saved["state"][old].items()
                    }
            group["params"] = ids
            groups.append(group)
        configs = [{k: v for k, v in g.items() if k != "params"} for g in groups]
        new_opt = PerModelOptimizer(batch, type(self.inner), configs)
        new_opt.load_state_dict({"state": state, "param_groups": groups})
        return new_opt

    def __repr__(self) -> str:
        return f"PerModelOptimizer({type(self.inner).__name__}, num_models={len(self._views)})"


class OptimizerFactory:
    """Builds per-model optimizers and schedulers from per-model config dicts.

    Args:
        optimizer_cls: e.g. ``torch.optim.Adam`` or ``modelbatch.optim.Adam``.
        base_config: values shared by all models; a model's config overrides them.
    """

    def __init__(self, optimizer_cls: type, base_config: dict[str, Any] | None = None) -> None:
        if not (
            isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)
        ):
            raise ValueError(
                f"optimizer_cls must be a torch.optim.Optimizer class, got {optimizer_cls!r}"
            )
        self.optimizer_cls = optimizer_cls
        self.base_config = dict(base_config or {})

    def _merged(self, batch: ModelBatch, configs: Sequence[dict[str, Any]]) -> list[dict]:
        if not isinstance(batch, ModelBatch):
            raise ValueError(f"create_optimizer takes a ModelBatch, got {type(batch).__name__}")
        if isinstance(configs, dict) or len(configs) != batch.num_models:
            got = "a dict" if isinstance(configs, dict) else f"{len(configs)} configs"
            raise ValueError(f"expected {batch.num_models} configs (one per model), got {got}")
        return [{**self.base_config, **cfg} for cfg in configs]

    def create_optimizer(
        self, batch: ModelBatch, configs: Sequence[dict[str, Any]]
    ) -> torch.optim.Optimizer:
        """One optimizer for all models of ``batch``; ``configs[i]`` is model i's."""
        merged = self._merged(batch, configs)
        fused = _FUSED.get(self.optimizer_cls)
        if fused is None:
            return PerModelOptimizer(batch, self.optimizer_cls, merged)
        accepted = set(inspect.signature(fused.__init__).parameters) - {"self", "batch"}
        keys = set().union(*(cfg.keys() for cfg in merged))
        for key in sorted(keys):
            if key in _IMPL_KEYS:
                continue
            if key not in accepted:
                raise ValueError(
                    f"{self.optimizer_cls.__name__} config key {key!r} is not supported by the "
                    f"fused {fused.__name__} (accepted: {sorted(accepted)})"
                )
            missing = [i for i, cfg in enumerate(merged) if key not in cfg]
            if missing:
                raise ValueError(
                    f"config key {key!r} is missing for models {missing[:10]}; "
                    "give it to every model or put it in base_config"
                )
        kwargs: dict[str, Any] = {}
        for key in sorted(keys - _IMPL_KEYS):
            values = [cfg[key] for cfg in merged]
            if key == "betas":
                for i, b in enumerate(values):
                    if not isinstance(b, Sequence) or len(b) != 2:
                        raise ValueError(f"betas of model {i} must be a pair, got {b!r}")
                kwargs[key] = ([b[0] for b in values], [b[1] for b in values])
            else:
                kwargs[key] = values
        return fused(batch, **kwargs)

    def create_lr_scheduler(
        self,
        optimizer: torch.optim.Optimizer,
        scheduler_cls: type,
        configs: dict[str, Any] | Sequence[dict[str, Any]],
    ):
        """A scheduler driving every model's learning rate.

        ``configs`` is one dict (the same schedule for all models) or one dict per
        model. Per-model values that the scheduler accepts as per-group lists
        (``lr_lambda``, ``max_lr``, ``base_lr``, ...) go to one scheduler; otherwise
        one scheduler per model is built and they step together.
        """
        groups = optimizer.param_groups
        if isinstance(configs, dict):
            return scheduler_cls(optimizer, **configs)
        if len(configs) != len(groups):
            raise ValueError(
                f"expected {len(groups)} scheduler configs (one per model), got {len(configs)}"
            )
        keys = set().union(*(c.keys() for c in configs))
        if all(all(c.get(k) == configs[0].get(k) for c in configs) for k in keys):
            return scheduler_cls(optimizer, **configs[0])
        return PerModelScheduler(optimizer, scheduler_cls, configs)


class _GroupView(torch.optim.Optimizer):
    """An optimizer facade exposing one model's group, for a per-model scheduler."""

    def __init__(self, group: dict[str, Any], defaults: dict[str, Any]) -> None:
        self.param_groups = [group]
        self.defaults = defaults
        self.state = {}
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}

    def step(self, closure=None):  # never called: the real optimizer steps
        return None


class PerModelScheduler:
    """N schedulers of one class, each driving one model's group; they step together."""

    def __init__(self, optimizer, scheduler_cls: type, configs: Sequence[dict[str, Any]]) -> None:
        self.optimizer = optimizer
        self._views = [_GroupView(g, optimizer.defaults) for g in optimizer.param_groups]
        self.schedulers = [scheduler_cls(v, **cfg) for v, cfg in zip(self._views, configs)]

    def step(self, *args: Any) -> None:
        # The facades never step; tell their schedulers whether the real one did.
        called = getattr(self.optimizer, "_opt_called", True)
        for v, s in zip(self._views, self.schedulers):
            v._opt_called = called
            s.step(*args)

    def get_last_lr(self) -> list[float]:
        return [s.get_last_lr()[0] for s in self.schedulers]

    def state_dict(self) -> dict[str, Any]:
        return {"schedulers": [s.state_dict() for s in self.schedulers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = state_dict["schedulers"]
        if len(states) != len(self.schedulers):
            raise ValueError(f"expected {len(self.schedulers)} scheduler states, got {len(states)}")
        for s, st in zip(self.schedulers, states):
            s.load_state_dict(st)


def _broadcast(name: str, value: Any, n: int) -> list[Any]:
    if isinstance(value, list | tuple) and not (name == "betas" and _is_pair(value)):
        if len(value) != n:
            raise ValueError(f"{name}: expected a scalar or {n} values, got {len(value)}")
        return list(value)
    return [value] * n


def _is_pair(v: Any) -> bool:
    return isinstance(v, tuple) and len(v) == 2 and all(isinstance(x, int | float) for x in v)


def _configs(n: int, **values: Any) -> list[dict[str, Any]]:
    # Options left at None are omitted, so an OptimizerFactory's base_config (or the
    # optimizer's default) supplies them.
    cols = {k: _broadcast(k, v, n) for k, v in values.items() if v is not None}
    return [{k: cols[k][i] for k in cols} for i in range(n)]


def create_sgd_configs(
    learning_rates: Sequence[float],
    momentum: float | Sequence[float] | None = 0.9,
    weight_decay: float | Sequence[float] | None = None,
    dampening: float | Sequence[float] | None = None,
    nesterov: bool | Sequence[bool] | None = None,
) -> list[dict[str, Any]]:
    """One SGD config per learning rate; other values shared or one per model
    (None: left out, so the base config or the optimizer default applies)."""
    n = len(learning_rates)
    return _configs(
        n,
        lr=list(learning_rates),
        momentum=momentum,
        weight_decay=weight_decay,
        dampening=dampening,
        nesterov=nesterov,
    )


def create_adam_configs(
    learning_rates: Sequence[float],
    betas: tuple[float, float] | Sequence[tuple[float, float]] | None = None,
    weight_decay: float | Sequence[float] | None = None,
    eps: float | Sequence[float] | None = None,
    amsgrad: bool | Sequence[bool] | None = None,
) -> list[dict[str, Any]]:
    """One Adam/AdamW config per learning rate; other values shared or one per model
    (None: left out, so the base config or the optimizer default applies)."""
    n = len(learning_rates)
    return _configs(
        n, lr=list(learning_rates), betas=betas, weight_decay=weight_decay, eps=eps, amsgrad=amsgrad
    )


def create_lr_sweep_configs(
    min_lr: float, max_lr: float, num_models: int, scale: str = "log"
) -> list[dict[str, float]]:
    """``num_models`` configs ``{"lr": ...}`` spaced from min_lr to max_lr
    (``scale="log"`` geometric, ``"linear"`` arithmetic)."""
    if num_models < 1:
        raise ValueError(f"num_models must be at least 1, got {num_models}")
    if not 0 < min_lr <= max_lr:
        raise ValueError(f"need 0 < min_lr <= max_lr, got {min_lr}, {max_lr}")
    if scale not in ("log", "linear"):
        raise ValueError(f"scale must be 'log' or 'linear', got {scale!r}")
    if num_models == 1:
        return [{"lr": float(min_lr)}]
    out = []
    for i in range(num_models):
        f = i / (num_models - 1)
        if scale == "log":
            lr = math.exp(math.log(min_lr) + f * (math.log(max_lr) - math.log(min_lr)))
        else:
            lr = min_lr + f * (max_lr - min_lr)
        out.append({"lr": lr})
    return out
