"""copy_model_: slot dst continues exactly as model src (weights, buffers, optimizer
state with its step counter, hyper-parameters), and the other models are untouched:
bit-identical to a run where no copy happened.

select: the survivors of a smaller ModelBatch continue bit for bit as a batch of
only them would have (weights, random streams, optimizer state, hyper-parameters,
loss scales)."""

from __future__ import annotations

import copy

import modelbatch as mb
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from modelbatch.population import copy_model_, select
from torch import nn

N = 4
LRS = [1e-3, 3e-3, 1e-2, 3e-2]


def make(optimizer: str, norm: bool = False):
    torch.manual_seed(0)
    models = [
        nn.Sequential(
            nn.Linear(6, 12),
            nn.BatchNorm1d(12) if norm else nn.Identity(),
            nn.ReLU(),
            nn.Linear(12, 3),
        )
        for _ in range(N)
    ]
    batch = mb.ModelBatch(models)
    if optimizer == "adam":
        opt = mb.optim.Adam(batch, lr=LRS, betas=(0.9, [0.999, 0.99, 0.9, 0.95]))
    else:
        opt = mb.PerModelOptimizer(
            batch, torch.optim.RMSprop, [{"lr": lr, "momentum": 0.5} for lr in LRS]
        )
    return batch, opt


