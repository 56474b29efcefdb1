"""Recurrent models inside ModelBatch (and any torch.vmap): N unmodified nn.LSTM /
nn.GRU / nn.RNN / cells batched against the same N modules run one by one.

Forward outputs, final states and every parameter's gradient match to 1e-5
relative in float32 for: 1 and 2+ layers, bidirectional, batch_first, bias=False,
given and default initial states, proj_size (LSTM), shared and per-model inputs,
unbatched (2-D) input, packed sequences, and the cells. Dropout between layers
replays plain PyTorch exactly with ``rng="torch"`` and is per-model and independent
of N with ``rng="philox"``. Training 8 sequence classifiers (embedding, 2-layer
LSTM, linear head) for 30 steps with per-model learning rates matches 8 plain runs.
The safety net: a model calling an op vmap cannot batch (``aten::rrelu``) trains
model by model, matches plain training, and warns once.
"""

from __future__ import annotations

import copy
import warnings

import modelbatch as mb
import pytest
import torch
import torch.nn.functional as F
from _models import max_rel_err
from modelbatch.core import unbatchable_op
from modelbatch.ops import rnn as rnn_ops
from torch import nn
from torch.func import functional_call, stack_module_state, vmap
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

RTOL = 1e-5
N, T, B, IN, H = 3, 5, 4, 6, 7


class Wrap(nn.Module):
    """Returns (output, *final states) of the wrapped recurrent module."""

    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x, hx=None):
        out, state = self.rnn(x) if hx is None else self.rnn(x, hx)
        return (out, *state) if isinstance(state, tuple) else (out, state)


def _loss(outs, batched: bool = True) -> torch.Tensor:
    """A loss that weighs every element of one model's outputs differently (so that a
    swapped or misplaced value shows); the sum over models when ``batched``."""
    total = 0
    for k, o in enumerate(outs):
        one = o[0] if batched else o
        w = torch.linspace(-1, 1, one.numel()).view_as(one)
        total = total + (o * w).sum() * (k + 1)
    return total


def _check(make, x, hx=None, *, shared=True, via="modelbatch"):
    """Batched forward + backward against each module alone; returns max rel err."""
    torch.manual_seed(0)
    models = [Wrap(make()) for _ in range(N)]
    ref = [copy.deepcopy(m) for m in models]
    if via == "modelbatch":
        batch = mb.ModelBatch(models, shared_input=shared)
        outs = batch(x) if hx is None else batch(x, hx)
        assert batch.forward_path == "vmap"
        params = list(batch.stacked_params().values())
    else:
        stacked, _ = stack_module_state(models)
        params = list(stacked.values())

        def one(p, xx, hh):
            return functional_call(models[0], p, (xx,) if hh is None else (xx, hh))

        dims = (0, None if shared else 0, None if hx is None else 0)
        outs = vmap(one, in_dims=dims)(stacked, x, hx)
    grads = torch.autograd.grad(_loss(outs), params)
    worst = 0.0
    for k, m in enumerate(ref):
        xk = x if shared else x[k]
        hk = None if hx is None else tree_pick(hx, k)
        ro = m(xk) if hk is None else m(xk, hk)
        rg = torch.autograd.grad(_loss(ro, batched=False), list(m.parameters()))
        assert len(ro) == len(outs)
        for a, b in zip(outs, ro):
            assert a[k].shape == b.shape
            worst = max(worst, max_rel_err(a[k], b))
        for a, b in zip(grads, rg):
            worst = max(worst, max_rel_err(a[k], b))
    return worst


def tree_pick(hx, k):
    return tuple(h[k] for h in hx) if isinstance(hx, tuple) else hx[k]


MODULES = {
    "lstm": lambda **kw: nn.LSTM(IN, H, **kw),
    "gru": lambda **kw: nn.GRU(IN, H, **kw),
    "rnn_tanh": lambda **kw: nn.RNN(IN, H, **kw),
    "rnn_relu": lambda **kw: nn.RNN(IN, H, nonlinearity="relu", **kw),
}
CONFIGS = {
    "plain": {},
    "2layers_bidir": {"num_layers": 2, "bidirectional": True},
    "3layers_batch_first": {"num_layers": 3, "batch_first": True},
    "no_bias_bidir": {"bias": False, "bidirectional": True},
}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("kind", list(MODULES))
@pytest.mark.parametrize("shared", [True, False])
def test_modules_match_one_by_one(kind, config, shared):
    kw = CONFIGS[config]
    shape = (B, T, IN) if kw.get("batch_first") else (T, B, IN)
    torch.manual_seed(1)
    x = torch.randn(*shape) if shared else torch.randn(N, *shape)
    assert _check(lambda: MODULES[kind](**kw), x, shared=shared) < RTOL


