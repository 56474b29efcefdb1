"""Triton kernel of ``modelbatch::sgd_step``: SGD for N stacked models.

Shapes. Every tensor of ``params``, ``grads`` and (when it is not empty)
``momentum_buffers`` is a contiguous ``[N, ...]`` stack: model ``i`` owns the
elements ``[i * per_model, (i + 1) * per_model)`` of each tensor. All share one
dtype (float32, float16, bfloat16 or float64) and one device. ``steps`` is a
float64 ``[N]`` vector; ``lr``, ``momentum``, ``dampening``, ``weight_decay``
and ``nesterov`` (0/1) are ``[N]`` vectors of any real dtype.

Semantics (those of ``modelbatch.ops.sgd.reference`` and ``csrc/sgd.cpp``, that
is of ``torch.optim.SGD``'s single-tensor path, per model): ``steps`` is
advanced by one first. Then per element, computing in float32 for float32 /
float16 / bfloat16 tensors and in float64 for float64 tensors::

    g = g + wd * p
    models with momentum != 0:
        buf = g                                   on the model's first step (steps == 1)
        buf = momentum * buf + (1 - dampening) * g  afterwards
        g = g + momentum * buf if nesterov else buf
    p = p - lr * g

Models with momentum 0 neither read nor write their momentum buffers, and
``momentum_buffers`` is an empty list when no model uses momentum.

Mixed precision: optional trailing ``inv_scale`` and ``found_inf`` (contiguous
float32 ``[N]`` on the params' device), as in ``kernels/adam.py``. With
``inv_scale`` every grad element of every model (skipped or not) is unscaled
and written back, ``g = dtype(opmath(g) * inv_scale[i])``, and the update uses
that value; a model with ``found_inf[i] != 0`` is skipped: ``steps[i]`` does
not advance (so its next step is still its first when ``steps[i]`` is 0) and
its params and momentum buffers are left untouched bit for bit. Both are extra
rows of the scalars table read under constexpr flags, so without them the
kernel compiles to the plain one.

Why it is built this way: as ``kernels/adam.py`` (whose multi-tensor helpers
this module uses). One launch covers all tensors through a device table of
data pointers; grid ``(cdiv(max_numel, BLOCK), num_tensors)``; the model of an
element is ``offset // per_model_numel``; the per-model scalars (``-lr``,
``1 - dampening``, first-step and flag masks) are computed by a few torch ops
on the device, so the call never synchronises with the host. Hence "does any
model use momentum" is ``len(momentum_buffers) > 0``: with an empty
``momentum_buffers`` every model takes a plain SGD step whatever its momentum
(reported as an error when ``momentum`` is a CPU tensor, where checking is free).

On CUDA this is the op's kernel; on CPU tensors it runs only under
``TRITON_INTERPRET=1`` (how the tests check it without a GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .adam import (
    Tensors,
    _advance_steps,
    _any_nonzero_on_cpu,
    _block,
    _check_hparam,
    _check_like,
    _check_params,
    _check_scaler,
    _compute_dtype,
    _interpreting,
    _launch,
    _scaler_rows,
    _to_storage,
    _unscale,
)

_NAME = "modelbatch.kernels.sgd.sgd_step"


@triton.jit
def _sgd_kernel(
    table,  # int64 [4, T]: pointers of params, grads, momentum_buffers; numels
    sc,  # COMPUTE [7 (+2), N]: -lr, momentum, 1-dampening, wd, uses momentum, first step,
    #      nesterov (, inv_scale, keep when UNSCALE or SKIP)
    t0,  # first tensor of this launch
    T,  # number of tensors (row length of table)
    N,  # number of models
    DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr,
    INT64: tl.constexpr,
    BLOCK: tl.constexpr,
    MOMENTUM: tl.constexpr,
    UNSCALE: tl.constexpr,
    SKIP: tl.constexpr,
):
    t, offs, mask, model = _block(table, 3, t0, T, N, BLOCK, INT64)

    p_ptr = tl.load(table + t).to(tl.pointer_type(DTYPE))
    g_ptr = tl.load(table + T + t).to(tl.pointer_type(DTYPE))
    if SKIP:
        # Skipped models (found_inf != 0) read and write nothing but their grads.
        live = mask & (tl.load(sc + 8 * N + model, mask=mask, other=0.0) != 0)
    else:
        live = mask
    neg_lr = tl.load(sc + model, mask=live, other=0.0)
    wd = tl.load(sc + 3 * N + model, mask=live, other=0.0)

    p = tl.load(p_ptr + offs, mask=live, other=0.0).to(COMPUTE)
    if UNSCALE:
        g = _unscale(g_ptr, offs, mask, live, sc + 7 * N + model, DTYPE, COMPUTE, SKIP)
    else:
        g = tl.load(g_ptr + offs, mask=live, other=0.0).to(COMPUTE)
    g = g + wd * p
    if MOMENTUM:
        buf_ptr = tl.load(table + 2 * T + t).to(tl.pointer_type(DTYPE))
        mom = tl.load(sc + N + model, mask=live, other=0.0)
        omd = tl.load(sc + 2 * N + model, mask=live, other=0.0)
        use = live & (tl.load(sc + 4 * N + model, mask=live, other=0.0) != 0)
        first = tl.load(sc + 5 * N + model, mask=live, other=0.0) != 0
        nest = tl.load(sc + 6 * N + model, mask=live, other=0.0) != 0
        # On a first step the old buffer is not read (it may hold anything).
        old = tl.load(buf_ptr + offs, mask=use & ~first, other=0.0).to(COMPUTE)
        b = old * mom
        b = b + omd * g
        b = tl.where(first, g, b)
        tl.store(buf_ptr + offs, _to_storage(b, DTYPE), mask=use)
        g = tl.where(use, tl.where(nest, g + mom * b, b), g)
    p = p + neg_lr * g
    tl.store(p_ptr + offs, _to_storage(p, DTYPE), mask=live)


def sgd_step(
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
    """One SGD step of N stacked models, in place, with optional per-model grad
    unscaling (``inv_scale``) and skipping (``found_inf``); see the module
    docstring. Raises ValueError, changing nothing, on bad input."""
    op = _NAME
    n = _check_params(op, params, steps, _interpreting(_sgd_kernel))
    _check_like(op, params, grads, "grads")
    any_mom = len(momentum_buffers) > 0
    if any_mom:
        _check_like(op, params, momentum_buffers, "momentum_buffers")
    hps = {
        "lr": lr,
        "momentum": momentum,
        "dampening": dampening,
        "weight_decay": weight_decay,
        "nesterov": nesterov,
    }
    for name, v in hps.items():
        _check_hparam(op, v, n, name)
    _check_scaler(op, inv_scale, found_inf, n, params, steps)
    if not any_mom and params and _any_nonzero_on_cpu(momentum):
        raise ValueError(
            f"{op}: momentum is nonzero for some models but momentum_buffers is empty; "
            "pass one momentum buffer per parameter"
        )

    keep = _advance_steps(steps, found_inf)
    if not params:
        return
    lr64, mom64, damp64, wd64 = (
        x.to(device=steps.device, dtype=torch.float64)
        for x in (lr, momentum, dampening, weight_decay)
    )
    scalars = torch.stack(
        [
            -lr64,
            mom64,
            1 - damp64,
            wd64,
            (mom64 != 0).to(torch.float64),
            (steps == 1).to(torch.float64),
            (nesterov.to(steps.device) != 0).to(torch.float64),
        ]
    )
    dev = params[0].device
    scalars = scalars.to(device=dev, dtype=_compute_dtype(params[0].dtype))
    unscale, skip = inv_scale is not None, found_inf is not None
    if unscale or skip:
        scalars = torch.cat([scalars, _scaler_rows(inv_scale, keep, scalars)])
    lists = [params, grads, momentum_buffers if any_mom else None]
    _launch(_sgd_kernel, lists, scalars, n, MOMENTUM=any_mom, UNSCALE=unscale, SKIP=skip)
