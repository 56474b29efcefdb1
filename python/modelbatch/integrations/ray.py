"""Ray Tune: a population of configurations, sharded over a cluster, one ModelBatch
per shard.

``tune_population(configs, build_model, train_fn, num_shards=S)`` splits the P
configurations into S contiguous shards of ``ceil(P / S)`` or ``floor(P / S)``
models. Each shard is one Ray Tune trial (``tune.grid_search`` over the shard ids,
resources from ``resources_per_trial`` through ``tune.with_resources``) that, on
the CPUs or GPU Ray gives it:

1. builds model j of the shard, ``build_model(config) -> nn.Module``, after
   ``torch.manual_seed(config.get("seed", seed))``, and stacks the shard's n models
   into ONE ModelBatch (parameters ``[n, ...]``);
2. calls ``train_fn(batch, configs, callbacks)`` (the protocol of
   :mod:`modelbatch.integrations.optuna`; :class:`FitTrainer` runs
   :func:`modelbatch.fit` with per-model hyper-parameters from the configs);
3. reports every model's metrics each epoch with ``tune.report``: one flat dict
   ``{"shard", "epoch", "num_models", "best_<metric>", "model_{j}_id" (the
   config's index in ``configs``), "model_{j}_<name>" for every History column
   (``train_loss``, ``val_loss``, ``val_accuracy``, ``lr``, ...)}``.

It returns one row per configuration, in the order of ``configs``: ``id``, the
shard, the config's keys and the final value of every metric (a pandas DataFrame
when pandas is installed, else a list of dicts).

All models of a population must share one architecture (one ModelBatch per
shard); call ``tune_population`` once per architecture otherwise.

Beyond one machine, start a Ray cluster and point the driver at it::

    # on the head node
    ray start --head --port=6379
    # on every other node (CPU or GPU workers)
    ray start --address=<head-ip>:6379
    # the driver, on any node of the cluster
    python -c "import ray; ray.init(address='auto'); ...tune_population(...)"

Ray schedules the shards over the nodes by ``resources_per_trial`` (``{"cpu": 4}``,
``{"gpu": 1}``, ...); a trial with a GPU trains its ModelBatch on it
(``device="auto"``). The configs, ``build_model`` and ``train_fn`` (with the data
it holds) travel to the workers through Ray's object store; for large data sets
give :class:`FitTrainer` loader factories (zero-argument callables) that load the
data on the worker instead. Functions from an importable module travel by
reference, so that module must be importable on the workers too (those of a
``__main__`` script travel by value; ``ray.cloudpickle.register_pickle_by_value``
sends a module's by value). The ``modelbatch`` package (with its compiled
``modelbatch._C``) must be installed on every node. Without ``ray.init``, Tune
starts a local cluster on this machine.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
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

ray = require("ray", "ray")
tune = require("ray.tune", "ray")

__all__ = ["FitTrainer", "split_population", "tune_population"]

_RESERVED = ("id", "shard")


# ------------------------------------------------------------------ training
def split_population(
    num_configs: int, *, num_shards: int | None = None, models_per_trial: int | None = None
) -> list[list[int]]:
    """The config indices of each shard: ``num_shards`` contiguous shards whose sizes
    differ by at most one (``models_per_trial``: as many shards as needed to hold
    at most that many models each). Give exactly one of the two."""
    if (num_shards is None) == (models_per_trial is None):
        raise ValueError("give exactly one of num_shards and models_per_trial")
    for name, v in (("num_shards", num_shards), ("models_per_trial", models_per_trial)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if num_shards is None:
        num_shards = math.ceil(num_configs / models_per_trial)
    if num_shards > num_configs:
        raise ValueError(f"num_shards={num_shards} is more than the {num_configs} configs")
    q, r = divmod(num_configs, num_shards)
    shards, start = [], 0
    for k in range(num_shards):
        size = q + (k < r)
        shards.append(list(range(start, start + size)))
        start += size
    return shards


def _device(device: str | torch.device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu")
    return torch.device(device)


def per_model_metrics(result: Any, n: int, metric: str) -> dict[str, list[float]]:
    """``{name: n floats}`` from what a ``train_fn`` returned: a :class:`History` (its
    last epoch), a mapping ``{name: [n]}`` or ``[n]`` values (named ``metric``)."""
    if isinstance(result, History):
        if not result.epochs:
            raise ValueError("train_fn returned an empty History (no epoch ran)")
        result = {name: result.last(name) for name in result.keys}
    elif not isinstance(result, Mapping):
        result = {metric: result}
    out = {}
    for name, values in result.items():
        t = per_model_tensor(values, n, name)
        out[str(name)] = t.tolist()
    return out


class _Report(Callback):
    """``tune.report`` of every model's logs at the end of each epoch."""

    def __init__(self, shard: int, ids: Sequence[int], metric: str, mode: str) -> None:
        self.shard, self.ids, self.metric, self.mode = shard, list(ids), metric, mode
        self.reports = 0

    def on_epoch_end(self, loop, logs: Mapping[str, torch.Tensor]) -> None:
        self.report(loop.epoch + 1, {k: v.tolist() for k, v in logs.items()})

    def report(self, epoch: int, logs: Mapping[str, list[float]]) -> None:
        row: dict[str, Any] = {"shard": self.shard, "epoch": epoch, "num_models": len(self.ids)}
        if self.metric in logs:
            finite = [v for v in logs[self.metric] if math.isfinite(v)]
            pick = min if self.mode == "min" else max
            row[f"best_{self.metric}"] = pick(finite) if finite else math.nan
        for j, gid in enumerate(self.ids):
            row[f"model_{j}_id"] = gid
        for name, values in logs.items():
            for j, v in enumerate(values):
                row[f"model_{j}_{name}"] = v
        tune.report(row)
        self.reports += 1


