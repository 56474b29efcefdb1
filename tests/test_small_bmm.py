"""modelbatch::small_bmm (the C++ CPU kernel) against its pure-torch reference.

The kernel picks among several code paths per call (normal / transposed /
dot-product orientation, operands read in place or packed, shared operands packed
once, models split into row chunks when there are fewer models than threads, and
AVX-512 or AVX2 kernels), so the shapes and layouts below are chosen to reach all
of them. float32 results are compared with a float64 reference within the error
bound of a K-term dot product (the kernel sums in another order than MKL).
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from modelbatch.ops.small_bmm import reference, small_bmm

OP = torch.ops.modelbatch.small_bmm
SIZES = [1, 3, 16, 17, 31, 32, 33, 64, 100]
EPS = {torch.float32: torch.finfo(torch.float32).eps, torch.float64: torch.finfo(torch.float64).eps}


def _operands(n, m, k, p, ta, tb, bias, dtype, gen):
    a = torch.randn(*((n, k, m) if ta else (n, m, k)), generator=gen, dtype=dtype)
    b = torch.randn(*((n, p, k) if tb else (n, k, p)), generator=gen, dtype=dtype)
    c = torch.randn(n, p, generator=gen, dtype=dtype) if bias else None
    return a, b, c


def _check(a, b, ta, tb, bias, out=None):
    """out (computed if None) against the float64 reference, within the rounding bound."""
    if out is None:
        out = OP(a, b, ta, tb, bias)
    d = torch.float64
    ref = reference(a.to(d), b.to(d), ta, tb, None if bias is None else bias.to(d))
    assert out.shape == ref.shape and out.dtype == a.dtype and out.is_contiguous()
    # |error| <= ~K * eps * (|op(a)| @ |op(b)| + |bias|) for any summation order.
    mag = reference(
        a.to(d).abs(), b.to(d).abs(), ta, tb, None if bias is None else bias.to(d).abs()
    )
    k = a.shape[1] if ta else a.shape[2]
    bound = 2 * (k + 2) * EPS[a.dtype] * mag + 1e-30
    err = (out.to(d) - ref).abs()
    assert torch.all(err <= bound), (
        f"max error {err.max().item():.3g}, bound {bound.max().item():.3g}"
    )


def test_registered_for_cpu_and_cuda():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("modelbatch::small_bmm", "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("modelbatch::small_bmm", "CUDA")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_odd_shapes_all_layouts(dtype):
    gen = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    shapes = rng.sample(list(itertools.product(SIZES, SIZES, SIZES)), 60)
    shapes += [(32, 32, 32), (32, 16, 32), (32, 32, 4), (1, 100, 1), (100, 1, 100), (64, 100, 1)]
    for i, (m, k, p) in enumerate(shapes):
        n = (1, 3, 7)[i % 3]
        for ta, tb, bias in itertools.product((False, True), repeat=3):
            a, b, c = _operands(n, m, k, p, ta, tb, bias, dtype, gen)
            _check(a, b, ta, tb, c)


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_vector_isas(isa, dtype, monkeypatch):
    # MODELBATCH_SMALL_BMM_ISA=avx2 runs the AVX2 kernels on an AVX-512 CPU.
    if isa == "avx2":
        monkeypatch.setenv("MODELBATCH_SMALL_BMM_ISA", "avx2")
    gen = torch.Generator().manual_seed(1)
    for m, k, p in [(17, 33, 31), (32, 32, 32), (5, 70, 3), (64, 20, 1), (128, 64, 10), (3, 9, 40)]:
        for ta, tb in itertools.product((False, True), repeat=2):
            a, b, c = _operands(3, m, k, p, ta, tb, True, dtype, gen)
            _check(a, b, ta, tb, c)


def test_larger_shapes_packed_and_row_chunks():
    # K rows spanning > 16 KB are packed; one model on two threads is split into row
    # chunks; a shared (expanded) operand that needs packing is packed once.
    gen = torch.Generator().manual_seed(2)
    for n, m, k, p in [(2, 130, 129, 70), (1, 200, 64, 150), (3, 96, 200, 33)]:
        for ta, tb in itertools.product((False, True), repeat=2):
            a, b, c = _operands(n, m, k, p, ta, tb, True, torch.float32, gen)
            _check(a, b, ta, tb, c)
            _check(a[:1].expand_as(a), b, ta, tb, c)
            _check(a, b[:1].expand_as(b), ta, tb, None)


def test_expanded_and_strided_inputs():
    gen = torch.Generator().manual_seed(3)
    n, m, k, p = 5, 33, 20, 17
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, p, k, generator=gen)
    bias = torch.randn(n, p, generator=gen)
    # The first layer's forward: a shared input, broadcast with batch stride 0.
    _check(x.expand(n, m, k), w, False, True, bias)
    _check(x.t().expand(n, k, m), w, True, True, None)
    _check(x.expand(n, m, k), w.transpose(1, 2).contiguous(), False, False, bias)
    # A shared weight, a shared bias.
    _check(
        torch.randn(n, m, k, generator=gen),
        w[:1].expand(n, p, k),
        False,
        True,
        bias[:1].expand(n, p),
    )
    # Non-contiguous views: every other element, transposed views, a permuted batch.
    big = torch.randn(n, 2 * m, 3 * k, generator=gen)
    a = big[:, ::2, 1::3]
    assert not a.is_contiguous()
    _check(a, w, False, True, bias[:, :])
    _check(a, w.transpose(1, 2), False, False, bias)  # op(b) = W^T stored as W
    _check(a.transpose(1, 2), w, True, True, None)
    _check(a, torch.randn(p, n, k, generator=gen).permute(1, 0, 2), False, True, None)
    _check(a, w[:, :, :].transpose(1, 2)[:, :, ::2].contiguous()[:, :, :], False, False, None)
    # Both operands strided along both dims (Y gathered element by element).
    _check(a, torch.randn(n, 2 * k, 3 * p, generator=gen)[:, ::2, ::3], False, False, bias)
    # A strided bias and inputs whose only element along a dim has an odd stride.
    _check(a, w, False, True, torch.randn(n, 2 * p, generator=gen)[:, ::2])
    _check(torch.randn(n, k, 1, generator=gen).transpose(1, 2), w, False, True, None)
    _check(a, torch.randn(n, k, 1, generator=gen), False, False, None)


def test_special_values_propagate_like_reference():
    # inf and nan in the last K elements: x @ W^T with one output runs the dot kernel,
    # whose last K vector overlaps the one before (K = 20) or is a padded copy (K = 15).
    gen = torch.Generator().manual_seed(4)
    for n, m, k, p, ta, tb in [
        (2, 64, 20, 1, False, True),
        (2, 16, 15, 1, False, True),
        (2, 9, 35, 17, False, False),
    ]:
        a, b, _ = _operands(n, m, k, p, ta, tb, False, torch.float32, gen)
        a[0, 1, k - 1] = float("inf")
        a[1, 2, k - 2] = float("nan")
        a[1, 3, 3] = float("-inf")
        out = OP(a, b, ta, tb, None)
        ref = reference(a.double(), b.double(), ta, tb, None).float()
        assert torch.equal(out.isnan(), ref.isnan())
        assert torch.equal(out.isinf(), ref.isinf())
        fin = ref.isfinite()
        torch.testing.assert_close(out[fin], ref[fin], rtol=1e-4, atol=1e-4)


def test_degenerate_sizes():
    bias = torch.randn(3, 4)
    out = OP(torch.randn(3, 5, 0), torch.randn(3, 0, 4), False, False, bias)
    torch.testing.assert_close(out, bias.unsqueeze(1).expand(3, 5, 4))
    assert OP(torch.randn(3, 0, 7), torch.randn(3, 7, 4), False, False, None).shape == (3, 0, 4)
    assert OP(torch.randn(0, 5, 7), torch.randn(0, 7, 4), False, False, None).shape == (0, 5, 4)


def test_bfloat16_falls_back_to_bmm():
    gen = torch.Generator().manual_seed(5)
    for ta, tb, bias in itertools.product((False, True), repeat=3):
        a, b, c = _operands(3, 17, 33, 20, ta, tb, bias, torch.bfloat16, gen)
        out = OP(a, b, ta, tb, c)
        assert out.dtype == torch.bfloat16 and out.is_contiguous()
        assert torch.equal(out, reference(a, b, ta, tb, c))


def test_size_limits_fall_back_to_bmm():
    gen = torch.Generator().manual_seed(6)
    # Past kMaxWork (2^24 multiply-adds per model), past kMaxK, below kMinWork: at::bmm
    # itself, bit for bit.
    for n, m, k, p in [(1, 257, 256, 256), (2, 2, 8193, 2), (5, 2, 2, 2)]:
        for tb in (False, True):
            a, b, c = _operands(n, m, k, p, False, tb, True, torch.float32, gen)
            assert torch.equal(OP(a, b, False, tb, c), reference(a, b, False, tb, c))
    # Just inside the limits: the kernel.
    a, b, c = _operands(1, 256, 256, 256, False, True, True, torch.float32, gen)
    _check(a, b, False, True, c)
    a, b, c = _operands(2, 3, 8192, 5, False, True, False, torch.float32, gen)
    _check(a, b, False, True, c)


def test_isa_none_is_bmm(monkeypatch):
    monkeypatch.setenv("MODELBATCH_SMALL_BMM_ISA", "none")
    a, b, c = _operands(4, 32, 32, 32, False, True, True, torch.float32, torch.Generator())
    assert torch.equal(OP(a, b, False, True, c), reference(a, b, False, True, c))


@pytest.mark.parametrize("n, m, k, p", [(7, 33, 31, 17), (1, 96, 40, 64), (3, 64, 48, 2)])
def test_same_result_on_one_and_two_threads(n, m, k, p):
    gen = torch.Generator().manual_seed(7)
    before = torch.get_num_threads()
    try:
        for ta, tb in itertools.product((False, True), repeat=2):
            a, b, c = _operands(n, m, k, p, ta, tb, True, torch.float32, gen)
            torch.set_num_threads(1)
            one = OP(a, b, ta, tb, c)
            torch.set_num_threads(2)
            two = OP(a, b, ta, tb, c)
            assert torch.equal(one, two)
    finally:
        torch.set_num_threads(before)


def test_errors():
    a, b = torch.randn(3, 4, 5), torch.randn(3, 5, 6)
    with pytest.raises(
        RuntimeError, match=r"b must be \[N, K, P\] = \[3, 5, P\], got shape \[3, 6, 6\]"
    ):
        OP(a, torch.randn(3, 6, 6), False, False, None)
    with pytest.raises(RuntimeError, match=r"b must be \[N, P, K\] = \[3, P, 5\]"):
        OP(a, b, False, True, None)
    with pytest.raises(RuntimeError, match=r"b must be \[N, K, P\] = \[3, 4, P\]"):
        OP(a, b, True, False, None)  # op(a) is [N, 5, 4]: K = 4
    with pytest.raises(
        RuntimeError, match=r"b must be \[N, K, P\] = \[3, 5, P\], got shape \[2, 5, 6\]"
    ):
        OP(a, torch.randn(2, 5, 6), False, False, None)
    with pytest.raises(RuntimeError, match=r"a must be 3-D, \[N, M, K\], got shape \[4, 5\]"):
        OP(torch.randn(4, 5), b, False, False, None)
    with pytest.raises(RuntimeError, match=r"b must be 3-D"):
        OP(a, torch.randn(5, 6), False, False, None)
    with pytest.raises(RuntimeError, match="same dtype"):
        OP(a, b.double(), False, False, None)
    with pytest.raises(RuntimeError, match=r"bias must be \[N, P\] = \[3, 6\], got shape \[3, 5\]"):
        OP(a, b, False, False, torch.randn(3, 5))
    with pytest.raises(RuntimeError, match=r"bias must be \[N, P\] = \[3, 6\], got shape \[6\]"):
        OP(a, b, False, False, torch.randn(6))
    with pytest.raises(RuntimeError, match="bias must have the dtype of a"):
        OP(a, b, False, False, torch.randn(3, 6, dtype=torch.float64))


def test_opcheck():
    gen = torch.Generator().manual_seed(8)
    for ta, tb, bias in [(False, True, True), (True, False, False), (False, False, True)]:
        a, b, c = _operands(3, 17, 20, 9, ta, tb, bias, torch.float32, gen)
        torch.library.opcheck(OP.default, (a, b, ta, tb, c))
    x = torch.randn(17, 20, generator=gen)
    w = torch.randn(3, 9, 20, generator=gen)
    torch.library.opcheck(OP.default, (x.expand(3, 17, 20), w, False, True, None))


def test_python_wrapper_defaults():
    a, b = torch.randn(2, 3, 40), torch.randn(2, 40, 5)
    torch.testing.assert_close(small_bmm(a, b), torch.bmm(a, b))
