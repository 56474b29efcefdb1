"""Triton gate kernels of ``modelbatch::rnn_layer`` / ``rnn_layer_backward``: the
fused elementwise part of one time step of N recurrent models (LSTM, GRU,
RNN_TANH, RNN_RELU), one launch per step.

The time loop itself is ``modelbatch.ops.rnn.layer_loop`` /
``layer_loop_backward`` (per step one batched GEMM ``h_prev @ w_hh^T`` for all N
models, then one gate call); :class:`TritonGates` gives it the gate functions
below, and :func:`rnn_layer` / :func:`rnn_layer_backward` are that loop with
them (the ops' CUDA kernels).

Shapes. A gate function sees one step over the ``b`` active rows of every
model: every argument is a ``[N, b, K]`` tensor with ``K`` = ``H`` or a multiple
of it (``G * H`` gate pre-activations, ``4H`` / ``5H`` workspaces), any strides
on the first two axes (e.g. ``gx[:, t, :b]`` of a contiguous ``[N, T, B, 4H]``
tensor, strides ``(T*B*4H, 4H, 1)``, or ``c[:, :b]`` of ``[N, B, H]``). The last
axis should be unit-stride (an argument whose last axis is not is copied first).
All arguments of a call share one dtype (float32, float64, float16 or bfloat16)
and one device. The outputs are new contiguous tensors of that dtype.

Semantics: those of the pure-torch gate functions of ``modelbatch.ops.rnn``
(``lstm_gates``, ``lstm_gates_backward``, ``gru_gates``, ``gru_gates_backward``,
``rnn_gates``, ``rnn_gates_backward``; chunks of ``H`` along the last axis)::

    lstm(gx, gh, c_prev) -> (h_raw, c, act)
        i, f, g, o = sig, sig, tanh, sig of (gx + gh);  c = f * c_prev + i * g
        h_raw = o * tanh(c);  act = [i, f, g, o]                       [N, b, 4H]
    lstm_backward(dh, dc, act, c, c_prev) -> (d_pre [N, b, 4H], dc_prev)
        dc' = dc + dh * o * (1 - tanh(c)^2);  dc_prev = dc' * f
        d_pre = [dc' g i (1-i), dc' c_prev f (1-f), dc' i (1-g^2), dh tanh(c) o (1-o)]
    gru(gx, gh, h_prev) -> (h, ws)        (gh includes b_hh)
        r = sig(xr + hr);  z = sig(xz + hz);  n = tanh(xn + r * hn)
        h = (h_prev - n) * z + n;  ws = [r, z, n, hn]                  [N, b, 4H]
    gru_backward(dh, ws, h_prev) -> (d_gx [N, b, 3H], d_gh [N, b, 3H], dh * z)
        dn = dh (1-z) (1-n^2);  dz = dh (h_prev-n) z (1-z);  dr = dn hn r (1-r)
        d_gx = [dr, dz, dn];  d_gh = [dr, dz, dn * r]
    rnn(gx, gh, relu) -> h = relu(gx + gh) or tanh(gx + gh)
    rnn_backward(dh, h, relu) -> dh * (h > 0) or dh * (1 - h^2)

computed in float32 for float32 / float16 / bfloat16 and in float64 for float64
(one rounding to the storage dtype at the end, bfloat16 to nearest even: see
``kernels.adam._to_storage``). Two deliberate differences at the edges: the
RNN_RELU backward selects (``where(h > 0, dh, 0)``, as torch's
``threshold_backward``) instead of multiplying, so an infinite ``dh`` at an
inactive unit gives 0, not NaN; and ``relu`` keeps a NaN pre-activation NaN.

Why it is built this way:

* One kernel per gate function, fusing everything the step does elementwise:
  e.g. the LSTM forward reads the four gate pre-activations from ``gx`` and
  ``gh`` and ``c_prev``, and writes ``h_raw``, ``c`` and ``act`` in one pass; no
  ``[N, b, 4H]`` temporary is materialised. The sum ``gx + gh`` is formed in
  registers, so ``gx`` is read in place from the ``[N, T, B, G*H]`` tensor.
* Rows are the ``R = N * b`` (model, active row) pairs; the grid is 2-D,
  ``(cdiv(R, BLOCK_R), cdiv(H, BLOCK_H))``, and a program handles a
  ``[BLOCK_R, BLOCK_H]`` tile of hidden units, each unit with all its gates.
  ``BLOCK_H`` is ``H`` rounded up to a power of two, at most ``MAX_BLOCK_H``;
  ``BLOCK_R`` fills the tile to about ``TILE`` units (at most the rows there
  are), so small ``H`` (many rows per program) and large ``H`` (many column
  blocks) both make full programs, and any ``H`` works by masking. The row of
  an input element is ``(r // b) * stride0 + (r % b) * stride1``, computed once
  per tile row; columns are unit-stride, so loads and stores coalesce.
* Offsets are int32 unless an argument (or the row index plus a block) reaches
  2**31 elements, then int64 (``INT64``). The column blocks go on grid axis 1,
  limited by CUDA to 65535 (``H`` up to ``65535 * MAX_BLOCK_H``).
* Stable activations, from ``e = exp(y)`` of a non-positive ``y`` only (never
  overflows): ``sigmoid(x) = 1 / (1 + e)`` for ``x >= 0``, ``e / (1 + e)``
  below, with ``e = exp(-|x|)``; ``tanh(x) = sign(x) (1 - e) / (1 + e)`` with
  ``e = exp(-2|x|)`` for ``|x| >= 0.55`` (``e <= 1/3``: no cancellation), and
  its odd Taylor polynomial below (9 terms in float32, 18 in float64,
  truncation under half an ulp), which keeps the relative accuracy of small
  values where ``1 - e`` would cancel. NaN propagates, +-inf saturate (clamps
  are selects: ``tl.minimum`` / ``tl.maximum`` would turn a NaN into a number). float32
  ``exp`` is range-reduced (``_exp_neg``) because Triton's is
  ``ex2.approx(y * log2(e))`` on NVIDIA GPUs, and float32 divisions are
  ``div_rn`` (plain ``/`` is approximate there too), so the activations are
  within a few ulp of torch's on the GPU as in the interpreter.

On CUDA these are the op's gate kernels; on CPU tensors they run only under
``TRITON_INTERPRET=1`` (how the tests check them without a GPU).
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl
from modelbatch.ops import rnn as rnn_ops

from .adam import _TL_DTYPES, _compute_dtype, _interpreting, _to_storage, check_kernel_device

#: Hidden units (tile elements, each with all its gates) per program, about.
TILE = 512
#: Largest tile width along the hidden axis (a power of two).
MAX_BLOCK_H = 256
#: Warps per program on the GPU.
NUM_WARPS = 4
#: CUDA's limit on grid axis 1 (the column blocks).
MAX_GRID_Y = 65535
#: From this many addressed elements on, offsets are computed in int64.
INT64_INDEX_FROM = 2**31 - 1

_PREFIX = "modelbatch.kernels.rnn."

# float32 exp: log2(e) and ln(2) split in a high part (exact products with small
# integers) and a low part.
_LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
_LN2_HI: tl.constexpr = tl.constexpr(0.693145751953125)
_LN2_LO: tl.constexpr = tl.constexpr(1.4286068203094173e-06)
# tanh's Taylor coefficients (of x^3, x^5, ..., x^35) for |x| < _TANH_SMALL.
_TANH_SMALL: tl.constexpr = tl.constexpr(0.55)
_T1: tl.constexpr = tl.constexpr(-0.3333333333333333)
_T2: tl.constexpr = tl.constexpr(0.13333333333333333)
_T3: tl.constexpr = tl.constexpr(-0.05396825396825397)
_T4: tl.constexpr = tl.constexpr(0.021869488536155203)
_T5: tl.constexpr = tl.constexpr(-0.008863235529902197)
_T6: tl.constexpr = tl.constexpr(0.003592128036572481)
_T7: tl.constexpr = tl.constexpr(-0.0014558343870513183)
_T8: tl.constexpr = tl.constexpr(0.000590027440945586)
_T9: tl.constexpr = tl.constexpr(-0.00023912911424355248)
_T10: tl.constexpr = tl.constexpr(9.691537956929451e-05)
_T11: tl.constexpr = tl.constexpr(-3.927832388331683e-05)
_T12: tl.constexpr = tl.constexpr(1.5918905069328964e-05)
_T13: tl.constexpr = tl.constexpr(-6.451689215655431e-06)
_T14: tl.constexpr = tl.constexpr(2.6147711512907546e-06)
_T15: tl.constexpr = tl.constexpr(-1.0597268320104654e-06)
_T16: tl.constexpr = tl.constexpr(4.294911078273806e-07)
_T17: tl.constexpr = tl.constexpr(-1.7406618963571648e-07)


# --------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------


@triton.jit
def _div(a, b):
    """``a / b`` correctly rounded (``div_rn`` in float32; float64 ``/`` is exact)."""
    if a.dtype == tl.float64:
        q = a / b
    else:
        q = tl.div_rn(a, b)
    return q


@triton.jit
def _exp_neg(y):
    """``exp(y)`` for ``y <= 0`` (or NaN), to a few ulp, never overflowing.

    float32: ``tl.exp`` is ``ex2.approx(y * log2(e))`` on NVIDIA GPUs, whose
    error grows with ``|y|`` (the rounding of the product); the Cody-Waite
    reduction ``y = k ln2 + r``, ``|r| <= ln2 / 2``, keeps it a few ulp:
    ``exp(y) = 2^k exp(r)`` (``2^k`` exact; ``y`` is clamped at -104, where
    ``exp`` is 0 in float32, so that ``k`` stays small). float64 ``tl.exp`` is
    libdevice's accurate ``exp``.
    """
    if y.dtype == tl.float64:
        e = tl.exp(y)
    else:
        y = tl.where(y < -104.0, -104.0, y)  # a select: NaN stays NaN
        k = tl.floor(y * _LOG2E + 0.5)
        r = (y - k * _LN2_HI) - k * _LN2_LO
        e = tl.exp2(k) * tl.exp(r)
    return e


@triton.jit
def _sigmoid(x):
    e = _exp_neg(-tl.abs(x))  # in [0, 1]
    s = _div(tl.full(x.shape, 1.0, x.dtype), 1.0 + e)
    return tl.where(x >= 0, s, e * s)


@triton.jit
def _horner(p, x2, c: tl.constexpr):
    """``p * x2 + c``, with ``c`` a constant of ``p``'s dtype (a float literal
    would be a float32 constant, too coarse for float64)."""
    return p * x2 + tl.full([], c, p.dtype)


@triton.jit
def _tanh(x):
    a = tl.abs(x)
    # |x| >= 0.55: (1 - e) / (1 + e), e = exp(-2|x|) <= 1/3, no cancellation.
    e = _exp_neg(-2.0 * a)
    big = _div(1.0 - e, 1.0 + e)
    big = tl.where(x < 0, -big, big)
    # |x| < 0.55: x + x^3 * P(x^2) (lanes of the other branch see 0, no overflow).
    small = a < _TANH_SMALL
    xs = tl.where(small, x, 0.0)
    x2 = xs * xs
    if x.dtype == tl.float64:
        p = tl.full(x.shape, _T17, x.dtype)
        p = _horner(p, x2, _T16)
        p = _horner(p, x2, _T15)
        p = _horner(p, x2, _T14)
        p = _horner(p, x2, _T13)
        p = _horner(p, x2, _T12)
        p = _horner(p, x2, _T11)
        p = _horner(p, x2, _T10)
        p = _horner(p, x2, _T9)
        p = _horner(p, x2, _T8)
    else:
        p = tl.full(x.shape, _T8, x.dtype)
    p = _horner(p, x2, _T7)
    p = _horner(p, x2, _T6)
    p = _horner(p, x2, _T5)
    p = _horner(p, x2, _T4)
    p = _horner(p, x2, _T3)
    p = _horner(p, x2, _T2)
    p = _horner(p, x2, _T1)
    return tl.where(small, xs + xs * (x2 * p), big)


@triton.jit
def _tile(R, H, INT64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """This program's rows ``[BLOCK_R]``, columns ``[BLOCK_H]`` and tile mask."""
    pid_r = tl.program_id(0)
    pid_h = tl.program_id(1)
    if INT64:
        pid_r = pid_r.to(tl.int64)
        pid_h = pid_h.to(tl.int64)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (rows < R)[:, None] & (cols < H)[None, :]
    return rows, cols, mask


