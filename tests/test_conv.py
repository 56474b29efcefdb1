"""Convolutions and batch norms of N models: ``modelbatch::conv`` and
``modelbatch::batch_norm`` (per-model loops of the native CPU kernels).

* The batched ops against pure-torch references (``vmap`` of ``aten::convolution``,
  a loop of ``F.batch_norm``) on odd shapes, forward and backward, shared and
  per-model inputs; ``gradcheck`` in float64; ``opcheck``; bad input raises.
* The per-model ops under ``torch.vmap`` (any model axis, unbatched weights,
  nested vmap) against ``vmap`` of ``F.conv*d`` / ``F.batch_norm``.
* The contract: a ModelBatch of small CNNs (odd channels, stride, padding,
  dilation, groups, biases, BatchNorm; 1-D, 2-D and 3-D) trained batched equals the
  same models trained one by one with plain torch.optim, and the convolutions and
  batch norms really were routed; eval mode; channels-last inputs; autocast.
* TrainStep (compiled) with a CNN: one graph, no breaks, the eager step's results.
"""

from __future__ import annotations

import copy

import modelbatch as mb
import pytest
import torch
import torch.nn.functional as F
from modelbatch import interception
from modelbatch.ops import batch_norm as bn_op
from modelbatch.ops import conv as conv_op
from modelbatch.train_step import TrainStep
from torch import nn

F64 = torch.float64


def _grads(out, tensors, seed=0):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, [t for t in tensors if t is not None], g)


# --------------------------------------------------------------------------- op: conv

