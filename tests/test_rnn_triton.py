"""Tests of the Triton gate kernels of ``modelbatch::rnn_layer`` (``kernels/rnn.py``;
on CUDA, or on CPU under ``TRITON_INTERPRET=1``) against the pure-torch oracle
``modelbatch.ops.rnn``.

* Each gate function against its reference on odd shapes (N in {1, 3}, b in
  {1, 5}, H in {1, 7, 33}), reading non-contiguous views (``gx[:, t, :b]`` of a
  ``[N, T, B, K]`` tensor, ``c[:, :b]`` of ``[N, B, H]``, column slices of a
  workspace, a last axis that is not unit-stride), every dtype: float32 to
  about 1e-6, float64 to 1e-12, the half types to one ulp of the float32 result.
* Activations: tanh / sigmoid within a few ulp of torch's over |x| from 1e-30
  to 1e4 (both branches of tanh and the boundary between them), extreme and
  non-finite inputs (no NaN from a finite input; NaN propagates).
* Launch geometry: several programs on both grid axes, int64 offsets, empty steps.
* ``rnn_layer`` / ``rnn_layer_backward`` (``layer_loop`` with ``TritonGates``)
  against ``reference_layer`` / ``reference_layer_backward``: all four modes,
  LSTM with projection, GRU with and without ``b_hh``, reverse, packed
  ``batch_sizes``, float64, float32 and bfloat16.
* Bad input raises ValueError with a clear message.
* The CUDA ops against the references (needs a GPU).
"""

from __future__ import annotations

import pytest
import torch
from modelbatch.kernels import rnn as K
from modelbatch.ops import rnn as R

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# (rtol, atol) of a gate output against the reference: float32 and float64 on
# the same inputs; the half types against the float32 reference rounded to
# them (the kernels compute in float32 and round once), i.e. one ulp.
TOL = {
    torch.float32: (1e-6, 1e-6),
    torch.float64: (1e-12, 1e-12),
    torch.float16: (2**-10, 1e-5),
    torch.bfloat16: (2**-7, 1e-5),
}
SHAPES = [(n, b, h) for n in (1, 3) for b in (1, 5) for h in (1, 7, 33)]

# name -> (Triton function, reference, [(argument, width in H, layout)], extra args)
# Layouts: "step" = x[:, 1, :b] of [N, 3, b + 2, K] (gx[:, t, :b]); "state" =
# x[:, :b] of [N, b + 3, K] (h[:, :b]); "ws" = a column slice x[:, 1, :b, 3:3+K]
# of [N, 2, b + 1, K + 5] (ws[:, t, :b, 4H:]); "new" = contiguous (bmm outputs).
GATES = {
    "lstm": (
        K.lstm_gates,
        R.lstm_gates,
        [("gx", 4, "step"), ("gh", 4, "new"), ("c_prev", 1, "state")],
        (),
    ),
    "lstm_backward": (
        K.lstm_gates_backward,
        R.lstm_gates_backward,
        [
            ("dh", 1, "new"),
            ("dc", 1, "state"),
            ("act", 4, "ws"),
            ("c", 1, "ws"),
            ("c_prev", 1, "ws"),
        ],
        (),
    ),
    "gru": (
        K.gru_gates,
        R.gru_gates,
        [("gx", 3, "step"), ("gh", 3, "new"), ("h_prev", 1, "state")],
        (),
    ),
    "gru_backward": (
        K.gru_gates_backward,
        R.gru_gates_backward,
        [("dh", 1, "new"), ("ws", 4, "ws"), ("h_prev", 1, "step")],
        (),
    ),
    "rnn_tanh": (K.rnn_gates, R.rnn_gates, [("gx", 1, "step"), ("gh", 1, "new")], (False,)),
    "rnn_relu": (K.rnn_gates, R.rnn_gates, [("gx", 1, "step"), ("gh", 1, "new")], (True,)),
    "rnn_tanh_backward": (
        K.rnn_gates_backward,
        R.rnn_gates_backward,
        [("dh", 1, "new"), ("h", 1, "step")],
        (False,),
    ),
    "rnn_relu_backward": (
        K.rnn_gates_backward,
        R.rnn_gates_backward,
        [("dh", 1, "new"), ("h", 1, "step")],
        (True,),
    ),
}
FORWARD = ["lstm", "gru", "rnn_tanh", "rnn_relu"]

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (the op's CUDA kernel is Triton)"
)


