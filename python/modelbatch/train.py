"""The loop around the step: ``fit`` and ``evaluate`` for a whole population.

``fit(batch, optimizer, train_loader, loss_fn, epochs=...)`` trains the N models of
a :class:`~modelbatch.ModelBatch` on the loader's batches, evaluates them on
``val_loader`` after every epoch and returns a :class:`History` with one row per
model and epoch. Per step (nothing loops over models in Python):

1. ``batch`` from the loader: ``(inputs, targets)`` (or ``(inputs, targets, ids)``
   for a router that needs the samples' ids); a ``router`` turns it into a
   :class:`~modelbatch.data.RoutedBatch` (per-model rows ``[N, B_max, ...]`` and a
   validity mask) whose padding the loss ignores exactly;
2. forward, per-model losses ``[N]``, one backward;
3. the per-model check: which models' losses or gradients are not finite
   (one fused kernel over the stacked grads, ``modelbatch::amp_unscale_``);
4. per-model clipping (``max_grad_norm``), then one fused optimizer step in which
   the skipped models (non-finite, frozen or stopped) are left out: their
   parameters, optimizer state, step count, buffers (BatchNorm statistics) and
   random streams stay as they were, and no other model's arithmetic depends on
   them, so every other model is bit-identical to a run without them.

Callbacks (:mod:`modelbatch.callbacks`) see a :class:`FitLoop` and act per model
through it (``freeze``, ``stop``, ``reset_model``). Losses, accuracies and the skip
flags stay on the device; the host reads them once per epoch (and, with the
progress bar, at most a few times a second for its best/median figures).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_map
from tqdm.auto import tqdm

from modelbatch.clip import clip_grad_norm_
from modelbatch.core import ModelBatch

__all__ = ["FitLoop", "History", "evaluate", "fit"]

MetricFn = Callable[[Any, Any], torch.Tensor]
_BUILTIN_METRICS = ("loss", "accuracy")
_PROGRESS_INTERVAL_S = 0.5


# ----------------------------------------------------------------- history
class History:
    """What ``fit`` measured: one row per (epoch, model).

    ``rows`` is a list of dicts ``{"epoch", "model", "train_loss", ...,
    "val_loss", ...}``; :meth:`metric` gives a ``[epochs, N]`` tensor of one
    column and :meth:`to_pandas` a DataFrame (pandas is optional).
    """

    def __init__(self, num_models: int) -> None:
        self.num_models = num_models
        self.rows: list[dict[str, Any]] = []
        self._epochs: list[dict[str, torch.Tensor]] = []

    def append(self, epoch: int, logs: Mapping[str, torch.Tensor]) -> None:
        """Record one epoch's per-model ``[N]`` values."""
        logs = {k: v.detach().double().cpu() for k, v in logs.items()}
        self._epochs.append(logs)
        columns = {k: v.tolist() for k, v in logs.items()}
        for i in range(self.num_models):
            row: dict[str, Any] = {"epoch": epoch, "model": i}
            row.update({k: v[i] for k, v in columns.items()})
            self.rows.append(row)

    @property
    def epochs(self) -> int:
        return len(self._epochs)

    @property
    def keys(self) -> list[str]:
        return list(self._epochs[-1]) if self._epochs else []

    def metric(self, name: str) -> torch.Tensor:
        """``[epochs, N]`` float64 values of one column (NaN where an epoch lacks it)."""
        if not any(name in e for e in self._epochs):
            raise KeyError(f"History has no column {name!r}; it has {self.keys}")
        nan = torch.full((self.num_models,), math.nan, dtype=torch.float64)
        return torch.stack([e.get(name, nan) for e in self._epochs])

    def last(self, name: str) -> torch.Tensor:
        """The ``[N]`` values of one column in the last epoch."""
        return self.metric(name)[-1]

    def best_model(self, name: str = "val_loss", mode: str = "min") -> int:
        """The index of the model with the best last-epoch value of ``name``."""
        v = self.last(name).nan_to_num(math.inf if mode == "min" else -math.inf)
        return int(v.argmin() if mode == "min" else v.argmax())

    def to_pandas(self):
        """The rows as a ``pandas.DataFrame`` (needs pandas)."""
        try:
            import pandas as pd
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("History.to_pandas needs pandas: pip install pandas") from err
        return pd.DataFrame(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return f"History(num_models={self.num_models}, epochs={self.epochs}, keys={self.keys})"


# ----------------------------------------------------------------- helpers
def _as_pair(item: Any) -> tuple[Any, Any, Any]:
    """A loader item -> (inputs, targets, ids): (x, y) or (x, y, ids)."""
    if isinstance(item, Mapping):
        raise ValueError(
            "fit/evaluate expect loader items (inputs, targets) or (inputs, targets, ids); "
            "got a dict (use a collate_fn that returns a tuple)"
        )
    if not isinstance(item, Sequence) or len(item) not in (2, 3):
        what = type(item).__name__ if not isinstance(item, Sequence) else f"{len(item)} items"
        raise ValueError(
            "fit/evaluate expect loader items (inputs, targets) or (inputs, targets, ids); "
            f"got {what}"
        )
    return item[0], item[1], item[2] if len(item) == 3 else None


def _metric_fns(metrics: Any) -> dict[str, MetricFn | None]:
    """Normalise ``metrics``: names of built-ins and/or ``{name: fn}``."""
    if metrics is None:
        return {"loss": None}
    if isinstance(metrics, str):
        metrics = (metrics,)
    out: dict[str, MetricFn | None] = {"loss": None}
    items = metrics.items() if isinstance(metrics, Mapping) else ((m, None) for m in metrics)
    for name, fn in items:
        if fn is None and name not in _BUILTIN_METRICS:
            raise ValueError(
                f"unknown metric {name!r}: built-ins are {_BUILTIN_METRICS}; pass "
                "{name: fn} with fn(outputs [N, B, ...], targets) -> [N] or [N, B] for others"
            )
        if fn is not None and not callable(fn):
            raise ValueError(f"metric {name!r} must be callable, got {type(fn).__name__}")
        out[name] = fn
    return out


class _Accumulator:
    """Per-model running sums of metrics over an epoch, on the device."""

    def __init__(self, n: int, device: torch.device) -> None:
        self.n = n
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.weights: dict[str, torch.Tensor] = {}

    def add(self, name: str, values: torch.Tensor, weight: torch.Tensor) -> None:
        """``values [N]`` (means over the batch) weighted by ``weight [N]`` rows."""
        values = values.detach().to(self.device, torch.float64)
        weight = weight.to(self.device, torch.float64)
        # A skipped model's NaN loss must not poison its epoch mean: count it apart.
        contrib = torch.where(weight > 0, values * weight, 0.0)
        if name not in self.sums:
            self.sums[name] = torch.zeros(self.n, dtype=torch.float64, device=self.device)
            self.weights[name] = torch.zeros_like(self.sums[name])
        self.sums[name] += contrib
        self.weights[name] += weight

    def means(self, prefix: str) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}{k}": torch.where(
                self.weights[k] > 0, s / self.weights[k].clamp(min=1), math.nan
            )
            for k, s in self.sums.items()
        }


