"""modelbatch::batched_dropout (the C++ CPU kernel) against the pure-torch reference,
and modelbatch::dropout (the per-model op whose vmap rule calls it).

The kernel must keep exactly the elements the reference keeps (the decisions are
integer comparisons of Philox words) and compute the same values (x * m, then + b,
in the same precision), whatever the shape, layout, dtype, stream position, batch
composition, thread count and vector ISA of the Philox kernel.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from modelbatch.ops import dropout as D

OP = torch.ops.modelbatch.batched_dropout
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
PS = [0.0, 0.1, 0.5, 0.9, 1.0]
# (N, per-model shape, repeats > 1 dividing its size)
CASES = [
    (1, (1,), []),
    (3, (5,), [5]),
    (7, (3, 7), [7, 21]),
    (3, (2, 3, 5, 5), [3, 25, 150]),
    (2, (1000,), [8]),  # several vectors of Philox blocks, a partial last one
    (1, (5000,), [2]),  # more than one tile of decisions
]


def _streams(n, seed=0):
    """Seeds of both signs (the high key word is set) and offsets that carry into
    the high counter word (2**32 - 2), wrap around 2**64 (-1) or overflow int64."""
    g = torch.Generator().manual_seed(seed)
    seeds = torch.randint(-(2**63), 2**63 - 1, (n,), generator=g)
    seeds[0] = -(2**40) - 3
    offsets = torch.tensor([2**32 - 2, -1, 2**63 - 1, 0, 12345, 2**33, 7] * n)[:n]
    return seeds, offsets


def _x(n, shape, dtype, seed=0):
    """Inputs with no zeros and both signs, so out == 0 marks exactly the dropped ones."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n, *shape), generator=g) + 0.5
    return (x * torch.where(torch.rand(x.shape, generator=g) < 0.5, -1.0, 1.0)).to(dtype)


def _assert_same(out, ref, x, kind, grad):
    assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous()
    if kind == D.DROPOUT or grad:
        assert torch.equal(out == 0, ref == 0)  # the same dropped elements
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, shape, repeats", CASES)
def test_matches_reference(n, shape, repeats, dtype):
    x = _x(n, shape, dtype)
    seeds, offsets = _streams(n)
    for repeat, kind, grad, p in itertools.product([1, *repeats], (0, 1), (False, True), PS):
        out = OP(x, seeds, offsets, p, repeat, kind, grad)
        ref = D.reference(x, seeds, offsets, p, repeat, kind, grad)
        _assert_same(out, ref, x, kind, grad)


@pytest.mark.parametrize("isa", ["avx512", "avx2", "scalar"])
def test_philox_kernels_agree(isa, monkeypatch):
    """MODELBATCH_PHILOX_ISA caps the Philox stream kernel (AVX-512, AVX2, scalar);
    the three give the same words. On a CPU without the ISA, the widest it has runs."""
    monkeypatch.setenv("MODELBATCH_PHILOX_ISA", isa)
    n, e = 5, 3001  # not a multiple of any vector width or tile
    x = _x(n, (e,), torch.float32)
    seeds, offsets = _streams(n, seed=1)
    offsets[3] = 2**32 - 37  # the low counter word wraps inside a vector of blocks
    for repeat, p in [(1, 0.5), (1, 0.1), (3001, 0.5)]:
        out = OP(x, seeds, offsets, p, repeat, 0, False)
        assert torch.equal(out, D.reference(x, seeds, offsets, p, repeat, 0, False))


