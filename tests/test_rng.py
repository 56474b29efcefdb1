"""Per-model random streams (modelbatch.rng): dropout trains as each model would alone.

* ``rng="philox"``: model i's masks in a batch of N are exactly those of a batch
  of one holding model i with the same seed, whatever N and the order.
* ``rng="torch"``: ModelBatch reproduces N plain-PyTorch runs that each called
  ``torch.manual_seed(seeds[i])``, to 1e-5 (float32).
* Evaluation draws nothing; the stream state survives state_dict() / save_all().
"""

from __future__ import annotations

import copy

import modelbatch as mb
import pytest
import torch
import torch.nn.functional as F
from _models import max_rel_err
from modelbatch.ops import dropout as dropout_op
from torch import nn

STEPS = 20
SEEDS = [11, 2**40 + 3, -5, 123456789]


class DropMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 32), nn.Tanh()
        )
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        return self.head(self.drop(self.net(x)))


class DropCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.drop = nn.Dropout2d(0.25)
        self.head = nn.Linear(6 * 3 * 3, 3)

    def forward(self, x):
        x = F.max_pool2d(self.drop(torch.relu(self.conv(x))), 2)
        return self.head(x.flatten(1))


class DropTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(
            d_model=8, nhead=2, dim_feedforward=16, dropout=0.1, batch_first=True
        )
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.layer(x).mean(1))


MODELS = {"mlp": DropMLP, "cnn": DropCNN, "transformer": DropTransformer}


