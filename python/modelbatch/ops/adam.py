"""``modelbatch::adam_step``: Adam / AdamW for N stacked models in one call.

Every tensor in ``params`` is ``[N, ...]``; ``grads``, ``exp_avgs``,
``exp_avg_sqs`` (and ``max_exp_avg_sqs`` when any model uses amsgrad; else an
empty list) match it. ``steps``, ``lr``, ``beta1``, ``beta2``, ``eps``,
``weight_decay`` and ``amsgrad`` (0/1) are ``[N]`` per-model vectors; ``steps``
is float64 and is advanced by one for every model that steps.
``decoupled_weight_decay`` selects AdamW.

Mixed precision (both optional, ``[N]`` float32, see :mod:`modelbatch.amp`):

* ``inv_scale``: the grads hold ``loss_scale * gradient``. Every grad element of
  model i (of every model, skipped or not) is first unscaled in place,
  ``g = dtype(opmath(g) * inv_scale[i])``, exactly as
  ``torch._amp_foreach_non_finite_check_and_unscale_`` does, and the update uses
  that value.
* ``found_inf``: a model with ``found_inf[i] != 0`` is skipped: its parameters,
  moments and step count are left untouched. The kernel does not look for
  non-finite grads itself; ``modelbatch::amp_unscale_`` fills ``found_inf``.

Kernels: C++ on CPU (``csrc/adam.cpp``), Triton on CUDA (``kernels/adam.py``),
and :func:`reference` here.
"""

from __future__ import annotations

import torch

from modelbatch.ops._registry import keep_mask, model_view, opmath, register, unscale_grads

Tensors = list[torch.Tensor]


def reference(
    params: Tensors,
    grads: Tensors,
    exp_avgs: Tensors,
    exp_avg_sqs: Tensors,
    max_exp_avg_sqs: Tensors,
    steps: torch.Tensor,
    lr: torch.Tensor,
    beta1: torch.Tensor,
    beta2: torch.Tensor,
    eps: torch.Tensor,
    weight_decay: torch.Tensor,
    amsgrad: torch.Tensor,
    decoupled_weight_decay: bool,
    inv_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
) -> None:
    """Pure-torch Adam/AdamW over stacked tensors, as torch.optim.Adam computes it."""
    ams = amsgrad.to(steps.device) != 0
    any_ams = bool(ams.any())
    if any_ams and len(max_exp_avg_sqs) != len(params):
        raise ValueError(
            f"adam_step: a model uses amsgrad, so max_exp_avg_sqs needs {len(params)} "
            f"tensors (one per parameter); got {len(max_exp_avg_sqs)}"
        )
    if inv_scale is not None:
        unscale_grads(grads, inv_scale)
    keep = keep_mask(found_inf, steps)
    steps.add_(keep.to(steps.dtype))
    t = steps.double()
    b1, b2 = beta1.double().to(t.device), beta2.double().to(t.device)
    lr64, wd64 = lr.double().to(t.device), weight_decay.double().to(t.device)
    step_size = lr64 / (1 - b1**t)
    bc2_sqrt = (1 - b2**t).sqrt()
    decay_mul = 1 - lr64 * wd64
    for k, p in enumerate(params):
        dt = opmath(p.dtype)

        def v(x, p=p, dt=dt):
            return model_view(x, p, dt)

        pk, gk = p.to(dt), grads[k].to(dt)
        if decoupled_weight_decay:
            pk = pk * v(decay_mul)
        else:
            gk = gk + v(weight_decay) * pk
        m = torch.lerp(exp_avgs[k].to(dt), gk, v(1 - beta1.double()))
        sq = exp_avg_sqs[k].to(dt) * v(beta2) + v(1 - beta2.double()) * gk * gk
        src = sq
        on_keep = v(keep.to(dt)) != 0
        if any_ams:
            on = v(ams.to(dt)) != 0
            old = max_exp_avg_sqs[k].to(dt)
            vmax = torch.maximum(old, sq)
            max_exp_avg_sqs[k].copy_(torch.where(on & on_keep, vmax, old))
            src = torch.where(on, vmax, sq)
        denom = src.sqrt() / v(bc2_sqrt) + v(eps)
        pk = pk + (-v(step_size)) * (m / denom)
        p.copy_(torch.where(on_keep, pk, p))
        exp_avgs[k].copy_(torch.where(on_keep, m, exp_avgs[k]))
        exp_avg_sqs[k].copy_(torch.where(on_keep, sq, exp_avg_sqs[k]))


def _cuda(*args) -> None:
    from modelbatch.kernels import adam as triton_adam

    triton_adam.adam_step(*args)


register("adam_step", reference, _cuda)


def adam_step(*args) -> None:
    """Dispatch to the kernel for the tensors' device (see module docstring)."""
    torch.ops.modelbatch.adam_step(*args)
