"""The Triton kernels of ``modelbatch::philox4x32`` and ``modelbatch::batched_dropout``
(``kernels/philox.py``, ``kernels/dropout.py``) against the pure-torch references.

Without a GPU they run in Triton's interpreter on CPU tensors (``triton_device``
is then "cpu"), so the shapes are small.

* Philox: bit-identical with ``modelbatch.ops.philox.reference`` (random and
  extreme words, Random123's known answers, broadcasting), and the stream
  layout is that of Triton's own ``tl.randint4x(seed, offset)``.
* Dropout: exactly the reference's masks and values over odd shapes, every
  dtype, both kinds, forward and grad, seeds and offsets at the edges of their
  64 bits; one launch for all models whatever the grid's orientation.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import triton
import triton.language as tl
from modelbatch.kernels import dropout as triton_dropout
from modelbatch.kernels import philox as triton_philox
from modelbatch.ops import dropout as dropout_ref
from modelbatch.ops import philox as philox_ref

U32 = 2**32 - 1
#: Seeds: negative ones (two's complement keys), both 64-bit extremes, a hi word.
SEEDS = [-5, 2**40 + 3, 11, -(2**63), 2**63 - 1]
#: Offsets: carries into the hi word, the uint64 wrap (-1 is 2**64 - 1), hi words.
OFFSETS = [U32 - 1, U32, 0, -1, 2**63 - 2]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _streams(n, device):
    seeds = torch.tensor(SEEDS[:n], dtype=torch.int64, device=device)
    offsets = torch.tensor(OFFSETS[:n], dtype=torch.int64, device=device)
    return seeds, offsets


# --------------------------------------------------------------------------
# Philox
# --------------------------------------------------------------------------


def test_philox_matches_reference(triton_device):
    g = torch.Generator().manual_seed(0)
    counter = torch.randint(0, 2**32, (3000, 4), generator=g)
    key = torch.randint(0, 2**32, (3000, 2), generator=g)
    # Extremes: all-zero and all-ones words, mixed per word.
    counter[:8] = 0
    counter[8:16] = U32
    counter[16:32] = torch.tensor(list(itertools.product((0, U32), repeat=4)))
    key[:4] = 0
    key[4:12] = U32
    key[12:20] = torch.tensor([U32, 0])
    got = triton_philox.philox4x32(counter.to(triton_device), key.to(triton_device))
    assert got.dtype == torch.int64 and got.shape == (3000, 4) and got.is_contiguous()
    assert torch.equal(got.cpu(), philox_ref.reference(counter, key))


@pytest.mark.parametrize(
    ("counter", "key", "expected"),
    [
        ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
        ([U32] * 4, [U32] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
        (
            [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344],
            [0xA4093822, 0x299F31D0],
            [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1],
        ),
    ],
    ids=["zeros", "ones", "pi"],
)
def test_philox_known_answers(triton_device, counter, key, expected):
    """Random123's known-answer vectors for Philox4x32-10."""
    c = torch.tensor(counter, dtype=torch.int64, device=triton_device)
    k = torch.tensor(key, dtype=torch.int64, device=triton_device)
    assert triton_philox.philox4x32(c, k).tolist() == expected


@pytest.mark.parametrize(
    ("cshape", "kshape"),
    [((3, 1, 4), (5, 2)), ((2, 6, 4), (2,)), ((4,), (7, 2)), ((0, 4), (2,)), ((2, 3, 4), (3, 2))],
)
def test_philox_broadcast(triton_device, cshape, kshape):
    g = torch.Generator().manual_seed(1)
    counter = torch.randint(0, 2**32, cshape, generator=g)
    key = torch.randint(0, 2**32, kshape, generator=g)
    want = philox_ref.reference(counter, key)
    got = triton_philox.philox4x32(counter.to(triton_device), key.to(triton_device))
    assert got.shape == want.shape and torch.equal(got.cpu(), want)


def test_philox_strided_inputs(triton_device):
    """Non-contiguous inputs whose rows do not merge into one stride are copied."""
    g = torch.Generator().manual_seed(2)
    counter = torch.randint(0, 2**32, (3, 10, 8), generator=g)[:, ::3, 1::2]
    key = torch.randint(0, 2**32, (4, 2), generator=g).t().contiguous().t()[:1]
    want = philox_ref.reference(counter, key)
    got = triton_philox.philox4x32(counter.to(triton_device), key.to(triton_device))
    assert torch.equal(got.cpu(), want)


