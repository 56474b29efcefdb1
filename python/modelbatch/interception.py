"""Routes selected torch calls to modelbatch ops while a ModelBatch runs its forward.

A ``TorchFunctionMode`` is active only inside ``ModelBatch.forward`` and
``compute_loss``: users' modules stay unmodified, and code outside a ModelBatch is
never affected. Routed today: ``F.linear`` (so every ``nn.Linear``) ->
``modelbatch::linear``, and ``F.cross_entropy`` (so ``nn.CrossEntropyLoss``) ->
``modelbatch::cross_entropy`` for the cases that op covers (with ``intercept=True``);
on the CPU ``F.conv1d/2d/3d`` (so every ``nn.Conv*d``) -> ``modelbatch::conv`` and
``F.batch_norm`` / ``torch.batch_norm`` (``nn.BatchNorm*d``) -> ``modelbatch::batch_norm``,
loops of the native kernels over the models (``route_conv``; on CUDA these stay
vmap's grouped convolutions, which cuDNN runs well); and, when the ModelBatch has
per-model random streams, every random call listed in :mod:`modelbatch.rng` (dropout
and friends, attention dropout) -> that model's stream.

Fast path: when the call's tensors are batched by exactly the vmap that ModelBatch
runs (the innermost transform, one level deep), the mode unwraps them, calls the
batched op with its explicit model axis and wraps the result back. This is what
the ops' registered vmap rules do, minus the generic per-call machinery that
custom ops with Python autograd go through under vmap (pytree flattening and
autograd.Function re-wrapping, about a millisecond per training step of a small
MLP). Any other situation (nested transforms, unbatched weights) takes the
dispatcher path through those same vmap rules.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor
from torch._C import _functorch as _ft
from torch.overrides import TorchFunctionMode

from modelbatch.ops import batch_norm as bn_op
from modelbatch.ops import conv as conv_op
from modelbatch.ops import cross_entropy as ce_op
from modelbatch.ops import linear as linear_op
from modelbatch.rng import CALLS, is_random

_NOT_HANDLED = object()
COMPILED_RANDOM_ERROR = (
    "a model draws dropout (or another random op with a per-model stream) inside a "
    "compiled step from streams torch.compile cannot trace (rng='torch' replays "
    "torch's generators model by model). Use rng='philox' (traced by "
    "modelbatch.TrainStep), or modelbatch.TrainStep(..., compile=False)"
)


def _unwrap(t, level):
    """(value, batch dim) of a tensor batched at ``level``; (t, None) if unbatched;
    None if it is batched at another level or wraps another batched tensor."""
    if not isinstance(t, Tensor) or not _ft.is_batchedtensor(t):
        return t, None
    if _ft.maybe_get_level(t) != level:
        return None
    value, bdim = _ft._unwrap_batched(t, level)
    if isinstance(value, Tensor) and _ft.is_batchedtensor(value):
        return None
    return value, bdim


def _level_of(t) -> int | None:
    if isinstance(t, Tensor) and _ft.is_batchedtensor(t):
        level = _ft.maybe_get_level(t)
        if level == _ft.maybe_current_level():
            return level
    return None


def _autocast_to(tensors) -> torch.dtype | None:
    """The dtype autocast gives a lower-precision op (``linear``) on these tensors'
    device, or None when autocast is off there."""
    for t in tensors:
        if isinstance(t, Tensor):
            kind = t.device.type
            if torch.is_autocast_enabled(kind):
                return torch.get_autocast_dtype(kind)
            return None
    return None


def _cast(t, dtype):
    """autocast's cast of one argument: floating tensors other than float64 only."""
    if isinstance(t, Tensor) and t.is_floating_point() and t.dtype not in (dtype, torch.float64):
        return t.to(dtype)
    return t


# autocast acts at the dispatcher, after vmap's batching rules have rewritten a call
# into other ops (``linear`` with a bias becomes ``matmul`` + ``add``), so inside a
# vmap it does not give the per-model dtypes. The routed ops apply its policy here,
# at the call the model made: ``linear`` in the lower precision, ``cross_entropy``
# in float32, as torch.autocast does for one model.
def _autocast_policy(low_precision: bool):
    """The cast autocast applies to a call's floating args: to its low dtype
    (``low_precision``) or to float32; nothing when it is off on their device."""

    def apply(args, kwargs):
        dtype = _autocast_to(args[:2])
        if dtype is None:
            return args, kwargs
        if not low_precision:
            dtype = torch.float32
        return tuple(_cast(a, dtype) for a in args), {k: _cast(v, dtype) for k, v in kwargs.items()}

    return apply


