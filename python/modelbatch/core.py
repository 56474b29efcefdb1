"""ModelBatch: N structurally identical models as one vectorised module.

Parameters and buffers of the N models are stacked along a new leading model
axis (``[N, ...]``) and registered on the ModelBatch; ``forward`` runs
``torch.vmap`` over ``torch.func.functional_call`` of one template module, so
one call computes all N models and one ``backward`` fills the stacked grads.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.utils._pytree import tree_flatten, tree_map

from modelbatch import rng as _rng
from modelbatch.allocator import tune_cpu_allocator
from modelbatch.interception import ModelBatchMode

_REDUCTIONS = ("sum", "mean", "none")
_SHAPE_ERROR = re.compile(
    r"shape|size|dimension|mat1 and mat2|expected input|Expected .*input", re.IGNORECASE
)
_META_FILE = "modelbatch.json"
_RNG_FILE = "rng.pt"
_RNG_BUFFERS = ("rng_seeds", "rng_offsets")


class PerModelFallbackWarning(UserWarning):
    """A ModelBatch runs its forward model by model: ``torch.vmap`` cannot batch an
    op of the models (see ``ModelBatch(fallback=...)``)."""


_WARNED_OPS: set[str] = set()
_UNBATCHABLE = (
    (re.compile(r"Batching rule not implemented for (\S+?)\.? "), None),
    (re.compile(r"vmap: we do not yet support (\S+?)\."), None),
    (re.compile(r"dynamic shape\. Attempted to vmap over (\S+?)\."), None),
    (re.compile(r"dynamic shape\. Attempting to batch over (.+?)\."), None),
    (re.compile(r"vmap: It looks like you're calling \.item\(\)"), "Tensor.item()"),
    (re.compile(r"vmap: It looks like you're attempting to use a Tensor in some data-dependent"),
     "data-dependent control flow"),
)  # fmt: skip


def unbatchable_op(err: BaseException) -> str | None:
    """The op named by a vmap error saying it cannot batch it, or None for any
    other error."""
    text = str(err)
    for pattern, name in _UNBATCHABLE:
        m = pattern.search(text)
        if m:
            return name or m.group(1)
    return None


def _model_slice(tree: Any, i: int) -> Any:
    """Model i's part of stacked ``[N, ...]`` tensors (other leaves as they are)."""
    return tree_map(lambda t: t[i] if isinstance(t, torch.Tensor) else t, tree)