# (N, B, C, O, spatial, kernel, stride, padding, dilation, groups)
CONV_CASES = [
    (1, 1, 1, 1, (5,), (1,), (1,), (0,), (1,), 1),
    (3, 2, 4, 6, (9,), (3,), (2,), (1,), (2,), 2),
    (2, 3, 3, 5, (7, 6), (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (4, 2, 6, 9, (8, 7), (3, 2), (2, 1), (2, 0), (2, 1), 3),
    (3, 1, 5, 5, (6, 6), (1, 1), (2, 2), (0, 0), (1, 1), 5),
    (2, 2, 2, 3, (4, 5, 3), (2, 3, 1), (1, 2, 1), (1, 0, 1), (1, 1, 2), 1),
]


def _conv_inputs(case, shared, bias, dtype=F64, requires_grad=True):
    n, b, c, o, spatial, kernel, _, _, _, groups = case
    g = torch.Generator().manual_seed(n * 100 + c * 10 + o)
    lead = () if shared else (n,)
    x = torch.randn(*lead, b, c, *spatial, generator=g, dtype=dtype)
    w = torch.randn(n, o, c // groups, *kernel, generator=g, dtype=dtype)
    bb = torch.randn(n, o, generator=g, dtype=dtype) if bias else None
    for t in (x, w, bb):
        if t is not None:
            t.requires_grad_(requires_grad)
    return x, w, bb


def _conv_params(case):
    return [list(v) for v in case[6:9]] + [case[9]]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("case", CONV_CASES)
def test_batched_conv_matches_reference_forward_and_backward(case, shared, bias):
    x, w, b = _conv_inputs(case, shared, bias)
    params = _conv_params(case)
    out = conv_op.batched_conv(x, w, b, *params, shared)
    ref = conv_op.reference(x, w, b, *params, shared)
    assert out.shape == ref.shape and out.is_contiguous()
    torch.testing.assert_close(out, ref)
    for got, exp in zip(_grads(out, (x, w, b)), _grads(ref, (x, w, b))):
        torch.testing.assert_close(got, exp)


@pytest.mark.parametrize("shared", [True, False])
def test_batched_conv_gradcheck(shared):
    case = (2, 2, 4, 4, (5, 4), (3, 2), (2, 1), (1, 1), (1, 2), 2)
    x, w, b = _conv_inputs(case, shared, True)
    params = _conv_params(case)
    assert torch.autograd.gradcheck(
        lambda x, w, b: conv_op.batched_conv(x, w, b, *params, shared), (x, w, b)
    )


def test_batched_conv_float32_and_bfloat16():
    case = CONV_CASES[3]
    params = _conv_params(case)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        x, w, b = _conv_inputs(case, False, True, dtype=dtype, requires_grad=False)
        out = conv_op.batched_conv(x, w, b, *params, False)
        ref = conv_op.reference(x.double(), w.double(), b.double(), *params, False)
        torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * 10)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize(
    "case",
    [(3, 4, 3, 16, (9, 8), (3, 3), (2, 2), (1, 1), (1, 1), 1),  # an RGB stem
     (2, 3, 8, 5, (7, 7), (1, 1), (2, 2), (0, 0), (1, 1), 1),  # a 1x1 projection
     (2, 3, 2, 3, (6, 5), (4, 4), (1, 2), (2, 1), (1, 1), 1)],  # C * kh * kw = 32
)  # fmt: skip
def test_batched_conv_im2col_forward(case, dtype, shared):
    x, w, b = _conv_inputs(case, shared, True, dtype=dtype)
    params = _conv_params(case)
    assert conv_op._im2col(x, w, params[2], params[3], shared, torch.contiguous_format)
    out = conv_op.batched_conv(x, w, b, *params, shared)
    ref = conv_op.reference(x, w, b, *params, shared)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}
    torch.testing.assert_close(out, ref, **tol)
    for got, exp in zip(_grads(out, (x, w, b)), _grads(ref, (x, w, b))):
        torch.testing.assert_close(got, exp, **tol)


@pytest.mark.parametrize("shared", [True, False])
def test_batched_conv_keeps_channels_last(shared):
    case = CONV_CASES[3]
    params = _conv_params(case)
    x, w, b = _conv_inputs(case, shared, True, dtype=torch.float32)
    if shared:
        xc = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    else:  # each model's slice channels-last
        xc = torch.empty(x.shape[0], x.shape[1], *x.shape[3:], x.shape[2]).permute(0, 1, 4, 2, 3)
        xc = xc.copy_(x.detach()).requires_grad_()
        assert xc[1].is_contiguous(memory_format=torch.channels_last)
    out = conv_op.batched_conv(xc, w, b, *params, shared)
    assert all(out[k].is_contiguous(memory_format=torch.channels_last) for k in range(len(out)))
    ref = conv_op.reference(x, w, b, *params, shared)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    gx, gw, gb = _grads(out, (xc, w, b))
    rx, rw, rb = _grads(ref, (x, w, b))
    assert gx.stride() == xc.stride()
    for got, exp in ((gx, rx), (gw, rw), (gb, rb)):
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-4)


def test_batched_conv_backward_output_mask():
    case = CONV_CASES[2]
    x, w, _ = _conv_inputs(case, False, False, requires_grad=False)
    params = _conv_params(case)
    out = conv_op.batched_conv(x, w, None, *params, False)
    g = torch.randn_like(out)
    full = conv_op.batched_conv_backward(g, x, w, *params, False, [True, True, True])
    only_w = conv_op.batched_conv_backward(g, x, w, *params, False, [False, True, False])
    assert only_w[0].numel() == 0 and only_w[2].numel() == 0
    torch.testing.assert_close(only_w[1], full[1])
    torch.testing.assert_close(full[2], g.sum((1, 3, 4)))


@pytest.mark.parametrize("shared", [True, False])
def test_conv_opcheck(shared):
    case = CONV_CASES[3]
    params = _conv_params(case)
    x, w, b = _conv_inputs(case, shared, True, dtype=torch.float32)
    torch.library.opcheck(torch.ops.modelbatch.batched_conv.default, (x, w, b, *params, shared))
    out = conv_op.batched_conv(x, w, b, *params, shared).detach()
    torch.library.opcheck(
        torch.ops.modelbatch.batched_conv_backward.default,
        (torch.randn_like(out), x.detach(), w.detach(), *params, shared, [True, True, True]),
    )
    one = (x[0] if not shared else x).detach().requires_grad_()
    torch.library.opcheck(
        torch.ops.modelbatch.conv.default, (one, w[0].detach().requires_grad_(), None, *params)
    )


