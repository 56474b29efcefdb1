"""``modelbatch::conv``: ``F.conv1d`` / ``F.conv2d`` / ``F.conv3d`` for N models at once.

Three ops:

* ``modelbatch::conv(x, weight, bias, stride, padding, dilation, groups)`` has
  exactly the meaning of ``F.conv{1,2,3}d`` on a batched input ``[B, C, *S]`` for
  one model (``aten::convolution``, numeric padding). Inside ModelBatch's forward on
  the CPU every ``F.conv*d`` / ``nn.Conv*d`` call it covers (:func:`conv_args`) is
  routed to it (see :mod:`modelbatch.interception`); its vmap rule turns the vmapped
  call into one call of the batched op below.
* ``modelbatch::batched_conv(x, weight, bias, stride, padding, dilation, groups,
  shared)`` takes an explicit model axis: ``weight [N, O, C/groups, *K]``, ``bias
  [N, O]`` (or None) and either a shared input ``x [B, C, *S]`` (``shared=True``) or
  per-model inputs ``x [N, B, C, *S]``; it returns ``[N, B, O, *S']``.
* ``modelbatch::batched_conv_backward(grad, x, weight, stride, padding, dilation,
  groups, shared, output_mask)``: ``(grad_x, grad_weight [N, O, C/groups, *K],
  grad_bias [N, O])``, an empty ``[0]`` tensor for each one ``output_mask`` does not
  ask for; ``grad_x`` of a shared input is the sum over models.

Why a loop over models. ``torch.vmap`` batches a convolution with per-model weights
into one grouped convolution of ``N * groups`` groups over ``[B, N * C, *S]``. On
the CPU oneDNN runs grouped convolutions with many groups (and their backward) far
slower than the N convolutions one at a time, and the folded layout makes vmap
copy every activation between ``[B, N, C, ...]`` and ``[N, B, C, ...]`` around the
batch norms. The batched op runs ``aten::convolution`` (oneDNN at these sizes) on
each model's contiguous slice and writes the results into one stacked output, and
its backward is ``aten::convolution_backward`` per model likewise; batch 32 per
model keeps oneDNN efficient, and the Python loop costs ~20 us per model and call.
Contiguous 2-D convolutions with few input values per output (``C * kh * kw <=``
:data:`IM2COL_MAX`: an RGB stem, 1x1 projections) run their forward as im2col + GEMM
(``aten::_slow_conv2d_forward``) instead, written straight into the stacked output.
On CUDA (cuDNN's grouped convolutions are good) the interception leaves ``F.conv*d``
to vmap; the ops themselves run anywhere. With :mod:`modelbatch.ops.batch_norm`, a
ResNet-8 training step (benchmarks/suite.py ``cnn``, batch 32, 2 CPU threads) of
N=256 models takes 6.1 s eager and 5.9 s as TrainStep, against 10.3 s for the
torch.func recipe and 5.5 s for the models one after another.

Memory layout: each model's output (and ``grad_x``) has the memory format that
``aten::convolution`` gives one model: channels-last when that model's input or
weight is channels-last (``x.contiguous(memory_format=torch.channels_last)``; the
whole network then stays channels-last, whose convolutions oneDNN runs about twice
as fast),
contiguous otherwise; the stacked tensor is model-major, ``out[n]`` being model n's
output in that format.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch._C import _functorch as _ft
from torch._prims_common import suggest_memory_format

from modelbatch.ops._registry import check_dtype_device, store_model_grads

aten = torch.ops.aten

# ---------------------------------------------------------------------------- checks


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__


def _out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def check_conv(
    op: str,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride,
    padding,
    dilation,
    groups: int,
    shared: bool,
) -> list[int]:
    """Validate the arguments of ``batched_conv``; returns one model's output shape
    ``[B, O, *S']``. Raises ValueError naming the first mismatch."""
    if not isinstance(weight, Tensor) or weight.dim() not in (4, 5, 6):
        raise ValueError(
            f"{op}: weight must be a [N, O, C/groups, *K] tensor with 1 to 3 spatial "
            f"dims, got {_shape(weight)}"
        )
    n, o, cg = weight.shape[:3]
    kernel = list(weight.shape[3:])
    d = len(kernel)
    want = 2 + d if shared else 3 + d
    if not isinstance(x, Tensor) or x.dim() != want:
        form = "[B, C, *S] (shared=True)" if shared else "[N, B, C, *S] (shared=False)"
        raise ValueError(
            f"{op}: x must be a {want}-D {form} tensor for a weight {tuple(weight.shape)} "
            f"with {d} spatial dims, got {_shape(x)}"
        )
    if not shared and x.shape[0] != n:
        raise ValueError(
            f"{op}: x has {x.shape[0]} models (x {tuple(x.shape)}), weight has N={n} "
            f"(weight {tuple(weight.shape)})"
        )
    for name, v in (("stride", stride), ("padding", padding), ("dilation", dilation)):
        if len(v) != d:
            raise ValueError(f"{op}: {name} must have {d} values (one per spatial dim), got {v}")
    if any(s < 1 for s in stride) or any(p < 0 for p in padding) or any(t < 1 for t in dilation):
        raise ValueError(
            f"{op}: stride and dilation must be >= 1 and padding >= 0, got stride {stride}, "
            f"padding {padding}, dilation {dilation}"
        )
    if groups < 1 or o % groups != 0:
        raise ValueError(f"{op}: groups={groups} must be >= 1 and divide O={o}")
    per = x.shape if shared else x.shape[1:]
    if per[1] != cg * groups:
        raise ValueError(
            f"{op}: x has {per[1]} channels (x {tuple(x.shape)}), weight {tuple(weight.shape)} "
            f"with groups={groups} expects {cg * groups}"
        )
    if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (n, o)):
        raise ValueError(f"{op}: bias must be None or [N, O] = {[n, o]}, got {_shape(bias)}")
    check_dtype_device(op, x, (("weight", weight), ("bias", bias)))
    spatial = [
        _out_size(per[2 + j], kernel[j], stride[j], padding[j], dilation[j]) for j in range(d)
    ]
    if any(s < 1 for s in spatial):
        raise ValueError(
            f"{op}: the kernel {kernel} (dilation {dilation}) is larger than the padded "
            f"input {list(per[2:])} (padding {padding})"
        )
    return [per[0], o, *spatial]


