"""modelbatch::philox4x32: the pure-torch reference and the C++ CPU kernel against
Random123's known-answer vectors and against each other, bit for bit."""

from __future__ import annotations

import pytest
import torch
from modelbatch.ops import philox

OP = torch.ops.modelbatch.philox4x32
U32 = 2**32 - 1

# Random123 kat_vectors, philox4x32_10: (counter, key, output).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((U32, U32, U32, U32), (U32, U32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def _words(*shape, gen):
    """Random uint32 words (int64), a fifth of them 0 or 2**32 - 1."""
    w = torch.randint(0, 2**32, shape, generator=gen)
    pick = torch.randint(0, 10, shape, generator=gen)
    return torch.where(pick == 0, 0, torch.where(pick == 1, U32, w))


@pytest.mark.parametrize("impl", [philox.reference, OP], ids=["reference", "cpp"])
def test_known_answers(impl):
    counter = torch.tensor([c for c, _, _ in KAT])
    key = torch.tensor([k for _, k, _ in KAT])
    out = impl(counter, key)
    assert out.dtype == torch.int64 and out.shape == (3, 4)
    assert out.tolist() == [list(o) for _, _, o in KAT]
    for c, k, o in KAT:  # one block at a time, no leading dims
        assert impl(torch.tensor(c), torch.tensor(k)).tolist() == list(o)


def test_cpp_equals_reference_on_random_words():
    gen = torch.Generator().manual_seed(0)
    counter, key = _words(10_000, 4, gen=gen), _words(10_000, 2, gen=gen)
    out = OP(counter, key)
    assert torch.equal(out, philox.reference(counter, key))
    assert out.min() >= 0 and out.max() <= U32
    assert out.is_contiguous()


def test_broadcasting_and_layouts():
    gen = torch.Generator().manual_seed(1)
    counter, key = _words(5, 1, 4, gen=gen), _words(3, 2, gen=gen)
    out = OP(counter, key)
    assert out.shape == (5, 3, 4)
    assert torch.equal(out, philox.reference(counter, key))
    assert torch.equal(out, OP(counter.expand(5, 3, 4), key.expand(5, 3, 2)))
    # a shared counter, per-row keys; a non-contiguous counter; empty inputs
    assert torch.equal(OP(counter[0, 0], key), philox.reference(counter[0, 0], key))
    wide = _words(4, 8, gen=gen)
    assert torch.equal(OP(wide[:, ::2], key[:1]), philox.reference(wide[:, ::2], key[:1]))
    assert OP(torch.zeros(0, 4, dtype=torch.long), key[:1]).shape == (0, 4)


def test_stream_layout_matches_blocks():
    """philox.stream: word j of a model is word j % 4 of block offset + j // 4."""
    seeds = torch.tensor([0, -1, 2**40 + 7, -(2**63)])
    offsets = torch.tensor([0, 2**32 - 1, 5, -1])  # carries into the high word, wraps
    words = philox.stream(seeds, offsets, 10)
    for n in range(4):
        s, o = seeds[n].item() % 2**64, offsets[n].item() % 2**64
        for j in range(10):
            b = (o + j // 4) % 2**64
            ctr = torch.tensor([b & U32, b >> 32, 0, 0])
            key = torch.tensor([s & U32, s >> 32])
            assert words[n, j].item() == OP(ctr, key)[j % 4].item()


@pytest.mark.parametrize("impl", [philox.reference, OP], ids=["reference", "cpp"])
def test_bad_inputs(impl):
    c, k = torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="must be int64"):
        impl(c.int(), k)
    with pytest.raises(ValueError, match="must be int64"):
        impl(c, k.double())
    with pytest.raises(ValueError, match=r"expected counter \[\.\.\., 4\] and key \[\.\.\., 2\]"):
        impl(c[:, :3], k)
    with pytest.raises(ValueError, match=r"expected counter \[\.\.\., 4\] and key \[\.\.\., 2\]"):
        impl(c, k[:, :1])
    with pytest.raises(ValueError, match=r"expected counter"):
        impl(torch.tensor(0), k)
    with pytest.raises(RuntimeError):  # leading dims that do not broadcast
        impl(torch.zeros(3, 4, dtype=torch.long), k)


def test_opcheck():
    gen = torch.Generator().manual_seed(2)
    torch.library.opcheck(
        torch.ops.modelbatch.philox4x32.default, (_words(6, 4, gen=gen), _words(6, 2, gen=gen))
    )
    torch.library.opcheck(
        torch.ops.modelbatch.philox4x32.default, (_words(2, 1, 4, gen=gen), _words(3, 2, gen=gen))
    )