def _route(batch: ModelBatch, router: Any, inputs: Any, targets: Any, ids: Any, split: str):
    """(inputs, targets, mask [N, B_max] or None) for one loader item."""
    from modelbatch.data import route_split

    if router is None:
        return inputs, targets, None
    if batch.shared_input:
        raise ValueError(
            "a router gives each model its own rows: build the ModelBatch with shared_input=False"
        )
    routed = route_split(router, (inputs, targets), ids, split, batch.num_models)
    if routed is None:  # every model sees the whole batch
        n = batch.num_models
        expand = lambda t: t.expand(n, *t.shape) if torch.is_tensor(t) else t
        return tree_map(expand, inputs), targets, None
    return routed.data[0], routed.data[1], routed.mask


def _rows(targets: Any, mask: torch.Tensor | None, n: int, device) -> torch.Tensor:
    """Rows per model of one batch, float64 ``[N]``: the batch size, or the routed
    counts."""
    if mask is not None:
        return mask.sum(dim=1).to(device, torch.float64)
    leaves = [t for t in torch.utils._pytree.tree_leaves(targets) if torch.is_tensor(t)]
    rows = leaves[0].shape[0] if leaves else 1
    return torch.full((n,), float(rows), dtype=torch.float64, device=device)


def _batch_metrics(
    batch: ModelBatch,
    outputs: Any,
    targets: Any,
    mask: torch.Tensor | None,
    fns: Mapping[str, MetricFn | None],
) -> dict[str, torch.Tensor]:
    """Per-model ``[N]`` batch means of the metrics other than the loss."""
    out: dict[str, torch.Tensor] = {}
    for name, fn in fns.items():
        if name == "loss":
            continue
        if fn is None:  # accuracy
            if not torch.is_tensor(outputs) or outputs.dim() < 3:
                raise ValueError(
                    "the accuracy metric needs logits [N, B, C]; got "
                    f"{tuple(outputs.shape) if torch.is_tensor(outputs) else type(outputs)}"
                )
            values = (outputs.argmax(dim=-1) == targets).double()  # [N, B] (or [B])
            if values.dim() == 1:
                values = values.expand(batch.num_models, -1)
        else:
            values = fn(outputs, targets)
        if not torch.is_tensor(values) or values.dim() not in (1, 2):
            raise ValueError(f"metric {name!r} must return [N] or [N, B], got {values!r:.80}")
        if values.shape[0] != batch.num_models:
            raise ValueError(
                f"metric {name!r} returned shape {tuple(values.shape)}, expected "
                f"[N={batch.num_models}] or [N, B]"
            )
        if values.dim() == 2:
            values = values.double()
            if mask is not None:
                values = torch.where(mask, values, 0.0).sum(1) / mask.sum(1).clamp(min=1)
            else:
                values = values.mean(dim=1)
        out[name] = values
    return out