@pytest.mark.parametrize("kind", list(MODULES))
def test_given_initial_state(kind):
    kw = {"num_layers": 2, "bidirectional": True}
    torch.manual_seed(2)
    x = torch.randn(N, T, B, IN)
    h0 = torch.randn(N, 4, B, H)
    hx = (h0, torch.randn(N, 4, B, H)) if kind == "lstm" else h0
    assert _check(lambda: MODULES[kind](**kw), x, hx, shared=False) < RTOL


@pytest.mark.parametrize("bidirectional", [False, True])
def test_lstm_proj_size(bidirectional):
    torch.manual_seed(3)
    x = torch.randn(N, T, B, IN)
    hx = (
        torch.randn(N, 4 if bidirectional else 2, B, 3),
        torch.randn(N, 4 if bidirectional else 2, B, H),
    )
    make = lambda: nn.LSTM(IN, H, num_layers=2, proj_size=3, bidirectional=bidirectional)
    assert _check(make, x, hx, shared=False) < RTOL
    assert _check(make, x[0]) < RTOL


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_unbatched_input(kind):
    torch.manual_seed(4)
    assert _check(lambda: MODULES[kind](num_layers=2), torch.randn(T, IN)) < RTOL


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_plain_torch_vmap(kind):
    """Once modelbatch is imported, torch.vmap itself batches these modules."""
    torch.manual_seed(5)
    x = torch.randn(N, T, B, IN)
    make = lambda: MODULES[kind](num_layers=2, bidirectional=True)
    assert _check(make, x, shared=False, via="vmap") < RTOL
    assert _check(make, x[0], via="vmap") < RTOL


def test_nested_vmap():
    """vmap over a grid of models (vmap of vmap) recurses level by level."""
    torch.manual_seed(6)
    models = [nn.LSTM(4, 5) for _ in range(6)]
    stacked, _ = stack_module_state(models)
    grid = {k: v.view(2, 3, *v.shape[1:]) for k, v in stacked.items()}
    x = torch.randn(3, 2, 4)

    def one(p, xx):
        return functional_call(models[0], p, (xx,))[0]

    out = vmap(vmap(one, in_dims=(0, None)), in_dims=(0, None))(grid, x)
    ref = torch.stack([m(x)[0] for m in models]).view(2, 3, 3, 2, 5)
    assert max_rel_err(out, ref) < RTOL


# ------------------------------------------------------------------- cells
class CellLoop(nn.Module):
    """Runs a cell over the sequence; returns the stacked hidden states (and c)."""

    def __init__(self, cell: nn.Module) -> None:
        super().__init__()
        self.cell = cell

    def forward(self, xs, hx=None):
        hs, cs = [], []
        state = hx
        for t in range(xs.shape[0]):
            state = self.cell(xs[t]) if state is None else self.cell(xs[t], state)
            h = state[0] if isinstance(state, tuple) else state
            hs.append(h)
            if isinstance(state, tuple):
                cs.append(state[1])
        return (torch.stack(hs), torch.stack(cs)) if cs else (torch.stack(hs),)


CELLS = {
    "lstm_cell": lambda: nn.LSTMCell(IN, H),
    "gru_cell": lambda: nn.GRUCell(IN, H),
    "rnn_tanh_cell": lambda: nn.RNNCell(IN, H),
    "rnn_relu_cell": lambda: nn.RNNCell(IN, H, nonlinearity="relu"),
    "gru_cell_no_bias": lambda: nn.GRUCell(IN, H, bias=False),
}