def _data(kind, steps=STEPS, batch=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = {"mlp": (batch, 8), "cnn": (batch, 2, 6, 6), "transformer": (batch, 5, 8)}[kind]
    return [
        (torch.randn(shape, generator=g), torch.randint(0, 3, (batch,), generator=g))
        for _ in range(steps)
    ]


def _models(kind, n, seed=0):
    torch.manual_seed(seed)
    return [MODELS[kind]() for _ in range(n)]


class _Recorder:
    """Records the output of every batched_dropout call (its zeros are the masks)."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = dropout_op.batched_dropout

        def spy(x, *args, **kwargs):
            out = real(x, *args, **kwargs)
            self.calls.append(out.detach().clone())
            return out

        monkeypatch.setattr(dropout_op, "batched_dropout", spy)

    def model(self, i):
        return [c[i] for c in self.calls]


def _train(batch, data, lr=0.05):
    opt = mb.optim.SGD(batch, lr=lr, momentum=0.9)
    for x, y in data:
        opt.zero_grad()
        batch.compute_loss(batch(x), y, F.cross_entropy).backward()
        opt.step()


# --------------------------------------------------------------------- philox
@pytest.mark.parametrize("kind", ["mlp", "cnn", "transformer"])
def test_philox_model_masks_do_not_depend_on_n_or_order(kind, monkeypatch):
    models = _models(kind, 4)
    data = _data(kind)
    rec = _Recorder(monkeypatch)
    batch = mb.ModelBatch([copy.deepcopy(m) for m in models], seeds=SEEDS)
    _train(batch, data)
    full = rec.calls
    calls_per_step = len(full) // STEPS
    assert calls_per_step == {"mlp": 2, "cnn": 1, "transformer": 4}[kind]
    assert all(c.shape[0] == 4 for c in full)
    params = batch.get_model_states()

    for order in ([2], [3, 1, 0], [1, 3]):
        rec.calls = []
        sub = mb.ModelBatch(
            [copy.deepcopy(models[i]) for i in order], seeds=[SEEDS[i] for i in order]
        )
        _train(sub, data)
        assert len(rec.calls) == len(full)
        for pos, i in enumerate(order):
            for step, (got, ref) in enumerate(zip(rec.model(pos), [c[i] for c in full])):
                zeros = (got == 0) != (ref == 0)
                assert not zeros.any(), f"model {i} at position {pos}: call {step} masks differ"
                torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
            mine = sub.get_model_states()[pos]
            for k, v in mine.items():
                assert max_rel_err(v, params[i][k]) < 1e-4, (i, k)


def test_philox_masks_differ_between_models_and_steps(monkeypatch):
    rec = _Recorder(monkeypatch)
    batch = mb.ModelBatch(_models("mlp", 3), seeds=0)
    x = torch.randn(64, 8)
    batch(x)
    batch(x)
    first, second = rec.calls[0], rec.calls[2]  # the same Dropout(0.3), two steps
    assert not torch.equal(first[0] == 0, first[1] == 0)
    assert not torch.equal(first[0] == 0, second[0] == 0)
    # zeros: about half from the ReLU, then 30% of the rest from the dropout
    rate = (first == 0).float().mean().item()
    assert 0.3 < rate < 0.85


def test_philox_offsets_advance_by_blocks_and_eval_draws_nothing():
    batch = mb.ModelBatch(_models("mlp", 3), seeds=5)
    x = torch.randn(7, 8)
    batch(x)
    # two dropouts of 7 * 32 values each: 56 Philox blocks apiece
    assert batch.rng_offsets.tolist() == [112, 112, 112]
    batch.eval()
    before = batch.rng_offsets.clone()
    a, b = batch(x), batch(x)
    assert torch.equal(a, b)
    assert torch.equal(batch.rng_offsets, before)
    for i in range(3):
        torch.testing.assert_close(a[i], batch.model(i)(x))


def test_input_dropout_on_a_shared_input_gives_each_model_its_own_mask():
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Dropout(0.5), nn.Linear(16, 16, bias=False)) for _ in range(3)]
    for m in models:
        nn.init.eye_(m[1].weight)
    x = torch.ones(4, 16)
    out = mb.ModelBatch(models, seeds=[1, 2, 3])(x)
    assert not torch.equal(out[0] == 0, out[1] == 0)
    single = mb.ModelBatch(models[1:2], seeds=[2])(x)
    assert torch.equal(out[1], single[0])


# ---------------------------------------------------------------------- torch
def _plain_runs(models, data, seeds, lr=0.05):
    """Each model trained alone by plain PyTorch after torch.manual_seed(seeds[i])."""
    out = []
    for m, s in zip(models, seeds):
        m = copy.deepcopy(m)
        torch.manual_seed(s)
        opt = torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9)
        for x, y in data:
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
        out.append(m.state_dict())
    return out


@pytest.mark.parametrize("kind", ["mlp", "cnn", "transformer"])
def test_torch_mode_replays_plain_pytorch(kind):
    models = _models(kind, 3)
    data = _data(kind)
    seeds = SEEDS[:3]
    batch = mb.ModelBatch([copy.deepcopy(m) for m in models], seeds=seeds, rng="torch")
    global_before = torch.get_rng_state()
    _train(batch, data)
    assert torch.equal(torch.get_rng_state(), global_before)  # the global generator untouched
    ref = _plain_runs(models, data, seeds)
    for i, state in enumerate(batch.get_model_states()):
        for k, v in state.items():
            assert max_rel_err(v, ref[i][k]) < 1e-5, (kind, i, k)
    # and the masks did matter: other seeds train to other weights
    other = _plain_runs(models, data, [s + 1 for s in seeds])
    w = "head.weight"
    assert max_rel_err(batch.get_model_states()[0][w], other[0][w]) > 1e-3


# ------------------------------------------------------- every dropout variant
class Variants(nn.Module):
    """Every routed random call, each on its own kind of input."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 24)
        self.alpha = nn.AlphaDropout(0.2)
        self.falpha = nn.FeatureAlphaDropout(0.3)
        self.d1 = nn.Dropout1d(0.4)
        self.d3 = nn.Dropout3d(0.5)
        self.inplace = nn.Dropout(0.2, inplace=True)
        self.mha = nn.MultiheadAttention(6, 2, dropout=0.3, batch_first=True)

    def forward(self, x):  # x: [B, 4, 6]
        h = self.lin(x)  # [B, 4, 24]
        out = self.alpha(h).sum() + self.falpha(h.view(-1, 4, 2, 12)).sum()
        out = out + self.d1(h).sum() + self.d1(h[0]).sum()  # batched and unbatched
        out = out + self.d3(h.view(-1, 4, 2, 3, 4)).sum() + self.d3(h[0].view(4, 2, 3, 4)).sum()
        out = out + F.dropout2d(h.view(-1, 4, 4, 6), 0.3).sum()
        out = out + torch.dropout(h, 0.6, True).sum() + torch.feature_dropout(h, 0.3, True).sum()
        out = out + F.dropout(x, 0.5, True).sum()  # the shared input itself
        out = out + self.inplace(h * 2).sum()  # (relu's backward would need its output)
        att, w = self.mha(x, x, x, need_weights=True)  # F.dropout of the weights
        att2, _ = self.mha(x, x, x, need_weights=False)  # SDPA's dropout_p
        sdpa = F.scaled_dot_product_attention(
            h.view(-1, 4, 4, 6), h.view(-1, 4, 4, 6), h.view(-1, 4, 4, 6), dropout_p=0.4
        )
        causal = F.scaled_dot_product_attention(
            x.unsqueeze(1), x.unsqueeze(1), x.unsqueeze(1), dropout_p=0.2, is_causal=True
        )
        return out + att.sum() + att2.sum() + w.sum() + sdpa.sum() + causal.sum()


def _variant_grads(batch, x):
    batch.zero_grad()
    out = batch(x)
    out.sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in batch.stacked_params().items()}


