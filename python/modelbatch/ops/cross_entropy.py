"""``modelbatch::cross_entropy``: ``F.cross_entropy`` (class-index targets) for N
models at once.

* ``modelbatch::cross_entropy(input [B, C], target [B], reduction, ignore_index)``
  means exactly ``F.cross_entropy`` for one model. Inside ``ModelBatch.compute_loss``
  (and forward) calls of ``F.cross_entropy`` / ``nn.CrossEntropyLoss`` that it covers
  are routed to it; its vmap rule calls the batched op below once for all models.
* ``modelbatch::batched_cross_entropy(logits [N, B, C], target [B] or [N, B], shared,
  reduction, ignore_index)`` (defined in C++): reduction 0 = none -> ``[N, B]``,
  1 = mean -> ``[N]``, 2 = sum -> ``[N]``. C++ kernel on CPU (``csrc/cross_entropy.cpp``:
  one fused pass per row, no log-probabilities materialised); the pure-torch
  :func:`reference` elsewhere.

Covered: 2-D input per model, int64 class indices, no class weights, no label
smoothing. Anything else runs ``F.cross_entropy`` itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from modelbatch import _backend
from modelbatch.ops._registry import IMPL

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


def reference(
    logits: Tensor, target: Tensor, shared: bool, reduction: int, ignore_index: int
) -> tuple[Tensor, Tensor]:
    """Pure-torch oracle of ``batched_cross_entropy``: (losses, per-row logsumexp)."""
    n, b, _ = logits.shape
    t = target.expand(n, b) if shared else target
    keep = t != ignore_index
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    lse = torch.logsumexp(x, -1)
    picked = x.gather(-1, torch.where(keep, t, 0).unsqueeze(-1)).squeeze(-1)
    rows = (lse - picked) * keep
    if reduction == 0:
        return rows.to(logits.dtype), lse
    total = rows.sum(1)
    if reduction == 1:
        total = total / keep.sum(1)
    return total.to(logits.dtype), lse


def reference_backward(grad, logits, lse, target, shared, reduction, ignore_index):
    """Pure-torch gradient of ``batched_cross_entropy`` w.r.t. the logits."""
    n, b, c = logits.shape
    t = target.expand(n, b) if shared else target
    keep = t != ignore_index
    x = logits.to(lse.dtype)
    p = torch.exp(x - lse.unsqueeze(-1)) - F.one_hot(torch.where(keep, t, 0), c).to(x.dtype)
    if reduction == 0:
        scale = grad.to(x.dtype)
    else:
        scale = grad.to(x.dtype).view(n, 1).expand(n, b)
        if reduction == 1:
            scale = scale / keep.sum(1, keepdim=True)
    return (p * (scale * keep).unsqueeze(-1)).to(logits.dtype)


def _fake(logits, target, shared, reduction, ignore_index):
    n, b = logits.shape[0], logits.shape[1]
    lse = logits.new_empty((n, b), dtype=torch.promote_types(logits.dtype, torch.float32))
    return logits.new_empty((n, b) if reduction == 0 else (n,)), lse


torch.library.register_fake("modelbatch::batched_cross_entropy")(_fake)
torch.library.register_fake("modelbatch::batched_cross_entropy_backward")(
    lambda grad, logits, *rest: torch.empty_like(logits)
)
IMPL.impl("batched_cross_entropy", reference, "CUDA")
IMPL.impl("batched_cross_entropy_backward", reference_backward, "CUDA")
if not _backend.c_extension_loaded():
    IMPL.impl("batched_cross_entropy", reference, "CPU")
    IMPL.impl("batched_cross_entropy_backward", reference_backward, "CPU")


def _setup(ctx, inputs, output):
    logits, target, shared, reduction, ignore_index = inputs
    ctx.save_for_backward(logits, output[1], target)
    ctx.args = (shared, reduction, ignore_index)


def _backward(ctx, grad, _grad_lse):
    logits, lse, target = ctx.saved_tensors
    g = torch.ops.modelbatch.batched_cross_entropy_backward(grad, logits, lse, target, *ctx.args)
    return g, None, None, None, None


torch.library.register_autograd(
    "modelbatch::batched_cross_entropy", _backward, setup_context=_setup
)


def batched_cross_entropy(logits, target, shared, reduction, ignore_index=-100) -> Tensor:
    """The per-model losses (the op's second output, the saved log-sum-exp, dropped)."""
    out = torch.ops.modelbatch.batched_cross_entropy(
        logits, target, shared, reduction, ignore_index
    )
    return out[0]


@torch.library.custom_op("modelbatch::cross_entropy", mutates_args=())
def cross_entropy(input: Tensor, target: Tensor, reduction: int, ignore_index: int) -> Tensor:
    red = {v: k for k, v in REDUCTIONS.items()}[reduction]
    return F.cross_entropy(input, target, reduction=red, ignore_index=ignore_index)


@cross_entropy.register_fake
def _(input, target, reduction, ignore_index):
    return input.new_empty((input.shape[0],) if reduction == 0 else ())


def _ce_setup(ctx, inputs, output):
    input, target, reduction, ignore_index = inputs
    ctx.save_for_backward(input, target)
    ctx.args = (reduction, ignore_index)


def _ce_backward(ctx, grad):
    input, target = ctx.saved_tensors
    reduction, ignore_index = ctx.args
    g = grad.unsqueeze(0) if reduction == 0 else grad.reshape(1)
    x = input.unsqueeze(0)
    lse = torch.logsumexp(x.to(torch.promote_types(x.dtype, torch.float32)), -1)
    gi = torch.ops.modelbatch.batched_cross_entropy_backward(
        g, x, lse, target, True, reduction, ignore_index
    )
    return gi.squeeze(0), None, None, None


cross_entropy.register_autograd(_ce_backward, setup_context=_ce_setup)


def batched_call(x, xd, target, td, reduction: int, ignore_index: int):
    """The batched op on unwrapped vmap operands: x batched at dim ``xd`` (or
    None), target at ``td`` (or None, shared). Returns (out, out_dim=0)."""
    n = x.shape[xd] if xd is not None else target.shape[td]
    x = x.movedim(xd, 0) if xd is not None else x.expand(n, *x.shape)
    if td is None:
        return batched_cross_entropy(x, target, True, reduction, ignore_index), 0
    return batched_cross_entropy(x, target.movedim(td, 0), False, reduction, ignore_index), 0


def _vmap_rule(info, in_dims, input, target, reduction, ignore_index):
    return batched_call(input, in_dims[0], target, in_dims[1], reduction, ignore_index)


torch.library.register_vmap("modelbatch::cross_entropy", _vmap_rule)


def _bind(
    weight=None,
    size_average=None,
    ignore_index=-100,
    reduce=None,
    reduction="mean",
    label_smoothing=0.0,
):
    return weight, size_average, ignore_index, reduce, reduction, label_smoothing


def covers(input, target, *args, **kwargs) -> bool:
    """Whether ``F.cross_entropy(input, target, *args, **kwargs)`` is a case of
    ``modelbatch::cross_entropy`` (shapes as one model sees them)."""
    weight, size_average, _, reduce, reduction, label_smoothing = _bind(*args, **kwargs)
    return (
        weight is None
        and size_average is None
        and reduce is None
        and label_smoothing == 0.0
        and reduction in REDUCTIONS
        and isinstance(input, Tensor)
        and isinstance(target, Tensor)
        and input.dim() == 2
        and target.dim() == 1
        and target.dtype == torch.int64
        and input.is_floating_point()
    )


def reduction_and_ignore(*args, **kwargs) -> tuple[int, int]:
    _, _, ignore_index, _, reduction, _ = _bind(*args, **kwargs)
    return REDUCTIONS[reduction], ignore_index


def route(input, target, *args, **kwargs):
    """``F.cross_entropy`` with its own signature: the covered cases go to
    ``modelbatch::cross_entropy``, the rest to ``F.cross_entropy``."""
    if not covers(input, target, *args, **kwargs):
        return F.cross_entropy(input, target, *args, **kwargs)
    return cross_entropy(input, target, *reduction_and_ignore(*args, **kwargs))