def _view(values: torch.Tensor, layout: str) -> torch.Tensor:
    """``values [N, b, K]`` copied into a bigger tensor, returned as a view of
    the given layout (see ``GATES``)."""
    n, b, k = values.shape
    if layout == "new":
        return values.clone()
    if layout == "step":
        big = torch.full((n, 3, b + 2, k), float("nan"), dtype=values.dtype, device=values.device)
        view = big[:, 1, :b]
    elif layout == "state":
        big = torch.full((n, b + 3, k), float("nan"), dtype=values.dtype, device=values.device)
        view = big[:, :b]
    elif layout == "ws":
        big = torch.full(
            (n, 2, b + 1, k + 5), float("nan"), dtype=values.dtype, device=values.device
        )
        view = big[:, 1, :b, 3 : 3 + k]
    elif layout == "strided":  # last axis not unit-stride
        big = torch.full((n, b, 2 * k), float("nan"), dtype=values.dtype, device=values.device)
        view = big[..., ::2]
    view.copy_(values)
    return view


# The backward's saved gates: i, f, g, o (LSTM act), r, z, n, hn (GRU ws).
ACTIVATED = {
    "act": (torch.sigmoid, torch.sigmoid, torch.tanh, torch.sigmoid),
    "ws": (torch.sigmoid, torch.sigmoid, torch.tanh, torch.clone),
}


def _inputs(name, n, b, h, dtype, device, seed=0, layout=None, values=None):
    """The arguments of gate function ``name``: ``randn * 2`` (which reaches both
    branches of tanh; activated where ``ACTIVATED`` says), or ``values(shape)``."""
    _, _, spec, extra = GATES[name]
    g = torch.Generator().manual_seed(seed)
    args = []
    for arg, k, lay in spec:
        v = values((n, b, k * h)) if values else torch.randn(n, b, k * h, generator=g) * 2
        if values is None and arg in ACTIVATED and h:  # gate values in their ranges
            v = torch.cat([f(c) for f, c in zip(ACTIVATED[arg], v.split(h, -1))], -1)
        args.append(_view(v.to(dtype=dtype, device=device), layout or lay))
    return args, extra


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def _check_gate(name, args, extra, dtype):
    """Run the kernel and the reference on ``args``; assert they agree."""
    fn, ref_fn, _, _ = GATES[name]
    out = _as_tuple(fn(*args, *extra))
    if dtype in (torch.float16, torch.bfloat16):
        ref = tuple(r.to(dtype) for r in _as_tuple(ref_fn(*[a.float() for a in args], *extra)))
    else:
        ref = _as_tuple(ref_fn(*args, *extra))
    rtol, atol = TOL[dtype]
    assert len(out) == len(ref)
    for j, (o, r) in enumerate(zip(out, ref)):
        assert o.dtype == dtype and o.shape == r.shape and o.is_contiguous(), (name, j)
        assert not o.isnan().any(), (name, j)
        torch.testing.assert_close(
            o, r, rtol=rtol, atol=atol, msg=lambda m, j=j: f"{name}[{j}]: {m}"
        )
    return out


# --------------------------------------------------------------------------
# Gate functions against the reference
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(GATES))
def test_gate_matches_reference(name, dtype, triton_device):
    for i, (n, b, h) in enumerate(SHAPES):
        args, extra = _inputs(name, n, b, h, dtype, triton_device, seed=i)
        _check_gate(name, args, extra, dtype)
    # All contiguous, and all with a last axis that is not unit-stride (copied).
    for layout in ("new", "strided"):
        args, extra = _inputs(name, 3, 5, 7, dtype, triton_device, layout=layout)
        _check_gate(name, args, extra, dtype)