def _describe(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"


def model_indices(indices: Any, n: int, where: str) -> list[int]:
    """Check a selection of models and return it as a list of ints.

    ``indices``: a list, tuple or range of ints, or a 1-D integer tensor or array, of
    distinct models in ``[0, n)``, in the order wanted. Raises ``ValueError`` naming
    ``where`` for an empty selection, a duplicate, an index out of range or one that
    is not an integer (floats and bools included).
    """
    if isinstance(indices, bool | int | np.integer) or (
        isinstance(indices, torch.Tensor | np.ndarray) and indices.ndim == 0
    ):
        raise ValueError(
            f"{where}: indices must be a list or 1-D tensor of model indices, got the single "
            f"index {indices!r} (for one model pass [{int(indices)}])"
        )
    if isinstance(indices, torch.Tensor | np.ndarray):
        if indices.ndim != 1:
            raise ValueError(f"{where}: indices must be 1-D, got shape {tuple(indices.shape)}")
        dtype = indices.dtype
        is_int = (
            not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool
            if isinstance(indices, torch.Tensor)
            else np.issubdtype(dtype, np.integer)
        )
        if not is_int:
            raise ValueError(f"{where}: indices must be integers, got dtype {dtype}")
        values = [int(v) for v in indices.tolist()]
    elif isinstance(indices, Sequence | range):
        values = []
        for v in indices:
            if isinstance(v, bool) or not isinstance(v, int | np.integer):
                raise ValueError(f"{where}: indices must be integers, got {v!r}")
            values.append(int(v))
    else:
        raise ValueError(
            f"{where}: indices must be a list, tuple or 1-D tensor of ints, "
            f"got {type(indices).__name__}"
        )
    if not values:
        raise ValueError(f"{where}: no models selected (indices is empty)")
    for v in values:
        if not 0 <= v < n:
            raise ValueError(
                f"{where}: index {v} is out of range for {n} models (valid: 0..{n - 1})"
            )
    seen: set[int] = set()
    for v in values:
        if v in seen:
            raise ValueError(
                f"{where}: model {v} is selected more than once; indices must be distinct "
                "(copy_model_ duplicates a model)"
            )
        seen.add(v)
    return values


def check_compatible(models: Sequence[nn.Module]) -> None:
    """Raise ``ValueError`` naming the first difference in structure between models.

    Compared: class, parameter names, shapes, dtypes and ``requires_grad``, and buffer
    names, shapes and dtypes. Model 0 is the reference.
    """
    if len(models) == 0:
        raise ValueError("ModelBatch needs at least one model; got an empty list")
    ref = models[0]
    if not isinstance(ref, nn.Module):
        raise ValueError(f"ModelBatch takes nn.Module instances; model 0 is {type(ref).__name__}")
    ref_p = dict(ref.named_parameters())
    ref_b = dict(ref.named_buffers())
    for i, m in enumerate(models[1:], start=1):
        if type(m) is not type(ref):
            raise ValueError(
                f"model {i} is a {type(m).__name__}, model 0 a {type(ref).__name__}: "
                "all models of a ModelBatch must share one class"
            )
        for kind, mine, theirs in (
            ("parameter", dict(m.named_parameters()), ref_p),
            ("buffer", dict(m.named_buffers()), ref_b),
        ):
            if mine.keys() != theirs.keys():
                extra = sorted(set(mine) - set(theirs))
                missing = sorted(set(theirs) - set(mine))
                raise ValueError(
                    f"model {i} has different {kind} names than model 0: "
                    f"extra {extra}, missing {missing}"
                )
            for name, t in mine.items():
                r = theirs[name]
                if t.shape != r.shape or t.dtype != r.dtype:
                    raise ValueError(
                        f"{kind} {name!r} of model {i} is {_describe(t)}, "
                        f"model 0 has {_describe(r)}"
                    )
                if kind == "parameter" and t.requires_grad != r.requires_grad:
                    raise ValueError(
                        f"parameter {name!r} has requires_grad={t.requires_grad} in model {i} "
                        f"but {r.requires_grad} in model 0"
                    )
                if t.device != r.device:
                    raise ValueError(
                        f"{kind} {name!r} of model {i} is on {t.device}, model 0's on {r.device}"
                    )


def _safe(name: str) -> str:
    # nn.Module attribute names cannot contain '.'
    return name.replace(".", "__")


class ModelBatch(nn.Module):
    """N structurally identical models trained as one.

    Args:
        models: the N models (same class, parameter and buffer names, shapes, dtypes).
            Their current weights and buffers are copied; the list is not modified.
        shared_input: if True every model sees the same input ``[B, ...]``; otherwise
            model i sees ``inputs[i]`` of an input ``[N, B, ...]``.
        seeds: the per-model seeds ``[N]`` (``batch.seeds``): an int ``s`` gives model i
            the seed ``s + i``; a sequence or tensor gives them one by one. Default:
            N seeds drawn from torch's global generator (so ``torch.manual_seed``
            before construction fixes them).
        rng: where the models' random calls (dropout and friends, attention
            dropout; see :mod:`modelbatch.rng`) draw from:

            * ``"philox"`` (default): model i's own counter-based Philox stream keyed
              by ``seeds[i]``; its masks do not depend on N, on its position, on the
              device or on the thread count; one kernel launch per call for all N.
            * ``"torch"``: model i replays plain PyTorch after
              ``torch.manual_seed(seeds[i])`` exactly, bit for bit. Loops over the
              models in Python on every random call (slow; for checking).
            * ``None``: vmap's ``randomness="different"``: one shared generator, so
              models with dropout do not train as they would alone.

            The stream state is part of ``state_dict()``. Any other random op inside
            a model's forward raises with ``"philox"`` / ``"torch"``.
        intercept: route ``F.linear`` & co. to modelbatch's batched ops during forward
            (see :mod:`modelbatch.interception`); False runs plain vmap.
        fallback: the safety net for ops ``torch.vmap`` cannot batch (no batching
            rule, data-dependent shapes or control flow, ``.item()``): run the forward
            model by model instead of failing (correct, about N times slower;
            gradients still reach the stacked parameters), warn once per op with a
            :class:`PerModelFallbackWarning`, and keep doing so for this ModelBatch
            (:attr:`forward_path` says which path runs, :attr:`fallback_op` why;
            :meth:`reset_forward_path` tries vmap again). False raises vmap's error.

    Outputs are ``[N, B, ...]``; tuples and dicts returned by the models keep their
    structure with every tensor stacked along the model axis.
    """

    def __init__(
        self,
        models: Iterable[nn.Module],
        shared_input: bool = True,
        *,
        seeds: int | Sequence[int] | torch.Tensor | None = None,
        rng: str | None = "philox",
        intercept: bool = True,
        fallback: bool = True,
    ) -> None:
        super().__init__()
        self.intercept = intercept
        self.fallback = fallback
        models = list(models)
        check_compatible(models)
        self.num_models = len(models)
        self.shared_input = bool(shared_input)
        if rng not in (*_rng.RNG_KINDS, None):
            raise ValueError(f"rng must be one of {_rng.RNG_KINDS} or None, got {rng!r}")
        self.rng = rng
        seeds = _rng.resolve_seeds(seeds, self.num_models)
        if seeds is None and rng is not None:
            seeds = _rng.draw_seeds(self.num_models)
        template = copy.deepcopy(models[0])
        # Not a submodule: its own weights are never used (functional_call swaps in
        # the stacked ones) and must not show up in parameters() or state_dict().
        self._template = [template]

        self._param_names = [n for n, _ in models[0].named_parameters()]
        self._buffer_names = [n for n, _ in models[0].named_buffers()]
        safe = [_safe(n) for n in self._param_names + self._buffer_names]
        if len(set(safe)) != len(safe):
            raise ValueError("parameter or buffer names collide after replacing '.' with '__'")
        with torch.no_grad():
            for name in self._param_names:
                ref = models[0].get_parameter(name)
                stacked = torch.stack([m.get_parameter(name).detach() for m in models])
                self.register_parameter(
                    _safe(name), nn.Parameter(stacked, requires_grad=ref.requires_grad)
                )
            for name in self._buffer_names:
                owner, _, leaf = name.rpartition(".")
                mod = models[0].get_submodule(owner) if owner else models[0]
                persistent = leaf not in mod._non_persistent_buffers_set
                stacked = torch.stack([m.get_buffer(name).detach() for m in models])
                self.register_buffer(_safe(name), stacked.clone(), persistent=persistent)
        self._state_keys = self._map_state_keys(template)
        self._seeds = seeds
        self._torch_streams = None
        device = next(iter(self.stacked_params().values()), torch.empty(0)).device
        if rng == "philox":
            for name in _RNG_BUFFERS:
                if name in safe:
                    raise ValueError(f"the models have a parameter or buffer named {name!r}")
            self.register_buffer("rng_seeds", seeds.to(device))
            self.register_buffer("rng_offsets", torch.zeros_like(self.rng_seeds))
        elif rng == "torch":
            self._torch_streams = _rng.TorchStreams(seeds)
        self._vmapped = self._forward_impl
        self._compile_kwargs: dict[str, Any] | None = None
        self._path: str | None = None
        self._fallback_op: str | None = None
        self._allocator_checked = False
        self.latest_losses: torch.Tensor | None = None

    # ----------------------------------------------------------------------- rng
    @property
    def seeds(self) -> torch.Tensor | None:
        """The per-model seeds, int64 ``[N]`` on the CPU (None without any)."""
        if self.rng == "philox":
            return self.rng_seeds.cpu()
        if self.rng == "torch":
            return self._torch_streams.seeds
        return self._seeds

    def _streams(self):
        if self.rng == "philox":
            return _rng.PhiloxStreams(self.rng_seeds, self.rng_offsets)
        return self._torch_streams

    def rng_state(self) -> dict[str, Any]:
        """The random streams' state: ``{"kind", "seeds", ...}`` (CPU tensors).

        Philox: ``"offsets"`` (blocks consumed per model). Torch: the generator
        states per device, ``"generator_states": {device: uint8 [N, S]}``.
        """
        if self.rng is None:
            return {"kind": None}
        return self._streams().state()

    def set_rng_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`rng_state` returned; checked before anything changes."""
        self._check_rng_state(state)
        if self.rng == "philox":
            with torch.no_grad():
                self.rng_seeds.copy_(state["seeds"])
                self.rng_offsets.copy_(state["offsets"])
        elif self.rng == "torch":
            self._torch_streams.seeds = state["seeds"].clone()
            gens = state["generator_states"]
            self._torch_streams.load_state({k: v.clone() for k, v in gens.items()})

    def _check_rng_state(self, state: Any) -> None:
        n = self.num_models
        kind = state.get("kind", "missing") if isinstance(state, Mapping) else state
        if kind != self.rng:
            raise ValueError(f"rng state is for rng={kind!r}, this ModelBatch has rng={self.rng!r}")
        if self.rng is None:
            return
        names = ("seeds", "offsets") if self.rng == "philox" else ("seeds",)
        for name in names:
            t = state.get(name)
            if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.shape != (n,):
                got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else repr(t)
                raise ValueError(f"rng state: expected {name} int64 [{n}], got {got}")
        if self.rng == "torch":
            gens = state.get("generator_states")
            if not isinstance(gens, Mapping) or any(
                not isinstance(v, torch.Tensor)
                or v.dtype != torch.uint8
                or v.dim() != 2
                or len(v) != n
                for v in gens.values()
            ):
                raise ValueError(f"rng state: expected generator_states {{device: uint8 [{n}, S]}}")

    def get_extra_state(self) -> dict[str, Any]:
        # Philox state is in buffers already; the torch generators' live here.
        if self.rng == "torch":
            return self.rng_state()
        return {"kind": self.rng}

    def set_extra_state(self, state: Any) -> None:
        if self.rng == "torch":
            self.set_rng_state(state)
        elif not isinstance(state, Mapping) or state.get("kind") != self.rng:
            got = state.get("kind") if isinstance(state, Mapping) else state
            raise ValueError(f"state_dict is for rng={got!r}, this ModelBatch has rng={self.rng!r}")

    # ----------------------------------------------------------------- structure
    def _map_state_keys(self, template: nn.Module) -> dict[str, str]:
        """state_dict key of a single model -> canonical parameter/buffer name.

        Tied weights appear under several state_dict keys but once in
        named_parameters(); both keys map to the one stacked tensor.
        """
        canon = {}
        for n, t in list(template.named_parameters()) + list(template.named_buffers()):
            canon[id(t)] = n
        return {k: canon[id(v)] for k, v in template.state_dict(keep_vars=True).items()}

    def stacked_params(self) -> dict[str, nn.Parameter]:
        """Original parameter name -> stacked parameter ``[N, ...]``."""
        return {n: getattr(self, _safe(n)) for n in self._param_names}

    def stacked_buffers(self) -> dict[str, torch.Tensor]:
        """Original buffer name -> stacked buffer ``[N, ...]``."""
        return {n: getattr(self, _safe(n)) for n in self._buffer_names}

    @property
    def template(self) -> nn.Module:
        """The module whose code runs each model (its own weights are unused)."""
        return self._template[0]

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._template[0]._apply(fn)
        return self

    def train(self, mode: bool = True) -> ModelBatch:
        super().train(mode)
        self._template[0].train(mode)
        return self

    # ------------------------------------------------------------------- forward
    def _check_inputs(self, leaves: list[Any]) -> None:
        tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
        if not tensors:
            raise ValueError("ModelBatch.forward expects at least one tensor input")
        for k, t in enumerate(tensors):
            if self.shared_input:
                if t.dim() < 1:
                    raise ValueError(
                        "ModelBatch(shared_input=True) expects inputs shaped [B, ...] "
                        f"(one batch fed to every model); input {k} is a 0-d tensor"
                    )
            elif t.dim() < 2 or t.shape[0] != self.num_models:
                raise ValueError(
                    f"ModelBatch(shared_input=False) expects per-model inputs shaped "
                    f"[N={self.num_models}, B, ...]; input {k} has shape {tuple(t.shape)}"
                )

    def _call_one(self, params, buffers, args, kwargs):
        return functional_call(self._template[0], (params, buffers), args, kwargs)

    def _forward_impl(self, params, buffers, args, kwargs):
        dim = None if self.shared_input else 0
        # Every tensor leaf (nested ones too, e.g. an LSTM's (h0, c0)) is per model.
        in_dims = (0, 0) + tree_map(
            lambda a: dim if isinstance(a, torch.Tensor) else None, (tuple(args), dict(kwargs))
        )
        # With per-model streams every random call is routed to them, and any other
        # one must fail loudly rather than share vmap's generator.
        randomness = "different" if self.rng is None else "error"
        return vmap(self._call_one, in_dims=in_dims, randomness=randomness)(
            params, buffers, args, kwargs
        )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        leaves, _ = tree_flatten((args, kwargs))
        self._check_inputs(leaves)
        template = self._template[0]
        if template.training != self.training:
            # Some trainers (Lightning) restore modes by setting each submodule's
            # ``training`` flag, which skips train(); the template is no submodule,
            # and its mode decides dropout and batch statistics.
            template.train(self.training)
        if not self._allocator_checked:
            self._allocator_checked = True
            if any(t.device.type == "cpu" for t in leaves if isinstance(t, torch.Tensor)):
                tune_cpu_allocator()
        params = self.stacked_params()
        buffers = self.stacked_buffers()
        # nn.MultiheadAttention's fused inference path has no vmap batching rule.
        fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        if self._path == "per_model":
            try:
                return self._forward_per_model(params, buffers, tuple(args), dict(kwargs))
            finally:
                torch.backends.mha.set_fastpath_enabled(fastpath)
        saved = self._save_state() if self.fallback else None
        try:
            with self._interception(rng=True):
                out = self._vmapped(params, buffers, tuple(args), dict(kwargs))
            self._path = "vmap"
            return out
        except RuntimeError as err:
            op = unbatchable_op(err)
            if op is not None:
                if not self.fallback:
                    raise
                self._restore_state(saved)
                self._use_per_model(op, err)
                return self._forward_per_model(params, buffers, tuple(args), dict(kwargs))
            if _rng.VMAP_RANDOM_ERROR in str(err):
                raise RuntimeError(
                    f"a model called a random operation that has no per-model stream "
                    f"(rng={self.rng!r} covers dropout and friends and attention dropout; "
                    "see modelbatch.rng). Routing it to vmap's shared generator would make "
                    "the models' randomness depend on each other; pass rng=None to accept "
                    f"that. vmap said: {err}"
                ) from err
            if not _SHAPE_ERROR.search(str(err)):
                raise
            shapes = [tuple(t.shape) for t in leaves if isinstance(t, torch.Tensor)]
            expected = (
                "[B, ...] fed to every model"
                if self.shared_input
                else f"[N={self.num_models}, B, ...] (model i gets inputs[i])"
            )
            raise ValueError(
                f"the models rejected inputs of shape {shapes}: ModelBatch expects {expected}, "
                f"where [...] is what one model takes. The model said: {err}"
            ) from err
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)

    # ------------------------------------------------------- per-model fallback
    @property
    def forward_path(self) -> str | None:
        """``"vmap"`` (all models in one vectorised call), ``"per_model"`` (the
        safety net: one call per model) or None before the first forward."""
        return self._path

    @property
    def fallback_op(self) -> str | None:
        """The op that sent this ModelBatch to the per-model path (e.g.
        ``"aten::rrelu"``), or None."""
        return self._fallback_op

    def reset_forward_path(self) -> None:
        """Try the vectorised path again on the next forward (after registering a
        batching rule for the op that was missing, say)."""
        self._path = None
        self._fallback_op = None

    def _save_state(self) -> dict[str, Any] | None:
        """What a failed vmap attempt may have changed: the random streams and, until
        vmap has run once, the buffers (running statistics)."""
        state = {}
        if self.rng == "philox":
            state["offsets"] = self.rng_offsets.clone()
        elif self.rng == "torch":
            state["torch"] = {k: list(v) for k, v in self._torch_streams.states.items()}
        if self._path is None:
            state["buffers"] = {n: b.clone() for n, b in self.stacked_buffers().items()}
        return state

    def _restore_state(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            if "offsets" in state:
                self.rng_offsets.copy_(state["offsets"])
            if "torch" in state:
                self._torch_streams.states = state["torch"]
            for name, b in state.get("buffers", {}).items():
                self.stacked_buffers()[name].copy_(b)

    def _use_per_model(self, op: str, err: Exception) -> None:
        self._path = "per_model"
        self._fallback_op = op
        self._warn_fallback(op, err, "its forward")

    @staticmethod
    def _warn_fallback(op: str, err: Exception, what: str) -> None:
        if op in _WARNED_OPS:
            return
        _WARNED_OPS.add(op)
        warnings.warn(
            f"ModelBatch: torch.vmap cannot batch {op}, so this ModelBatch runs {what} "
            "model by model (results are the same; it is about N times slower). Please "
            "report it, naming the op and the model that calls it, on the ModelBatch "
            "issue tracker (or register a torch.vmap batching rule for it, as "
            f"modelbatch.batching does for LSTM). vmap said: {err}",
            PerModelFallbackWarning,
            stacklevel=4,
        )

    def _forward_per_model(self, params, buffers, args, kwargs):
        """The safety net: model i runs alone on ``params[i]`` / ``buffers[i]`` (views,
        so gradients and buffer updates reach the stacked tensors) and on its inputs,
        with its own random stream; the outputs are stacked."""
        n = self.num_models

        def pick(tree, i):
            return tree if self.shared_input else _model_slice(tree, i)

        outs = []
        for i in range(n):
            p_i = {k: v[i] for k, v in params.items()}
            b_i = {k: v[i] for k, v in buffers.items()}
            with self._model_streams(i):
                outs.append(self._call_one(p_i, b_i, pick(args, i), pick(kwargs, i)))
        return tree_map(lambda *ts: torch.stack(ts), *outs)

    def _model_streams(self, i: int):
        """Model i's random stream, for a forward of model i alone."""
        if self.rng == "philox" and self.training:
            one = _rng.PhiloxStreams(self.rng_seeds[i : i + 1], self.rng_offsets[i : i + 1])
            return ModelBatchMode(route_ops=False, rng=one, route_conv=False)
        if self.rng == "torch" and self.training:
            device = next(iter(self.stacked_params().values())).device
            return self._torch_streams.model_generator(i, device)
        return contextlib.nullcontext()

    def _interception(self, rng: bool = False):
        """The routing mode of :mod:`modelbatch.interception`, or nothing.

        ``rng``: route random calls to the per-model streams (forward in training).
        """
        streams = self._streams() if rng and self.rng is not None else None
        if not self.intercept and streams is None:
            return contextlib.nullcontext()
        return ModelBatchMode(route_ops=self.intercept, rng=streams, route_conv=self.intercept)

    def enable_compile(self, **kwargs: Any) -> ModelBatch:
        """Run the vectorised forward under ``torch.compile(**kwargs)``."""
        self._vmapped = torch.compile(self._forward_impl, **kwargs)
        self._compile_kwargs = dict(kwargs)
        return self

    def disable_compile(self) -> ModelBatch:
        self._vmapped = self._forward_impl
        self._compile_kwargs = None
        return self

    # ---------------------------------------------------------------------- loss
    def compute_loss(
        self,
        outputs: Any,
        targets: Any,
        loss_fn: Callable[..., torch.Tensor],
        reduction: str = "sum",
        *,
        targets_per_model: bool | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-model losses of ``loss_fn(outputs[i], targets or targets[i])``.

        Args:
            outputs: ``[N, B, ...]`` (or a tuple/dict of such) from ``forward``.
            targets: shared ``[B, ...]`` or per-model ``[N, B, ...]``; detected from the
                shape unless ``targets_per_model`` says which.
            loss_fn: the loss of ONE model, returning a scalar (e.g.
                ``nn.CrossEntropyLoss()``).
            reduction: ``"sum"`` (default: the gradient of model i is that of its own
                loss), ``"mean"`` (gradients scaled by 1/N) or ``"none"`` (``[N]``).
            mask: bool ``[N, B_max]`` of a routed batch (:mod:`modelbatch.data`): model
                i's loss is over its real rows only, exactly
                (:func:`modelbatch.data.masked_loss`).
        """
        if mask is not None:
            from modelbatch.data import masked_loss

            return masked_loss(
                self,
                outputs,
                targets,
                loss_fn,
                mask,
                reduction,
                targets_per_model=targets_per_model,
            )
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        out_leaves, _ = tree_flatten(outputs)
        first = next((t for t in out_leaves if isinstance(t, torch.Tensor)), None)
        if first is None or first.dim() < 1 or first.shape[0] != self.num_models:
            raise ValueError(
                f"outputs must be stacked [N={self.num_models}, B, ...] as returned by forward; "
                f"got {None if first is None else tuple(first.shape)}"
            )
        per_model = self._targets_per_model(first, targets, targets_per_model)
        t_dim = 0 if per_model else None
        loss_vmap = vmap(loss_fn, in_dims=(0, t_dim), randomness="different")
        try:
            with self._interception():
                losses = loss_vmap(outputs, targets)
        except RuntimeError as err:
            op = unbatchable_op(err)
            if op is None or not self.fallback:
                raise
            # The safety net of forward, for a loss vmap cannot batch.
            self._warn_fallback(op, err, "its loss")
            losses = torch.stack(
                [
                    loss_fn(
                        _model_slice(outputs, i), _model_slice(targets, i) if per_model else targets
                    )
                    for i in range(self.num_models)
                ]
            )
        if not isinstance(losses, torch.Tensor) or losses.shape != (self.num_models,):
            shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses)
            raise ValueError(
                "loss_fn must return one scalar per model (reduce over the batch inside it, "
                f"e.g. nn.CrossEntropyLoss()); got per-model shape {shape}"
            )
        self.latest_losses = losses.detach()
        if reduction == "sum":
            return losses.sum()
        if reduction == "mean":
            return losses.mean()
        return losses

    def _targets_per_model(self, out: torch.Tensor, targets: Any, flag: bool | None) -> bool:
        leaves, _ = tree_flatten(targets)
        t = next((x for x in leaves if isinstance(x, torch.Tensor)), None)
        n = self.num_models
        if flag is not None:
            if flag and (t is None or t.dim() < 1 or t.shape[0] != n):
                raise ValueError(
                    f"targets_per_model=True needs targets shaped [N={n}, B, ...]; got "
                    f"{None if t is None else tuple(t.shape)}"
                )
            return bool(flag)
        if t is None:
            return False
        b = out.shape[1] if out.dim() > 1 else None
        as_per_model = t.dim() >= 2 and t.shape[0] == n and t.shape[1] == b
        as_shared = t.dim() >= 1 and t.shape[0] == b
        if as_per_model and as_shared:
            # N == B: prefer the reading whose trailing dims line up with the outputs'.
            per_fit = tuple(t.shape[2:]) == tuple(out.shape[2 : t.dim()])
            shared_fit = tuple(t.shape[1:]) == tuple(out.shape[2 : t.dim() + 1])
            if per_fit == shared_fit:
                raise ValueError(
                    f"targets of shape {tuple(t.shape)} could be shared [B, ...] or per-model "
                    f"[N, B, ...] (N = B = {n}); pass targets_per_model=True or False"
                )
            return per_fit
        if as_per_model:
            return True
        if as_shared:
            return False
        raise ValueError(
            f"targets must be shared [B={b}, ...] or per-model [N={n}, B={b}, ...]; got "
            f"{tuple(t.shape)}"
        )

    def metrics(self) -> dict[str, float]:
        """``{"loss_model_i": float}`` from the latest ``compute_loss`` call."""
        if self.latest_losses is None:
            return {}
        values = self.latest_losses.float().cpu().tolist()
        return {f"loss_model_{i}": v for i, v in enumerate(values)}

    # ------------------------------------------------------------ model states
    def _stacked(self, canonical: str) -> torch.Tensor:
        return getattr(self, _safe(canonical))

    def get_model_states(self) -> list[dict[str, torch.Tensor]]:
        """One plain ``state_dict`` per model (cloned tensors, same keys as a model's)."""
        return [self._model_state(i) for i in range(self.num_models)]

    def _model_state(self, i: int) -> dict[str, torch.Tensor]:
        return {k: self._stacked(c)[i].detach().clone() for k, c in self._state_keys.items()}

    def _validate_states(self, states: Sequence[Mapping[str, torch.Tensor]], where: str) -> None:
        if len(states) != self.num_models:
            raise ValueError(f"{where}: expected {self.num_models} states, got {len(states)}")
        expected = set(self._state_keys)
        for i, sd in enumerate(states):
            if not isinstance(sd, Mapping):
                raise ValueError(f"{where}: state {i} is a {type(sd).__name__}, not a dict")
            keys = set(sd.keys())
            if keys != expected:
                raise ValueError(
                    f"{where}: state {i} is of another architecture: missing "
                    f"{sorted(expected - keys)}, unexpected {sorted(keys - expected)}"
                )
            for k, c in self._state_keys.items():
                ref = self._stacked(c)
                v = sd[k]
                if not isinstance(v, torch.Tensor) or v.shape != ref.shape[1:]:
                    got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                    raise ValueError(
                        f"{where}: state {i} entry {k!r} has shape {got}, "
                        f"expected {tuple(ref.shape[1:])}"
                    )
                if v.dtype != ref.dtype:
                    raise ValueError(
                        f"{where}: state {i} entry {k!r} has dtype {v.dtype}, expected {ref.dtype}"
                    )

    def load_model_states(self, states: Sequence[Mapping[str, torch.Tensor]]) -> None:
        """Load one state_dict per model; all are checked before anything changes."""
        self._validate_states(states, "load_model_states")
        with torch.no_grad():
            for k, c in self._state_keys.items():
                target = self._stacked(c)
                target.copy_(torch.stack([sd[k].to(target.device) for sd in states]))

    def model(self, i: int) -> nn.Module:
        """A standalone module of the original class holding model i's weights and buffers."""
        if not -self.num_models <= i < self.num_models:
            raise IndexError(f"model index {i} out of range for {self.num_models} models")
        m = copy.deepcopy(self._template[0])
        m.load_state_dict(self._model_state(i % self.num_models))
        m.train(self.training)
        return m

    def select(self, indices: Sequence[int] | torch.Tensor) -> ModelBatch:
        """A new ModelBatch of the models ``indices`` only, in that order.

        ``indices``: distinct model indices in ``[0, N)`` (a list, tuple or 1-D integer
        tensor) of length ``k``; model j of the result is model ``indices[j]`` of this
        one. Its stacked parameters and buffers are ``[k, ...]`` copies of those rows
        (same device, dtype and ``requires_grad``; no grads), and it keeps this batch's
        ``shared_input``, ``intercept``, ``fallback``, ``rng``, forward path, training
        mode and ``enable_compile`` setting, each selected model's seed and the state
        of its random stream (so its dropout masks continue exactly where they were)
        and its row of :attr:`latest_losses`. This batch is left unchanged.

        For the optimizer (and a :class:`~modelbatch.amp.GradScaler`) call their
        ``select(indices, batch=new_batch)``, or do all at once with
        :func:`modelbatch.population.select`. Hooks registered on this module are not
        carried over.
        """
        idx = model_indices(indices, self.num_models, "ModelBatch.select")
        k = len(idx)
        template = self._template[0]
        seeds = None if self.seeds is None else self.seeds[idx]
        # k references to the template: the constructor sizes every per-model
        # structure for k models; the stacked tensors are then replaced by the rows
        # wanted, so no model is deep-copied but the template (once).
        new = type(self)(
            [template] * k,
            self.shared_input,
            seeds=seeds,
            rng=self.rng,
            intercept=self.intercept,
            fallback=self.fallback,
        )
        with torch.no_grad():
            for name, src in self.stacked_params().items():
                rows = src.detach().index_select(0, torch.tensor(idx, device=src.device))
                new.register_parameter(
                    _safe(name), nn.Parameter(rows, requires_grad=src.requires_grad)
                )
            for name, src in self.stacked_buffers().items():
                safe = _safe(name)
                rows = src.index_select(0, torch.tensor(idx, device=src.device))
                persistent = safe not in new._non_persistent_buffers_set
                new.register_buffer(safe, rows, persistent=persistent)
            if self.rng == "philox":  # (the seeds came in through the constructor)
                new.rng_offsets.copy_(self.rng_offsets[idx])
        if self.rng == "torch":
            states = self._torch_streams.states
            new._torch_streams.states = {d: [v[i].clone() for i in idx] for d, v in states.items()}
        # The ModelBatch only; the template (a deep copy of ours) keeps its
        # submodules' own modes.
        new.training = self.training
        if self._compile_kwargs is not None:
            new.enable_compile(**self._compile_kwargs)
        # The same model code: an op vmap cannot batch here cannot be batched there.
        new._path, new._fallback_op = self._path, self._fallback_op
        new._allocator_checked = self._allocator_checked
        if self.latest_losses is not None:
            new.latest_losses = self.latest_losses[idx].clone()
        return new

    def save_all(self, directory: str | os.PathLike) -> None:
        """Write ``model_{i}.pt`` (a plain state_dict) per model and ``modelbatch.json``.

        Each file is written to a temporary name and renamed, so an interrupted save
        never leaves a truncated file in place of a good one.
        """
        os.makedirs(directory, exist_ok=True)
        for i in range(self.num_models):
            path = os.path.join(directory, f"model_{i}.pt")
            torch.save(self._model_state(i), path + ".tmp")
            os.replace(path + ".tmp", path)
        if self.rng is not None:
            path = os.path.join(directory, _RNG_FILE)
            torch.save(self.rng_state(), path + ".tmp")
            os.replace(path + ".tmp", path)
        meta = {
            "num_models": self.num_models,
            "rng": self.rng,
            "class": f"{type(self._template[0]).__module__}.{type(self._template[0]).__qualname__}",
            "keys": {k: list(self._stacked(c).shape[1:]) for k, c in self._state_keys.items()},
            "seeds": None if self.seeds is None else self.seeds.tolist(),
        }
        path = os.path.join(directory, _META_FILE)
        with open(path + ".tmp", "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(path + ".tmp", path)

    def load_all(self, directory: str | os.PathLike) -> None:
        """Load what :meth:`save_all` wrote; every file is read and checked first.

        The random streams' state (``rng.pt``) is restored when the directory has it.
        """
        meta_path = os.path.join(directory, _META_FILE)
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            n_saved = int(meta["num_models"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"load_all: cannot read {meta_path}: {err}") from err
        if n_saved != self.num_models:
            raise ValueError(
                f"load_all: {directory} holds {n_saved} models, this ModelBatch has "
                f"{self.num_models}"
            )
        states = []
        for i in range(self.num_models):
            path = os.path.join(directory, f"model_{i}.pt")
            try:
                states.append(torch.load(path, map_location="cpu", weights_only=True))
            except Exception as err:  # torch.load raises many types on corrupt files
                raise ValueError(f"load_all: {path} is missing or corrupt: {err}") from err
        rng_state = None
        rng_path = os.path.join(directory, _RNG_FILE)
        if self.rng is not None and os.path.exists(rng_path):
            try:
                rng_state = torch.load(rng_path, map_location="cpu", weights_only=True)
                self._check_rng_state(rng_state)
            except Exception as err:
                raise ValueError(f"load_all: {rng_path} is corrupt or does not fit: {err}") from err
        self._validate_states(states, "load_all")
        self.load_model_states(states)
        if rng_state is not None:
            self.set_rng_state(rng_state)

    def extra_repr(self) -> str:
        n_params = sum(p[0].numel() for p in self.stacked_params().values())
        return (
            f"num_models={self.num_models}, shared_input={self.shared_input}, "
            f"template={type(self._template[0]).__name__}, params_per_model={n_params}"
        )
