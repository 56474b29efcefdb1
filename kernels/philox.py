"""Triton kernel of ``modelbatch::philox4x32``, and the Philox rounds the other
random kernels (``kernels/dropout.py``) draw their bits from.

Shapes. ``counter`` is int64 ``[..., 4]`` and ``key`` int64 ``[..., 2]``, both on
the same device, holding 32-bit words (values in ``[0, 2**32)``); their leading
dims broadcast. The result is a new contiguous int64 ``[*broadcast, 4]`` of
words in ``[0, 2**32)``.

Semantics (those of ``modelbatch.ops.philox.reference`` and ``csrc/philox.cpp``,
bit for bit): Philox4x32-10 of Salmon et al. (SC'11), the generator of
Random123, cuRAND and Triton's ``tl.randint4x``. Each of its ten rounds is::

    hi0, lo0 = mulhilo(0xD2511F53, c0)      hi1, lo1 = mulhilo(0xCD9E8D57, c2)
    c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    k0, k1 = k0 + 0x9E3779B9, k1 + 0xBB67AE85          (mod 2**32)

Only the low 32 bits of each int64 input word are used, as in the reference and
the C++ kernel (checking the range would read device memory on the host).

Why it is built this way:

* :func:`philox4x32_10` is the generator written out on ``uint32`` tensors:
  ``tl.umulhi`` gives the high half of the 64-bit product and the wrapping
  ``uint32`` multiply its low half, so no 64-bit arithmetic is needed. It is a
  ``@triton.jit`` helper that other kernels call inline (the dropout kernel
  calls it once per block of four words). It is not ``tl.randint4x`` itself
  so that the rounds the op computes are the ones the module states, whatever
  a Triton release does; ``tests/test_triton_rng.py`` checks that the stream
  layout is nonetheless that of ``tl.randint4x``.
* The op's kernel runs over the flattened broadcast rows, ``BLOCK`` rows per
  program on grid axis 0. Broadcasting costs no copy when the leading dims of
  an input merge into one stride (a key ``[2]`` shared by all counters is read
  through stride 0); otherwise the broadcast input is materialised once. Each
  program loads the four counter and two key words of its rows (strided loads)
  and stores its ``4 * BLOCK`` output words as one contiguous run
  (``tl.interleave`` puts the four words of a row next to each other).

On CUDA this is the op's kernel; on CPU tensors it runs only under
``TRITON_INTERPRET=1`` (how the tests check it without a GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .adam import _interpreting, check_kernel_device

#: Rows (Philox blocks of four words) per program.
BLOCK = 256
#: Warps per program on the GPU.
NUM_WARPS = 4
#: From this many addressed elements on, offsets are computed in int64.
INT64_INDEX_FROM = 2**31 - 1

#: Round multipliers and Weyl key increments of Philox4x32 (as in modelbatch.ops.philox).
PHILOX_M0: tl.constexpr = tl.constexpr(0xD2511F53)
PHILOX_M1: tl.constexpr = tl.constexpr(0xCD9E8D57)
PHILOX_W0: tl.constexpr = tl.constexpr(0x9E3779B9)
PHILOX_W1: tl.constexpr = tl.constexpr(0xBB67AE85)
PHILOX_ROUNDS: tl.constexpr = tl.constexpr(10)

_NAME = "modelbatch.kernels.philox.philox4x32"


def check_device(op: str, device: torch.device, kernel) -> None:
    """CUDA tensors, or CPU tensors under the interpreter (shared with dropout)."""
    check_kernel_device(op, device, _interpreting(kernel))


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 of the counter ``(c0, c1, c2, c3)`` under the key ``(k0, k1)``.

    All six are ``tl.uint32`` (blocks or scalars, broadcasting); returns the four
    ``uint32`` output words. Products and sums wrap modulo 2**32 by design.
    """
    for _ in tl.static_range(PHILOX_ROUNDS):
        hi0 = tl.umulhi(c0, PHILOX_M0)
        lo0 = c0 * PHILOX_M0
        hi1 = tl.umulhi(c2, PHILOX_M1)
        lo1 = c2 * PHILOX_M1
        c0 = hi1 ^ c1 ^ k0
        c1 = lo1
        c2 = hi0 ^ c3 ^ k1
        c3 = lo0
        k0 = k0 + PHILOX_W0
        k1 = k1 + PHILOX_W1
    return c0, c1, c2, c3


