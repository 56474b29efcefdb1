"""``modelbatch::fused_mlp_loss_grad``: the loss and all gradients of N MLPs at once.

``fused_mlp_loss_grad(x, target, weights, biases, activations, loss, ignore_index,
grad_scale) -> (losses [N], grads)`` takes N multi-layer perceptrons as stacked
``weights[l] [N, O_l, I_l]`` and ``biases[l] [N, O_l]`` (or None), layer ``l``
followed by the activation ``activations[l]`` (codes in :data:`ACTIVATIONS`), an
input ``x [B, I]`` shared by all models or ``[N, B, I]``, and targets: class indices
``[B]`` / ``[N, B]`` for cross-entropy (``loss=0``, mean over the samples whose
target is not ``ignore_index``) or ``[B, C]`` / ``[N, B, C]`` floats for the mean
squared error (``loss=1``). It returns each model's loss and the gradients of every
parameter in the order ``w0, b0, w1, b1, ...`` (biases that are None have none),
each multiplied by ``grad_scale[n]`` when given (a loss scaler's scale).

On the CPU the C++ kernel (``csrc/fused_mlp.cpp``) runs each model's forward, loss
and backward in one pass with the activations in the core's caches, instead of one
memory-bound pass over ``[N, B, H]`` per elementwise op; :class:`modelbatch.TrainStep`
uses it for the models :func:`plan` recognises. On CUDA the op is a chain of
``modelbatch::linear_act`` Triton GEMMs with the bias and activation fused into
their epilogues, forward and backward (:func:`linear_act_chain`; sigmoid models
run the reference). Without ``modelbatch._C`` the pure-torch :func:`reference`
runs: ``vmap`` over ``torch.func.grad_and_value`` of the same MLP.

``modelbatch::fused_mlp_adam_step`` goes on to clip and update each model with
Adam / AdamW while its gradients are still in the cache (the same hyper-parameter
tensors, step counts and skip rule as ``modelbatch::adam_step``; a model whose loss
or gradient norm is not finite is left as it was): the gradients never reach
memory. :func:`adam_step_reference` is the same as its parts.

``MODELBATCH_FUSED_MLP_ISA=avx2`` or ``=generic`` (read per call) limits the CPU
kernel to AVX2 or to its generic 128-bit kernels, for tests and benchmarks.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad_and_value, vmap

from modelbatch import _backend
from modelbatch.ops._registry import IMPL

#: activation name -> code of the op.
ACTIVATIONS = {
    "identity": 0,
    "relu": 1,
    "tanh": 2,
    "sigmoid": 3,
    "silu": 4,
    "gelu": 5,
    "gelu_tanh": 6,
}
LOSSES = {"cross_entropy": 0, "mse": 1}

_ACT_FNS = {
    0: lambda z: z,
    1: torch.relu,
    2: torch.tanh,
    3: torch.sigmoid,
    4: F.silu,
    5: F.gelu,
    6: functools.partial(F.gelu, approximate="tanh"),
}


def _one_model_loss(weights, biases, x, target, activations, loss, ignore_index):
    h = x
    for w, b, a in zip(weights, biases, activations):
        h = _ACT_FNS[a](F.linear(h, w, b))
    if loss == 0:
        return F.cross_entropy(h, target, ignore_index=ignore_index)
    return F.mse_loss(h, target)


def reference(
    x: Tensor,
    target: Tensor,
    weights: list[Tensor],
    biases: list[Tensor | None],
    activations: list[int],
    loss: int,
    ignore_index: int,
    grad_scale: Tensor | None,
) -> tuple[Tensor, list[Tensor]]:
    """Pure-torch oracle (and non-CPU kernel): vmap of grad_and_value per model."""
    has_bias = [b is not None for b in biases]
    present = [b for b in biases if b is not None]
    shared_x = x.dim() == 2
    shared_t = target.dim() == (1 if loss == 0 else 2)

    def one(ws, bs, xi, ti):
        it = iter(bs)
        full = [next(it) if hb else None for hb in has_bias]
        return _one_model_loss(ws, full, xi, ti, activations, loss, ignore_index)

    fn = grad_and_value(one, argnums=(0, 1))
    (gw, gb), losses = vmap(fn, in_dims=(0, 0, None if shared_x else 0, None if shared_t else 0))(
        list(weights), present, x, target
    )
    grads = []
    it = iter(gb)
    for w_grad, hb in zip(gw, has_bias):
        grads.append(w_grad)
        if hb:
            grads.append(next(it))
    if grad_scale is not None:
        s = grad_scale.to(grads[0].dtype)
        grads = [g * s.view((-1,) + (1,) * (g.dim() - 1)) for g in grads]
    return losses.detach(), [g.detach().contiguous() for g in grads]


def _fake(x, target, weights, biases, activations, loss, ignore_index, grad_scale):
    n = weights[0].shape[0]
    grads = []
    for w, b in zip(weights, biases):
        grads.append(torch.empty_like(w, memory_format=torch.contiguous_format))
        if b is not None:
            grads.append(torch.empty_like(b, memory_format=torch.contiguous_format))
    return x.new_empty((n,)), grads


#: The op's activation codes as ``modelbatch::linear_act`` names (sigmoid has none).
_LINEAR_ACT = {0: "none", 1: "relu", 2: "tanh", 4: "silu", 5: "gelu", 6: "gelu_tanh"}


def linear_act_chain(
    x: Tensor,
    target: Tensor,
    weights: list[Tensor],
    biases: list[Tensor | None],
    activations: list[int],
    loss: int,
    ignore_index: int,
    grad_scale: Tensor | None,
    *,
    forward=None,
    backward=None,
) -> tuple[Tensor, list[Tensor]]:
    """The op as a chain of ``modelbatch::linear_act`` layers (the CUDA kernel):
    each layer's forward is one GEMM with the bias and activation in its epilogue
    (Triton on CUDA), its backward the GEMMs with the activation derivative fused
    (:mod:`modelbatch.kernels.linear`); the loss and its gradient ``[N, B, C]`` are
    a few torch ops. ``forward`` / ``backward`` default to the linear_act ops
    (tests pass the Triton launchers to run them in the interpreter)."""
    from modelbatch.ops import linear as linear_op

    if forward is None or backward is None:
        forward, backward = linear_op.linear_act_ops()
    names = [_LINEAR_ACT[a] for a in activations]
    a = x
    saved = []
    for layer, (w, b, act) in enumerate(zip(weights, biases, names)):
        shared = layer == 0 and x.dim() == 2
        out, pre = forward(a, w, b, act, shared)
        keep = pre if act in linear_op.SAVES_PRE else (out if act != "none" else None)
        saved.append((a, shared, keep))
        a = out
    n, rows, c = a.shape
    scale = a.new_ones(n) if grad_scale is None else grad_scale.to(a)
    if loss == 0:
        t = target.expand(n, rows) if target.dim() == 1 else target
        valid = t != ignore_index
        index = torch.where(valid, t, 0).unsqueeze(-1)
        count = valid.sum(-1)
        picked = a.gather(-1, index).squeeze(-1)
        losses = ((torch.logsumexp(a, -1) - picked) * valid).sum(-1) / count  # 0/0: NaN
        g = torch.softmax(a, -1).scatter_add_(-1, index, -torch.ones_like(picked).unsqueeze(-1))
        g = g * (valid * (scale / count.clamp(min=1)).unsqueeze(-1)).unsqueeze(-1)
    else:
        d = a - (target.expand(n, rows, c) if target.dim() == 2 else target)
        losses = (d * d).mean((1, 2))
        g = d * (2 * scale / (rows * c)).view(n, 1, 1)
    grads: list[Tensor] = []
    for layer in reversed(range(len(weights))):
        a_in, shared, keep = saved[layer]
        has_b = biases[layer] is not None
        gx, gw, gb = backward(
            g, a_in, weights[layer], keep, names[layer], shared, layer > 0, True, has_b
        )
        grads[:0] = [gw, gb] if has_b else [gw]
        g = gx
    return losses, grads


def _cuda(x, target, weights, biases, activations, loss, ignore_index, grad_scale):
    if all(a in _LINEAR_ACT for a in activations):
        return linear_act_chain(
            x, target, weights, biases, activations, loss, ignore_index, grad_scale
        )
    return reference(x, target, weights, biases, activations, loss, ignore_index, grad_scale)


def split_params(params: list[Tensor], biased: list[int]):
    """``(weights, biases)`` from the flat ``w0, b0, w1, ...`` list of the Adam op."""
    it = iter(params)
    weights, biases = [], []
    for has_bias in biased:
        weights.append(next(it))
        biases.append(next(it) if has_bias else None)
    return weights, biases


def adam_step_reference(
    x, target, params, biased, activations, loss, ignore_index, exp_avgs, exp_avg_sqs,
    max_exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay, amsgrad,
    decoupled_weight_decay, max_norm,
):  # fmt: skip
    """``fused_mlp_adam_step`` as its parts (and its non-CPU kernel): the loss and
    gradients, clipping by ``max_norm``, then ``modelbatch::adam_step`` with the
    models whose loss or gradient norm is not finite skipped."""
    weights, biases = split_params(params, biased)
    losses, grads = torch.ops.modelbatch.fused_mlp_loss_grad(
        x, target, weights, biases, activations, loss, ignore_index, None
    )
    n = steps.shape[0]
    found = (~torch.isfinite(losses)).float()
    if max_norm is not None:
        norms = torch.stack([torch.linalg.vector_norm(g.reshape(n, -1), dim=1) for g in grads], 1)
        total = torch.linalg.vector_norm(norms, dim=1)
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        grads = [g * coef.to(g.dtype).view((n,) + (1,) * (g.dim() - 1)) for g in grads]
        found = torch.maximum(found, (~torch.isfinite(total)).float())
    torch.ops.modelbatch.adam_step(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, beta1, beta2, eps,
        weight_decay, amsgrad, decoupled_weight_decay, None, found,
    )  # fmt: skip
    return losses


def _fake_adam(x, target, params, *args):
    return x.new_empty((params[0].shape[0],))


torch.library.register_fake("modelbatch::fused_mlp_loss_grad")(_fake)
torch.library.register_fake("modelbatch::fused_mlp_adam_step")(_fake_adam)
IMPL.impl("fused_mlp_loss_grad", _cuda, "CUDA")
IMPL.impl("fused_mlp_adam_step", adam_step_reference, "CUDA")
if not _backend.c_extension_loaded():
    IMPL.impl("fused_mlp_loss_grad", reference, "CPU")
    IMPL.impl("fused_mlp_adam_step", adam_step_reference, "CPU")


# ---------------------------------------------------------------------------
# Recognising a fused MLP


_ACT_MODULES = {
    nn.ReLU: "relu",
    nn.Tanh: "tanh",
    nn.Sigmoid: "sigmoid",
    nn.SiLU: "silu",
    nn.Identity: "identity",
}
_ACT_FUNCTIONS = {
    torch.relu: "relu",
    F.relu: "relu",
    torch.tanh: "tanh",
    F.tanh: "tanh",
    torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid",
    F.silu: "silu",
}
_ACT_METHODS = {"relu": "relu", "tanh": "tanh", "sigmoid": "sigmoid"}


def _module_activation(m: nn.Module) -> str | None:
    if type(m) is nn.GELU:
        return "gelu_tanh" if m.approximate == "tanh" else "gelu"
    if type(m) is nn.Dropout and m.p == 0:
        return "identity"
    return _ACT_MODULES.get(type(m))


def _function_activation(node) -> str | None:
    fn = node.target
    extra = {k: v for k, v in node.kwargs.items() if k != "inplace"}
    if fn is F.gelu:
        approximate = extra.pop("approximate", node.args[1] if len(node.args) > 1 else "none")
        if extra or len(node.args) > 2:
            return None
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(approximate)
    if extra or len(node.args) > (2 if fn in (F.relu, F.silu) else 1):
        return None
    return _ACT_FUNCTIONS.get(fn)


def _loss_kind(loss_fn) -> tuple[int, int] | None:
    """(loss code, ignore_index) for the losses the kernel computes exactly, else None."""
    if loss_fn is F.cross_entropy:
        return 0, -100
    if loss_fn is F.mse_loss:
        return 1, -100
    if type(loss_fn) is nn.CrossEntropyLoss:
        if loss_fn.weight is None and loss_fn.label_smoothing == 0 and loss_fn.reduction == "mean":
            return 0, int(loss_fn.ignore_index)
        return None
    if type(loss_fn) is nn.MSELoss and loss_fn.reduction == "mean":
        return 1, -100
    return None


@dataclass(frozen=True)
class Plan:
    """How a ModelBatch's template maps onto the fused kernel."""

    weights: tuple[str, ...]  # parameter names, one per layer
    biases: tuple[str | None, ...]
    activations: tuple[int, ...]
    loss: int
    ignore_index: int
    in_features: int
    out_features: int
    widths: tuple[int, ...] = ()  # the features of every layer's input and output

    def grad_names(self) -> list[str]:
        """The parameter names in the op's gradient order."""
        out = []
        for w, b in zip(self.weights, self.biases):
            out.append(w)
            if b is not None:
                out.append(b)
        return out


