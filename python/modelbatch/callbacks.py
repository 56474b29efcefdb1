"""Callbacks for :func:`modelbatch.fit`: per-model control, checkpoints and logs.

A :class:`Callback` gets the :class:`~modelbatch.train.FitLoop` at each hook and
acts on single models through it (``loop.freeze``, ``loop.stop``,
``loop.reset_model``). Hooks, in the order they run:

* ``on_fit_start(loop)`` / ``on_epoch_start(loop)``
* ``on_loss(loop, losses)``: the per-model losses ``[N]`` of a batch, before backward
* ``on_nonfinite(loop, bad)``: bool ``[N]`` on the device, the models whose loss
  or grads are not finite this step (their step is skipped whatever a callback
  does); called every step, with no host synchronisation unless a callback reads it
* ``on_step_end(loop, losses, skipped)``
* ``on_epoch_end(loop, logs)``: ``logs`` maps names (``train_loss``, ``val_loss``,
  ``val_accuracy``, ``lr``, ...) to ``[N]`` float64 CPU tensors
* ``on_fit_end(loop)``

Provided: :class:`NaNCallback`, :class:`EarlyStopping`, :class:`ModelCheckpoint`,
:class:`CSVLogger`, :class:`TensorBoardLogger`; :class:`CallbackPack` runs several.
"""

from __future__ import annotations

import csv
import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch

__all__ = [
    "CSVLogger",
    "Callback",
    "CallbackPack",
    "EarlyStopping",
    "ModelCheckpoint",
    "NaNCallback",
    "TensorBoardLogger",
]

_HOOKS = (
    "on_fit_start",
    "on_epoch_start",
    "on_loss",
    "on_nonfinite",
    "on_step_end",
    "on_epoch_end",
    "on_fit_end",
)


class Callback:
    """Base class: override the hooks you need (see the module docstring)."""

    def on_fit_start(self, loop) -> None:
        pass

    def on_epoch_start(self, loop) -> None:
        pass

    def on_loss(self, loop, losses: torch.Tensor) -> None:
        pass

    def on_nonfinite(self, loop, bad: torch.Tensor) -> None:
        pass

    def on_step_end(self, loop, losses: torch.Tensor, skipped: torch.Tensor) -> None:
        pass

    def on_epoch_end(self, loop, logs: Mapping[str, torch.Tensor]) -> None:
        pass

    def on_fit_end(self, loop) -> None:
        pass


class CallbackPack(Callback):
    """Several callbacks run in order (the seed API's name)."""

    def __init__(self, callbacks: Callback | Iterable[Callback] | None = None) -> None:
        if callbacks is None:
            callbacks = []
        elif isinstance(callbacks, Callback):
            callbacks = [callbacks]
        self.callbacks = list(callbacks)
        for c in self.callbacks:
            if not isinstance(c, Callback):
                raise ValueError(
                    f"callbacks must be modelbatch.callbacks.Callback instances, got "
                    f"{type(c).__name__}"
                )

    def append(self, callback: Callback) -> None:
        self.callbacks.append(callback)

    def __iter__(self):
        return iter(self.callbacks)

    def __len__(self) -> int:
        return len(self.callbacks)


def _dispatch(name: str):
    def run(self, *args):
        for c in self.callbacks:
            getattr(c, name)(*args)

    run.__name__ = name
    return run


for _name in _HOOKS:
    setattr(CallbackPack, _name, _dispatch(_name))


def _better(mode: str, value: torch.Tensor, best: torch.Tensor, min_delta: float) -> torch.Tensor:
    if mode == "min":
        return value < best - min_delta
    return value > best + min_delta


def _check_mode(mode: str) -> str:
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    return mode


def _monitored(logs: Mapping[str, torch.Tensor], monitor: str, who: str) -> torch.Tensor:
    if monitor not in logs:
        raise KeyError(
            f"{who}: monitored metric {monitor!r} is not in the epoch's logs {sorted(logs)} "
            "(val_* metrics need a val_loader)"
        )
    return logs[monitor].double()