def test_triton_gates_class():
    """TritonGates has ReferenceGates' six functions, bound to the kernels."""
    kernels = {
        "lstm": K.lstm_gates,
        "lstm_backward": K.lstm_gates_backward,
        "gru": K.gru_gates,
        "gru_backward": K.gru_gates_backward,
        "rnn": K.rnn_gates,
        "rnn_backward": K.rnn_gates_backward,
    }
    for name, fn in kernels.items():
        assert getattr(K.TritonGates, name) is fn
        assert callable(getattr(R.ReferenceGates, name))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_activation_accuracy(dtype, triton_device):
    """tanh (RNN_TANH with gh = 0) and sigmoid (LSTM's i gate) within a few ulp
    of torch's, both signs, |x| from 1e-30 to 1e4, dense around tanh's branch
    point 0.55; saturation exactly +-1 / 0 / 1 far out."""
    mags = torch.cat(
        [
            torch.logspace(-30, 4, 1500, dtype=torch.float64),
            torch.linspace(0.5, 0.6, 301, dtype=torch.float64),
            torch.tensor([0.55, 20.0, 40.0, 100.0, 1e4], dtype=torch.float64),
        ]
    )
    x64 = torch.cat([mags, -mags, torch.zeros(1, dtype=torch.float64)])
    x = x64.to(dtype)
    exact_tanh, exact_sig = x.double().tanh(), x.double().sigmoid()
    row = x[None, None].to(triton_device)
    t = K.rnn_gates(row, torch.zeros_like(row), False)[0, 0].cpu()
    m = x.numel()
    gx = torch.zeros(1, 1, 4 * m, dtype=dtype, device=triton_device)
    gx[..., :m] = row
    act = K.lstm_gates(gx, torch.zeros_like(gx), torch.zeros_like(row))[2][0, 0].cpu()
    s = act[:m]
    eps = torch.finfo(dtype).eps
    tiny = torch.finfo(dtype).tiny
    for got, exact, what in ((t, exact_tanh, "tanh"), (s, exact_sig, "sigmoid")):
        normal = exact.abs() >= tiny
        rel = ((got.double() - exact).abs() / exact.abs())[normal]
        assert rel.max() <= 4 * eps, (
            f"{what}: {rel.max() / eps:.2f} ulp at {x[normal][rel.argmax()]}"
        )
        # Subnormal results (sigmoid of x < -87 in float32): absolutely tiny.
        assert ((got.double() - exact).abs()[~normal] <= tiny).all(), what
    assert (t[x >= 20] == 1).all() and (t[x <= -20] == -1).all()
    assert (s[x >= 40] == 1).all() and (s[x == -1e4] == 0).all()
    assert t[-1] == 0 and s[-1] == 0.5  # x = 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", FORWARD)
def test_extreme_inputs(name, dtype, triton_device):
    """Pre-activations of +-100 and +-1e4 (and mixed signs of gx and gh, which
    cancel or add up): finite results, no NaN, equal to the reference's."""
    vals = torch.tensor([100.0, -100.0, 1e4, -1e4, 0.0, 3.0, -0.5])

    def values(shape):
        g = torch.Generator().manual_seed(sum(shape))
        return vals[torch.randint(0, len(vals), shape, generator=g)]

    args, extra = _inputs(name, 3, 5, 7, dtype, triton_device, values=values)
    if name in ("lstm", "gru"):  # a moderate state (c_prev / h_prev)
        args[2].copy_(torch.randn(args[2].shape).to(dtype))
    out = _check_gate(name, args, extra, dtype)
    for o in out:
        assert o.isfinite().all()


@pytest.mark.parametrize("name", FORWARD)
def test_nonfinite_inputs(name, triton_device):
    """+-inf pre-activations saturate the gates; NaN propagates (as torch's)."""
    inf, nan = float("inf"), float("nan")
    vals = torch.tensor([inf, -inf, nan, 1.0])

    def values(shape):
        g = torch.Generator().manual_seed(1)
        return vals[torch.randint(0, len(vals), shape, generator=g)]

    args, extra = _inputs(name, 2, 3, 5, torch.float32, triton_device, values=values)
    if name in ("lstm", "gru"):
        args[1].zero_()  # gh finite: gx alone decides, no inf - inf
        args[2].copy_(torch.randn(args[2].shape))
    else:
        args[1].zero_()
    fn, ref_fn, _, _ = GATES[name]
    out, ref = _as_tuple(fn(*args, *extra)), _as_tuple(ref_fn(*args, *extra))
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, rtol=1e-6, atol=1e-6, equal_nan=True)
    assert out[0].isnan().any() and not out[0].isnan().all()


def test_relu_backward_selects(triton_device):
    """RNN_RELU's backward selects dh where h > 0 and 0 elsewhere (as torch's
    threshold_backward): an infinite grad at an inactive unit gives 0."""
    dh = torch.tensor([[[float("inf"), 2.0, -3.0, float("inf")]]], device=triton_device)
    h = torch.tensor([[[0.0, 1.0, 0.0, 0.5]]], device=triton_device)
    out = K.rnn_gates_backward(dh, h, True)
    assert out.tolist() == [[[0.0, 2.0, 0.0, float("inf")]]]