def test_philox_bad_input(triton_device):
    c = torch.zeros(3, 4, dtype=torch.int64, device=triton_device)
    k = torch.zeros(2, dtype=torch.int64, device=triton_device)
    with pytest.raises(ValueError, match="int64"):
        triton_philox.philox4x32(c.int(), k)
    with pytest.raises(ValueError, match="int64"):
        triton_philox.philox4x32(c, k.int())
    with pytest.raises(ValueError, match=r"\[\.\.\., 4\]"):
        triton_philox.philox4x32(c[:, :3], k)
    with pytest.raises(ValueError, match=r"\[\.\.\., 2\]"):
        triton_philox.philox4x32(c, torch.zeros(3, dtype=torch.int64, device=triton_device))
    with pytest.raises(RuntimeError):  # shapes that do not broadcast
        triton_philox.philox4x32(c, torch.zeros(2, 2, dtype=torch.int64, device=triton_device))


@triton.jit
def _randint4x_kernel(seeds_ptr, offsets_ptr, out_ptr, BLOCKS: tl.constexpr):
    """Model ``program_id(0)``'s first ``4 * BLOCKS`` words from ``tl.randint4x``."""
    n = tl.program_id(0)
    seed = tl.load(seeds_ptr + n)
    offset = tl.load(offsets_ptr + n) + tl.arange(0, BLOCKS)  # int64 block counters
    r0, r1, r2, r3 = tl.randint4x(seed, offset)
    base = out_ptr + n * 4 * BLOCKS + 4 * tl.arange(0, BLOCKS)
    tl.store(base, r0.to(tl.uint32, bitcast=True).to(tl.int64))
    tl.store(base + 1, r1.to(tl.uint32, bitcast=True).to(tl.int64))
    tl.store(base + 2, r2.to(tl.uint32, bitcast=True).to(tl.int64))
    tl.store(base + 3, r3.to(tl.uint32, bitcast=True).to(tl.int64))


def test_stream_layout_is_triton_randint4x(triton_device):
    """Word j of a model's stream is word j % 4 of ``tl.randint4x(seed, offset + j // 4)``."""
    blocks = 8
    seeds, offsets = _streams(5, triton_device)
    out = torch.empty(5, 4 * blocks, dtype=torch.int64, device=triton_device)
    _randint4x_kernel[(5,)](seeds, offsets, out, BLOCKS=blocks)
    want = philox_ref.stream(seeds.cpu(), offsets.cpu(), 4 * blocks)
    assert torch.equal(out.cpu(), want)


# --------------------------------------------------------------------------
# Dropout
# --------------------------------------------------------------------------

#: (N, per-model shape, repeat): odd sizes, partial Philox blocks, repeat 1 and > 1
#: (a whole model, one decision per channel, a non-power-of-two run). The
#: interpreter is slow, so dtypes other than float32 run the second half only.
CASES = [
    (1, (1,), 1),
    (3, (7,), 7),
    (5, (3, 5), 1),
    (3, (2, 3, 4, 4), 16),
    (3, (7,), 1),
    (5, (3, 5), 5),
    (3, (2, 3, 4, 4), 1),
    (1, (2, 3, 4, 4), 3),
]


def _x(n, shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn((n, *shape), generator=g) * 3).to(dtype)


def _check(x, seeds, offsets, p, repeat, kind, grad, device):
    want = dropout_ref.reference(x, seeds, offsets, p, repeat, kind, grad)
    got = triton_dropout.batched_dropout(
        x.to(device), seeds.to(device), offsets.to(device), p, repeat, kind, grad
    )
    assert got.dtype == x.dtype and got.shape == x.shape and got.is_contiguous()
    # Same masks, and values exactly (no contraction of the alpha case's x * m + b).
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_dropout_matches_reference(triton_device, dtype, p):
    cases = CASES if dtype == torch.float32 else CASES[4:]
    for i, (n, shape, repeat) in enumerate(cases):
        x = _x(n, shape, dtype, i)
        seeds, offsets = _streams(n, "cpu")
        for kind, grad in itertools.product((0, 1), (False, True)):
            _check(x, seeds, offsets, p, repeat, kind, grad, triton_device)


