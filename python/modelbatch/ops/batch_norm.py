"""``modelbatch::batch_norm``: ``F.batch_norm`` for N models at once.

Three ops, all functional (the running statistics are returned, not mutated):

* ``modelbatch::batch_norm(x, weight, bias, running_mean, running_var, training,
  momentum, eps)``: ``aten::native_batch_norm`` of one model on ``x [B, C, *S]``,
  returning ``(out, save_mean, save_invstd, new_running_mean, new_running_var)``;
  the new running statistics are empty ``[0]`` tensors when nothing is tracked
  (evaluation, or no running statistics). Inside ModelBatch's forward on the CPU
  every ``F.batch_norm`` / ``nn.BatchNorm*d`` call it covers is routed to it (see
  :mod:`modelbatch.interception`), which copies the new statistics into the
  running buffers as ``F.batch_norm`` would update them; its vmap rule calls the
  batched op below once for all models.
* ``modelbatch::batched_batch_norm(x, weight, bias, running_mean, running_var,
  training, momentum, eps, shared)``: the same with an explicit model axis: ``x [N,
  B, C, *S]`` (or a shared ``[B, C, *S]``), ``weight`` / ``bias`` / running
  statistics ``[N, C]`` or None; ``save_mean`` / ``save_invstd`` are ``[N, C]``
  (``[N, 0]`` in evaluation, as the native kernel).
* ``modelbatch::batched_batch_norm_backward(grad, x, weight, running_mean,
  running_var, save_mean, save_invstd, training, eps, shared, output_mask)``:
  ``(grad_x, grad_weight [N, C], grad_bias [N, C])``, an empty ``[0]`` tensor for
  each one not asked for.

The batched ops run the native CPU kernels (``native_batch_norm`` writing straight
into the model's slice of the stacked output, ``native_batch_norm_backward``) model
by model. vmap's own rule folds the model axis into the channels, ``[B, N * C,
*S]``, which costs a copy of the input and of the output around every batch norm and
an elementwise pass each for the per-model weight and bias, forward and backward;
after ``modelbatch::conv`` (model-major outputs) the folded layout is the wrong one.
Each model's output (and ``grad_x``) has the memory format of that model's input.
Results are exactly those of one model's ``F.batch_norm``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch._C import _functorch as _ft
from torch._prims_common import suggest_memory_format

from modelbatch.ops._registry import store_model_grads
from modelbatch.ops.conv import stacked_empty

aten = torch.ops.aten
_REDUCED = (torch.float16, torch.bfloat16)


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__


def stats_dtype(x: Tensor, params) -> torch.dtype:
    """The dtype of the native kernel's saved statistics: float32 when a half-type
    input meets float32 parameters (the mixed-type kernel), else ``x``'s."""
    if x.dtype in _REDUCED and any(p is not None and p.dtype == torch.float32 for p in params):
        return torch.float32
    return x.dtype


