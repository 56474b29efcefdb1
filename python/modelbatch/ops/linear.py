"""``modelbatch::linear``: ``F.linear`` for N models at once.

Three ops:

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
* ``modelbatch::linear_act(x, weight, bias, activation, shared)`` is
  ``batched_linear`` followed by an activation (``"none"``, ``"relu"``, ``"gelu"``,
  ``"gelu_tanh"``, ``"silu"``, ``"tanh"``), ``[N, M, O]``. On CUDA the bias and the
  activation are the epilogue of one Triton GEMM (``kernels/linear.py``), and the
  backward applies the activation derivative inside the GEMMs that consume it;
  elsewhere the pure-torch :func:`reference_linear_act_forward` /
  :func:`reference_linear_act_backward` run (one GEMM for a shared input, a
  batched GEMM otherwise; never a loop over models). It decomposes into
  ``modelbatch::linear_act_forward`` (which also returns the pre-activation that
  the gelu / silu backward needs) and ``modelbatch::linear_act_backward``, both
  ``torch.library.triton_op``s, so ``torch.compile`` sees their Triton kernels;
  they are defined on first use (:func:`linear_act_ops`). Not yet routed to by
  the interception (``nn.Linear`` + activation pairs).

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

import importlib.util
import threading

import torch
from torch import Tensor

from modelbatch.ops._registry import check_dtype_device


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


# --------------------------------------------------------------------------
# modelbatch::linear_act: batched linear + bias + activation, fused on CUDA
# --------------------------------------------------------------------------

#: The activations ``linear_act`` fuses (``gelu`` is the exact erf form and
#: ``gelu_tanh`` the tanh approximation, as ``F.gelu(approximate=...)``).
ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "silu", "tanh")
#: The activations whose derivative needs the pre-activation (saved by the
#: forward); relu and tanh differentiate from the output.
SAVES_PRE = frozenset({"gelu", "gelu_tanh", "silu"})


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__


def check_linear_act(
    op: str, x: Tensor, weight: Tensor, bias: Tensor | None, activation: str, shared: bool
) -> tuple[int, int, int, int]:
    """Validate the arguments of ``linear_act``; returns ``(N, M, I, O)``.

    ``weight [N, O, I]``, ``bias [N, O]`` or None, ``x [M, I]`` (``shared``) or
    ``[N, M, I]``, one floating dtype and one device; ``activation`` in
    :data:`ACTIVATIONS`. Raises ValueError naming the first mismatch."""
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if not isinstance(weight, Tensor) or weight.dim() != 3:
        raise ValueError(f"{op}: weight must be a 3-D [N, O, I] tensor, got {_shape(weight)}")
    n, o, i = weight.shape
    if not isinstance(x, Tensor) or x.dim() != (2 if shared else 3):
        want = "2-D [M, I] (shared=True)" if shared else "3-D [N, M, I] (shared=False)"
        raise ValueError(f"{op}: x must be a {want} tensor, got {_shape(x)}")
    if not shared and x.shape[0] != n:
        raise ValueError(
            f"{op}: x has {x.shape[0]} models (x {tuple(x.shape)}), weight has N={n} "
            f"(weight {tuple(weight.shape)})"
        )
    if x.shape[-1] != i:
        raise ValueError(
            f"{op}: x has {x.shape[-1]} input features (x {tuple(x.shape)}), weight [N, O, I] "
            f"has I={i} (weight {tuple(weight.shape)})"
        )
    if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (n, o)):
        raise ValueError(f"{op}: bias must be None or [N, O] = {[n, o]}, got {_shape(bias)}")
    check_dtype_device(op, x, (("weight", weight), ("bias", bias)))
    return n, x.shape[-2], i, o


def _pre_activation(x: Tensor, weight: Tensor, bias: Tensor | None, shared: bool) -> Tensor:
    """``x(@n) @ weight[n].T + bias[n]``, contiguous ``[N, M, O]``: one GEMM
    ``[M, I] x [I, N*O]`` for a shared input, a batched GEMM otherwise."""
    n, o, i = weight.shape
    if shared:
        m = x.shape[0]
        w2 = weight.reshape(n * o, i).t()
        pre = torch.addmm(bias.reshape(1, n * o), x, w2) if bias is not None else x @ w2
        return pre.view(m, n, o).transpose(0, 1).contiguous()
    wt = weight.transpose(1, 2)
    if bias is not None:
        return torch.baddbmm(bias.unsqueeze(1), x, wt)
    return torch.bmm(x, wt)


def _activate(pre: Tensor, activation: str) -> Tensor:
    if activation == "relu":
        return torch.relu(pre)
    if activation in ("gelu", "gelu_tanh"):
        return torch.nn.functional.gelu(
            pre, approximate="tanh" if activation == "gelu_tanh" else "none"
        )
    if activation == "silu":
        return torch.nn.functional.silu(pre)
    if activation == "tanh":
        return torch.tanh(pre)
    return pre.clone()


def _activation_grad(grad: Tensor, saved: Tensor | None, activation: str) -> Tensor:
    """``grad * act'(.)`` with torch's own backward kernels; ``saved`` is the
    output (relu, tanh) or the pre-activation (gelu, gelu_tanh, silu)."""
    if activation == "relu":
        return torch.ops.aten.threshold_backward(grad, saved, 0)
    if activation in ("gelu", "gelu_tanh"):
        approximate = "tanh" if activation == "gelu_tanh" else "none"
        return torch.ops.aten.gelu_backward(grad, saved, approximate=approximate)
    if activation == "silu":
        return torch.ops.aten.silu_backward(grad, saved)
    if activation == "tanh":
        return torch.ops.aten.tanh_backward(grad, saved)
    return grad


def reference_linear_act_forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, activation: str, shared: bool
) -> tuple[Tensor, Tensor]:
    """Pure-torch oracle (and CPU kernel) of ``linear_act_forward``: ``(out [N, M,
    O], saved)``, ``saved`` the pre-activation for :data:`SAVES_PRE`, else ``[0]``."""
    pre = _pre_activation(x, weight, bias, shared)
    out = _activate(pre, activation)
    return out, (pre if activation in SAVES_PRE else x.new_empty(0))


def reference_linear_act(
    x: Tensor, weight: Tensor, bias: Tensor | None, activation: str, shared: bool
) -> Tensor:
    """Pure-torch oracle of ``linear_act``: ``act(x(@n) @ weight[n].T + bias[n])``,
    ``[N, M, O]``."""
    return reference_linear_act_forward(x, weight, bias, activation, shared)[0]


def reference_linear_act_backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    saved: Tensor | None,
    activation: str,
    shared: bool,
    need_x: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Pure-torch oracle (and CPU kernel) of ``linear_act_backward``: ``(grad_x,
    grad_weight [N, O, I], grad_bias [N, O])``, an empty ``[0]`` tensor for each
    one not asked for. ``grad_x`` of a shared input is one GEMM summing over
    models, ``[M, N*O] x [N*O, I]``; ``grad_weight`` of a shared input is one GEMM
    ``[N*O, M] x [M, I]``."""
    n, o, i = weight.shape
    d = _activation_grad(grad, saved, activation)
    m = d.shape[1]
    # Three distinct empty tensors: an op's outputs may not alias each other.
    gx, gw, gb = x.new_empty(0), x.new_empty(0), x.new_empty(0)
    if need_x:
        if shared:
            gx = d.transpose(0, 1).reshape(m, n * o) @ weight.reshape(n * o, i)
        else:
            gx = torch.bmm(d, weight)
    if need_w:
        if shared:
            gw = (d.permute(0, 2, 1).reshape(n * o, m) @ x).view(n, o, i)
        else:
            gw = torch.bmm(d.transpose(1, 2), x)
    if need_b:
        gb = d.sum(1)
    return gx, gw, gb