def _bad_conv(**change):
    args = {
        "x": torch.randn(3, 2, 4, 6, 6),
        "weight": torch.randn(3, 5, 4, 3, 3),
        "bias": torch.randn(3, 5),
        "stride": [1, 1],
        "padding": [1, 1],
        "dilation": [1, 1],
        "groups": 1,
        "shared": False,
    }
    args.update(change)
    return args


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"x": torch.randn(2, 2, 4, 6, 6)}, "x has 2 models"),
        ({"x": torch.randn(3, 2, 3, 6, 6)}, "x has 3 channels"),
        ({"x": torch.randn(3, 4, 6, 6)}, "x must be a 5-D"),
        ({"weight": torch.randn(5, 4)}, "weight must be"),
        ({"bias": torch.randn(5)}, "bias must be None or"),
        ({"bias": torch.randn(3, 5, dtype=F64)}, "bias is torch.float64"),
        ({"stride": [1]}, "stride must have 2 values"),
        ({"padding": [-1, 0]}, "padding >= 0"),
        ({"groups": 2}, "groups=2 must be >= 1 and divide O=5"),
        ({"padding": [0, 0], "dilation": [4, 4]}, "larger than the padded input"),
        ({"x": torch.ones(3, 2, 4, 6, 6, dtype=torch.int64)}, "weight is torch.float32, x is"),
        (
            {
                "x": torch.ones(3, 2, 4, 6, 6, dtype=torch.int64),
                "weight": torch.ones(3, 5, 4, 3, 3, dtype=torch.int64),
                "bias": None,
            },
            "floating-point",
        ),
    ],
)
def test_batched_conv_bad_input_raises(change, message):
    with pytest.raises(ValueError, match=message):
        conv_op.batched_conv(**_bad_conv(**change))


# ----------------------------------------------------------- op: conv under vmap

FUNCS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_under_vmap_matches_vmap_of_f_conv(case, shared):
    x, w, b = _conv_inputs(case, shared, True)
    stride, padding, dilation, groups = _conv_params(case)
    in_dims = (None if shared else 0, 0, 0)
    ours = torch.vmap(
        lambda x, w, b: conv_op.conv(x, w, b, stride, padding, dilation, groups), in_dims=in_dims
    )(x, w, b)
    f = FUNCS[len(stride)]
    ref = torch.vmap(
        lambda x, w, b: f(x, w, b, stride, padding, dilation, groups), in_dims=in_dims
    )(x, w, b)
    torch.testing.assert_close(ours, ref)
    for got, exp in zip(_grads(ours, (x, w, b)), _grads(ref, (x, w, b))):
        torch.testing.assert_close(got, exp)


def test_conv_vmap_other_axes_unbatched_weight_and_nested():
    x = torch.randn(2, 4, 3, 6, 6, dtype=F64)  # model axis 1 of the input
    w = torch.randn(5, 3, 3, 3, dtype=F64)
    p = ([1, 1], [1, 1], [1, 1], 1)
    out = torch.vmap(lambda x, w: conv_op.conv(x, w, None, *p), in_dims=(1, None))(x, w)
    torch.testing.assert_close(
        out, torch.stack([F.conv2d(x[:, k], w, None, 1, 1) for k in range(4)])
    )
    wm = torch.randn(5, 3, 3, 3, 4, dtype=F64)  # model axis last
    out = torch.vmap(lambda x, w: conv_op.conv(x, w, None, *p), in_dims=(1, 4))(x, wm)
    ref = torch.stack([F.conv2d(x[:, k], wm[..., k], None, 1, 1) for k in range(4)])
    torch.testing.assert_close(out, ref)
    # vmap of vmap: [3 outer, 4 inner] models
    xs = torch.randn(3, 4, 2, 3, 5, 5, dtype=F64, requires_grad=True)
    ws = torch.randn(3, 4, 5, 3, 3, 3, dtype=F64, requires_grad=True)
    inner = torch.vmap(lambda x, w: conv_op.conv(x, w, None, *p))
    ref_inner = torch.vmap(lambda x, w: F.conv2d(x, w, None, 1, 1))
    ours, ref = torch.vmap(inner)(xs, ws), torch.vmap(ref_inner)(xs, ws)
    torch.testing.assert_close(ours, ref)
    for got, exp in zip(_grads(ours, (xs, ws)), _grads(ref, (xs, ws))):
        torch.testing.assert_close(got, exp)


