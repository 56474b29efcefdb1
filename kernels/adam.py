"""Triton kernel of ``modelbatch::adam_step``: Adam / AdamW for N stacked models.

Shapes. Every tensor of ``params``, ``grads``, ``exp_avgs``, ``exp_avg_sqs`` and
(when it is not empty) ``max_exp_avg_sqs`` is a contiguous ``[N, ...]`` stack:
model ``i`` owns the elements ``[i * per_model, (i + 1) * per_model)`` of each
tensor. All of them share one dtype (float32, float16, bfloat16 or float64) and
one device. ``steps`` is a float64 ``[N]`` vector; ``lr``, ``beta1``, ``beta2``,
``eps``, ``weight_decay`` and ``amsgrad`` (0/1) are ``[N]`` vectors of any real
dtype. ``decoupled_weight_decay`` selects AdamW.

Semantics (those of ``modelbatch.ops.adam.reference`` and ``csrc/adam.cpp``,
that is of ``torch.optim.Adam``'s single-tensor path, per model): ``steps`` is
advanced by one first, and the bias corrections use the new count. Then per
element, computing in float32 for float32 / float16 / bfloat16 tensors and in
float64 for float64 tensors::

    Adam:  g = g + wd * p                 AdamW: p = p * (1 - lr * wd)
    m = lerp(m, g, 1 - beta1)             (torch's two-branch lerp formula)
    v = v * beta2 + (1 - beta2) * g * g
    amsgrad models: vmax = max(vmax, v), and vmax replaces v below
    p = p - lr / (1 - beta1^t) * (m / (sqrt(v) / sqrt(1 - beta2^t) + eps))

Mixed precision (``modelbatch.amp.GradScaler``): two optional trailing
arguments, contiguous float32 ``[N]`` tensors on the params' device (on
``steps``' device when there are no params):

* ``inv_scale``: the grads are loss scaled. Every grad element of model i, of
  every model (skipped or not), is unscaled and written back to ``grads``,
  ``g = dtype(opmath(g) * inv_scale[i])`` (as
  ``torch._amp_foreach_non_finite_check_and_unscale_``; opmath as the compute
  dtype above, bfloat16 rounded to nearest even by ``_to_storage``); the update
  uses that rounded value.
* ``found_inf``: a model with ``found_inf[i] != 0`` is skipped: ``steps[i]`` is
  not advanced, and its params, moments and max buffers are left untouched bit
  for bit (``modelbatch::amp_unscale_``, ``kernels/amp.py``, fills
  ``found_inf``; this kernel does not look for inf / NaN itself).

Why it is built this way:

* One launch for the whole list (a "multi-tensor" launch). The data pointers
  and sizes of all tensors go into one int64 table on the device; program
  ``(block, tensor)`` loads its tensor's pointers from the table and casts them
  (``tl.pointer_type``). The grid is ``(cdiv(max_numel, BLOCK), num_tensors)``;
  blocks past the end of a smaller tensor are fully masked. (The tensor axis is
  the second one because CUDA allows only 65535 programs there; more tensors
  than that are split over several launches.)
* The model of an element is ``offset // per_model_numel``, so a block may span
  many models (small tensors of many models cost one block, not one per model).
* The per-model scalars (``lr / (1 - beta1^t)``, ``sqrt(1 - beta2^t)``,
  ``1 - lr * wd``, ...) are computed by a few torch ops on the device in
  float64, exactly as the C++ kernel computes them on the host, then cast to
  the compute dtype and gathered by the kernel. Nothing reads a device value
  on the host, so the call never synchronises. For that reason "does any model
  use amsgrad" is ``len(max_exp_avg_sqs) > 0``: with an empty
  ``max_exp_avg_sqs`` the amsgrad flags are not honoured. (That mistake is
  reported as an error when ``amsgrad`` is a CPU tensor, where checking is free.)
* Mixed precision costs nothing when unused: ``inv_scale`` and the keep flags
  (``found_inf == 0``) are two more rows of the per-model scalars table, read
  only under the constexpr flags ``UNSCALE`` / ``SKIP``, so without them the
  kernel compiles to the plain one. ``steps`` advances by ``keep`` on the
  device (``steps.add_(keep)``): no host synchronisation either. A skipped
  model's bias corrections may be inf / NaN (its ``steps`` may still be 0);
  its lanes load the masked loads' neutral values instead and store nothing.
* Square root and division of float32 values use the correctly rounded
  ``sqrt_rn`` / ``div_rn`` (plain ``sqrt`` and ``/`` are approximate on NVIDIA
  GPUs), so the results are those of torch's own kernels to float rounding.

On CUDA this is the op's kernel; on CPU tensors it runs only under
``TRITON_INTERPRET=1`` (how the tests check it without a GPU).

The multi-tensor helpers (``_check_*``, ``_pointer_table``, ``_launch``,
``_to_storage``, ``_unscale``, ...) are shared with ``kernels/sgd.py`` and
``kernels/amp.py``.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

Tensors = Sequence[torch.Tensor]

#: Elements per program.
BLOCK = 1024
#: Warps per program on the GPU.
NUM_WARPS = 4
#: CUDA's limit on the grid's second axis: more tensors are split over launches.
MAX_TENSORS_PER_LAUNCH = 65535
#: From this many elements in one tensor on, offsets are computed in int64.
INT64_INDEX_FROM = 2**31 - 1

_TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
}

_NAME = "modelbatch.kernels.adam.adam_step"


# --------------------------------------------------------------------------
# Shared multi-tensor helpers (also used by kernels/sgd.py)
# --------------------------------------------------------------------------


def _interpreting(kernel) -> bool:
    """True when ``kernel`` was decorated under ``TRITON_INTERPRET=1``."""
    return type(kernel).__name__ == "InterpretedFunction"


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_kernel_device(op: str, device: torch.device, interpreting: bool) -> None:
    """The Triton kernels take CUDA tensors, or CPU tensors under the interpreter."""
    if interpreting and device.type != "cpu":
        raise ValueError(
            f"{op}: under TRITON_INTERPRET=1 the kernel takes CPU tensors, got {device}"
        )
    if not interpreting and device.type != "cuda":
        raise ValueError(
            f"{op}: the Triton kernel takes CUDA tensors (CPU tensors only under "
            f"TRITON_INTERPRET=1), got {device}; use torch.ops.modelbatch ops, which "
            "dispatch CPU tensors to the C++ kernel"
        )


def _check_params(op: str, params: Tensors, steps: torch.Tensor, interpreting: bool) -> int:
    """Validate ``steps`` and ``params``; return N, the number of models."""
    if not isinstance(steps, torch.Tensor) or steps.dim() != 1:
        shape = tuple(steps.shape) if isinstance(steps, torch.Tensor) else type(steps)
        raise ValueError(f"{op}: steps must be a 1-D [N] tensor, got {shape}")
    n = steps.shape[0]
    if n == 0:
        raise ValueError(f"{op}: steps must have at least one model")
    if steps.dtype != torch.float64 or not steps.is_contiguous():
        raise ValueError(f"{op}: steps must be a contiguous float64 tensor, got {steps.dtype}")
    _check_stacked(op, params, n, "params", interpreting)
    return n


def _check_stacked(op: str, tensors: Tensors, n: int, name: str, interpreting: bool) -> None:
    """Validate a list of contiguous ``[N, ...]`` stacks of one dtype on one device
    the kernels take (``params``, or the ``grads`` of ``amp_unscale_``)."""
    for t, p in enumerate(tensors):
        if p.dim() < 1 or p.shape[0] != n:
            raise ValueError(
                f"{op}: {name}[{t}] has shape {tuple(p.shape)}, expected a stacked "
                f"tensor [N={n}, ...]"
            )
        if p.dtype not in _TL_DTYPES:
            raise ValueError(
                f"{op}: {name}[{t}] has dtype {p.dtype}; supported: float32, float16, "
                "bfloat16, float64"
            )
        if p.dtype != tensors[0].dtype:
            raise ValueError(
                f"{op}: all {name} of one call share a dtype; {name}[{t}] is {p.dtype}, "
                f"{name}[0] is {tensors[0].dtype}"
            )
        if p.device != tensors[0].device:
            raise ValueError(
                f"{op}: all {name} of one call share a device; {name}[{t}] is on "
                f"{p.device}, {name}[0] is on {tensors[0].device}"
            )
        if not p.is_contiguous():
            raise ValueError(f"{op}: {name}[{t}] must be contiguous")
    if tensors:
        check_kernel_device(op, tensors[0].device, interpreting)


def _check_like(op: str, params: Tensors, other: Tensors, name: str) -> None:
    """Validate a list of stacked tensors against ``params``."""
    if len(other) != len(params):
        raise ValueError(
            f"{op}: expected {len(params)} {name} (one per parameter), got {len(other)}"
        )
    for t, (p, o) in enumerate(zip(params, other)):
        if o.shape != p.shape:
            raise ValueError(
                f"{op}: {name}[{t}] has shape {tuple(o.shape)}, expected {tuple(p.shape)} "
                f"(the shape of params[{t}])"
            )
        if o.dtype != p.dtype:
            raise ValueError(f"{op}: {name}[{t}] has dtype {o.dtype}, expected {p.dtype}")
        if o.device != p.device:
            raise ValueError(f"{op}: {name}[{t}] is on {o.device}, expected {p.device}")
        if not o.is_contiguous():
            raise ValueError(f"{op}: {name}[{t}] must be contiguous")


def _check_hparam(op: str, v: torch.Tensor, n: int, name: str) -> None:
    if not isinstance(v, torch.Tensor) or v.dim() != 1 or v.shape[0] != n:
        shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v)
        raise ValueError(f"{op}: {name} must be a [N] per-model tensor with N={n}, got {shape}")
    if v.is_complex():
        raise ValueError(f"{op}: {name} must be real, got {v.dtype}")


def _check_scaler_vector(op: str, v: torch.Tensor, n: int, name: str, device: torch.device) -> None:
    """``inv_scale`` / ``found_inf``: a contiguous float32 ``[N]`` tensor on ``device``
    (the kernel reads, and ``amp_unscale_`` writes, it through its data pointer)."""
    if not isinstance(v, torch.Tensor) or v.dim() != 1 or v.shape[0] != n:
        shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v)
        raise ValueError(
            f"{op}: {name} must be a float32 [N] per-model tensor with N={n}, got {shape}"
        )
    if v.dtype != torch.float32:
        raise ValueError(f"{op}: {name} must be float32, got {v.dtype}")
    if v.device != device:
        raise ValueError(f"{op}: {name} is on {v.device}, expected {device}")
    if not v.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous")


def _check_scaler(
    op: str,
    inv_scale: torch.Tensor | None,
    found_inf: torch.Tensor | None,
    n: int,
    params: Tensors,
    steps: torch.Tensor,
) -> None:
    """Validate the optional mixed-precision arguments of an optimizer step: on the
    params' device (on ``steps``' device when there are no params)."""
    device = params[0].device if params else steps.device
    if inv_scale is not None:
        _check_scaler_vector(op, inv_scale, n, "inv_scale", device)
    if found_inf is not None:
        _check_scaler_vector(op, found_inf, n, "found_inf", device)


def _advance_steps(steps: torch.Tensor, found_inf: torch.Tensor | None) -> torch.Tensor | None:
    """``steps += 1`` for the models that step (``found_inf == 0``), on the device.
    Returns the float64 0/1 ``keep`` vector (None without ``found_inf``)."""
    if found_inf is None:
        steps.add_(1)
        return None
    keep = (found_inf == 0).to(torch.float64)
    steps.add_(keep.to(steps.device))
    return keep


def _scaler_rows(
    inv_scale: torch.Tensor | None, keep: torch.Tensor | None, like: torch.Tensor
) -> torch.Tensor:
    """The two scalars-table rows of the mixed-precision path, ``[inv_scale, keep]``,
    in ``like``'s dtype on its device; ones stand in for a missing argument."""
    ones = torch.ones(like.shape[1], dtype=like.dtype, device=like.device)
    rows = [x.to(like.dtype) if x is not None else ones for x in (inv_scale, keep)]
    return torch.stack(rows)