def _losses(batch, outputs, targets, loss_fn, mask) -> torch.Tensor:
    return batch.compute_loss(outputs, targets, loss_fn, reduction="none", mask=mask)


# ------------------------------------------------------------------- the loop
class FitLoop:
    """The state of a running ``fit``, handed to every callback.

    Attributes: ``batch``, ``optimizer``, ``scaler``, ``epoch`` (from 0),
    ``global_step``, ``num_models``, ``history``, ``logs`` (the last epoch's
    ``[N]`` CPU tensors), ``stop_training`` (set True to end after this batch).
    Frozen or stopped models get no further updates (see :meth:`freeze`); the
    mask lives on the device, so callbacks can freeze models from device-side
    checks without a host synchronisation (:meth:`freeze_where`).
    """

    def __init__(self, batch: ModelBatch, optimizer, scaler=None) -> None:
        self.batch = batch
        self.optimizer = optimizer
        self.scaler = scaler
        self.num_models = batch.num_models
        self.epoch = 0
        self.global_step = 0
        self.stop_training = False
        self.history = History(batch.num_models)
        self.logs: dict[str, torch.Tensor] = {}
        self.device = _device_of(batch)
        self._frozen = torch.zeros(batch.num_models, dtype=torch.bool, device=self.device)
        self._initial: dict[str, torch.Tensor] | None = None

    # ---------------------------------------------------------- per-model control
    def _mask(self, models: Any) -> torch.Tensor:
        """Indices or a bool ``[N]`` mask -> a bool ``[N]`` mask on the device."""
        n = self.num_models
        if torch.is_tensor(models) and models.dtype == torch.bool:
            if models.shape != (n,):
                raise ValueError(f"a model mask must be bool [N={n}], got {tuple(models.shape)}")
            return models.to(self.device)
        idx = torch.as_tensor([models] if isinstance(models, int) else models, dtype=torch.long)
        idx = idx.flatten()
        bad = idx[(idx < 0) | (idx >= n)]
        if bad.numel():
            raise ValueError(f"model indices {bad.tolist()} out of range for {n} models")
        mask = torch.zeros(n, dtype=torch.bool)
        mask[idx] = True
        return mask.to(self.device)

    def freeze(self, models: Any) -> None:
        """Stop updating ``models`` (indices, or a bool ``[N]`` mask): from now on their
        weights, buffers, optimizer state, step counts and random streams stay as they
        are, while the others train on unchanged."""
        self._frozen |= self._mask(models)

    freeze_where = freeze

    def unfreeze(self, models: Any) -> None:
        self._frozen &= ~self._mask(models)

    def stop(self, models: Any) -> None:
        """Early-stop ``models`` (they are frozen); the run ends once all are stopped."""
        self.freeze(models)
        if bool(self._frozen.all()):
            self.stop_training = True

    @property
    def frozen(self) -> torch.Tensor:
        """Bool ``[N]`` CPU tensor: the models that no longer train (reads the device)."""
        return self._frozen.cpu()

    @property
    def active(self) -> torch.Tensor:
        """Bool ``[N]`` CPU tensor: the models still being trained."""
        return ~self.frozen

    @torch.no_grad()
    def snapshot_initial(self) -> None:
        """Remember the models' current weights and buffers for :meth:`reset_model`."""
        self._initial = {
            n: t.detach().clone()
            for n, t in {**self.batch.stacked_params(), **self.batch.stacked_buffers()}.items()
        }

    @torch.no_grad()
    def reset_model(self, models: Any) -> None:
        """Put ``models`` (indices or a bool ``[N]`` mask) back to their state when
        ``fit`` started (weights, buffers) with a fresh optimizer state (moments zeroed,
        step count 0) and unfreeze them; their random streams go on (a restart draws
        new dropout masks). With a device mask nothing is read back to the host
        (except for a ``PerModelOptimizer``, whose state lives per model)."""
        if self._initial is None:
            raise RuntimeError("reset_model needs the initial state: call snapshot_initial()")
        mask = self._mask(models)
        for name, t in {**self.batch.stacked_params(), **self.batch.stacked_buffers()}.items():
            _where_rows_(t, mask, self._initial[name])
        _reset_optimizer_rows(self.optimizer, mask)
        self.unfreeze(mask)


