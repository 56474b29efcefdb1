"""The contract: N models trained batched == the same N trained one by one with
plain torch.optim and the same per-model hyper-parameters (float32, 1e-5 rel)."""

from __future__ import annotations

import copy

import modelbatch as mb
import pytest
import torch
import torch.nn.functional as F
from _models import MODELS, make_data, max_rel_err

STEPS = 50
N = 4
LRS = [1e-3, 3e-3, 1e-2, 2e-2]
RTOL = 1e-5

OPTIMIZERS = {
    # name: (fused class, torch class, per-model kwargs for model i)
    "sgd_nesterov": (
        mb.optim.SGD,
        torch.optim.SGD,
        lambda i: {"lr": LRS[i] * 5, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3 * i},
    ),
    "sgd_dampening": (
        mb.optim.SGD,
        torch.optim.SGD,
        lambda i: {"lr": LRS[i] * 5, "momentum": [0.0, 0.5, 0.9, 0.7][i], "dampening": 0.1},
    ),
    "adam": (
        mb.optim.Adam,
        torch.optim.Adam,
        lambda i: {
            "lr": LRS[i],
            "betas": (0.9, [0.999, 0.99, 0.9, 0.95][i]),
            "weight_decay": 1e-2 * (i % 2),
        },
    ),
    "adamw_amsgrad": (
        mb.optim.AdamW,
        torch.optim.AdamW,
        lambda i: {"lr": LRS[i], "weight_decay": [0.0, 1e-2, 1e-1, 0.5][i], "amsgrad": True},
    ),
}


def _fused(cls, batch, cfgs):
    keys = cfgs[0].keys()
    kw = {}
    for k in keys:
        vals = [c[k] for c in cfgs]
        kw[k] = ([v[0] for v in vals], [v[1] for v in vals]) if k == "betas" else vals
    return cls(batch, **kw)


def train_both(kind, opt_name, *, clip=None, schedule=None, steps=STEPS, seed=0):
    torch.manual_seed(seed)
    models = [MODELS[kind]() for _ in range(N)]
    ref = [copy.deepcopy(m) for m in models]
    fused_cls, torch_cls, cfg = OPTIMIZERS[opt_name]
    cfgs = [cfg(i) for i in range(N)]
    batch = mb.ModelBatch(models)
    opt = _fused(fused_cls, batch, cfgs)
    ropts = [torch_cls(m.parameters(), **c) for m, c in zip(ref, cfgs)]
    sched = rscheds = None
    if schedule is not None:
        sched, rscheds = schedule(opt, ropts)
    data = make_data(kind, steps, seed=seed)
    for x, y in data:
        opt.zero_grad()
        batch.compute_loss(batch(x), y, F.cross_entropy).backward()
        if clip is not None:
            norms = mb.clip_grad_norm_(batch, clip)
        opt.step()
        for i, (m, o) in enumerate(zip(ref, ropts)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            if clip is not None:
                rn = torch.nn.utils.clip_grad_norm_(
                    m.parameters(), clip[i] if isinstance(clip, list) else clip
                )
                assert abs(norms[i].item() - rn.item()) <= 1e-4 * max(rn.item(), 1e-3)
            o.step()
        if sched is not None:
            sched.step()
            for s in rscheds:
                s.step()
    return batch, ref


# The key bias of attention has an exactly-zero gradient (softmax ignores a constant
# added to every score), so its "gradient" is rounding noise in ANY two runs, which
# Adam normalises up to O(lr) steps. It is compared by an absolute bound instead.
NOISE_ONLY = {"layer.self_attn.in_proj_bias": slice(8, 16)}


MAX_LR = max(LRS)


def assert_match(batch, ref, rtol=RTOL, max_lr=MAX_LR):
    states = batch.get_model_states()
    for i, m in enumerate(ref):
        for k, v in m.state_dict().items():
            got = states[i][k]
            if k in NOISE_ONLY:
                sl = NOISE_ONLY[k]
                assert (got[sl] - v[sl]).abs().max().item() <= 2 * max_lr * STEPS
                keep = torch.ones(v.shape[0], dtype=torch.bool)
                keep[sl] = False
                got, v = got[keep], v[keep]
            if v.is_floating_point():
                err = max_rel_err(got, v)
                assert err <= rtol, f"model {i} {k}: rel err {err:.2e}"
            else:
                assert torch.equal(got, v), f"model {i} {k}: {got} != {v}"


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("kind", list(MODELS))
def test_batched_matches_sequential(kind, opt_name):
    batch, ref = train_both(kind, opt_name)
    # Training must have moved the weights, or the comparison proves nothing.
    first = next(iter(ref[0].state_dict()))
    assert max_rel_err(batch.get_model_states()[0][first], MODELS[kind]().state_dict()[first]) > 0
    assert_match(batch, ref)


def test_per_model_clipping_matches():
    batch, ref = train_both("mlp", "adam", clip=[0.05, 0.1, 1.0, 100.0])
    assert_match(batch, ref)


def test_per_model_lambda_scheduler_matches():
    lambdas = [lambda e, k=k: 0.95 ** (e * (k + 1)) for k in range(N)]

    def schedule(opt, ropts):
        s = torch.optim.lr_scheduler.LambdaLR(opt, lambdas)
        return s, [torch.optim.lr_scheduler.LambdaLR(o, lambdas[i]) for i, o in enumerate(ropts)]

    batch, ref = train_both("mlp", "sgd_nesterov", schedule=schedule)
    assert_match(batch, ref)


@pytest.mark.parametrize(
    "make",
    [
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=7, gamma=0.5),
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=20),
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=STEPS),
    ],
    ids=["StepLR", "CosineAnnealingLR", "OneCycleLR"],
)
def test_torch_schedulers_drive_each_model(make):
    def schedule(opt, ropts):
        return make(opt), [make(o) for o in ropts]

    batch, ref = train_both("mlp", "adamw_amsgrad", schedule=schedule)
    assert_match(batch, ref)


def test_batchnorm_running_stats_and_eval_match():
    batch, ref = train_both("cnn", "adam", steps=10)
    x = make_data("cnn", 1, seed=5)[0][0]
    batch.eval()
    with torch.no_grad():
        out = batch(x)
    for i, m in enumerate(ref):
        m.eval()
        with torch.no_grad():
            assert max_rel_err(out[i], m(x)) <= RTOL
    states = batch.get_model_states()
    for i, m in enumerate(ref):
        assert int(states[i]["bn.num_batches_tracked"]) == 10
        assert max_rel_err(states[i]["bn.running_var"], m.bn.running_var) <= RTOL


def test_per_model_inputs_and_targets_match():
    torch.manual_seed(1)
    models = [MODELS["mlp"]() for _ in range(N)]
    ref = [copy.deepcopy(m) for m in models]
    batch = mb.ModelBatch(models, shared_input=False)
    opt = mb.optim.SGD(batch, lr=LRS, momentum=0.9)
    ropts = [torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9) for m, lr in zip(ref, LRS)]
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        x = torch.randn(N, 6, 8, generator=g)
        y = torch.randint(0, 3, (N, 6), generator=g)
        opt.zero_grad()
        batch.compute_loss(batch(x), y, F.cross_entropy).backward()
        opt.step()
        for i, (m, o) in enumerate(zip(ref, ropts)):
            o.zero_grad()
            F.cross_entropy(m(x[i]), y[i]).backward()
            o.step()
    assert_match(batch, ref)
