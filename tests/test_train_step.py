"""modelbatch.TrainStep: the whole step (forward, loss, backward, clipping, scaler,
fused optimizer) as one torch.compile graph gives the eager step's per-model results;
one graph and no graph breaks; new hyper-parameters never recompile."""

from __future__ import annotations

import copy
import warnings

import modelbatch as mb
import pytest
import torch
import torch.nn.functional as F
from _models import MODELS, make_data
from modelbatch.train_step import TrainStep
from torch import nn

LRS = [1e-3, 3e-3, 1e-2]


def make(kind, opt="sgd", seed=0):
    torch.manual_seed(seed)
    models = [MODELS[kind]() for _ in range(3)]
    out = []
    for _ in range(2):
        batch = mb.ModelBatch(copy.deepcopy(models), seeds=0)
        if opt == "sgd":
            o = mb.optim.SGD(batch, lr=[10 * lr for lr in LRS], momentum=0.9, weight_decay=1e-3)
        else:
            o = mb.optim.Adam(batch, lr=LRS, betas=(0.9, [0.999, 0.99, 0.95]))
        out.append((batch, o))
    return out


def eager_step(batch, opt, x, y, clip=None):
    opt.zero_grad()
    losses = batch.compute_loss(batch(x), y, F.cross_entropy, reduction="none")
    losses.sum().backward()
    if clip is not None:
        mb.clip_grad_norm_(batch, clip)
    opt.step()
    return losses.detach()


def assert_states_close(a, b, rtol=1e-5, atol=1e-6):
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        if torch.is_tensor(v):
            torch.testing.assert_close(v, w, rtol=rtol, atol=atol, msg=k)


# SGD for all: Adam turns the rounding noise of a gradient that is zero in exact
# arithmetic (the attention's key bias: softmax ignores a constant shift) into steps
# of size lr, in any two implementations; the MLP also runs with Adam.
@pytest.mark.parametrize(
    ("kind", "opt"),
    [("mlp", "sgd"), ("mlp", "adam"), ("cnn", "sgd"), ("embed", "sgd"), ("transformer", "sgd")],
)
def test_compiled_step_equals_eager_step(kind, opt):
    (ref, ref_opt), (batch, bopt) = make(kind, opt)
    step = TrainStep(batch, bopt, F.cross_entropy)
    for x, y in make_data(kind, 5):
        want = eager_step(ref, ref_opt, x, y)
        got = step(x, y)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert_states_close(batch, ref)
    torch.testing.assert_close(bopt.steps, ref_opt.steps)
    assert torch.equal(batch.latest_losses, got)


def test_uncompiled_trainstep_is_the_eager_step_exactly():
    (ref, ref_opt), (batch, bopt) = make("mlp", "adam")
    step = TrainStep(
        batch, bopt, F.cross_entropy, compile=False, max_grad_norm=[0.1, 1.0, 10.0], fused=False
    )
    for x, y in make_data("mlp", 4):
        assert torch.equal(step(x, y), eager_step(ref, ref_opt, x, y, clip=[0.1, 1.0, 10.0]))
    for v, w in zip(batch.state_dict().values(), ref.state_dict().values()):
        assert not torch.is_tensor(v) or torch.equal(v, w)


def test_one_graph_no_breaks():
    _, (batch, opt) = make("mlp", "adam")
    scaler = mb.amp.GradScaler(batch)
    step = TrainStep(batch, opt, F.cross_entropy, scaler=scaler, max_grad_norm=1.0)
    x, y = make_data("mlp", 1)[0]
    step._prepare(x)
    step._refresh_hparams()
    explained = torch._dynamo.explain(step._step)((x,), y, step._hp, step._buckets, step._max_norm)
    assert explained.graph_count == 1, explained
    assert explained.graph_break_count == 0, explained.break_reasons


def test_new_hyperparameters_do_not_recompile():
    (ref, ref_opt), (batch, opt) = make("mlp", "adam")
    step = TrainStep(batch, opt, F.cross_entropy, max_grad_norm=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=1, gamma=0.5)
    data = make_data("mlp", 6)
    step(*data[0])
    eager_step(ref, ref_opt, *data[0], clip=1.0)
    with torch._dynamo.config.patch(error_on_recompile=True), warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. the scheduler's "step() before optimizer.step()"
        for i, (x, y) in enumerate(data[1:]):
            sched.step()
            ref_sched.step()
            opt.param_groups[1]["betas"] = (0.8, 0.9)
            ref_opt.param_groups[1]["betas"] = (0.8, 0.9)
            clip = [0.5, 1.0, 2.0 + i]
            step.set_max_grad_norm(clip)
            torch.testing.assert_close(
                step(x, y), eager_step(ref, ref_opt, x, y, clip=clip), rtol=1e-5, atol=1e-6
            )
    assert opt.param_groups[2]["lr"] == pytest.approx(LRS[2] / 32)
    assert_states_close(batch, ref)


