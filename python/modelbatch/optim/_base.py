"""The shared machinery of the fused per-model optimizers.

A fused optimizer updates every stacked parameter ``[N, ...]`` of a ModelBatch
with one kernel launch per (device, dtype). Its hyper-parameters are per model:
``param_groups`` holds one group per model, and writing ``group["lr"]`` (as every
``torch.optim.lr_scheduler`` class does) writes through to the ``[N]`` vector the
kernel reads, in O(1) per write and with no per-step Python loop over models.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from modelbatch.core import ModelBatch, model_indices


def per_model(name: str, value: Any, n: int) -> np.ndarray:
    """A scalar, a length-N sequence or a 1-D tensor -> float64 array ``[N]``."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            return np.full(n, float(value), dtype=np.float64)
        if value.dim() != 1:
            raise ValueError(
                f"{name}: expected a scalar or a 1-D tensor of {n} values, "
                f"got shape {tuple(value.shape)}"
            )
        arr = value.detach().double().cpu().numpy().copy()
    elif isinstance(value, bool | int | float | np.number):
        return np.full(n, float(value), dtype=np.float64)
    elif isinstance(value, Sequence | np.ndarray):
        try:
            arr = np.asarray(value, dtype=np.float64).copy()
        except (TypeError, ValueError) as err:
            raise ValueError(f"{name}: expected numbers, got {value!r}") from err
        if arr.ndim != 1:
            raise ValueError(f"{name}: expected a scalar or {n} values, got shape {arr.shape}")
    else:
        raise ValueError(f"{name}: expected a scalar or {n} values, got {type(value).__name__}")
    if arr.shape[0] != n:
        raise ValueError(
            f"{name}: expected a scalar or {n} values (one per model), got {arr.shape[0]}"
        )
    return arr


def check_selected_batch(where: str, batch: Any, k: int, params: Sequence[torch.Tensor]) -> None:
    """Check that ``batch`` can hold ``k`` selected models of an optimizer over the
    stacked ``params`` (``[N, ...]`` each).

    Expected: a ModelBatch of ``k`` models whose parameters that require grad have
    the per-model shapes and dtypes of ``params``, in the same order.
    """
    if not isinstance(batch, ModelBatch):
        raise ValueError(
            f"{where}: batch must be the ModelBatch of the selected models "
            f"(batch.select(indices)), got {type(batch).__name__}"
        )
    if batch.num_models != k:
        raise ValueError(
            f"{where}: batch has {batch.num_models} models, expected {k} (one per selected "
            "index; pass batch.select(indices))"
        )
    mine = [p for p in batch.parameters() if p.requires_grad]
    want = [(list(p.shape[1:]), p.dtype) for p in params]
    got = [(list(p.shape[1:]), p.dtype) for p in mine]
    if got != want:
        raise ValueError(
            f"{where}: batch's models have other parameters: per-model (shape, dtype) "
            f"{got}, expected {want}"
        )


class ModelGroup(dict):
    """The param group of one model. Writes to hyper-parameter keys go through to
    the optimizer's per-model vectors."""

    __slots__ = ("_index", "_owner")

    def __init__(self, owner: FusedOptimizer, index: int, values: dict[str, Any]) -> None:
        super().__init__(values)
        self._owner = owner
        self._index = index

    def __setitem__(self, key: str, value: Any) -> None:
        self._owner._write_hparam(self._index, key, value)
        super().__setitem__(key, value)

    def update(self, *args: Any, **kwargs: Any) -> None:
        for k, v in dict(*args, **kwargs).items():
            self[k] = v

    def setdefault(self, key: str, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]

    def __reduce__(self):  # pickles / deep-copies as a plain dict
        return (dict, (dict(self),))


