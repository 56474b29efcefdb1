"""modelbatch.fit / evaluate: the loop trains every model as plain PyTorch trains it
alone, records per-model metrics, and isolates models whose loss or gradients go
non-finite (every other model stays bit-identical to a run without them)."""

from __future__ import annotations

import copy
import math

import modelbatch as mb
import pytest
import torch
import torch.nn.functional as F
from modelbatch.callbacks import Callback, NaNCallback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

N = 4
LRS = [1e-3, 3e-3, 1e-2, 3e-2]


def make_models(n=N, dropout=0.0, norm=False, seed=0):
    torch.manual_seed(seed)
    return [
        nn.Sequential(
            nn.Linear(6, 16),
            nn.BatchNorm1d(16) if norm else nn.Identity(),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(16, 3),
        )
        for _ in range(n)
    ]


def data(n=96, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def loader(x, y, bs=16):
    return DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=False)


def state(batch, i):
    return {
        k: v[i].detach().clone()
        for k, v in {**batch.stacked_params(), **batch.stacked_buffers()}.items()
    }


def test_fit_equals_plain_pytorch_per_model():
    """Each model of fit(...) follows its own plain torch.optim.Adam run, and the
    history's train/val losses and accuracies are those of the plain runs."""
    x, y = data()
    xv, yv = data(40, seed=2)
    models = make_models()
    plain = copy.deepcopy(models)
    batch = mb.ModelBatch(models)
    opt = mb.optim.Adam(batch, lr=LRS, weight_decay=[0.0, 0.0, 1e-2, 1e-2])
    hist = mb.fit(
        batch, opt, loader(x, y), F.cross_entropy, epochs=3, val_loader=loader(xv, yv, 20),
        max_grad_norm=[0.5, 1.0, 1.0, 10.0], progress=False,
    )  # fmt: skip

    for i, m in enumerate(plain):
        o = torch.optim.Adam(m.parameters(), lr=LRS[i], weight_decay=[0, 0, 1e-2, 1e-2][i])
        for epoch in range(3):
            m.train()
            tot, correct = 0.0, 0
            for xb, yb in loader(x, y):
                o.zero_grad()
                out = m(xb)
                loss = F.cross_entropy(out, yb)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(m.parameters(), [0.5, 1.0, 1.0, 10.0][i])
                o.step()
                tot += loss.item() * len(yb)
                correct += (out.argmax(-1) == yb).sum().item()
            assert hist.metric("train_loss")[epoch, i].item() == pytest.approx(
                tot / len(y), rel=1e-5
            )
            assert hist.metric("train_accuracy")[epoch, i].item() == pytest.approx(correct / len(y))
            m.eval()
            with torch.no_grad():
                out = m(xv)
                vl = F.cross_entropy(out, yv).item()
                va = (out.argmax(-1) == yv).double().mean().item()
            assert hist.metric("val_loss")[epoch, i].item() == pytest.approx(vl, rel=1e-5)
            assert hist.metric("val_accuracy")[epoch, i].item() == pytest.approx(va)
        for k, v in m.state_dict().items():
            torch.testing.assert_close(state(batch, i)[k], v, rtol=1e-5, atol=1e-6)
    assert len(hist) == 3 * N and hist.epochs == 3
    assert hist.rows[5] == {**hist.rows[5], "epoch": 1, "model": 1}
    assert hist.last("lr").tolist() == pytest.approx(LRS)
    assert hist.last("skipped_steps").tolist() == [0.0] * N
    df = hist.to_pandas()
    assert list(df.columns[:2]) == ["epoch", "model"] and len(df) == 3 * N