def _where_rows_(t: torch.Tensor, mask: torch.Tensor, src: torch.Tensor) -> None:
    """``t[i] = src[i]`` wherever ``mask[i]`` (bool ``[N]``), with no host sync."""
    view = mask.to(t.device).view((-1,) + (1,) * (t.dim() - 1))
    t.copy_(torch.where(view, src.to(t.device), t))


def _device_of(batch: ModelBatch) -> torch.device:
    t = next(iter(batch.parameters()), None)
    return t.device if t is not None else torch.device("cpu")


def _reset_optimizer_rows(optimizer, mask: torch.Tensor) -> None:
    from modelbatch.optim._base import FusedOptimizer
    from modelbatch.optimizer import PerModelOptimizer

    if optimizer is None:
        return
    if isinstance(optimizer, FusedOptimizer):
        for state in optimizer.state.values():
            for t in state.values():
                _where_rows_(t, mask, torch.zeros_like(t))
        _where_rows_(optimizer.steps, mask, torch.zeros_like(optimizer.steps))
    elif isinstance(optimizer, PerModelOptimizer):
        for i in mask.nonzero().flatten().tolist():
            for v in optimizer._views[i]:
                optimizer.inner.state.pop(v, None)
    else:
        raise ValueError(
            f"cannot reset one model's state in a {type(optimizer).__name__}; use "
            "modelbatch.optim or PerModelOptimizer"
        )


# --------------------------------------------------------------- per-model skip
class _Snapshot:
    """The parts of a ModelBatch that a forward changes without the optimizer
    (buffers such as BatchNorm statistics, the random streams), so that a skipped
    model can be put back exactly as it was before the step."""

    def __init__(self, batch: ModelBatch) -> None:
        self.batch = batch
        self.buffers = {
            n: b.detach().clone()
            for n, b in batch.stacked_buffers().items()
            if b.dim() > 0 and b.shape[0] == batch.num_models
        }
        if batch.rng == "philox":
            self.buffers["rng_offsets"] = batch.rng_offsets.detach().clone()
        self.torch_states = None
        if batch.rng == "torch":
            batch._torch_streams._states_for(_device_of(batch))  # created on first use
            self.torch_states = {k: list(v) for k, v in batch._torch_streams.states.items()}

    @torch.no_grad()
    def restore(self, skip: torch.Tensor) -> None:
        """Put back model i's buffers and stream wherever ``skip[i]`` (bool ``[N]``)."""
        live = self.batch.stacked_buffers()
        for name, saved in self.buffers.items():
            _where_rows_(live[name] if name in live else self.batch.rng_offsets, skip, saved)
        if self.torch_states is not None:
            # rng="torch" streams live on the host; this needs the skip list (one sync).
            idx = skip.nonzero().flatten().tolist()
            states = self.batch._torch_streams.states
            for key, saved in self.torch_states.items():
                for i in idx:
                    if key in states:
                        states[key][i] = saved[i]