def train(batch, opt, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        opt.zero_grad()
        batch.compute_loss(batch(x), y, F.cross_entropy).backward()
        opt.step()


def model_state(batch, i):
    return {
        k: v[i].clone() for k, v in {**batch.stacked_params(), **batch.stacked_buffers()}.items()
    }


@pytest.mark.parametrize("optimizer", ["adam", "rmsprop"])
def test_copy_continues_as_source_and_leaves_others_alone(optimizer):
    batch, opt = make(optimizer)
    train(batch, opt, 6, seed=1)
    copy_model_(batch, opt, 1, 3)
    if optimizer == "adam":
        assert opt.steps[3] == opt.steps[1] == 6
        assert opt.param_groups[3]["lr"] == LRS[1] and opt.param_groups[3]["betas"] == (0.9, 0.99)
    train(batch, opt, 6, seed=2)

    ref, ropt = make(optimizer)  # the same run without the copy
    train(ref, ropt, 6, seed=1)
    train(ref, ropt, 6, seed=2)
    for k, v in model_state(batch, 3).items():
        assert torch.equal(v, model_state(ref, 1)[k]), k  # slot 3 followed model 1
    for i in (0, 1, 2):  # the others as if nothing happened
        for k, v in model_state(batch, i).items():
            assert torch.equal(v, model_state(ref, i)[k]), (i, k)
    assert not torch.equal(model_state(ref, 3)["0.weight"], model_state(batch, 3)["0.weight"])


def test_buffers_are_copied():
    """BatchNorm statistics travel with the weights. (Past the copy, the two slots
    agree to rounding only: torch's batch-norm reductions round differently at
    different offsets of the stacked tensors.)"""
    batch, opt = make("adam", norm=True)
    train(batch, opt, 3, seed=1)
    before = model_state(batch, 0)
    copy_model_(batch, opt, 2, 0)
    for k, v in model_state(batch, 0).items():
        assert torch.equal(v, model_state(batch, 2)[k]), k
    assert not torch.equal(before["1.running_mean"], model_state(batch, 0)["1.running_mean"])
    assert model_state(batch, 0)["1.num_batches_tracked"] == 3


def test_keep_hparams_and_bad_input():
    batch, opt = make("adam")
    train(batch, opt, 2, seed=1)
    copy_model_(batch, opt, 0, 2, hparams=False)
    assert opt.param_groups[2]["lr"] == LRS[2]
    assert torch.equal(batch.stacked_params()["0.weight"][2], batch.stacked_params()["0.weight"][0])
    with pytest.raises(ValueError, match=r"dst must be a model index in \[0, 4\)"):
        copy_model_(batch, opt, 0, 4)
    with pytest.raises(ValueError, match="src must be a model index"):
        copy_model_(batch, opt, -1, 1)
    with pytest.raises(ValueError, match="does not belong to this ModelBatch"):
        copy_model_(make("adam")[0], opt, 0, 1)
    with pytest.raises(ValueError, match="copies the state of"):
        copy_model_(batch, torch.optim.SGD(batch.parameters(), lr=0.1), 0, 1)


# --------------------------------------------------------------------- select
# A population of 6 MLPs with dropout on, every hyper-parameter per model.
SEEDS = [101, 7, 55, 12, 90, 3]
LRS6 = [1e-3, 3e-3, 1e-2, 2e-3, 5e-3, 2e-2]
KEEP = [4, 1, 2]


def mlp(norm: bool = False) -> nn.Module:
    return nn.Sequential(
        nn.Linear(8, 32),
        nn.BatchNorm1d(32) if norm else nn.Identity(),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(32, 4),
    )


def initial_states(norm: bool = False) -> list[dict]:
    torch.manual_seed(0)
    return [mlp(norm).state_dict() for _ in range(6)]


def population(states, rows, optimizer: str, rng: str = "philox", norm: bool = False):
    """A ModelBatch of the models ``rows`` of the population (their initial weights,
    seeds and hyper-parameters) and its optimizer."""
    models = []
    for i in rows:
        m = mlp(norm)
        m.load_state_dict(states[i])
        models.append(m)
    batch = mb.ModelBatch(models, seeds=[SEEDS[i] for i in rows], rng=rng)

    def pick(values):
        return [values[i] for i in rows]

    if optimizer == "adam":
        opt = mb.optim.Adam(
            batch,
            lr=pick(LRS6),
            betas=(0.9, pick([0.999, 0.99, 0.95, 0.999, 0.98, 0.9])),
            weight_decay=pick([0.0, 1e-2, 0.0, 0.0, 1e-3, 0.0]),
            amsgrad=pick([False, True, False, False, True, False]),
        )
    elif optimizer == "adamw":
        opt = mb.optim.AdamW(batch, lr=pick(LRS6), weight_decay=pick([0.1, 0.0, 0.01] * 2))
    elif optimizer == "sgd":
        opt = mb.optim.SGD(
            batch,
            lr=pick(LRS6),
            momentum=pick([0.9, 0.5, 0.8, 0.0, 0.95, 0.7]),
            nesterov=pick([True, False, True, False, False, True]),
            weight_decay=pick([0.0, 1e-3, 0.0, 1e-2, 0.0, 0.0]),
        )
    else:
        opt = mb.PerModelOptimizer(
            batch,
            torch.optim.RMSprop,
            [{"lr": LRS6[i], "momentum": 0.5, "centered": i % 2 == 0} for i in rows],
        )
    return batch, opt


def run(batch, opt, steps) -> None:
    """Train on step t's data for every t in ``steps`` (the data depend on t only)."""
    for t in steps:
        gen = torch.Generator().manual_seed(1000 + t)
        x, y = torch.randn(16, 8, generator=gen), torch.randint(0, 4, (16,), generator=gen)
        opt.zero_grad()
        batch.compute_loss(batch(x), y, F.cross_entropy).backward()
        opt.step()


def assert_equal(a, b, where="") -> None:
    """Nested dicts/lists of tensors and plain values, tensors bit for bit."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, a.keys(), b.keys())
        for k in a:
            assert_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for k, (x, y) in enumerate(zip(a, b)):
            assert_equal(x, y, f"{where}[{k}]")
    else:
        assert a == b, (where, a, b)


def snapshot(batch, opt):
    return copy.deepcopy((batch.state_dict(), opt.state_dict()))


@pytest.mark.parametrize(
    ("optimizer", "rng"),
    [("adam", "philox"), ("adamw", "philox"), ("sgd", "philox"), ("adam", "torch"),
     ("rmsprop", "philox"), ("sgd", "torch")],
)  # fmt: skip
def test_select_continues_as_if_the_others_were_never_there(optimizer, rng):
    """5 steps with 6 models, keep [4, 1, 2], 5 more steps == 10 steps of a batch of
    only those 3: weights, random streams and optimizer state bit for bit."""
    states = initial_states()
    batch, opt = population(states, range(6), optimizer, rng)
    run(batch, opt, range(5))
    before = snapshot(batch, opt)
    new_batch, new_opt = select(batch, opt, KEEP)
    assert type(new_opt) is type(opt) and new_opt.batch is new_batch
    run(new_batch, new_opt, range(5, 10))

    ref, ref_opt = population(states, KEEP, optimizer, rng)
    run(ref, ref_opt, range(10))
    assert_equal(new_batch.state_dict(), ref.state_dict(), "batch")
    assert_equal(new_opt.state_dict(), ref_opt.state_dict(), "optimizer")
    assert new_batch.seeds.tolist() == [SEEDS[i] for i in KEEP]
    if rng == "philox":
        assert bool((new_batch.rng_offsets > 0).all())  # dropout drew masks
    if optimizer == "rmsprop":  # schedulers must see the groups the inner optimizer uses
        assert new_opt.param_groups is new_opt.inner.param_groups
        assert [g["lr"] for g in new_opt.param_groups] == [LRS6[i] for i in KEEP]
    else:
        assert new_opt.steps.tolist() == [10.0] * 3
    # The originals were left alone, and share no storage with the new ones.
    assert_equal(snapshot(batch, opt), before, "original")


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_select_leaves_out_state_no_survivor_uses(optimizer):
    """Models 0 and 3 do not use amsgrad, model 3 no momentum: their optimizer
    holds no max_exp_avg_sq / momentum_buffer, as one of only them would not."""
    states = initial_states()
    batch, opt = population(states, range(6), optimizer)
    run(batch, opt, range(3))
    keep, key = ([3], "momentum_buffer") if optimizer == "sgd" else ([0, 3], "max_exp_avg_sq")
    new_batch, new_opt = select(batch, opt, keep)
    assert all(key in st for st in opt.state.values())
    assert not any(key in st for st in new_opt.state.values())
    run(new_batch, new_opt, range(3, 6))
    ref, ref_opt = population(states, keep, optimizer)
    run(ref, ref_opt, range(6))
    assert_equal(new_opt.state_dict(), ref_opt.state_dict(), "optimizer")
    assert_equal(new_batch.state_dict(), ref.state_dict(), "batch")


def test_select_with_batchnorm():
    """BatchNorm statistics travel with the rows (bit for bit). The trajectory is
    compared to rounding: torch's batch-norm reductions under vmap round
    differently with the number of models and their positions (the reference ran
    its first 5 steps as a batch of 3, the selection as one of 6; hidden widths 12,
    16, 20 and 48 differ in the last bits, 32 happens to agree exactly). SGD, not
    Adam: the Linear bias before a BatchNorm has a zero gradient up to rounding
    noise, which Adam normalises into steps of size lr."""
    states = initial_states(norm=True)
    batch, opt = population(states, range(6), "sgd", norm=True)
    run(batch, opt, range(5))
    new_batch, new_opt = select(batch, opt, KEEP)
    for name, b in new_batch.stacked_buffers().items():
        assert torch.equal(b, batch.stacked_buffers()[name][KEEP]), name
    run(new_batch, new_opt, range(5, 10))
    ref, ref_opt = population(states, KEEP, "sgd", norm=True)
    run(ref, ref_opt, range(10))
    got, want = new_batch.state_dict(), ref.state_dict()
    assert got.keys() == want.keys()
    for k in got:
        if torch.is_tensor(got[k]):
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    assert int(new_batch.stacked_buffers()["1.num_batches_tracked"][0]) == 10


def test_select_keeps_the_batch_settings():
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(3, 5), nn.Dropout(0.2), nn.Linear(5, 2)) for _ in range(5)]
    for m in models:
        m[0].weight.requires_grad_(False)
        m.double()
    batch = mb.ModelBatch(
        models, shared_input=False, seeds=[9, 8, 7, 6, 5], rng=None, intercept=False,
        fallback=False,
    )  # fmt: skip
    batch.eval()
    batch.enable_compile(backend="eager", dynamic=False)
    batch.latest_losses = torch.arange(5.0)
    new = batch.select(torch.tensor([3, 0]))
    assert new.num_models == 2 and not new.shared_input and not new.intercept
    assert not new.fallback and new.rng is None and new.seeds.tolist() == [6, 9]
    assert not new.training and not new.template.training
    assert new._compile_kwargs == {"backend": "eager", "dynamic": False}
    assert new.latest_losses.tolist() == [3.0, 0.0]
    for name, p in new.stacked_params().items():
        src = batch.stacked_params()[name]
        assert p.dtype == torch.float64 and p.requires_grad == src.requires_grad, name
        assert torch.equal(p, src[[3, 0]]) and p.data_ptr() != src.data_ptr(), name
    assert not new.stacked_params()["0.weight"].requires_grad
    for i, j in enumerate([3, 0]):
        for k, v in new.model(i).state_dict().items():
            assert torch.equal(v, batch.model(j).state_dict()[k]), (i, k)
    x = torch.randn(2, 4, 3, dtype=torch.float64)  # per-model inputs [k, B, 3]
    new.disable_compile()
    assert new(x).shape == (2, 4, 2)
    assert batch.num_models == 5 and batch.stacked_params()["2.bias"].shape[0] == 5


def test_select_torch_streams_continue():
    """rng="torch": each model keeps its own generator state (not a fresh seed)."""
    states = initial_states()
    batch, _ = population(states, range(6), "adam", rng="torch")
    batch(torch.randn(4, 8))  # draws one mask per model
    new = batch.select([5, 0])
    for gens_new, gens_old in zip(
        new.rng_state()["generator_states"].values(), batch.rng_state()["generator_states"].values()
    ):
        assert torch.equal(gens_new, gens_old[[5, 0]])
    x = torch.randn(4, 8)
    assert torch.equal(new(x), batch(x)[[5, 0]])


def test_select_then_copy_model_compose():
    """copy_model_ before select (a clone survives) and after (in the new batch)."""
    states = initial_states()
    batch, opt = population(states, range(6), "adam")
    run(batch, opt, range(3))
    copy_model_(batch, opt, 1, 4)  # slot 4 continues as model 1, with its own stream
    new_batch, new_opt = select(batch, opt, KEEP)
    for name, p in new_batch.stacked_params().items():
        assert torch.equal(p[0], p[1]), name
    for st in new_opt.state.values():
        for key, t in st.items():
            assert torch.equal(t[0], t[1]), key
    assert new_opt.param_groups[0]["lr"] == LRS6[1] and new_opt.steps.tolist() == [3.0] * 3
    assert new_batch.seeds.tolist() == [SEEDS[4], SEEDS[1], SEEDS[2]]
    run(new_batch, new_opt, range(3, 6))
    copy_model_(new_batch, new_opt, 2, 0)
    run(new_batch, new_opt, range(6, 8))

    ref, ref_opt = population(states, range(6), "adam")  # models 1 and 2, untouched
    run(ref, ref_opt, range(8))
    for j, i in ((1, 1), (2, 2)):
        for name, p in new_batch.stacked_params().items():
            assert torch.equal(p[j], ref.stacked_params()[name][i]), (j, name)
    assert new_opt.param_groups[0]["lr"] == LRS6[2]


def test_select_scaler():
    states = initial_states()
    batch, opt = population(states, range(6), "adam")
    scaler = mb.amp.GradScaler(
        batch, init_scale=[2.0**k for k in range(6)], growth_interval=[1, 2, 3, 1, 2, 3],
        backoff_factor=[0.5, 0.25, 0.5, 0.125, 0.5, 0.5],
    )  # fmt: skip
    for t in range(3):
        gen = torch.Generator().manual_seed(t)
        x, y = torch.randn(16, 8, generator=gen), torch.randint(0, 4, (16,), generator=gen)
        opt.zero_grad()
        losses = batch.compute_loss(batch(x), y, F.cross_entropy, reduction="none")
        scaler.scale(losses).backward()
        scaler.step(opt)
        scaler.update()
    before = scaler.state_dict()
    new_batch, new_opt, new_scaler = select(batch, opt, KEEP, scaler=scaler)
    assert new_scaler.batch is new_batch is new_opt.batch and new_scaler.num_models == 3
    want = scaler.state_dict()
    for key, value in new_scaler.state_dict().items():
        expected = 3 if key == "num_models" else want[key][KEEP]
        assert_equal(value, expected, key)
    assert_equal(scaler.state_dict(), before, "original scaler")
    # Intervals 2, 2, 3: grown once each after 3 finite steps, trackers 1, 1, 0.
    assert new_scaler.get_growth_tracker().tolist() == [1, 1, 0]
    assert new_scaler.get_scale().tolist() == [2.0**4 * 2, 2.0**1 * 2, 2.0**2 * 2]


def test_select_carries_scheduler_keys():
    states = initial_states()
    batch, opt = population(states, range(6), "sgd")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    run(batch, opt, range(2))
    sched.step()
    _, new_opt = select(batch, opt, KEEP)
    assert [g["initial_lr"] for g in new_opt.param_groups] == [LRS6[i] for i in KEEP]
    assert [g["lr"] for g in new_opt.param_groups] == [LRS6[i] / 2 for i in KEEP]
    assert new_opt.hparam("lr").tolist() == [LRS6[i] / 2 for i in KEEP]
    torch.optim.lr_scheduler.StepLR(new_opt, step_size=1, gamma=0.5, last_epoch=1)


@pytest.mark.parametrize(
    ("indices", "match"),
    [
        ([], r"ModelBatch.select: no models selected \(indices is empty\)"),
        ([1, 3, 1], "model 1 is selected more than once; indices must be distinct"),
        ([0, 6], r"index 6 is out of range for 6 models \(valid: 0..5\)"),
        ([-1], "index -1 is out of range"),
        ([0.0, 1.0], "indices must be integers, got 0.0"),
        ([True, False], "indices must be integers, got True"),
        (torch.tensor([0.0, 1.0]), "indices must be integers, got dtype torch.float32"),
        (torch.tensor([True]), "indices must be integers, got dtype torch.bool"),
        (torch.tensor([[0, 1]]), r"indices must be 1-D, got shape \(1, 2\)"),
        (2, r"got the single index 2 \(for one model pass \[2\]\)"),
        ("01", "indices must be integers, got '0'"),
        ({0, 1}, "indices must be a list, tuple or 1-D tensor of ints, got set"),
    ],
)
def test_select_rejects_bad_indices(indices, match):
    batch, _ = population(initial_states(), range(6), "adam")
    with pytest.raises(ValueError, match=match):
        batch.select(indices)


def test_select_accepts_index_types():
    batch, _ = population(initial_states(), range(6), "adam")
    for indices in ([5, 0], (5, 0), torch.tensor([5, 0]), torch.tensor([5, 0], dtype=torch.int32),
                    range(5, -1, -5), np.array([5, 0])):  # fmt: skip
        assert batch.select(indices).seeds.tolist() == [SEEDS[5], SEEDS[0]]


@pytest.mark.parametrize("optimizer", ["adam", "rmsprop"])
def test_optimizer_select_checks_the_batch(optimizer):
    states = initial_states()
    batch, opt = population(states, range(6), optimizer)
    name = "Adam" if optimizer == "adam" else "PerModelOptimizer"
    with pytest.raises(ValueError, match=rf"{name}.select: batch has 2 models, expected 3"):
        opt.select(KEEP, batch=batch.select([0, 1]))
    other = mb.ModelBatch([nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))] * 3)
    with pytest.raises(ValueError, match=r"batch's models have other parameters: .*expected"):
        opt.select(KEEP, batch=other)
    with pytest.raises(ValueError, match="batch must be the ModelBatch of the selected models"):
        opt.select(KEEP, batch=None)
    with pytest.raises(ValueError, match=rf"{name}.select: index 9 is out of range"):
        opt.select([9], batch=batch.select([0]))
    # Any ModelBatch of the right shapes will do (here: a fresh one).
    assert opt.select(KEEP, batch=population(states, KEEP, optimizer)[0]).batch is not batch


def test_population_select_checks_its_arguments():
    batch, opt = population(initial_states(), range(6), "adam")
    other, other_opt = population(initial_states(), range(6), "adam")
    with pytest.raises(ValueError, match="the optimizer does not belong to this ModelBatch"):
        select(batch, other_opt, KEEP)
    with pytest.raises(ValueError, match="select copies the state of"):
        select(batch, torch.optim.SGD(batch.parameters(), lr=0.1), KEEP)
    with pytest.raises(ValueError, match="the scaler does not belong to this ModelBatch"):
        select(batch, opt, KEEP, scaler=mb.amp.GradScaler(other))
    with pytest.raises(ValueError, match="select takes a ModelBatch"):
        select(opt, opt, KEEP)
    with pytest.raises(ValueError, match="select: model 4 is selected more than once"):
        select(batch, opt, [4, 4])
    with pytest.raises(ValueError, match=r"GradScaler.select: batch must be the ModelBatch of"):
        mb.amp.GradScaler(batch).select(KEEP, batch=batch)
    new_batch, new_opt = select(batch, None, KEEP)
    assert new_opt is None and new_batch.num_models == 3
