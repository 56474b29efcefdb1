"""Weights & Biases logging for :func:`modelbatch.fit`: one W&B run per population.

``WandbLogger(project=...)`` is a :class:`~modelbatch.callbacks.Callback`. It opens
one run when ``fit`` starts (``wandb.init(project, name, config, **init_kwargs)``;
``mode="offline"`` or ``WANDB_MODE=offline`` works with no network) and logs:

* config: ``num_models``, ``optimizer`` (its class), ``seeds`` (``[N]``) and
  ``model_hparams``: each per-model hyper-parameter of the optimizer's param groups
  (one group per model) as a list of N values, e.g. ``{"lr": [...], "betas":
  [[0.9, 0.999], ...]}``; plus the ``config`` given;
* every epoch, at step ``loop.global_step``: ``model_{i}/{metric}`` for every key of
  ``fit``'s epoch logs (``train_loss``, ``val_accuracy``, ``lr``, ``skipped_steps``,
  ...; the ``[N]`` float64 values, so they equal the :class:`~modelbatch.History`'s)
  for the models ``per_model`` selects, ``population/{metric}/{best,median,worst}``
  over the finite values of each ``train_*`` / ``val_*`` metric (higher is better
  for accuracies), and ``epoch``;
* every ``log_every_n_steps`` steps (0: never): ``population/step_loss/{best,median}``;
* at the end: a ``wandb.Table`` ``models`` with one row per model (``model``,
  ``seed``, its hyper-parameters, its last-epoch value of every metric) in the
  history and in the summary, and ``best_model`` / ``best_{metric}`` (the model with
  the lowest last ``val_loss``, else ``train_loss``) in the summary; then the run is
  finished (``finish=False`` leaves it open).

``wandb`` is imported when a WandbLogger is built (``pip install 'modelbatch[wandb]'``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from modelbatch.callbacks import Callback
from modelbatch.integrations import require

__all__ = ["WandbLogger"]


def _higher_is_better(name: str) -> bool:
    return "acc" in name


class WandbLogger(Callback):
    """One W&B run for the whole population of a :func:`modelbatch.fit` call.

    Args:
        project: the W&B project (None: W&B's default).
        name: the run's display name.
        config: extra config (a dict) recorded with the per-model hyper-parameters.
        per_model: log ``model_{i}/...`` for every model (True), for none (False:
            population figures and the final table only) or for the listed indices.
        log_every_n_steps: log the population's best and median step loss every so
            many optimizer steps (0: only per epoch).
        finish: finish the run when ``fit`` ends.
        **init_kwargs: passed to ``wandb.init`` (``mode="offline"``, ``dir=...``,
            ``entity``, ``tags``, ``group``, ...).

    After ``fit``: :attr:`run` is the W&B run and :attr:`run_dir` its directory (for
    an offline run, the folder ``wandb sync`` uploads).
    """

    def __init__(
        self,
        project: str | None = None,
        name: str | None = None,
        config: Mapping[str, Any] | None = None,
        per_model: bool | Iterable[int] = True,
        log_every_n_steps: int = 0,
        finish: bool = True,
        **init_kwargs: Any,
    ) -> None:
        self._wandb = require("wandb", "wandb")
        if project is not None and not isinstance(project, str):
            raise ValueError(f"project must be a string, got {type(project).__name__}")
        if name is not None and not isinstance(name, str):
            raise ValueError(f"name must be a string, got {type(name).__name__}")
        if config is not None and not isinstance(config, Mapping):
            raise ValueError(f"config must be a dict, got {type(config).__name__}")
        if (
            isinstance(log_every_n_steps, bool)
            or not isinstance(log_every_n_steps, int)
            or log_every_n_steps < 0
        ):
            raise ValueError(f"log_every_n_steps must be an int >= 0, got {log_every_n_steps!r}")
        if not isinstance(per_model, bool):
            try:
                per_model = [int(i) for i in per_model]
            except (TypeError, ValueError) as err:
                raise ValueError(
                    f"per_model must be a bool or model indices, got {per_model!r}"
                ) from err
        self.project = project
        self.name = name
        self.config = dict(config or {})
        self.per_model = per_model
        self.log_every_n_steps = log_every_n_steps
        self.finish = finish
        self.init_kwargs = init_kwargs
        self.run = None
        self._models: list[int] = []
        self._hparams: dict[str, list[Any]] = {}
        self._seeds: list[int] | None = None
        self._last: dict[str, list[float]] = {}

    @property
    def run_dir(self) -> str | None:
        """The run's directory (``.../wandb/offline-run-<time>-<id>``), or None."""
        if self.run is None:
            return None
        return os.path.dirname(self.run.dir)

    # ------------------------------------------------------------------- hooks
    def on_fit_start(self, loop) -> None:
        n = loop.num_models
        if self.per_model is True:
            self._models = list(range(n))
        elif self.per_model is False:
            self._models = []
        else:
            bad = [i for i in self.per_model if not 0 <= i < n]
            if bad:
                raise ValueError(
                    f"WandbLogger per_model: indices {bad} out of range for {n} models"
                )
            self._models = list(self.per_model)
        self._hparams = _per_model_hparams(loop.optimizer, n)
        seeds = loop.batch.seeds
        self._seeds = None if seeds is None else [int(s) for s in seeds.tolist()]
        config = {
            **self.config,
            "num_models": n,
            "optimizer": type(loop.optimizer).__name__,
            "seeds": self._seeds,
            "model_hparams": self._hparams,
        }
        self.run = self._wandb.init(
            project=self.project, name=self.name, config=config, **self.init_kwargs
        )
        self._last = {}

    def on_step_end(self, loop, losses: torch.Tensor, skipped: torch.Tensor) -> None:
        k = self.log_every_n_steps
        if not k or loop.global_step % k:
            return
        live = torch.where(skipped | ~torch.isfinite(losses), math.nan, losses.detach().double())
        live = live.cpu()
        if not bool(torch.isfinite(live).any()):
            return
        self.run.log(
            {
                "population/step_loss/best": live.nan_to_num(math.inf).min().item(),
                "population/step_loss/median": live.nanmedian().item(),
            },
            step=loop.global_step,
        )

    def on_epoch_end(self, loop, logs: Mapping[str, torch.Tensor]) -> None:
        data: dict[str, Any] = {"epoch": loop.epoch}
        for name, v in logs.items():
            values = v.double().tolist()
            self._last[name] = values
            for i in self._models:
                data[f"model_{i}/{name}"] = values[i]
            if name.startswith(("train_", "val_")):
                data.update(_population(name, v))
        self.run.log(data, step=loop.global_step)

    def on_fit_end(self, loop) -> None:
        if self.run is None:
            return
        table = self.summary_table(loop.num_models)
        self.run.log({"models": table}, step=loop.global_step)
        self.run.summary["models"] = table
        key = next((k for k in ("val_loss", "train_loss") if k in self._last), None)
        if key is not None:
            values = torch.tensor(self._last[key], dtype=torch.float64)
            if bool(torch.isfinite(values).any()):
                best = int(values.nan_to_num(math.inf).argmin())
                self.run.summary["best_model"] = best
                self.run.summary[f"best_{key}"] = values[best].item()
        if self.finish:
            self.run.finish()

    # ------------------------------------------------------------------ table
    def summary_table(self, n: int):
        """A ``wandb.Table``: one row per model, its seed, hyper-parameters and
        last-epoch metrics."""
        hp_cols: list[tuple[str, str, int | None]] = []
        for key, values in self._hparams.items():
            if isinstance(values[0], list | tuple):
                hp_cols += [(f"{key}_{j}", key, j) for j in range(len(values[0]))]
            else:
                hp_cols.append((key, key, None))
        metrics = sorted(k for k in self._last if k not in self._hparams)
        columns = ["model", "seed", *(c for c, _, _ in hp_cols), *metrics]
        rows = []
        for i in range(n):
            row: list[Any] = [i, None if self._seeds is None else self._seeds[i]]
            for _, key, j in hp_cols:
                v = self._hparams[key][i]
                row.append(v if j is None else v[j])
            row += [self._last[m][i] for m in metrics]
            rows.append(row)
        return self._wandb.Table(columns=columns, data=rows)


def _per_model_hparams(optimizer: Any, n: int) -> dict[str, list[Any]]:
    """``{key: [N values]}`` from the optimizer's one-group-per-model param groups
    (nothing for an optimizer without them, e.g. a single-group torch optimizer)."""
    groups = getattr(optimizer, "param_groups", None)
    if not groups or len(groups) != n:
        return {}
    out: dict[str, list[Any]] = {}
    for key in groups[0]:
        if key == "params":
            continue
        values = [g.get(key) for g in groups]
        if all(isinstance(v, bool | int | float) for v in values):
            out[key] = values
        elif all(
            isinstance(v, list | tuple) and all(isinstance(x, int | float) for x in v)
            for v in values
        ):
            out[key] = [list(v) for v in values]
    return out


def _population(name: str, values: torch.Tensor) -> dict[str, float]:
    v = values.double()
    finite = v[torch.isfinite(v)]
    if not finite.numel():
        return {}
    lo, mid, hi = finite.min().item(), finite.median().item(), finite.max().item()
    best, worst = (hi, lo) if _higher_is_better(name) else (lo, hi)
    return {
        f"population/{name}/best": best,
        f"population/{name}/median": mid,
        f"population/{name}/worst": worst,
    }
