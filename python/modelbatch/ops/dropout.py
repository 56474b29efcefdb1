"""``modelbatch::dropout``: dropout of N models, each from its own Philox stream.

Two ops:

* ``modelbatch::batched_dropout(x [N, ...], seeds [N], offsets [N], p, repeat, kind,
  grad)`` (defined in C++) with an explicit model axis. Model ``n`` draws
  ``F = x[n].numel() // repeat`` keep decisions from its Philox stream (key
  ``seeds[n]``, starting at block ``offsets[n]``; see :mod:`modelbatch.ops.philox`)
  and applies decision ``j`` to the ``repeat`` consecutive elements
  ``x[n].flatten()[j * repeat : (j + 1) * repeat]``. ``repeat = 1`` is elementwise
  dropout; channel ("feature") dropout of a per-model ``[B, C, *S]`` is
  ``repeat = prod(S)``, one decision per (sample, channel) as in
  ``torch.feature_dropout``. One kernel launch covers all models: C++ on CPU
  (``csrc/dropout.cpp``), Triton on CUDA (``kernels/dropout.py``).
* ``modelbatch::dropout(x, seed, offset, p, repeat, kind, grad)``: the same for one
  model (``seed`` and ``offset`` are 0-d). Its vmap rule calls the batched op once
  for all models; ModelBatch's interception routes ``F.dropout`` & co. to it.

Decision: the 32-bit word ``u`` of value ``j`` keeps its element iff
``(u >> 8) >= floor(p * 2**24 + 0.5)``: a keep rate of ``1 - p`` to within 2**-25, computed
in integers so that every implementation keeps exactly the same elements.

``kind`` 0 (dropout): ``out = x * (keep / (1 - p))``.
``kind`` 1 (alpha dropout, for SELU networks, as ``torch.alpha_dropout``): with
``alpha = 1.7580993408473766`` and ``a = ((alpha**2 * p + 1) * (1 - p)) ** -0.5``,
``out = x * (keep * a) + b`` where ``b = alpha * a * p`` for kept elements and
``alpha * a * (p - 1)`` for dropped ones.
``grad=True`` gives the input gradient for an output gradient ``x``:
``x * keep / (1 - p)`` (kind 0) or ``x * keep * a`` (kind 1). The mask is never
stored: backward draws it again from the same (seed, offset), so dropout costs no
activation memory beyond its output.

``p == 0`` returns a copy of ``x``, ``p == 1`` returns ``x * 0`` (as torch does); the
result is always a new contiguous tensor.
Values are computed in float32 for half types and in the input dtype otherwise.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from modelbatch import _backend
from modelbatch.ops import philox
from modelbatch.ops._registry import IMPL, opmath

DROPOUT, ALPHA_DROPOUT = 0, 1
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
#: The SELU saturation value ``-scale * alpha`` that alpha dropout drops to.
ALPHA = 1.7580993408473766


def threshold(p: float) -> int:
    """The integer keep threshold on the top 24 bits of a word (see module doc)."""
    return math.floor(p * 16777216.0 + 0.5)


def blocks(count: int) -> int:
    """Philox blocks a call drawing ``count`` values consumes (four words each)."""
    return -(-count // 4)


def constants(p: float, kind: int) -> tuple[float, float, float]:
    """``(multiplier of kept elements, b of kept, b of dropped)`` in float64."""
    if kind == DROPOUT:
        return 1.0 / (1.0 - p), 0.0, 0.0
    a = 1.0 / math.sqrt((ALPHA * ALPHA * p + 1.0) * (1.0 - p))
    return a, ALPHA * a * p, ALPHA * a * p - ALPHA * a


def check(x: Tensor, seeds: Tensor, offsets: Tensor, p: float, repeat: int, kind: int) -> None:
    """The argument checks all implementations share (same messages as C++)."""
    if x.dtype not in DTYPES:
        raise ValueError(
            f"batched_dropout: x must be float32, float64, float16 or bfloat16, got {x.dtype}"
        )
    if x.dim() < 1:
        raise ValueError("batched_dropout: x must have a leading model axis [N, ...]")
    n = x.shape[0]
    for name, t in (("seeds", seeds), ("offsets", offsets)):
        if t.dtype != torch.int64 or t.dim() != 1 or t.shape[0] != n:
            raise ValueError(
                f"batched_dropout: {name} must be int64 [N={n}], got {t.dtype} {tuple(t.shape)}"
            )
        if t.device != x.device:
            raise ValueError(f"batched_dropout: {name} is on {t.device}, x on {x.device}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    per_model = x[0].numel() if n else 0
    if repeat < 1 or (n and per_model % repeat):
        raise ValueError(
            f"batched_dropout: repeat={repeat} must be >= 1 and divide the per-model size "
            f"{per_model}"
        )
    if kind not in (DROPOUT, ALPHA_DROPOUT):
        raise ValueError(f"batched_dropout: kind must be 0 (dropout) or 1 (alpha), got {kind}")


def keep_mask(seeds: Tensor, offsets: Tensor, count: int, p: float) -> Tensor:
    """Bool ``[N, count]``: which of the ``count`` values each model keeps."""
    return (philox.stream(seeds, offsets, count) >> 8) >= threshold(p)


def reference(
    x: Tensor, seeds: Tensor, offsets: Tensor, p: float, repeat: int, kind: int, grad: bool
) -> Tensor:
    """Pure-torch oracle of ``batched_dropout`` (see the module docstring)."""
    check(x, seeds, offsets, p, repeat, kind)
    if p == 0.0:
        return x.clone(memory_format=torch.contiguous_format)
    if p == 1.0 or x.numel() == 0:
        return (x * 0).contiguous()
    n = x.shape[0]
    count = x[0].numel() // repeat
    keep = keep_mask(seeds, offsets, count, p)
    keep = keep.view(n, count, 1).expand(n, count, repeat).reshape(x.shape)
    dt = opmath(x.dtype)
    mul, b_keep, b_drop = constants(p, kind)
    m = torch.where(keep, torch.tensor(mul, dtype=dt), torch.tensor(0.0, dtype=dt))
    out = x.to(dt) * m.to(x.device)
    if kind == ALPHA_DROPOUT and not grad:
        b = torch.where(keep, torch.tensor(b_keep, dtype=dt), torch.tensor(b_drop, dtype=dt))
        out = out + b.to(x.device)
    return out.to(x.dtype)


def _cuda(x, seeds, offsets, p, repeat, kind, grad):
    from modelbatch.kernels import dropout as triton_dropout

    return triton_dropout.batched_dropout(x, seeds, offsets, p, repeat, kind, grad)


torch.library.register_fake("modelbatch::batched_dropout")(
    lambda x, *args: torch.empty_like(x, memory_format=torch.contiguous_format)
)
IMPL.impl("batched_dropout", _cuda, "CUDA")
if not _backend.c_extension_loaded():
    IMPL.impl("batched_dropout", reference, "CPU")


def _setup(ctx, inputs, output):
    _, seeds, offsets, p, repeat, kind, _grad = inputs
    ctx.save_for_backward(seeds, offsets)
    ctx.args = (p, repeat, kind)


def _backward(ctx, g):
    seeds, offsets = ctx.saved_tensors
    p, repeat, kind = ctx.args
    # Forward or grad=True, the derivative is x -> x * keep * multiplier: the grad map.
    gx = torch.ops.modelbatch.batched_dropout(g, seeds, offsets, p, repeat, kind, True)
    return gx, None, None, None, None, None, None


torch.library.register_autograd("modelbatch::batched_dropout", _backward, setup_context=_setup)


def batched_dropout(
    x: Tensor,
    seeds: Tensor,
    offsets: Tensor,
    p: float,
    repeat: int = 1,
    kind: int = DROPOUT,
    grad: bool = False,
) -> Tensor:
    """Dropout of ``x [N, ...]``, model ``n`` drawing from stream (seeds[n], offsets[n])."""
    return torch.ops.modelbatch.batched_dropout(x, seeds, offsets, p, repeat, kind, grad)


@torch.library.custom_op("modelbatch::dropout", mutates_args=())
def dropout(
    x: Tensor, seed: Tensor, offset: Tensor, p: float, repeat: int, kind: int, grad: bool
) -> Tensor:
    """Dropout of one model's ``x`` from the stream (seed, offset); 0-d int64 each."""
    return batched_dropout(x.unsqueeze(0), seed.view(1), offset.view(1), p, repeat, kind, grad)[0]


@dropout.register_fake
def _(x, seed, offset, p, repeat, kind, grad):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _dropout_setup(ctx, inputs, output):
    _, seed, offset, p, repeat, kind, _grad = inputs
    ctx.save_for_backward(seed, offset)
    ctx.args = (p, repeat, kind)


def _dropout_backward(ctx, g):
    seed, offset = ctx.saved_tensors
    return dropout(g, seed, offset, *ctx.args, True), None, None, None, None, None, None


dropout.register_autograd(_dropout_backward, setup_context=_dropout_setup)


def _vmap_rule(info, in_dims, x, seed, offset, p, repeat, kind, grad):
    xd, sd, od = in_dims[:3]
    n = info.batch_size
    if xd is None:
        # The same tensor for every model (a constant): each model still draws its own mask.
        x = x.unsqueeze(0).expand(n, *x.shape)
    else:
        x = x.movedim(xd, 0)
    seed = seed.movedim(sd, 0) if sd is not None else seed.expand(n)
    offset = offset.movedim(od, 0) if od is not None else offset.expand(n)
    out = batched_dropout(x, seed.contiguous(), offset.contiguous(), p, repeat, kind, grad)
    return out, 0


torch.library.register_vmap("modelbatch::dropout", _vmap_rule)
