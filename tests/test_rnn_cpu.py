"""modelbatch::rnn_layer / rnn_layer_backward (the C++ CPU kernels) against the
pure-torch reference of modelbatch.ops.rnn.

Every mode (LSTM with and without projection, GRU with and without b_hh, RNN_TANH,
RNN_RELU), both directions, packed and unpacked batches and odd shapes (partial
vectors, remainder row tiles, fewer models than threads) in float32 and float64;
the AVX2 and baseline kernels too (MODELBATCH_RNN_ISA caps the instruction set),
half types computed in float32, and the input checks. The kernels sum in another
order than the reference's bmm and use their own exp / tanh polynomials, so the
results match to rounding, not bitwise.
"""

from __future__ import annotations

import pytest
import torch
from modelbatch.ops import rnn as R

OP = torch.ops.modelbatch
LSTM, GRU, RNN_TANH, RNN_RELU = R.LSTM, R.GRU, R.RNN_TANH, R.RNN_RELU
# (name, mode, projection, b_hh)
CONFIGS = [
    ("lstm", LSTM, False, False),
    ("lstm_proj", LSTM, True, False),
    ("gru", GRU, False, True),
    ("gru_nobias", GRU, False, False),
    ("rnn_tanh", RNN_TANH, False, False),
    ("rnn_relu", RNN_RELU, False, False),
]
# (N, T, B, H): odd sizes (partial vectors, remainder rows), one model, a single
# step and row, whole vectors (16 / 32 columns), several row tiles.
SHAPES = [(1, 1, 1, 1), (3, 7, 3, 5), (5, 7, 1, 17), (3, 4, 5, 33), (2, 3, 16, 32), (3, 3, 20, 40)]
NAMES = ("out", "h_n", "c_n", "ws", "d_gx", "d_w_hh", "d_b_hh", "d_w_hr", "d_h0", "d_c0")