# ---------------------------------------------------------------------------- layout


def model_format(x1: Tensor, w1: Tensor) -> torch.memory_format:
    """The memory format ``aten::convolution`` gives the output of one model's
    input ``x1 [B, C, *S]`` and weight ``w1``: channels-last (2-D) or
    channels-last-3d (3-D) when either is, contiguous otherwise."""
    if x1.dim() == 4:
        cl = torch.channels_last
    elif x1.dim() == 5:
        cl = torch.channels_last_3d
    else:
        return torch.contiguous_format
    if suggest_memory_format(x1) == cl or suggest_memory_format(w1) == cl:
        return cl
    return torch.contiguous_format


def _strides(shape, fmt: torch.memory_format) -> list[int]:
    """Dense strides of ``shape`` in memory format ``fmt``."""
    if fmt == torch.contiguous_format:
        order = list(range(len(shape)))[::-1]  # innermost first
    else:  # channels last: C innermost, then the spatial dims, then the batch
        order = [1, *range(len(shape) - 1, 1, -1), 0]
    strides = [0] * len(shape)
    step = 1
    for dim in order:
        strides[dim] = step
        step *= shape[dim]
    return strides


def stacked_empty(like: Tensor, n: int, shape, fmt: torch.memory_format, dtype=None) -> Tensor:
    """An uninitialised ``[n, *shape]``, model-major, each model's slice dense in
    memory format ``fmt``."""
    per = _strides(shape, fmt)
    numel = 1
    for s in shape:
        numel *= s
    return like.new_empty_strided((n, *shape), (numel, *per), dtype=dtype or like.dtype)


# ---------------------------------------------------------------------------- kernels


#: The largest ``C * kh * kw`` of a contiguous 2-D convolution whose forward runs as
#: im2col + GEMM (``aten::_slow_conv2d_forward``, writing straight into the model's
#: slice) rather than oneDNN: oneDNN pads the few input channels of a first layer
#: (RGB) or of a 1x1 projection up to its channel blocks, which makes these 1.5x
#: (1x1, 16-32 channels) to 5x (3x3 on 3 channels) slower (ResNet-8's layers,
#: batch 32). The backward stays oneDNN's.
IM2COL_MAX = 32


def _im2col(x, weight, dilation, groups, shared, fmt) -> bool:
    if weight.dim() != 5 or groups != 1 or any(d != 1 for d in dilation):
        return False
    if fmt != torch.contiguous_format or x.dtype not in (torch.float32, torch.float64):
        return False
    if weight.shape[2] * weight.shape[3] * weight.shape[4] > IM2COL_MAX:
        return False
    x1 = x if shared else x[0]
    return x1.is_contiguous() and weight[0].is_contiguous()


def _model(t: Tensor | None, k: int, shared: bool = False) -> Tensor | None:
    if t is None or shared:
        return t
    return t[k]


