"""``modelbatch::rnn_layer``: one recurrent layer (one direction) of N models.

The recurrent part of ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` with an explicit
leading model axis. The input projection of every time step is one batched GEMM
done by the caller (``gx = x @ W_ih^T + bias`` for all steps at once); this op
runs the time loop: per step one batched GEMM of the hidden state with ``W_hh``
for all N models, then one fused gate kernel.

Ops (defined in C++, ``csrc/module.cpp``; CPU kernels in ``csrc/rnn.cpp``, CUDA
in ``kernels/rnn.py`` (Triton gate kernels), oracle here)::

    rnn_layer(int mode, Tensor gx, Tensor w_hh, Tensor? b_hh, Tensor? w_hr,
              Tensor h0, Tensor? c0, bool reverse, int[] batch_sizes)
        -> (Tensor out, Tensor h_n, Tensor c_n, Tensor ws)
    rnn_layer_backward(int mode, Tensor grad_out, Tensor grad_hn, Tensor? grad_cn,
              Tensor w_hh, Tensor? b_hh, Tensor? w_hr, Tensor h0, Tensor? c0,
              Tensor out, Tensor ws, bool reverse, int[] batch_sizes)
        -> (Tensor d_gx, Tensor d_w_hh, Tensor d_b_hh, Tensor d_w_hr, Tensor d_h0,
            Tensor d_c0)

``mode``: 0 LSTM, 1 GRU, 2 RNN_TANH, 3 RNN_RELU; ``G`` gates (4, 3, 1, 1).
Shapes (all contiguous): ``gx [N, T, B, G*H]``; ``w_hh [N, G*H, P]``; ``b_hh [N,
G*H]`` (GRU only: LSTM and RNN callers fold ``b_hh`` into ``gx``); ``w_hr [N, P,
H]`` (LSTM with ``proj_size`` P, else None and P = H); ``h0 [N, B, P]``; ``c0 [N,
B, H]`` (LSTM only). ``reverse`` runs the steps from T-1 down to 0.

``batch_sizes`` (packed sequences): empty, or T non-increasing ints, step t
updating only rows ``[0, batch_sizes[t])`` of the state (the rows of sequences
still running; other rows keep their state, so each sequence's final state is
the one after its last step, in either direction). Rows past ``batch_sizes[t]``
of ``out[:, t]``, ``ws[:, t]`` and ``d_gx[:, t]`` are zero.

Per step, over the active rows (``pre`` = pre-activation, ``gh = h_prev @
w_hh^T``):

* LSTM: ``i, f, g, o = sig, sig, tanh, sig of (gx[:, t] + gh)`` (chunks of H),
  ``c = f * c_prev + i * g``, ``h_raw = o * tanh(c)``, ``h = h_raw @ w_hr^T``
  (or ``h_raw``). ``ws [N, T, B, 5H]`` keeps ``i, f, g, o`` (activated) and ``c``.
* GRU: ``gh += b_hh``; ``r = sig(gx_r + gh_r)``, ``z = sig(gx_z + gh_z)``, ``n =
  tanh(gx_n + r * gh_n)``, ``h = (h_prev - n) * z + n``. ``ws [N, T, B, 4H]``
  keeps ``r, z, n, gh_n``.
* RNN: ``h = tanh(gx[:, t] + gh)`` (or relu); ``ws`` is empty (``out`` suffices).

Outputs: ``out [N, T, B, P]`` (h of every step), ``h_n [N, B, P]``, ``c_n [N, B,
H]`` (LSTM; else an empty tensor). The backward takes the gradients of ``out``,
``h_n`` and ``c_n`` (``grad_cn`` None for other modes) and returns those of
``gx``, ``w_hh``, ``b_hh`` (GRU with bias, else empty), ``w_hr`` (LSTM with
projection, else empty), ``h0`` and ``c0`` (LSTM, else empty).

Half types are computed in float32 and stored in their dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from modelbatch import _backend
from modelbatch.ops._registry import IMPL

LSTM, GRU, RNN_TANH, RNN_RELU = 0, 1, 2, 3
MODES = {"LSTM": LSTM, "GRU": GRU, "RNN_TANH": RNN_TANH, "RNN_RELU": RNN_RELU}
GATES = {LSTM: 4, GRU: 3, RNN_TANH: 1, RNN_RELU: 1}
WS_WIDTH = {LSTM: 5, GRU: 4, RNN_TANH: 0, RNN_RELU: 0}


# ------------------------------------------------------------------ gate math
# One time step over the active rows, on [N, b, *] views (any strides). These are
# the oracle of the fused gate kernels (C++ and Triton).
def lstm_gates(gx: Tensor, gh: Tensor, c_prev: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(h_raw, c, act)``: ``act = [i, f, g, o]`` activated, ``[N, b, 4H]``."""
    i, f, g, o = (gx + gh).chunk(4, -1)
    i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
    c = f * c_prev + i * g
    return o * c.tanh(), c, torch.cat([i, f, g, o], -1)