def _train_shard(
    config: Mapping[str, Any],
    *,
    shards: Sequence[Sequence[int]],
    configs: Sequence[Sequence[Config]],
    build_model: Callable[[Config], nn.Module],
    train_fn: TrainFn,
    seed: int,
    device: str | torch.device,
    metric: str,
    mode: str,
) -> None:
    """The Tune trainable: shard ``config["shard"]`` as one ModelBatch."""
    k = config["shard"]
    ids, cfgs = shards[k], [dict(c) for c in configs[k]]
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    if cpus:
        torch.set_num_threads(max(1, int(cpus)))  # as many threads as CPUs Ray gave us
    dev = _device(device)
    seeds = [c.get("seed", seed) for c in cfgs]
    models = [build_seeded(build_model, c, s).to(dev) for c, s in zip(cfgs, seeds)]
    batch = ModelBatch(models, seeds=seeds)
    del models  # the ModelBatch holds copies
    reporter = _Report(k, ids, metric, mode)
    result = train_fn(batch, cfgs, [reporter])
    if not (isinstance(result, History) and reporter.reports):
        # Not reported epoch by epoch (a custom loop): report what it returned.
        reporter.report(reporter.reports, per_model_metrics(result, len(ids), metric))


# --------------------------------------------------------------------- tune
def tune_population(
    configs: Sequence[Mapping[str, Any]],
    build_model: Callable[[Config], nn.Module],
    train_fn: TrainFn,
    *,
    num_shards: int | None = None,
    models_per_trial: int | None = None,
    resources_per_trial: Mapping[str, float] | Any = None,
    seed: int = 0,
    device: str | torch.device = "auto",
    metric: str = "val_loss",
    mode: str = "min",
    name: str | None = None,
    storage_path: str | None = None,
    run_config: Any = None,
    max_concurrent_trials: int | None = None,
    verbose: int = 0,
    return_grid: bool = False,
):
    """Train ``configs`` in shards, one Ray Tune trial and one ModelBatch per shard.

    Args:
        configs: P dicts, one per model (hyper-parameters, architecture parameters,
            optionally ``"seed"``); ``"id"`` and ``"shard"`` are reserved.
        build_model: ``build_model(config) -> nn.Module``, run on the worker after
            ``torch.manual_seed(config.get("seed", seed))``.
        train_fn: ``train_fn(batch, configs, callbacks)`` trains a shard's
            ModelBatch and returns a :class:`History` (e.g. :class:`FitTrainer`), a
            ``{name: [n]}`` mapping or ``[n]`` values (named ``metric``).
            ``callbacks`` report to Tune each epoch: pass them to :func:`fit`.
        num_shards / models_per_trial: how to split (exactly one; see
            :func:`split_population`).
        resources_per_trial: what one shard needs (default ``{"cpu": 1}``; e.g.
            ``{"cpu": 2, "gpu": 1}``, or a ``tune.PlacementGroupFactory``).
        seed: the model seed of a config without ``"seed"``.
        device: ``"auto"`` (a GPU if Ray gave the trial one, else the CPU) or a
            device for every shard.
        metric, mode: the column of ``best_<metric>`` in each report (the shard's
            best model) and the name given to ``[n]`` values a ``train_fn`` returns.
        name, storage_path, verbose: for ``tune.RunConfig`` (or pass ``run_config``).
        max_concurrent_trials: at most this many shards at a time (default: as many
            as the cluster's resources allow).
        return_grid: also return Tune's ``ResultGrid``.

    Returns:
        One row per config, in the order of ``configs``: ``id`` (its index), the
        ``shard``, the config's entries and the last reported value of each metric
        (a ``pandas.DataFrame`` if pandas is installed, else a list of dicts);
        ``(rows, result_grid)`` with ``return_grid=True``. Raises ``RuntimeError``
        naming the shards whose trials failed.
    """
    configs = _check_configs(configs)
    for fname, fn in (("build_model", build_model), ("train_fn", train_fn)):
        if not callable(fn):
            raise ValueError(f"{fname} must be callable, got {type(fn).__name__}")
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if device != "auto":
        device = torch.device(device)
    resources = _check_resources(resources_per_trial)
    shards = split_population(
        len(configs), num_shards=num_shards, models_per_trial=models_per_trial
    )
    trainable = tune.with_parameters(
        _train_shard,
        shards=shards,
        configs=[[configs[i] for i in ids] for ids in shards],
        build_model=build_model,
        train_fn=train_fn,
        seed=seed,
        device=device,
        metric=metric,
        mode=mode,
    )
    tuner = tune.Tuner(
        tune.with_resources(trainable, resources),
        param_space={"shard": tune.grid_search(list(range(len(shards))))},
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent_trials),
        run_config=run_config
        or tune.RunConfig(name=name, storage_path=storage_path, verbose=verbose),
    )
    grid = tuner.fit()
    rows = _collect(grid, shards, configs)
    table = _table(rows)
    return (table, grid) if return_grid else table