def _any_nonzero_on_cpu(v: torch.Tensor) -> bool:
    """``(v != 0).any()`` where that is free (a CPU tensor); False elsewhere."""
    return v.device.type == "cpu" and bool((v != 0).any())


# Device tables by (device, stream, pointers, sizes). A table's content depends
# only on its key, so a cached table is right whenever its key matches, even
# when the tensors it was built for are gone and others took their addresses.
# The stream is part of the key so that a table is only used on the stream its
# copy was queued on. Each entry keeps its pinned host copy: a table built while
# a CUDA graph is captured is copied again from it at every replay. Tables that
# a captured kernel reads (built during the capture or before it) move to
# _CAPTURED_TABLES and are never evicted.
_TABLES: collections.OrderedDict = collections.OrderedDict()
_TABLES_MAX = 64
_CAPTURED_TABLES: dict = {}


def _pointer_table(lists: Sequence[Tensors | None], device: torch.device) -> torch.Tensor:
    """An int64 ``[len(lists) + 1, T]`` table on ``device``: one row of data
    pointers per list (zeros for ``None``), then a row of numels."""
    rows = [[x.data_ptr() for x in lst] if lst is not None else None for lst in lists]
    numels = [x.numel() for x in lists[0]]
    zeros = [0] * len(numels)
    flat = [v for r in rows for v in (r if r is not None else zeros)] + numels
    shape = (len(lists) + 1, len(numels))
    if device.type != "cuda":
        return torch.tensor(flat, dtype=torch.int64, device=device).view(shape)
    key = (device.index, torch.cuda.current_stream(device).cuda_stream, *flat)
    entry = _TABLES.get(key) or _CAPTURED_TABLES.get(key)
    if entry is None:
        # Pinned memory + non_blocking: the copy is queued, the host does not wait.
        host = torch.tensor(flat, dtype=torch.int64).pin_memory()
        entry = (host.to(device, non_blocking=True).view(shape), host)
        if torch.cuda.is_current_stream_capturing():
            _CAPTURED_TABLES[key] = entry
        else:
            _TABLES[key] = entry
            if len(_TABLES) > _TABLES_MAX:
                _TABLES.popitem(last=False)
    elif key in _TABLES:
        if torch.cuda.is_current_stream_capturing():
            # A graph now reads this table at every replay: never evict it.
            _CAPTURED_TABLES[key] = _TABLES.pop(key)
        else:
            _TABLES.move_to_end(key)
    return entry[0]