def check_batch_norm(
    op: str,
    x: Tensor,
    weight,
    bias,
    running_mean,
    running_var,
    training: bool,
    shared: bool,
    save_mean: Tensor | None = None,
) -> tuple[int, int]:
    """Validate the arguments of ``batched_batch_norm`` (and, with ``save_mean``, of
    its backward); returns ``(N, C)``. Raises ValueError naming the first mismatch."""
    lead = 0 if shared else 1
    if not isinstance(x, Tensor) or x.dim() < lead + 2:
        form = "[B, C, *S] (shared=True)" if shared else "[N, B, C, *S] (shared=False)"
        raise ValueError(f"{op}: x must be a {form} tensor, got {_shape(x)}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{op}: x must be a floating-point tensor, got {x.dtype}")
    c = x.shape[lead + 1]
    params = {
        "weight": weight,
        "bias": bias,
        "running_mean": running_mean,
        "running_var": running_var,
    }
    given = {k: v for k, v in params.items() if v is not None}
    for name, t in given.items():
        if not isinstance(t, Tensor) or t.dim() != 2:
            raise ValueError(f"{op}: {name} must be an [N, C] tensor or None, got {_shape(t)}")
    if not shared:
        n = x.shape[0]
    elif given:
        n = next(iter(given.values())).shape[0]
    elif save_mean is not None:
        n = save_mean.shape[0]
    else:
        raise ValueError(
            f"{op}: a shared x needs per-model weight, bias or running statistics, got none"
        )
    for name, t in given.items():
        if tuple(t.shape) != (n, c):
            raise ValueError(
                f"{op}: {name} is {tuple(t.shape)}, expected [N, C] = {[n, c]} (x {tuple(x.shape)})"
            )
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device}, x is on {x.device} (one device)")
        if not t.dtype.is_floating_point:
            raise ValueError(f"{op}: {name} must be floating-point, got {t.dtype}")
    if save_mean is not None:
        want = (n, c if training else 0)
        if not isinstance(save_mean, Tensor) or tuple(save_mean.shape) != want:
            raise ValueError(f"{op}: save_mean must be {list(want)}, got {_shape(save_mean)}")
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: give both running_mean and running_var, or neither")
    if not training and running_mean is None:
        raise ValueError(f"{op}: evaluation (training=False) needs running statistics")
    return n, c


def _model(t, k, shared=False):
    if t is None or shared:
        return t
    return t[k]


def _format(x1: Tensor) -> torch.memory_format:
    """The memory format of one model's output: its input's (contiguous when that is
    neither contiguous nor channels-last)."""
    return suggest_memory_format(x1) if x1.dim() in (4, 5) else torch.contiguous_format


def _out_like(x: Tensor, n: int, shared: bool) -> Tensor:
    x1 = x if shared else x[0]
    return stacked_empty(x, n, x1.shape, _format(x1))


def _forward(x, weight, bias, running_mean, running_var, training, momentum, eps, shared):
    n, c = check_batch_norm(
        "modelbatch::batched_batch_norm", x, weight, bias, running_mean, running_var, training,
        shared,
    )  # fmt: skip
    out = _out_like(x, n, shared)
    sdt = stats_dtype(x, (weight, bias, running_mean, running_var))
    cs = c if training else 0
    save_mean = x.new_empty((n, cs), dtype=sdt)
    save_invstd = x.new_empty((n, cs), dtype=sdt)
    track = training and running_mean is not None
    # native_batch_norm updates the running statistics in place: on copies here.
    new_mean = running_mean.clone() if track else x.new_empty(0)
    new_var = running_var.clone() if track else x.new_empty(0)
    rm = new_mean if track else running_mean
    rv = new_var if track else running_var
    fmt = _format(x if shared else x[0])
    xs = x.contiguous(memory_format=fmt) if shared else None
    for k in range(n):
        # The out= kernel computes wrong results from a strided input (torch 2.13):
        # each model's input is made dense first, a no-op for dense [N, ...] stacks.
        xk = xs if shared else x[k].contiguous(memory_format=fmt)
        aten.native_batch_norm.out(
            xk, _model(weight, k), _model(bias, k), _model(rm, k), _model(rv, k), training,
            momentum, eps, out=out[k], save_mean=save_mean[k], save_invstd=save_invstd[k],
        )  # fmt: skip
    return out, save_mean, save_invstd, new_mean, new_var


def _fake_forward(x, weight, bias, running_mean, running_var, training, momentum, eps, shared):
    n, c = check_batch_norm(
        "modelbatch::batched_batch_norm", x, weight, bias, running_mean, running_var, training,
        shared,
    )  # fmt: skip
    sdt = stats_dtype(x, (weight, bias, running_mean, running_var))
    cs = c if training else 0
    track = training and running_mean is not None
    return (
        _out_like(x, n, shared),
        x.new_empty((n, cs), dtype=sdt),
        x.new_empty((n, cs), dtype=sdt),
        torch.empty_like(running_mean) if track else x.new_empty(0),
        torch.empty_like(running_var) if track else x.new_empty(0),
    )