def _check_cells(make, xs, hx=None, shared=True):
    torch.manual_seed(0)
    models = [CellLoop(make()) for _ in range(N)]
    ref = [copy.deepcopy(m) for m in models]
    batch = mb.ModelBatch(models, shared_input=shared)
    outs = batch(xs) if hx is None else batch(xs, hx)
    assert batch.forward_path == "vmap"
    grads = torch.autograd.grad(_loss(outs), list(batch.stacked_params().values()))
    worst = 0.0
    for k, m in enumerate(ref):
        xk = xs if shared else xs[k]
        hk = None if hx is None else tree_pick(hx, k)
        ro = m(xk) if hk is None else m(xk, hk)
        rg = torch.autograd.grad(_loss(ro, batched=False), list(m.parameters()))
        worst = max([worst] + [max_rel_err(a[k], b) for a, b in zip(outs, ro)])
        worst = max([worst] + [max_rel_err(a[k], b) for a, b in zip(grads, rg)])
    return worst


@pytest.mark.parametrize("kind", list(CELLS))
def test_cells(kind):
    torch.manual_seed(7)
    assert _check_cells(CELLS[kind], torch.randn(T, B, IN)) < RTOL
    h0 = torch.randn(N, B, H)
    hx = (h0, torch.randn(N, B, H)) if kind == "lstm_cell" else h0
    assert _check_cells(CELLS[kind], torch.randn(N, T, B, IN), hx, shared=False) < RTOL
    assert _check_cells(CELLS[kind], torch.randn(T, IN)) < RTOL  # unbatched 1-D steps


# --------------------------------------------------------- packed sequences
class Packed(nn.Module):
    def __init__(self, rnn: nn.Module, lengths: torch.Tensor) -> None:
        super().__init__()
        self.rnn = rnn
        self.lengths = lengths

    def forward(self, x):
        bf = self.rnn.batch_first
        packed = pack_padded_sequence(x, self.lengths, batch_first=bf, enforce_sorted=False)
        out, state = self.rnn(packed)
        out, lengths = pad_packed_sequence(out, batch_first=bf)
        assert torch.equal(lengths, self.lengths)
        return (out, *state) if isinstance(state, tuple) else (out, state)


@pytest.mark.parametrize(
    "kind,kw",
    [
        ("lstm", {"num_layers": 2, "bidirectional": True}),
        ("lstm", {"proj_size": 3, "bidirectional": True}),
        ("gru", {"batch_first": True, "num_layers": 2}),
        ("rnn_relu", {"bidirectional": True}),
    ],
)
@pytest.mark.parametrize("shared", [True, False])
def test_packed_sequences(kind, kw, shared):
    torch.manual_seed(8)
    lengths = torch.tensor([3, 5, 1, 4])
    shape = (B, T, IN) if kw.get("batch_first") else (T, B, IN)
    x = torch.randn(*shape) if shared else torch.randn(N, *shape)
    models = [Packed(MODULES[kind](**kw), lengths) for _ in range(N)]
    ref = [copy.deepcopy(m) for m in models]
    batch = mb.ModelBatch(models, shared_input=shared)
    outs = batch(x)
    assert batch.forward_path == "vmap"
    grads = torch.autograd.grad(_loss(outs), list(batch.stacked_params().values()))
    for k, m in enumerate(ref):
        ro = m(x if shared else x[k])
        rg = torch.autograd.grad(_loss(ro, batched=False), list(m.parameters()))
        for a, b in zip(outs, ro):
            assert max_rel_err(a[k], b) < RTOL
        for a, b in zip(grads, rg):
            assert max_rel_err(a[k], b) < RTOL


def test_packed_per_model_lengths_raise():
    torch.manual_seed(9)
    lstm = [nn.LSTM(IN, H) for _ in range(N)]
    stacked, _ = stack_module_state(lstm)
    x = torch.randn(N, T, B, IN)
    lengths = torch.tensor([[5, 3, 2, 1], [5, 4, 2, 1], [5, 3, 2, 1]])

    def one(p, xx, ll):
        return functional_call(lstm[0], p, (pack_padded_sequence(xx, ll),))[0].data

    with pytest.raises(ValueError, match=r"different lengths per model.*Pass padded sequences"):
        vmap(one)(stacked, x, lengths)