def test_every_variant_philox_batch_of_n_equals_batches_of_one():
    torch.manual_seed(0)
    models = [Variants() for _ in range(3)]
    x = torch.randn(5, 4, 6)
    out, grads = _variant_grads(mb.ModelBatch(models, seeds=[4, 5, 6]), x)
    for i in range(3):
        o1, g1 = _variant_grads(mb.ModelBatch(models[i : i + 1], seeds=[4 + i]), x)
        torch.testing.assert_close(out[i], o1[0], rtol=1e-5, atol=1e-4)
        for n, g in g1.items():
            torch.testing.assert_close(grads[n][i], g[0], rtol=1e-4, atol=1e-5)


def test_every_variant_torch_mode_equals_plain_pytorch():
    torch.manual_seed(0)
    models = [Variants() for _ in range(3)]
    x = torch.randn(5, 4, 6)
    seeds = [7, 8, 9]
    out, grads = _variant_grads(mb.ModelBatch(models, seeds=seeds, rng="torch"), x)
    for i, m in enumerate(models):
        m = copy.deepcopy(m)
        torch.manual_seed(seeds[i])
        ref = m(x)
        ref.backward()
        torch.testing.assert_close(out[i], ref.detach(), rtol=1e-5, atol=1e-4)
        for n, p in m.named_parameters():
            torch.testing.assert_close(grads[n][i], p.grad, rtol=1e-4, atol=1e-5)


def test_dropout_variants_keep_their_argument_checks():
    def with_(drop):
        return mb.ModelBatch([nn.Sequential(nn.Linear(5, 5), drop) for _ in range(2)])

    with pytest.raises(ValueError, match="dropout1d: Expected 2D or 3D input"):
        with_(nn.Dropout1d(0.5))(torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError, match="Feature dropout requires at least 2 dimensions"):
        with_(nn.FeatureAlphaDropout(0.5))(torch.randn(5))
    with pytest.warns(UserWarning, match="dropout2d: Received a 3D input"):
        with_(nn.Dropout2d(0.5))(torch.randn(2, 3, 5))
    batch = with_(nn.Dropout(0.5))
    batch.template[1].p = 1.5
    with pytest.raises(ValueError, match="between 0 and 1"):
        batch(torch.randn(2, 5))


# --------------------------------------------------------------- state / seeds
@pytest.mark.parametrize("rng", ["philox", "torch"])
def test_resume_from_state_dict_draws_the_same_masks(rng):
    models = _models("mlp", 3)
    data = _data("mlp", steps=10)
    straight = mb.ModelBatch([copy.deepcopy(m) for m in models], seeds=3, rng=rng)
    _train(straight, data[:5])
    saved = copy.deepcopy(straight.state_dict())
    _train(straight, data[5:])

    resumed = mb.ModelBatch([copy.deepcopy(m) for m in models], seeds=100, rng=rng)
    resumed.load_state_dict(saved)
    assert torch.equal(resumed.seeds, straight.seeds)
    # momentum restarts in both runs below, so compare one more step of each
    straight.load_state_dict(saved)
    _train(straight, data[5:])
    _train(resumed, data[5:])
    for a, b in zip(straight.get_model_states(), resumed.get_model_states()):
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_rng_state_round_trip_and_bad_states():
    batch = mb.ModelBatch(_models("mlp", 2), seeds=1)
    batch(torch.randn(3, 8))
    state = batch.rng_state()
    assert state["kind"] == "philox" and state["offsets"].tolist() == [48, 48]
    other = mb.ModelBatch(_models("mlp", 2), seeds=9)
    other.set_rng_state(state)
    assert torch.equal(other.rng_offsets, batch.rng_offsets)
    assert torch.equal(other.seeds, batch.seeds)
    before = other.rng_state()
    with pytest.raises(ValueError, match="offsets int64 \\[2\\]"):
        other.set_rng_state({**state, "offsets": torch.zeros(3, dtype=torch.int64)})
    with pytest.raises(ValueError, match="rng='torch'"):
        other.set_rng_state({**state, "kind": "torch"})
    with pytest.raises(ValueError, match="rng=None"):
        other.load_state_dict(mb.ModelBatch(_models("mlp", 2), rng=None).state_dict())
    for k in ("seeds", "offsets"):
        assert torch.equal(other.rng_state()[k], before[k])


def test_torch_mode_save_all_load_all(tmp_path):
    batch = mb.ModelBatch(_models("mlp", 2), seeds=[3, 4], rng="torch")
    batch(torch.randn(3, 8))
    batch.save_all(tmp_path)
    other = mb.ModelBatch(_models("mlp", 2), seeds=[0, 0], rng="torch")
    other.load_all(tmp_path)
    x = torch.randn(3, 8)
    torch.testing.assert_close(other(x), batch(x))