class FusedOptimizer(torch.optim.Optimizer):
    """Base of :class:`SGD`, :class:`Adam` and :class:`AdamW`.

    Subclasses set ``_hparams`` (group key -> per-model vector names, e.g.
    ``"betas" -> ("beta1", "beta2")``) and implement ``_launch``; their constructor
    takes the batch and then the ``_hparams`` keys as keywords (:meth:`select`
    builds the new optimizer that way).
    """

    _hparams: ClassVar[dict[str, tuple[str, ...]]] = {}
    _flags: ClassVar[tuple[str, ...]] = ()  # keys stored as 0/1 but shown as bools
    # State that the kernels allocate only while some model's hyper-parameter (the
    # value) is nonzero; select leaves it out when no selected model's is.
    _optional_state: ClassVar[dict[str, str]] = {
        "max_exp_avg_sq": "amsgrad",
        "momentum_buffer": "momentum",
    }

    def __init__(self, batch: ModelBatch, hparams: dict[str, Any]) -> None:
        if not isinstance(batch, ModelBatch):
            raise ValueError(
                f"{type(self).__name__} takes a ModelBatch as first argument, "
                f"got {type(batch).__name__}"
            )
        self.batch = batch
        self.num_models = n = batch.num_models
        self._vec: dict[str, np.ndarray] = {}
        for key, names in self._hparams.items():
            value = hparams[key]
            if len(names) == 1:
                self._vec[names[0]] = per_model(key, value, n)
            else:
                if not isinstance(value, Sequence) or len(value) != len(names):
                    raise ValueError(
                        f"{key}: expected a pair ({', '.join(names)}), each a "
                        f"scalar or {n} values; got {value!r}"
                    )
                for name, v in zip(names, value):
                    self._vec[name] = per_model(f"{key}[{name}]", v, n)
        for i in range(n):
            self._validate_model(i)
        params = [p for p in batch.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the ModelBatch has no parameters that require grad")
        super().__init__(params, {k: hparams[k] for k in self._hparams})
        self._params = params
        self._version = 0
        self._cache: dict[torch.device, tuple[int, dict[str, torch.Tensor]]] = {}
        self.steps = torch.zeros(n, dtype=torch.float64, device=params[0].device)
        self.param_groups = [ModelGroup(self, i, self._group_values(i)) for i in range(n)]

    # ------------------------------------------------------------ hyper-params
    def _group_values(self, i: int) -> dict[str, Any]:
        out: dict[str, Any] = {"params": []}
        for key, names in self._hparams.items():
            vals = [self._vec[nm][i].item() for nm in names]
            vals = [bool(v) for v in vals] if key in self._flags else vals
            out[key] = vals[0] if len(vals) == 1 else tuple(vals)
        return out

    def _write_hparam(self, i: int, key: str, value: Any) -> None:
        names = self._hparams.get(key)
        if names is None:
            return  # bookkeeping keys of schedulers (initial_lr, max_lr, ...)
        vals = value if len(names) > 1 else (value,)
        if len(vals) != len(names):
            raise ValueError(f"{key} of model {i}: expected {len(names)} values, got {value!r}")
        old = [self._vec[nm][i] for nm in names]
        for nm, v in zip(names, vals):
            self._vec[nm][i] = float(v)
        try:
            self._validate_model(i)
        except ValueError:
            for nm, v in zip(names, old):
                self._vec[nm][i] = v
            raise
        self._version += 1

    def _validate_model(self, i: int) -> None:
        """Raise ValueError for an invalid hyper-parameter of model i."""

    def hparam(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """The ``[N]`` float64 vector of a hyper-parameter (e.g. ``"lr"``) on ``device``."""
        device = torch.device(device)
        hit = self._cache.get(device)
        if hit is None or hit[0] != self._version:
            tensors = {
                k: torch.from_numpy(v.copy()).to(device, non_blocking=True)
                for k, v in self._vec.items()
            }
            hit = (self._version, tensors)
            self._cache[device] = hit
        return hit[1][name]

    # ------------------------------------------------------------------- steps
    def zero_grad(self, set_to_none: bool = True) -> None:
        self.batch.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "param_groups", None):
            raise NotImplementedError(
                f"{type(self).__name__} has one group per model of its ModelBatch; "
                "build a new optimizer for another ModelBatch instead of adding groups"
            )
        super().add_param_group(param_group)

    def _buckets(self) -> dict[tuple[torch.device, torch.dtype], list[int]]:
        """Indices of the params that have grads, grouped by (device, dtype)."""
        out: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for k, p in enumerate(self._params):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            out.setdefault((p.device, p.dtype), []).append(k)
        return out

    def _state_of(self, k: int, key: str) -> torch.Tensor:
        st = self.state[self._params[k]]
        if key not in st:
            st[key] = torch.zeros_like(self._params[k], memory_format=torch.contiguous_format)
        return st[key]

    @torch.no_grad()
    def step(  # type: ignore[override]
        self,
        closure=None,
        *,
        inv_scale: torch.Tensor | None = None,
        found_inf: torch.Tensor | None = None,
    ):
        """One step of every model.

        ``inv_scale`` and ``found_inf`` (float32 ``[N]``) come from
        :class:`modelbatch.amp.GradScaler`: with ``inv_scale`` the grads are loss
        scaled and the kernel unscales them in place as it reads them; a model with
        ``found_inf[i] != 0`` is skipped (parameters, state and step count untouched).
        """
        for name, v in (("inv_scale", inv_scale), ("found_inf", found_inf)):
            if v is not None and (not isinstance(v, torch.Tensor) or v.shape != (self.num_models,)):
                shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(
                    f"{type(self).__name__}.step: {name} must be a [N={self.num_models}] "
                    f"tensor, got {shape}"
                )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        buckets = self._buckets()
        if not buckets:
            return loss
        before = self.steps.clone() if len(buckets) > 1 else None
        for b, ((device, _dtype), idx) in enumerate(buckets.items()):
            # The kernel advances the step counter; every bucket after the first
            # advances a copy so each model's count goes up exactly once.
            steps = self.steps if b == 0 else before.clone()
            if steps.device != device:
                steps = steps.to(device)
            params = [self._params[k] for k in idx]
            grads = [self._params[k].grad for k in idx]
            flat = [g.contiguous() for g in grads]
            amp = {
                "inv_scale": None if inv_scale is None else inv_scale.to(device, torch.float32),
                "found_inf": None if found_inf is None else found_inf.to(device, torch.float32),
            }
            self._launch(idx, params, flat, steps, device, **amp)
            if inv_scale is not None:  # the kernel unscaled the grads it was given
                for g, f in zip(grads, flat):
                    if f is not g:
                        g.copy_(f)
            if b == 0 and steps is not self.steps:
                self.steps.copy_(steps)
        return loss

    def _launch(self, idx, params, grads, steps, device, inv_scale=None, found_inf=None) -> None:
        extra = self._extra_state()
        self._kernel(
            params,
            grads,
            self._state_lists(idx, extra),
            steps,
            lambda name: self.hparam(name, device),
            inv_scale,
            found_inf,
        )

    def _extra_state(self) -> bool:
        """Whether any model needs the optional state (amsgrad's max, SGD momentum)."""
        raise NotImplementedError

    def _state_lists(self, idx: list[int], extra: bool) -> list[list[torch.Tensor]]:
        """The state tensors the kernel updates, one list per kind, for params ``idx``."""
        raise NotImplementedError

    def _kernel(self, params, grads, states, steps, hp, inv_scale, found_inf) -> None:
        """One kernel launch: ``hp(name)`` gives the ``[N]`` vector of a hyper-parameter.
        (:class:`modelbatch.TrainStep` calls this inside its compiled step with
        persistent hyper-parameter tensors, so new values never recompile.)"""
        raise NotImplementedError

    # ------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return self._rows_state_dict(None)

    def _rows_state_dict(self, rows: list[int] | None) -> dict[str, Any]:
        """:meth:`state_dict` of the models ``rows`` only (in that order; None: all),
        as if they had been an optimizer of their own: every ``[N, ...]`` tensor
        (state, ``steps``) becomes ``[len(rows), ...]``, groups are the rows'."""
        index: dict[torch.device, torch.Tensor] = {}

        def take(t: torch.Tensor) -> torch.Tensor:
            if rows is None:
                return t.clone()
            if t.device not in index:
                index[t.device] = torch.tensor(rows, device=t.device)
            return t.index_select(0, index[t.device])

        keys = sorted({key for st in self.state.values() for key in st})
        per_param = {
            k: {key: take(self.state[p][key]) for key in keys if key in self.state[p]}
            for k, p in enumerate(self._params)
            if p in self.state
        }
        groups = self.param_groups if rows is None else [self.param_groups[i] for i in rows]
        n = self.num_models if rows is None else len(rows)
        return {
            "kind": type(self).__name__,
            "num_models": n,
            "param_shapes": [[n, *p.shape[1:]] for p in self._params],
            "steps": take(self.steps),
            "state": per_param,
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in groups],
        }

    def select(self, indices: Sequence[int] | torch.Tensor, *, batch: ModelBatch) -> FusedOptimizer:
        """A new optimizer of this class over ``batch`` holding models ``indices``.

        ``batch`` is the ModelBatch of the selected models, ``k = len(indices)`` of
        them (``old_batch.select(indices)``; see :func:`modelbatch.population.select`).
        Row j of every per-model hyper-parameter vector, of every state tensor
        (``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, ``momentum_buffer``: ``[k,
        ...]``) and of the step counters ``steps`` ``[k]`` is row ``indices[j]`` here,
        so model j continues exactly as model ``indices[j]`` would have (Adam's bias
        correction included). Each group keeps its other keys too (a scheduler's
        ``initial_lr``, ...). State that no selected model uses (``max_exp_avg_sq``
        without amsgrad, ``momentum_buffer`` without momentum) is left out, as an
        optimizer of those models alone never has it. This optimizer is left unchanged.
        """
        where = f"{type(self).__name__}.select"
        rows = model_indices(indices, self.num_models, where)
        check_selected_batch(where, batch, len(rows), self._params)
        hparams: dict[str, Any] = {}
        for key, names in self._hparams.items():
            vals = tuple(self._vec[nm][rows] for nm in names)
            hparams[key] = vals[0] if len(names) == 1 else vals
        new = type(self)(batch, **hparams)
        state = self._rows_state_dict(rows)
        state["param_groups"] = copy.deepcopy(state["param_groups"])  # no shared values
        # As an optimizer of the selected models alone would hold.
        unused = {
            key
            for key, hp in self._optional_state.items()
            if hp in self._vec and not self._vec[hp][rows].any()
        }
        for k, st in list(state["state"].items()):
            for key in unused & st.keys():
                del st[key]
            if not st:
                del state["state"][k]
        new._load_state(state, owned=True)
        return new

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._load_state(state_dict, owned=False)

    def _load_state(self, state_dict: dict[str, Any], owned: bool) -> None:
        """load_state_dict; ``owned``: the state tensors are fresh copies nobody else
        holds (from :meth:`_rows_state_dict`), so they are kept instead of cloned."""
        where = f"{type(self).__name__}.load_state_dict"
        if not isinstance(state_dict, dict) or "kind" not in state_dict:
            raise ValueError(f"{where}: not a modelbatch fused optimizer state_dict")
        if state_dict["kind"] != type(self).__name__:
            raise ValueError(f"{where}: the state is of a {state_dict['kind']} optimizer")
        if state_dict["num_models"] != self.num_models:
            raise ValueError(
                f"{where}: the state has {state_dict['num_models']} models, "
                f"this optimizer {self.num_models}"
            )
        shapes = [list(p.shape) for p in self._params]
        if [list(s) for s in state_dict["param_shapes"]] != shapes:
            raise ValueError(
                f"{where}: the state is of another architecture: parameter shapes "
                f"{state_dict['param_shapes']} vs {shapes}"
            )
        groups = state_dict["param_groups"]
        if len(groups) != self.num_models:
            raise ValueError(f"{where}: expected {self.num_models} param groups, got {len(groups)}")
        for k, st in state_dict["state"].items():
            for key, t in st.items():
                if list(t.shape) != shapes[int(k)]:
                    raise ValueError(
                        f"{where}: state {key!r} of parameter {k} has shape "
                        f"{list(t.shape)}, expected {shapes[int(k)]}"
                    )
        # Everything checked: now apply. Hyper-parameters first (validated per model).
        saved_vec = {k: v.copy() for k, v in self._vec.items()}
        try:
            for i, g in enumerate(groups):
                for key, value in g.items():
                    self.param_groups[i][key] = value
        except ValueError:
            self._vec = saved_vec
            self._version += 1
            for i, g in enumerate(self.param_groups):
                dict.update(g, self._group_values(i))
            raise
        self.steps.copy_(state_dict["steps"].to(self.steps))
        self.state.clear()
        for k, st in state_dict["state"].items():
            p = self._params[int(k)]
            self.state[p] = {}
            for key, t in st.items():
                moved = t.to(device=p.device, dtype=p.dtype)
                # (a tensor that .to() moved or cast is a fresh copy already)
                self.state[p][key] = moved if owned or moved is not t else moved.clone()

    def __repr__(self) -> str:
        parts = []
        for names in self._hparams.values():
            for nm in names:
                v = self._vec[nm]
                parts.append(
                    f"{nm}={v[0]:g}" if np.all(v == v[0]) else f"{nm}=[{v.min():g}..{v.max():g}]"
                )
        return f"{type(self).__name__}(num_models={self.num_models}, {', '.join(parts)})"