# ------------------------------------------------------------------ dropout
class Classifier(nn.Module):
    def __init__(self, vocab=11, d=6, h=8, classes=3, dropout=0.0, kind="lstm"):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        cls = nn.LSTM if kind == "lstm" else nn.GRU
        self.rnn = cls(d, h, num_layers=2, dropout=dropout, batch_first=True)
        self.head = nn.Linear(h, classes)

    def forward(self, tokens):
        out, _ = self.rnn(self.emb(tokens))
        return self.head(out[:, -1])


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_dropout_replays_torch_per_model(kind):
    torch.manual_seed(10)
    models = [Classifier(dropout=0.4, kind=kind) for _ in range(N)]
    tokens = torch.randint(0, 11, (B, T))
    batch = mb.ModelBatch(models, rng="torch", seeds=[21, 22, 23])
    out = batch(tokens)
    for k, m in enumerate(models):
        torch.manual_seed(21 + k)
        # Same masks; the values agree to float32 rounding (oneDNN vs our gate kernels).
        assert max_rel_err(out[k], m(tokens)) < RTOL
    eval_out = torch.stack([m.eval()(tokens) for m in models])
    assert (out - eval_out).abs().max() > 1e-3  # dropout did act


def test_dropout_philox_per_model_streams():
    torch.manual_seed(11)
    models = [Classifier(dropout=0.5) for _ in range(4)]
    tokens = torch.randint(0, 11, (B, T))
    full = mb.ModelBatch(models, seeds=[1, 2, 3, 4])(tokens)
    part = mb.ModelBatch(models[2:], seeds=[3, 4])(tokens)
    assert torch.equal(full[2:], part)  # a model's masks do not depend on N
    again = mb.ModelBatch(models, seeds=[1, 2, 3, 4])(tokens)
    assert torch.equal(full, again)
    other = mb.ModelBatch(models, seeds=[5, 6, 7, 8])(tokens)
    assert (full - other).abs().max() > 1e-3


def test_dropout_plain_vmap_follows_randomness_flag():
    lstm = [nn.LSTM(IN, H, num_layers=2, dropout=0.3) for _ in range(N)]
    stacked, _ = stack_module_state(lstm)
    x = torch.randn(T, B, IN)

    def one(p):
        return functional_call(lstm[0], p, (x,))[0]

    with pytest.raises(RuntimeError, match="randomness"):
        vmap(one, randomness="error")(stacked)
    assert vmap(one, randomness="different")(stacked).shape == (N, T, B, H)


# ----------------------------------------------------------------- training
def _train_both(models, data, lrs, momentum=0.0):
    """SGD with per-model learning rates: a ModelBatch of ``models`` and copies of
    them trained one by one with torch.optim, on the same ``(x, y)`` batches."""
    ref = [copy.deepcopy(m) for m in models]
    batch = mb.ModelBatch(models)
    opt = mb.optim.SGD(batch, lr=lrs, momentum=momentum)
    ropts = [torch.optim.SGD(m.parameters(), lr=lr, momentum=momentum) for m, lr in zip(ref, lrs)]
    for x, y in data:
        opt.zero_grad()
        batch.compute_loss(batch(x), y, F.cross_entropy).backward()
        opt.step()
        for m, o in zip(ref, ropts):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
    return batch, ref


def _worst_param_err(batch, ref) -> float:
    return max(
        max_rel_err(p[k], dict(m.named_parameters())[name])
        for name, p in batch.stacked_params().items()
        for k, m in enumerate(ref)
    )


def test_training_sequence_classifiers_match_sequential():
    """8 classifiers (embedding, 2-layer LSTM, linear head), 30 steps, per-model lr."""
    n, steps = 8, 30
    lrs = [0.02 * (k + 1) for k in range(n)]
    torch.manual_seed(12)
    models = [Classifier(vocab=13, d=8, h=16, classes=4) for _ in range(n)]
    gen = torch.Generator().manual_seed(0)
    data = [
        (torch.randint(0, 13, (6, 9), generator=gen), torch.randint(0, 4, (6,), generator=gen))
        for _ in range(steps)
    ]
    batch, ref = _train_both(models, data, lrs, momentum=0.9)
    assert batch.forward_path == "vmap"
    assert _worst_param_err(batch, ref) < RTOL
    moved = max_rel_err(batch.stacked_params()["head.weight"][0], models[0].head.weight)
    assert moved > 1e-2  # training did change the weights


# --------------------------------------------------------------- safety net
class RReLUNet(nn.Module):
    """An MLP whose activation is rrelu, which torch 2.13's vmap cannot batch."""

    def __init__(self, slope_op=None):
        super().__init__()
        self.a = nn.Linear(5, 12)
        self.drop = nn.Dropout(0.25)
        self.b = nn.Linear(12, 3)
        self.slope_op = slope_op

    def forward(self, x):
        h = self.a(x)
        # rrelu without training is leaky_relu with slope (lower + upper) / 2 = 0.2
        h = F.rrelu(h, 0.1, 0.3, training=False) if self.slope_op is None else self.slope_op(h)
        return self.b(self.drop(h))