def _describe(template: nn.Module, node) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(template.get_submodule(node.target)).__name__})"
    if node.op == "call_method":
        return f".{node.target}()"
    return getattr(node.target, "__name__", str(node.target))


def _layers(template: nn.Module) -> tuple[list[tuple[str, nn.Linear, str]] | None, str]:
    """The template's (module path, Linear, activation) chain, read from its
    ``torch.fx`` graph, or (None, why not)."""
    try:
        graph = torch.fx.symbolic_trace(template).graph
    except Exception as e:  # any tracing failure: not a plain MLP
        return None, f"torch.fx cannot trace the model ({type(e).__name__}: {e})"
    nodes = list(graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        return None, f"the model's forward takes {len(inputs)} inputs, not one"
    layers: list[list] = []
    value = inputs[0]
    for node in nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            if node.args[0] is not value:
                return None, "the model does not return its last layer's output"
            break
        if not node.args or node.args[0] is not value:
            return None, f"{_describe(template, node)} is not a step of one chain of layers"
        rest = [a for a in (*node.args[1:], *node.kwargs.values()) if isinstance(a, torch.fx.Node)]
        if rest:
            return None, f"{_describe(template, node)} takes more than the previous layer's output"
        act = None
        if node.op == "call_module":
            m = template.get_submodule(node.target)
            if type(m) is nn.Linear:
                layers.append([node.target, m, None])
                value = node
                continue
            act = _module_activation(m)
        elif node.op == "call_function":
            act = _function_activation(node)
        elif node.op == "call_method" and len(node.args) == 1 and not node.kwargs:
            act = _ACT_METHODS.get(node.target)
        if act is None:
            what = _describe(template, node)
            return None, f"{what} is not a Linear layer or a covered activation"
        if act == "identity":
            value = node
            continue
        if not layers or layers[-1][2] is not None:
            return None, f"{_describe(template, node)}: an activation that does not follow a Linear"
        layers[-1][2] = act
        value = node
    if not layers:
        return None, "the model has no Linear layer"
    return [tuple(x) for x in layers], ""


def plan(template: nn.Module, loss_fn, param_names: list[str]) -> tuple[Plan | None, str]:
    """A :class:`Plan` for ``template`` and ``loss_fn``, or ``(None, why not)``.

    Covered: a model whose forward (read with ``torch.fx``) is one chain of
    ``nn.Linear`` layers, each followed by at most one activation (the ReLU, Tanh,
    Sigmoid, SiLU, GELU (either form) or Identity modules, their functions or
    tensor methods), with float32 parameters and no buffers: an ``nn.Sequential``
    or a module that calls one. The loss: ``F.cross_entropy`` /
    ``nn.CrossEntropyLoss`` (no class weights, no label smoothing, mean) or
    ``F.mse_loss`` / ``nn.MSELoss`` (mean)."""
    kind = _loss_kind(loss_fn)
    if kind is None:
        return None, f"the loss {loss_fn!r} is not F.cross_entropy / F.mse_loss (mean)"
    if any(True for _ in template.buffers()):
        return None, "the model has buffers"
    layers, why = _layers(template)
    if layers is None:
        return None, why
    weights, biases = [], []
    for path, m, _ in layers:
        if m.weight.dtype != torch.float32:
            return None, f"layer {path} is {m.weight.dtype}, not float32"
        weights.append(f"{path}.weight")
        biases.append(f"{path}.bias" if m.bias is not None else None)
    if sorted(param_names) != sorted([*weights, *(b for b in biases if b is not None)]):
        return None, "the model has parameters outside its Linear layers, or shares one"
    p = Plan(
        weights=tuple(weights),
        biases=tuple(biases),
        activations=tuple(ACTIVATIONS[a or "identity"] for _, _, a in layers),
        loss=kind[0],
        ignore_index=kind[1],
        in_features=layers[0][1].in_features,
        out_features=layers[-1][1].out_features,
        widths=(layers[0][1].in_features, *(m.out_features for _, m, _ in layers)),
    )
    return p, ""


def call(p: Plan, params: dict[str, Tensor], x: Tensor, target: Tensor, grad_scale=None):
    """The op on a batch's stacked parameters ``params`` (name -> ``[N, ...]``)."""
    return torch.ops.modelbatch.fused_mlp_loss_grad(
        x,
        target,
        [params[w] for w in p.weights],
        [params[b] if b is not None else None for b in p.biases],
        list(p.activations),
        p.loss,
        p.ignore_index,
        grad_scale,
    )
