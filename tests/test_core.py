"""ModelBatch: construction checks, forward shapes, losses, states, checkpoints."""

from __future__ import annotations

import copy
import os

import modelbatch as mb
import pytest
import torch
import torch.nn.functional as F
from _models import MLP, EmbedLN, max_rel_err
from torch import nn


def mlps(n=3, **kw):
    torch.manual_seed(0)
    return [MLP(**kw) for _ in range(n)]


# ------------------------------------------------------------------ construction
def test_empty_list_raises():
    with pytest.raises(ValueError, match="at least one model"):
        mb.ModelBatch([])


@pytest.mark.parametrize(
    "other, match",
    [
        (lambda: EmbedLN(), "share one class"),
        (lambda: MLP(h=17), r"parameter 'net.0.weight' of model 2 is \(17, 8\) float32"),
        (lambda: MLP().double(), "float64"),
    ],
)
def test_incompatible_models_name_the_difference(other, match):
    with pytest.raises(ValueError, match=match):
        mb.ModelBatch([*mlps(2), other()])


def test_buffer_and_name_mismatch_is_named():
    a, b = nn.BatchNorm1d(4), nn.BatchNorm1d(4, track_running_stats=False)
    with pytest.raises(ValueError, match="buffer names"):
        mb.ModelBatch([a, b])
    c = MLP()
    c.net[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        mb.ModelBatch([MLP(), c])


def test_stacks_parameters_and_keeps_models_untouched():
    models = mlps(3)
    before = [copy.deepcopy(m.state_dict()) for m in models]
    batch = mb.ModelBatch(models)
    assert batch.num_models == 3
    w = batch.stacked_params()["net.0.weight"]
    assert w.shape == (3, 16, 8)
    for i, m in enumerate(models):
        assert torch.equal(w[i], m.net[0].weight)
    with torch.no_grad():
        w.add_(1.0)
    for m, sd in zip(models, before):
        assert torch.equal(m.net[0].weight, sd["net.0.weight"])
    names = [n for n, _ in batch.named_parameters()]
    assert "net__0__weight" in names and len(names) == 6


def test_seeds_int_and_sequence():
    assert mb.ModelBatch(mlps(3), seeds=10).seeds.tolist() == [10, 11, 12]
    assert mb.ModelBatch(mlps(3), seeds=[5, 1, 9]).seeds.tolist() == [5, 1, 9]
    with pytest.raises(ValueError, match="3 values"):
        mb.ModelBatch(mlps(3), seeds=[1, 2])


# ----------------------------------------------------------------------- forward
@pytest.mark.parametrize("intercept", [True, False])
def test_forward_shared_and_per_model(intercept):
    models = mlps(3)
    batch = mb.ModelBatch(models, intercept=intercept)
    x = torch.randn(5, 8)
    out = batch(x)
    assert out.shape == (3, 5, 3)
    for i, m in enumerate(models):
        assert max_rel_err(out[i], m(x)) < 1e-6
    per = mb.ModelBatch(models, shared_input=False, intercept=intercept)
    xs = torch.randn(3, 5, 8)
    out = per(xs)
    for i, m in enumerate(models):
        assert max_rel_err(out[i], m(xs[i])) < 1e-6


def test_wrong_input_shapes_raise_value_error_with_expected_shape():
    per = mb.ModelBatch(mlps(3), shared_input=False)
    with pytest.raises(ValueError, match=r"\[N=3, B, \.\.\.\]; input 0 has shape \(4, 5, 8\)"):
        per(torch.randn(4, 5, 8))
    with pytest.raises(ValueError, match=r"\[N=3, B, \.\.\.\]"):
        per(torch.randn(8))
    shared = mb.ModelBatch(mlps(3))
    with pytest.raises(ValueError, match=r"expects \[B, \.\.\.\] fed to every model"):
        shared(torch.randn(5, 7))
    with pytest.raises(ValueError, match="0-d"):
        shared(torch.tensor(1.0))


class TupleDict(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 2)

    def forward(self, x, scale=1.0):
        y = self.a(x) * scale
        return y, {"sum": y.sum(-1), "relu": torch.relu(y)}


def test_tuple_and_dict_outputs_keep_structure_and_kwargs():
    models = [TupleDict() for _ in range(2)]
    batch = mb.ModelBatch(models)
    x = torch.randn(3, 4)
    y, d = batch(x, scale=2.0)
    assert y.shape == (2, 3, 2) and set(d) == {"sum", "relu"} and d["sum"].shape == (2, 3)
    for i, m in enumerate(models):
        ry, rd = m(x, scale=2.0)
        assert torch.allclose(y[i], ry, atol=1e-6) and torch.allclose(
            d["sum"][i], rd["sum"], atol=1e-6
        )


def test_train_eval_and_zero_grad():
    batch = mb.ModelBatch([nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)) for _ in range(2)])
    assert batch.training and batch.template.training
    batch.eval()
    assert not batch.training and not batch.template.training
    batch.train()
    batch(torch.randn(6, 4)).sum().backward()
    assert all(p.grad is not None for p in batch.parameters())
    batch.zero_grad()
    assert all(p.grad is None for p in batch.parameters())
    batch(torch.randn(6, 4)).sum().backward()
    batch.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in batch.parameters())