# --------------------------------------------------------------------------
# Launch geometry
# --------------------------------------------------------------------------


def test_geometry():
    for rows, h in [(1, 1), (15, 7), (15, 33), (2, 300), (1000, 3), (7, 5000)]:
        br, bh = K.geometry(rows, h)
        assert bh & (bh - 1) == 0 and br & (br - 1) == 0  # powers of two
        assert bh >= min(h, K.MAX_BLOCK_H) and bh <= K.MAX_BLOCK_H
        assert br * bh <= max(K.TILE, bh) and br <= max(1, 2 * rows)
    assert K.geometry(1000, 3) == (K.TILE // 4, 4)  # many rows per program for small H
    assert K.geometry(1, 1000) == (1, K.MAX_BLOCK_H)


@pytest.mark.parametrize("name", ["lstm", "gru_backward", "lstm_backward"])
def test_many_programs(name, triton_device):
    """Several programs on both grid axes (H = 300 > MAX_BLOCK_H, rows over
    several blocks) and many rows per program (H = 3): partial tiles masked."""
    for n, b, h in [(3, 5, 300), (2, 70, 3)]:
        br, bh = K.geometry(n * b, h)
        assert (n * b + br - 1) // br > 1 or (h + bh - 1) // bh > 1
        args, extra = _inputs(name, n, b, h, torch.float32, triton_device, seed=h)
        _check_gate(name, args, extra, torch.float32)


@pytest.mark.parametrize("name", ["lstm", "gru", "lstm_backward", "rnn_relu"])
def test_int64_offsets(name, triton_device, monkeypatch):
    """The int64-offset variant (used from 2**31 addressed elements on; forced
    here by lowering the threshold) computes the same values."""
    args, extra = _inputs(name, 3, 5, 7, torch.float64, triton_device, seed=3)
    expected = _as_tuple(GATES[name][0](*args, *extra))
    monkeypatch.setattr(K, "INT64_INDEX_FROM", 0)
    out = _check_gate(name, args, extra, torch.float64)
    for o, e in zip(out, expected):
        assert torch.equal(o, e)


@pytest.mark.parametrize("name", list(GATES))
def test_empty_step(name, triton_device):
    """No active rows (b = 0) or H = 0: empty outputs of the right shapes."""
    for n, b, h in [(3, 0, 7), (2, 4, 0)]:
        args, extra = _inputs(name, n, b, h, torch.float32, triton_device)
        out = _as_tuple(GATES[name][0](*args, *extra))
        ref = _as_tuple(GATES[name][1](*args, *extra))
        assert [o.shape for o in out] == [r.shape for r in ref]
        assert all(o.numel() == 0 for o in out)


# --------------------------------------------------------------------------
# The layer: layer_loop with TritonGates against the reference loop
# --------------------------------------------------------------------------

# (mode, projection size or None, GRU b_hh)
CONFIGS = {
    "lstm": (R.LSTM, None, False),
    "lstm_proj": (R.LSTM, 3, False),
    "gru_bias": (R.GRU, None, True),
    "gru_nobias": (R.GRU, None, False),
    "rnn_tanh": (R.RNN_TANH, None, False),
    "rnn_relu": (R.RNN_RELU, None, False),
}


def _layer_args(config, n, t_len, b, h, dtype, device, seed=0):
    mode, proj, bias = CONFIGS[config]
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(dtype=dtype, device=device)
    gates = R.GATES[mode]
    p = proj or h
    gx = rnd(n, t_len, b, gates * h)
    w_hh = rnd(n, gates * h, p) * 0.5
    b_hh = rnd(n, gates * h) if bias else None
    w_hr = rnd(n, p, h) * 0.5 if proj else None
    h0 = rnd(n, b, p)
    c0 = rnd(n, b, h) if mode == R.LSTM else None
    return mode, gx, w_hh, b_hh, w_hr, h0, c0


def _compare_layer(args, reverse, batch_sizes, dtype, rtol, atol, seed=1):
    mode, gx, w_hh, b_hh, w_hr, h0, c0 = args
    out = K.rnn_layer(mode, gx, w_hh, b_hh, w_hr, h0, c0, reverse, batch_sizes)
    ref = R.reference_layer(mode, gx, w_hh, b_hh, w_hr, h0, c0, reverse, batch_sizes)
    names = ["out", "h_n", "c_n", "ws"]
    for name, o, r in zip(names, out, ref):
        assert o.dtype == dtype and o.shape == r.shape, name
        torch.testing.assert_close(o, r, rtol=rtol, atol=atol, msg=lambda m, s=name: f"{s}: {m}")
    g = torch.Generator().manual_seed(seed)
    rnd = lambda t: torch.randn(t.shape, generator=g).to(dtype=dtype, device=t.device)
    grad_out, grad_hn = rnd(ref[0]), rnd(ref[1])
    grad_cn = rnd(ref[2]) if mode == R.LSTM else None
    bwd_args = (grad_out, grad_hn, grad_cn, w_hh, b_hh, w_hr, h0, c0, ref[0], ref[3])
    d = K.rnn_layer_backward(mode, *bwd_args, reverse, batch_sizes)
    d_ref = R.reference_layer_backward(mode, *bwd_args, reverse, batch_sizes)
    names = ["d_gx", "d_w_hh", "d_b_hh", "d_w_hr", "d_h0", "d_c0"]
    for name, o, r in zip(names, d, d_ref):
        assert o.dtype == dtype and o.shape == r.shape, name
        torch.testing.assert_close(o, r, rtol=rtol, atol=atol, msg=lambda m, s=name: f"{s}: {m}")
    return out, d


@pytest.mark.parametrize("packed", [False, True], ids=["full", "packed"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_layer_matches_reference(config, reverse, packed, triton_device):
    """float64: every output and gradient of the layer as the reference loop's."""
    t_len, batch_sizes = (4, [4, 3, 3, 1]) if packed else (5, [])
    args = _layer_args(config, 2, t_len, 4, 5, torch.float64, triton_device)
    out, d = _compare_layer(args, reverse, batch_sizes, torch.float64, 1e-10, 1e-10)
    if packed:  # rows past batch_sizes[t] are zero (the reference's semantics)
        assert (out[0][:, 3, 1:] == 0).all() and (d[0][:, 3, 1:] == 0).all()
        assert (out[0][:, 1, :3] != 0).any()


@pytest.mark.parametrize(
    "dtype, rtol, atol", [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 2**-7, 1e-3)], ids=str
)
@pytest.mark.parametrize("config", ["lstm_proj", "gru_bias", "rnn_tanh"])
def test_layer_dtypes(config, dtype, rtol, atol, triton_device):
    """float32, and bfloat16 (the loop computes in float32, stores bfloat16)."""
    args = _layer_args(config, 3, 4, 4, 7, dtype, triton_device, seed=5)
    _compare_layer(args, True, [4, 3, 3, 1], dtype, rtol, atol)


# --------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.zeros(*shape, dtype=dtype, device=device)


GATE_ERRORS = [
    (
        lambda: K.lstm_gates(_t(2, 3, 28), _t(2, 3, 24), _t(2, 3, 7)),
        r"gh has shape \(2, 3, 24\), expected \[N=2, b=3, 4H=28\]",
    ),
    (
        lambda: K.lstm_gates(_t(2, 3, 27), _t(2, 3, 27), _t(2, 3, 7)),
        r"gx has shape \(2, 3, 27\), expected .*4H=28.*H=7 from c_prev",
    ),
    (
        lambda: K.lstm_gates(_t(2, 3, 28), _t(2, 3, 28), _t(2, 4, 7)),
        r"c_prev has shape \(2, 4, 7\), expected \[N=2, b=3, H=7\]",
    ),
    (
        lambda: K.gru_gates(_t(2, 3, 21), _t(3, 3, 21), _t(2, 3, 7)),
        r"gh has shape \(3, 3, 21\), expected \[N=2",
    ),
    (
        lambda: K.gru_gates(_t(2, 3, 21), _t(2, 3, 21), _t(3, 7)),
        r"h_prev must be a 3-D \[N, b, H\] tensor, got \(3, 7\)",
    ),
    (
        lambda: K.lstm_gates_backward(
            _t(2, 3, 7), _t(2, 3, 7), _t(2, 3, 21), _t(2, 3, 7), _t(2, 3, 7)
        ),
        r"act has shape \(2, 3, 21\), expected .*4H=28",
    ),
    (
        lambda: K.gru_gates_backward(_t(2, 3, 7), _t(2, 3, 21), _t(2, 3, 7)),
        r"ws has shape \(2, 3, 21\), expected .*4H=28",
    ),
    (
        lambda: K.rnn_gates(_t(2, 3, 7), None, False),
        r"gh must be a 3-D \[N, b, H\] tensor, got NoneType",
    ),
    (
        lambda: K.rnn_gates_backward(_t(2, 3, 7), _t(2, 3, 8), True),
        r"h has shape \(2, 3, 8\), expected \[N=2, b=3, H=7\]",
    ),
    (
        lambda: K.rnn_gates(_t(2, 3, 7), _t(2, 3, 7, dtype=torch.float64), True),
        r"share a dtype; gh is torch.float64, gx is torch.float32",
    ),
    (
        lambda: K.rnn_gates(_t(2, 3, 7, dtype=torch.int32), _t(2, 3, 7, dtype=torch.int32), True),
        r"gx has dtype torch.int32; supported",
    ),
    (
        lambda: K.gru_gates(_t(2, 3, 21), _t(2, 3, 21), _t(2, 3, 7, device="meta")),
        r"share a device; h_prev is on meta",
    ),
]


@pytest.mark.parametrize("call, match", GATE_ERRORS)
def test_gate_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_gate_wrong_device():
    """Under the interpreter the kernels take CPU tensors (on CUDA: CUDA tensors)."""
    if K._interpreting(K._lstm_kernel):
        match = "under TRITON_INTERPRET=1 the kernel takes CPU tensors, got meta"
        args = [
            _t(2, 3, 28, device="meta"),
            _t(2, 3, 28, device="meta"),
            _t(2, 3, 7, device="meta"),
        ]
    else:
        match = "the Triton kernel takes CUDA tensors"
        args = [_t(2, 3, 28), _t(2, 3, 28), _t(2, 3, 7)]
    with pytest.raises(ValueError, match=match):
        K.lstm_gates(*args)


def _lstm(**over):
    """Valid LSTM forward arguments (N=2, T=3, B=4, H=5), with overrides."""
    args = dict(
        mode=R.LSTM, gx=_t(2, 3, 4, 20), w_hh=_t(2, 20, 5), b_hh=None, w_hr=None,
        h0=_t(2, 4, 5), c0=_t(2, 4, 5), reverse=False, batch_sizes=[],
    )  # fmt: skip
    args.update(over)
    return args


LAYER_ERRORS = [
    (dict(mode=4), r"mode must be 0 \(LSTM\), 1 \(GRU\), 2 \(RNN_TANH\) or 3 \(RNN_RELU\), got 4"),
    (dict(gx=_t(2, 4, 20)), r"gx must be a 4-D \[N, T, B, G\*H\] tensor, got \(2, 4, 20\)"),
    (dict(gx=_t(2, 3, 4, 16)), r"gx has shape \(2, 3, 4, 16\), expected G\*H = 20"),
    (
        dict(w_hh=_t(2, 16, 5)),
        r"w_hh must be \[N, 4H, P\] \(H=5\) = \[2, 20, 5\], got \(2, 16, 5\)",
    ),
    (dict(w_hh=_t(3, 20, 5)), r"w_hh must be \[N=2, G\*H, P\]"),
    (dict(b_hh=_t(2, 20)), r"b_hh is only taken by GRU"),
    (
        dict(mode=R.GRU, gx=_t(2, 3, 4, 15), w_hh=_t(2, 15, 5), w_hr=_t(2, 5, 5)),
        r"w_hr \(the projection\) is only taken by LSTM",
    ),
    (
        dict(mode=R.GRU, gx=_t(2, 3, 4, 15), w_hh=_t(2, 15, 5), b_hh=_t(2, 20)),
        r"b_hh must be \[N, 3H\] = \[2, 15\]",
    ),
    (dict(w_hr=_t(2, 5, 6)), r"w_hh must be \[N, 4H, P\] \(H=6\) = \[2, 24, 5\]"),
    (dict(c0=None), r"c0 must be \[N, B, H\] = \[2, 4, 5\], got NoneType"),
    (dict(h0=_t(2, 3, 5)), r"h0 must be \[N, B, P\] = \[2, 4, 5\], got \(2, 3, 5\)"),
    (dict(h0=_t(2, 4, 5, dtype=torch.float64)), r"h0 is torch.float64, expected torch.float32"),
    (
        dict(batch_sizes=[4, 3]),
        r"batch_sizes must be empty or T=3 non-increasing sizes in \[0, B=4\], got \[4, 3\]",
    ),
    (dict(batch_sizes=[3, 4, 1]), r"non-increasing"),
    (dict(batch_sizes=[5, 4, 1]), r"in \[0, B=4\]"),
    (
        dict(gx=_t(2, 3, 4, 20, dtype=torch.int64), w_hh=_t(2, 20, 5, dtype=torch.int64)),
        r"dtype torch.int64 is not supported",
    ),
]


@pytest.mark.parametrize("over, match", LAYER_ERRORS)
def test_layer_bad_input(over, match):
    with pytest.raises(ValueError, match=match):
        K.rnn_layer(**_lstm(**over))


def test_layer_backward_bad_input(triton_device):
    t = lambda *shape: _t(*shape, device=triton_device)
    good = dict(
        mode=R.LSTM, grad_out=t(2, 3, 4, 5), grad_hn=t(2, 4, 5), grad_cn=t(2, 4, 5),
        w_hh=t(2, 20, 5), b_hh=None, w_hr=None, h0=t(2, 4, 5), c0=t(2, 4, 5), out=t(2, 3, 4, 5),
        ws=t(2, 3, 4, 25), reverse=False, batch_sizes=[],
    )  # fmt: skip
    d = K.rnn_layer_backward(**good)  # valid: runs
    assert d[0].shape == (2, 3, 4, 20) and d[5].shape == (2, 4, 5)
    cases = [
        (
            dict(ws=t(2, 3, 4, 20)),
            r"ws must be \[N, T, B, 5H\] = \[2, 3, 4, 25\], got \(2, 3, 4, 20\)",
        ),
        (dict(grad_cn=None), r"grad_cn must be \[N, B, H\] = \[2, 4, 5\], got NoneType"),
        (dict(grad_out=t(2, 3, 3, 5)), r"grad_out must be \[N, T, B, P\] = \[2, 3, 4, 5\]"),
        (dict(grad_hn=t(2, 4, 6)), r"grad_hn must be \[N, B, P\] = \[2, 4, 5\]"),
        (dict(out=t(2, 3, 4)), r"out must be a 4-D \[N, T, B, P\] tensor"),
        (dict(mode=7), r"mode must be"),
        (dict(ws=_t(2, 3, 4, 25, device="meta")), r"ws is on meta, expected"),
    ]
    for over, match in cases:
        with pytest.raises(ValueError, match=match):
            K.rnn_layer_backward(**{**good, **over})


# --------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cuda_ops_match_reference(dtype):
    """On a GPU: the gate kernels, and the registered CUDA kernels of
    ``modelbatch::rnn_layer`` / ``rnn_layer_backward`` (Triton) against the
    references on the same device."""
    if K._interpreting(K._lstm_kernel):
        pytest.skip("TRITON_INTERPRET=1: the kernels take CPU tensors")
    for name in GATES:
        args, extra = _inputs(name, 3, 5, 33, dtype, "cuda")
        _check_gate(name, args, extra, dtype)
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    for config in CONFIGS:
        mode, gx, w_hh, b_hh, w_hr, h0, c0 = _layer_args(config, 3, 4, 4, 7, dtype, "cuda")
        fwd = (mode, gx, w_hh, b_hh, w_hr, h0, c0, True, [4, 3, 3, 1])
        out = torch.ops.modelbatch.rnn_layer(*fwd)
        ref = R.reference_layer(*fwd)
        for o, r in zip(out, ref):
            assert o.is_cuda
            torch.testing.assert_close(o, r, rtol=rtol, atol=rtol)
        grads = [torch.randn_like(ref[0]), torch.randn_like(ref[1])]
        grads.append(torch.randn_like(ref[2]) if mode == R.LSTM else None)
        bwd = (mode, *grads, w_hh, b_hh, w_hr, h0, c0, ref[0], ref[3], True, [4, 3, 3, 1])
        for o, r in zip(
            torch.ops.modelbatch.rnn_layer_backward(*bwd), R.reference_layer_backward(*bwd)
        ):
            torch.testing.assert_close(o, r, rtol=rtol, atol=rtol)
