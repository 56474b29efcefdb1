"""The fused optimizers' API: per-model groups, schedulers, state, factory."""

from __future__ import annotations

import copy

import modelbatch as mb
import pytest
import torch
import torch.nn.functional as F
from _models import MLP, EmbedLN, make_data, max_rel_err


def batch_of(n=3, seed=0):
    torch.manual_seed(seed)
    return mb.ModelBatch([MLP() for _ in range(n)])


def run(batch, opt, steps, sched=None, seed=0):
    for x, y in make_data("mlp", steps, seed=seed):
        opt.zero_grad()
        batch.compute_loss(batch(x), y, F.cross_entropy).backward()
        opt.step()
        if sched is not None:
            sched.step()


def test_param_groups_one_per_model_read_write():
    batch = batch_of(3)
    opt = mb.optim.Adam(batch, lr=[1e-3, 2e-3, 3e-3], betas=(0.9, [0.99, 0.98, 0.97]))
    assert len(opt.param_groups) == 3
    assert opt.param_groups[1]["lr"] == 2e-3 and opt.param_groups[2]["betas"] == (0.9, 0.97)
    opt.param_groups[0]["lr"] = 0.5
    opt.param_groups[2]["betas"] = (0.5, 0.6)
    assert opt.hparam("lr").tolist() == [0.5, 2e-3, 3e-3]
    assert opt.hparam("beta1").tolist()[2] == 0.5 and opt.hparam("beta2").tolist()[2] == 0.6
    with pytest.raises(ValueError, match="Invalid learning rate for model 1"):
        opt.param_groups[1]["lr"] = -1.0
    assert opt.param_groups[1]["lr"] == 2e-3 and opt.hparam("lr")[1].item() == 2e-3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lr": [1e-3, 1e-3]}, "lr: expected a scalar or 3 values"),
        ({"lr": torch.ones(2, 2)}, "1-D tensor"),
        ({"betas": (0.9,)}, "betas: expected a pair"),
        ({"betas": (0.9, [0.9, 0.9, 1.5])}, "Invalid beta2 for model 2"),
        ({"eps": -1.0}, "Invalid epsilon value for model 0"),
    ],
)
def test_bad_hyperparameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mb.optim.Adam(batch_of(3), **kwargs)


def test_sgd_validation_and_non_modelbatch():
    with pytest.raises(ValueError, match="Nesterov"):
        mb.optim.SGD(batch_of(2), lr=0.1, momentum=[0.9, 0.0], nesterov=True)
    with pytest.raises(ValueError, match="takes a ModelBatch"):
        mb.optim.SGD(MLP(), lr=0.1)


def test_state_dict_roundtrip_resumes_exactly():
    a, b = batch_of(3), batch_of(3)
    opt_a = mb.optim.AdamW(a, lr=[1e-3, 5e-3, 1e-2], amsgrad=[True, False, True])
    run(a, opt_a, 20)
    # b: 10 steps, checkpoint, fresh optimizer restored, 10 more steps
    opt_b = mb.optim.AdamW(b, lr=[1e-3, 5e-3, 1e-2], amsgrad=[True, False, True])
    data = make_data("mlp", 20)
    for k, (x, y) in enumerate(data):
        if k == 10:
            sd = copy.deepcopy(opt_b.state_dict())
            opt_b = mb.optim.AdamW(b, lr=0.123)
            opt_b.load_state_dict(sd)
            assert opt_b.param_groups[2]["lr"] == 1e-2
        opt_b.zero_grad()
        b.compute_loss(b(x), y, F.cross_entropy).backward()
        opt_b.step()
    assert opt_b.steps.tolist() == [20.0] * 3
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_load_state_dict_rejects_other_architecture_and_kind():
    opt = mb.optim.Adam(batch_of(3))
    run(opt.batch, opt, 1)
    sd = opt.state_dict()
    other = mb.optim.Adam(mb.ModelBatch([EmbedLN() for _ in range(3)]))
    with pytest.raises(ValueError, match="another architecture"):
        other.load_state_dict(sd)
    with pytest.raises(ValueError, match="3 models, this optimizer 2"):
        mb.optim.Adam(batch_of(2)).load_state_dict(sd)
    with pytest.raises(ValueError, match="Adam optimizer"):
        mb.optim.SGD(batch_of(3), lr=0.1).load_state_dict(sd)