def test_enable_compile_matches_eager():
    models = mlps(2)
    batch = mb.ModelBatch(models)
    x = torch.randn(4, 8)
    eager = batch(x)
    batch.enable_compile(backend="eager", fullgraph=False)
    compiled = batch(x)
    assert torch.allclose(eager, compiled, atol=1e-6)


# -------------------------------------------------------------------------- loss
def test_compute_loss_reductions_and_metrics():
    models = mlps(3)
    batch = mb.ModelBatch(models)
    x, y = torch.randn(5, 8), torch.randint(0, 3, (5,))
    out = batch(x)
    per = batch.compute_loss(out, y, F.cross_entropy, reduction="none")
    ref = torch.stack([F.cross_entropy(m(x), y) for m in models])
    assert per.shape == (3,) and torch.allclose(per, ref, atol=1e-6)
    assert torch.allclose(batch.compute_loss(out, y, F.cross_entropy), ref.sum(), atol=1e-6)
    assert torch.allclose(
        batch.compute_loss(out, y, F.cross_entropy, "mean"), ref.mean(), atol=1e-6
    )
    met = batch.metrics()
    assert set(met) == {"loss_model_0", "loss_model_1", "loss_model_2"}
    assert abs(met["loss_model_1"] - ref[1].item()) < 1e-5
    with pytest.raises(ValueError, match="reduction"):
        batch.compute_loss(out, y, F.cross_entropy, reduction="avg")


def test_compute_loss_per_model_targets_and_bad_shapes():
    models = mlps(3)
    batch = mb.ModelBatch(models)
    x = torch.randn(5, 8)
    y = torch.randint(0, 3, (3, 5))
    out = batch(x)
    per = batch.compute_loss(out, y, F.cross_entropy, reduction="none")
    assert torch.allclose(
        per, torch.stack([F.cross_entropy(m(x), y[i]) for i, m in enumerate(models)]), atol=1e-6
    )
    with pytest.raises(ValueError, match=r"shared \[B=5, \.\.\.\] or per-model"):
        batch.compute_loss(out, torch.randint(0, 3, (4,)), F.cross_entropy)
    with pytest.raises(ValueError, match="one scalar per model"):
        batch.compute_loss(out, y, lambda o, t: F.cross_entropy(o, t, reduction="none"))


def test_compute_loss_ambiguous_n_equals_b():
    batch = mb.ModelBatch(mlps(4))
    out = batch(torch.randn(4, 8))  # N = B = 4, 3 classes
    y = torch.randint(0, 3, (4, 4))  # per-model class targets: trailing dims fit as per-model
    per = batch.compute_loss(out, y, F.cross_entropy, reduction="none")
    assert per.shape == (4,)
    soft = torch.softmax(torch.randn(4, 4), -1)  # [4, 4] could be either when C == B
    batch4 = mb.ModelBatch([MLP(o=4) for _ in range(4)])
    out4 = batch4(torch.randn(4, 8))
    with pytest.raises(ValueError, match="targets_per_model"):
        batch4.compute_loss(out4, soft, F.cross_entropy)
    shared = batch4.compute_loss(
        out4, soft, F.cross_entropy, targets_per_model=False, reduction="none"
    )
    assert shared.shape == (4,)