def _batch_sizes(t, b):
    """Non-increasing, starting at b, with a step of one row (e.g. [5, 3, 3, 1])."""
    if b == 1 or t == 1:
        return [b] * t
    return [b] + [max(1, (b + 1) // 2)] * (t - 2) + [1]


def _inputs(mode, n, t, b, h, proj, bias, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=gen, dtype=torch.float64) * scale).to(
        dtype
    )
    g = R.GATES[mode]
    p = h + 2 if proj else h
    return dict(
        gx=rnd(n, t, b, g * h),
        w_hh=rnd(n, g * h, p, scale=0.7 / p**0.5),
        b_hh=rnd(n, g * h, scale=0.5) if bias else None,
        w_hr=rnd(n, p, h, scale=0.7 / h**0.5) if proj else None,
        h0=rnd(n, b, p, scale=0.5),
        c0=rnd(n, b, h, scale=0.5) if mode == LSTM else None,
    )


def _grads(mode, out, h_n, c_n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda x: torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.dtype)
    return rnd(out), rnd(h_n), (rnd(c_n) if mode == LSTM else None)


def _assert_close(got, ref, name, dtype):
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert got.dtype == ref.dtype, f"{name}: dtype {got.dtype} != {ref.dtype}"
    if ref.numel() == 0:
        return
    # Relative to the tensor's magnitude: the sums of the weight gradients grow with
    # T * B, and RNN_RELU states are unbounded.
    rtol = {torch.float32: 2e-5, torch.float64: 1e-12}.get(dtype, 2e-2)
    scale = max(1.0, ref.abs().max().item())
    err = (got.double() - ref.double()).abs().max().item()
    assert err <= rtol * scale, f"{name}: max error {err:.3g} > {rtol * scale:.3g}"


def _check(mode, n, t, b, h, proj, bias, dtype, reverse, packed):
    x = _inputs(mode, n, t, b, h, proj, bias, dtype)
    bs = _batch_sizes(t, b) if packed else []
    args = (mode, x["gx"], x["w_hh"], x["b_hh"], x["w_hr"], x["h0"], x["c0"], reverse, bs)
    got = OP.rnn_layer(*args)
    ref = R.reference_layer(*args)
    out, h_n, c_n, ws = ref
    g_out, g_hn, g_cn = _grads(mode, out, h_n, c_n)
    bargs = (mode, g_out, g_hn, g_cn, x["w_hh"], x["b_hh"], x["w_hr"], x["h0"], x["c0"], out, ws)
    got_b = OP.rnn_layer_backward(*bargs, reverse, bs)
    ref_b = R.reference_layer_backward(*bargs, reverse, bs)
    for name, g, r in zip(NAMES, list(got) + list(got_b), list(ref) + list(ref_b)):
        _assert_close(g, r, name, dtype)
    return bs, got, got_b


def test_registered_for_cpu():
    for op in ("rnn_layer", "rnn_layer_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"modelbatch::{op}", "CPU")


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("config", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_matches_reference(config, dtype, reverse, packed):
    _, mode, proj, bias = config
    for n, t, b, h in SHAPES:
        _check(mode, n, t, b, h, proj, bias, dtype, reverse, packed)


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_other_instruction_sets(isa, dtype, monkeypatch):
    """The AVX2 and baseline kernels (the CPU's widest set runs everywhere else)."""
    monkeypatch.setenv("MODELBATCH_RNN_ISA", isa)
    for _, mode, proj, bias in CONFIGS:
        for n, t, b, h in [(3, 4, 5, 33), (2, 3, 16, 32)]:
            _check(mode, n, t, b, h, proj, bias, dtype, reverse=True, packed=True)


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_packed_rows_past_batch_size(reverse):
    """Rows past batch_sizes[t] of out, ws and d_gx are zero; each sequence's final
    state is the one after its last step (in either direction)."""
    n, t, b, h = 2, 4, 5, 8
    bs, (out, h_n, _, ws), (d_gx, *_) = _check(
        LSTM, n, t, b, h, False, False, torch.float64, reverse, packed=True
    )
    assert bs == [5, 3, 3, 1]
    for step, bt in enumerate(bs):
        assert out[:, step, bt:].abs().sum() == 0 and out[:, step, :bt].abs().sum() > 0
        assert ws[:, step, bt:].abs().sum() == 0 and d_gx[:, step, bt:].abs().sum() == 0
    # Row 4 runs one step (t = 0); rows 1-2 three steps.
    last = {False: {4: 0, 2: 2}, True: {4: 0, 2: 0}}[reverse]
    for row, step in last.items():
        torch.testing.assert_close(h_n[:, row], out[:, step, row], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_half_types(config, dtype):
    """Computed in float32, stored in the input dtype."""
    _, mode, proj, bias = config
    _, got, got_b = _check(mode, 2, 3, 3, 5, proj, bias, dtype, reverse=False, packed=True)
    for x in list(got) + list(got_b):
        assert x.dtype == dtype


@pytest.mark.parametrize("config", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_saturation_and_nan(config):
    """Pre-activations far past the activations' saturation, and a NaN that spreads
    (through the state) where the reference's does."""
    _, mode, proj, bias = config
    x = _inputs(mode, 2, 3, 4, 32, proj, bias, torch.float32)
    x["gx"] = x["gx"] * 60
    got = OP.rnn_layer(mode, *x.values(), False, [])
    ref = R.reference_layer(mode, *x.values(), False, [])
    for name, g, r in zip(NAMES, got, ref):
        assert torch.isfinite(g).all(), name
        _assert_close(g, r, name, torch.float32)
    x["gx"][0, 0, 1, 3] = float("nan")
    got = OP.rnn_layer(mode, *x.values(), False, [])
    ref = R.reference_layer(mode, *x.values(), False, [])
    for name, g, r in zip(NAMES, got, ref):
        assert torch.equal(g.isnan(), r.isnan()), name
    assert got[0][0, :, 1].isnan().any() and not got[0][1].isnan().any()


def test_noncontiguous_inputs():
    x = _inputs(LSTM, 3, 4, 2, 6, False, False, torch.float32)
    gx = x["gx"].transpose(1, 2).contiguous().transpose(1, 2)  # [N, T, B, 4H], strided
    w_hh = x["w_hh"].transpose(1, 2).contiguous().transpose(1, 2)
    assert not gx.is_contiguous() and not w_hh.is_contiguous()
    got = OP.rnn_layer(LSTM, gx, w_hh, None, None, x["h0"], x["c0"], False, [])
    ref = R.reference_layer(LSTM, gx, w_hh, None, None, x["h0"], x["c0"], False, [])
    for name, g, r in zip(NAMES, got, ref):
        _assert_close(g, r, name, torch.float32)


@pytest.mark.parametrize("layout", ["expanded", "time_major", "transposed_rows"])
def test_strided_grad_out(layout):
    """grad_out is read in place when its [B, P] blocks are dense (e.g. one gradient
    expanded over the models), and copied otherwise."""
    mode, n, t, b, h = LSTM, 3, 4, 5, 6
    x = _inputs(mode, n, t, b, h, False, False, torch.float64)
    out, h_n, c_n, ws = OP.rnn_layer(mode, *x.values(), False, [])
    g = torch.randn(t, b, h, dtype=torch.float64)
    if layout == "expanded":
        g_out = g.expand(n, t, b, h)
    elif layout == "time_major":
        g_out = torch.randn(t, n, b, h, dtype=torch.float64).transpose(0, 1)
    else:
        g_out = torch.randn(n, t, h, b, dtype=torch.float64).transpose(2, 3)
    assert not g_out.is_contiguous()
    bargs = (g_out, h_n, c_n, x["w_hh"], None, None, x["h0"], x["c0"], out, ws, False, [])
    got = OP.rnn_layer_backward(mode, *bargs)
    ref = R.reference_layer_backward(mode, *bargs)
    for name, gg, r in zip(NAMES[4:], got, ref):
        _assert_close(gg, r, name, torch.float64)


def test_empty_sizes():
    """No steps (h_n = h0, zero weight gradients) and no models."""
    for n, t, b in [(2, 0, 3), (0, 2, 3)]:
        for mode in (LSTM, GRU):
            _check(mode, n, t, b, 4, False, mode == GRU, torch.float64, False, packed=False)
    x = _inputs(LSTM, 2, 0, 3, 4, False, False, torch.float64)
    _, h_n, c_n, _ = OP.rnn_layer(LSTM, *x.values(), False, [])
    assert torch.equal(h_n, x["h0"]) and torch.equal(c_n, x["c0"])


def test_more_models_than_threads():
    """Many models split over the threads; each model's result is its own."""
    x = _inputs(GRU, 9, 3, 2, 7, False, True, torch.float64)
    out = OP.rnn_layer(GRU, *x.values(), False, [])[0]
    one = {k: (v[4:5] if v is not None else None) for k, v in x.items()}
    out_one = OP.rnn_layer(GRU, *one.values(), False, [])[0]
    torch.testing.assert_close(out[4:5], out_one, rtol=0, atol=0)


# ---------------------------------------------------------------------------- input checks


def _lstm_args(**over):
    x = _inputs(LSTM, 2, 3, 4, 5, False, False, torch.float32)
    x.update(over)
    return x


@pytest.mark.parametrize(
    "mode, change, match",
    [
        (4, {}, "mode must be 0"),
        (LSTM, {"c0": None}, "c0 is required for LSTM"),
        (LSTM, {"c0": torch.zeros(2, 4, 6)}, r"c0 must have shape \[2, 4, 5\]"),
        (LSTM, {"h0": torch.zeros(2, 3, 5)}, r"h0 must have shape \[2, 4, 5\]"),
        (LSTM, {"gx": torch.zeros(2, 3, 4, 19)}, r"gx must be \[N, T, B, G\*H\]"),
        (LSTM, {"gx": torch.zeros(3, 4, 20)}, "gx must be"),
        (LSTM, {"w_hh": torch.zeros(3, 20, 5)}, r"w_hh must be \[N, G\*H, P\] with N = 2"),
        (LSTM, {"w_hh": torch.zeros(2, 21, 5)}, "must be 4 \\* hidden_size"),
        (LSTM, {"h0": torch.zeros(2, 4, 5, dtype=torch.float64)}, "h0 must have dtype Float"),
        (
            GRU,
            {
                "gx": torch.zeros(2, 3, 4, 15),
                "w_hh": torch.zeros(2, 15, 5),
                "w_hr": torch.zeros(2, 5, 5),
            },
            "w_hr .* only for LSTM",
        ),
    ],
)
def test_bad_inputs(mode, change, match):
    x = _lstm_args(**change)
    with pytest.raises(RuntimeError, match=match):
        OP.rnn_layer(mode, *x.values(), False, [])


@pytest.mark.parametrize(
    "sizes, match",
    [
        ([4, 2], "one entry per time step"),
        ([2, 3, 1], "non-increasing"),
        ([5, 2, 1], r"outside \[0, B = 4\]"),
        ([4, -1, -1], "outside"),
    ],
)
def test_bad_batch_sizes(sizes, match):
    x = _lstm_args()
    with pytest.raises(RuntimeError, match=match):
        OP.rnn_layer(LSTM, *x.values(), False, sizes)
    out, h_n, c_n, ws = OP.rnn_layer(LSTM, *x.values(), False, [])
    bargs = (out, h_n, c_n, x["w_hh"], None, None, x["h0"], x["c0"], out, ws, False, sizes)
    with pytest.raises(RuntimeError, match=match):
        OP.rnn_layer_backward(LSTM, *bargs)


def test_bad_backward_inputs():
    x = _lstm_args()
    out, h_n, c_n, ws = OP.rnn_layer(LSTM, *x.values(), False, [])

    def backward(**over):
        a = dict(grad_out=out, grad_hn=h_n, grad_cn=c_n, w_hh=x["w_hh"], b_hh=None, w_hr=None)
        a.update(h0=x["h0"], c0=x["c0"], out=out, ws=ws, reverse=False, batch_sizes=[])
        a.update(over)
        return OP.rnn_layer_backward(LSTM, *a.values())

    backward()  # the unchanged arguments are valid
    with pytest.raises(RuntimeError, match="grad_cn is required for LSTM"):
        backward(grad_cn=None)
    with pytest.raises(RuntimeError, match=r"ws must have shape \[2, 3, 4, 25\]"):
        backward(ws=ws[..., :20])
    with pytest.raises(RuntimeError, match="grad_out must have shape"):
        backward(grad_out=out[:, :2])
    with pytest.raises(RuntimeError, match="grad_hn must have dtype Float"):
        backward(grad_hn=h_n.double())