def _scaling(scaler) -> bool:
    return scaler is not None and bool(getattr(scaler, "_enabled", False))


def _nonfinite_grads(batch: ModelBatch, found: torch.Tensor) -> torch.Tensor:
    """Bool ``[N]``: model i has an inf/NaN gradient (or ``found[i]`` was set): one
    fused pass over the stacked grads (``modelbatch::amp_unscale_``, check only)."""
    from modelbatch.ops import amp as amp_op

    buckets: dict[tuple, list[torch.Tensor]] = {}
    for p in batch.parameters():
        if p.grad is not None:
            buckets.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad.contiguous())
    for (device, _), gs in buckets.items():
        f = found.to(device)
        amp_op.amp_unscale_(gs, f, torch.ones_like(f), False)
        found = torch.maximum(found, f.to(found.device))
    return found != 0


def _optimizer_step(optimizer, scaler, skip: torch.Tensor) -> None:
    """One step of every model not in ``skip`` (bool ``[N]`` on the device)."""
    from modelbatch.optim._base import FusedOptimizer

    if _scaling(scaler):
        # Fold the skipped models into the scaler's own overflow flags (recorded by
        # unscale_), so its step leaves them out like an overflowing model.
        found = scaler._state(optimizer)["found_inf"]
        found.copy_(torch.maximum(found, skip.to(found)))
        return scaler.step(optimizer)
    if isinstance(optimizer, FusedOptimizer):
        return optimizer.step(found_inf=skip.float())
    return optimizer.step(skip=skip.cpu())


def _scaler_update(scaler, frozen: torch.Tensor) -> None:
    """``scaler.update()``, keeping the scale and growth tracker of frozen / stopped
    models as they were (they sat the step out; it was no overflow)."""
    if not _scaling(scaler):
        return
    scale, tracker = scaler._scale.clone(), scaler._growth_tracker.clone()
    scaler.update()
    keep = frozen.to(scale.device)
    scaler._scale.copy_(torch.where(keep, scale, scaler._scale))
    scaler._growth_tracker.copy_(torch.where(keep, tracker, scaler._growth_tracker))