# ----------------------------------------------------------------- NaN / inf
class NaNCallback(Callback):
    """What to do with a model whose loss or gradients become non-finite.

    The loop already skips that step for that model (no other model is touched).
    ``action="freeze"``: the model gets no further updates, so it stays at its state
    from before the bad step. ``action="reset"``: it restarts from its state when
    ``fit`` began, with a fresh optimizer state. Both act on the device mask, with
    no host synchronisation; ``events`` counts the non-finite steps per model
    (``[N]``, read at each epoch end, which also warns once per new model).
    """

    def __init__(self, action: str = "freeze", warn: bool = True) -> None:
        if action not in ("freeze", "reset"):
            raise ValueError(f"NaNCallback action must be 'freeze' or 'reset', got {action!r}")
        self.action = action
        self.warn = warn
        self.events: torch.Tensor | None = None
        self._count: torch.Tensor | None = None
        self._reported: set[int] = set()

    def on_fit_start(self, loop) -> None:
        self._count = torch.zeros(loop.num_models, dtype=torch.int64, device=loop.device)

    def on_nonfinite(self, loop, bad: torch.Tensor) -> None:
        self._count += bad
        if self.action == "freeze":
            loop.freeze_where(bad)
        elif bool(bad.any()):  # a reset rewrites every tensor: only when needed
            loop.reset_model(bad)

    def on_epoch_end(self, loop, logs) -> None:
        self.events = self._count.cpu()
        new = [i for i in self.events.nonzero().flatten().tolist() if i not in self._reported]
        self._reported.update(new)
        if new and self.warn:
            done = "frozen" if self.action == "freeze" else "reset to their initial state"
            warnings.warn(
                f"NaNCallback: models {new} had a non-finite loss or gradient and were "
                f"{done}; the other models were not affected",
                RuntimeWarning,
                stacklevel=2,
            )