def test_unbatched_conv_backward():
    x = torch.randn(2, 3, 7, 6, dtype=F64, requires_grad=True)
    w = torch.randn(4, 3, 3, 2, dtype=F64, requires_grad=True)
    b = torch.randn(4, dtype=F64, requires_grad=True)
    out = conv_op.conv(x, w, b, [2, 1], [1, 0], [1, 2], 1)
    ref = F.conv2d(x, w, b, (2, 1), (1, 0), (1, 2))
    torch.testing.assert_close(out, ref)
    for got, exp in zip(_grads(out, (x, w, b)), _grads(ref, (x, w, b))):
        torch.testing.assert_close(got, exp)


def test_conv_args_covers_only_what_conv_does():
    x, w = torch.randn(2, 4, 6, 6), torch.randn(6, 2, 3, 3)
    assert conv_op.conv_args(2, x, w, None, 2, "valid", 1, 2)[3:] == ([2, 2], [0, 0], [1, 1], 2)
    assert conv_op.conv_args(2, x, w, padding="same", dilation=(1, 2), groups=2)[4] == [1, 2]
    assert conv_op.conv_args(2, x, torch.randn(6, 4, 2, 2), padding="same") is None  # asym.
    assert conv_op.conv_args(2, x[0], w, groups=2) is None  # unbatched input
    assert conv_op.conv_args(2, x, w) is None  # 4 channels, weight expects 2 (groups=1)
    assert conv_op.conv_args(2, x.double(), w, groups=2) is None  # dtypes differ
    assert conv_op.conv_args(2, x, w, padding="circular", groups=2) is None


# ----------------------------------------------------------------- op: batch norm

# (N, B, C, spatial)
BN_SHAPES = [(1, 2, 1, ()), (3, 4, 5, ()), (2, 3, 3, (7,)), (4, 2, 5, (3, 4)), (2, 2, 3, (2, 3, 2))]


def _bn_inputs(n, b, c, spatial, shared, affine, stats, dtype=F64):
    g = torch.Generator().manual_seed(n * 100 + b * 10 + c)
    lead = () if shared else (n,)
    x = (torch.randn(*lead, b, c, *spatial, generator=g, dtype=dtype) * 2 + 1).requires_grad_()
    w = (torch.rand(n, c, generator=g, dtype=dtype) + 0.5).requires_grad_() if affine else None
    bias = torch.randn(n, c, generator=g, dtype=dtype).requires_grad_() if affine else None
    rm = torch.randn(n, c, generator=g, dtype=dtype) if stats else None
    rv = torch.rand(n, c, generator=g, dtype=dtype) + 0.5 if stats else None
    return x, w, bias, rm, rv


@pytest.mark.parametrize(
    ("training", "affine", "stats"),
    [(True, True, True), (True, False, True), (True, True, False), (False, True, True),
     (False, False, True)],
)  # fmt: skip
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("shape", BN_SHAPES)
def test_batched_batch_norm_matches_reference(shape, shared, training, affine, stats):
    if training and shape[1] * max(1, torch.Size(shape[3]).numel()) == 1:
        pytest.skip("one value per channel: F.batch_norm refuses to train on it")
    x, w, b, rm, rv = _bn_inputs(*shape, shared, affine, stats)
    before = None if rm is None else (rm.clone(), rv.clone())
    out, sm, _, new_m, new_v = bn_op.batched_batch_norm(
        x, w, b, rm, rv, training, 0.3, 1e-4, shared
    )
    ref, ref_m, ref_v = bn_op.reference(x, w, b, rm, rv, training, 0.3, 1e-4, shared)
    torch.testing.assert_close(out, ref)
    if before is not None:  # functional: the given running statistics are untouched
        assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])
    if training and stats:
        torch.testing.assert_close(new_m, ref_m)
        torch.testing.assert_close(new_v, ref_v)
    else:
        assert new_m.numel() == 0 and new_v.numel() == 0
    assert sm.shape == (shape[0], shape[2] if training else 0)
    for got, exp in zip(_grads(out, (x, w, b)), _grads(ref, (x, w, b))):
        torch.testing.assert_close(got, exp)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shared", [True, False])
