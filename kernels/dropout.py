"""Triton kernel of ``modelbatch::batched_dropout``: dropout of N models, each
from its own Philox stream, in one launch.

Shapes. ``x`` is ``[N, ...]`` (float32, float16, bfloat16 or float64; any
strides, read as if contiguous); ``seeds`` and ``offsets`` are int64 ``[N]`` on
``x``'s device. ``repeat`` divides the per-model size ``P = x[0].numel()``. The
result is a new contiguous tensor shaped and typed like ``x``.

Semantics (those of ``modelbatch.ops.dropout.reference`` and
``csrc/dropout.cpp``): model ``n`` draws ``F = P // repeat`` keep decisions from
the Philox4x32-10 stream keyed by ``k0 = lo32(seeds[n])``, ``k1 = hi32(seeds[n])``
(the seed's two's complement bits), starting at block ``o = offsets[n]`` (as a
uint64): decision ``j`` reads word ``j % 4`` of the block with counter
``(lo32(o + j // 4), hi32(o + j // 4), 0, 0)`` and keeps iff
``(word >> 8) >= round(p * 2**24)`` (the integer threshold of
``modelbatch.ops.dropout.threshold``, computed on the host). Decision ``j``
applies to the ``repeat`` elements ``x[n].flatten()[j * repeat : (j + 1) * repeat]``.
Computing in float32 for float32 / float16 / bfloat16 and in float64 for
float64, with ``(mul, b_keep, b_drop) = modelbatch.ops.dropout.constants(p, kind)``::

    out = x * (keep ? mul : 0)                       kind 0, or grad=True
    out = x * (keep ? mul : 0) + (keep ? b_keep : b_drop)   kind 1 (alpha), grad=False

``p == 0`` returns a copy of ``x``, ``p == 1`` (or an empty ``x``) ``x * 0``,
without a launch.

Why it is built this way:

* One launch for all N models. The grid is ``(chunks, N)``: program
  ``(c, n)`` handles the decisions ``[c * 4 * BLOCK, (c + 1) * 4 * BLOCK)`` of
  model ``n``. CUDA allows only 65535 programs on grid axes 1 and 2, so the
  larger of ``chunks`` and ``N`` goes on axis 0 (``MODELS_ON_0``); the smaller
  one is then below 65535 for any tensor that fits in memory.
* Each Philox block is computed once for its four decisions: a program runs
  :func:`kernels.philox.philox4x32_10` on ``BLOCK`` consecutive counters and
  ``tl.interleave`` lays the four words of each block side by side, giving the
  keep vector of ``4 * BLOCK`` consecutive decisions.
* ``repeat == 1`` (elementwise dropout): a decision is an element, and the
  program processes the ``4 * BLOCK`` contiguous elements of its decisions.
  ``repeat > 1`` (feature dropout, e.g. ``Dropout2d``): the keep vector is
  broadcast over a ``[4 * BLOCK, REP_TILE]`` tile (decision, position within
  its run of ``repeat`` elements) with a loop over ``cdiv(repeat, REP_TILE)``
  tiles. ``BLOCK`` shrinks as ``REP_TILE`` grows so that a tile holds about
  ``TILE`` elements: large ``repeat`` makes few decisions per program, not huge
  programs.
* The mask is drawn in integers, so the kernel keeps exactly the elements the
  reference and the C++ kernel keep. The constants are passed as float64
  arguments and rounded to the compute dtype in the kernel (as the reference
  rounds them), and the launch disables floating-point contraction
  (``enable_fp_fusion=False``) so that the alpha case's ``x * m + b`` rounds
  twice, as torch does; values are then those of the reference exactly.
* Offsets are int32 unless ``x`` (plus the overhang of a tile) reaches 2**31
  elements; counters are always int64 (``o + j // 4`` wraps modulo 2**64, as
  the uint64 counter of the reference does).

On CUDA this is the op's kernel; on CPU tensors it runs only under
``TRITON_INTERPRET=1`` (how the tests check it without a GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .adam import _TL_DTYPES, _compute_dtype, _interpreting, _to_storage
from .philox import check_device, philox4x32_10

#: Philox blocks per program for elementwise dropout (4 * BLOCK elements).
BLOCK = 256
#: Elements per [decisions, REP_TILE] tile when repeat > 1.
TILE = 2048
#: Largest tile width along a run of ``repeat`` elements (a power of two).
MAX_REP_TILE = 512
#: Warps per program on the GPU.
NUM_WARPS = 4
#: CUDA's limit on grid axes 1 and 2.
MAX_GRID_YZ = 65535
#: From this many addressed elements on, offsets are computed in int64.
INT64_INDEX_FROM = 2**31 - 1

_NAME = "modelbatch.kernels.dropout.batched_dropout"


@triton.jit
def _dropout_kernel(
    x_ptr,  # DTYPE [N, P], contiguous
    out_ptr,  # DTYPE [N, P], contiguous
    seeds_ptr,  # int64 [N]
    offsets_ptr,  # int64 [N]
    P,  # per-model numel
    F,  # decisions per model (P // repeat)
    repeat,
    thr,  # keep iff (word >> 8) >= thr
    mul: tl.float64,  # multiplier of kept elements
    b_keep: tl.float64,  # alpha dropout: added to kept elements
    b_drop: tl.float64,  # alpha dropout: added to dropped elements
    DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr,
    INT64: tl.constexpr,
    MODELS_ON_0: tl.constexpr,
    ALPHA: tl.constexpr,  # add b_keep / b_drop (kind 1 and not grad)
    REPEAT_ONE: tl.constexpr,
    BLOCK: tl.constexpr,  # Philox blocks per program: 4 * BLOCK decisions
    REP_TILE: tl.constexpr,  # tile width along a run of `repeat` elements
):
    if MODELS_ON_0:
        n = tl.program_id(0)
        chunk = tl.program_id(1)
    else:
        chunk = tl.program_id(0)
        n = tl.program_id(1)
    if INT64:
        n = n.to(tl.int64)
        chunk = chunk.to(tl.int64)

    # The model's stream: key = the seed's two halves, counters from its offset.
    seed = tl.load(seeds_ptr + n)
    k0 = seed.to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)
    ctr = tl.load(offsets_ptr + n) + (chunk * BLOCK + tl.arange(0, BLOCK))  # int64, wraps
    c0 = ctr.to(tl.uint32)
    c1 = (ctr >> 32).to(tl.uint32)
    zero = tl.zeros([BLOCK], dtype=tl.uint32)
    w0, w1, w2, w3 = philox4x32_10(c0, c1, zero, zero, k0, k1)
    # Decision 4 * i + w is word w of block i.
    words = tl.interleave(tl.interleave(w0, w2), tl.interleave(w1, w3))
    keep = (words >> 8).to(tl.int32) >= thr
    d = chunk * (4 * BLOCK) + tl.arange(0, 4 * BLOCK)

    m = tl.where(keep, tl.full([], mul, COMPUTE), tl.zeros([], COMPUTE))
    if ALPHA:
        b = tl.where(keep, tl.full([], b_keep, COMPUTE), tl.full([], b_drop, COMPUTE))
    base = n * P
    if REPEAT_ONE:
        offs = base + d
        mask = d < F
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        y = x * m
        if ALPHA:
            y = y + b
        tl.store(out_ptr + offs, _to_storage(y, DTYPE), mask=mask)
    else:
        row = base + d[:, None] * repeat
        d_ok = (d < F)[:, None]
        m2 = m[:, None]
        if ALPHA:
            b2 = b[:, None]
        cols = tl.arange(0, REP_TILE)
        for r0 in range(0, repeat, REP_TILE):
            col = r0 + cols
            offs = row + col[None, :]
            mask = d_ok & (col < repeat)[None, :]
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
            y = x * m2
            if ALPHA:
                y = y + b2
            tl.store(out_ptr + offs, _to_storage(y, DTYPE), mask=mask)


def geometry(f: int, repeat: int) -> tuple[int, int]:
    """``(BLOCK, REP_TILE)`` of a launch: Philox blocks per program and tile width."""
    if repeat == 1:
        block, rep_tile = BLOCK, 1
    else:
        rep_tile = min(triton.next_power_of_2(repeat), MAX_REP_TILE)
        block = max(1, min(BLOCK, TILE // (4 * rep_tile)))
    # No more Philox blocks per program than a model needs (rounded up to a power of two).
    return min(block, triton.next_power_of_2(triton.cdiv(f, 4))), rep_tile


def batched_dropout(
    x: torch.Tensor,
    seeds: torch.Tensor,
    offsets: torch.Tensor,
    p: float,
    repeat: int,
    kind: int,
    grad: bool,
) -> torch.Tensor:
    """Dropout of the N models of ``x [N, ...]``, model ``n`` drawing from the
    stream ``(seeds[n], offsets[n])``; see the module docstring. Returns a new
    contiguous tensor; raises ValueError on bad input."""
    from modelbatch.ops import dropout as ref

    ref.check(x, seeds, offsets, p, repeat, kind)
    if x.dtype not in _TL_DTYPES:
        raise ValueError(
            f"{_NAME}: x has dtype {x.dtype}; supported: float32, float16, bfloat16, float64"
        )
    check_device(_NAME, x.device, _dropout_kernel)
    if p == 0.0:
        return x.clone(memory_format=torch.contiguous_format)
    x, seeds, offsets = x.contiguous(), seeds.contiguous(), offsets.contiguous()
    if p == 1.0 or x.numel() == 0:
        return x * 0
    n = x.shape[0]
    per_model = x.numel() // n
    f = per_model // repeat
    block, rep_tile = geometry(f, repeat)
    chunks = triton.cdiv(triton.cdiv(f, 4), block)
    models_on_0 = n > chunks
    grid = (n, chunks) if models_on_0 else (chunks, n)
    if grid[1] > MAX_GRID_YZ:
        raise ValueError(f"{_NAME}: {n} models of {per_model} elements exceed CUDA's grid")
    out = torch.empty_like(x)
    mul, b_keep, b_drop = ref.constants(p, kind)
    # Addresses a program may form: its last tile overhangs the model by < a tile.
    extent = x.numel() + 4 * block * repeat + rep_tile + chunks * 4 * block
    extra = {}
    if not _interpreting(_dropout_kernel):
        extra = {"num_warps": NUM_WARPS, "enable_fp_fusion": False}
    _dropout_kernel[grid](
        x,
        out,
        seeds,
        offsets,
        per_model,
        f,
        repeat,
        ref.threshold(p),
        mul,
        b_keep,
        b_drop,
        DTYPE=_TL_DTYPES[x.dtype],
        COMPUTE=_TL_DTYPES[_compute_dtype(x.dtype)],
        INT64=extent > INT64_INDEX_FROM,
        MODELS_ON_0=models_on_0,
        ALPHA=kind == ref.ALPHA_DROPOUT and not grad,
        REPEAT_ONE=repeat == 1,
        BLOCK=block,
        REP_TILE=rep_tile,
        **extra,
    )
    return out