# ------------------------------------------------------------------------ states
def test_model_states_roundtrip_and_model_export():
    models = mlps(3)
    batch = mb.ModelBatch(models)
    states = batch.get_model_states()
    assert len(states) == 3 and states[1].keys() == models[1].state_dict().keys()
    exported = batch.model(2)
    assert type(exported) is MLP
    x = torch.randn(4, 8)
    assert torch.allclose(exported(x), models[2](x), atol=1e-6)
    assert not any(p is q for p in exported.parameters() for q in batch.parameters())
    new = [MLP() for _ in range(3)]
    batch.load_model_states([m.state_dict() for m in new])
    assert torch.allclose(batch(x)[0], new[0](x), atol=1e-6)
    assert torch.allclose(batch.model(-1)(x), new[2](x), atol=1e-6)
    with pytest.raises(IndexError):
        batch.model(3)


def test_load_model_states_rejects_bad_input_and_changes_nothing():
    batch = mb.ModelBatch(mlps(3))
    before = [t.clone() for t in batch.parameters()]
    good = [MLP().state_dict() for _ in range(3)]
    with pytest.raises(ValueError, match="expected 3 states, got 2"):
        batch.load_model_states(good[:2])
    bad = copy.deepcopy(good)
    bad[2]["net.0.weight"] = torch.zeros(16, 9)
    with pytest.raises(ValueError, match=r"state 2 entry 'net.0.weight' has shape \(16, 9\)"):
        batch.load_model_states(bad)
    other = [EmbedLN().state_dict() for _ in range(3)]
    with pytest.raises(ValueError, match="another architecture"):
        batch.load_model_states(other)
    for a, b in zip(before, batch.parameters()):
        assert torch.equal(a, b)


def test_save_all_load_all_and_corrupt_files(tmp_path):
    models = mlps(3)
    batch = mb.ModelBatch(models, seeds=7)
    batch.save_all(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [
        "model_0.pt",
        "model_1.pt",
        "model_2.pt",
        "modelbatch.json",
        "rng.pt",
    ]
    # a saved model file is a plain state_dict loadable by the original class
    plain = MLP()
    plain.load_state_dict(torch.load(tmp_path / "model_1.pt", weights_only=True))
    x = torch.randn(2, 8)
    assert torch.allclose(plain(x), models[1](x), atol=1e-6)
    other = mb.ModelBatch(mlps(3))
    with torch.no_grad():
        for p in other.parameters():
            p.zero_()
    assert not torch.equal(other.seeds, batch.seeds)
    other.load_all(tmp_path)
    assert torch.allclose(other(x), batch(x), atol=1e-6)
    assert torch.equal(other.seeds, batch.seeds)  # the random streams come back too
    before = [p.clone() for p in other.parameters()]
    (tmp_path / "model_2.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"model_2\.pt is missing or corrupt"):
        other.load_all(tmp_path)
    with pytest.raises(ValueError, match="holds 3 models, this ModelBatch has 2"):
        mb.ModelBatch(mlps(2)).load_all(tmp_path)
    for a, b in zip(before, other.parameters()):
        assert torch.equal(a, b)


def test_tied_weights_share_one_stacked_parameter():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.out = nn.Linear(4, 10, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, t):
            return self.out(self.emb(t))

    models = [Tied() for _ in range(2)]
    batch = mb.ModelBatch(models)
    assert len(list(batch.parameters())) == 1
    t = torch.randint(0, 10, (3,))
    assert torch.allclose(batch(t)[1], models[1](t), atol=1e-6)
    assert set(batch.get_model_states()[0]) == {"emb.weight", "out.weight"}
    assert torch.equal(batch.model(0).out.weight, batch.model(0).emb.weight)


def test_forward_follows_a_training_flag_set_directly():
    """Trainers that restore modes by setting ``.training`` (Lightning) skip
    ``train()``; the forward still runs the models in the batch's mode."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5)) for _ in range(2)]
    batch = mb.ModelBatch(models, seeds=0)
    batch.eval()
    batch.training = True  # as Lightning does, module by module
    x = torch.ones(3, 4)
    out = batch(x)
    assert (out == 0).any()  # dropout drew
    assert batch.template.training
    batch.training = False
    assert torch.equal(batch(x), batch(x))  # eval: deterministic