def test_dropout_masks(triton_device):
    """The dropped positions are exactly the reference's, including a stream whose
    counters carry from the lo into the hi word within the call."""
    n, f, repeat = 5, 37, 3
    seeds, offsets = _streams(n, "cpu")
    offsets[2] = U32 - 3  # blocks U32 - 3 .. U32 + 6: carries mid-call
    x = torch.ones(n, f * repeat)
    for p in (0.1, 0.5, 0.9, 1e-9, 1 - 1e-9):
        got = triton_dropout.batched_dropout(
            x.to(triton_device),
            seeds.to(triton_device),
            offsets.to(triton_device),
            p,
            repeat,
            0,
            True,
        ).cpu()
        keep = dropout_ref.keep_mask(seeds, offsets, f, p)
        assert torch.equal(got != 0, keep.repeat_interleave(repeat, dim=1))


def test_dropout_threshold_boundary(triton_device):
    """A word whose top 24 bits equal the threshold keeps its element; one below drops it."""
    seeds, offsets = _streams(1, "cpu")
    top = int(philox_ref.stream(seeds, offsets, 1)[0, 0]) >> 8
    x = torch.ones(1, 4, device=triton_device)
    s, o = seeds.to(triton_device), offsets.to(triton_device)
    for t, kept in ((top, True), (top + 1, False)):
        p = t / 2**24
        assert dropout_ref.threshold(p) == t
        out = triton_dropout.batched_dropout(x, s, o, p, 1, 0, True).cpu()
        assert bool(out[0, 0] != 0) == kept
        _check(x.cpu(), seeds, offsets, p, 1, 0, True, triton_device)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_dropout_special_values(triton_device):
    """inf and NaN inputs: dropped elements become x * 0 (NaN), as in the reference."""
    x = torch.tensor([[1.0, float("inf"), float("nan"), -float("inf"), -0.0, 3.0] * 4] * 2)
    seeds, offsets = _streams(2, "cpu")
    for kind, grad in itertools.product((0, 1), (False, True)):
        _check(x, seeds, offsets, 0.5, 1, kind, grad, triton_device)
        _check(x, seeds, offsets, 0.5, 2, kind, grad, triton_device)


def test_dropout_shortcuts(triton_device):
    """p == 0, p == 1 and empty inputs launch nothing and return new contiguous tensors."""
    x = _x(3, (4, 6), torch.float32, 0).transpose(1, 2).to(triton_device)
    seeds, offsets = _streams(3, triton_device)
    same = triton_dropout.batched_dropout(x, seeds, offsets, 0.0, 1, 0, False)
    assert same.is_contiguous() and torch.equal(same, x) and same.data_ptr() != x.data_ptr()
    zero = triton_dropout.batched_dropout(x, seeds, offsets, 1.0, 2, 1, False)
    assert zero.is_contiguous() and torch.equal(zero, x * 0)
    for empty in (torch.empty(3, 0, 5), torch.empty(0, 4)):
        s, o = _streams(empty.shape[0], triton_device)
        out = triton_dropout.batched_dropout(empty.to(triton_device), s, o, 0.5, 1, 0, False)
        assert out.shape == empty.shape


def test_dropout_non_contiguous(triton_device):
    """Strided x, seeds and offsets are read as their contiguous copies."""
    x = _x(3, (6, 5), torch.float32, 3).transpose(1, 2)
    seeds = torch.tensor(SEEDS[:3] * 2)[::2]
    offsets = torch.tensor(OFFSETS[:3] * 2)[::2]
    for repeat in (1, 6):
        _check(x, seeds, offsets, 0.3, repeat, 0, False, triton_device)


class _Launches:
    """Replace the kernel by a recorder of grids (same class name, so the
    interpreter is still detected) that launches the real one."""

    def __init__(self, kernel):
        self.grids, self.meta = [], []

        def getitem(_, grid):
            def launch(*args, **kwargs):
                self.grids.append(grid)
                self.meta.append(kwargs)
                return kernel[grid](*args, **kwargs)

            return launch

        self.fake = type(type(kernel).__name__, (), {"__getitem__": getitem})()