_autocast_linear = _autocast_policy(low_precision=True)
_autocast_float32 = _autocast_policy(low_precision=False)


def _unwrap_all(level, tensors):
    """``[(value, batch dim)]`` of every tensor at ``level`` (see :func:`_unwrap`), or
    None when the fast path does not apply to one of them."""
    if level is None:
        return None
    parts = [_unwrap(t, level) for t in tensors]
    return None if any(p is None for p in parts) else parts


def _fast_linear(x, weight, bias=None):
    level = _level_of(weight)
    parts = _unwrap_all(level, (x, weight, bias))
    if parts is None:
        return _NOT_HANDLED
    (xv, xd), (wv, wd), (bv, bd) = parts
    out, _ = linear_op._vmap_rule(None, (xd, wd, bd), xv, wv, bv)
    return _ft._add_batch_dim(out, 0, level)


def _fast_cross_entropy(input, target, *args, **kwargs):
    level = _level_of(input)
    if level is None or not ce_op.covers(input, target, *args, **kwargs):
        return _NOT_HANDLED
    parts = _unwrap_all(level, (input, target))
    if parts is None:
        return _NOT_HANDLED
    (xv, xd), (tv, td) = parts
    reduction, ignore_index = ce_op.reduction_and_ignore(*args, **kwargs)
    out, _ = ce_op.batched_call(xv, xd, tv, td, reduction, ignore_index)
    return _ft._add_batch_dim(out, 0, level)


def _no_cast(args, kwargs):
    return args, kwargs


def _cpu_call(parse):
    """The routed arguments of a call to ``func`` (``parse``'s tuple), or None when
    the call stays as it is: ``parse`` does not cover it, or its input is not on the
    CPU (on CUDA vmap's grouped convolutions and folded batch norms are cuDNN's)."""

    def parsed(args, kwargs):
        got = parse(*args, **kwargs)
        if got is None or got[0].device.type != "cpu":
            return None
        return got

    return parsed


def _conv_routes(func, d: int):
    parse = _cpu_call(lambda *a, **k: conv_op.conv_args(d, *a, **k))

    def fast(*args, **kwargs):
        got = parse(args, kwargs)
        if got is None:
            return _NOT_HANDLED
        x, weight, bias, *rest = got
        level = _level_of(weight)
        parts = _unwrap_all(level, (x, weight, bias))
        if parts is None:
            return _NOT_HANDLED
        (xv, xd), (wv, wd), (bv, bd) = parts
        out = conv_op.batched_call(xv, xd, wv, wd, bv, bd, *rest)
        return _ft._add_batch_dim(out, 0, level)

    def general(*args, **kwargs):
        got = parse(args, kwargs)
        if got is None:
            return func(*args, **kwargs)
        return conv_op.conv(*got)

    return fast, general, _autocast_linear


def _bn_routes(func, parse_args):
    parse = _cpu_call(parse_args)

    def fast(*args, **kwargs):
        got = parse(args, kwargs)
        if got is None:
            return _NOT_HANDLED
        x, *params = got[:5]
        training, momentum, eps = got[5:]
        level = next((lv for lv in map(_level_of, params) if lv is not None), None)
        parts = _unwrap_all(level, (x, *params))
        if parts is None:
            return _NOT_HANDLED
        (xv, xd), *pparts = parts
        values = tuple(v for v, _ in pparts)
        dims = tuple(d for _, d in pparts)
        track = training and params[2] is not None
        if track and (dims[2] is None or dims[3] is None):
            return _NOT_HANDLED  # shared running statistics: vmap's own error
        out, _, _, new_mean, new_var = bn_op.batched_call(
            xv, xd, values, dims, training, momentum, eps
        )
        if track:
            bn_op.update_running_stats(
                values[2].movedim(dims[2], 0), values[3].movedim(dims[3], 0), new_mean, new_var
            )
        return _ft._add_batch_dim(out, 0, level)

    def general(*args, **kwargs):
        got = parse(args, kwargs)
        if got is None:
            return func(*args, **kwargs)
        out, _, _, new_mean, new_var = bn_op.batch_norm(*got)
        running_mean, running_var, training = got[3:6]
        if training and running_mean is not None:
            bn_op.update_running_stats(running_mean, running_var, new_mean, new_var)
        return out

    return fast, general, _no_cast


_ROUTES = {
    torch._C._nn.linear: (_fast_linear, linear_op.linear, _autocast_linear),
    torch.nn.functional.linear: (_fast_linear, linear_op.linear, _autocast_linear),
    torch.nn.functional.cross_entropy: (_fast_cross_entropy, ce_op.route, _autocast_float32),
}