# ----------------------------------------------------------------- evaluate
@torch.no_grad()
def evaluate(
    batch: ModelBatch,
    loader: Iterable,
    loss_fn: Callable[..., torch.Tensor],
    *,
    metrics: Any = ("loss", "accuracy"),
    router: Any = None,
    prefix: str = "",
    autocast: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Every model's metrics over ``loader`` in eval mode: ``{prefix + name: [N]}``
    float64 CPU tensors (means over each model's rows; ``router`` as in :func:`fit`,
    with ``split="val"``)."""
    if not isinstance(batch, ModelBatch):
        raise ValueError(f"evaluate takes a ModelBatch, got {type(batch).__name__}")
    fns = _metric_fns(metrics)
    was_training = batch.training
    batch.eval()
    device = _device_of(batch)
    acc = _Accumulator(batch.num_models, device)
    saved_losses = batch.latest_losses
    try:
        for item in loader:
            inputs, targets, ids = _as_pair(item)
            inputs, targets, mask = _route(batch, router, inputs, targets, ids, "val")
            with _autocast(device, autocast):
                outputs = batch(inputs)
                losses = _losses(batch, outputs, targets, loss_fn, mask)
            counts = _rows(targets, mask, batch.num_models, device)
            acc.add("loss", losses, counts)
            for name, v in _batch_metrics(batch, outputs, targets, mask, fns).items():
                acc.add(name, v, counts)
    finally:
        batch.train(was_training)
        batch.latest_losses = saved_losses
    if not acc.sums:
        raise ValueError("evaluate: the loader yielded no batches")
    return {k: v.cpu() for k, v in acc.means(prefix).items()}


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# ---------------------------------------------------------------------- fit
def fit(
    batch: ModelBatch,
    optimizer,
    train_loader: Iterable,
    loss_fn: Callable[..., torch.Tensor],
    *,
    epochs: int,
    val_loader: Iterable | None = None,
    metrics: Any = ("loss", "accuracy"),
    callbacks: Any = None,
    scaler=None,
    router: Any = None,
    scheduler=None,
    scheduler_interval: str = "epoch",
    max_grad_norm: Any = None,
    autocast: torch.dtype | None = None,
    progress: bool = True,
) -> History:
    """Train every model of ``batch`` for ``epochs`` epochs; see the module docstring.

    Args:
        batch: the ModelBatch; ``optimizer``: a modelbatch fused optimizer or a
            :class:`~modelbatch.PerModelOptimizer` over it.
        train_loader, val_loader: iterables of ``(inputs, targets)`` or
            ``(inputs, targets, ids)`` (e.g. ``torch.utils.data.DataLoader``); inputs
            ``[B, ...]`` for a shared-input ModelBatch, ``[N, B, ...]`` otherwise.
        loss_fn: the loss of ONE model (a scalar), e.g. ``F.cross_entropy``.
        metrics: names of built-ins (``"loss"``, ``"accuracy"``) and/or
            ``{name: fn(outputs [N, B, ...], targets) -> [N] or [N, B]}``.
        callbacks: a :class:`~modelbatch.callbacks.Callback`, a list of them or a
            :class:`~modelbatch.callbacks.CallbackPack`.
        scaler: a :class:`modelbatch.amp.GradScaler` (per-model loss scales).
        router: a :mod:`modelbatch.data` router (``KFoldRouter``, ``BootstrapRouter``,
            ``StratifiedRouter``; the loader then yields ``(inputs, targets,
            sample_ids)``) or a callable ``router(batch, sample_ids, split)`` returning
            a :class:`~modelbatch.data.RoutedBatch`, so model i trains on its own rows
            only (and validates on its own fold / out-of-bag rows; see
            :func:`modelbatch.data.route_split`). Needs ``shared_input=False``.
        scheduler: a ``torch.optim.lr_scheduler`` over ``optimizer``, stepped every
            epoch (``scheduler_interval="epoch"``) or every batch (``"step"``).
        max_grad_norm: per-model gradient clipping (a scalar or N values).
        autocast: a dtype (``torch.bfloat16`` / ``torch.float16``) to run forward and
            loss under ``torch.autocast``.
        progress: a tqdm bar with the best and median model's running loss.

    Returns:
        A :class:`History`: per epoch and model ``train_loss``, ``train_<metric>``,
        ``val_loss``, ``val_<metric>``, ``lr`` (where the optimizer has one) and
        ``skipped_steps`` (steps a model sat out: non-finite, frozen or stopped).
    """
    from modelbatch.callbacks import CallbackPack

    if not isinstance(batch, ModelBatch):
        raise ValueError(f"fit takes a ModelBatch, got {type(batch).__name__}")
    if getattr(optimizer, "batch", None) is not batch:
        raise ValueError(
            "fit: the optimizer does not belong to this ModelBatch (build it with "
            "modelbatch.optim.*(batch, ...) or OptimizerFactory.create_optimizer(batch, ...))"
        )
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"fit: epochs must be an int >= 0, got {epochs!r}")
    if scheduler_interval not in ("epoch", "step"):
        raise ValueError(
            f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}"
        )
    fns = _metric_fns(metrics)
    pack = callbacks if isinstance(callbacks, CallbackPack) else CallbackPack(callbacks)
    loop = FitLoop(batch, optimizer, scaler)
    loop.snapshot_initial()
    n, device = batch.num_models, loop.device
    pack.on_fit_start(loop)
    bar = None
    try:
        for epoch in range(epochs):
            loop.epoch = epoch
            batch.train()
            pack.on_epoch_start(loop)
            acc = _Accumulator(n, device)
            skipped = torch.zeros(n, dtype=torch.float64, device=device)
            total = len(train_loader) if hasattr(train_loader, "__len__") else None
            bar = tqdm(
                total=total, desc=f"epoch {epoch + 1}/{epochs}", disable=not progress, leave=False
            )
            last_shown = 0.0
            for item in train_loader:
                inputs, targets, ids = _as_pair(item)
                inputs, targets, mask = _route(batch, router, inputs, targets, ids, "train")
                snap = _Snapshot(batch)
                optimizer.zero_grad(set_to_none=True)
                with _autocast(device, autocast):
                    outputs = batch(inputs)
                    losses = _losses(batch, outputs, targets, loss_fn, mask)
                pack.on_loss(loop, losses)
                if scaler is not None:
                    scaler.scale(losses).backward()
                else:
                    losses.sum().backward()
                if _scaling(scaler):
                    scaler.unscale_(optimizer)
                norms = None if max_grad_norm is None else clip_grad_norm_(batch, max_grad_norm)
                bad = ~torch.isfinite(losses.detach())
                if _scaling(scaler):
                    pass  # overflowing scaled grads are the scaler's business (skip, back off)
                elif norms is not None:  # a non-finite gradient makes its model's norm so
                    bad |= ~torch.isfinite(norms)
                else:
                    bad |= _nonfinite_grads(batch, bad.float())
                pack.on_nonfinite(loop, bad)
                frozen = loop._frozen.clone()
                skip = bad | frozen
                _optimizer_step(optimizer, scaler, skip)
                _scaler_update(scaler, frozen)
                snap.restore(skip)
                if scheduler is not None and scheduler_interval == "step":
                    scheduler.step()
                counts = _rows(targets, mask, n, device)
                live = torch.where(skip, 0.0, counts)
                acc.add("loss", losses, live)
                with torch.no_grad():
                    for name, v in _batch_metrics(batch, outputs, targets, mask, fns).items():
                        acc.add(name, v, live)
                skipped += skip.double()
                loop.global_step += 1
                pack.on_step_end(loop, losses, skip)
                bar.update(1)
                if progress and time.monotonic() - last_shown > _PROGRESS_INTERVAL_S:
                    last_shown = time.monotonic()
                    bar.set_postfix(_postfix(losses, skip))
                if loop.stop_training:
                    break
            bar.close()
            logs = {k: v.cpu() for k, v in acc.means("train_").items()}
            if val_loader is not None:
                logs.update(
                    evaluate(
                        batch, val_loader, loss_fn, metrics=metrics, router=router,
                        prefix="val_", autocast=autocast,
                    )
                )  # fmt: skip
            lr = _lrs(optimizer)
            if lr is not None:
                logs["lr"] = lr
            logs["skipped_steps"] = skipped.cpu()
            loop.logs = logs
            pack.on_epoch_end(loop, logs)
            loop.history.append(epoch, logs)
            if scheduler is not None and scheduler_interval == "epoch":
                scheduler.step()
            if progress:
                tqdm.write(_epoch_line(epoch, epochs, logs, loop))
            if loop.stop_training:
                break
    finally:
        if bar is not None:
            bar.close()
    pack.on_fit_end(loop)
    return loop.history


def _lrs(optimizer) -> torch.Tensor | None:
    groups = getattr(optimizer, "param_groups", None)
    if not groups or "lr" not in groups[0]:
        return None
    return torch.tensor([float(g["lr"]) for g in groups], dtype=torch.float64)


def _postfix(losses: torch.Tensor, skip: torch.Tensor) -> dict[str, str]:
    live = torch.where(skip, math.nan, losses.detach().double())
    return {
        "best": f"{live.nan_to_num(math.inf).min().item():.4g}",
        "median": f"{live.nanmedian().item():.4g}",
    }


def _epoch_line(epoch: int, epochs: int, logs: Mapping[str, torch.Tensor], loop: FitLoop) -> str:
    parts = [f"epoch {epoch + 1}/{epochs}"]
    for key in ("train_loss", "val_loss", "val_accuracy"):
        if key in logs:
            v = logs[key]
            best = (
                v.nan_to_num(-math.inf).max() if "accuracy" in key else v.nan_to_num(math.inf).min()
            )
            parts.append(f"{key} best {best.item():.4g} median {v.nanmedian().item():.4g}")
    if bool(loop.frozen.any()):
        parts.append(f"frozen {int(loop.frozen.sum())}/{loop.num_models}")
    return " | ".join(parts)