@triton.jit
def _philox_kernel(
    c_ptr,  # int64 counter rows, element (i, w) at c_ptr + i * c_row + w * c_col
    k_ptr,  # int64 key rows, element (i, w) at k_ptr + i * k_row + w * k_col
    out_ptr,  # int64 [M, 4], contiguous
    M,  # number of rows
    c_row,
    c_col,
    k_row,
    k_col,
    INT64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    if INT64:
        start = tl.program_id(0).to(tl.int64) * BLOCK
    else:
        start = tl.program_id(0) * BLOCK
    rows = start + tl.arange(0, BLOCK)
    mask = rows < M
    c = c_ptr + rows * c_row
    k = k_ptr + rows * k_row
    # int64 -> uint32 keeps the low 32 bits.
    c0 = tl.load(c, mask=mask, other=0).to(tl.uint32)
    c1 = tl.load(c + c_col, mask=mask, other=0).to(tl.uint32)
    c2 = tl.load(c + 2 * c_col, mask=mask, other=0).to(tl.uint32)
    c3 = tl.load(c + 3 * c_col, mask=mask, other=0).to(tl.uint32)
    k0 = tl.load(k, mask=mask, other=0).to(tl.uint32)
    k1 = tl.load(k + k_col, mask=mask, other=0).to(tl.uint32)
    w0, w1, w2, w3 = philox4x32_10(c0, c1, c2, c3, k0, k1)
    # [w0_0, w1_0, w2_0, w3_0, w0_1, ...]: the row-major layout of [BLOCK, 4].
    words = tl.interleave(tl.interleave(w0, w2), tl.interleave(w1, w3))
    offs = start * 4 + tl.arange(0, 4 * BLOCK)
    tl.store(out_ptr + offs, words.to(tl.int64), mask=(offs >> 2) < M)


def _rows(t: torch.Tensor, shape: tuple[int, ...], width: int) -> torch.Tensor:
    """``t`` broadcast to ``[*shape, width]`` as ``[M, width]``: a view when the
    leading dims merge into one stride (broadcast dims have stride 0), else a copy."""
    return t.expand(*shape, width).reshape(-1, width)


def philox4x32(counter: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Philox4x32-10 of ``counter [..., 4]`` under ``key [..., 2]`` (int64 words,
    leading dims broadcast) -> int64 ``[..., 4]``; see the module docstring.
    Raises ValueError on bad input."""
    from modelbatch.ops.philox import _check

    _check(counter, key)
    if key.device != counter.device:
        raise ValueError(f"{_NAME}: key is on {key.device}, counter on {counter.device}")
    check_device(_NAME, counter.device, _philox_kernel)
    shape = tuple(torch.broadcast_shapes(counter.shape[:-1], key.shape[:-1]))
    out = torch.empty((*shape, 4), dtype=torch.int64, device=counter.device)
    m = out.numel() // 4
    if m == 0:
        return out
    c = _rows(counter, shape, 4)
    k = _rows(key, shape, 2)
    extent = max(
        (m + BLOCK) * 4,
        (m + BLOCK) * abs(c.stride(0)) + 4 * abs(c.stride(1)),
        (m + BLOCK) * abs(k.stride(0)) + 2 * abs(k.stride(1)),
    )
    extra = {}
    if not _interpreting(_philox_kernel):
        extra = {"num_warps": NUM_WARPS, "enable_fp_fusion": False}
    grid = (triton.cdiv(m, BLOCK),)
    _philox_kernel[grid](
        c,
        k,
        out,
        m,
        c.stride(0),
        c.stride(1),
        k.stride(0),
        k.stride(1),
        INT64=extent > INT64_INDEX_FROM,
        BLOCK=BLOCK,
        **extra,
    )
    return out