#: Routed with ``route_conv``: convolutions and batch norms on the CPU, as loops of
#: the native kernels over models (:mod:`modelbatch.ops.conv`,
#: :mod:`modelbatch.ops.batch_norm`).
_CONV_ROUTES = {
    **{fn: _conv_routes(fn, d) for fn, d in conv_op.SPATIAL.items()},
    torch.nn.functional.batch_norm: _bn_routes(torch.nn.functional.batch_norm, bn_op.bn_args),
    torch.batch_norm: _bn_routes(torch.batch_norm, bn_op.torch_bn_args),
}


#: ``torch.nn.functional`` functions that make random calls through the module's own
#: globals. The mode is switched off while it handles a call, so it never sees those
#: inner calls; for these functions the globals are routed for the call's duration.
_NESTED_RANDOM = {
    torch.nn.functional.multi_head_attention_forward: ("dropout", "scaled_dot_product_attention"),
    # The recurrent ops' batching rules (modelbatch.batching) draw the dropout
    # between layers through F.dropout.
    **{fn: ("dropout",) for fn in (torch.lstm, torch.gru, torch.rnn_tanh, torch.rnn_relu)},
}
_F = torch.nn.functional.__dict__
_ORIGINALS = {name: _F[name] for names in _NESTED_RANDOM.values() for name in names}
_patch_lock = threading.Lock()
_patch_users = 0
_local = threading.local()  # .streams: the streams of this thread's nested calls


def _routed(original):
    call = CALLS[original]

    def routed(*args, **kwargs):
        stack = getattr(_local, "streams", None)
        if stack and is_random(call, call.bind(args, kwargs)):
            return stack[-1].call(original, call, args, kwargs)
        return original(*args, **kwargs)

    return routed


_ROUTED = {name: _routed(fn) for name, fn in _ORIGINALS.items()}


class _RoutedGlobals:
    """While a nested call runs, ``F.<name>`` routes this thread's random calls to
    ``rng``; other threads (and calls after the last exit) see torch's own functions."""

    def __init__(self, rng):
        self.rng = rng

    def __enter__(self):
        global _patch_users
        with _patch_lock:
            if _patch_users == 0:
                _F.update(_ROUTED)
            _patch_users += 1
        if not hasattr(_local, "streams"):
            _local.streams = []
        _local.streams.append(self.rng)

    def __exit__(self, *exc):
        global _patch_users
        _local.streams.pop()
        with _patch_lock:
            _patch_users -= 1
            if _patch_users == 0:
                _F.update(_ORIGINALS)


class ModelBatchMode(TorchFunctionMode):
    """The interception mode; see the module docstring.

    Args:
        route_ops: route linear and cross-entropy to the batched ops.
        rng: the per-model streams (:class:`modelbatch.rng.PhiloxStreams` or
            :class:`~modelbatch.rng.TorchStreams`) random calls draw from, or None.
        route_conv: route convolutions and batch norms on the CPU to the batched
            ops (``modelbatch::conv``, ``modelbatch::batch_norm``). Apart from
            ``route_ops``: compiled, inductor would run vmap's grouped convolutions
            through the same slow oneDNN kernels as eager mode, so a compiled
            step routes these while it leaves linear and cross-entropy to inductor.
    """

    def __init__(self, route_ops: bool = True, rng=None, route_conv: bool = True) -> None:
        super().__init__()
        self.route_ops = route_ops
        self.rng = rng
        self.route_conv = route_conv

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.rng is not None:
            call = CALLS.get(func)
            if call is not None and is_random(call, call.bind(args, kwargs)):
                if torch.compiler.is_compiling() and not getattr(self.rng, "traceable", False):
                    raise NotImplementedError(COMPILED_RANDOM_ERROR)
                return self.rng.call(func, call, args, kwargs)
            if func in _NESTED_RANDOM and not torch.compiler.is_compiling():
                # (While compiling, a random call inside meets vmap's randomness="error".)
                with _RoutedGlobals(self.rng):
                    return func(*args, **kwargs)
        route = _ROUTES.get(func) if self.route_ops else None
        if route is None and self.route_conv:
            route = _CONV_ROUTES.get(func)
        if route is not None:
            fast, general, autocast = route
            args, kwargs = autocast(args, kwargs)
            # torch.compile traces the dispatcher path (the ops' vmap rules); the
            # fast path's functorch internals are for eager mode only.
            if not torch.compiler.is_compiling():
                out = fast(*args, **kwargs)
                if out is not _NOT_HANDLED:
                    return out
            return general(*args, **kwargs)
        return func(*args, **kwargs)