def _forward(x, weight, bias, stride, padding, dilation, groups, shared):
    n = weight.shape[0]
    shape = check_conv(
        "modelbatch::batched_conv", x, weight, bias, stride, padding, dilation, groups, shared
    )
    fmt = model_format(x if shared else x[0], weight[0])
    out = stacked_empty(x, n, shape, fmt)
    if _im2col(x, weight, dilation, groups, shared, fmt):
        kernel = list(weight.shape[3:])
        for k in range(n):
            aten._slow_conv2d_forward.output(
                _model(x, k, shared), weight[k], kernel, _model(bias, k), stride, padding,
                output=out[k],
            )  # fmt: skip
        return out
    zeros = [0] * len(stride)
    for k in range(n):
        y = aten.convolution(
            _model(x, k, shared), weight[k], _model(bias, k), stride, padding, dilation, False,
            zeros, groups,
        )  # fmt: skip
        out[k].copy_(y)
    return out


def _backward(grad, x, weight, stride, padding, dilation, groups, shared, output_mask):
    n = weight.shape[0]
    check_conv(
        "modelbatch::batched_conv_backward", x, weight, None, stride, padding, dilation,
        groups, shared,
    )  # fmt: skip
    need_x, need_w, need_b = output_mask
    # Three distinct empty tensors: an op's outputs may not alias each other.
    gx, gw, gb = x.new_empty(0), x.new_empty(0), x.new_empty(0)
    if need_x:
        gx = torch.empty_like(x)
    if need_w:
        gw = weight.new_empty(weight.shape)
    if need_b:
        gb = weight.new_empty(weight.shape[:2])
    zeros = [0] * len(stride)
    bias_sizes = [weight.shape[1]]
    mask = [need_x, need_w, need_b]
    for k in range(n):
        gxk, gwk, gbk = aten.convolution_backward(
            grad[k], _model(x, k, shared), weight[k], bias_sizes, stride, padding, dilation,
            False, zeros, groups, mask,
        )  # fmt: skip
        store_model_grads(k, shared, (gx, gw, gb), (gxk, gwk, gbk), mask)
    return gx, gw, gb


def reference(x, weight, bias, stride, padding, dilation, groups, shared) -> Tensor:
    """Pure-torch oracle of ``batched_conv``: ``torch.vmap`` of ``aten::convolution``
    (one grouped convolution), contiguous."""
    zeros = [0] * len(stride)

    def one(xk, wk, bk):
        return aten.convolution(xk, wk, bk, stride, padding, dilation, False, zeros, groups)

    in_dims = (None if shared else 0, 0, None if bias is None else 0)
    return torch.vmap(one, in_dims=in_dims)(x, weight, bias).contiguous()


# ---------------------------------------------------------------------------- ops


@torch.library.custom_op("modelbatch::batched_conv", mutates_args=())
def batched_conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    shared: bool,
) -> Tensor:
    return _forward(x, weight, bias, stride, padding, dilation, groups, shared)


@batched_conv.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, shared):
    shape = check_conv(
        "modelbatch::batched_conv", x, weight, bias, stride, padding, dilation, groups, shared
    )
    fmt = model_format(x if shared else x[0], weight[0])
    return stacked_empty(x, weight.shape[0], shape, fmt)


@torch.library.custom_op("modelbatch::batched_conv_backward", mutates_args=())
def batched_conv_backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    shared: bool,
    output_mask: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    return _backward(grad, x, weight, stride, padding, dilation, groups, shared, output_mask)


@batched_conv_backward.register_fake
def _(grad, x, weight, stride, padding, dilation, groups, shared, output_mask):
    check_conv(
        "modelbatch::batched_conv_backward", x, weight, None, stride, padding, dilation,
        groups, shared,
    )  # fmt: skip
    need_x, need_w, need_b = output_mask
    return (
        torch.empty_like(x) if need_x else x.new_empty(0),
        weight.new_empty(weight.shape) if need_w else x.new_empty(0),
        weight.new_empty(weight.shape[:2]) if need_b else x.new_empty(0),
    )


