"""modelbatch::batched_linear and modelbatch::linear against the pure-torch reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from modelbatch.ops import linear as lin

SHAPES = [(1, 1, 1, 1), (3, 5, 7, 2), (4, 17, 13, 9), (2, 1, 33, 65)]  # N, M, I, O


def _inputs(n, m, i, o, shared, bias, dtype=torch.float64):
    g = torch.Generator().manual_seed(n * 1000 + m * 10 + i)
    x = torch.randn(*(() if shared else (n,)), m, i, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(n, o, i, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(n, o, generator=g, dtype=dtype, requires_grad=True) if bias else None
    return x, w, b


def _grads(out, tensors, seed=0):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, [t for t in tensors if t is not None], g)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_batched_linear_matches_reference_forward_and_backward(shape, shared, bias):
    x, w, b = _inputs(*shape, shared, bias)
    out = lin.batched_linear(x, w, b, shared)
    ref = lin.reference(x, w, b, shared)
    assert out.shape == ref.shape == (shape[0], shape[1], shape[3]) and out.is_contiguous()
    torch.testing.assert_close(out, ref)
    for got, exp in zip(_grads(out, (x, w, b)), _grads(ref, (x, w, b))):
        torch.testing.assert_close(got, exp)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_batched_linear_low_precision(dtype, tol):
    x, w, b = _inputs(3, 6, 10, 4, False, True, dtype=dtype)
    out = lin.batched_linear(x, w, b, False)
    ref = lin.reference(x.double(), w.double(), b.double(), False)
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * 4)


@pytest.mark.parametrize("shared", [True, False])
def test_linear_under_vmap_matches_f_linear(shared):
    n, i, o = 3, 6, 5
    x = torch.randn(*(() if shared else (n,)), 2, 4, i, dtype=torch.float64, requires_grad=True)
    w = torch.randn(n, o, i, dtype=torch.float64, requires_grad=True)
    b = torch.randn(n, o, dtype=torch.float64, requires_grad=True)
    in_dims = (None if shared else 0, 0, 0)
    ours = torch.vmap(torch.ops.modelbatch.linear, in_dims=in_dims)(x, w, b)
    ref = torch.vmap(F.linear, in_dims=in_dims)(x, w, b)
    assert ours.shape == (n, 2, 4, o)
    torch.testing.assert_close(ours, ref)
    for got, exp in zip(_grads(ours, (x, w, b)), _grads(ref, (x, w, b))):
        torch.testing.assert_close(got, exp)


def test_linear_vmap_with_unbatched_weight_and_batch_dim_not_first():
    x = torch.randn(4, 3, 6, dtype=torch.float64)  # batch dim 1
    w = torch.randn(5, 6, dtype=torch.float64)
    out = torch.vmap(torch.ops.modelbatch.linear, in_dims=(1, None, None))(x, w, None)
    torch.testing.assert_close(out, F.linear(x.movedim(1, 0), w))
    wb = torch.randn(5, 6, 3, dtype=torch.float64)  # [O, I, N]: model dim last
    out = torch.vmap(torch.ops.modelbatch.linear, in_dims=(None, 2, None))(x[:, 0], wb, None)
    torch.testing.assert_close(out, torch.stack([F.linear(x[:, 0], wb[..., k]) for k in range(3)]))


def test_unbatched_linear_backward():
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    out = torch.ops.modelbatch.linear(x, w, b)
    ref = F.linear(x, w, b)
    torch.testing.assert_close(out, ref)
    for got, exp in zip(_grads(out, (x, w, b)), _grads(ref, (x, w, b))):
        torch.testing.assert_close(got, exp)


@pytest.mark.parametrize("shared", [True, False])
def test_opcheck(shared):
    x, w, b = _inputs(3, 5, 7, 2, shared, True)
    torch.library.opcheck(torch.ops.modelbatch.batched_linear.default, (x, w, b, shared))
    torch.library.opcheck(torch.ops.modelbatch.linear.default, (x if shared else x[0], w[0], b[0]))


def test_modelbatch_takes_the_fast_path_and_matches_the_dispatcher_path(monkeypatch):
    """Inside ModelBatch the interception unwraps vmap's tensors and calls the batched
    op directly; the dispatcher path (the op's vmap rule) must give the same result."""
    import modelbatch as mb
    from modelbatch import interception

    torch.manual_seed(0)
    models = [
        torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
        for _ in range(4)
    ]
    batch = mb.ModelBatch(models)
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    handled = []
    fast_fn = interception._fast_linear

    def counting_fast(*args, **kwargs):
        out = fast_fn(*args, **kwargs)
        handled.append(out is not interception._NOT_HANDLED)
        return out

    monkeypatch.setitem(
        interception._ROUTES,
        torch._C._nn.linear,
        (counting_fast, lin.linear, interception._autocast_linear),
    )
    fast = batch.compute_loss(batch(x), y, F.cross_entropy, reduction="none")
    assert handled == [True, True]
    fast.sum().backward()
    fast_grads = [p.grad.clone() for p in batch.parameters()]
    batch.zero_grad()

    def no_fast(*args, **kwargs):
        return interception._NOT_HANDLED

    calls = []
    general = lin.linear

    def counting(*args, **kwargs):
        calls.append(1)
        return general(*args, **kwargs)

    monkeypatch.setitem(
        interception._ROUTES,
        torch._C._nn.linear,
        (no_fast, counting, interception._autocast_linear),
    )
    monkeypatch.setitem(
        interception._ROUTES, F.linear, (no_fast, counting, interception._autocast_linear)
    )
    slow = batch.compute_loss(batch(x), y, F.cross_entropy, reduction="none")
    slow.sum().backward()
    assert len(calls) == 2  # the dispatcher path really ran, once per layer
    torch.testing.assert_close(fast, slow)
    for a, p in zip(fast_grads, batch.parameters()):
        torch.testing.assert_close(a, p.grad)
    ref = torch.stack([F.cross_entropy(m(x), y) for m in models])
    torch.testing.assert_close(fast, ref)
