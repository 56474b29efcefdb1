"""A ModelBatch as a ``lightning.LightningModule``: N models under one ``Trainer``.

``ModelBatchModule(batch, loss_fn, optimizer)`` trains the N models of a
:class:`~modelbatch.ModelBatch` with Lightning's automatic optimization and the
fused per-model optimizer (:mod:`modelbatch.optim`), step for step as
:func:`modelbatch.fit` does:

* ``training_step``: loader item ``(inputs, targets)`` (inputs ``[B, ...]``, or
  ``[N, B, ...]`` for ``shared_input=False``) -> outputs ``[N, B, ...]`` -> per-model
  losses ``[N]``; it returns their SUM, whose gradient w.r.t. model i's parameters is
  that of model i's own loss;
* ``configure_gradient_clipping``: per-model clipping
  (:func:`modelbatch.clip_grad_norm_`, ``max_grad_norm`` or the Trainer's
  ``gradient_clip_val``; Lightning's own clipping would see no parameters, since the
  fused optimizer has one empty param group per model), then the per-model
  non-finite check;
* ``optimizer_step``: one fused kernel for all models, with the models whose loss or
  gradients are not finite left out (parameters, optimizer state, step count,
  buffers and random streams untouched), as in ``fit``.

Per epoch it logs through ``self.log`` ``{split}_{metric}_model_{i}`` (e.g.
``train_loss_model_3``, ``val_accuracy_model_0``; ``per_model`` picks which models)
and the population's ``{split}_{metric}_best`` / ``_median`` / ``_worst`` (over the
finite values; higher is better for accuracies), so a Lightning ``ModelCheckpoint``
or ``EarlyStopping`` can monitor ``val_loss_best``. Every epoch's ``[N]`` values are
also kept exactly (float64, the same keys and values as ``fit``'s) in
:attr:`ModelBatchModule.history`, a :class:`modelbatch.History`.

Checkpoints: Lightning saves the module's ``state_dict`` (the stacked ``[N, ...]``
parameters and buffers, the random streams' seeds and offsets), the fused
optimizer's and the scheduler's ``state_dict`` and, under ``"modelbatch"``, the
history; ``Trainer.fit(module, ckpt_path=...)`` resumes exactly. Export model i as a
plain module with :meth:`ModelBatchModule.export_model` (``module.batch.model(i)``).

Limits: one device (all N models live on it); ``precision="16-mixed"`` is refused
(Lightning's ``torch.amp.GradScaler`` has one loss scale for all models and cannot
see the fused optimizer's parameters; ``"bf16-mixed"`` needs no scaler and works);
loader items are ``(inputs, targets)`` pairs (no data routers; use ``fit`` for those).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from modelbatch.integrations import require

L = require("lightning.pytorch", "lightning")

from modelbatch import optim as _optim  # noqa: E402  (after the extra is checked)
from modelbatch.clip import clip_grad_norm_  # noqa: E402
from modelbatch.core import ModelBatch  # noqa: E402
from modelbatch.optim._base import FusedOptimizer  # noqa: E402
from modelbatch.optim._base import per_model as _per_model  # noqa: E402
from modelbatch.train import (  # noqa: E402
    History,
    _Accumulator,
    _as_pair,
    _batch_metrics,
    _device_of,
    _lrs,
    _metric_fns,
    _nonfinite_grads,
    _rows,
    _Snapshot,
)

__all__ = ["ModelBatchModule"]

_OPTIMIZERS: dict[str, type[FusedOptimizer]] = {
    "sgd": _optim.SGD,
    "adam": _optim.Adam,
    "adamw": _optim.AdamW,
}
_INTERVALS = ("epoch", "step")


def _higher_is_better(name: str) -> bool:
    return "acc" in name


def _population_stats(name: str, values: torch.Tensor) -> dict[str, float]:
    """``{name}_best``, ``_median``, ``_worst`` of ``values [N]`` over its finite
    entries (none when no model's value is finite)."""
    v = values.double()
    finite = v[torch.isfinite(v)]
    if not finite.numel():
        return {}
    lo, mid, hi = finite.min().item(), finite.median().item(), finite.max().item()
    best, worst = (hi, lo) if _higher_is_better(name) else (lo, hi)
    return {f"{name}_best": best, f"{name}_median": mid, f"{name}_worst": worst}


class ModelBatchModule(L.LightningModule):
    """Train the N models of ``batch`` with a ``lightning.Trainer``.

    Args:
        batch: the :class:`~modelbatch.ModelBatch` (a submodule: ``module.batch``).
        loss_fn: the loss of ONE model, returning a scalar (e.g. ``F.cross_entropy``).
        optimizer: how to build the fused per-model optimizer in
            ``configure_optimizers``: a name (``"sgd"``, ``"adam"``, ``"adamw"``) with
            its hyper-parameters in ``optimizer_kwargs`` (each a scalar or N values,
            e.g. ``{"lr": torch.logspace(-4, -2, N)}``), a dict ``{"name": "adamw",
            "lr": ..., ...}``, or a callable ``fn(batch) -> modelbatch.optim.*`` over
            this batch.
        optimizer_kwargs: the hyper-parameters for a named optimizer.
        scheduler: ``fn(optimizer) -> torch.optim.lr_scheduler.*`` (None: none); the
            fused optimizer has one param group per model, so every scheduler drives
            each model's learning rate (``ReduceLROnPlateau``, which watches one
            scalar for all, is refused).
        scheduler_interval: step the scheduler every ``"epoch"`` or every ``"step"``.
        metrics: as in :func:`modelbatch.fit`: names of built-ins (``"loss"``,
            ``"accuracy"``) and/or ``{name: fn(outputs [N, B, ...], targets) -> [N] or
            [N, B]}``.
        max_grad_norm: per-model gradient clipping, a scalar or N values (None: the
            Trainer's ``gradient_clip_val``, if any; setting both is an error).
        per_model: log each model's metrics (True), none (False: population figures
            only) or those of the listed model indices.
        skip_nonfinite: leave a model whose loss or gradients are not finite out of
            that optimizer step (as ``fit`` does); False steps every model.
    """

    def __init__(
        self,
        batch: ModelBatch,
        loss_fn: Callable[..., torch.Tensor],
        optimizer: str | Mapping[str, Any] | Callable[[ModelBatch], FusedOptimizer] = "adam",
        *,
        optimizer_kwargs: Mapping[str, Any] | None = None,
        scheduler: Callable[[FusedOptimizer], Any] | None = None,
        scheduler_interval: str = "epoch",
        metrics: Any = ("loss", "accuracy"),
        max_grad_norm: Any = None,
        per_model: bool | Iterable[int] = True,
        skip_nonfinite: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(batch, ModelBatch):
            raise ValueError(f"ModelBatchModule takes a ModelBatch, got {type(batch).__name__}")
        if not callable(loss_fn):
            raise ValueError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        n = batch.num_models
        self.batch = batch
        self.loss_fn = loss_fn
        self._optimizer_spec = self._check_optimizer(optimizer, optimizer_kwargs)
        if scheduler is not None and not callable(scheduler):
            raise ValueError(
                "scheduler must be a callable fn(optimizer) -> lr scheduler, got "
                f"{type(scheduler).__name__}"
            )
        if scheduler_interval not in _INTERVALS:
            raise ValueError(
                f"scheduler_interval must be one of {_INTERVALS}, got {scheduler_interval!r}"
            )
        self.scheduler_fn = scheduler
        self.scheduler_interval = scheduler_interval
        self.metric_fns = _metric_fns(metrics)
        self.max_grad_norm = None
        if max_grad_norm is not None:
            limits = _per_model("max_grad_norm", max_grad_norm, n)
            if not (limits > 0).all():
                raise ValueError(f"max_grad_norm must be > 0 for every model, got {max_grad_norm}")
            self.max_grad_norm = max_grad_norm
        self.per_model_indices = self._check_per_model(per_model, n)
        self.skip_nonfinite = bool(skip_nonfinite)
        self.history = History(n)
        self.val_logs: dict[str, torch.Tensor] = {}
        self._train_acc: _Accumulator | None = None
        self._val_acc: _Accumulator | None = None
        self._skipped: torch.Tensor | None = None
        self._found_inf: torch.Tensor | None = None
        self._bad: torch.Tensor | None = None
        self._snap: _Snapshot | None = None
        self._pending: tuple | None = None
        self._step_skip: torch.Tensor | None = None
        self._epoch_val: dict[str, torch.Tensor] | None = None
        self._saved_latest: torch.Tensor | None = None
        self._epoch_lr: torch.Tensor | None = None

    # ------------------------------------------------------------ construction
    @staticmethod
    def _check_optimizer(optimizer: Any, kwargs: Mapping[str, Any] | None):
        if callable(optimizer) and not isinstance(optimizer, str | Mapping):
            if kwargs:
                raise ValueError(
                    "optimizer_kwargs go with an optimizer name; a callable optimizer "
                    "sets its own hyper-parameters"
                )
            return optimizer
        if isinstance(optimizer, Mapping):
            if kwargs:
                raise ValueError(
                    "pass the hyper-parameters in the optimizer dict or in optimizer_kwargs, "
                    "not both"
                )
            if "name" not in optimizer:
                raise ValueError(
                    f"an optimizer dict needs a 'name' (one of {sorted(_OPTIMIZERS)}), got "
                    f"keys {sorted(optimizer)}"
                )
            kwargs = {k: v for k, v in optimizer.items() if k != "name"}
            optimizer = optimizer["name"]
        if not isinstance(optimizer, str):
            raise ValueError(
                "optimizer must be a name, a dict with a 'name' or a callable "
                f"fn(batch) -> modelbatch.optim.*; got {type(optimizer).__name__}"
            )
        cls = _OPTIMIZERS.get(optimizer.lower())
        if cls is None:
            raise ValueError(
                f"unknown optimizer {optimizer!r}: choose one of {sorted(_OPTIMIZERS)}"
            )
        return cls, dict(kwargs or {})

    @staticmethod
    def _check_per_model(per_model: Any, n: int) -> list[int]:
        if per_model is True:
            return list(range(n))
        if per_model is False or per_model is None:
            return []
        try:
            idx = [int(i) for i in per_model]
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"per_model must be a bool or model indices, got {per_model!r}"
            ) from err
        bad = [i for i in idx if not 0 <= i < n]
        if bad:
            raise ValueError(f"per_model: indices {bad} out of range for {n} models")
        return idx

    def configure_optimizers(self):
        spec = self._optimizer_spec
        if isinstance(spec, tuple):
            cls, kwargs = spec
            try:
                opt = cls(self.batch, **kwargs)
            except TypeError as err:
                raise ValueError(f"{cls.__name__}: bad optimizer_kwargs {kwargs}: {err}") from err
        else:
            opt = spec(self.batch)
        if not isinstance(opt, FusedOptimizer):
            raise ValueError(
                "the optimizer must be a modelbatch fused optimizer (modelbatch.optim.SGD, "
                f"Adam, AdamW), got {type(opt).__name__}"
            )
        if opt.batch is not self.batch:
            raise ValueError("the optimizer was built over another ModelBatch than module.batch")
        if self.scheduler_fn is None:
            return opt
        sched = self.scheduler_fn(opt)
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            raise ValueError(
                "ReduceLROnPlateau watches one scalar for all models; use a per-model "
                "schedule (any other torch.optim.lr_scheduler) instead"
            )
        if getattr(sched, "optimizer", None) is not opt:
            raise ValueError("the scheduler must be built over the optimizer it is given")
        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": sched, "interval": self.scheduler_interval},
        }

    def setup(self, stage: str) -> None:
        trainer = self.trainer
        if stage == "fit" and str(trainer.precision) in ("16", "16-mixed"):
            raise ValueError(
                f"ModelBatchModule cannot train with precision={trainer.precision!r}: "
                "Lightning's GradScaler has one loss scale for all models; use "
                "'bf16-mixed', or modelbatch.fit with modelbatch.amp.GradScaler"
            )
        if (
            stage == "fit"
            and self.max_grad_norm is not None
            and trainer.gradient_clip_val is not None
        ):
            raise ValueError(
                "set max_grad_norm on the ModelBatchModule or gradient_clip_val on the "
                "Trainer, not both"
            )

    # ------------------------------------------------------------------- steps
    def forward(self, inputs: Any) -> Any:
        """``inputs [B, ...]`` (or ``[N, B, ...]``) -> outputs ``[N, B, ...]``."""
        return self.batch(inputs)

    def _losses(self, item: Any) -> tuple[Any, Any, torch.Tensor]:
        inputs, targets, ids = _as_pair(item)
        if ids is not None:
            raise ValueError(
                "ModelBatchModule takes loader items (inputs, targets); for routed "
                "(inputs, targets, ids) batches use modelbatch.fit with a router"
            )
        outputs = self.batch(inputs)
        losses = self.batch.compute_loss(outputs, targets, self.loss_fn, reduction="none")
        return outputs, targets, losses

    def training_step(self, item: Any, batch_idx: int) -> torch.Tensor:
        n = self.batch.num_models
        if self._snap is None:  # the first micro-batch of an optimizer step
            # What the forward changes outside the optimizer (buffers, random
            # streams), to put back for a model that sits this step out.
            self._snap = _Snapshot(self.batch) if self.skip_nonfinite else None
            self._bad = torch.zeros(n, dtype=torch.bool, device=_device_of(self.batch))
        outputs, targets, losses = self._losses(item)
        self._bad |= ~torch.isfinite(losses.detach())
        with torch.no_grad():
            extra = _batch_metrics(self.batch, outputs, targets, None, self.metric_fns)
        counts = _rows(targets, None, n, self._bad.device)
        self._pending = (losses.detach(), extra, counts)
        return losses.sum()

    def configure_gradient_clipping(
        self,
        optimizer: Any,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip each model's gradients on its own, then flag the models whose loss or
        gradients are not finite (they skip this step); runs between backward and the
        fused kernel."""
        norms = None
        if self.max_grad_norm is not None:
            norms = clip_grad_norm_(self.batch, self.max_grad_norm)
        elif gradient_clip_val is not None and gradient_clip_val > 0:
            if str(gradient_clip_algorithm or "norm") == "value":
                # Element-wise, so already per model.
                torch.nn.utils.clip_grad_value_(self.batch.parameters(), gradient_clip_val)
            else:
                norms = clip_grad_norm_(self.batch, gradient_clip_val)
        if not self.skip_nonfinite or self._found_inf is None:
            return
        bad = self._bad if self._bad is not None else torch.zeros_like(self._found_inf).bool()
        if norms is not None:  # a non-finite gradient makes its model's norm so
            bad = bad | ~torch.isfinite(norms)
        else:
            bad = _nonfinite_grads(self.batch, bad.float())
        # The fused step reads this buffer when its kernel runs, after this hook.
        self._found_inf.copy_(bad.to(self._found_inf))

    def optimizer_step(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: Any,
        optimizer_closure: Callable[[], Any] | None = None,
    ) -> None:
        if not self.skip_nonfinite:
            optimizer.step(closure=optimizer_closure)
            self._step_skip = None
            self._snap = None
            return
        n = self.batch.num_models
        if self._found_inf is None:
            self._found_inf = torch.zeros(n, dtype=torch.float32, device=_device_of(self.batch))
        self._found_inf.zero_()
        # The closure (training_step, backward, then configure_gradient_clipping)
        # runs inside step and fills _found_inf before the kernel launches.
        optimizer.step(closure=optimizer_closure, found_inf=self._found_inf)
        skip = self._found_inf != 0
        if self._snap is not None:
            self._snap.restore(skip)
        self._snap = None
        self._step_skip = skip

    def lr_scheduler_step(self, scheduler: Any, metric: Any = None) -> None:
        if self.scheduler_interval == "epoch":
            # Lightning steps epoch schedulers after the last batch, before this
            # epoch's validation and on_train_epoch_end; the epoch's logs keep the
            # rates it trained with, as fit's do.
            self._epoch_lr = _lrs(scheduler.optimizer)
        if metric is None:
            scheduler.step()
        else:
            scheduler.step(metric)

    def on_train_epoch_start(self) -> None:
        n, device = self.batch.num_models, _device_of(self.batch)
        self._train_acc = _Accumulator(n, device)
        self._skipped = torch.zeros(n, dtype=torch.float64, device=device)
        self._epoch_val = None
        self._epoch_lr = None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._pending is None:
            return
        losses, extra, counts = self._pending
        self._pending = None
        skip = self._step_skip
        self._step_skip = None
        if skip is None:
            skip = torch.zeros_like(counts, dtype=torch.bool)
        live = torch.where(skip, 0.0, counts)
        self._train_acc.add("loss", losses, live)
        for name, v in extra.items():
            self._train_acc.add(name, v, live)
        self._skipped += skip.double()
        finite = torch.where(skip | ~torch.isfinite(losses), math.nan, losses.double())
        if bool(torch.isfinite(finite).any()):
            self.log_dict(
                {
                    "train_step_loss_best": finite.nan_to_num(math.inf).min().float(),
                    "train_step_loss_median": finite.nanmedian().float(),
                },
                on_step=True,
                on_epoch=False,
                prog_bar=True,
                batch_size=int(counts[0]),
            )

    def on_train_epoch_end(self) -> None:
        if self._train_acc is None:
            return
        logs = {k: v.cpu() for k, v in self._train_acc.means("train_").items()}
        # Validation at the end of this epoch ran before this hook.
        val = self._epoch_val or {}
        logs.update({k: v.clone() for k, v in val.items()})
        lr = self._epoch_lr
        if lr is None and self.trainer.optimizers:
            lr = _lrs(self.trainer.optimizers[0])
        if lr is not None:
            logs["lr"] = lr
        logs["skipped_steps"] = self._skipped.cpu()
        self.history.append(self.current_epoch, logs)
        self._log_epoch({k: v for k, v in logs.items() if k not in val})
        self._train_acc = None

    # -------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        self._val_acc = _Accumulator(self.batch.num_models, _device_of(self.batch))
        self._saved_latest = self.batch.latest_losses

    def validation_step(self, item: Any, batch_idx: int) -> None:
        outputs, targets, losses = self._losses(item)
        n = self.batch.num_models
        counts = _rows(targets, None, n, self._val_acc.device)
        self._val_acc.add("loss", losses, counts)
        for name, v in _batch_metrics(self.batch, outputs, targets, None, self.metric_fns).items():
            self._val_acc.add(name, v, counts)

    def on_validation_epoch_end(self) -> None:
        # (as evaluate does: validation does not overwrite the training losses)
        self.batch.latest_losses = self._saved_latest
        acc, self._val_acc = self._val_acc, None
        if acc is None or not acc.sums:
            return
        logs = {k: v.cpu() for k, v in acc.means("val_").items()}
        self.val_logs = logs
        if not self.trainer.sanity_checking:
            self._epoch_val = logs
        self._log_epoch(logs)

    def _log_epoch(self, logs: Mapping[str, torch.Tensor]) -> None:
        out: dict[str, float] = {}
        for name, v in logs.items():
            values = v.tolist()
            for i in self.per_model_indices:
                out[f"{name}_model_{i}"] = values[i]
            if name.startswith(("train_", "val_")):
                out.update(_population_stats(name, v))
        if out:
            self.log_dict(out, on_step=False, on_epoch=True)

    # ------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        n = self.batch.num_models
        h = self.history
        checkpoint["modelbatch"] = {
            "num_models": n,
            "history": [(h.rows[k * n]["epoch"], dict(e)) for k, e in enumerate(h._epochs)],
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("modelbatch")
        if saved is None:
            return
        if saved["num_models"] != self.batch.num_models:
            raise ValueError(
                f"the checkpoint holds {saved['num_models']} models, this ModelBatchModule "
                f"has {self.batch.num_models}"
            )
        self.history = History(self.batch.num_models)
        for epoch, logs in saved["history"]:
            self.history.append(epoch, logs)

    # ------------------------------------------------------------------ export
    def export_model(self, i: int) -> torch.nn.Module:
        """Model i as a standalone module of its original class (``batch.model(i)``)."""
        return self.batch.model(i)

    def best_model(self, name: str = "val_loss", mode: str = "min") -> int:
        """The index of the model with the best last-epoch ``name`` in :attr:`history`."""
        return self.history.best_model(name, mode)