def _batched_setup(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation, groups, shared = inputs
    ctx.save_for_backward(x, weight)
    ctx.args = (stride, padding, dilation, groups, shared)
    ctx.has_bias = bias is not None


def _batched_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    need_b = need_b and ctx.has_bias
    gx, gw, gb = batched_conv_backward(grad, x, weight, *ctx.args, [need_x, need_w, need_b])
    return (
        gx if need_x else None,
        gw if need_w else None,
        gb if need_b else None,
        None, None, None, None, None,
    )  # fmt: skip


batched_conv.register_autograd(_batched_backward, setup_context=_batched_setup)


@torch.library.custom_op("modelbatch::conv", mutates_args=())
def conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> Tensor:
    zeros = [0] * len(stride)
    return aten.convolution(x, weight, bias, stride, padding, dilation, False, zeros, groups)


@conv.register_fake
def _(x, weight, bias, stride, padding, dilation, groups):
    zeros = [0] * len(stride)
    return aten.convolution(x, weight, bias, stride, padding, dilation, False, zeros, groups)


def _conv_setup(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(x, weight)
    ctx.args = (stride, padding, dilation, groups)
    ctx.has_bias = bias is not None


def _conv_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.args
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    need_b = need_b and ctx.has_bias
    gx, gw, gb = aten.convolution_backward(
        grad, x, weight, [weight.shape[0]], stride, padding, dilation, False,
        [0] * len(stride), groups, [need_x, need_w, need_b],
    )  # fmt: skip
    return gx, gw, gb, None, None, None, None


conv.register_autograd(_conv_backward, setup_context=_conv_setup)


def _is_batched(t) -> bool:
    return isinstance(t, Tensor) and _ft.is_batchedtensor(t)


def batched_call(x, xd, weight, wd, bias, bd, stride, padding, dilation, groups) -> Tensor:
    """``conv`` of N models from values with their model axes ``xd``, ``wd``,
    ``bd`` (None: not batched), ``[N, B, O, *S']``: the vmap rule's body."""
    if wd is None:
        # Shared weights, batched input: one convolution over the folded batch.
        x = x.movedim(xd, 0)
        n, b = x.shape[:2]
        y = conv(x.reshape(n * b, *x.shape[2:]), weight, bias, stride, padding, dilation, groups)
        return y.view(n, b, *y.shape[1:])
    weight = weight.movedim(wd, 0)
    n, o = weight.shape[:2]
    if bias is not None:
        bias = bias.movedim(bd, 0) if bd is not None else bias.expand(n, o)
    if xd is not None:
        x = x.movedim(xd, 0)
    return batched_conv(x, weight, bias, stride, padding, dilation, groups, xd is None)


def _vmap_rule(info, in_dims, x, weight, bias, stride, padding, dilation, groups):
    xd, wd, bd = in_dims[:3]
    if any(_is_batched(t) for t in (x, weight, bias)):
        # Batched at an outer vmap level too: one call per model of this level,
        # each of which meets the next level's rule.
        n = info.batch_size
        outs = [
            conv(
                x if xd is None else x.select(xd, k),
                weight if wd is None else weight.select(wd, k),
                bias if bd is None else bias.select(bd, k),
                stride,
                padding,
                dilation,
                groups,
            )
            for k in range(n)
        ]
        return torch.stack(outs), 0
    return batched_call(x, xd, weight, wd, bias, bd, stride, padding, dilation, groups), 0


torch.library.register_vmap("modelbatch::conv", _vmap_rule)


# ---------------------------------------------------------------------------- routing

#: The torch functions routed to ``conv`` and their number of spatial dims.
SPATIAL = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}


def _tuple(v, d: int):
    """``v`` (an int or a sequence of 1 or ``d`` ints) as ``d`` ints, or None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return [v] * d
    if not isinstance(v, list | tuple) or len(v) not in (1, d):
        return None
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        return None
    return list(v) * d if len(v) == 1 else list(v)


def conv_args(d: int, input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """``(x, weight, bias, stride, padding, dilation, groups)`` with list arguments
    of ``d`` ints, for the call ``F.conv{d}d(...)`` that ``conv`` covers; None when
    it does not (then the call runs as it is, which also raises torch's own errors
    for bad arguments). Covered: a batched input per model (``x.dim() == weight.dim()``)
    with the channels, dtype and device the weight expects, floating point, numeric
    padding or ``"valid"`` / a symmetric ``"same"``."""
    if not isinstance(input, Tensor) or not isinstance(weight, Tensor):
        return None
    if weight.dim() != d + 2 or input.dim() != d + 2 or not isinstance(groups, int):
        return None
    if not input.dtype.is_floating_point or input.dtype != weight.dtype:
        return None
    if bias is not None and (
        not isinstance(bias, Tensor)
        or bias.dtype != weight.dtype
        or tuple(bias.shape) != (weight.shape[0],)
    ):
        return None
    if input.device != weight.device or groups < 1 or weight.shape[0] % groups != 0:
        return None
    if input.shape[1] != weight.shape[1] * groups:
        return None
    stride = _tuple(stride, d)
    dilation = _tuple(dilation, d)
    if stride is None or dilation is None:
        return None
    kernel = list(weight.shape[2:])
    if padding == "valid":
        padding = [0] * d
    elif padding == "same":
        if any(s != 1 for s in stride):
            return None
        totals = [dl * (k - 1) for dl, k in zip(dilation, kernel)]
        if any(t % 2 for t in totals):
            return None  # asymmetric: F.conv*d pads the input itself
        padding = [t // 2 for t in totals]
    elif isinstance(padding, str):
        return None
    else:
        padding = _tuple(padding, d)
        if padding is None:
            return None
    if any(s < 1 for s in stride) or any(t < 1 for t in dilation) or any(p < 0 for p in padding):
        return None
    for j in range(d):
        if _out_size(input.shape[2 + j], kernel[j], stride[j], padding[j], dilation[j]) < 1:
            return None
    return input, weight, bias, stride, padding, dilation, groups