def test_scaler_and_autocast_match_the_eager_scaler():
    """bfloat16 autocast with per-model loss scales: losses, scales and weights
    follow the eager GradScaler loop."""
    (ref, ref_opt), (batch, opt) = make("mlp", "adam")
    ref_scaler = mb.amp.GradScaler(ref, init_scale=2.0**8, growth_interval=2)
    scaler = mb.amp.GradScaler(batch, init_scale=2.0**8, growth_interval=2)
    step = TrainStep(batch, opt, F.cross_entropy, scaler=scaler, autocast=torch.bfloat16)
    for x, y in make_data("mlp", 5):
        ref_opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want = ref.compute_loss(ref(x), y, F.cross_entropy, reduction="none")
        ref_scaler.scale(want).backward()
        ref_scaler.step(ref_opt)
        ref_scaler.update()
        torch.testing.assert_close(step(x, y), want.detach(), rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(scaler.get_scale(), ref_scaler.get_scale())
    assert (scaler.get_scale() > 2.0**8).all()  # it grew on its own schedule
    assert_states_close(batch, ref, rtol=2e-2, atol=1e-3)


def test_nonfinite_model_skips_its_update_only():
    _, (batch, opt) = make("mlp", "adam")
    TrainStep(batch, opt, F.cross_entropy, compile=False)  # the shared one builds too
    x, y = make_data("mlp", 1)[0]
    xs = x.expand(3, -1, -1).clone()
    xs[1, 0, 0] = float("nan")
    per_model = mb.ModelBatch([batch.model(i) for i in range(3)], shared_input=False)
    popt = mb.optim.Adam(per_model, lr=LRS, betas=(0.9, [0.999, 0.99, 0.95]))
    pstep = TrainStep(per_model, popt, F.cross_entropy)
    before = {k: v.clone() for k, v in per_model.stacked_params().items()}
    losses = pstep(xs, y)
    assert torch.isnan(losses[1]) and torch.isfinite(losses[[0, 2]]).all()
    assert popt.steps.tolist() == [1, 0, 1]
    for k, v in per_model.stacked_params().items():
        assert torch.equal(v[1], before[k][1]) and not torch.equal(v[0], before[k][0])


def test_bad_arguments_are_refused():
    _, (batch, opt) = make("mlp", "adam")
    other = mb.ModelBatch([MODELS["mlp"]() for _ in range(3)])
    with pytest.raises(ValueError, match="does not belong to this ModelBatch"):
        TrainStep(batch, mb.optim.SGD(other, lr=0.1), F.cross_entropy)
    rms = mb.PerModelOptimizer(batch, torch.optim.RMSprop, [{"lr": 0.1}] * 3)
    with pytest.raises(ValueError, match="fused per-model optimizers"):
        TrainStep(batch, rms, F.cross_entropy)
    with pytest.raises(ValueError, match="cuda_graphs must be"):
        TrainStep(batch, opt, F.cross_entropy, cuda_graphs="always")
    with pytest.raises(ValueError, match="needs compile=True and a CUDA"):
        TrainStep(batch, opt, F.cross_entropy, cuda_graphs=True)
    with pytest.raises(ValueError, match="built without max_grad_norm"):
        TrainStep(batch, opt, F.cross_entropy).set_max_grad_norm(1.0)
    with pytest.raises(ValueError, match="expected a scalar or 3 values"):
        TrainStep(batch, opt, F.cross_entropy, max_grad_norm=[1.0, 2.0])
    step = TrainStep(batch, opt, F.cross_entropy, compile=False)
    with pytest.raises(ValueError, match="0-d tensor"):
        step(torch.tensor(1.0), torch.tensor(0))


@pytest.mark.parametrize("compile", [True, False])
def test_compiled_step_draws_each_models_dropout_as_the_eager_step(compile):
    """Per-model Philox dropout (Dropout and Dropout1d) inside the compiled graph:
    the same masks, losses and stream offsets as the eager forward."""
    torch.manual_seed(0)
    models = [  # inputs [B, 2, 4]: Dropout1d drops whole channels of [B, C=2, L=8]
        nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.ReLU(), nn.Dropout1d(0.3),
                      nn.Flatten(), nn.Linear(16, 2))
        for _ in range(3)
    ]  # fmt: skip
    ref = mb.ModelBatch(copy.deepcopy(models), seeds=0)
    ref_opt = mb.optim.SGD(ref, lr=0.1, momentum=0.9)
    batch = mb.ModelBatch(copy.deepcopy(models), seeds=0)
    step = TrainStep(batch, mb.optim.SGD(batch, lr=0.1, momentum=0.9), F.cross_entropy,
                     compile=compile)  # fmt: skip
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        x, y = torch.randn(5, 2, 4, generator=g), torch.randint(0, 2, (5,), generator=g)
        want = eager_step(ref, ref_opt, x, y)
        got = step(x, y)
        if compile:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(got, want)
        assert torch.equal(batch.rng_offsets, ref.rng_offsets)
    assert ref.rng_offsets.min() > 0
    assert_states_close(batch, ref)


def test_torch_streams_inside_a_compiled_step_say_what_to_do():
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2)) for _ in range(2)]
    batch = mb.ModelBatch(models, seeds=0, rng="torch")
    step = TrainStep(batch, mb.optim.SGD(batch, lr=0.1), F.cross_entropy)
    with pytest.raises(Exception, match="rng='philox'"):
        step(torch.randn(5, 4), torch.randint(0, 2, (5,)))


class _Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.lstm = nn.LSTM(6, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h, _ = self.lstm(self.emb(x))
        return self.head(h[:, -1])


def test_recurrent_models_run_uncompiled_with_a_warning():
    """Dynamo cannot trace nn.LSTM: the step says so and runs uncompiled, exactly
    the eager step."""
    torch.manual_seed(0)
    models = [_Recurrent() for _ in range(3)]
    ref = mb.ModelBatch(copy.deepcopy(models), seeds=0)
    batch = mb.ModelBatch(models, seeds=0)
    ref_opt, opt = mb.optim.Adam(ref, lr=LRS), mb.optim.Adam(batch, lr=LRS)
    with pytest.warns(UserWarning, match="cannot trace LSTM layers"):
        step = TrainStep(batch, opt, F.cross_entropy)
    assert not step.compiled
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randint(0, 20, (5, 7), generator=g), torch.randint(0, 3, (5,), generator=g)
        assert torch.equal(step(x, y), eager_step(ref, ref_opt, x, y))
    for v, w in zip(batch.stacked_params().values(), ref.stacked_params().values()):
        assert torch.equal(v, w)
