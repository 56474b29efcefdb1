"""``modelbatch::sgd_step``: SGD (momentum, dampening, nesterov, weight decay)
for N stacked models in one call.

Every tensor in ``params`` is ``[N, ...]``; ``grads`` and ``momentum_buffers``
(empty when no model uses momentum) match it. ``steps`` (float64, advanced by
one), ``lr``, ``momentum``, ``dampening``, ``weight_decay`` and ``nesterov``
(0/1) are ``[N]`` per-model vectors. On a model's first step (``steps`` becomes
1) its momentum buffer is set to the gradient, as in ``torch.optim.SGD``.

Mixed precision: optional ``inv_scale`` and ``found_inf`` (``[N]`` float32) as in
:mod:`modelbatch.ops.adam`: grads are unscaled in place first, and a model with
``found_inf[i] != 0`` keeps its parameters, momentum buffer and step count.

Kernels: C++ on CPU (``csrc/sgd.cpp``), Triton on CUDA (``kernels/sgd.py``),
and :func:`reference` here.
"""

from __future__ import annotations

import torch

from modelbatch.ops._registry import keep_mask, model_view, opmath, register, unscale_grads

Tensors = list[torch.Tensor]


def reference(
    params: Tensors,
    grads: Tensors,
    momentum_buffers: Tensors,
    steps: torch.Tensor,
    lr: torch.Tensor,
    momentum: torch.Tensor,
    dampening: torch.Tensor,
    weight_decay: torch.Tensor,
    nesterov: torch.Tensor,
    inv_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
) -> None:
    """Pure-torch SGD over stacked tensors, as torch.optim.SGD computes it."""
    use_mom = momentum != 0
    any_mom = bool(use_mom.any())
    if any_mom and len(momentum_buffers) != len(params):
        raise ValueError(
            f"sgd_step: a model uses momentum, so momentum_buffers needs {len(params)} "
            f"tensors (one per parameter); got {len(momentum_buffers)}"
        )
    if inv_scale is not None:
        unscale_grads(grads, inv_scale)
    keep = keep_mask(found_inf, steps)
    steps.add_(keep.to(steps.dtype))
    first = steps == 1
    nest = nesterov != 0
    for k, p in enumerate(params):
        dt = opmath(p.dtype)

        def v(x, p=p, dt=dt):
            return model_view(x, p, dt)

        on_keep = v(keep.to(dt)) != 0
        pk = p.to(dt)
        g = grads[k].to(dt) + v(weight_decay) * pk
        if any_mom:
            old = momentum_buffers[k].to(dt)
            buf = torch.where(
                v(first.to(dt)) != 0, g, old * v(momentum) + v(1 - dampening.double()) * g
            )
            buf = torch.where(v(use_mom.to(dt)) != 0, buf, old)
            momentum_buffers[k].copy_(torch.where(on_keep, buf, momentum_buffers[k]))
            upd = torch.where(v(nest.to(dt)) != 0, g + v(momentum) * buf, buf)
            g = torch.where(v(use_mom.to(dt)) != 0, upd, g)
        p.copy_(torch.where(on_keep, pk + (-v(lr)) * g, p))


def _cuda(*args) -> None:
    from modelbatch.kernels import sgd as triton_sgd

    triton_sgd.sgd_step(*args)


register("sgd_step", reference, _cuda)


def sgd_step(*args) -> None:
    """Dispatch to the kernel for the tensors' device (see module docstring)."""
    torch.ops.modelbatch.sgd_step(*args)