def _fake_linear_act_forward(x, weight, bias, activation, shared):
    n, m, _, o = check_linear_act(
        "modelbatch::linear_act_forward", x, weight, bias, activation, shared
    )
    pre = (n, m, o) if activation in SAVES_PRE else (0,)
    return x.new_empty((n, m, o)), x.new_empty(pre)


def _fake_linear_act_backward(grad, x, weight, saved, activation, shared, need_x, need_w, need_b):
    n, m, i, o = check_linear_act(
        "modelbatch::linear_act_backward", x, weight, None, activation, shared
    )
    gx = ((m, i) if shared else (n, m, i)) if need_x else (0,)
    return (
        x.new_empty(gx),
        x.new_empty((n, o, i) if need_w else (0,)),
        x.new_empty((n, o) if need_b else (0,)),
    )


def _no_triton(*args, **kwargs):
    raise RuntimeError(
        "modelbatch::linear_act: triton is not installed, so there is no CUDA kernel"
    )


# The Triton launchers (kernels/linear.py), bound when the ops are defined. The
# op functions call them by these names so that triton_op finds the kernels in
# their source (torch.compile's caches key on the kernels' code).
_triton_forward = _no_triton
_triton_backward = _no_triton


def _forward_impl(
    x: Tensor, weight: Tensor, bias: Tensor | None, activation: str, shared: bool
) -> tuple[Tensor, Tensor]:
    check_linear_act("modelbatch::linear_act_forward", x, weight, bias, activation, shared)
    if x.device.type == "cuda":
        return _triton_forward(x, weight, bias, activation, shared)
    return reference_linear_act_forward(x, weight, bias, activation, shared)


