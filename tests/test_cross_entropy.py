"""modelbatch::batched_cross_entropy (C++ on CPU) and modelbatch::cross_entropy
(its vmap route) against the pure-torch reference and F.cross_entropy."""

from __future__ import annotations

import modelbatch as mb
import pytest
import torch
import torch.nn.functional as F
from modelbatch.ops import cross_entropy as ce

SHAPES = [(1, 1, 1), (3, 5, 2), (4, 17, 10), (2, 33, 129)]  # N, B, C


def _data(n, b, c, shared, dtype=torch.float64, ignore=False, seed=0):
    g = torch.Generator().manual_seed(seed + n * 100 + b)
    logits = (torch.randn(n, b, c, generator=g) * 3).to(dtype).requires_grad_()
    target = torch.randint(0, c, (b,) if shared else (n, b), generator=g)
    if ignore and b > 1:
        target[..., ::3] = -100
    return logits, target


@pytest.mark.parametrize("ignore", [False, True])
@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_forward_backward(shape, shared, reduction, ignore):
    logits, target = _data(*shape, shared, ignore=ignore)
    out = ce.batched_cross_entropy(logits, target, shared, reduction)
    ref, ref_lse = ce.reference(logits, target, shared, reduction, -100)
    torch.testing.assert_close(out, ref, equal_nan=True)
    _, lse = torch.ops.modelbatch.batched_cross_entropy(logits, target, shared, reduction, -100)
    torch.testing.assert_close(lse, ref_lse)
    g = torch.randn(out.shape, dtype=out.dtype)
    (got,) = torch.autograd.grad(out, logits, g)
    (exp,) = torch.autograd.grad(ref, logits, g)
    torch.testing.assert_close(got, exp, equal_nan=True)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_low_precision(dtype, tol):
    logits, target = _data(3, 8, 5, False, dtype=dtype)
    out = ce.batched_cross_entropy(logits, target, False, 1)
    ref = ce.reference(logits.detach().double(), target, False, 1, -100)[0]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shared", [True, False])
def test_vmap_route_equals_f_cross_entropy(shared, reduction):
    logits, target = _data(4, 6, 3, shared, dtype=torch.float32)
    fn = lambda x, t: ce.route(x, t, reduction=reduction)
    ref_fn = lambda x, t: F.cross_entropy(x, t, reduction=reduction)
    dims = (0, None if shared else 0)
    ours = torch.vmap(fn, in_dims=dims)(logits, target)
    ref = torch.vmap(ref_fn, in_dims=dims)(logits, target)
    torch.testing.assert_close(ours, ref)
    (g1,) = torch.autograd.grad(ours.sum(), logits)
    (g2,) = torch.autograd.grad(ref.sum(), logits)
    torch.testing.assert_close(g1, g2)


def test_unbatched_op_and_uncovered_cases_fall_back():
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 4, (5,))
    torch.testing.assert_close(ce.route(x, t), F.cross_entropy(x, t))
    (g1,) = torch.autograd.grad(ce.route(x, t, reduction="sum"), x)
    (g2,) = torch.autograd.grad(F.cross_entropy(x, t, reduction="sum"), x)
    torch.testing.assert_close(g1, g2)
    w = torch.rand(4, dtype=torch.float64)
    torch.testing.assert_close(ce.route(x, t, weight=w), F.cross_entropy(x, t, weight=w))
    soft = torch.softmax(torch.randn(5, 4, dtype=torch.float64), -1)
    torch.testing.assert_close(ce.route(x, soft), F.cross_entropy(x, soft))
    torch.testing.assert_close(
        ce.route(x, t, label_smoothing=0.1), F.cross_entropy(x, t, label_smoothing=0.1)
    )


def test_compute_loss_uses_route_and_matches_models():
    torch.manual_seed(0)
    models = [torch.nn.Linear(6, 3) for _ in range(3)]
    batch = mb.ModelBatch(models)
    x, y = torch.randn(7, 6), torch.randint(0, 3, (7,))
    y[2] = -100
    loss_fn = torch.nn.CrossEntropyLoss()
    per = batch.compute_loss(batch(x), y, loss_fn, reduction="none")
    torch.testing.assert_close(per, torch.stack([loss_fn(m(x), y) for m in models]))


def test_bad_target_raises():
    logits, target = _data(2, 4, 3, True, dtype=torch.float32)
    target[1] = 7
    with pytest.raises(RuntimeError, match="out of bounds for 3 classes"):
        ce.batched_cross_entropy(logits, target, True, 1)
    with pytest.raises(RuntimeError, match=r"shared target must be \[B=4\]"):
        ce.batched_cross_entropy(logits, target[:3], True, 1)


def test_opcheck():
    logits, target = _data(3, 5, 4, False)
    for red in (0, 1, 2):
        torch.library.opcheck(
            torch.ops.modelbatch.batched_cross_entropy.default, (logits, target, False, red, -100)
        )
    torch.library.opcheck(
        torch.ops.modelbatch.cross_entropy.default, (logits[0], target[0], 1, -100)
    )