def test_fit_with_scheduler_and_custom_metric():
    x, y = data()
    batch = mb.ModelBatch(make_models())
    opt = mb.optim.SGD(batch, lr=LRS, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    def top2(out, target):  # [N, B] per-sample values
        return (out.topk(2, dim=-1).indices == target[..., None]).any(-1).double()

    hist = mb.fit(
        batch, opt, loader(x, y), F.cross_entropy, epochs=2,
        metrics={"loss": None, "top2": top2}, scheduler=sched, progress=False,
    )  # fmt: skip
    assert hist.metric("lr")[0].tolist() == pytest.approx(LRS)  # logged before stepping
    assert opt.param_groups[2]["lr"] == pytest.approx(LRS[2] * 0.25)
    top2_acc = hist.last("train_top2")
    assert ((top2_acc >= 0) & (top2_acc <= 1)).all() and top2_acc.min() > 0.3
    res = mb.evaluate(batch, loader(x, y), F.cross_entropy, metrics={"top2": top2})
    with torch.no_grad():
        out = batch.eval()(x)
    batch.train()
    torch.testing.assert_close(res["top2"], top2(out, y).mean(1))


def diverge_run(lr3, callbacks=None, optimizer="adam", steps_per_epoch=6, epochs=2, clip=None):
    x, y = data(16 * steps_per_epoch)
    batch = mb.ModelBatch(make_models(dropout=0.2), seeds=10)
    lrs = LRS[:3] + [lr3]
    if optimizer == "adam":
        opt = mb.optim.Adam(batch, lr=lrs)
    elif optimizer == "sgd":
        opt = mb.optim.SGD(batch, lr=lrs, momentum=0.9)
    else:
        opt = mb.PerModelOptimizer(batch, torch.optim.RMSprop, [{"lr": lr} for lr in lrs])
    hist = mb.fit(
        batch, opt, loader(x, y), F.cross_entropy, epochs=epochs, callbacks=callbacks,
        max_grad_norm=clip, progress=False,
    )  # fmt: skip
    return batch, opt, hist


@pytest.mark.parametrize(("optimizer", "clip"), [("sgd", None), ("rmsprop", None), ("adam", 1.0)])
def test_a_diverging_model_changes_no_other_model(optimizer, clip):
    """Model 3 with a huge learning rate blows up to inf/NaN; models 0-2 are
    bit-identical (weights, dropout streams) to the run where it trains normally.
    (With clipping, the non-finite check reads the per-model norms.)"""
    bad, _bad_opt, hist = diverge_run(1e30, optimizer=optimizer, clip=clip)
    good, _good_opt, _ = diverge_run(LRS[3], optimizer=optimizer, clip=clip)
    assert hist.last("skipped_steps")[3] > 0  # it did go non-finite
    for i in range(3):
        for k, v in state(bad, i).items():
            assert torch.equal(v, state(good, i)[k]), (i, k)
    assert torch.equal(bad.rng_offsets[:3], good.rng_offsets[:3])


class Recorder(Callback):
    """Records one model's state and dropout-stream offset after every step."""

    def __init__(self, model):
        self.model = model
        self.states, self.offsets = {}, {}

    def on_step_end(self, loop, losses, skipped):
        self.states[loop.global_step] = state(loop.batch, self.model)
        self.offsets[loop.global_step] = loop.batch.rng_offsets[self.model].clone()


def test_injected_nan_isolation_and_freeze():
    """Inject a NaN into model 2's loss at step 10 of 50: every other model is
    bit-identical to the run without the injection; with NaNCallback("freeze") model
    2 stays at its step-9 state (after 10 steps) to the last bit."""
    steps, k, at = 50, 2, 10
    x, y = data(16 * steps)

    class Poison:
        """Per-model inputs [N, B, 6] where model k's batch at step `at` is NaN."""

        def __init__(self, poison):
            self.poison = poison

        def __iter__(self):
            for s, (xb, yb) in enumerate(loader(x, y)):
                xs = xb.expand(N, -1, -1).clone()
                if self.poison and s == at:
                    xs[k] = math.nan
                yield xs, yb

        def __len__(self):
            return steps

    def run(poison, callbacks=None):
        batch = mb.ModelBatch(make_models(dropout=0.1), shared_input=False, seeds=3)
        opt = mb.optim.Adam(batch, lr=LRS)
        rec = Recorder(k)
        cbs = [rec] + ([] if callbacks is None else callbacks)
        hist = mb.fit(batch, opt, Poison(poison), F.cross_entropy, epochs=1, callbacks=cbs,
                      progress=False)  # fmt: skip
        return batch, opt, hist, rec

    clean, _clean_opt, _, clean_rec = run(False)
    hit, _hit_opt, hist, _ = run(True)
    frozen, frozen_opt, fhist, _frec = run(True, [NaNCallback("freeze", warn=False)])
    for b in (hit, frozen):
        for i in (0, 1, 3):
            for key, v in state(b, i).items():
                assert torch.equal(v, state(clean, i)[key]), (i, key)
    # the bad step was skipped by default: model 2 then trained on from its step-9 state
    assert hist.last("skipped_steps").tolist() == [0, 0, 1, 0]
    assert torch.isfinite(state(hit, k)["0.weight"]).all()
    # frozen: its final state is its state after the first `at` steps (0 .. at-1) of
    # the clean run, down to its dropout stream
    for key, v in state(frozen, k).items():
        assert torch.equal(v, clean_rec.states[at][key]), key
    assert frozen.rng_offsets[k] == clean_rec.offsets[at] < clean.rng_offsets[k]
    assert frozen_opt.steps.tolist() == [50, 50, at, 50]
    assert fhist.last("skipped_steps").tolist() == [0, 0, steps - at, 0]


def test_nan_reset_restarts_the_model():
    steps, k, at = 12, 1, 5
    x, y = data(16 * steps)

    def batches():
        for s, (xb, yb) in enumerate(loader(x, y)):
            xs = xb.expand(N, -1, -1).clone()
            if s == at:
                xs[k] = math.inf
            yield xs, yb

    batch = mb.ModelBatch(make_models(), shared_input=False, seeds=3)
    init = state(batch, k)
    opt = mb.optim.Adam(batch, lr=LRS)
    seen = {}

    class Watch(Callback):
        def on_step_end(self, loop, losses, skipped):
            seen[loop.global_step] = (state(loop.batch, k), opt.steps.clone())

    cb = NaNCallback("reset", warn=False)
    mb.fit(batch, opt, list(batches()), F.cross_entropy, epochs=1, callbacks=[cb, Watch()],
           progress=False)  # fmt: skip
    st, steps_after = seen[at + 1]
    for key, v in st.items():
        assert torch.equal(v, init[key]), key
    assert steps_after.tolist() == [at + 1, 0, at + 1, at + 1]
    assert opt.steps.tolist() == [steps, steps - at - 1, steps, steps]
    assert cb.events.tolist() == [0, 1, 0, 0]


def test_frozen_model_keeps_batchnorm_statistics_and_stream():
    """Freezing model 0 keeps all of its state: BatchNorm running statistics and its
    dropout stream do not move although its forward still runs."""
    x, y = data()

    class FreezeFirst(Callback):
        def on_fit_start(self, loop):
            loop.freeze([0])
            self.before = state(loop.batch, 0)
            self.offset = loop.batch.rng_offsets[0].clone()

    batch = mb.ModelBatch(make_models(dropout=0.2, norm=True), seeds=1)
    opt = mb.optim.SGD(batch, lr=LRS, momentum=0.9, weight_decay=0.1)
    cb = FreezeFirst()
    hist = mb.fit(batch, opt, loader(x, y), F.cross_entropy, epochs=2, callbacks=cb,
                  progress=False)  # fmt: skip
    for key, v in state(batch, 0).items():
        assert torch.equal(v, cb.before[key]), key
    assert batch.rng_offsets[0] == cb.offset and batch.rng_offsets[1] > cb.offset
    assert not torch.equal(state(batch, 1)["4.weight"], cb.before["4.weight"])
    assert (
        math.isnan(hist.last("train_loss")[0]) and hist.last("skipped_steps")[0] == 6
    )  # per epoch


def test_fit_with_per_model_grad_scaler():
    """float16 autocast with modelbatch.amp.GradScaler: a frozen model's loss scale
    stays as it was, the others' scales follow their own schedule."""
    x, y = data()

    class FreezeLast(Callback):
        def on_fit_start(self, loop):
            loop.freeze(3)

    batch = mb.ModelBatch(make_models())
    opt = mb.optim.Adam(batch, lr=LRS)
    scaler = mb.amp.GradScaler(batch, init_scale=2.0**10, growth_interval=2)
    before = state(batch, 3)
    hist = mb.fit(
        batch, opt, loader(x, y), F.cross_entropy, epochs=2, scaler=scaler,
        autocast=torch.bfloat16, callbacks=FreezeLast(), progress=False,
    )  # fmt: skip
    scales = scaler.get_scale().tolist()
    assert scales[3] == 2.0**10 and all(s > 2.0**10 for s in scales[:3])
    for key, v in state(batch, 3).items():
        assert torch.equal(v, before[key])
    assert opt.steps.tolist() == [12, 12, 12, 0]
    assert torch.isfinite(hist.last("train_loss")[:3]).all()


def test_bad_input_is_refused():
    x, y = data()
    batch = mb.ModelBatch(make_models())
    other = mb.ModelBatch(make_models())
    opt = mb.optim.SGD(other, lr=0.1)
    with pytest.raises(ValueError, match="does not belong to this ModelBatch"):
        mb.fit(batch, opt, loader(x, y), F.cross_entropy, epochs=1, progress=False)
    opt = mb.optim.SGD(batch, lr=0.1)
    with pytest.raises(ValueError, match="epochs must be an int"):
        mb.fit(batch, opt, loader(x, y), F.cross_entropy, epochs=-1, progress=False)
    with pytest.raises(ValueError, match="unknown metric 'f1'"):
        mb.fit(batch, opt, loader(x, y), F.cross_entropy, epochs=1, metrics=["f1"])
    with pytest.raises(ValueError, match=r"loader items \(inputs, targets\)"):
        mb.fit(batch, opt, [x], F.cross_entropy, epochs=1, progress=False)
    with pytest.raises(ValueError, match="Callback instances"):
        mb.fit(batch, opt, loader(x, y), F.cross_entropy, epochs=1, callbacks=[print])
    with pytest.raises(ValueError, match="out of range for 4 models"):
        mb.train.FitLoop(batch, opt).freeze([4])
    with pytest.raises(ValueError, match="no batches"):
        mb.evaluate(batch, [], F.cross_entropy)
    before = [state(batch, i) for i in range(N)]
    with pytest.raises(ValueError, match="rejected inputs of shape"):
        mb.fit(batch, opt, loader(torch.randn(32, 5), y[:32]), F.cross_entropy, epochs=1,
               progress=False)  # fmt: skip
    for i in range(N):
        for k, v in state(batch, i).items():
            assert torch.equal(v, before[i][k]), (i, k)


@pytest.mark.parametrize("kind", ["kfold", "bootstrap"])
def test_fit_with_a_router_trains_each_model_on_its_own_rows(kind):
    """k-fold cross-validation (and bagging) of N models in one fit: model i equals a
    plain model trained on the rows of each batch in its training split, and its
    val_loss is measured on its own held-out rows."""
    from modelbatch.data import BootstrapRouter, KFoldRouter

    x, y = data(80)
    ids = torch.arange(80)
    router = KFoldRouter(4, 80, seed=3) if kind == "kfold" else BootstrapRouter(80, N, seed=3)
    train_dl = DataLoader(TensorDataset(x, y, ids), batch_size=16, shuffle=False)
    models = make_models()
    plain = copy.deepcopy(models)
    batch = mb.ModelBatch(models, shared_input=False)
    opt = mb.optim.SGD(batch, lr=LRS, momentum=0.9)
    hist = mb.fit(batch, opt, train_dl, F.cross_entropy, epochs=2, val_loader=train_dl,
                  router=router, progress=False)  # fmt: skip
    for i, m in enumerate(plain):
        if kind == "kfold":
            train_rows, val_rows = router.train_indices(i), router.val_indices(i)
            mult = torch.zeros(80, dtype=torch.long)
            mult[train_rows] = 1
        else:
            mult = router.multiplicity[i].long()
            val_rows = router.oob_indices(i)
        o = torch.optim.SGD(m.parameters(), lr=LRS[i], momentum=0.9)
        for _ in range(2):
            for xb, yb, ib in train_dl:
                rows = torch.repeat_interleave(torch.arange(len(ib)), mult[ib])
                o.zero_grad()
                if len(rows):
                    F.cross_entropy(m(xb[rows]), yb[rows]).backward()
                else:
                    for p in m.parameters():
                        p.grad = torch.zeros_like(p)
                o.step()
        for k, v in m.state_dict().items():
            torch.testing.assert_close(state(batch, i)[k], v, rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            vl = F.cross_entropy(m(x[val_rows]), y[val_rows]).item()
        assert hist.last("val_loss")[i].item() == pytest.approx(vl, rel=1e-5)
    shared = mb.ModelBatch(make_models())
    with pytest.raises(ValueError, match="shared_input=False"):
        mb.fit(shared, mb.optim.SGD(shared, lr=0.1), train_dl, F.cross_entropy, epochs=1,
               router=router, progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="sample_ids"):
        mb.fit(batch, opt, loader(x, y), F.cross_entropy, epochs=1, router=router,
               progress=False)  # fmt: skip