def _backward_impl(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    saved: Tensor | None,
    activation: str,
    shared: bool,
    need_x: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    check_linear_act("modelbatch::linear_act_backward", x, weight, None, activation, shared)
    if x.device.type == "cuda":
        return _triton_backward(grad, x, weight, saved, activation, shared, need_x, need_w, need_b)
    return reference_linear_act_backward(
        grad, x, weight, saved, activation, shared, need_x, need_w, need_b
    )


def _linear_act_setup(ctx, inputs, output):
    x, weight, bias, activation, shared = inputs
    out, pre = output
    ctx.mark_non_differentiable(pre)
    # No zeros [N, M, O] for the grad of ``pre``, which the backward ignores.
    ctx.set_materialize_grads(False)
    saved = pre if activation in SAVES_PRE else (out if activation != "none" else None)
    ctx.save_for_backward(x, weight, saved)
    ctx.activation, ctx.shared, ctx.has_bias = activation, shared, bias is not None


def _linear_act_backward(ctx, grad, _grad_pre):
    x, weight, saved = ctx.saved_tensors
    if grad is None:  # ``out`` did not reach the loss
        return None, None, None, None, None
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    need_b = need_b and ctx.has_bias
    gx, gw, gb = torch.ops.modelbatch.linear_act_backward(
        grad, x, weight, saved, ctx.activation, ctx.shared, need_x, need_w, need_b
    )
    return gx if need_x else None, gw if need_w else None, gb if need_b else None, None, None


_OPS: tuple | None = None
_OPS_LOCK = threading.Lock()


def linear_act_ops() -> tuple:
    """``(forward, backward)``: the custom ops ``modelbatch::linear_act_forward`` and
    ``modelbatch::linear_act_backward``, defined on first use (``linear_act``
    calls this). They are ``torch.library.triton_op``s, whose definition reads
    the functions' source with ``torch._inductor`` (about 0.8 s of imports that
    ``import modelbatch`` should not pay); without triton, plain custom ops."""
    global _OPS, _triton_forward, _triton_backward
    with _OPS_LOCK:
        if _OPS is not None:
            return _OPS
        if importlib.util.find_spec("triton") is None:
            define = torch.library.custom_op
        else:
            from modelbatch.kernels import linear as triton_linear

            _triton_forward = triton_linear.linear_act_forward
            _triton_backward = triton_linear.linear_act_backward
            define = torch.library.triton_op
        fwd = define("modelbatch::linear_act_forward", _forward_impl, mutates_args=())
        bwd = define("modelbatch::linear_act_backward", _backward_impl, mutates_args=())
        # triton_op registers the function as the fake kernel too; these only
        # compute shapes.
        fwd.register_fake(_fake_linear_act_forward)
        bwd.register_fake(_fake_linear_act_backward)
        fwd.register_autograd(_linear_act_backward, setup_context=_linear_act_setup)
        _OPS = (fwd, bwd)
        return _OPS


def linear_act_forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, activation: str, shared: bool
) -> tuple[Tensor, Tensor]:
    """``(out [N, M, O], saved)``: ``torch.ops.modelbatch.linear_act_forward``.
    ``saved`` is the pre-activation ``[N, M, O]`` for gelu, gelu_tanh and silu
    (their backward needs it) and an empty ``[0]`` tensor otherwise. CUDA: one
    Triton kernel (``modelbatch.kernels.linear``); elsewhere
    :func:`reference_linear_act_forward`."""
    return linear_act_ops()[0](x, weight, bias, activation, shared)


def linear_act_backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    saved: Tensor | None,
    activation: str,
    shared: bool,
    need_x: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_x, grad_weight, grad_bias)`` of ``linear_act`` from ``grad [N, M,
    O]``: ``torch.ops.modelbatch.linear_act_backward``; see
    :func:`reference_linear_act_backward`. CUDA: two Triton kernels at most, the
    activation derivative fused into both (grad_x; grad_weight with grad_bias);
    elsewhere the reference."""
    return linear_act_ops()[1](grad, x, weight, saved, activation, shared, need_x, need_w, need_b)


# The public op has one output; it decomposes (before autograd) into the
# two-output forward above, which saves the pre-activation where the backward
# needs it, so nothing is recomputed and torch.compile sees the Triton kernels.
_LIB = torch.library.Library("modelbatch", "FRAGMENT")
_LIB.define(
    "linear_act(Tensor x, Tensor weight, Tensor? bias, str activation, bool shared) -> Tensor"
)


def _linear_act(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str, shared: bool):
    return linear_act_forward(x, weight, bias, activation, shared)[0]


_LIB.impl("linear_act", _linear_act, "CompositeImplicitAutograd")


def linear_act(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str = "none",
    shared: bool = False,
) -> Tensor:
    """``act(x(@n) @ weight[n].T + bias[n])`` for N models, ``[N, M, O]``:
    ``torch.ops.modelbatch.linear_act``. ``weight [N, O, I]``, ``bias [N, O]`` or
    None, ``x [M, I]`` shared by all models (``shared=True``) or ``[N, M, I]``;
    ``activation`` one of :data:`ACTIVATIONS`. Differentiable in ``x``,
    ``weight`` and ``bias``."""
    return torch.ops.modelbatch.linear_act(x, weight, bias, activation, shared)