def _check_configs(configs: Any) -> list[Config]:
    if isinstance(configs, Mapping) or not isinstance(configs, Sequence):
        raise ValueError(
            f"configs must be a list of dicts (one per model), got {type(configs).__name__}"
        )
    if not configs:
        raise ValueError("configs is empty: a population needs at least one config")
    out = []
    for i, cfg in enumerate(configs):
        if not isinstance(cfg, Mapping):
            raise ValueError(f"config {i} must be a dict, got {type(cfg).__name__}")
        clash = [k for k in _RESERVED if k in cfg]
        if clash:
            raise ValueError(
                f"config {i} uses the reserved keys {clash} (the result columns of "
                "a model's index and shard); rename them"
            )
        out.append(dict(cfg))
    return out


def _check_resources(resources: Any) -> Any:
    if resources is None:
        return {"cpu": 1}
    if isinstance(resources, tune.PlacementGroupFactory):
        return resources
    if not isinstance(resources, Mapping) or not resources:
        raise ValueError(
            f"resources_per_trial must be a dict like {{'cpu': 1}} or {{'gpu': 1}}, "
            f"got {resources!r}"
        )
    for key, v in resources.items():
        if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
            raise ValueError(f"resources_per_trial[{key!r}] must be a number >= 0, got {v!r}")
    return dict(resources)


def _collect(grid: Any, shards: Sequence[Sequence[int]], configs: Sequence[Config]) -> list:
    failed, errors, rows = [], [], []
    for result in grid:
        k = result.config["shard"]
        if result.error is not None:
            # Ray's text is the worker's whole traceback; its last line is the error.
            lines = [ln for ln in str(result.error).splitlines() if ln.strip()]
            ids = shards[k]
            failed.append(f"shard {k} (configs {ids[0]}..{ids[-1]}): {lines[-1] if lines else ''}")
            errors.append(result.error)
            continue
        m = result.metrics
        for j, gid in enumerate(shards[k]):
            prefix = f"model_{j}_"
            values = {
                key[len(prefix) :]: v
                for key, v in m.items()
                if key.startswith(prefix) and key != f"{prefix}id"
            }
            rows.append({"id": gid, "shard": k, **configs[gid], **values})
    if failed:
        raise RuntimeError(
            f"{len(failed)} of {len(shards)} shards failed (their trials' errors, with the "
            "workers' tracebacks, are in the ResultGrid):\n" + "\n".join(failed)[:4000]
        ) from errors[0]
    return sorted(rows, key=lambda r: r["id"])


def _table(rows: list[dict[str, Any]]):
    try:
        import pandas as pd
    except ImportError:
        return rows
    return pd.DataFrame(rows)