def test_batched_batch_norm_gradcheck(shared, training):
    x, w, b, rm, rv = _bn_inputs(2, 3, 2, (2, 2), shared, True, True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: bn_op.batched_batch_norm(x, w, b, rm, rv, training, 0.1, 1e-3, shared)[0],
        (x, w, b),
    )


def test_batched_batch_norm_mixed_dtype_and_channels_last():
    # bfloat16 input, float32 parameters (autocast): float32 statistics, like the kernel
    x, w, b, rm, rv = _bn_inputs(3, 4, 5, (3, 3), False, True, True, dtype=torch.float32)
    xb = x.detach().bfloat16()
    out, sm, _, new_m, _ = bn_op.batched_batch_norm(xb, w, b, rm, rv, True, 0.1, 1e-5, False)
    assert out.dtype == torch.bfloat16 and sm.dtype == torch.float32
    ref, ref_m, _ = bn_op.reference(xb, w, b, rm, rv, True, 0.1, 1e-5, False)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(new_m, ref_m)
    # channels-last models in, channels-last models out
    xc = torch.empty(3, 4, 3, 3, 5).permute(0, 1, 4, 2, 3).copy_(x.detach()).requires_grad_()
    out, *_ = bn_op.batched_batch_norm(xc, w, b, rm, rv, True, 0.1, 1e-5, False)
    assert out.stride() == xc.stride()
    ref, *_ = bn_op.reference(x, w, b, rm, rv, True, 0.1, 1e-5, False)
    torch.testing.assert_close(out, ref)
    (gx,) = torch.autograd.grad(out, xc, torch.ones_like(out))
    assert gx.stride() == xc.stride()


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_opcheck(training):
    x, w, b, rm, rv = _bn_inputs(3, 4, 5, (3,), False, True, True, dtype=torch.float32)
    args = (x, w, b, rm, rv, training, 0.1, 1e-5)
    torch.library.opcheck(torch.ops.modelbatch.batched_batch_norm.default, (*args, False))
    out, sm, si, _, _ = bn_op.batched_batch_norm(*args, False)
    torch.library.opcheck(
        torch.ops.modelbatch.batched_batch_norm_backward.default,
        (torch.randn_like(out), x.detach(), w.detach(), rm, rv, sm, si, training, 1e-5, False,
         [True, True, True]),
    )  # fmt: skip
    one = (x[0].detach().requires_grad_(), w[0].detach().requires_grad_(), b[0].detach())
    torch.library.opcheck(
        torch.ops.modelbatch.batch_norm.default, (*one, rm[0], rv[0], training, 0.1, 1e-5)
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"x": torch.randn(2, 4, 5)}, r"weight is \(3, 5\), expected \[N, C\] = \[2, 5\]"),
        ({"x": torch.randn(3, 4, 6)}, r"expected \[N, C\] = \[3, 6\]"),
        ({"weight": torch.randn(3, 4)}, r"weight is \(3, 4\), expected \[N, C\] = \[3, 5\]"),
        ({"weight": torch.randn(5)}, "weight must be an"),
        ({"running_var": None}, "give both running_mean and running_var"),
        ({"running_mean": None, "running_var": None, "training": False}, "needs running stat"),
        ({"x": torch.ones(3, 4, 5, dtype=torch.int64)}, "floating-point"),
        ({"x": torch.randn(3, 4)}, r"x must be a \[N, B, C, \*S\]"),
    ],
)
def test_batched_batch_norm_bad_input_raises(change, message):
    args = {
        "x": torch.randn(3, 4, 5),
        "weight": torch.ones(3, 5),
        "bias": torch.zeros(3, 5),
        "running_mean": torch.zeros(3, 5),
        "running_var": torch.ones(3, 5),
        "training": True,
        "momentum": 0.1,
        "eps": 1e-5,
        "shared": False,
    }
    args.update(change)
    with pytest.raises(ValueError, match=message):
        bn_op.batched_batch_norm(**args)


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_under_vmap_matches_vmap_of_f_batch_norm(training):
    n, c = 3, 4
    x = torch.randn(5, n, c, 6, dtype=F64, requires_grad=True)  # model axis 1
    w = torch.rand(c, n, dtype=F64, requires_grad=True)  # model axis last
    b = torch.randn(n, c, dtype=F64, requires_grad=True)
    stats = [torch.randn(n, c, dtype=F64), torch.rand(n, c, dtype=F64) + 0.5]
    ours_stats = [s.clone() for s in stats]

    def ours(x, w, b, rm, rv):
        out, _, _, m, v = bn_op.batch_norm(x, w, b, rm, rv, training, 0.2, 1e-5)
        if training:
            bn_op.update_running_stats(rm, rv, m, v)
        return out

    def ref(x, w, b, rm, rv):
        return F.batch_norm(x, rm, rv, w, b, training, 0.2, 1e-5)

    in_dims = (1, 1, 0, 0, 0)
    got = torch.vmap(ours, in_dims=in_dims)(x, w, b, *ours_stats)
    want = torch.vmap(ref, in_dims=in_dims)(x, w, b, *stats)
    torch.testing.assert_close(got, want)
    for s, t in zip(ours_stats, stats):
        torch.testing.assert_close(s, t)
    for g, e in zip(_grads(got, (x, w, b)), _grads(want, (x, w, b))):
        torch.testing.assert_close(g, e)


