"""vmap batching rules for the recurrent ops ``torch.vmap`` lacks.

torch 2.13 has no batching rule for ``aten::lstm``, ``gru``, ``rnn_tanh``,
``rnn_relu`` (padded and packed overloads) or ``lstm_cell`` (vmap raises "Batching
rule not implemented"), and batches ``gru_cell``, ``rnn_{tanh,relu}_cell`` and the
sequence packing ops one sample at a time. Importing :mod:`modelbatch` registers
rules for all of them on functorch's ``FuncTorchBatched`` dispatch key, so
unmodified ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` / ``nn.LSTMCell`` / ``nn.GRUCell``
/ ``nn.RNNCell`` (and ``pack_padded_sequence`` / ``pad_packed_sequence``) work under
any ``torch.vmap``, ModelBatch's included.

Each rule unwraps the tensors batched at its vmap level, moves the model axis to
the front (a weight or state that is not batched is broadcast with a zero stride;
an input that is not batched is read once for all models) and calls
:func:`modelbatch.ops.rnn.stacked_rnn` / :func:`~modelbatch.ops.rnn.stacked_cell`:
per layer and direction one input-projection GEMM and one ``modelbatch::rnn_layer``
(per step one batched GEMM plus one fused gate kernel, C++ on CPU, Triton on CUDA).

* Dropout between layers calls ``F.dropout`` on the batched layer output, so it
  follows the vmap's ``randomness`` flag, and inside ModelBatch each model's own
  random stream (see :mod:`modelbatch.rng`).
* Under ``torch.autocast`` each op runs in the dtype it has for one model: the
  autocast dtype on CUDA (cuDNN) and for ``nn.LSTM`` on CPU (oneDNN), float32 for
  the CPU ops that decompose (GRU, RNN, cells). The gate math is float32 always.
* Packed sequences: the batch sizes (the sequence lengths) must be the same for
  every model; per-model lengths raise and say to pad instead.
* A call batched at another level too (``vmap`` of ``vmap``) runs the op once per
  model of this level, which recurses into the next level's rule.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._C import _functorch as _ft
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from modelbatch.ops import rnn as rnn_ops

_LIB = torch.library.Library("aten", "IMPL")
_BATCHED = torch._C.DispatchKeySet(torch._C.DispatchKey.FuncTorchBatched)
aten = torch.ops.aten


def _unwrap(t, level):
    if isinstance(t, Tensor) and _ft.is_batchedtensor(t) and _ft.maybe_get_level(t) == level:
        return _ft._unwrap_batched(t, level)
    return t, None


def _front(value: Tensor, bdim: int | None, n: int) -> Tensor:
    """The model axis first; broadcast (stride 0) when ``value`` is not batched."""
    if bdim is None:
        return value.expand(n, *value.shape)
    return value.movedim(bdim, 0)


def _wrap(out, level):
    return tree_map(lambda t: _ft._add_batch_dim(t, 0, level), out)


class _Call:
    """The tensors of one call, unwrapped at the current vmap level."""

    def __init__(self, op, args):
        self.op = op
        self.args = args
        self.level = _ft.maybe_current_level()
        leaves, self.spec = tree_flatten(args)
        self.parts = [_unwrap(t, self.level) for t in leaves]
        dims = [(v, d) for v, d in self.parts if d is not None]
        self.n = dims[0][0].shape[dims[0][1]] if dims else None
        self.nested = any(isinstance(v, Tensor) and _ft.is_batchedtensor(v) for v, _ in self.parts)

    def generic(self):
        """The call when this rule cannot run it batched: nothing is batched at this
        level (pass it down), or values are batched at another level too (once per
        model of this level; each call meets the next level's rule)."""
        if self.n is None:
            with torch._C._ExcludeDispatchKeyGuard(_BATCHED):
                return self.op(*self.args)
        outs = []
        for i in range(self.n):
            one = [v if d is None else v.select(d, i) for v, d in self.parts]
            outs.append(self.op(*tree_unflatten(one, self.spec)))
        return tree_map(lambda *ts: _ft._add_batch_dim(torch.stack(ts), 0, self.level), *outs)

    @property
    def batched(self) -> bool:
        return self.n is not None and not self.nested


def _autocast(tensors: list[Tensor], fused_on_cpu: bool) -> tuple[list[Tensor], torch.dtype | None]:
    """The floating tensors cast as autocast treats the op for one model, when it is
    on: to its low dtype on CUDA (cuDNN's RNN and cell kernels are on autocast's
    low-precision list) and for ``nn.LSTM`` on CPU (oneDNN's ``mkldnn_rnn_layer``),
    to float32 for the CPU ops that decompose (whose float32 states promote the
    result to float32)."""
    kind = tensors[0].device.type
    if not torch.is_autocast_enabled(kind):
        return tensors, None
    low = kind == "cuda" or fused_on_cpu
    dtype = torch.get_autocast_dtype(kind) if low else torch.float32
    cast = [t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t for t in tensors]
    return cast, dtype


def _same_sizes(batch_sizes: Tensor, bdim: int | None) -> list[int]:
    if bdim is None:
        return batch_sizes.tolist()
    rows = batch_sizes.movedim(bdim, 0)
    if not bool((rows == rows[0]).all()):
        raise ValueError(
            "packed sequences with different lengths per model are not supported under "
            "vmap / ModelBatch: the models of one batch must share the sequence lengths. "
            "Pass padded sequences (and mask or gather the last valid step) instead."
        )
    return rows[0].tolist()


def _dropout_fn(p: float, level: int):
    def drop(y: Tensor) -> Tensor:
        # F.dropout looked up per call: inside ModelBatch it is routed to the models'
        # streams (modelbatch.interception._RoutedGlobals).
        out = F.dropout(_ft._add_batch_dim(y, 0, level), p, True)
        value, bdim = _ft._unwrap_batched(out, level)
        return value.movedim(bdim, 0)

    return drop


def _rnn_rule(mode: int, packed: bool):
    name = {0: "lstm", 1: "gru", 2: "rnn_tanh", 3: "rnn_relu"}[mode]
    op = getattr(aten, name).data if packed else getattr(aten, name).input

    def rule(*args):
        call = _Call(op, args)
        if not call.batched:
            return call.generic()
        if packed:
            data, batch_sizes, hx, params, has_biases, layers, p, train, bidir = args
            batch_first = False
        else:
            data, hx, params, has_biases, layers, p, train, bidir, batch_first = args
        hx = list(hx) if mode == rnn_ops.LSTM else [hx]
        level, n = call.level, call.n
        x, xd = _unwrap(data, level)
        shared = xd is None
        if not shared:
            x = x.movedim(xd, 0)
        states = [_front(*_unwrap(h, level), n) for h in hx]
        weights = [_front(*_unwrap(w, level), n) for w in params]
        sizes = _same_sizes(*_unwrap(batch_sizes, level)) if packed else None
        tensors, dtype = _autocast([x, *states, *weights], mode == rnn_ops.LSTM)
        x, states, weights = tensors[0], tensors[1 : 1 + len(states)], tensors[1 + len(states) :]
        with torch.autocast(x.device.type, enabled=False) if dtype else contextlib.nullcontext():
            out = rnn_ops.stacked_rnn(
                mode, x, states, weights, has_biases, layers, p, train, bidir, batch_first,
                batch_sizes=sizes, shared_input=shared, dropout_fn=_dropout_fn(p, level),
            )  # fmt: skip
        return _wrap(out, level)

    return rule


def _cell_rule(mode: int):
    name = {0: "lstm_cell", 1: "gru_cell", 2: "rnn_tanh_cell", 3: "rnn_relu_cell"}[mode]
    op = getattr(aten, name).default

    def rule(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
        args = (input, hx, w_ih, w_hh, b_ih, b_hh)
        call = _Call(op, args)
        if not call.batched:
            return call.generic()
        level, n = call.level, call.n
        x, xd = _unwrap(input, level)
        shared = xd is None
        if not shared:
            x = x.movedim(xd, 0)
        hx = list(hx) if mode == rnn_ops.LSTM else [hx]
        states = [_front(*_unwrap(h, level), n) for h in hx]
        ws = [
            None if w is None else _front(*_unwrap(w, level), n) for w in (w_ih, w_hh, b_ih, b_hh)
        ]
        tensors, dtype = _autocast([x, *states, *ws], False)
        x, states, ws = tensors[0], tensors[1 : 1 + len(states)], tensors[1 + len(states) :]
        with torch.autocast(x.device.type, enabled=False) if dtype else contextlib.nullcontext():
            out = rnn_ops.stacked_cell(mode, x, states, *ws, shared_input=shared)
        return _wrap(out, level)

    return rule


def _pack_rule(input, lengths, batch_first):
    call = _Call(aten._pack_padded_sequence.default, (input, lengths, batch_first))
    if not call.batched or _unwrap(lengths, call.level)[1] is not None:
        if call.batched:
            _same_sizes(*_unwrap(lengths, call.level))  # raises for per-model lengths
        return call.generic()
    x, xd = _unwrap(input, call.level)
    x = x.movedim(xd, 0)
    # torch's own op on model 0 checks the lengths and gives the batch sizes.
    with torch._C._ExcludeDispatchKeyGuard(_BATCHED):
        _, batch_sizes = aten._pack_padded_sequence(x[0], lengths, batch_first)
    if batch_first:
        x = x.transpose(1, 2)
    sizes = batch_sizes.tolist()
    index = rnn_ops.packing_index(sizes, sizes[0], x.device)
    data = x[:, : len(sizes), : sizes[0]].reshape(x.shape[0], -1, *x.shape[3:])
    return _ft._add_batch_dim(data.index_select(1, index), 0, call.level), batch_sizes


def _pad_rule(data, batch_sizes, batch_first, padding_value, total_length):
    args = (data, batch_sizes, batch_first, padding_value, total_length)
    call = _Call(aten._pad_packed_sequence.default, args)
    if not call.batched or _unwrap(data, call.level)[1] is None:
        return call.generic()
    x, xd = _unwrap(data, call.level)
    x = x.movedim(xd, 0)
    sizes_t, sd = _unwrap(batch_sizes, call.level)
    sizes = _same_sizes(sizes_t, sd)
    sizes_t = torch.tensor(sizes, dtype=torch.int64)
    with torch._C._ExcludeDispatchKeyGuard(_BATCHED):
        first, lengths = aten._pad_packed_sequence(
            x[0], sizes_t, False, padding_value, total_length
        )
    t_out, b = first.shape[0], sizes[0]
    index = rnn_ops.packing_index(sizes, b, x.device)
    padded = x.new_full((x.shape[0], t_out * b, *x.shape[2:]), padding_value)
    padded = padded.index_copy(1, index, x).view(x.shape[0], t_out, b, *x.shape[2:])
    if batch_first:
        padded = padded.transpose(1, 2)
    return _ft._add_batch_dim(padded, 0, call.level), lengths


def _register() -> None:
    for mode in range(4):
        name = ("lstm", "gru", "rnn_tanh", "rnn_relu")[mode]
        _LIB.impl(f"{name}.input", _rnn_rule(mode, False), "FuncTorchBatched")
        _LIB.impl(f"{name}.data", _rnn_rule(mode, True), "FuncTorchBatched")
        _LIB.impl(f"{name}_cell", _cell_rule(mode), "FuncTorchBatched")
    _LIB.impl("_pack_padded_sequence", _pack_rule, "FuncTorchBatched")
    _LIB.impl("_pad_packed_sequence", _pad_rule, "FuncTorchBatched")


_register()