def test_factory_builds_fused_optimizers_from_configs():
    batch = batch_of(4)
    fac = mb.OptimizerFactory(torch.optim.Adam, {"weight_decay": 1e-4})
    cfgs = mb.create_adam_configs([1e-3, 2e-3, 3e-3, 4e-3], betas=(0.9, 0.99))
    opt = fac.create_optimizer(batch, cfgs)
    assert isinstance(opt, mb.optim.Adam)
    assert opt.hparam("lr").tolist() == [1e-3, 2e-3, 3e-3, 4e-3]
    assert opt.hparam("weight_decay").tolist() == [1e-4] * 4
    assert opt.param_groups[3]["betas"] == (0.9, 0.99)
    sgd = mb.OptimizerFactory(torch.optim.SGD).create_optimizer(
        batch, mb.create_sgd_configs([0.1, 0.2, 0.3, 0.4], momentum=[0.0, 0.5, 0.9, 0.9])
    )
    assert isinstance(sgd, mb.optim.SGD) and sgd.hparam("momentum").tolist() == [0.0, 0.5, 0.9, 0.9]
    adamw = mb.OptimizerFactory(mb.optim.AdamW).create_optimizer(batch, [{"lr": 0.1}] * 4)
    assert isinstance(adamw, mb.optim.AdamW)
    with pytest.raises(ValueError, match="expected 4 configs"):
        fac.create_optimizer(batch, cfgs[:3])
    with pytest.raises(ValueError, match="'maximize' is not supported"):
        fac.create_optimizer(batch, [{"lr": 0.1, "maximize": True}] * 4)
    with pytest.raises(ValueError, match="missing for models"):
        fac.create_optimizer(
            batch, [{"lr": 0.1}, {"lr": 0.1}, {"lr": 0.1}, {"lr": 0.1, "eps": 1e-6}]
        )


def test_sweep_configs():
    cfgs = mb.create_lr_sweep_configs(1e-4, 1e-2, 3)
    assert [round(c["lr"], 12) for c in cfgs] == [1e-4, 1e-3, 1e-2]
    lin = mb.create_lr_sweep_configs(0.1, 0.3, 3, scale="linear")
    assert [round(c["lr"], 12) for c in lin] == [0.1, 0.2, 0.3]
    with pytest.raises(ValueError):
        mb.create_lr_sweep_configs(0.0, 1.0, 3)
    with pytest.raises(ValueError, match="momentum: expected a scalar or 2 values"):
        mb.create_sgd_configs([0.1, 0.2], momentum=[0.9])


def test_generic_torch_optimizer_one_group_per_model_matches_sequential():
    batch = batch_of(3)
    ref = [batch.model(i) for i in range(3)]
    lrs = [1e-3, 1e-2, 3e-2]
    opt = mb.OptimizerFactory(torch.optim.RMSprop).create_optimizer(
        batch, [{"lr": lr} for lr in lrs]
    )
    assert isinstance(opt, mb.PerModelOptimizer) and len(opt.param_groups) == 3
    ropts = [torch.optim.RMSprop(m.parameters(), lr=lr) for m, lr in zip(ref, lrs)]
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    rs = [torch.optim.lr_scheduler.StepLR(o, step_size=5, gamma=0.5) for o in ropts]
    for x, y in make_data("mlp", 15):
        opt.zero_grad()
        batch.compute_loss(batch(x), y, F.cross_entropy).backward()
        opt.step()
        sched.step()
        for m, o, s in zip(ref, ropts, rs):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
            s.step()
    for i, m in enumerate(ref):
        for k, v in m.state_dict().items():
            assert max_rel_err(batch.get_model_states()[i][k], v) < 1e-5


def test_per_model_scheduler_configs():
    batch = batch_of(3)
    opt = mb.optim.SGD(batch, lr=[0.1, 0.2, 0.4])
    fac = mb.OptimizerFactory(torch.optim.SGD)
    sched = fac.create_lr_scheduler(
        opt, torch.optim.lr_scheduler.StepLR, [{"step_size": s, "gamma": 0.5} for s in (1, 2, 3)]
    )
    lrs = []
    for _ in range(3):
        run(batch, opt, 1)
        sched.step()
        lrs.append(opt.hparam("lr").tolist())
    assert lrs == [[0.05, 0.2, 0.4], [0.025, 0.1, 0.4], [0.0125, 0.1, 0.2]]
    same = fac.create_lr_scheduler(
        opt, torch.optim.lr_scheduler.StepLR, {"step_size": 1, "gamma": 0.1}
    )
    assert isinstance(same, torch.optim.lr_scheduler.StepLR)
    with pytest.raises(ValueError, match="3 scheduler configs"):
        fac.create_lr_scheduler(opt, torch.optim.lr_scheduler.StepLR, [{"step_size": 1}] * 2)


def test_clip_returns_per_model_norms_and_validates():
    batch = batch_of(3)
    x, y = make_data("mlp", 1)[0]
    batch.compute_loss(batch(x), y, F.cross_entropy).backward()
    norms = [
        torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p.grad[i]) for p in batch.parameters()])
        )
        for i in range(3)
    ]
    got = mb.clip_grad_norm_(batch, [1e-3, 1e9, 1e-3])
    assert torch.allclose(got, torch.stack(norms).to(got.dtype), rtol=1e-5)
    after = mb.clip_grad_norm_(batch, 1e9)
    assert after[0].item() == pytest.approx(1e-3, rel=1e-3)
    assert after[1].item() == pytest.approx(norms[1].item(), rel=1e-5)
    with pytest.raises(ValueError, match="max_norm: expected a scalar or 3 values"):
        mb.clip_grad_norm_(batch, [1.0, 2.0])