@triton.jit
def _offs(rows, cols, B, s0, s1):
    """Offsets ``[BLOCK_R, BLOCK_H]`` of column ``cols`` of rows ``rows`` (row
    ``r`` is row ``r % B`` of model ``r // B``) in a tensor of strides
    ``(s0, s1, 1)``."""
    n = rows // B
    return (n * s0 + (rows - n * B) * s1)[:, None] + cols[None, :]


@triton.jit
def _ld(ptr, mask, COMPUTE: tl.constexpr):
    return tl.load(ptr, mask=mask, other=0.0).to(COMPUTE)


@triton.jit
def _st(ptr, value, mask, DTYPE: tl.constexpr):
    tl.store(ptr, _to_storage(value, DTYPE), mask=mask)


# --------------------------------------------------------------------------
# Kernels (one per gate function); outputs are contiguous [R, k * H]
# --------------------------------------------------------------------------


@triton.jit
def _lstm_kernel(
    gx, gx_s0, gx_s1,  # [N, b, 4H] pre-activations from the input
    gh, gh_s0, gh_s1,  # [N, b, 4H] h_prev @ w_hh^T
    cp, cp_s0, cp_s1,  # [N, b, H] c_prev
    h_out, c_out, act_out,  # [R, H], [R, H], [R, 4H]
    R, B, H,
    DTYPE: tl.constexpr, COMPUTE: tl.constexpr, INT64: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    rows, cols, mask = _tile(R, H, INT64, BLOCK_R, BLOCK_H)
    ox = gx + _offs(rows, cols, B, gx_s0, gx_s1)
    oh = gh + _offs(rows, cols, B, gh_s0, gh_s1)
    i = _sigmoid(_ld(ox, mask, COMPUTE) + _ld(oh, mask, COMPUTE))
    f = _sigmoid(_ld(ox + H, mask, COMPUTE) + _ld(oh + H, mask, COMPUTE))
    g = _tanh(_ld(ox + 2 * H, mask, COMPUTE) + _ld(oh + 2 * H, mask, COMPUTE))
    o = _sigmoid(_ld(ox + 3 * H, mask, COMPUTE) + _ld(oh + 3 * H, mask, COMPUTE))
    c_prev = _ld(cp + _offs(rows, cols, B, cp_s0, cp_s1), mask, COMPUTE)
    c = f * c_prev + i * g
    h = o * _tanh(c)
    o1 = rows[:, None] * H + cols[None, :]
    o4 = rows[:, None] * (4 * H) + cols[None, :]
    _st(h_out + o1, h, mask, DTYPE)
    _st(c_out + o1, c, mask, DTYPE)
    _st(act_out + o4, i, mask, DTYPE)
    _st(act_out + o4 + H, f, mask, DTYPE)
    _st(act_out + o4 + 2 * H, g, mask, DTYPE)
    _st(act_out + o4 + 3 * H, o, mask, DTYPE)


@triton.jit
def _lstm_backward_kernel(
    dh_p, dh_s0, dh_s1,  # [N, b, H] grad of h_raw
    dc_p, dc_s0, dc_s1,  # [N, b, H] grad of c (from the next step / c_n)
    act, act_s0, act_s1,  # [N, b, 4H] i, f, g, o
    c_p, c_s0, c_s1,  # [N, b, H] c
    cp, cp_s0, cp_s1,  # [N, b, H] c_prev
    d_pre_out, dc_prev_out,  # [R, 4H], [R, H]
    R, B, H,
    DTYPE: tl.constexpr, COMPUTE: tl.constexpr, INT64: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    rows, cols, mask = _tile(R, H, INT64, BLOCK_R, BLOCK_H)
    oa = act + _offs(rows, cols, B, act_s0, act_s1)
    i = _ld(oa, mask, COMPUTE)
    f = _ld(oa + H, mask, COMPUTE)
    g = _ld(oa + 2 * H, mask, COMPUTE)
    o = _ld(oa + 3 * H, mask, COMPUTE)
    dh = _ld(dh_p + _offs(rows, cols, B, dh_s0, dh_s1), mask, COMPUTE)
    dc = _ld(dc_p + _offs(rows, cols, B, dc_s0, dc_s1), mask, COMPUTE)
    c = _ld(c_p + _offs(rows, cols, B, c_s0, c_s1), mask, COMPUTE)
    c_prev = _ld(cp + _offs(rows, cols, B, cp_s0, cp_s1), mask, COMPUTE)
    tc = _tanh(c)
    dc = dc + dh * o * (1 - tc * tc)
    o1 = rows[:, None] * H + cols[None, :]
    o4 = rows[:, None] * (4 * H) + cols[None, :]
    _st(d_pre_out + o4, dc * g * i * (1 - i), mask, DTYPE)
    _st(d_pre_out + o4 + H, dc * c_prev * f * (1 - f), mask, DTYPE)
    _st(d_pre_out + o4 + 2 * H, dc * i * (1 - g * g), mask, DTYPE)
    _st(d_pre_out + o4 + 3 * H, dh * tc * o * (1 - o), mask, DTYPE)
    _st(dc_prev_out + o1, dc * f, mask, DTYPE)


@triton.jit
def _gru_kernel(
    gx, gx_s0, gx_s1,  # [N, b, 3H] pre-activations from the input
    gh, gh_s0, gh_s1,  # [N, b, 3H] h_prev @ w_hh^T + b_hh
    hp, hp_s0, hp_s1,  # [N, b, H] h_prev
    h_out, ws_out,  # [R, H], [R, 4H]
    R, B, H,
    DTYPE: tl.constexpr, COMPUTE: tl.constexpr, INT64: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    rows, cols, mask = _tile(R, H, INT64, BLOCK_R, BLOCK_H)
    ox = gx + _offs(rows, cols, B, gx_s0, gx_s1)
    oh = gh + _offs(rows, cols, B, gh_s0, gh_s1)
    hn = _ld(oh + 2 * H, mask, COMPUTE)
    r = _sigmoid(_ld(ox, mask, COMPUTE) + _ld(oh, mask, COMPUTE))
    z = _sigmoid(_ld(ox + H, mask, COMPUTE) + _ld(oh + H, mask, COMPUTE))
    n = _tanh(_ld(ox + 2 * H, mask, COMPUTE) + r * hn)
    h_prev = _ld(hp + _offs(rows, cols, B, hp_s0, hp_s1), mask, COMPUTE)
    h = (h_prev - n) * z + n
    o1 = rows[:, None] * H + cols[None, :]
    o4 = rows[:, None] * (4 * H) + cols[None, :]
    _st(h_out + o1, h, mask, DTYPE)
    _st(ws_out + o4, r, mask, DTYPE)
    _st(ws_out + o4 + H, z, mask, DTYPE)
    _st(ws_out + o4 + 2 * H, n, mask, DTYPE)
    _st(ws_out + o4 + 3 * H, hn, mask, DTYPE)


@triton.jit
def _gru_backward_kernel(
    dh_p, dh_s0, dh_s1,  # [N, b, H] grad of h
    ws, ws_s0, ws_s1,  # [N, b, 4H] r, z, n, hn
    hp, hp_s0, hp_s1,  # [N, b, H] h_prev
    d_gx_out, d_gh_out, dh_prev_out,  # [R, 3H], [R, 3H], [R, H]
    R, B, H,
    DTYPE: tl.constexpr, COMPUTE: tl.constexpr, INT64: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    rows, cols, mask = _tile(R, H, INT64, BLOCK_R, BLOCK_H)
    ow = ws + _offs(rows, cols, B, ws_s0, ws_s1)
    r = _ld(ow, mask, COMPUTE)
    z = _ld(ow + H, mask, COMPUTE)
    n = _ld(ow + 2 * H, mask, COMPUTE)
    hn = _ld(ow + 3 * H, mask, COMPUTE)
    dh = _ld(dh_p + _offs(rows, cols, B, dh_s0, dh_s1), mask, COMPUTE)
    h_prev = _ld(hp + _offs(rows, cols, B, hp_s0, hp_s1), mask, COMPUTE)
    dn = dh * (1 - z) * (1 - n * n)
    dz = dh * (h_prev - n) * z * (1 - z)
    dr = dn * hn * r * (1 - r)
    o1 = rows[:, None] * H + cols[None, :]
    o3 = rows[:, None] * (3 * H) + cols[None, :]
    _st(d_gx_out + o3, dr, mask, DTYPE)
    _st(d_gx_out + o3 + H, dz, mask, DTYPE)
    _st(d_gx_out + o3 + 2 * H, dn, mask, DTYPE)
    _st(d_gh_out + o3, dr, mask, DTYPE)
    _st(d_gh_out + o3 + H, dz, mask, DTYPE)
    _st(d_gh_out + o3 + 2 * H, dn * r, mask, DTYPE)
    _st(dh_prev_out + o1, dh * z, mask, DTYPE)


@triton.jit
def _rnn_kernel(
    gx, gx_s0, gx_s1,  # [N, b, H]
    gh, gh_s0, gh_s1,  # [N, b, H]
    h_out,  # [R, H]
    R, B, H,
    RELU: tl.constexpr,
    DTYPE: tl.constexpr, COMPUTE: tl.constexpr, INT64: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    rows, cols, mask = _tile(R, H, INT64, BLOCK_R, BLOCK_H)
    pre = _ld(gx + _offs(rows, cols, B, gx_s0, gx_s1), mask, COMPUTE) + _ld(
        gh + _offs(rows, cols, B, gh_s0, gh_s1), mask, COMPUTE
    )
    if RELU:
        h = tl.where(pre < 0, 0.0, pre)  # NaN stays NaN, as torch.relu
    else:
        h = _tanh(pre)
    _st(h_out + rows[:, None] * H + cols[None, :], h, mask, DTYPE)


@triton.jit
def _rnn_backward_kernel(
    dh_p, dh_s0, dh_s1,  # [N, b, H] grad of h
    h_p, h_s0, h_s1,  # [N, b, H] h
    d_pre_out,  # [R, H]
    R, B, H,
    RELU: tl.constexpr,
    DTYPE: tl.constexpr, COMPUTE: tl.constexpr, INT64: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    rows, cols, mask = _tile(R, H, INT64, BLOCK_R, BLOCK_H)
    dh = _ld(dh_p + _offs(rows, cols, B, dh_s0, dh_s1), mask, COMPUTE)
    h = _ld(h_p + _offs(rows, cols, B, h_s0, h_s1), mask, COMPUTE)
    if RELU:
        d = tl.where(h > 0, dh, 0.0)
    else:
        d = dh * (1 - h * h)
    _st(d_pre_out + rows[:, None] * H + cols[None, :], d, mask, DTYPE)


# --------------------------------------------------------------------------
# Host side: checks and launch
# --------------------------------------------------------------------------


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _check_step(op: str, h_name: str, args: list[tuple[str, torch.Tensor, int]]) -> tuple:
    """Validate the ``[N, b, k * H]`` arguments ``(name, tensor, k)`` of a gate
    function, ``H`` being the last size of the argument ``h_name`` (a ``k = 1``
    one). Returns ``(N, b, H, dtype, device)``."""
    for name, t, k in args:
        width = "H" if k == 1 else f"{k}H"
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{op}: {name} must be a 3-D [N, b, {width}] tensor, got {_shape(t)}")
    tensors = {name: t for name, t, _ in args}
    h = tensors[h_name].shape[2]
    first_name, first, _ = args[0]
    n, b = first.shape[:2]
    for name, t, k in args:
        width = "H" if k == 1 else f"{k}H"
        if tuple(t.shape) != (n, b, k * h):
            raise ValueError(
                f"{op}: {name} has shape {tuple(t.shape)}, expected [N={n}, b={b}, "
                f"{width}={k * h}] (N, b from {first_name}, H={h} from {h_name})"
            )
        if t.dtype not in _TL_DTYPES:
            raise ValueError(
                f"{op}: {name} has dtype {t.dtype}; supported: float32, float64, float16, bfloat16"
            )
        if t.dtype != first.dtype:
            raise ValueError(
                f"{op}: all arguments share a dtype; {name} is {t.dtype}, {first_name} is "
                f"{first.dtype}"
            )
        if t.device != first.device:
            raise ValueError(
                f"{op}: all arguments share a device; {name} is on {t.device}, {first_name} "
                f"is on {first.device}"
            )
    check_kernel_device(op, first.device, _interpreting(_lstm_kernel))
    return n, b, h, first.dtype, first.device


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` if its last axis is unit-stride (or of size 1), else a contiguous copy."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def geometry(rows: int, h: int) -> tuple[int, int]:
    """``(BLOCK_R, BLOCK_H)`` of a launch over ``rows`` rows of ``h`` hidden units."""
    block_h = min(triton.next_power_of_2(max(h, 1)), MAX_BLOCK_H)
    block_r = max(1, min(TILE // block_h, triton.next_power_of_2(max(rows, 1))))
    return block_r, block_h


def _launch(op, kernel, inputs, outputs, n, b, h, dtype, **flags) -> None:
    """Launch ``kernel`` over the ``N * b`` rows and ``h`` hidden units: each input
    passes as ``(tensor, stride0, stride1)``, then the contiguous outputs."""
    rows = n * b
    if rows == 0 or h == 0:
        return
    block_r, block_h = geometry(rows, h)
    grid = (triton.cdiv(rows, block_r), triton.cdiv(h, block_h))
    if grid[1] > MAX_GRID_Y:
        raise ValueError(f"{op}: H={h} exceeds CUDA's grid ({MAX_GRID_Y * MAX_BLOCK_H} at most)")
    args = []
    extent = rows + block_r  # the row index, overhang included
    for t in inputs:
        t = _unit_last(t)
        args += [t, t.stride(0), t.stride(1)]
        extent = max(extent, (n - 1) * t.stride(0) + (b - 1) * t.stride(1) + t.shape[2])
    extent = max([extent] + [o.numel() for o in outputs])
    extra = {} if _interpreting(kernel) else {"num_warps": NUM_WARPS}
    kernel[grid](
        *args,
        *outputs,
        rows,
        b,
        h,
        **flags,
        DTYPE=_TL_DTYPES[dtype],
        COMPUTE=_TL_DTYPES[_compute_dtype(dtype)],
        INT64=extent >= INT64_INDEX_FROM,
        BLOCK_R=block_r,
        BLOCK_H=block_h,
        **extra,
    )


def _new(n, b, width, dtype, device) -> torch.Tensor:
    return torch.empty((n, b, width), dtype=dtype, device=device)


# --------------------------------------------------------------------------
# Gate functions (the signatures of modelbatch.ops.rnn.ReferenceGates)
# --------------------------------------------------------------------------


def lstm_gates(
    gx: torch.Tensor, gh: torch.Tensor, c_prev: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(h_raw [N, b, H], c [N, b, H], act [N, b, 4H])`` of one LSTM step; see
    the module docstring. One launch; raises ValueError on bad input."""
    op = _PREFIX + "lstm_gates"
    args = [("gx", gx, 4), ("gh", gh, 4), ("c_prev", c_prev, 1)]
    n, b, h, dtype, dev = _check_step(op, "c_prev", args)
    h_raw, c, act = (
        _new(n, b, h, dtype, dev),
        _new(n, b, h, dtype, dev),
        _new(n, b, 4 * h, dtype, dev),
    )
    _launch(op, _lstm_kernel, [gx, gh, c_prev], [h_raw, c, act], n, b, h, dtype)
    return h_raw, c, act


def lstm_gates_backward(
    dh: torch.Tensor, dc: torch.Tensor, act: torch.Tensor, c: torch.Tensor, c_prev: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d_pre [N, b, 4H], dc_prev [N, b, H])`` from the grads of ``h_raw`` and
    ``c``; see the module docstring. One launch; raises ValueError on bad input."""
    op = _PREFIX + "lstm_gates_backward"
    args = [("dh", dh, 1), ("dc", dc, 1), ("act", act, 4), ("c", c, 1), ("c_prev", c_prev, 1)]
    n, b, h, dtype, dev = _check_step(op, "dh", args)
    d_pre, dc_prev = _new(n, b, 4 * h, dtype, dev), _new(n, b, h, dtype, dev)
    _launch(op, _lstm_backward_kernel, [dh, dc, act, c, c_prev], [d_pre, dc_prev], n, b, h, dtype)
    return d_pre, dc_prev


def gru_gates(
    gx: torch.Tensor, gh: torch.Tensor, h_prev: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h [N, b, H], ws [N, b, 4H])`` of one GRU step (``gh`` includes
    ``b_hh``); see the module docstring. One launch; raises ValueError on bad
    input."""
    op = _PREFIX + "gru_gates"
    args = [("gx", gx, 3), ("gh", gh, 3), ("h_prev", h_prev, 1)]
    n, b, h, dtype, dev = _check_step(op, "h_prev", args)
    h_new, ws = _new(n, b, h, dtype, dev), _new(n, b, 4 * h, dtype, dev)
    _launch(op, _gru_kernel, [gx, gh, h_prev], [h_new, ws], n, b, h, dtype)
    return h_new, ws


def gru_gates_backward(
    dh: torch.Tensor, ws: torch.Tensor, h_prev: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(d_gx [N, b, 3H], d_gh [N, b, 3H], dh_prev_direct [N, b, H])``; see the
    module docstring. One launch; raises ValueError on bad input."""
    op = _PREFIX + "gru_gates_backward"
    args = [("dh", dh, 1), ("ws", ws, 4), ("h_prev", h_prev, 1)]
    n, b, h, dtype, dev = _check_step(op, "dh", args)
    d_gx, d_gh = _new(n, b, 3 * h, dtype, dev), _new(n, b, 3 * h, dtype, dev)
    direct = _new(n, b, h, dtype, dev)
    _launch(op, _gru_backward_kernel, [dh, ws, h_prev], [d_gx, d_gh, direct], n, b, h, dtype)
    return d_gx, d_gh, direct


def rnn_gates(gx: torch.Tensor, gh: torch.Tensor, relu: bool) -> torch.Tensor:
    """``h = relu(gx + gh)`` (or ``tanh``), ``[N, b, H]``. One launch; raises
    ValueError on bad input."""
    op = _PREFIX + "rnn_gates"
    n, b, h, dtype, dev = _check_step(op, "gx", [("gx", gx, 1), ("gh", gh, 1)])
    out = _new(n, b, h, dtype, dev)
    _launch(op, _rnn_kernel, [gx, gh], [out], n, b, h, dtype, RELU=bool(relu))
    return out


def rnn_gates_backward(dh: torch.Tensor, h: torch.Tensor, relu: bool) -> torch.Tensor:
    """``d_pre = where(h > 0, dh, 0)`` (relu) or ``dh * (1 - h^2)``, ``[N, b, H]``.
    One launch; raises ValueError on bad input."""
    op = _PREFIX + "rnn_gates_backward"
    n, b, hid, dtype, dev = _check_step(op, "dh", [("dh", dh, 1), ("h", h, 1)])
    d_pre = _new(n, b, hid, dtype, dev)
    _launch(op, _rnn_backward_kernel, [dh, h], [d_pre], n, b, hid, dtype, RELU=bool(relu))
    return d_pre


#: The gate functions of ``modelbatch.ops.rnn.layer_loop`` / ``layer_loop_backward``
#: as Triton kernels (``ReferenceGates``' signatures).
TritonGates = rnn_ops.gate_set("TritonGates", globals())


# --------------------------------------------------------------------------
# The layer (the ops' CUDA kernels)
# --------------------------------------------------------------------------


def _expect(op: str, name: str, t, shape: tuple, dims: str, like: torch.Tensor) -> None:
    """``t`` is a tensor of ``shape`` (described as ``dims``) with ``like``'s dtype
    and device."""
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must be {dims} = {list(shape)}, got {_shape(t)}")
    if t.dtype != like.dtype:
        raise ValueError(f"{op}: {name} is {t.dtype}, expected {like.dtype} (all tensors share it)")
    if t.device != like.device:
        raise ValueError(f"{op}: {name} is on {t.device}, expected {like.device}")


def _check_layer(op, mode, n, t_len, b, w_hh, b_hh, w_hr, h0, c0, batch_sizes, like):
    """The checks the forward and the backward share; returns ``(P, H)``."""
    if mode not in rnn_ops.GATES:
        raise ValueError(
            f"{op}: mode must be 0 (LSTM), 1 (GRU), 2 (RNN_TANH) or 3 (RNN_RELU), got {mode}"
        )
    g = rnn_ops.GATES[mode]
    if like.dtype not in _TL_DTYPES:
        raise ValueError(
            f"{op}: dtype {like.dtype} is not supported; supported: float32, float64, float16, "
            "bfloat16"
        )
    if not isinstance(w_hh, torch.Tensor) or w_hh.dim() != 3 or w_hh.shape[0] != n:
        raise ValueError(f"{op}: w_hh must be [N={n}, G*H, P], got {_shape(w_hh)}")
    p = w_hh.shape[2]
    if w_hr is not None:
        if mode != rnn_ops.LSTM:
            raise ValueError(f"{op}: w_hr (the projection) is only taken by LSTM (mode 0)")
        if not isinstance(w_hr, torch.Tensor) or w_hr.dim() != 3:
            raise ValueError(f"{op}: w_hr must be [N={n}, P={p}, H], got {_shape(w_hr)}")
        hid = w_hr.shape[2]
        _expect(op, "w_hr", w_hr, (n, p, hid), "[N, P, H]", like)
    else:
        hid = p
    _expect(op, "w_hh", w_hh, (n, g * hid, p), f"[N, {g}H, P] (H={hid})", like)
    if b_hh is not None:
        if mode != rnn_ops.GRU:
            raise ValueError(
                f"{op}: b_hh is only taken by GRU (mode 1); LSTM and RNN fold it into gx"
            )
        _expect(op, "b_hh", b_hh, (n, g * hid), "[N, 3H]", like)
    _expect(op, "h0", h0, (n, b, p), "[N, B, P]", like)
    if mode == rnn_ops.LSTM:
        _expect(op, "c0", c0, (n, b, hid), "[N, B, H]", like)
    sizes = [int(s) for s in batch_sizes]
    if sizes and (
        len(sizes) != t_len
        or any(s < 0 or s > b for s in sizes)
        or any(x < y for x, y in itertools.pairwise(sizes))
    ):
        raise ValueError(
            f"{op}: batch_sizes must be empty or T={t_len} non-increasing sizes in [0, B={b}], "
            f"got {sizes}"
        )
    check_kernel_device(op, like.device, _interpreting(_lstm_kernel))
    return p, hid


def rnn_layer(mode, gx, w_hh, b_hh, w_hr, h0, c0, reverse, batch_sizes):
    """``modelbatch::rnn_layer`` with the Triton gate kernels:
    ``(out, h_n, c_n, ws)``, see ``modelbatch.ops.rnn``. Raises ValueError on
    bad input."""
    op = _PREFIX + "rnn_layer"
    if not isinstance(gx, torch.Tensor) or gx.dim() != 4:
        raise ValueError(f"{op}: gx must be a 4-D [N, T, B, G*H] tensor, got {_shape(gx)}")
    n, t_len, b, width = gx.shape
    _, hid = _check_layer(op, mode, n, t_len, b, w_hh, b_hh, w_hr, h0, c0, batch_sizes, gx)
    if width != rnn_ops.GATES[mode] * hid:
        raise ValueError(
            f"{op}: gx has shape {tuple(gx.shape)}, expected G*H = {rnn_ops.GATES[mode] * hid} last"
        )
    return rnn_ops.layer_loop(
        mode, gx, w_hh, b_hh, w_hr, h0, c0, reverse, batch_sizes, gates=TritonGates
    )


def rnn_layer_backward(
    mode, grad_out, grad_hn, grad_cn, w_hh, b_hh, w_hr, h0, c0, out, ws, reverse, batch_sizes
):  # fmt: skip
    """``modelbatch::rnn_layer_backward`` with the Triton gate kernels:
    ``(d_gx, d_w_hh, d_b_hh, d_w_hr, d_h0, d_c0)``, see ``modelbatch.ops.rnn``.
    Raises ValueError on bad input."""
    op = _PREFIX + "rnn_layer_backward"
    if not isinstance(out, torch.Tensor) or out.dim() != 4:
        raise ValueError(f"{op}: out must be a 4-D [N, T, B, P] tensor, got {_shape(out)}")
    n, t_len, b, _ = out.shape
    p, hid = _check_layer(op, mode, n, t_len, b, w_hh, b_hh, w_hr, h0, c0, batch_sizes, out)
    _expect(op, "out", out, (n, t_len, b, p), "[N, T, B, P]", out)
    _expect(op, "grad_out", grad_out, (n, t_len, b, p), "[N, T, B, P]", out)
    _expect(op, "grad_hn", grad_hn, (n, b, p), "[N, B, P]", out)
    if mode == rnn_ops.LSTM:
        _expect(op, "grad_cn", grad_cn, (n, b, hid), "[N, B, H]", out)
    k = rnn_ops.WS_WIDTH[mode]
    _expect(op, "ws", ws, (n, t_len, b, k * hid), f"[N, T, B, {k}H]", out)
    return rnn_ops.layer_loop_backward(
        mode, grad_out, grad_hn, grad_cn, w_hh, b_hh, w_hr, h0, c0, out, ws, reverse, batch_sizes,
        gates=TritonGates,
    )  # fmt: skip