def lstm_gates_backward(
    dh: Tensor, dc: Tensor, act: Tensor, c: Tensor, c_prev: Tensor
) -> tuple[Tensor, Tensor]:
    """``(d_pre [N, b, 4H], dc_prev)`` from the grads of ``h_raw`` and ``c``."""
    i, f, g, o = act.chunk(4, -1)
    tc = c.tanh()
    dc = dc + dh * o * (1 - tc * tc)
    d_pre = torch.cat(
        [
            dc * g * i * (1 - i),
            dc * c_prev * f * (1 - f),
            dc * i * (1 - g * g),
            dh * tc * o * (1 - o),
        ],
        -1,
    )
    return d_pre, dc * f


def gru_gates(gx: Tensor, gh: Tensor, h_prev: Tensor) -> tuple[Tensor, Tensor]:
    """``(h, ws)``: ``gh`` includes ``b_hh``; ``ws = [r, z, n, gh_n]``, ``[N, b, 4H]``."""
    xr, xz, xn = gx.chunk(3, -1)
    hr, hz, hn = gh.chunk(3, -1)
    r = (xr + hr).sigmoid()
    z = (xz + hz).sigmoid()
    n = (xn + r * hn).tanh()
    return (h_prev - n) * z + n, torch.cat([r, z, n, hn], -1)


