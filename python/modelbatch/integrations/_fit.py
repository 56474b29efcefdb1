"""What the Optuna and Ray integrations share: :class:`FitTrainer`, the ready-made
``train_fn(batch, configs, callbacks)`` that runs :func:`modelbatch.fit` with
per-model hyper-parameters, and the seeded model build. Imports neither library.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from modelbatch import optim
from modelbatch.callbacks import Callback
from modelbatch.core import ModelBatch
from modelbatch.optimizer import OptimizerFactory
from modelbatch.train import History, fit

Config = dict[str, Any]
TrainFn = Callable[[ModelBatch, list[Config], list[Callback]], Any]


class FitTrainer:
    """A ``train_fn`` that runs :func:`modelbatch.fit` with per-model hyper-parameters.

    ``FitTrainer(train_loader, loss_fn, epochs=...)(batch, configs, callbacks)``
    builds ``optimizer_cls`` over ``batch`` with model i's hyper-parameters taken
    from ``configs[i]`` (the keys the optimizer accepts, e.g. ``lr``,
    ``weight_decay``, ``betas``; the other keys are left to ``build_model``),
    trains all models on the same batches and returns the :class:`History`.

    Args:
        train_loader, val_loader: iterables of ``(inputs, targets)`` as for ``fit``,
            or zero-argument callables returning one (called on every run, so a
            loader built there with a seeded generator shuffles the same way in
            every run, and a worker can load its data itself). Items are moved to
            the ModelBatch's device.
        loss_fn: the loss of one model, e.g. ``F.cross_entropy``.
        epochs: epochs per run.
        optimizer_cls: ``modelbatch.optim.AdamW`` (default), ``SGD``, ``Adam`` or any
            ``torch.optim`` class (see :class:`~modelbatch.OptimizerFactory`).
        base_config: hyper-parameters shared by all models (a config overrides them).
        hparams: the config keys that go to the optimizer (default: every key of a
            config that ``optimizer_cls`` accepts).
        scheduler: ``scheduler(optimizer) -> lr_scheduler`` (optional).
        callbacks: callbacks for every run (before the integration's own).
        **fit_kwargs: more :func:`modelbatch.fit` arguments (``metrics``,
            ``max_grad_norm``, ``autocast``, ...); ``progress`` defaults to False.
    """

    def __init__(
        self,
        train_loader: Iterable | Callable[[], Iterable],
        loss_fn: Callable[..., torch.Tensor],
        *,
        epochs: int,
        val_loader: Iterable | Callable[[], Iterable] | None = None,
        optimizer_cls: type = optim.AdamW,
        base_config: Mapping[str, Any] | None = None,
        hparams: Sequence[str] | None = None,
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        callbacks: Sequence[Callback] | None = None,
        **fit_kwargs: Any,
    ) -> None:
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"FitTrainer: epochs must be an int >= 1, got {epochs!r}")
        if not callable(loss_fn):
            raise ValueError(f"FitTrainer: loss_fn must be callable, got {type(loss_fn).__name__}")
        if not (
            isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)
        ):
            raise ValueError(
                f"FitTrainer: optimizer_cls must be a torch.optim.Optimizer class, "
                f"got {optimizer_cls!r}"
            )
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.loss_fn = loss_fn
        self.epochs = epochs
        self.optimizer_cls = optimizer_cls
        self.base_config = dict(base_config or {})
        self.hparams = None if hparams is None else list(hparams)
        self.scheduler = scheduler
        self.callbacks = list(callbacks or [])
        self.fit_kwargs = {"progress": False, **fit_kwargs}
        accepted = inspect.signature(optimizer_cls.__init__).parameters
        self._accepted = set(accepted) - {"self", "params", "batch"}

    def optimizer_configs(self, configs: Sequence[Config]) -> list[Config]:
        """Model i's optimizer keyword arguments, from ``configs[i]``."""
        out = []
        for i, cfg in enumerate(configs):
            if self.hparams is None:
                out.append({k: v for k, v in cfg.items() if k in self._accepted})
                continue
            missing = [k for k in self.hparams if k not in cfg]
            if missing:
                raise ValueError(f"FitTrainer: config {i} has no hyper-parameter {missing}")
            out.append({k: cfg[k] for k in self.hparams})
        return out

    def __call__(
        self, batch: ModelBatch, configs: Sequence[Config], callbacks: Sequence[Callback] = ()
    ) -> History:
        factory = OptimizerFactory(self.optimizer_cls, self.base_config)
        opt = factory.create_optimizer(batch, self.optimizer_configs(configs))
        device = next(iter(batch.parameters())).device
        val = None if self.val_loader is None else _on_device(_loader(self.val_loader), device)
        return fit(
            batch,
            opt,
            _on_device(_loader(self.train_loader), device),
            self.loss_fn,
            epochs=self.epochs,
            val_loader=val,
            scheduler=None if self.scheduler is None else self.scheduler(opt),
            callbacks=[*self.callbacks, *callbacks],
            **self.fit_kwargs,
        )


def _loader(loader: Any) -> Iterable:
    if callable(loader) and not hasattr(loader, "__iter__"):
        return loader()
    return loader


class _OnDevice:
    """A loader whose tensors are moved to ``device`` as they are drawn."""

    def __init__(self, loader: Iterable, device: torch.device) -> None:
        self.loader, self.device = loader, device

    def __iter__(self):
        move = lambda t: t.to(self.device, non_blocking=True) if torch.is_tensor(t) else t
        for item in self.loader:
            yield tree_map(move, item)


class _SizedOnDevice(_OnDevice):
    # Only loaders with a length get one: fit sizes its progress bar with len().
    def __len__(self) -> int:
        return len(self.loader)


def _on_device(loader: Iterable, device: torch.device) -> Iterable:
    return (_SizedOnDevice if hasattr(loader, "__len__") else _OnDevice)(loader, device)


def build_seeded(build_model: Callable[[Config], nn.Module], config: Config, seed: int):
    """``build_model(config)`` after ``torch.manual_seed(seed)``; the caller's CPU
    generator is left as it was (model init must not depend on what ran before)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(config)
    if not isinstance(model, nn.Module):
        raise ValueError(f"build_model must return an nn.Module, got {type(model).__name__}")
    return model


def per_model_tensor(values: Any, n: int, name: str | None = None) -> torch.Tensor:
    """float64 ``[n]`` CPU tensor of one value per model from what a ``train_fn``
    returned (``name``: which of its entries, for the error message)."""
    try:
        t = torch.as_tensor(values, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as err:
        got = type(values).__name__ if name is None else f"{name!r} is {type(values).__name__}"
        raise ValueError(
            f"train_fn must return [N={n}] values, a {{name: [N]}} mapping or a History; got {got}"
        ) from err
    if t.shape != (n,):
        what = "shape" if name is None else f"{name!r} of shape"
        raise ValueError(
            f"train_fn returned {what} {tuple(t.shape)}; expected one value per model [N={n}]"
            if name is None
            else f"train_fn returned {what} {tuple(t.shape)}; expected [N={n}]"
        )
    return t