# ----------------------------------------------------------- early stopping
class EarlyStopping(Callback):
    """Per-model early stopping on an epoch metric.

    Model i stops (gets no further updates) once ``monitor`` has not improved by
    ``min_delta`` for ``patience`` epochs; the run ends when every model has
    stopped. With ``restore_best=True`` each model ends with its weights and buffers
    from its best epoch. ``stopped_epoch`` (``[N]``, -1 while training) and
    ``best`` (``[N]``) tell what happened.
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        patience: int = 5,
        min_delta: float = 0.0,
        mode: str = "min",
        restore_best: bool = False,
    ) -> None:
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"EarlyStopping patience must be an int >= 1, got {patience!r}")
        if not min_delta >= 0:
            raise ValueError(f"EarlyStopping min_delta must be >= 0, got {min_delta!r}")
        self.monitor = monitor
        self.patience = patience
        self.min_delta = float(min_delta)
        self.mode = _check_mode(mode)
        self.restore_best = restore_best
        self.best: torch.Tensor | None = None
        self.wait: torch.Tensor | None = None
        self.stopped_epoch: torch.Tensor | None = None
        self._best_state: dict[str, torch.Tensor] | None = None

    def on_fit_start(self, loop) -> None:
        n = loop.num_models
        self.best = torch.full(
            (n,), math.inf if self.mode == "min" else -math.inf, dtype=torch.float64
        )
        self.wait = torch.zeros(n, dtype=torch.int64)
        self.stopped_epoch = torch.full((n,), -1, dtype=torch.int64)
        if self.restore_best:
            self._best_state = _model_tensors(loop.batch, clone=True)

    def on_epoch_end(self, loop, logs) -> None:
        value = _monitored(logs, self.monitor, "EarlyStopping")
        running = self.stopped_epoch < 0
        improved = _better(self.mode, value, self.best, self.min_delta) & running
        self.best = torch.where(improved, value, self.best)
        self.wait = torch.where(improved, 0, self.wait + running.long())
        if self.restore_best:
            _copy_rows(self._best_state, _model_tensors(loop.batch), improved)
        stop = running & (self.wait >= self.patience)
        if bool(stop.any()):
            self.stopped_epoch[stop] = loop.epoch
            if self.restore_best:
                _copy_rows(_model_tensors(loop.batch), self._best_state, stop)
            loop.stop(stop)

    def on_fit_end(self, loop) -> None:
        if self.restore_best:
            _copy_rows(_model_tensors(loop.batch), self._best_state, self.stopped_epoch < 0)


def _model_tensors(batch, clone: bool = False) -> dict[str, torch.Tensor]:
    tensors = {**batch.stacked_params(), **batch.stacked_buffers()}
    if clone:
        return {k: v.detach().clone() for k, v in tensors.items()}
    return tensors


@torch.no_grad()
def _copy_rows(dst: dict[str, torch.Tensor], src: dict[str, torch.Tensor], rows: torch.Tensor):
    """``dst[k][i] = src[k][i]`` for every tensor k wherever ``rows[i]`` (bool [N])."""
    for k, d in dst.items():
        view = rows.to(d.device).view((-1,) + (1,) * (d.dim() - 1))
        d.copy_(torch.where(view, src[k].to(d.device), d))


# ------------------------------------------------------------- checkpoints
class ModelCheckpoint(Callback):
    """Keep each model's best weights on disk.

    Whenever model i's ``monitor`` improves, ``dirpath/model_{i}.pt`` (a plain
    state_dict that model i's class loads) is rewritten atomically, and
    ``dirpath/best.json`` records every model's best value and epoch. With
    ``save_last=True`` the whole run is also saved to ``dirpath/last.ckpt`` after
    every epoch (:func:`modelbatch.save_checkpoint`: weights, buffers, random
    streams, optimizer and scaler state), from which ``load_checkpoint`` resumes.
    """

    def __init__(
        self,
        dirpath: str | os.PathLike,
        monitor: str = "val_loss",
        mode: str = "min",
        save_last: bool = False,
    ) -> None:
        self.dirpath = os.fspath(dirpath)
        self.monitor = monitor
        self.mode = _check_mode(mode)
        self.save_last = save_last
        self.best: torch.Tensor | None = None
        self.best_epoch: torch.Tensor | None = None

    def on_fit_start(self, loop) -> None:
        os.makedirs(self.dirpath, exist_ok=True)
        n = loop.num_models
        self.best = torch.full(
            (n,), math.inf if self.mode == "min" else -math.inf, dtype=torch.float64
        )
        self.best_epoch = torch.full((n,), -1, dtype=torch.int64)

    def path(self, i: int) -> str:
        return os.path.join(self.dirpath, f"model_{i}.pt")

    def on_epoch_end(self, loop, logs) -> None:
        from modelbatch.checkpoint import save_checkpoint

        value = _monitored(logs, self.monitor, "ModelCheckpoint")
        improved = _better(self.mode, value, self.best, 0.0)
        for i in improved.nonzero().flatten().tolist():
            _atomic_save(loop.batch._model_state(i), self.path(i))
        self.best = torch.where(improved, value, self.best)
        self.best_epoch = torch.where(improved, loop.epoch, self.best_epoch)
        summary = {
            "monitor": self.monitor,
            "mode": self.mode,
            "best": [None if not math.isfinite(v) else v for v in self.best.tolist()],
            "best_epoch": self.best_epoch.tolist(),
        }
        tmp = os.path.join(self.dirpath, ".best.json.tmp")
        with open(tmp, "w") as f:
            json.dump(summary, f, indent=1)
        os.replace(tmp, os.path.join(self.dirpath, "best.json"))
        if self.save_last:
            save_checkpoint(
                os.path.join(self.dirpath, "last.ckpt"),
                loop.batch,
                loop.optimizer,
                loop.scaler,
                extra={"epoch": loop.epoch, "global_step": loop.global_step},
            )


def _atomic_save(obj: Any, path: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ------------------------------------------------------------------ loggers
class CSVLogger(Callback):
    """One CSV row per model and epoch: ``epoch, model, <every logged metric>``.

    The header is written with the first epoch's columns; ``append=True`` adds to an
    existing file with the same columns (a resumed run).
    """

    def __init__(self, path: str | os.PathLike, append: bool = False) -> None:
        self.path = os.fspath(path)
        self.append = append
        self._columns: list[str] | None = None

    def on_fit_start(self, loop) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        if not self.append and os.path.exists(self.path):
            os.remove(self.path)

    def on_epoch_end(self, loop, logs) -> None:
        keys = sorted(logs)
        new = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
        if self._columns is None:
            self._columns = ["epoch", "model", *keys]
            if not new:
                with open(self.path, newline="") as f:
                    header = next(csv.reader(f), None)
                if header != self._columns:
                    raise ValueError(
                        f"CSVLogger: {self.path} has columns {header}, this run logs "
                        f"{self._columns}; use another path or append=False"
                    )
        columns = {k: logs[k].tolist() for k in keys}
        with open(self.path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(self._columns)
            for i in range(loop.num_models):
                writer.writerow([loop.epoch, i, *(repr(float(columns[k][i])) for k in keys)])


class TensorBoardLogger(Callback):
    """TensorBoard event files (``torch.utils.tensorboard``; needs ``tensorboard``,
    ``pip install modelbatch[tensorboard]``).

    Per epoch: ``population/<metric>/{best,median,worst}`` and, with ``per_model``
    (default True; a list of indices picks some), ``model_<i>/<metric>``. Per step
    (``log_every_n_steps``): ``population/step_loss/{best,median}``.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike,
        per_model: bool | Iterable[int] = True,
        log_every_n_steps: int = 0,
    ) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError(
                "TensorBoardLogger needs the tensorboard package: pip install "
                "'modelbatch[tensorboard]' (or pip install tensorboard)"
            ) from err
        self._writer_cls = SummaryWriter
        self.log_dir = os.fspath(log_dir)
        self.per_model = per_model
        self.log_every_n_steps = int(log_every_n_steps)
        self.writer = None

    def on_fit_start(self, loop) -> None:
        self.writer = self._writer_cls(self.log_dir)

    def _models(self, n: int) -> list[int]:
        if self.per_model is True:
            return list(range(n))
        if self.per_model is False:
            return []
        return [int(i) for i in self.per_model]

    def on_step_end(self, loop, losses, skipped) -> None:
        k = self.log_every_n_steps
        if k and loop.global_step % k == 0:
            live = torch.where(skipped, math.nan, losses.detach().double()).cpu()
            self.writer.add_scalar(
                "population/step_loss/best",
                live.nan_to_num(math.inf).min().item(),
                loop.global_step,
            )
            self.writer.add_scalar(
                "population/step_loss/median", live.nanmedian().item(), loop.global_step
            )

    def on_epoch_end(self, loop, logs) -> None:
        step = loop.epoch
        models = self._models(loop.num_models)
        for name, v in logs.items():
            v = v.double()
            finite = v[torch.isfinite(v)]
            if finite.numel():
                lo, mid, hi = finite.min().item(), finite.median().item(), finite.max().item()
                best, worst = (hi, lo) if "acc" in name else (lo, hi)
                self.writer.add_scalar(f"population/{name}/best", best, step)
                self.writer.add_scalar(f"population/{name}/median", mid, step)
                self.writer.add_scalar(f"population/{name}/worst", worst, step)
            values = v.tolist()
            for i in models:
                self.writer.add_scalar(f"model_{i}/{name}", values[i], step)
        self.writer.flush()

    def on_fit_end(self, loop) -> None:
        if self.writer is not None:
            self.writer.close()