def _launch(kernel, lists: Sequence[Tensors | None], scalars: torch.Tensor, n: int, *args, **meta):
    """Launch ``kernel`` over all tensors of ``lists`` (``lists[0]`` sets the numels).

    Zero-size tensors are dropped. ``scalars`` is the ``[K, N]`` per-model table.
    The kernel takes ``(table, scalars, t0, T, N, *args)``, then the constexprs
    ``DTYPE``, ``COMPUTE``, ``INT64``, ``BLOCK`` and ``meta``. The pointer table
    stays referenced until every launch has been queued (on CUDA the cache keeps
    it longer); after that the caching allocator orders any reuse of its memory
    after the kernels on its stream.
    """
    keep = [t for t, p in enumerate(lists[0]) if p.numel() > 0]
    if not keep:
        return
    lists = [[lst[t] for t in keep] if lst is not None else None for lst in lists]
    params = lists[0]
    dtype = params[0].dtype
    table = _pointer_table(lists, params[0].device)
    num_t = len(params)
    extra = {} if _interpreting(kernel) else {"num_warps": NUM_WARPS}
    for t0 in range(0, num_t, MAX_TENSORS_PER_LAUNCH):
        chunk = params[t0 : t0 + MAX_TENSORS_PER_LAUNCH]
        max_numel = max(p.numel() for p in chunk)
        grid = (triton.cdiv(max_numel, BLOCK), len(chunk))
        kernel[grid](
            table,
            scalars,
            t0,
            num_t,
            n,
            *args,
            DTYPE=_TL_DTYPES[dtype],
            COMPUTE=_TL_DTYPES[_compute_dtype(dtype)],
            INT64=max_numel + BLOCK > INT64_INDEX_FROM,
            BLOCK=BLOCK,
            **meta,
            **extra,
        )