def gru_gates_backward(dh: Tensor, ws: Tensor, h_prev: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(d_gx [N, b, 3H], d_gh [N, b, 3H], dh_prev)``: ``dh_prev`` is the direct
    part ``dh * z`` (the caller adds ``d_gh @ w_hh``)."""
    r, z, n, hn = ws.chunk(4, -1)
    dn = dh * (1 - z) * (1 - n * n)
    dz = dh * (h_prev - n) * z * (1 - z)
    dr = dn * hn * r * (1 - r)
    return torch.cat([dr, dz, dn], -1), torch.cat([dr, dz, dn * r], -1), dh * z


def rnn_gates(gx: Tensor, gh: Tensor, relu: bool) -> Tensor:
    pre = gx + gh
    return pre.relu() if relu else pre.tanh()


def rnn_gates_backward(dh: Tensor, h: Tensor, relu: bool) -> Tensor:
    return dh * (h > 0).to(dh.dtype) if relu else dh * (1 - h * h)


#: Method of a gate set -> the function it is in a module (here, kernels/rnn.py).
GATE_FUNCTIONS = {
    kind + suffix: f"{kind}_gates{suffix}"
    for kind in ("lstm", "gru", "rnn")
    for suffix in ("", "_backward")
}


def gate_set(name: str, namespace: dict) -> type:
    """The gate functions the time loop calls, taken from ``namespace`` (the globals
    of a module defining ``lstm_gates``, ``lstm_gates_backward``, ``gru_gates``, ...)."""
    funcs = {k: staticmethod(namespace[v]) for k, v in GATE_FUNCTIONS.items()}
    return type(name, (), {"__doc__": f"The gate functions of {namespace['__name__']}.", **funcs})


#: The pure-torch gates; :mod:`modelbatch.kernels.rnn` gives ``TritonGates``.
ReferenceGates = gate_set("ReferenceGates", globals())


# ------------------------------------------------------------------ the loop
def _steps(t_len: int, b: int, batch_sizes, reverse: bool):
    sizes = list(batch_sizes) if len(batch_sizes) else [b] * t_len
    order = range(t_len - 1, -1, -1) if reverse else range(t_len)
    return [(t, sizes[t]) for t in order]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def layer_loop(mode, gx, w_hh, b_hh, w_hr, h0, c0, reverse, batch_sizes, gates=ReferenceGates):
    """``rnn_layer`` with the given gate functions (see the module docstring)."""
    dtype = gx.dtype
    cd = _compute_dtype(dtype)
    gx, w_hh, h0 = gx.to(cd), w_hh.to(cd), h0.to(cd)
    b_hh = None if b_hh is None else b_hh.to(cd)
    w_hr = None if w_hr is None else w_hr.to(cd)
    n, t_len, b, _ = gx.shape
    p = w_hh.shape[2]
    hid = w_hr.shape[2] if w_hr is not None else p
    h = h0.clone()
    out = gx.new_zeros(n, t_len, b, p)
    ws = gx.new_zeros(n, t_len, b, WS_WIDTH[mode] * hid)
    c = c0.to(cd).clone() if mode == LSTM else None
    for t, bt in _steps(t_len, b, batch_sizes, reverse):
        hp = h[:, :bt]
        gh = torch.bmm(hp, w_hh.transpose(1, 2))
        if mode == LSTM:
            h_raw, c_new, act = gates.lstm(gx[:, t, :bt], gh, c[:, :bt])
            h_new = h_raw if w_hr is None else torch.bmm(h_raw, w_hr.transpose(1, 2))
            c[:, :bt] = c_new
            ws[:, t, :bt, : 4 * hid] = act
            ws[:, t, :bt, 4 * hid :] = c_new
        elif mode == GRU:
            if b_hh is not None:
                gh = gh + b_hh[:, None]
            h_new, w = gates.gru(gx[:, t, :bt], gh, hp)
            ws[:, t, :bt] = w
        else:
            h_new = gates.rnn(gx[:, t, :bt], gh, mode == RNN_RELU)
        h[:, :bt] = h_new
        out[:, t, :bt] = h_new
    c_n = c.to(dtype) if mode == LSTM else gx.new_empty(0, dtype=dtype)
    return out.to(dtype), h.to(dtype), c_n, ws.to(dtype)


def _prev(stacked: Tensor, init: Tensor, steps, t_len: int, reverse: bool) -> Tensor:
    """``[N, T, B, *]``: the state each step started from, on its active rows."""
    prev = torch.zeros_like(stacked)
    last = {}  # t -> active rows at the previous processed step
    prev_t = None
    for t, bt in steps:
        if prev_t is None:
            prev[:, t, :bt] = init[:, :bt]
        else:
            bp = min(bt, last[prev_t])
            prev[:, t, :bp] = stacked[:, prev_t, :bp]
            prev[:, t, bp:bt] = init[:, bp:bt]
        last[t] = bt
        prev_t = t
    return prev


def layer_loop_backward(
    mode, grad_out, grad_hn, grad_cn, w_hh, b_hh, w_hr, h0, c0, out, ws, reverse, batch_sizes,
    gates=ReferenceGates,
):  # fmt: skip
    """``rnn_layer_backward`` with the given gate functions."""
    dtype = grad_out.dtype
    cd = _compute_dtype(dtype)
    cast = lambda t: None if t is None else t.to(cd)
    grad_out, grad_hn, grad_cn = cast(grad_out), cast(grad_hn), cast(grad_cn)
    w_hh, b_hh, w_hr, h0, c0, out, ws = map(cast, (w_hh, b_hh, w_hr, h0, c0, out, ws))
    n, t_len, b, p = out.shape
    gh_width = w_hh.shape[1]
    hid = w_hr.shape[2] if w_hr is not None else p
    steps = _steps(t_len, b, batch_sizes, reverse)
    h_prev = _prev(out, h0, steps, t_len, reverse)
    d_gx = out.new_zeros(n, t_len, b, gh_width)
    d_gh = d_gx if mode != GRU else out.new_zeros(n, t_len, b, gh_width)
    dh_state = grad_hn.clone()
    d_w_hr = None
    if mode == LSTM:
        c_all = ws[..., 4 * hid :]
        c_prev = _prev(c_all, c0, steps, t_len, reverse)
        dc_state = grad_cn.clone()
        if w_hr is not None:
            d_h = out.new_zeros(n, t_len, b, p)
    for t, bt in reversed(steps):
        dh = grad_out[:, t, :bt] + dh_state[:, :bt]
        if mode == LSTM:
            act = ws[:, t, :bt, : 4 * hid]
            if w_hr is not None:
                d_h[:, t, :bt] = dh
                dh = torch.bmm(dh, w_hr)
            d_pre, dc_prev = gates.lstm_backward(
                dh, dc_state[:, :bt], act, c_all[:, t, :bt], c_prev[:, t, :bt]
            )
            d_gx[:, t, :bt] = d_pre
            dc_state[:, :bt] = dc_prev
            dh_state[:, :bt] = torch.bmm(d_pre, w_hh)
        elif mode == GRU:
            dgx, dgh, direct = gates.gru_backward(dh, ws[:, t, :bt], h_prev[:, t, :bt])
            d_gx[:, t, :bt] = dgx
            d_gh[:, t, :bt] = dgh
            dh_state[:, :bt] = direct + torch.bmm(dgh, w_hh)
        else:
            d_pre = gates.rnn_backward(dh, out[:, t, :bt], mode == RNN_RELU)
            d_gx[:, t, :bt] = d_pre
            dh_state[:, :bt] = torch.bmm(d_pre, w_hh)
    flat = lambda t: t.reshape(n, t_len * b, t.shape[-1])
    d_w_hh = torch.bmm(flat(d_gh).transpose(1, 2), flat(h_prev))
    empty = out.new_empty(0, dtype=dtype)
    d_b_hh = d_gh.sum((1, 2)).to(dtype) if (mode == GRU and b_hh is not None) else empty
    if mode == LSTM and w_hr is not None:
        o, c = ws[..., 3 * hid : 4 * hid], ws[..., 4 * hid :]
        d_w_hr = torch.bmm(flat(d_h).transpose(1, 2), flat(o * c.tanh())).to(dtype)
    else:
        d_w_hr = empty
    d_c0 = dc_state.to(dtype) if mode == LSTM else empty
    return d_gx.to(dtype), d_w_hh.to(dtype), d_b_hh, d_w_hr, dh_state.to(dtype), d_c0


def reference_layer(mode, gx, w_hh, b_hh, w_hr, h0, c0, reverse, batch_sizes):
    """Pure-torch oracle of ``rnn_layer``."""
    return layer_loop(mode, gx, w_hh, b_hh, w_hr, h0, c0, reverse, batch_sizes)


def reference_layer_backward(
    mode, grad_out, grad_hn, grad_cn, w_hh, b_hh, w_hr, h0, c0, out, ws, reverse, batch_sizes
):  # fmt: skip
    """Pure-torch oracle of ``rnn_layer_backward``."""
    return layer_loop_backward(
        mode, grad_out, grad_hn, grad_cn, w_hh, b_hh, w_hr, h0, c0, out, ws, reverse, batch_sizes
    )


# -------------------------------------------------------------- registration
def _fake(mode, gx, w_hh, b_hh, w_hr, h0, c0, reverse, batch_sizes):
    n, t_len, b, _ = gx.shape
    p = w_hh.shape[2]
    hid = w_hr.shape[2] if w_hr is not None else p
    c_n = gx.new_empty((n, b, hid)) if mode == LSTM else gx.new_empty(0)
    return (
        gx.new_empty((n, t_len, b, p)),
        gx.new_empty((n, b, p)),
        c_n,
        gx.new_empty((n, t_len, b, WS_WIDTH[mode] * hid)),
    )


def _fake_backward(mode, grad_out, grad_hn, grad_cn, w_hh, b_hh, w_hr, h0, c0, out, ws, *_):
    empty = grad_out.new_empty(0)
    n, t_len, b, _ = out.shape
    return (
        grad_out.new_empty((n, t_len, b, w_hh.shape[1])),
        torch.empty_like(w_hh),
        torch.empty_like(b_hh) if (mode == GRU and b_hh is not None) else empty,
        torch.empty_like(w_hr) if w_hr is not None else empty,
        torch.empty_like(h0),
        torch.empty_like(c0) if mode == LSTM else empty,
    )


def _cuda(*args):
    from modelbatch.kernels import rnn as triton_rnn

    return triton_rnn.rnn_layer(*args)


def _cuda_backward(*args):
    from modelbatch.kernels import rnn as triton_rnn

    return triton_rnn.rnn_layer_backward(*args)


torch.library.register_fake("modelbatch::rnn_layer")(_fake)
torch.library.register_fake("modelbatch::rnn_layer_backward")(_fake_backward)
IMPL.impl("rnn_layer", _cuda, "CUDA")
IMPL.impl("rnn_layer_backward", _cuda_backward, "CUDA")
if not _backend.c_extension_loaded():
    IMPL.impl("rnn_layer", reference_layer, "CPU")
    IMPL.impl("rnn_layer_backward", reference_layer_backward, "CPU")


def _setup(ctx, inputs, output):
    mode, _, w_hh, b_hh, w_hr, h0, c0, reverse, batch_sizes = inputs
    out, _, _, ws = output
    ctx.mode, ctx.reverse, ctx.batch_sizes = mode, reverse, batch_sizes
    ctx.save_for_backward(w_hh, b_hh, w_hr, h0, c0, out, ws)
    # The workspace is not an output anyone differentiates; without this autograd
    # would fill a zero gradient of its size (5H per step and row) every backward.
    ctx.mark_non_differentiable(ws)
    ctx.set_materialize_grads(False)


def _zeros_if_none(grad, like):
    """The gradient, or zeros for an output that got none. The kernels read any
    model/step strides (an expanded gradient too) if each ``[B, P]`` block is
    contiguous, so only other layouts are copied."""
    if grad is None:
        return torch.zeros_like(like)
    if grad.stride(-1) != 1 or (grad.shape[-2] > 1 and grad.stride(-2) != grad.shape[-1]):
        return grad.contiguous()
    return grad


def _backward(ctx, grad_out, grad_hn, grad_cn, _grad_ws):
    w_hh, b_hh, w_hr, h0, c0, out, ws = ctx.saved_tensors
    mode = ctx.mode
    grad_out = _zeros_if_none(grad_out, out)
    grad_hn = _zeros_if_none(grad_hn, h0)
    grad_cn = _zeros_if_none(grad_cn, c0) if mode == LSTM else None
    d_gx, d_w_hh, d_b_hh, d_w_hr, d_h0, d_c0 = torch.ops.modelbatch.rnn_layer_backward(
        mode, grad_out, grad_hn, grad_cn, w_hh, b_hh, w_hr, h0, c0, out, ws, ctx.reverse,
        ctx.batch_sizes,
    )  # fmt: skip
    return (
        None,
        d_gx,
        d_w_hh,
        d_b_hh if b_hh is not None else None,
        d_w_hr if w_hr is not None else None,
        d_h0,
        d_c0 if mode == LSTM else None,
        None,
        None,
    )


torch.library.register_autograd("modelbatch::rnn_layer", _backward, setup_context=_setup)


# ------------------------------------------------------- a whole nn.LSTM & co
def layer(mode, gx, w_hh, b_hh, w_hr, h0, c0, reverse, batch_sizes=()):
    """``modelbatch::rnn_layer`` with autograd: ``(out, h_n, c_n)``."""
    out, h_n, c_n, _ = torch.ops.modelbatch.rnn_layer(
        mode, gx.contiguous(), w_hh.contiguous(),
        None if b_hh is None else b_hh.contiguous(),
        None if w_hr is None else w_hr.contiguous(),
        h0.contiguous(), None if c0 is None else c0.contiguous(), reverse, list(batch_sizes),
    )  # fmt: skip
    return out, h_n, c_n


def _project(x: Tensor, w_ih: Tensor, bias: Tensor | None, shared: bool) -> Tensor:
    """``x @ w_ih^T + bias`` for every model: ``x [N, T, B, I]`` (or ``[T, B, I]``
    shared by all models) -> ``[N, T, B, G*H]``, one batched GEMM."""
    from modelbatch.ops.linear import batched_linear

    n, g, i = w_ih.shape
    lead = x.shape[:-1] if shared else x.shape[1:-1]
    rows = x.reshape(-1, i) if shared else x.reshape(n, -1, i)
    return batched_linear(rows, w_ih, bias, shared).view(n, *lead, g)


def packing_index(batch_sizes, b: int, device) -> Tensor:
    """Positions ``t * B + row`` of the elements of packed data, in packed order."""
    idx = [t * b + r for t, bt in enumerate(batch_sizes) for r in range(bt)]
    return torch.tensor(idx, dtype=torch.long, device=device)


def split_weights(mode: int, weights, has_biases: bool, layers: int, dirs: int):
    """``(w_ih, w_hh, b_ih, b_hh, w_hr)`` per layer and direction from the flat list
    in ``nn.RNNBase._flat_weights`` order."""
    per, rem = divmod(len(weights), layers * dirs)
    base = 4 if has_biases else 2
    if rem or per not in (base, base + 1) or (per == base + 1 and mode != LSTM):
        raise ValueError(
            f"expected {layers * dirs} groups of {base} weights (plus w_hr for an LSTM with "
            f"proj_size), got {len(weights)} tensors"
        )
    groups = []
    for k in range(layers * dirs):
        w = list(weights[k * per : (k + 1) * per])
        b_ih, b_hh = (w[2], w[3]) if has_biases else (None, None)
        groups.append((w[0], w[1], b_ih, b_hh, w[-1] if per == base + 1 else None))
    return groups


def stacked_rnn(
    mode: int,
    x: Tensor,
    hx: list[Tensor],
    weights,
    has_biases: bool,
    num_layers: int,
    dropout: float,
    train: bool,
    bidirectional: bool,
    batch_first: bool = False,
    *,
    batch_sizes=None,
    shared_input: bool = False,
    dropout_fn=None,
):
    """``torch.lstm`` / ``gru`` / ``rnn_tanh`` / ``rnn_relu`` of N models at once.

    The arguments of the aten op, each with a leading model axis:

    * ``x``: ``[N, T, B, I]`` (``[N, B, T, I]`` with ``batch_first``), or packed data
      ``[N, S, I]`` with ``batch_sizes`` (T ints: ``PackedSequence.batch_sizes``, the
      same for every model). ``shared_input``: ``x`` has no model axis and feeds
      every model (read once, never copied N times).
    * ``hx``: ``[h0]`` or, for LSTM, ``[h0, c0]``: ``[N, layers * dirs, B, P or H]``.
    * ``weights``: the N models' ``_flat_weights`` stacked, ``[N, ...]`` each.
    * ``dropout_fn``: applied to each layer's ``[N, ...]`` output but the last in
      training when ``dropout > 0`` (the models' random streams live with the caller).

    Returns ``(out, h_n)`` or, for LSTM, ``(out, h_n, c_n)``, in the layout of ``x``.
    Each layer and direction is one input-projection GEMM for all steps and models
    plus one ``modelbatch::rnn_layer`` call.
    """
    dirs = 2 if bidirectional else 1
    groups = split_weights(mode, weights, has_biases, num_layers, dirs)
    h0 = hx[0]
    c0 = hx[1] if mode == LSTM else None
    n = groups[0][1].shape[0]
    if batch_sizes is not None:
        sizes = [int(v) for v in batch_sizes]
        b = sizes[0]
        index = packing_index(sizes, b, x.device)
        lead = () if shared_input else (n,)
        layer_in = x.new_zeros(*lead, len(sizes) * b, x.shape[-1])
        layer_in = layer_in.index_copy(len(lead), index, x).view(*lead, len(sizes), b, x.shape[-1])
    else:
        sizes = []
        layer_in = x.transpose(-3, -2) if batch_first else x
    shared = shared_input
    h_n, c_n = [], []
    for layer_idx in range(num_layers):
        outs = []
        for d in range(dirs):
            k = layer_idx * dirs + d
            w_ih, w_hh, b_ih, b_hh, w_hr = groups[k]
            bias = None
            if has_biases:
                bias = b_ih if mode == GRU else b_ih + b_hh
            gx = _project(layer_in, w_ih, bias, shared)
            c0k = c0[:, k] if mode == LSTM else None
            out, hn, cn = layer(
                mode, gx, w_hh, b_hh if mode == GRU else None, w_hr, h0[:, k], c0k, d == 1, sizes
            )
            outs.append(out)
            h_n.append(hn)
            c_n.append(cn)
        layer_in = outs[0] if dirs == 1 else torch.cat(outs, -1)
        shared = False
        if dropout > 0 and train and layer_idx < num_layers - 1:
            if dropout_fn is None:
                raise ValueError("stacked_rnn: dropout > 0 in training needs a dropout_fn")
            if sizes:  # as torch does: dropout of the packed data
                flat = layer_in.reshape(n, -1, layer_in.shape[-1])
                dropped = dropout_fn(flat.index_select(1, index))
                layer_in = flat.index_copy(1, index, dropped).view_as(layer_in)
            else:
                layer_in = dropout_fn(layer_in)
    if sizes:
        out = layer_in.reshape(n, -1, layer_in.shape[-1]).index_select(1, index)
    else:
        out = layer_in.transpose(1, 2) if batch_first else layer_in
    result = (out, torch.stack(h_n, 1))
    return result + (torch.stack(c_n, 1),) if mode == LSTM else result


def stacked_cell(
    mode: int, x: Tensor, hx: list[Tensor], w_ih, w_hh, b_ih, b_hh, *, shared_input=False
):
    """``torch.lstm_cell`` / ``gru_cell`` / ``rnn_{tanh,relu}_cell`` of N models: one
    step of :func:`stacked_rnn` (the same fused kernels, forward and backward).

    ``x [N, B, I]`` (``[B, I]`` with ``shared_input``), ``hx`` ``[h]`` or ``[h, c]``
    ``[N, B, H]``, weights ``[N, ...]``. Returns ``h`` or, for LSTM, ``(h, c)``.
    """
    bias = None
    if b_ih is not None:
        bias = b_ih if mode == GRU else (b_ih if b_hh is None else b_ih + b_hh)
    gx = _project(x.unsqueeze(-3), w_ih, bias, shared_input)
    c0 = hx[1] if mode == LSTM else None
    _, h, c = layer(mode, gx, w_hh, b_hh if mode == GRU else None, None, hx[0], c0, False)
    return (h, c) if mode == LSTM else h
