"""Per-model mixed precision: a loss scale per model.

``torch.amp.GradScaler`` keeps one loss scale. Shared by N batched models, one
model's overflow skips every model's step and halves everyone's scale, so the
models no longer train as they would alone. :class:`GradScaler` keeps N scales
and N growth trackers and skips each model's step on its own::

    scaler = modelbatch.amp.GradScaler(batch)
    with torch.autocast("cuda", dtype=torch.float16):
        losses = batch.compute_loss(batch(x), y, F.cross_entropy, reduction="none")  # [N]
    scaler.scale(losses).backward()   # model i's loss times its own scale
    scaler.unscale_(opt)              # optional: to clip unscaled grads
    modelbatch.clip_grad_norm_(batch, 1.0)
    scaler.step(opt)                  # each model with inf/NaN grads skips its own step
    scaler.update()                   # each model backs off or grows its own scale

Model i then follows ``torch.amp.GradScaler`` run alone on model i: same scale
trajectory, same skipped steps, same parameters.

How it runs. ``unscale_`` is one kernel per (device, dtype) that unscales every
model's grads and records which models hold inf/NaN (``found_inf``, ``[N]``)
(``modelbatch::amp_unscale_``). Without an explicit ``unscale_``, ``step`` with a
fused optimizer (:mod:`modelbatch.optim`) only checks the grads, and the optimizer
kernel itself unscales them and skips the flagged models, with no extra pass that
writes the grads. ``found_inf`` never leaves the device: nothing synchronises
with the host, per model or at all (except for :class:`~modelbatch.PerModelOptimizer`,
which wraps a ``torch.optim`` optimizer and reads ``found_inf`` once per step).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from modelbatch.core import ModelBatch, model_indices
from modelbatch.ops import amp as amp_op
from modelbatch.optim._base import FusedOptimizer, per_model

__all__ = ["GradScaler"]

_KEYS = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")


class _Stage(enum.Enum):
    READY = 0
    UNSCALED = 1
    STEPPED = 2


class GradScaler:
    """A loss scale per model of a :class:`~modelbatch.ModelBatch`, with the API of
    ``torch.amp.GradScaler``.

    Args:
        batch: the ModelBatch whose N models are scaled.
        init_scale, growth_factor, backoff_factor, growth_interval: as in
            ``torch.amp.GradScaler``; each a scalar (every model) or N values
            (one per model).
        enabled: False makes every method a no-op (``scale`` just sums the losses),
            so one script runs with and without mixed precision.
    """

    def __init__(
        self,
        batch: ModelBatch,
        init_scale: Any = 2.0**16,
        growth_factor: Any = 2.0,
        backoff_factor: Any = 0.5,
        growth_interval: Any = 2000,
        enabled: bool = True,
    ) -> None:
        if not isinstance(batch, ModelBatch):
            raise ValueError(
                f"GradScaler takes the ModelBatch it scales, got {type(batch).__name__}"
            )
        self.batch = batch
        self.num_models = n = batch.num_models
        self._enabled = bool(enabled)
        params = list(batch.parameters())
        self.device = params[0].device if params else torch.device("cpu")
        init = per_model("init_scale", init_scale, n)
        growth = per_model("growth_factor", growth_factor, n)
        backoff = per_model("backoff_factor", backoff_factor, n)
        interval = per_model("growth_interval", growth_interval, n)
        self._validate(init, growth, backoff, interval, "GradScaler")
        self._scale = torch.from_numpy(init).to(self.device, torch.float32)
        self._growth_tracker = torch.zeros(n, dtype=torch.int32, device=self.device)
        self._growth_factor = growth
        self._backoff_factor = backoff
        self._growth_interval = interval.astype(np.int64)
        self._factors_cache: tuple[torch.Tensor, ...] | None = None
        self._per_optimizer: dict[int, dict[str, Any]] = {}

    # ------------------------------------------------------------ validation
    @staticmethod
    def _validate(init, growth, backoff, interval, where: str) -> None:
        checks = [
            (init, lambda v: np.isfinite(v) & (v > 0), "init_scale must be finite and > 0"),
            (growth, lambda v: v > 1.0, "growth_factor must be > 1.0"),
            (backoff, lambda v: (v > 0.0) & (v < 1.0), "backoff_factor must be in (0, 1)"),
            (
                interval,
                lambda v: (v >= 1) & (v == np.floor(v)),
                "growth_interval must be an integer >= 1",
            ),
        ]
        for values, ok, msg in checks:
            bad = np.flatnonzero(~ok(np.asarray(values, dtype=np.float64)))
            if bad.size:
                i = int(bad[0])
                raise ValueError(f"{where}: {msg}; model {i} has {values[i]!r}")

    def _check_batch(self, optimizer: Any, where: str) -> None:
        batch = getattr(optimizer, "batch", None)
        if not isinstance(optimizer, FusedOptimizer | _per_model_optimizer()) or not isinstance(
            batch, ModelBatch
        ):
            raise ValueError(
                f"GradScaler.{where} needs an optimizer over a ModelBatch (modelbatch.optim.SGD/"
                "Adam/AdamW or a PerModelOptimizer, e.g. from OptimizerFactory), so that each "
                f"model can skip its own step; got {type(optimizer).__name__}"
            )
        if batch.num_models != self.num_models:
            raise ValueError(
                f"GradScaler.{where}: this scaler was built for a ModelBatch of "
                f"{self.num_models} models, the optimizer is over one of {batch.num_models}"
            )

    # ------------------------------------------------------------------ API
    def is_enabled(self) -> bool:
        return self._enabled

    def scale(self, losses: torch.Tensor) -> torch.Tensor:
        """The scalar to call ``backward()`` on: ``sum_i losses[i] * scale[i]``.

        ``losses`` are the per-model losses ``[N]``, as returned by
        ``batch.compute_loss(..., reduction="none")``. The gradient reaching
        model i's loss is its own scale, exactly as ``torch.amp.GradScaler.scale``
        gives a model trained alone. Disabled: ``losses.sum()``.
        """
        n = self.num_models
        if not isinstance(losses, torch.Tensor):
            raise ValueError(
                f"GradScaler.scale takes the per-model losses, a tensor [N={n}]; "
                f"got {type(losses).__name__}"
            )
        if losses.dim() != 1 or losses.shape[0] != n:
            what = "a scalar" if losses.dim() == 0 else f"shape {tuple(losses.shape)}"
            raise ValueError(
                f"GradScaler.scale needs the per-model losses [N={n}] "
                '(batch.compute_loss(..., reduction="none")), got '
                f"{what}: a summed loss cannot be scaled per model"
            )
        if not self._enabled:
            return losses.sum()
        return (losses * self._scale.to(device=losses.device, non_blocking=True)).sum()

    def _state(self, optimizer) -> dict[str, Any]:
        return self._per_optimizer.setdefault(
            id(optimizer), {"stage": _Stage.READY, "found_inf": None}
        )

    def _grad_buckets(self, optimizer) -> dict[tuple, list[torch.Tensor]]:
        params = getattr(optimizer, "_params", None) or optimizer._stacked
        out: dict[tuple, list[torch.Tensor]] = {}
        for p in params:
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                raise RuntimeError("GradScaler: sparse gradients are not supported")
            if g.dtype == torch.float16:
                raise ValueError(
                    "GradScaler: attempting to unscale FP16 gradients (as torch.amp.GradScaler "
                    "refuses to): keep the parameters in float32 and let torch.autocast run "
                    "the forward in float16"
                )
            if not g.is_contiguous():
                p.grad = g = g.contiguous()
            out.setdefault((g.device, g.dtype), []).append(g)
        return out

    def _check_and_unscale(self, optimizer, inv: torch.Tensor, write: bool) -> torch.Tensor:
        """``found_inf [N]`` of the optimizer's grads; unscales them by ``inv`` if ``write``."""
        buckets = self._grad_buckets(optimizer)
        if not buckets:
            raise RuntimeError(
                "GradScaler: no inf checks were recorded for this optimizer (none of its "
                "parameters has a gradient; call backward() on scaler.scale(losses) first)"
            )
        found = torch.zeros(self.num_models, dtype=torch.float32, device=self.device)
        with torch.no_grad():
            for (device, _), grads in buckets.items():
                f = found if device == self.device else found.to(device)
                amp_op.amp_unscale_(grads, f, inv.to(device), write)
                if f is not found:
                    found.copy_(torch.maximum(found, f.to(self.device)))
        return found

    def _inv_scale(self) -> torch.Tensor:
        # In float64, as torch does: a float32 division may be inexact.
        return self._scale.double().reciprocal().float()

    def unscale_(self, optimizer) -> None:
        """Divide each model's grads by its own scale, and record which models hold
        inf/NaN. Optional: call it to work on unscaled grads (clipping) before
        :meth:`step`. At most once per optimizer between updates."""
        if not self._enabled:
            return
        self._check_batch(optimizer, "unscale_")
        state = self._state(optimizer)
        if state["stage"] is _Stage.UNSCALED:
            raise RuntimeError(
                "unscale_() has already been called on this optimizer since the last update()."
            )
        if state["stage"] is _Stage.STEPPED:
            raise RuntimeError("unscale_() is being called after step().")
        state["found_inf"] = self._check_and_unscale(optimizer, self._inv_scale(), write=True)
        state["stage"] = _Stage.UNSCALED

    def step(self, optimizer, *args: Any, **kwargs: Any) -> Any:
        """Step every model whose grads are finite; skip the others (their parameters,
        optimizer state and step count stay as they are). Unscales first unless
        :meth:`unscale_` was called. Returns ``optimizer.step``'s return value."""
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        if "closure" in kwargs or args:
            raise RuntimeError(
                "GradScaler.step does not support a closure (as torch.amp.GradScaler)"
            )
        self._check_batch(optimizer, "step")
        state = self._state(optimizer)
        if state["stage"] is _Stage.STEPPED:
            raise RuntimeError("step() has already been called since the last update().")
        fused = isinstance(optimizer, FusedOptimizer)
        if state["stage"] is _Stage.READY:
            if fused:
                # Check only; the optimizer kernel unscales as it reads the grads.
                inv = self._inv_scale()
                found = self._check_and_unscale(optimizer, inv, write=False)
                state["found_inf"] = found
                out = optimizer.step(inv_scale=inv, found_inf=found, **kwargs)
                state["stage"] = _Stage.STEPPED
                return out
            self.unscale_(optimizer)
        found = state["found_inf"]
        if fused:
            out = optimizer.step(found_inf=found, **kwargs)
        else:
            # A torch.optim optimizer: one host read for the whole batch.
            out = optimizer.step(skip=found.cpu() != 0, **kwargs)
        state["stage"] = _Stage.STEPPED
        return out

    def _factors(self) -> tuple[torch.Tensor, ...]:
        if self._factors_cache is None:
            dt = torch.float32 if self.device.type == "cuda" else torch.float64
            self._factors_cache = (
                torch.from_numpy(self._growth_factor).to(self.device, dt),
                torch.from_numpy(self._backoff_factor).to(self.device, dt),
                torch.from_numpy(self._growth_interval).to(self.device, torch.int32),
            )
        return self._factors_cache

    def update(self, new_scale: float | torch.Tensor | None = None) -> None:
        """Per model: back off the scale if its step was skipped, grow it after
        ``growth_interval`` unskipped steps in a row (as ``torch.amp.GradScaler``
        does for one model). ``new_scale`` (a scalar or N values) sets the scales
        instead."""
        if not self._enabled:
            return
        if new_scale is not None:
            values = per_model("new_scale", new_scale, self.num_models)
            if not np.all(np.isfinite(values) & (values > 0)):
                raise ValueError(f"update: new_scale must be finite and > 0, got {values}")
            self._scale.copy_(torch.from_numpy(values).to(self._scale))
        else:
            founds = [
                st["found_inf"]
                for st in self._per_optimizer.values()
                if st["found_inf"] is not None
            ]
            if not founds:
                raise RuntimeError(
                    "GradScaler.update: no inf checks were recorded prior to update() "
                    "(call scaler.step(optimizer) first)"
                )
            found = founds[0]
            for f in founds[1:]:
                found = found + f
            self._update_scale(found != 0)
        self._per_optimizer.clear()

    @torch.no_grad()
    def _update_scale(self, found: torch.Tensor) -> None:
        # torch._amp_update_scale_ per model, as [N] tensor ops: no host sync. The
        # products are taken in the precision torch's own kernel uses on this device.
        growth, backoff, interval = self._factors()
        scale = self._scale.to(growth.dtype)
        tracker = self._growth_tracker + 1
        grow = ~found & (tracker == interval)
        grown = (scale * growth).float()
        grown = torch.where(torch.isfinite(grown), grown, self._scale)
        new = torch.where(found, (scale * backoff).float(), torch.where(grow, grown, self._scale))
        self._scale.copy_(new)
        self._growth_tracker.copy_(torch.where(found | grow, 0, tracker))

    # ------------------------------------------------------------ accessors
    def get_scale(self) -> torch.Tensor:
        """The ``[N]`` float32 scales (ones when disabled), a copy on the scaler's device."""
        if not self._enabled:
            return torch.ones(self.num_models, dtype=torch.float32, device=self.device)
        return self._scale.clone()

    def get_growth_tracker(self) -> torch.Tensor:
        """The ``[N]`` counts of consecutive unskipped steps since each model's last
        growth or backoff."""
        return self._growth_tracker.clone()

    def get_growth_factor(self) -> list[float]:
        return self._growth_factor.tolist()

    def set_growth_factor(self, new_factor: Any) -> None:
        self._set_factor("growth_factor", new_factor)

    def get_backoff_factor(self) -> list[float]:
        return self._backoff_factor.tolist()

    def set_backoff_factor(self, new_factor: Any) -> None:
        self._set_factor("backoff_factor", new_factor)

    def get_growth_interval(self) -> list[int]:
        return self._growth_interval.tolist()

    def set_growth_interval(self, new_interval: Any) -> None:
        self._set_factor("growth_interval", new_interval)

    def _set_factor(self, name: str, value: Any) -> None:
        """Set one of the factors (a scalar or N values), validated first."""
        factors = {
            "growth_factor": self._growth_factor,
            "backoff_factor": self._backoff_factor,
            "growth_interval": self._growth_interval,
        }
        factors[name] = per_model(name, value, self.num_models)
        self._validate(self._scale.cpu().double().numpy(), *factors.values(), f"set_{name}")
        self._growth_factor = factors["growth_factor"]
        self._backoff_factor = factors["backoff_factor"]
        self._growth_interval = factors["growth_interval"].astype(np.int64)
        self._factors_cache = None

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Per-model tensors under torch's keys (``"scale"``, ``"growth_factor"``,
        ``"backoff_factor"``, ``"growth_interval"``, ``"_growth_tracker"``), each
        ``[N]`` on the CPU, plus ``"num_models"``. Empty when disabled."""
        if not self._enabled:
            return {}
        return {
            "num_models": self.num_models,
            "scale": self._scale.cpu().clone(),
            "growth_factor": torch.from_numpy(self._growth_factor.copy()),
            "backoff_factor": torch.from_numpy(self._backoff_factor.copy()),
            "growth_interval": torch.from_numpy(self._growth_interval.copy()),
            "_growth_tracker": self._growth_tracker.cpu().clone(),
        }

    def model_state_dict(self, i: int) -> dict[str, Any]:
        """Model i's state as ``torch.amp.GradScaler.state_dict()`` returns it, so a
        model taken out of the batch resumes with a plain torch scaler."""
        if not 0 <= i < self.num_models:
            raise IndexError(f"model index {i} out of range for {self.num_models} models")
        if not self._enabled:
            return {}
        return {
            "scale": float(self._scale[i]),
            "growth_factor": float(self._growth_factor[i]),
            "backoff_factor": float(self._backoff_factor[i]),
            "growth_interval": int(self._growth_interval[i]),
            "_growth_tracker": int(self._growth_tracker[i]),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> None:
        """Load :meth:`state_dict`'s output, one ``torch.amp.GradScaler`` state
        (given to every model), or a list of N of them (one per model). Checked
        completely before anything changes."""
        if not self._enabled:
            return
        n = self.num_models
        where = "GradScaler.load_state_dict"
        if isinstance(state_dict, Sequence) and not isinstance(state_dict, str | bytes):
            if len(state_dict) != n:
                raise ValueError(
                    f"{where}: expected {n} per-model scaler states, got {len(state_dict)}"
                )
            cols = {}
            for k in _KEYS:
                try:
                    cols[k] = [float(s[k]) for s in state_dict]
                except (KeyError, TypeError, ValueError) as err:
                    raise ValueError(f"{where}: a per-model state lacks a number {k!r}") from err
            state_dict = cols
        elif not isinstance(state_dict, Mapping):
            raise ValueError(f"{where}: expected a dict, got {type(state_dict).__name__}")
        if len(state_dict) == 0:
            raise RuntimeError(
                f"{where}: the state dict is empty, possibly because it was saved from a "
                "disabled GradScaler"
            )
        missing = [k for k in _KEYS if k not in state_dict]
        if missing:
            raise ValueError(f"{where}: missing keys {missing} (expected {list(_KEYS)})")
        if "num_models" in state_dict and state_dict["num_models"] != n:
            raise ValueError(
                f"{where}: the state is of {state_dict['num_models']} models, this scaler has {n}"
            )
        vals = {k: per_model(f"{where}: {k}", state_dict[k], n) for k in _KEYS}
        self._validate(
            vals["scale"],
            vals["growth_factor"],
            vals["backoff_factor"],
            vals["growth_interval"],
            where,
        )
        tracker = vals["_growth_tracker"]
        if not np.all((tracker >= 0) & (tracker == np.floor(tracker))):
            raise ValueError(f"{where}: _growth_tracker must hold integers >= 0, got {tracker}")
        self._scale.copy_(torch.from_numpy(vals["scale"]).to(self._scale))
        self._growth_tracker.copy_(torch.from_numpy(tracker).to(self._growth_tracker))
        self._growth_factor = vals["growth_factor"]
        self._backoff_factor = vals["backoff_factor"]
        self._growth_interval = vals["growth_interval"].astype(np.int64)
        self._factors_cache = None
        self._per_optimizer.clear()

    def select(self, indices: Sequence[int] | torch.Tensor, *, batch: ModelBatch) -> GradScaler:
        """A new GradScaler over ``batch`` holding models ``indices``.

        ``batch`` is the ModelBatch of the selected models, ``k = len(indices)`` of
        them (``old_batch.select(indices)``; see :func:`modelbatch.population.select`).
        Row j of the scales, growth trackers and factors (``[k]`` each) is row
        ``indices[j]`` here, so model j's scale continues as model ``indices[j]``'s
        would have. Call it between iterations (after :meth:`update`): the inf checks
        of a step in progress are not carried over. This scaler is left unchanged.
        """
        rows = model_indices(indices, self.num_models, "GradScaler.select")
        if not isinstance(batch, ModelBatch) or batch.num_models != len(rows):
            got = (
                f"one of {batch.num_models} models"
                if isinstance(batch, ModelBatch)
                else type(batch).__name__
            )
            raise ValueError(
                f"GradScaler.select: batch must be the ModelBatch of the {len(rows)} selected "
                f"models (batch.select(indices)), got {got}"
            )
        new = GradScaler(
            batch,
            init_scale=self._scale.cpu().double().numpy()[rows],
            growth_factor=self._growth_factor[rows],
            backoff_factor=self._backoff_factor[rows],
            growth_interval=self._growth_interval[rows],
            enabled=self._enabled,
        )
        new._growth_tracker.copy_(self._growth_tracker[rows])
        return new

    def __repr__(self) -> str:
        if not self._enabled:
            return f"GradScaler(num_models={self.num_models}, enabled=False)"
        s = self._scale
        return (
            f"GradScaler(num_models={self.num_models}, scale=[{float(s.min()):g}.."
            f"{float(s.max()):g}])"
        )


def _per_model_optimizer():
    from modelbatch.optimizer import PerModelOptimizer

    return PerModelOptimizer