def test_safety_net_trains_like_sequential_and_warns_once():
    n, steps = 4, 20
    lrs = [0.05, 0.1, 0.2, 0.3]
    torch.manual_seed(13)
    models = [RReLUNet() for _ in range(n)]
    for m in models:
        m.drop.p = 0.0  # no randomness: compare with plain torch exactly
    gen = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(8, 5, generator=gen), torch.randint(0, 3, (8,), generator=gen))
        for _ in range(steps)
    ]
    mb.core._WARNED_OPS.discard("aten::rrelu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batch, ref = _train_both(models, data, lrs)
    fallback = [w for w in caught if issubclass(w.category, mb.PerModelFallbackWarning)]
    assert len(fallback) == 1
    assert "aten::rrelu" in str(fallback[0].message) and "report" in str(fallback[0].message)
    assert batch.forward_path == "per_model" and batch.fallback_op == "aten::rrelu"
    assert _worst_param_err(batch, ref) < RTOL
    # A second ModelBatch hitting the same op does not warn again.
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        mb.ModelBatch(models)(torch.randn(2, 5))
    assert not [w for w in again if issubclass(w.category, mb.PerModelFallbackWarning)]


def test_safety_net_keeps_philox_masks():
    """The per-model path draws each model's dropout from the same Philox stream as
    the vectorised path: rrelu (fallback) and leaky_relu(0.2) (vmap) agree exactly."""
    torch.manual_seed(14)
    models = [RReLUNet() for _ in range(N)]
    x = torch.randn(6, 5)
    fallback = mb.ModelBatch(models, seeds=[7, 8, 9])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mb.PerModelFallbackWarning)
        out_fallback = [fallback(x) for _ in range(2)]
    leaky = [copy.deepcopy(m) for m in models]
    for m in leaky:
        m.slope_op = lambda h: F.leaky_relu(h, 0.2)
    vectorised = mb.ModelBatch(leaky, seeds=[7, 8, 9])
    out_vmap = [vectorised(x) for _ in range(2)]
    assert fallback.forward_path == "per_model" and vectorised.forward_path == "vmap"
    for a, b in zip(out_fallback, out_vmap):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.equal(out_vmap[0], out_vmap[1])  # fresh masks each step
    assert torch.equal(fallback.rng_offsets, vectorised.rng_offsets)


def test_safety_net_torch_rng_replays_random_op():
    """With rng="torch" the per-model path replays every random op, rrelu included."""
    torch.manual_seed(15)
    models = [nn.Sequential(nn.Linear(5, 6), nn.RReLU(), nn.Dropout(0.3)) for _ in range(N)]
    x = torch.randn(4, 5)
    batch = mb.ModelBatch(models, rng="torch", seeds=[3, 4, 5])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mb.PerModelFallbackWarning)
        outs = [batch(x), batch(x)]
    for k, m in enumerate(models):
        torch.manual_seed(3 + k)
        assert torch.equal(outs[0][k], m(x)) and torch.equal(outs[1][k], m(x))


