"""``TrainStep``: one whole training step of N models as one compiled graph.

For small models the cost of an eager step is per-op overhead (Python, vmap
wrapping, kernel launches), not arithmetic. ``TrainStep(batch, optimizer,
loss_fn)`` builds the step as one function: forward of all N models (vmap over
``functional_call`` with modelbatch's batched ops), per-model losses ``[N]``, one
backward (``torch.autograd.grad``), per-model gradient clipping, the per-model
loss scaler (unscale, non-finite check, scale update) and the fused optimizer
kernel. With ``compile=True`` that function goes to ``torch.compile`` with
``fullgraph=True``: one graph, no graph breaks, modelbatch's custom ops and
Triton kernels visible to the compiler. On CUDA, ``cuda_graphs="auto"`` captures
and replays it (``mode="reduce-overhead"``) when the shapes are static.

Hyper-parameters live in persistent ``[N]`` tensors that the step reads: changing
a learning rate (a scheduler, ``param_groups[i]["lr"] = ...``) or a max norm
updates them in place before the next call and never recompiles. Calling the step
returns the per-model losses ``[N]`` without a host synchronisation.

Per-model dropout (``rng="philox"``) is traced as well: each model's seed and
offset enter the vmap as per-model inputs, so the compiled step draws exactly the
eager forward's masks. ``rng="torch"`` streams and dropout nested inside
``nn.MultiheadAttention`` / recurrent layers are not traceable; use ``compile=False``.

Per-model isolation as in :func:`modelbatch.fit`: a model whose loss (or, with
clipping, gradient norm) is not finite skips its update (the optimizer's
``found_inf``); no other model's arithmetic depends on it.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import vmap
from torch.utils._pytree import tree_flatten, tree_map

from modelbatch import _backend
from modelbatch.core import ModelBatch
from modelbatch.interception import ModelBatchMode
from modelbatch.ops import dropout as dropout_op
from modelbatch.ops import fused_mlp
from modelbatch.optim._base import FusedOptimizer, per_model
from modelbatch.optim.adam import Adam
from modelbatch.rng import PhiloxStreams

__all__ = ["TrainStep"]

#: fused="auto" runs the fused MLP kernel for layers up to this many features.
_FUSED_MAX_WIDTH = 512


class _TracedPhilox(PhiloxStreams):
    """One model's Philox stream inside the vmap of a compiled step: ``seeds`` and
    ``offsets`` are that model's (batched) 0-d values; ``consumed`` counts the blocks
    drawn so far, a Python int, the same for every model."""

    traceable = True

    def __init__(self, seed: torch.Tensor, offset: torch.Tensor) -> None:
        super().__init__(seed, offset)
        self.consumed = 0

    def dropout(self, x: torch.Tensor, p: float, repeat: int, kind: int) -> torch.Tensor:
        start = self.offsets + self.consumed
        self.consumed += dropout_op.blocks(x.numel() // repeat)
        return dropout_op.dropout(x, self.seeds, start, p, repeat, kind, False)


def _enable_autograd_tracing() -> None:
    # Dynamo traces torch.autograd.grad (the step's backward) only with this set;
    # without it, the backward is a graph break.
    torch._dynamo.config.trace_autograd_ops = True


class TrainStep:
    """``step(inputs, targets) -> losses [N]``: forward, loss, backward, clipping,
    scaler and optimizer update of every model; see the module docstring.

    Args:
        batch: the ModelBatch.
        optimizer: its fused ``modelbatch.optim.SGD`` / ``Adam`` / ``AdamW``.
        loss_fn: the loss of ONE model (a scalar), e.g. ``F.cross_entropy``.
        scaler: a :class:`modelbatch.amp.GradScaler` (per-model loss scales) or None.
        max_grad_norm: per-model clipping (a scalar or N values; ``set_max_grad_norm``
            changes it without recompiling) or None.
        compile: run the step under ``torch.compile(fullgraph=True)``.
        cuda_graphs: ``"auto"`` (CUDA graphs on CUDA when compiling), True or False.
        autocast: a dtype to run forward and loss under ``torch.autocast``.
        targets_per_model: as in :meth:`ModelBatch.compute_loss` (None: detect).
        compile_kwargs: more ``torch.compile`` options (``dynamic``, ``mode``, ...).
        fused: whether forward, loss and backward run as the fused MLP kernel
            (``modelbatch::fused_mlp_loss_grad``) for the models it covers (an
            ``nn.Sequential`` of Linear layers and activations with a cross-entropy
            or MSE loss; :func:`modelbatch.ops.fused_mlp.plan`). ``"auto"``: on the
            CPU with the C++ kernels, float32, no autocast, for calls whose input
            is one ``[B, I]`` / ``[N, B, I]`` tensor (other calls run the general
            step). ``True``: always (an error says why a model is not covered);
            ``False``: never. With Adam / AdamW (no scaler) the update runs inside
            the kernel too and the step is that one op, called without
            ``torch.compile`` (whose graph would be the op alone).

    Gradients are not left in ``.grad``: the step hands them straight to the
    optimizer kernel. Use the eager path (``forward`` / ``compute_loss`` /
    ``backward`` / ``optimizer.step()``) for anything that needs them.
    """

    def __init__(
        self,
        batch: ModelBatch,
        optimizer: FusedOptimizer,
        loss_fn: Callable[..., torch.Tensor],
        *,
        scaler=None,
        max_grad_norm: Any = None,
        compile: bool = True,
        cuda_graphs: bool | str = "auto",
        autocast: torch.dtype | None = None,
        targets_per_model: bool | None = None,
        compile_kwargs: dict[str, Any] | None = None,
        fused: bool | str = "auto",
    ) -> None:
        if not isinstance(batch, ModelBatch):
            raise ValueError(f"TrainStep takes a ModelBatch, got {type(batch).__name__}")
        if not isinstance(optimizer, FusedOptimizer):
            raise ValueError(
                "TrainStep runs the fused per-model optimizers (modelbatch.optim.SGD, Adam, "
                f"AdamW); got {type(optimizer).__name__}. Use the eager loop (modelbatch.fit) "
                "for other torch.optim classes"
            )
        if optimizer.batch is not batch:
            raise ValueError("TrainStep: the optimizer does not belong to this ModelBatch")
        if scaler is not None and getattr(scaler, "batch", None) is not batch:
            raise ValueError("TrainStep: the scaler does not belong to this ModelBatch")
        if fused not in ("auto", True, False):
            raise ValueError(f"fused must be 'auto', True or False, got {fused!r}")
        if cuda_graphs not in ("auto", True, False):
            raise ValueError(f"cuda_graphs must be 'auto', True or False, got {cuda_graphs!r}")
        if batch.forward_path == "per_model":
            raise ValueError(
                f"TrainStep needs the vectorised forward; this ModelBatch runs model by model "
                f"({batch.fallback_op} has no vmap batching rule)"
            )
        recurrent = next(
            (type(m).__name__ for m in batch.template.modules() if isinstance(m, nn.RNNBase)),
            None,
        )
        if compile and recurrent is not None:
            # Dynamo does not trace nn.LSTM / GRU / RNN (torch._dynamo.config.allow_rnn
            # is experimental and fails under vmap): the step runs uncompiled, still one
            # call with the batched recurrent kernels, clipping and the fused optimizer.
            warnings.warn(
                f"TrainStep: torch.compile cannot trace {recurrent} layers, so this step "
                "runs uncompiled (pass compile=False to silence this warning)",
                stacklevel=2,
            )
            compile = False
        self.batch = batch
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.scaler = scaler
        self.autocast = autocast
        self.targets_per_model = targets_per_model
        self.compiled = bool(compile)
        self._params = list(optimizer._params)
        self._device = self._params[0].device
        n = batch.num_models
        self._max_norm = None
        if max_grad_norm is not None:
            self._max_norm = torch.empty(n, dtype=torch.float32, device=self._device)
            self.set_max_grad_norm(max_grad_norm)
        self._hp: dict[str, torch.Tensor] = {}
        self._hp_version = -1
        self._extra = optimizer._extra_state()
        self._buckets = self._make_buckets()
        self._plan, self._fused_order = self._fused_plan(fused)
        # Adam / AdamW without a loss scaler: the update runs inside the fused kernel,
        # model by model, while each model's gradients are in the cache.
        self._fused_adam = (
            self._plan is not None
            and isinstance(optimizer, Adam)
            and scaler is None
            and len(self._buckets) == 1
            and None not in self._fused_order
        )
        self._adam_args = None  # (buckets, the op's lists): see _fused_adam_args
        if cuda_graphs is True and not (compile and self._device.type == "cuda"):
            raise ValueError("cuda_graphs=True needs compile=True and a CUDA ModelBatch")
        use_graphs = bool(compile) and self._device.type == "cuda" and cuda_graphs is not False
        kwargs = {"fullgraph": True, **(compile_kwargs or {})}
        if use_graphs:
            kwargs.setdefault("mode", "reduce-overhead")
        self.compile_kwargs = kwargs if compile else None
        self._fn = self._fused_fn = None
        self._prepared = False

    # ------------------------------------------------------------ fused MLPs
    def _fused_plan(self, fused):
        """The fused kernel's plan and, per gradient it returns, the index of its
        parameter in the optimizer's list (None: frozen); (None, None) if unused."""
        if fused is False:
            return None, None
        batch = self.batch
        names = list(batch.stacked_params())
        plan, why = fused_mlp.plan(batch.template, self.loss_fn, names)
        if plan is None:
            if fused is True:
                raise ValueError(
                    f"TrainStep(fused=True): the fused MLP kernel does not cover this model: {why}"
                )
            return None, None
        if fused == "auto":
            if self._device.type != "cpu" or not _backend.c_extension_loaded():
                return None, None
            # Past 512 features the kernel's tiles (no cache blocking) lose to MKL's
            # GEMMs in the general step: 0.41x at 1024 (1.10x at 512, 2.75x on the
            # small MLP; benchmarks/results/cpu/fused_mlp.md).
            if self.autocast is not None or max(plan.widths) > _FUSED_MAX_WIDTH:
                return None, None
        stacked = batch.stacked_params()
        ids = {id(p): k for k, p in enumerate(self._params)}
        order = [ids.get(id(stacked[name])) for name in plan.grad_names()]
        return plan, order

    def _fits_fused(self, inputs: Any, targets: Any) -> bool:
        """Whether this call's input and targets are ones the fused kernel takes."""
        plan, batch = self._plan, self.batch
        x = inputs[0] if isinstance(inputs, tuple) and len(inputs) == 1 else inputs
        if not isinstance(x, torch.Tensor) or not isinstance(targets, torch.Tensor):
            return False
        n = batch.num_models
        want = 2 if batch.shared_input else 3
        if x.dim() != want or x.dtype != torch.float32 or x.shape[-1] != plan.in_features:
            return False
        if not batch.shared_input and x.shape[0] != n:
            return False
        b = x.shape[-2]
        if plan.loss == 0:
            ok = targets.dtype == torch.long and targets.shape in ((b,), (n, b))
        else:
            c = plan.out_features
            ok = targets.dtype == torch.float32 and targets.shape in ((b, c), (n, b, c))
        return ok and x.device == self._device == targets.device

    def _fused_step(self, x, targets, hp, buckets, max_norm):
        if self._fused_adam:
            return self._fused_adam_step(x, targets, hp, buckets, max_norm)
        scaler = self.scaler
        scaling = scaler is not None and scaler._enabled
        losses, grads = fused_mlp.call(
            self._plan,
            self.batch.stacked_params(),
            x,
            targets,
            scaler._scale if scaling else None,
        )
        by_param: list[torch.Tensor | None] = [None] * len(self._params)
        for g, k in zip(grads, self._fused_order):
            if k is not None:
                by_param[k] = g
        return self._update(losses, by_param, hp, buckets, max_norm)

    def _fused_adam_args(self, buckets):
        """The op's parameter and state lists in its gradient order, and the plan's
        layer constants; rebuilt only when the buckets are (amsgrad switched on)."""
        cached = self._adam_args
        if cached is not None and cached[0] is buckets:
            return cached[1]
        idx, states = buckets[0]
        pos = {k: i for i, k in enumerate(idx)}
        order = self._fused_order
        args = (
            [self._params[k] for k in order],
            [[lst[pos[k]] for k in order] if lst else [] for lst in states],
            [int(b is not None) for b in self._plan.biases],
            list(self._plan.activations),
        )
        self._adam_args = (buckets, args)
        return args

    def _fused_adam_step(self, x, targets, hp, buckets, max_norm):
        plan, opt = self._plan, self.optimizer
        params, state, biased, activations = self._fused_adam_args(buckets)
        # no_grad: an in-place update of leaves that require grad would make the
        # compiler clone every parameter around the op.
        with torch.no_grad():
            losses = torch.ops.modelbatch.fused_mlp_adam_step(
                x,
                targets,
                params,
                biased,
                activations,
                plan.loss,
                plan.ignore_index,
                state[0],
                state[1],
                state[2],
                opt.steps,
                hp["lr"],
                hp["beta1"],
                hp["beta2"],
                hp["eps"],
                hp["weight_decay"],
                hp["amsgrad"],
                opt._decoupled,
                max_norm,
            )
        return losses.detach()

    def _compiled(self, fn):
        if not self.compiled:
            return fn
        _enable_autograd_tracing()
        return torch.compile(fn, **self.compile_kwargs)

    # ------------------------------------------------------------ parameters
    def set_max_grad_norm(self, value: Any) -> None:
        """New per-model max norms (a scalar or N values); no recompilation."""
        if self._max_norm is None:
            raise ValueError("this TrainStep was built without max_grad_norm")
        values = per_model("max_grad_norm", value, self.batch.num_models)
        self._max_norm.copy_(torch.from_numpy(values).to(self._max_norm))

    def _make_buckets(self) -> list[tuple[list[int], list[list[torch.Tensor]]]]:
        """(param indices, state lists) per (device, dtype), as the optimizer groups
        them; the state tensors are created now, outside the compiled step."""
        groups: dict[tuple, list[int]] = {}
        for k, p in enumerate(self._params):
            groups.setdefault((p.device, p.dtype), []).append(k)
        return [(idx, self.optimizer._state_lists(idx, self._extra)) for idx in groups.values()]

    def _refresh_hparams(self) -> None:
        opt = self.optimizer
        if opt._version == self._hp_version and self._extra == opt._extra_state():
            return
        if opt._extra_state() != self._extra:
            # amsgrad / momentum switched on for some model: the kernel needs the
            # optional state (a structural change: the step is traced anew).
            self._extra = opt._extra_state()
            self._buckets = self._make_buckets()
        for name, values in opt._vec.items():
            fresh = torch.from_numpy(values.copy()).to(self._device)
            if name in self._hp:
                self._hp[name].copy_(fresh)  # in place: the compiled step reads these
            else:
                self._hp[name] = fresh
        self._hp_version = opt._version

    # ------------------------------------------------------------------ step
    def __call__(self, inputs: Any, targets: Any) -> torch.Tensor:
        """One step of every model on ``inputs`` (``[B, ...]`` shared or ``[N, B, ...]``)
        and ``targets``; returns the per-model losses ``[N]`` (detached, on the
        device; also ``batch.latest_losses``)."""
        if not self._prepared:
            self._prepare(inputs)
        self._refresh_hparams()
        if self._plan is not None and self._fits_fused(inputs, targets):
            if self._fused_fn is None:
                # With Adam / AdamW the whole step is the one fused op: the graph
                # torch.compile would build is that op alone (one graph, no breaks:
                # tests/test_fused_mlp.py), and dynamo's guards would add 50-120 us
                # a step, so it is called directly.
                direct = self._fused_adam
                self._fused_fn = self._fused_step if direct else self._compiled(self._fused_step)
            x = inputs[0] if isinstance(inputs, tuple) else inputs
            losses = self._fused_fn(x, targets, self._hp, self._buckets, self._max_norm)
        else:
            if self._fn is None:
                self._fn = self._compiled(self._step)
            args = inputs if isinstance(inputs, tuple) else (inputs,)
            losses = self._fn(args, targets, self._hp, self._buckets, self._max_norm)
        # What optimizer.step() would have flagged: lr schedulers check it.
        self.optimizer._opt_called = True
        self.batch.latest_losses = losses
        return losses

    def _prepare(self, inputs: Any) -> None:
        """Eager checks and one-time setup the compiled step must not trace."""
        from modelbatch.allocator import tune_cpu_allocator

        leaves, _ = tree_flatten(inputs)
        self.batch._check_inputs(leaves)
        if any(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in leaves):
            tune_cpu_allocator()
            self.batch._allocator_checked = True
        self.batch.train()
        self._prepared = True

    def _mode(self, rng: bool = False):
        """The interception of the step. Compiled, linear and cross-entropy stay plain
        aten ops under vmap (inductor fuses their bias, activation and loss
        arithmetic around its GEMMs: 1.0-1.35x faster than routing them to
        modelbatch's ops, benchmarks/results/cpu/bench.md), except under autocast,
        where the routed ops give each model autocast's own per-model dtypes.
        Convolutions and batch norms are routed on the CPU (``route_conv``) unless
        the batch was built with ``intercept=False``."""
        batch = self.batch
        if not self.compiled or self.autocast is not None:
            return batch._interception(rng=rng)
        streams = batch._streams() if rng and batch.rng is not None else None
        return ModelBatchMode(route_ops=False, rng=streams, route_conv=batch.intercept)

    def _forward_traced_streams(self, params, buffers, args):
        """The vectorised forward with each model's Philox stream as a traceable input:
        seeds and offsets enter the vmap as per-model values, every dropout call draws
        through ``modelbatch::dropout`` (whose vmap rule is the batched kernel) at the
        model's offset plus what the forward consumed so far, and the offsets advance
        once afterwards. The masks are exactly those of the eager forward."""
        batch = self.batch
        route = self.autocast is not None
        holder = []

        def one(p, b, seed, offset, a):
            streams = _TracedPhilox(seed, offset)
            holder.append(streams)
            with ModelBatchMode(route_ops=route, rng=streams, route_conv=batch.intercept):
                return batch._call_one(p, b, a, {})

        dim = None if batch.shared_input else 0
        arg_dims = tree_map(lambda t: dim if isinstance(t, torch.Tensor) else None, tuple(args))
        out = vmap(one, in_dims=(0, 0, 0, 0, arg_dims), randomness="error")(
            params, buffers, batch.rng_seeds, batch.rng_offsets, tuple(args)
        )
        batch.rng_offsets.add_(holder[-1].consumed)
        return out

    def _autocast(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self._device.type, dtype=self.autocast)

    def _step(self, args, targets, hp, buckets, max_norm):
        batch, scaler = self.batch, self.scaler
        params = batch.stacked_params()
        buffers = batch.stacked_buffers()
        with self._autocast():
            if self.compiled and batch.rng == "philox" and batch.training:
                out = self._forward_traced_streams(params, buffers, args)
            else:
                with self._mode(rng=True):
                    out = batch._forward_impl(params, buffers, args, {})
            leaves, _ = tree_flatten(out)
            first = next(t for t in leaves if isinstance(t, torch.Tensor))
            per_model_t = batch._targets_per_model(first, targets, self.targets_per_model)
            with self._mode():
                losses = vmap(
                    self.loss_fn, in_dims=(0, 0 if per_model_t else None), randomness="different"
                )(out, targets)
        scaling = scaler is not None and scaler._enabled
        total = (losses * scaler._scale).sum() if scaling else losses.sum()
        # The kernels take contiguous [N, ...] grads (the compiler fuses the copy of
        # any transposed one into the op that produces it).
        grads = [g.contiguous() for g in torch.autograd.grad(total, self._params)]
        return self._update(losses, grads, hp, buckets, max_norm)

    def _update(self, losses, grads, hp, buckets, max_norm):
        """Unscale, check, clip and step every model from its losses and gradients."""
        opt, scaler = self.optimizer, self.scaler
        n = self.batch.num_models
        scaling = scaler is not None and scaler._enabled
        with torch.no_grad():
            found = (~torch.isfinite(losses.detach())).float()
            inv_scale = None
            if scaling:
                from modelbatch.ops import amp as amp_op

                inv_scale = scaler._inv_scale()
                for idx, _ in buckets:
                    amp_op.amp_unscale_([grads[k] for k in idx], found, inv_scale, True)
            if max_norm is not None:
                norms = torch.stack(
                    [torch.linalg.vector_norm(g.reshape(n, -1), 2.0, dim=1) for g in grads], dim=1
                )
                total_norm = torch.linalg.vector_norm(norms, 2.0, dim=1)
                coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
                grads = [g * coef.to(g.dtype).view((n,) + (1,) * (g.dim() - 1)) for g in grads]
                found = torch.maximum(found, (~torch.isfinite(total_norm)).float())
            before = opt.steps.clone() if len(buckets) > 1 else None
            for b, (idx, states) in enumerate(buckets):
                steps = opt.steps if b == 0 else before.clone()
                opt._kernel(
                    [self._params[k] for k in idx],
                    [grads[k] for k in idx],
                    states,
                    steps,
                    hp.__getitem__,
                    None,
                    found,
                )
            if scaling:
                scaler._update_scale(found != 0)
        return losses.detach()

    def __repr__(self) -> str:
        return (
            f"TrainStep(num_models={self.batch.num_models}, optimizer="
            f"{type(self.optimizer).__name__}, compiled={self.compiled}, "
            f"compile_kwargs={self.compile_kwargs})"
        )