def _grad_outputs(x, weight, n, c, output_mask):
    """The backward's outputs ``(grad_x, grad_weight, grad_bias)``, each an empty
    ``[0]`` where not needed (three distinct tensors: an op's outputs may not alias),
    and the mask of the ones computed (no weight, no weight gradient)."""
    need_x, need_w, need_b = output_mask
    need_w = need_w and weight is not None
    pdt = weight.dtype if weight is not None else x.dtype
    gx = torch.empty_like(x) if need_x else x.new_empty(0)
    gw = x.new_empty((n, c), dtype=pdt) if need_w else x.new_empty(0)
    gb = x.new_empty((n, c), dtype=pdt) if need_b else x.new_empty(0)
    return gx, gw, gb, [need_x, need_w, need_b]


def _backward(
    grad, x, weight, running_mean, running_var, save_mean, save_invstd, training, eps, shared,
    output_mask,
):  # fmt: skip
    n, c = check_batch_norm(
        "modelbatch::batched_batch_norm_backward", x, weight, None, running_mean, running_var,
        training, shared, save_mean,
    )  # fmt: skip
    gx, gw, gb, mask = _grad_outputs(x, weight, n, c, output_mask)
    for k in range(n):
        gxk, gwk, gbk = aten.native_batch_norm_backward(
            grad[k], _model(x, k, shared), _model(weight, k), _model(running_mean, k),
            _model(running_var, k), save_mean[k], save_invstd[k], training, eps, mask,
        )  # fmt: skip
        store_model_grads(k, shared, (gx, gw, gb), (gxk, gwk, gbk), mask)
    return gx, gw, gb


def _fake_backward(
    grad, x, weight, running_mean, running_var, save_mean, save_invstd, training, eps, shared,
    output_mask,
):  # fmt: skip
    n, c = check_batch_norm(
        "modelbatch::batched_batch_norm_backward", x, weight, None, running_mean, running_var,
        training, shared, save_mean,
    )  # fmt: skip
    return _grad_outputs(x, weight, n, c, output_mask)[:3]


def reference(x, weight, bias, running_mean, running_var, training, momentum, eps, shared):
    """Pure-torch oracle of ``batched_batch_norm``'s output and new running
    statistics: a loop of ``F.batch_norm`` over models (on copies of the running
    statistics), ``(out, new_running_mean, new_running_var)``."""
    n = next(t for t in (weight, bias, running_mean, running_var) if t is not None).shape[0]
    rm = None if running_mean is None else running_mean.clone()
    rv = None if running_var is None else running_var.clone()
    outs = [
        torch.nn.functional.batch_norm(
            _model(x, k, shared),
            _model(rm, k),
            _model(rv, k),
            _model(weight, k),
            _model(bias, k),
            training,
            momentum,
            eps,
        )
        for k in range(n)
    ]
    return torch.stack(outs), rm, rv


# ---------------------------------------------------------------------------- ops

_OUTS = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


@torch.library.custom_op("modelbatch::batched_batch_norm", mutates_args=())
def _batched_batch_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    shared: bool,
) -> _OUTS:
    return _forward(x, weight, bias, running_mean, running_var, training, momentum, eps, shared)


@torch.library.custom_op("modelbatch::batched_batch_norm_backward", mutates_args=())
def _batched_batch_norm_backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    save_mean: Tensor,
    save_invstd: Tensor,
    training: bool,
    eps: float,
    shared: bool,
    output_mask: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    return _backward(
        grad, x, weight, running_mean, running_var, save_mean, save_invstd, training, eps,
        shared, output_mask,
    )  # fmt: skip


_batched_batch_norm.register_fake(_fake_forward)
_batched_batch_norm_backward.register_fake(_fake_backward)