@pytest.mark.parametrize("int64_index", [False, True], ids=["int32", "int64"])
def test_dropout_launch_geometry(triton_device, monkeypatch, int64_index):
    """Several programs per model, grid orientation both ways, 64-bit offsets:
    always one launch for all models."""
    rec = _Launches(triton_dropout._dropout_kernel)
    monkeypatch.setattr(triton_dropout, "_dropout_kernel", rec.fake)
    monkeypatch.setattr(triton_dropout, "BLOCK", 2)  # 8 decisions per program
    monkeypatch.setattr(triton_dropout, "TILE", 32)
    monkeypatch.setattr(triton_dropout, "MAX_REP_TILE", 4)
    if int64_index:
        monkeypatch.setattr(triton_dropout, "INT64_INDEX_FROM", 0)
    # (N, per-model shape, repeat, expected grid)
    cases = [
        (3, (41,), 1, (6, 3)),  # 11 Philox blocks per model: 6 programs of 2 blocks
        (2, (40, 10), 10, (5, 2)),  # runs of 10 in tiles of 4: 2 blocks per program
        (5, (9,), 3, (5, 1)),  # more models than programs per model: models on axis 0
        (2, (20, 7), 7, (3, 2)),  # runs of 7 over two tiles of 4 (the second partly masked)
    ]
    for i, (n, shape, repeat, grid) in enumerate(cases):
        x = _x(n, shape, torch.float32, 10 + i)
        seeds, offsets = _streams(n, "cpu")
        for kind, grad in ((0, False), (1, False)):
            rec.grids.clear()
            rec.meta.clear()
            _check(x, seeds, offsets, 0.5, repeat, kind, grad, triton_device)
            assert rec.grids == [grid]
            assert rec.meta[0]["INT64"] == int64_index
            assert rec.meta[0]["MODELS_ON_0"] == (grid[0] == n and n > grid[1])


def test_dropout_bad_input(triton_device):
    dev = triton_device
    x = torch.zeros(3, 6, device=dev)
    seeds, offsets = _streams(3, dev)
    bad = [
        (x.int(), seeds, offsets, 0.5, 1, 0),  # not floating point
        (torch.zeros((), device=dev), seeds[:0], offsets[:0], 0.5, 1, 0),  # no model axis
        (x, seeds.int(), offsets, 0.5, 1, 0),  # seeds not int64
        (x, seeds[:2], offsets, 0.5, 1, 0),  # seeds not [N]
        (x, seeds, offsets.view(3, 1), 0.5, 1, 0),  # offsets not [N]
        (x, seeds, offsets, -0.1, 1, 0),  # p out of range
        (x, seeds, offsets, 1.5, 1, 0),
        (x, seeds, offsets, 0.5, 0, 0),  # repeat < 1
        (x, seeds, offsets, 0.5, 4, 0),  # repeat does not divide 6
        (x, seeds, offsets, 0.5, 1, 2),  # unknown kind
    ]
    for args in bad:
        with pytest.raises(ValueError):
            triton_dropout.batched_dropout(*args, False)
    if dev == "cpu":  # under the interpreter the kernel refuses non-CPU tensors
        return
    with pytest.raises(ValueError):
        triton_dropout.batched_dropout(x.cpu(), seeds.cpu(), offsets.cpu(), 0.5, 1, 0, False)
    with pytest.raises(ValueError):
        triton_dropout.batched_dropout(x, seeds.cpu(), offsets, 0.5, 1, 0, False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the ops dispatch to Triton on CUDA")
def test_cuda_ops_dispatch_to_triton():
    """``torch.ops.modelbatch`` on CUDA tensors runs these kernels."""
    g = torch.Generator().manual_seed(4)
    counter = torch.randint(0, 2**32, (100, 4), generator=g)
    key = torch.randint(0, 2**32, (100, 2), generator=g)
    got = torch.ops.modelbatch.philox4x32(counter.cuda(), key.cuda())
    assert torch.equal(got.cpu(), philox_ref.reference(counter, key))
    x = _x(3, (4, 5, 6), torch.float32, 4)
    seeds, offsets = _streams(3, "cpu")
    want = dropout_ref.reference(x, seeds, offsets, 0.2, 30, 1, False)
    got = dropout_ref.batched_dropout(x.cuda(), seeds.cuda(), offsets.cuda(), 0.2, 30, 1, False)
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0)