def test_bn_args_covers_only_what_batch_norm_does():
    x, s = torch.randn(4, 3, 5), torch.ones(3)
    assert bn_op.bn_args(x, s, s, s, s, True, 0.1, 1e-5) is not None
    assert bn_op.bn_args(x, None, None, None, None, True) is not None
    assert bn_op.bn_args(x, None, None, s, s, False) is None  # eval without running stats
    assert bn_op.bn_args(x, s, None, s, s, True) is None  # one running statistic
    assert bn_op.bn_args(x[:1, :, :1], s, s, s, s, True) is None  # one value per channel
    assert bn_op.bn_args(x, s.double(), s.double(), s, s, True) is None  # mixed dtypes
    assert bn_op.bn_args(x, torch.ones(4), torch.ones(4), None, None, True) is None
    assert bn_op.torch_bn_args(x, s, s, s, s, True, 0.1, 1e-5, True) is not None


# ------------------------------------------------------------ ModelBatch: contract


class OddCNN(nn.Module):
    """Odd channel counts, stride 2, padding, dilation, groups and both kinds of
    conv (with a bias, and bias-free before a BatchNorm)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 9, 3, padding=2, dilation=2, groups=3, bias=False)
        self.bn2 = nn.BatchNorm2d(9, momentum=0.3)
        self.c3 = nn.Conv2d(9, 5, (1, 3), stride=(2, 1), padding=(0, 1))
        self.head = nn.Linear(5, 4)

    def forward(self, x):
        x = F.relu(self.bn1(self.c1(x)))
        x = F.relu(self.bn2(self.c2(x))) + x.repeat(1, 3 // 2 + 1, 1, 1)[:, :9]
        return self.head(torch.tanh(self.c3(x)).mean((2, 3)))


class CNN1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 5, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm1d(5, affine=False)
        self.c2 = nn.Conv1d(5, 5, 3, padding="same", groups=5, bias=False)
        self.bn2 = nn.BatchNorm1d(5, track_running_stats=False)
        self.head = nn.Linear(5, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.c1(x)))
        return self.head(self.bn2(self.c2(x)).mean(-1))


class CNN3d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv3d(2, 3, 2, stride=(1, 2, 1), padding=1, dilation=(1, 1, 2))
        self.bn = nn.BatchNorm3d(3)
        self.head = nn.Linear(3, 4)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.c(x))).amax((2, 3, 4)))


KINDS = {"2d": (OddCNN, (3, 9, 8)), "1d": (CNN1d, (2, 11)), "3d": (CNN3d, (2, 4, 5, 3))}
N = 4
LRS = [0.02, 0.05, 0.1, 0.2]


def _data(kind, steps, shared, b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = KINDS[kind][1]
    lead = () if shared else (N,)
    return [
        (torch.randn(*lead, b, *shape, generator=g), torch.randint(0, 4, (*lead, b), generator=g))
        for _ in range(steps)
    ]


class _Spy:
    """Counts the calls of the batched conv and batch-norm kernels."""

    def __init__(self, monkeypatch):
        self.conv = self.bn = 0
        fwd_c, fwd_b = conv_op._forward, bn_op._forward

        def conv(*a):
            self.conv += 1
            return fwd_c(*a)

        def bn(*a):
            self.bn += 1
            return fwd_b(*a)

        monkeypatch.setattr(conv_op, "_forward", conv)
        monkeypatch.setattr(bn_op, "_forward", bn)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("shared", [True, False])
def test_modelbatch_cnn_trains_like_the_models_one_by_one(kind, shared, monkeypatch):
    spy = _Spy(monkeypatch)
    torch.manual_seed(0)
    models = [KINDS[kind][0]() for _ in range(N)]
    ref = [copy.deepcopy(m) for m in models]
    batch = mb.ModelBatch(models, shared_input=shared)
    opt = mb.optim.SGD(batch, lr=LRS, momentum=0.9)
    ropts = [torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9) for m, lr in zip(ref, LRS)]
    steps = 3
    for x, y in _data(kind, steps, shared):
        opt.zero_grad()
        batch.compute_loss(batch(x), y, F.cross_entropy).backward()
        opt.step()
        for i, (m, o) in enumerate(zip(ref, ropts)):
            o.zero_grad()
            F.cross_entropy(m(x if shared else x[i]), y if shared else y[i]).backward()
            o.step()
    convs = sum(isinstance(m, nn.modules.conv._ConvNd) for m in ref[0].modules())
    bns = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in ref[0].modules())
    assert (spy.conv, spy.bn) == (convs * steps, bns * steps)  # all routed
    for i, m in enumerate(ref):
        for name, t in m.state_dict().items():
            got = batch.model(i).state_dict()[name]
            torch.testing.assert_close(got, t, rtol=1e-5, atol=1e-6, msg=f"model {i} {name}")
    # eval mode: the running statistics, per model
    batch.eval()
    x, _ = _data(kind, 1, shared, seed=1)[0]
    out = batch(x)
    for i, m in enumerate(ref):
        m.eval()
        want = m(x if shared else x[i])
        torch.testing.assert_close(out[i], want, rtol=1e-5, atol=1e-6)


def test_modelbatch_channels_last_inputs_stay_channels_last():
    torch.manual_seed(0)
    models = [OddCNN() for _ in range(3)]
    batch = mb.ModelBatch(copy.deepcopy(models))
    x = torch.randn(5, 3, 9, 8).contiguous(memory_format=torch.channels_last)
    seen = []
    fwd = conv_op._forward

    def spy(x, *a):
        seen.append(x)
        return fwd(x, *a)

    conv_op._forward, orig = spy, conv_op._forward
    try:
        out = batch(x)
    finally:
        conv_op._forward = orig
    assert len(seen) == 3
    assert all(t[0].is_contiguous(memory_format=torch.channels_last) for t in seen[1:])
    for i, m in enumerate(models):
        torch.testing.assert_close(out[i], m(x), rtol=1e-5, atol=1e-5)


def test_modelbatch_without_intercept_and_off_cpu_is_not_routed(monkeypatch):
    spy = _Spy(monkeypatch)
    batch = mb.ModelBatch([OddCNN() for _ in range(2)], intercept=False)
    batch(torch.randn(4, 3, 9, 8))
    assert (spy.conv, spy.bn) == (0, 0)
    # off the CPU the calls stay vmap's (cuDNN's grouped convolutions)
    parse = interception._cpu_call(lambda *a, **k: conv_op.conv_args(2, *a, **k))
    x, w = torch.randn(2, 3, 5, 5, device="meta"), torch.randn(4, 3, 3, 3, device="meta")
    assert parse((x, w), {}) is None
    assert parse((torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3)), {}) is not None


def test_modelbatch_bad_cnn_input_gets_the_shape_error():
    batch = mb.ModelBatch([OddCNN() for _ in range(2)])
    with pytest.raises(ValueError, match=r"rejected inputs of shape \[\(4, 2, 9, 8\)\]"):
        batch(torch.randn(4, 2, 9, 8))  # 2 channels, the models take 3
    with pytest.raises(RuntimeError, match="expected scalar type Double but found Float"):
        batch(torch.randn(4, 3, 9, 8, dtype=F64))  # torch's own error, as for one model


def test_modelbatch_cnn_under_autocast_matches_one_model_under_autocast():
    torch.manual_seed(0)
    models = [OddCNN() for _ in range(3)]
    batch = mb.ModelBatch(copy.deepcopy(models))
    x = torch.randn(5, 3, 9, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = batch(x)
        want = [m(x) for m in models]
    for i, w in enumerate(want):
        assert out[i].dtype == w.dtype
        torch.testing.assert_close(out[i].float(), w.float(), rtol=2e-2, atol=2e-2)
    for name, t in models[1].state_dict().items():
        torch.testing.assert_close(batch.model(1).state_dict()[name], t, rtol=1e-2, atol=1e-3)


def test_enable_compile_cnn_forward_matches_eager():
    torch.manual_seed(0)
    models = [OddCNN() for _ in range(3)]
    eager = mb.ModelBatch(copy.deepcopy(models), seeds=0)
    compiled = mb.ModelBatch(copy.deepcopy(models), seeds=0).enable_compile(backend="aot_eager")
    for x, _ in _data("2d", 2, True):
        a, b = compiled(x), eager(x)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for g, e in zip(
            _grads(a, list(compiled.parameters())), _grads(b, list(eager.parameters()))
        ):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    for (k, v), w in zip(compiled.state_dict().items(), eager.state_dict().values()):
        if torch.is_tensor(v):
            torch.testing.assert_close(v, w, msg=k)


@pytest.mark.parametrize("kind", ["2d", "1d"])
def test_trainstep_compiled_cnn_is_one_graph_and_matches_the_eager_step(kind, monkeypatch):
    torch.manual_seed(0)
    models = [KINDS[kind][0]() for _ in range(N)]
    ref = mb.ModelBatch(copy.deepcopy(models), seeds=0)
    batch = mb.ModelBatch(copy.deepcopy(models), seeds=0)
    ref_opt = mb.optim.SGD(ref, lr=LRS, momentum=0.9)
    opt = mb.optim.SGD(batch, lr=LRS, momentum=0.9)
    step = TrainStep(batch, opt, F.cross_entropy)
    spy = _Spy(monkeypatch)  # the compiled graph calls the batched kernels
    data = _data(kind, 3, True)
    for x, y in data:
        ref_opt.zero_grad()
        want = ref.compute_loss(ref(x), y, F.cross_entropy, reduction="none")
        want.sum().backward()
        ref_opt.step()
        got = step(x, y)
        torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)
    assert spy.conv > 0 and spy.bn > 0
    for (k, v), w in zip(batch.state_dict().items(), ref.state_dict().values()):
        if torch.is_tensor(v):
            torch.testing.assert_close(v, w, rtol=1e-5, atol=1e-6, msg=k)
    # (explain runs the step once more)
    with torch._dynamo.config.patch(trace_autograd_ops=True):  # as the step sets it
        explained = torch._dynamo.explain(step._step)(
            (data[0][0],), data[0][1], step._hp, step._buckets, step._max_norm
        )
    assert explained.graph_count == 1, explained
    assert explained.graph_break_count == 0, explained.break_reasons