def _setup(ctx, inputs, output):
    x, weight, bias, running_mean, running_var, training, _, eps, shared = inputs
    _, save_mean, save_invstd, new_mean, new_var = output
    ctx.mark_non_differentiable(save_mean, save_invstd, new_mean, new_var)
    # In training the backward needs only the batch statistics; the running ones
    # (which the caller updates in place afterwards) are saved for evaluation only.
    stats = (None, None) if training else (running_mean, running_var)
    ctx.save_for_backward(x, weight, *stats, save_mean, save_invstd)
    ctx.args = (training, eps, shared)
    ctx.has_bias = bias is not None


def _backward_rule(ctx, grad, *_):
    x, weight, running_mean, running_var, save_mean, save_invstd = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    need_b = need_b and ctx.has_bias
    training, eps, shared = ctx.args
    gx, gw, gb = _batched_batch_norm_backward(
        grad, x, weight, running_mean, running_var, save_mean, save_invstd, training, eps,
        shared, [need_x, need_w, need_b],
    )  # fmt: skip
    return (
        gx if need_x else None,
        gw if need_w else None,
        gb if need_b else None,
        None, None, None, None, None, None,
    )  # fmt: skip


_batched_batch_norm.register_autograd(_backward_rule, setup_context=_setup)


def batched_batch_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    shared: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``torch.ops.modelbatch.batched_batch_norm``: ``(out, save_mean, save_invstd,
    new_running_mean, new_running_var)``; see the module docstring."""
    return _batched_batch_norm(
        x, weight, bias, running_mean, running_var, training, momentum, eps, shared
    )


# The per-model op.
def _one(x, weight, bias, running_mean, running_var, training, momentum, eps):
    track = training and running_mean is not None
    rm = running_mean.clone() if track else running_mean
    rv = running_var.clone() if track else running_var
    out, save_mean, save_invstd = aten.native_batch_norm(
        x, weight, bias, rm, rv, training, momentum, eps
    )
    if not track:
        rm, rv = x.new_empty(0), x.new_empty(0)
    return out, save_mean, save_invstd, rm, rv


def _fake_one(x, weight, bias, running_mean, running_var, training, momentum, eps):
    out, save_mean, save_invstd = aten.native_batch_norm(
        x, weight, bias, running_mean, running_var, training, momentum, eps
    )
    track = training and running_mean is not None
    return (
        out,
        save_mean,
        save_invstd,
        torch.empty_like(running_mean) if track else x.new_empty(0),
        torch.empty_like(running_var) if track else x.new_empty(0),
    )


@torch.library.custom_op("modelbatch::batch_norm", mutates_args=())
def batch_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> _OUTS:
    return _one(x, weight, bias, running_mean, running_var, training, momentum, eps)


batch_norm.register_fake(_fake_one)


def _one_setup(ctx, inputs, output):
    x, weight, bias, running_mean, running_var, training, _, eps = inputs
    _, save_mean, save_invstd, new_mean, new_var = output
    ctx.mark_non_differentiable(save_mean, save_invstd, new_mean, new_var)
    stats = (None, None) if training else (running_mean, running_var)
    ctx.save_for_backward(x, weight, *stats, save_mean, save_invstd)
    ctx.args = (training, eps)
    ctx.has_bias = bias is not None


def _one_backward(ctx, grad, *_):
    x, weight, running_mean, running_var, save_mean, save_invstd = ctx.saved_tensors
    training, eps = ctx.args
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    mask = [need_x, need_w and weight is not None, need_b and ctx.has_bias]
    gx, gw, gb = aten.native_batch_norm_backward(
        grad, x, weight, running_mean, running_var, save_mean, save_invstd, training, eps, mask
    )
    return gx, gw, gb, None, None, None, None, None


batch_norm.register_autograd(_one_backward, setup_context=_one_setup)


def _is_batched(t) -> bool:
    return isinstance(t, Tensor) and _ft.is_batchedtensor(t)


def batched_call(x, xd, params, pdims, training, momentum, eps):
    """``batch_norm`` of N models from values with their model axes (``xd``, and
    ``pdims`` for ``(weight, bias, running_mean, running_var)``; None: not
    batched); the five outputs, model-major: the vmap rule's body."""
    n = next(p.shape[d] for p, d in zip(params, pdims) if d is not None)
    fronted = []
    for p, d in zip(params, pdims):
        if p is not None:
            p = p.movedim(d, 0) if d is not None else p.expand(n, *p.shape)
        fronted.append(p)
    shared = xd is None
    if not shared:
        x = x.movedim(xd, 0)
    return batched_batch_norm(x, *fronted, training, momentum, eps, shared)