@triton.jit
def _block(table, numel_row: tl.constexpr, t0, T, N, BLOCK: tl.constexpr, INT64: tl.constexpr):
    """The elements a program of a multi-tensor kernel covers: ``(t, offs, mask,
    model)``, tensor ``t`` of this launch (grid axis 1), its ``BLOCK`` offsets
    (axis 0), the in-bounds mask and each offset's model. The tensors' element
    counts are row ``numel_row`` of the launch table (see ``_launch``)."""
    t = t0 + tl.program_id(1)
    numel = tl.load(table + numel_row * T + t)
    if INT64:
        start = tl.program_id(0).to(tl.int64) * BLOCK
    else:
        start = tl.program_id(0) * BLOCK
        numel = numel.to(tl.int32)
    offs = start + tl.arange(0, BLOCK)
    mask = offs < numel
    model = offs // (numel // N)
    return t, offs, mask, model


@triton.jit
def _to_storage(x, DTYPE: tl.constexpr):
    """Round a float32 / float64 value to the storage dtype, to nearest even.

    bfloat16 is rounded with integer ops (add half an ulp plus the parity bit,
    then drop the low 16 bits) rather than ``x.to(tl.bfloat16)``: the GPU rounds
    that cast to nearest even, but Triton's interpreter truncates it, and the
    same code should be what the tests check and what runs on the GPU.
    """
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16
        # A NaN keeps its sign and high payload, with the quiet bit set so that
        # dropping the low payload bits cannot turn it into an infinity.
        nan = (bits >> 16) | 0x40
        out = tl.where(x != x, nan, rounded).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = x.to(DTYPE)
    return out