def test_non_contiguous_input():
    base = _x(3, (7, 6, 5), torch.float32)
    seeds, offsets = _streams(3)
    for x in (base.transpose(1, 3), base[:, ::2], base.permute(2, 0, 1, 3)[1:3]):
        assert not x.is_contiguous()
        for p, repeat, kind in [(0.5, 1, 0), (0.3, x[0].numel() // 3, 1), (0.0, 1, 0), (1.0, 1, 1)]:
            s, o = seeds[: x.shape[0]], offsets[: x.shape[0]]
            out = OP(x, s, o, p, repeat, kind, False)
            assert out.is_contiguous()
            torch.testing.assert_close(
                out, D.reference(x, s, o, p, repeat, kind, False), rtol=0, atol=0
            )
            assert torch.equal(out, OP(x.contiguous(), s, o, p, repeat, kind, False))


def test_special_values_and_empty():
    x = torch.tensor([[float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1.0, -2.0, 3.0]])
    seeds, offsets = torch.tensor([3]), torch.tensor([0])
    for p, kind, grad in itertools.product(PS, (0, 1), (False, True)):
        out = OP(x, seeds, offsets, p, 1, kind, grad)
        ref = D.reference(x, seeds, offsets, p, 1, kind, grad)
        torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(out.signbit(), ref.signbit())  # -0.0 stays -0.0
    for shape in [(0, 4), (3, 0), (2, 0, 5)]:
        x = torch.randn(shape)
        s, o = torch.zeros(shape[0], dtype=torch.long), torch.zeros(shape[0], dtype=torch.long)
        assert OP(x, s, o, 0.5, 1, 0, False).shape == shape


def test_model_results_do_not_depend_on_the_batch():
    x = _x(3, (4, 33), torch.float32)
    seeds, offsets = _streams(3)
    for repeat, kind in [(1, 0), (33, 0), (1, 1)]:
        full = OP(x, seeds, offsets, 0.4, repeat, kind, False)
        alone = OP(x[2:], seeds[2:], offsets[2:], 0.4, repeat, kind, False)
        assert torch.equal(alone[0], full[2])
        perm = torch.tensor([2, 0, 1])
        permuted = OP(x[perm], seeds[perm], offsets[perm], 0.4, repeat, kind, False)
        assert torch.equal(permuted, full[perm])


def test_same_result_on_one_and_two_threads():
    x = _x(3, (70_000,), torch.float32)  # several work items per model
    seeds, offsets = _streams(3)
    before = torch.get_num_threads()
    try:
        for repeat in (1, 7):
            torch.set_num_threads(1)
            one = OP(x, seeds, offsets, 0.3, repeat, 1, False)
            torch.set_num_threads(2)
            two = OP(x, seeds, offsets, 0.3, repeat, 1, False)
            assert torch.equal(one, two)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("kind", [0, 1])
@pytest.mark.parametrize("repeat", [1, 6])
def test_gradient_equals_reference_gradient(kind, repeat):
    x = _x(3, (4, 6), torch.float64).requires_grad_()
    seeds, offsets = _streams(3)
    g = torch.randn(x.shape, dtype=torch.float64)
    for p in (0.0, 0.3, 1.0):
        (got,) = torch.autograd.grad(D.batched_dropout(x, seeds, offsets, p, repeat, kind), x, g)
        (exp,) = torch.autograd.grad(D.reference(x, seeds, offsets, p, repeat, kind, False), x, g)
        torch.testing.assert_close(got, exp, rtol=0, atol=0)
        # the backward is the grad=True map of the output gradient
        assert torch.equal(got, OP(g, seeds, offsets, p, repeat, kind, True))
    torch.autograd.gradcheck(
        lambda t: D.batched_dropout(t, seeds, offsets, 0.3, repeat, kind), (x,)
    )


def test_opcheck():
    seeds, offsets = _streams(3)
    for x in (_x(3, (4, 6), torch.float64), _x(3, (6, 4), torch.float32).transpose(1, 2)):
        for args in [(0.3, 1, 0, False), (0.3, 8, 1, False), (0.5, 2, 1, True), (0.0, 1, 0, False)]:
            torch.library.opcheck(OP.default, (x.requires_grad_(), seeds, offsets, *args))
            x = x.detach()
    x = _x(1, (4, 6), torch.float32)[0]
    torch.library.opcheck(
        torch.ops.modelbatch.dropout.default,
        (x.requires_grad_(), seeds[0], offsets[0], 0.3, 1, 0, False),
    )


@pytest.mark.parametrize("kind", [0, 1])
def test_per_model_op_under_vmap_equals_batched(kind):
    x = _x(4, (3, 8), torch.float32).requires_grad_()
    seeds, offsets = _streams(4)
    fn = lambda xi, si, oi: D.dropout(xi, si, oi, 0.3, 8, kind, False)
    out = torch.vmap(fn)(x, seeds, offsets)
    ref = OP(x, seeds, offsets, 0.3, 8, kind, False)
    assert torch.equal(out, ref)
    g = torch.randn(x.shape)
    (g1,) = torch.autograd.grad(out, x, g)
    (g2,) = torch.autograd.grad(ref, x, g)
    assert torch.equal(g1, g2)
    # a tensor shared by all models (in_dims None): each model still draws its own mask
    shared = x[0].detach()
    out = torch.vmap(fn, in_dims=(None, 0, 0))(shared, seeds, offsets)
    assert torch.equal(out, OP(shared.expand(4, 3, 8), seeds, offsets, 0.3, 8, kind, False))
    # outside vmap, one model
    assert torch.equal(D.dropout(x[1], seeds[1], offsets[1], 0.3, 8, kind, False), ref[1])


def test_torch_compile_forward_and_backward():
    x = _x(3, (5, 8), torch.float32)
    seeds, offsets = _streams(3)
    g = torch.randn(x.shape)

    def fn(x, seeds, offsets):
        y = D.batched_dropout(x, seeds, offsets, 0.25, 8, 1) * 2.0
        (gx,) = torch.autograd.grad(y, x, g)
        return y.detach(), gx

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    eager = fn(x.clone().requires_grad_(), seeds, offsets)
    # torch.autograd.grad inside a fullgraph region needs Dynamo's autograd tracing.
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        got = compiled(x.clone().requires_grad_(), seeds, offsets)
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    # a compiled forward, differentiated outside
    fwd = torch.compile(lambda x: D.batched_dropout(x, seeds, offsets, 0.5, 1, 0), fullgraph=True)
    xr = x.clone().requires_grad_()
    y = fwd(xr)
    (gx,) = torch.autograd.grad(y, xr, g)
    assert torch.equal(y, OP(x, seeds, offsets, 0.5, 1, 0, False))
    assert torch.equal(gx, OP(g, seeds, offsets, 0.5, 1, 0, True))


def test_bad_inputs():
    x = torch.randn(3, 4)
    s, o = torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long)
    bad = [
        ((x.int(), s, o, 0.5, 1, 0), "x must be float32, float64, float16 or bfloat16"),
        ((x.to(torch.complex64), s, o, 0.5, 1, 0), "x must be float32, float64, float16"),
        ((torch.tensor(1.0), s, o, 0.5, 1, 0), r"leading model axis \[N, \.\.\.\]"),
        ((x, s[:2], o, 0.5, 1, 0), r"seeds must be int64 \[N=3\]"),
        ((x, s.int(), o, 0.5, 1, 0), r"seeds must be int64 \[N=3\]"),
        ((x, s.view(3, 1), o, 0.5, 1, 0), r"seeds must be int64 \[N=3\]"),
        ((x, s, o.double(), 0.5, 1, 0), r"offsets must be int64 \[N=3\]"),
        ((x, s, o, 1.5, 1, 0), "dropout probability has to be between 0 and 1"),
        ((x, s, o, -0.1, 1, 0), "dropout probability has to be between 0 and 1"),
        ((x, s, o, math.nan, 1, 0), "dropout probability has to be between 0 and 1"),
        ((x, s, o, 0.5, 3, 0), "repeat=3 must be >= 1 and divide the per-model size 4"),
        ((x, s, o, 0.5, 0, 0), "repeat=0 must be >= 1"),
        ((x, s, o, 0.5, 1, 2), r"kind must be 0 \(dropout\) or 1 \(alpha\), got 2"),
    ]
    for args, msg in bad:
        with pytest.raises(ValueError, match=msg):
            OP(*args, False)
        with pytest.raises(ValueError, match=msg):
            D.reference(*args, False)


# ---------------------------------------------------------------------------
# Statistics (2**20 decisions each: a standard error of ~5e-4 on a rate)

STAT = 1 << 20


def _mask(seeds, offsets, p, n_elems=STAT):
    x = torch.ones(len(seeds), n_elems)
    return (OP(x, seeds, offsets, p, 1, 0, False) != 0).double()


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate(p):
    keep = _mask(torch.tensor([17]), torch.tensor([0]), p)
    assert abs(keep.mean().item() - (1 - p)) < 0.002
    # feature dropout: one decision per `repeat` elements, same rate
    x = torch.ones(1, STAT * 4)
    keep = (OP(x, torch.tensor([5]), torch.tensor([0]), p, 4, 0, False) != 0).view(-1, 4)
    assert torch.equal(keep.all(1), keep.any(1))  # whole groups kept or dropped
    assert abs(keep[:, 0].double().mean().item() - (1 - p)) < 0.002


def _corr(a, b):
    return torch.corrcoef(torch.stack([a, b]))[0, 1].item()


def test_masks_are_uncorrelated():
    # neighbouring seeds, same offsets
    m = _mask(torch.tensor([0, 1]), torch.tensor([0, 0]), 0.5)
    assert abs(_corr(m[0], m[1])) < 0.01
    # consecutive calls of one model: the offset advances by the blocks consumed
    a = _mask(torch.tensor([9]), torch.tensor([0]), 0.5)[0]
    b = _mask(torch.tensor([9]), torch.tensor([D.blocks(STAT)]), 0.5)[0]
    assert abs(_corr(a, b)) < 0.01
    # and adjacent decisions of one stream
    assert abs(_corr(a[:-1], a[1:])) < 0.01
