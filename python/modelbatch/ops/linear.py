"""``modelbatch::linear``: ``F.linear`` for N models at once.

Two ops:

* ``modelbatch::linear(x, weight, bias)`` has exactly ``F.linear``'s meaning for
  one model. Inside ModelBatch's forward every ``F.linear`` / ``nn.Linear`` call is
  routed to it (see :mod:`modelbatch.interception`); its vmap rule turns the
  vmapped call into one call of the batched op below.
* ``modelbatch::batched_linear(x, weight, bias, shared)`` takes an explicit model
  axis: ``weight [N, O, I]``, ``bias [N, O]`` (or None) and either a shared input
  ``x [M, I]`` (``shared=True``) or per-model inputs ``x [N, M, I]``; it returns a
  contiguous ``[N, M, O]``. Forward, weight gradient and input gradient are each one
  batched GEMM (``modelbatch::small_bmm``; a shared input is broadcast with a zero
  stride, never copied), the bias is fused into the forward GEMM.

Plain vmap of ``F.linear`` with a shared input leaves its output with the model
axis in the middle of memory, so every later op of the model (activations, the
next layer's GEMM, their backward) runs on strided data; this op keeps every
activation contiguous ``[N, M, O]``. One layer's forward+backward is 1.1x to 1.8x
faster than ``vmap(F.linear)`` and ``torch.baddbmm`` up to 256 x 256 weights
(benchmarks/bench_linear.py); on 1024 x 1024 weights, where ``small_bmm`` hands
the GEMMs to MKL, it is about 1.2x slower than ``torch.baddbmm`` (the CPU results
in benchmarks/results/cpu/linear.md). Whole small-MLP steps: benchmarks/bench.py.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _gemm(a: Tensor, b: Tensor, trans_a: bool, trans_b: bool, bias: Tensor | None) -> Tensor:
    # modelbatch::small_bmm: the C++ register-blocked kernel for the small per-model
    # products on CPU (it falls back to torch.bmm where that is faster); torch.bmm
    # semantics elsewhere.
    return torch.ops.modelbatch.small_bmm(a, b, trans_a, trans_b, bias)


@torch.library.custom_op("modelbatch::batched_linear", mutates_args=())
def batched_linear(x: Tensor, weight: Tensor, bias: Tensor | None, shared: bool) -> Tensor:
    n, _, i = weight.shape
    xb = x.expand(n, x.shape[0], i) if shared else x
    return _gemm(xb, weight, False, True, bias)


@batched_linear.register_fake
def _(x, weight, bias, shared):
    m = x.shape[0] if shared else x.shape[1]
    return x.new_empty((weight.shape[0], m, weight.shape[1]))


def _setup(ctx, inputs, output):
    x, weight, bias, shared = inputs
    ctx.save_for_backward(x, weight)
    ctx.shared = shared
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    n, o, i = weight.shape
    grad = grad.contiguous()
    gx = gw = gb = None
    xb = x.expand(n, x.shape[0], i) if ctx.shared else x
    if ctx.needs_input_grad[1]:
        gw = _gemm(grad, xb, True, False, None)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        gb = grad.sum(1)
    if ctx.needs_input_grad[0]:
        if ctx.shared:
            # sum over models and outputs in one GEMM: [M, N*O] @ [N*O, I]
            gx = grad.transpose(0, 1).reshape(grad.shape[1], n * o) @ weight.reshape(n * o, i)
        else:
            gx = _gemm(grad, weight, False, False, None)
    return gx, gw, gb, None


batched_linear.register_autograd(_backward, setup_context=_setup)


@torch.library.custom_op("modelbatch::linear", mutates_args=())
def linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return torch.nn.functional.linear(x, weight, bias)


@linear.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _linear_setup(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _linear_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    gx = grad @ weight if ctx.needs_input_grad[0] else None
    g2 = grad.reshape(-1, grad.shape[-1])
    gw = g2.t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
    gb = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return gx, gw, gb


linear.register_autograd(_linear_backward, setup_context=_linear_setup)


def _vmap_rule(info, in_dims, x, weight, bias):
    xd, wd, bd = in_dims
    if wd is None:
        # Shared weights, batched input: an ordinary linear over the extra axis.
        x = x.movedim(xd, 0)
        return torch.nn.functional.linear(x, weight, bias), 0
    weight = weight.movedim(wd, 0)
    n, o, i = weight.shape
    if bias is not None:
        bias = bias.movedim(bd, 0) if bd is not None else bias.expand(n, o)
    if xd is None:
        lead = x.shape[:-1]
        out = batched_linear(x.reshape(-1, i), weight, bias, True)
    else:
        x = x.movedim(xd, 0)
        lead = x.shape[1:-1]
        out = batched_linear(x.reshape(n, -1, i), weight, bias, False)
    return out.view(n, *lead, o), 0


torch.library.register_vmap("modelbatch::linear", _vmap_rule)


def reference(x: Tensor, weight: Tensor, bias: Tensor | None, shared: bool) -> Tensor:
    """Pure-torch oracle of ``batched_linear``: a loop of ``F.linear`` over models."""
    outs = []
    for k in range(weight.shape[0]):
        xk = x if shared else x[k]
        outs.append(torch.nn.functional.linear(xk, weight[k], None if bias is None else bias[k]))
    return torch.stack(outs)