@triton.jit
def _unscale(
    g_ptr,
    offs,
    mask,
    live,
    inv_ptrs,
    DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr,
    SKIP: tl.constexpr,
):
    """Unscale the grads of every model (skipped or not) in place,
    ``g = DTYPE(COMPUTE(g) * inv_scale[model])``, and return them in COMPUTE as
    stored; zero in the lanes that are not ``live`` (of skipped models, whose
    grads may be inf / NaN) when ``SKIP``."""
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    inv = tl.load(inv_ptrs, mask=mask, other=1.0)
    g = _to_storage(g.to(COMPUTE) * inv, DTYPE)
    tl.store(g_ptr + offs, g, mask=mask)
    g = g.to(COMPUTE)
    if SKIP:
        g = tl.where(live, g, 0.0)
    return g


# --------------------------------------------------------------------------
# Adam
# --------------------------------------------------------------------------


@triton.jit
def _adam_kernel(
    table,  # int64 [6, T]: pointers of params, grads, exp_avgs, exp_avg_sqs, max; numels
    sc,  # COMPUTE [9 (+2), N]: step_size, bc2_sqrt, 1-beta1, beta2, 1-beta2, eps, wd,
    #      decay, ams (, inv_scale, keep when UNSCALE or SKIP)
    t0,  # first tensor of this launch
    T,  # number of tensors (row length of table)
    N,  # number of models
    DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr,
    INT64: tl.constexpr,
    BLOCK: tl.constexpr,
    DECOUPLED: tl.constexpr,
    AMSGRAD: tl.constexpr,
    UNSCALE: tl.constexpr,
    SKIP: tl.constexpr,
):
    t, offs, mask, model = _block(table, 5, t0, T, N, BLOCK, INT64)

    p_ptr = tl.load(table + t).to(tl.pointer_type(DTYPE))
    g_ptr = tl.load(table + T + t).to(tl.pointer_type(DTYPE))
    m_ptr = tl.load(table + 2 * T + t).to(tl.pointer_type(DTYPE))
    v_ptr = tl.load(table + 3 * T + t).to(tl.pointer_type(DTYPE))

    if SKIP:
        # Skipped models (found_inf != 0) read and write nothing but their grads:
        # their lanes compute with the loads' `other` values (their bias
        # corrections may be inf / NaN: steps did not advance), and are not stored.
        live = mask & (tl.load(sc + 10 * N + model, mask=mask, other=0.0) != 0)
    else:
        live = mask

    step_size = tl.load(sc + model, mask=live, other=0.0)
    bc2_sqrt = tl.load(sc + N + model, mask=live, other=1.0)
    w = tl.load(sc + 2 * N + model, mask=live, other=0.0)
    beta2 = tl.load(sc + 3 * N + model, mask=live, other=0.0)
    omb2 = tl.load(sc + 4 * N + model, mask=live, other=0.0)
    eps = tl.load(sc + 5 * N + model, mask=live, other=1.0)

    p = tl.load(p_ptr + offs, mask=live, other=0.0).to(COMPUTE)
    if UNSCALE:
        g = _unscale(g_ptr, offs, mask, live, sc + 9 * N + model, DTYPE, COMPUTE, SKIP)
    else:
        g = tl.load(g_ptr + offs, mask=live, other=0.0).to(COMPUTE)
    m = tl.load(m_ptr + offs, mask=live, other=0.0).to(COMPUTE)
    v = tl.load(v_ptr + offs, mask=live, other=0.0).to(COMPUTE)

    if DECOUPLED:
        decay_mul = tl.load(sc + 7 * N + model, mask=live, other=1.0)
        p = p * decay_mul
    else:
        wd = tl.load(sc + 6 * N + model, mask=live, other=0.0)
        g = g + wd * p
    # torch.lerp's two-branch formula, so the first moment rounds as torch's does.
    m = tl.where(w < 0.5, m + w * (g - m), g - (g - m) * (1.0 - w))
    v = v * beta2
    v = v + omb2 * g * g
    src = v
    if AMSGRAD:
        vmax_ptr = tl.load(table + 4 * T + t).to(tl.pointer_type(DTYPE))
        on = live & (tl.load(sc + 8 * N + model, mask=live, other=0.0) != 0)
        vm = tl.load(vmax_ptr + offs, mask=on, other=0.0).to(COMPUTE)
        vm = tl.where((vm > v) | (vm != vm), vm, v)  # torch.maximum: NaN wins
        tl.store(vmax_ptr + offs, _to_storage(vm, DTYPE), mask=on)
        src = tl.where(on, vm, v)
    if COMPUTE == tl.float64:
        denom = tl.sqrt(src) / bc2_sqrt + eps
        p = p + (-step_size) * (m / denom)
    else:
        denom = tl.div_rn(tl.sqrt_rn(src), bc2_sqrt) + eps
        p = p + (-step_size) * tl.div_rn(m, denom)
    tl.store(p_ptr + offs, _to_storage(p, DTYPE), mask=live)
    tl.store(m_ptr + offs, _to_storage(m, DTYPE), mask=live)
    tl.store(v_ptr + offs, _to_storage(v, DTYPE), mask=live)


