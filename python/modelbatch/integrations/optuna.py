"""Optuna: ask for N trials at once and train them as one ModelBatch.

``ModelBatchStudy(study, build_model, train_fn, suggest=...)`` runs Optuna's
ask-and-tell interface in rounds (``optimize(n_trials, batch_size=N)``):

1. ask the study for N trials; ``suggest(trial) -> config`` draws each trial's
   parameters (``trial.suggest_float("lr", 1e-4, 1e-1, log=True)``, ...) and
   returns them as a dict;
2. build one model per trial, ``build_model(config) -> nn.Module``, after
   ``torch.manual_seed(config.get("seed", seed))``;
3. group the trials whose models share one structure (the ``group_by`` parameters
   agree, or, by default, the models have the same parameter names, shapes and
   dtypes): each group of ``n`` trials becomes one ModelBatch (parameters
   ``[n, ...]``);
4. ``train_fn(batch, configs, callbacks)`` trains a group with per-trial
   hyper-parameters (``[n]`` vectors: lr, weight decay, ...) and returns the
   per-model objective, ``[n]`` values or a :class:`~modelbatch.History`;
   :class:`FitTrainer` is that function for :func:`modelbatch.fit`;
5. tell the study every result: ``COMPLETE`` with its value, ``FAIL`` for a
   non-finite value or an exception, ``PRUNED`` for a trial the study's pruner
   stopped between epochs (with ``prune=True`` the ``callbacks`` handed to
   ``train_fn`` report each model's ``objective`` to its trial every epoch and
   stop the pruned models alone).

Any sampler works (TPE, random, grid, CMA-ES, ...): the study sees ordinary trials.
TPE asked for N trials at once treats the running ones as "constant liars"
(``TPESampler(constant_liar=True)``, the default in Optuna 5.0; pass it on older
versions), so a round does not pile onto one point. With RDB storage
(``optuna.create_study(storage="sqlite:///study.db", study_name=...)``) several
processes or machines, each with its own ModelBatchStudy over
``optuna.load_study(...)``, share one study: each asks, trains and tells its own
rounds, and the samplers see every worker's trials.

Why rounds: a ModelBatch trains N models for about the price of one or a few, so
waiting for N suggestions and training them together beats N sequential trials
whenever the sampler does not need each result before the next suggestion.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from modelbatch.callbacks import Callback
from modelbatch.core import ModelBatch
from modelbatch.integrations import require
from modelbatch.integrations._fit import (
    Config,
    FitTrainer,
    TrainFn,
    build_seeded,
    per_model_tensor,
)
from modelbatch.train import History

optuna = require("optuna", "optuna")

__all__ = ["FitTrainer", "ModelBatchStudy"]

_log = logging.getLogger(__name__)
TrialState = optuna.trial.TrialState


# ------------------------------------------------------------------ training
def per_model_values(result: Any, objective: str, n: int) -> torch.Tensor:
    """float64 ``[n]``: what a ``train_fn`` returned, as one value per model.

    ``result``: a :class:`History` (the last epoch of column ``objective``), a mapping
    ``{name: [n]}`` (its ``objective`` entry) or ``[n]`` values.
    """
    if isinstance(result, History):
        if objective not in result.keys:
            raise ValueError(
                f"train_fn's History has no column {objective!r} (it has {result.keys}); "
                "pass objective=... (val_* columns need a val_loader)"
            )
        values = result.last(objective)
    elif isinstance(result, Mapping):
        if objective not in result:
            raise ValueError(
                f"train_fn returned a mapping without {objective!r} (keys {sorted(result)})"
            )
        values = result[objective]
    else:
        values = result
    return per_model_tensor(values, n)


def structure(model: nn.Module) -> tuple:
    """What must agree for two models to share a ModelBatch (hashable)."""
    params = tuple(
        (n, tuple(p.shape), p.dtype, p.requires_grad, p.device) for n, p in model.named_parameters()
    )
    buffers = tuple((n, tuple(b.shape), b.dtype, b.device) for n, b in model.named_buffers())
    return (type(model), params, buffers)


def _key(value: Any) -> Any:
    try:
        hash(value)
    except TypeError:
        return repr(value)  # lists (e.g. layer widths) group by their value
    return value


# ------------------------------------------------------------------- pruning
class _Pruning(Callback):
    """Reports model i's ``objective`` to trial i every epoch; stops the models whose
    trials the pruner prunes (the others train on, unchanged)."""

    def __init__(self, trials: Sequence[Any], objective: str) -> None:
        self.trials = list(trials)
        self.objective = objective
        self.pruned: set[int] = set()

    def on_epoch_end(self, loop, logs: Mapping[str, torch.Tensor]) -> None:
        if self.objective not in logs:
            raise ValueError(
                f"pruning needs {self.objective!r} in the epoch logs (it has {sorted(logs)}); "
                "give FitTrainer a val_loader or leave prune=False"
            )
        values = logs[self.objective].tolist()
        frozen = loop.frozen.tolist()
        for i, (trial, v) in enumerate(zip(self.trials, values)):
            if frozen[i] or not math.isfinite(v):
                continue  # stopped or diverged: its trial ends with what it has
            trial.report(v, loop.epoch)
            if trial.should_prune():
                self.pruned.add(i)
                loop.stop(i)


# --------------------------------------------------------------------- study
class ModelBatchStudy:
    """Batched ask-and-tell over an Optuna study; see the module docstring.

    Args:
        study: an ``optuna.Study`` (single objective), in memory or RDB storage.
        build_model: ``build_model(config) -> nn.Module``, one model from one trial's
            config; called after ``torch.manual_seed(seed of the config)``.
        train_fn: ``train_fn(batch, configs, callbacks)`` trains the ModelBatch of a
            group (``configs[i]`` is model i's) and returns ``[n]`` objective values,
            a ``{name: [n]}`` mapping or a :class:`History` (e.g. a
            :class:`FitTrainer`). ``callbacks`` report to the trials and prune: pass
            them to :func:`modelbatch.fit` (a custom loop may ignore them).
        suggest: ``suggest(trial) -> dict``, the search space: it calls
            ``trial.suggest_*`` and returns the config (architecture parameters,
            hyper-parameters, optionally ``"seed"``).
        group_by: the config keys that define the architecture: trials agreeing on
            them train in one ModelBatch. Default (None): group by the models'
            structure itself (class, parameter and buffer names, shapes, dtypes).
        objective: the History column / mapping key told to the study.
        seed: the model seed of a config without ``"seed"``. One seed for all
            trials (default) compares hyper-parameters from the same initial
            weights; ``suggest`` can return ``{"seed": trial.number, ...}`` instead.
        device: where the models are trained (default: where ``build_model`` puts
            them).
        prune: report ``objective`` to each trial every epoch (one storage write
            per trial and epoch) and let the study's pruner stop trials. A stopped
            model sits out its optimizer steps but still goes through the group's
            batched forward, so pruning saves time only once a whole group is
            pruned (then ``fit`` ends); what it changes is the trials' state and
            intermediate values, which samplers and pruners read.
    """

    def __init__(
        self,
        study: Any,
        build_model: Callable[[Config], nn.Module],
        train_fn: TrainFn,
        *,
        suggest: Callable[[Any], Config],
        group_by: Sequence[str] | None = None,
        objective: str = "val_loss",
        seed: int = 0,
        device: str | torch.device | None = None,
        prune: bool = False,
    ) -> None:
        if not isinstance(study, optuna.Study):
            raise ValueError(f"study must be an optuna.Study, got {type(study).__name__}")
        if len(study.directions) != 1:
            raise ValueError(
                f"ModelBatchStudy supports single-objective studies; this one has "
                f"{len(study.directions)} directions"
            )
        named = {"build_model": build_model, "train_fn": train_fn, "suggest": suggest}
        for name, fn in named.items():
            if not callable(fn):
                raise ValueError(f"{name} must be callable, got {type(fn).__name__}")
        if isinstance(group_by, str):
            group_by = (group_by,)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.study = study
        self.build_model = build_model
        self.train_fn = train_fn
        self.suggest = suggest
        self.group_by = None if group_by is None else tuple(group_by)
        self.objective = objective
        self.seed = seed
        self.device = None if device is None else torch.device(device)
        self.prune = prune
        self._stop = False

    # ----------------------------------------------------------------- rounds
    def optimize(
        self,
        n_trials: int,
        *,
        batch_size: int,
        catch: type[BaseException] | tuple[type[BaseException], ...] = (),
        callbacks: Sequence[Callable[[Any, Any], None]] | None = None,
    ) -> list[Any]:
        """Run ``n_trials`` trials in rounds of ``batch_size`` (the last may be
        smaller); return their ``FrozenTrial``s in the order they were asked.

        ``catch``: exceptions of ``suggest``, ``build_model`` or ``train_fn`` that
        fail their trials (a whole group for ``train_fn``) and go on, as in
        ``study.optimize``; any other exception fails every trial of the round not
        yet told and is raised. A trial whose ``suggest`` raises
        ``optuna.TrialPruned`` is told PRUNED. ``callbacks``: ``f(study,
        frozen_trial)`` after each round, for each of its trials. A
        ``study.stop()`` (from a callback, or a grid sampler whose grid is done)
        ends the run after the current round.
        """
        for name, v in (("n_trials", n_trials), ("batch_size", batch_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        catch = tuple(catch) if isinstance(catch, list | tuple) else (catch,)
        self._stop = False
        done: list[Any] = []
        while len(done) < n_trials and not self._stop:
            done.extend(self._round(min(batch_size, n_trials - len(done)), catch, callbacks))
        return done

    def _round(self, n: int, catch: tuple, callbacks) -> list[Any]:
        """Ask for ``n`` trials, train and tell them; their FrozenTrials, in order."""
        trials: list[Any] = []
        told: dict[int, Any] = {}
        try:
            asked = []
            for _ in range(n):
                trial = self.study.ask()
                trials.append(trial)
                config = self._suggest(trial, catch, told)
                if config is not None:
                    asked.append((trial, config))
            for members, models, seeds in self._groups(asked, catch, told):
                self._train_group(members, models, seeds, catch, told)
        except BaseException as err:
            self._fail([t for t in trials if t.number not in told], err, told)
            raise
        out = [told[t.number] for t in trials]
        for frozen in out:
            for cb in callbacks or ():
                self._guard_stop(cb, self.study, frozen)
        return out

    # --------------------------------------------------------------- internals
    def _suggest(self, trial, catch: tuple, told: dict) -> Config | None:
        try:
            config = self.suggest(trial)
            if not isinstance(config, Mapping):
                raise ValueError(
                    f"suggest must return a dict of parameters, got {type(config).__name__}"
                )
        except optuna.TrialPruned:
            told[trial.number] = self._tell(trial, state=TrialState.PRUNED)
            return None
        except catch as err:
            self._fail([trial], err, told)
            return None
        return dict(config)

    def _seed_of(self, config: Config) -> int:
        seed = config.get("seed", self.seed)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"a config's seed must be an int, got {seed!r}")
        return seed

    def _groups(self, asked, catch: tuple, told: dict) -> list[tuple[list, list, list]]:
        """``[(members, models, seeds)]``: ``members`` are ``(trial, config)`` pairs
        whose models can share a ModelBatch, in the order asked."""
        groups: dict[Any, tuple[list, list, list]] = {}
        for trial, config in asked:
            seed = self._seed_of(config)
            try:
                model = build_seeded(self.build_model, config, seed)
                if self.device is not None:
                    model = model.to(self.device)
            except catch as err:
                self._fail([trial], err, told)
                continue
            if self.group_by is None:
                key = structure(model)
            else:
                missing = [k for k in self.group_by if k not in config]
                if missing:
                    raise ValueError(
                        f"group_by keys {missing} are not in trial {trial.number}'s config "
                        f"(keys {sorted(config)})"
                    )
                key = tuple(_key(config[k]) for k in self.group_by)
            members, models, seeds = groups.setdefault(key, ([], [], []))
            members.append((trial, config))
            models.append(model)
            seeds.append(seed)
        return list(groups.values())

    def _train_group(self, members, models, seeds, catch: tuple, told: dict) -> None:
        trials = [t for t, _ in members]
        configs = [c for _, c in members]
        try:
            batch = ModelBatch(models, seeds=seeds)
        except ValueError as err:
            raise ValueError(
                f"trials {[t.number for t in trials]} agree on group_by={self.group_by} but "
                f"their models differ ({err}); add the parameter that changes the "
                "architecture to group_by, or leave group_by=None to group by structure"
            ) from err
        for t, s in zip(trials, seeds):
            t.set_user_attr("modelbatch_seed", s)
            t.set_user_attr("modelbatch_models", batch.num_models)
        pruning = _Pruning(trials, self.objective) if self.prune else None
        try:
            result = self.train_fn(batch, configs, [pruning] if pruning else [])
            values = per_model_values(result, self.objective, batch.num_models).tolist()
        except catch as err:
            self._fail(trials, err, told)
            return
        pruned = pruning.pruned if pruning else set()
        for i, (trial, v) in enumerate(zip(trials, values)):
            if i in pruned:
                told[trial.number] = self._tell(trial, state=TrialState.PRUNED)
            elif not math.isfinite(v):
                trial.set_user_attr("modelbatch_fail_reason", f"{self.objective} is {v}")
                told[trial.number] = self._tell(trial, state=TrialState.FAIL)
            else:
                told[trial.number] = self._tell(trial, v)

    def _tell(self, trial, value: float | None = None, state=None):
        frozen = self._guard_stop(self.study.tell, trial, value, state=state)
        if frozen is None:  # stopped inside tell, after the trial was stored
            frozen = self.study.get_trials(deepcopy=False)[trial.number]
        return frozen

    def _guard_stop(self, fn, *args, **kwargs):
        # Outside study.optimize, study.stop() raises instead of stopping; it is how a
        # grid sampler with a finished grid (inside tell) or a callback asks to stop.
        # tell stores the trial before the sampler's hook runs, so nothing is lost.
        try:
            return fn(*args, **kwargs)
        except RuntimeError as err:
            if "Study.stop" not in str(err):
                raise
            self._stop = True
            return None

    def _fail(self, trials: Iterable[Any], err: BaseException, told: dict) -> None:
        for trial in trials:
            _log.warning("Trial %d failed: %r", trial.number, err)
            try:
                trial.set_user_attr("modelbatch_fail_reason", repr(err)[:500])
            except optuna.exceptions.UpdateFinishedTrialError:
                # The error came from a sampler hook after tell had stored the trial.
                continue
            told[trial.number] = self._tell(trial, state=TrialState.FAIL)