def test_safety_net_restores_state_of_failed_attempt():
    """A vmap attempt that fails after dropout and a BatchNorm update leaves no trace."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(5)
            self.drop = nn.Dropout(0.5)
            self.a = nn.Linear(5, 4)

        def forward(self, x):
            return F.rrelu(self.a(self.drop(self.bn(x))), training=False)

    torch.manual_seed(16)
    models = [Net() for _ in range(N)]
    x = torch.randn(8, 5)
    batch = mb.ModelBatch(models, seeds=[1, 2, 3])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mb.PerModelFallbackWarning)
        batch(x)
    for k, m in enumerate(models):
        m(x)  # one BatchNorm update, as the batch should have done once
        assert torch.allclose(batch.stacked_buffers()["bn.running_mean"][k], m.bn.running_mean)
        assert batch.stacked_buffers()["bn.num_batches_tracked"][k] == 1
    blocks = mb.ops.dropout.blocks(8 * 5)
    assert batch.rng_offsets.tolist() == [blocks] * N


@pytest.mark.parametrize(
    "forward,op",
    [
        (lambda h: h[h > 0].sum() + h.sum(), "indexing with a boolean mask"),
        (lambda h: h * h.sum().item(), "Tensor.item()"),
        (lambda h: h if h.sum() > 0 else -h, "data-dependent control flow"),
    ],
)
def test_safety_net_other_unbatchable(forward, op):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(5, 4)

        def forward(self, x):
            return forward(self.a(x))

    torch.manual_seed(17)
    models = [Net() for _ in range(N)]
    x = torch.randn(3, 5)
    batch = mb.ModelBatch(models)
    with pytest.warns(mb.PerModelFallbackWarning, match="cannot batch"):
        out = batch(x)
    assert batch.fallback_op == op
    for k, m in enumerate(models):
        assert torch.allclose(out[k], m(x))
    with pytest.raises(RuntimeError, match="vmap"):
        mb.ModelBatch(models, fallback=False)(x)
    batch.reset_forward_path()
    assert batch.forward_path is None


def test_safety_net_for_the_loss():
    """A loss vmap cannot batch runs model by model too, per-model targets included."""

    def loss_fn(out, y):
        return F.cross_entropy(F.rrelu(out, 0.1, 0.3, training=False), y)

    torch.manual_seed(19)
    models = [nn.Linear(5, 3) for _ in range(N)]
    batch = mb.ModelBatch(models)
    x, y = torch.randn(4, 5), torch.randint(0, 3, (N, 4))
    mb.core._WARNED_OPS.discard("aten::rrelu")
    with pytest.warns(mb.PerModelFallbackWarning, match="runs its loss model by model"):
        losses = batch.compute_loss(batch(x), y, loss_fn, reduction="none")
    assert batch.forward_path == "vmap"
    expected = torch.stack([loss_fn(m(x), y[k]) for k, m in enumerate(models)])
    assert max_rel_err(losses, expected) < RTOL
    grads = torch.autograd.grad(losses.sum(), [batch.weight])[0]
    for k, m in enumerate(models):
        ref = torch.autograd.grad(loss_fn(m(x), y[k]), [m.weight])[0]
        assert max_rel_err(grads[k], ref) < RTOL


def test_unbatchable_op_parsing():
    assert (
        unbatchable_op(RuntimeError("Batching rule not implemented for aten::lstm.input. We could"))
        == "aten::lstm.input"
    )
    assert (
        unbatchable_op(RuntimeError("vmap: we do not yet support aten::rrelu. Please file"))
        == "aten::rrelu"
    )
    assert unbatchable_op(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None


# ---------------------------------------------------------------- bad input
def test_stacked_rnn_rejects_wrong_weight_count():
    w = [torch.randn(N, 4 * H, IN), torch.randn(N, 4 * H, H), torch.randn(N, 4 * H)]
    with pytest.raises(ValueError, match="groups of 4 weights"):
        rnn_ops.stacked_rnn(
            rnn_ops.LSTM, torch.randn(T, B, IN), [torch.zeros(N, 1, B, H)] * 2, w, True, 1, 0.0,
            False, False, shared_input=True,
        )  # fmt: skip


def test_model_input_shape_error_is_the_modules():
    batch = mb.ModelBatch([nn.LSTM(IN, H) for _ in range(N)])
    with pytest.raises(ValueError, match=r"input.size\(-1\) must be equal to input_size"):
        batch(torch.randn(T, B, IN + 1))


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_autocast_runs_in_the_low_precision(kind):
    """Each model gets the dtype its own autocast forward gives: bfloat16 for the LSTM
    (oneDNN's kernel is on autocast's list), float32 for the GRU (which decomposes)."""
    torch.manual_seed(18)
    models = [Wrap(MODULES[kind](num_layers=2)) for _ in range(N)]
    batch = mb.ModelBatch(models)
    x = torch.randn(T, B, IN)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = batch(x)
        refs = [m(x) for m in models]
    for k, ref in enumerate(refs):
        for a, b in zip(outs, ref):
            assert a.dtype == b.dtype == (torch.bfloat16 if kind == "lstm" else torch.float32)
            assert max_rel_err(a[k].float(), b.float()) < 2e-2  # bfloat16 resolution
    grads = torch.autograd.grad(outs[0].float().sum(), list(batch.stacked_params().values()))
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