def test_seeds_argument():
    models = _models("mlp", 3)
    assert mb.ModelBatch(models, seeds=10).seeds.tolist() == [10, 11, 12]
    assert mb.ModelBatch(models, seeds=[5, -1, 2**62]).seeds.tolist() == [5, -1, 2**62]
    assert mb.ModelBatch(models, seeds=torch.tensor([1, 2, 3])).seeds.tolist() == [1, 2, 3]
    torch.manual_seed(0)
    drawn = mb.ModelBatch(models).seeds
    torch.manual_seed(0)
    assert torch.equal(mb.ModelBatch(models).seeds, drawn)
    assert len(set(drawn.tolist())) == 3
    with pytest.raises(ValueError, match="expected an int or 3 values"):
        mb.ModelBatch(models, seeds=[1, 2])
    with pytest.raises(ValueError, match="integers"):
        mb.ModelBatch(models, seeds=[1.5, 2.0, 3.0])
    with pytest.raises(ValueError, match="rng must be one of"):
        mb.ModelBatch(models, rng="cuda")


def test_unrouted_random_op_raises_a_clear_error():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x) + torch.rand_like(x)

    with pytest.raises(RuntimeError, match="no per-model stream"):
        mb.ModelBatch([Noisy(), Noisy()])(torch.randn(2, 4))
    # vmap's shared generator, when asked for
    out = mb.ModelBatch([Noisy(), Noisy()], rng=None)(torch.randn(2, 4))
    assert out.shape == (2, 2, 4)


def test_rng_none_keeps_vmap_randomness():
    batch = mb.ModelBatch(_models("mlp", 2), rng=None)
    out = batch(torch.randn(64, 8))
    assert out.shape == (2, 64, 3)
    assert "rng_offsets" not in batch.state_dict()


def test_philox_under_torch_compile_matches_eager():
    models = _models("mlp", 3)
    x = torch.randn(6, 8)
    eager = mb.ModelBatch([copy.deepcopy(m) for m in models], seeds=1)
    compiled = mb.ModelBatch([copy.deepcopy(m) for m in models], seeds=1)
    compiled.enable_compile(backend="eager")
    for _ in range(2):
        torch.testing.assert_close(compiled(x), eager(x))
    assert torch.equal(compiled.rng_offsets, eager.rng_offsets)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_philox_masks_do_not_depend_on_the_device():
    models = _models("mlp", 3)
    x = torch.randn(6, 8)
    cpu = mb.ModelBatch([copy.deepcopy(m) for m in models], seeds=SEEDS[:3])
    gpu = mb.ModelBatch([copy.deepcopy(m) for m in models], seeds=SEEDS[:3]).cuda()
    a, b = cpu(x), gpu(x.cuda()).cpu()
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert torch.equal(cpu.rng_offsets, gpu.rng_offsets.cpu())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torch_mode_replays_the_cuda_generator():
    models = _models("mlp", 2)
    data = [(x.cuda(), y.cuda()) for x, y in _data("mlp", steps=5)]
    batch = mb.ModelBatch([copy.deepcopy(m) for m in models], seeds=[1, 2], rng="torch").cuda()
    _train(batch, data)
    ref = _plain_runs([copy.deepcopy(m).cuda() for m in models], data, [1, 2])
    for i, state in enumerate(batch.get_model_states()):
        for k, v in state.items():
            assert max_rel_err(v, ref[i][k]) < 1e-5, (i, k)


def test_attention_routing_leaves_torch_functional_as_it_was():
    dropout, sdpa = F.dropout, F.scaled_dot_product_attention
    layer = [nn.TransformerEncoderLayer(8, 2, 16, 0.1, batch_first=True) for _ in range(2)]
    batch = mb.ModelBatch(layer, seeds=[1, 2])
    batch(torch.randn(3, 4, 8))
    with pytest.raises(AssertionError, match="embedding dimension of 8, but got 5"):
        batch(torch.randn(3, 4, 5))  # fails inside the routed attention
    assert F.dropout is dropout and F.scaled_dot_product_attention is sdpa
    # outside ModelBatch, MultiheadAttention draws from the global generator again
    mha = nn.MultiheadAttention(8, 2, dropout=0.5, batch_first=True)
    x = torch.randn(3, 4, 8)
    torch.manual_seed(0)
    a = mha(x, x, x, need_weights=False)[0]
    torch.manual_seed(0)
    assert torch.equal(a, mha(x, x, x, need_weights=False)[0])
