"""copy_model_: slot dst continues exactly as model src (weights, buffers, optimizer
state with its step counter, hyper-parameters), and the other models are untouched:
bit-identical to a run where no copy happened."""

from __future__ import annotations

import modelbatch as mb
import pytest
import torch
import torch.nn.functional as F
from modelbatch.population import copy_model_
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