def adam_step(
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
    """One Adam (AdamW when ``decoupled_weight_decay``) step of N stacked models,
    in place, with optional per-model grad unscaling (``inv_scale``) and skipping
    (``found_inf``); see the module docstring. Raises ValueError, changing
    nothing, on bad input."""
    op = _NAME
    n = _check_params(op, params, steps, _interpreting(_adam_kernel))
    _check_like(op, params, grads, "grads")
    _check_like(op, params, exp_avgs, "exp_avgs")
    _check_like(op, params, exp_avg_sqs, "exp_avg_sqs")
    any_ams = len(max_exp_avg_sqs) > 0
    if any_ams:
        _check_like(op, params, max_exp_avg_sqs, "max_exp_avg_sqs")
    hps = {
        "lr": lr,
        "beta1": beta1,
        "beta2": beta2,
        "eps": eps,
        "weight_decay": weight_decay,
        "amsgrad": amsgrad,
    }
    for name, v in hps.items():
        _check_hparam(op, v, n, name)
    _check_scaler(op, inv_scale, found_inf, n, params, steps)
    if not any_ams and params and _any_nonzero_on_cpu(amsgrad):
        raise ValueError(
            f"{op}: amsgrad is set for some models but max_exp_avg_sqs is empty; pass one "
            "max_exp_avg_sqs tensor per parameter"
        )

    # The step counter advances first (for the models that step); bias
    # corrections use the new count, per model, in float64 (as the C++ kernel
    # computes them).
    keep = _advance_steps(steps, found_inf)
    if not params:
        return
    t = steps
    lr64, b1, b2, eps64, wd64 = (
        x.to(device=t.device, dtype=torch.float64) for x in (lr, beta1, beta2, eps, weight_decay)
    )
    ams = (amsgrad.to(t.device) != 0).to(torch.float64)
    scalars = torch.stack(
        [
            lr64 / (1 - b1**t),  # step_size
            (1 - b2**t).sqrt(),  # bc2_sqrt
            1 - b1,  # lerp weight
            b2,
            1 - b2,
            eps64,
            torch.zeros_like(wd64) if decoupled_weight_decay else wd64,
            1 - lr64 * wd64,  # decay_mul (AdamW)
            ams,
        ]
    )
    dev = params[0].device
    scalars = scalars.to(device=dev, dtype=_compute_dtype(params[0].dtype))
    unscale, skip = inv_scale is not None, found_inf is not None
    if unscale or skip:
        scalars = torch.cat([scalars, _scaler_rows(inv_scale, keep, scalars)])
    lists = [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if any_ams else None]
    _launch(
        _adam_kernel,
        lists,
        scalars,
        n,
        DECOUPLED=bool(decoupled_weight_decay),
        AMSGRAD=any_ams,
        UNSCALE=unscale,
        SKIP=skip,
    )
