"""``modelbatch::philox4x32``: the counter-based Philox4x32-10 generator.

Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
SC'11; the generator of Random123, cuRAND and Triton's ``tl.randint4x``) maps a
128-bit counter ``(c0, c1, c2, c3)`` and a 64-bit key ``(k0, k1)`` to four
32-bit words by ten rounds of::

    hi0, lo0 = mulhilo(0xD2511F53, c0)      hi1, lo1 = mulhilo(0xCD9E8D57, c2)
    c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    k0, k1 = k0 + 0x9E3779B9, k1 + 0xBB67AE85          (mod 2**32)

It is stateless: any output can be computed on its own, on any device, by any
thread, which is what makes per-model streams independent of N, of a model's
position in the batch, of the device and of the thread count.

How ModelBatch uses it (shared with ``modelbatch::batched_dropout``): the stream
of a model is keyed by its 64-bit seed, ``k0 = seed & 0xFFFFFFFF``,
``k1 = seed >> 32``. Its counter is a 64-bit *offset* counting the Philox blocks
(four words each) the model has consumed so far: random value ``j`` of a call
made at offset ``o`` is word ``j % 4`` of the block with counter
``(lo32(o + j // 4), hi32(o + j // 4), 0, 0)``, and the call advances the offset
by ``ceil(count / 4)``. This is the layout of Triton's ``tl.randint4x(seed, o)``.

Three implementations with bit-identical output: :func:`reference` (pure torch,
in int64 arithmetic), ``csrc/philox.cpp`` (CPU) and ``kernels/philox.py``
(Triton, CUDA). ``tests/test_philox.py`` checks them against each other and
against Random123's known-answer vectors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from modelbatch import _backend
from modelbatch.ops._registry import IMPL

#: Round multipliers and Weyl key increments of Philox4x32.
M0, M1 = 0xD2511F53, 0xCD9E8D57
W0, W1 = 0x9E3779B9, 0xBB67AE85
ROUNDS = 10
_U32 = 0xFFFFFFFF


def _mulhilo(m: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """(high, low) 32-bit halves of ``m * b`` for ``b`` in [0, 2**32), in int64.

    The 64-bit product would overflow int64, so ``b`` is split into 16-bit halves:
    ``m * b = p_lo + p_hi * 2**16`` with both partial products below 2**48.
    """
    p_lo = m * (b & 0xFFFF)
    p_hi = m * (b >> 16)
    lo = (p_lo + ((p_hi & 0xFFFF) << 16)) & _U32
    hi = (p_hi + (p_lo >> 16)) >> 16
    return hi, lo


def rounds(c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, k0, k1) -> tuple[Tensor, ...]:
    """The ten Philox rounds on int64 tensors holding uint32 values (broadcasting)."""
    for _ in range(ROUNDS):
        hi0, lo0 = _mulhilo(M0, c0)
        hi1, lo1 = _mulhilo(M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + W0) & _U32
        k1 = (k1 + W1) & _U32
    return c0, c1, c2, c3


def reference(counter: Tensor, key: Tensor) -> Tensor:
    """Pure-torch Philox4x32-10: ``counter [..., 4]``, ``key [..., 2]`` -> ``[..., 4]``.

    All int64 holding 32-bit words (only the low 32 bits of each value are used);
    leading dims broadcast.
    """
    _check(counter, key)
    c = counter & _U32
    k = key & _U32
    out = rounds(c[..., 0], c[..., 1], c[..., 2], c[..., 3], k[..., 0], k[..., 1])
    return torch.stack(torch.broadcast_tensors(*out), -1)


def _check(counter: Tensor, key: Tensor) -> None:
    if counter.dtype != torch.int64 or key.dtype != torch.int64:
        raise ValueError(
            f"philox4x32: counter and key must be int64, got {counter.dtype} and {key.dtype}"
        )
    if counter.dim() < 1 or counter.shape[-1] != 4 or key.dim() < 1 or key.shape[-1] != 2:
        raise ValueError(
            "philox4x32: expected counter [..., 4] and key [..., 2], got "
            f"{tuple(counter.shape)} and {tuple(key.shape)}"
        )


def split_seeds(seeds: Tensor) -> tuple[Tensor, Tensor]:
    """The Philox keys ``(k0, k1)`` of int64 seeds (two's complement bits, as uint64)."""
    s = seeds.to(torch.int64)
    return s & _U32, (s >> 32) & _U32


def stream(seeds: Tensor, offsets: Tensor, count: int) -> Tensor:
    """Words ``[N, count]`` (int64 in [0, 2**32)) of N streams from their offsets.

    Word ``j`` of model ``n`` is word ``j % 4`` of Philox block
    ``offsets[n] + j // 4`` under key ``seeds[n]`` (see the module docstring).
    """
    blocks = -(-count // 4)
    k0, k1 = (k.view(-1, 1) for k in split_seeds(seeds))
    ctr = offsets.to(torch.int64).view(-1, 1) + torch.arange(blocks, device=seeds.device)
    zero = torch.zeros_like(ctr)
    words = rounds(ctr & _U32, (ctr >> 32) & _U32, zero, zero, k0, k1)
    return torch.stack(words, -1).reshape(seeds.shape[0], blocks * 4)[:, :count]


def _fake(counter: Tensor, key: Tensor) -> Tensor:
    shape = torch.broadcast_shapes(counter.shape[:-1], key.shape[:-1])
    return counter.new_empty((*shape, 4))


def _cuda(counter: Tensor, key: Tensor) -> Tensor:
    from modelbatch.kernels import philox as triton_philox

    return triton_philox.philox4x32(counter, key)


torch.library.register_fake("modelbatch::philox4x32")(_fake)
IMPL.impl("philox4x32", _cuda, "CUDA")
if not _backend.c_extension_loaded():
    IMPL.impl("philox4x32", reference, "CPU")


def philox4x32(counter: Tensor, key: Tensor) -> Tensor:
    """Philox4x32-10 of ``counter [..., 4]`` under ``key [..., 2]`` (int64 words)."""
    return torch.ops.modelbatch.philox4x32(counter, key)