def _vmap_rule(info, in_dims, x, weight, bias, running_mean, running_var, training, momentum, eps):
    xd, *pdims = in_dims[:5]
    params = (weight, bias, running_mean, running_var)
    if any(_is_batched(t) for t in (x, *params)) or all(d is None for d in pdims):
        # Batched at an outer vmap level too, or nothing per model but the input:
        # one call per model of this level.
        n = info.batch_size
        outs = [
            batch_norm(
                x if xd is None else x.select(xd, k),
                *(p if d is None else p.select(d, k) for p, d in zip(params, pdims)),
                training,
                momentum,
                eps,
            )
            for k in range(n)
        ]
        return tuple(torch.stack(ts) for ts in zip(*outs)), (0, 0, 0, 0, 0)
    return batched_call(x, xd, params, pdims, training, momentum, eps), (0, 0, 0, 0, 0)


torch.library.register_vmap("modelbatch::batch_norm", _vmap_rule)


# ---------------------------------------------------------------------------- routing


def bn_args(
    input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
    eps=1e-5,
):  # fmt: skip
    """``(x, weight, bias, running_mean, running_var, training, momentum, eps)`` of a
    call ``F.batch_norm(...)`` that ``batch_norm`` covers, or None (then the call
    runs as it is, raising torch's own errors for bad arguments). Covered: a
    floating input ``[B, C, *S]`` whose parameters and running statistics (both or
    neither; required in evaluation) are ``[C]`` floating tensors on its device, and
    a float momentum."""
    if not isinstance(input, Tensor) or input.dim() < 2 or not input.dtype.is_floating_point:
        return None
    if not isinstance(momentum, float | int) or isinstance(momentum, bool):
        return None
    if not isinstance(eps, float | int) or isinstance(eps, bool):
        return None
    c = input.shape[1]
    params = (weight, bias, running_mean, running_var)
    for p in params:
        if p is None:
            continue
        if not isinstance(p, Tensor) or tuple(p.shape) != (c,) or p.device != input.device:
            return None
        if not p.dtype.is_floating_point:
            return None
    dtypes = {p.dtype for p in params if p is not None}
    if len(dtypes) > 1 or not dtypes <= {input.dtype, torch.float32}:
        return None
    if dtypes == {torch.float32} and input.dtype not in (torch.float32, *_REDUCED):
        return None  # the kernel mixes only half types with float32
    if (running_mean is None) != (running_var is None):
        return None
    if not training and running_mean is None:
        return None
    if c == 0 or (training and input.numel() // c == 1):
        return None  # F.batch_norm raises "Expected more than 1 value per channel"
    return (
        input,
        weight,
        bias,
        running_mean,
        running_var,
        bool(training),
        float(momentum),
        float(eps),
    )


def torch_bn_args(
    input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn_enabled=True
):
    """:func:`bn_args` of a call ``torch.batch_norm(...)`` (its argument order)."""
    return bn_args(input, running_mean, running_var, weight, bias, training, momentum, eps)


def update_running_stats(running_mean, running_var, new_mean, new_var) -> None:
    """What ``F.batch_norm`` does to the running statistics: copy in the new ones."""
    with torch.no_grad():
        running_mean.copy_(new_mean)
        running_var.copy_(new_var)
