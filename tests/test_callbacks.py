"""Callbacks of modelbatch.fit: per-model early stopping, best-per-model checkpoints,
CSV and TensorBoard logs (real event files, read back)."""

from __future__ import annotations

import csv
import json

import modelbatch as mb
import pytest
import torch
import torch.nn.functional as F
from modelbatch.callbacks import (
    Callback,
    CallbackPack,
    CSVLogger,
    EarlyStopping,
    ModelCheckpoint,
    NaNCallback,
    TensorBoardLogger,
)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

N = 4
# Model 0 cannot learn (lr 0): its val loss never improves after the first epoch.
LRS = [0.0, 1e-2, 3e-2, 1e-1]


def setup(seed=0):
    torch.manual_seed(seed)
    models = [nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)) for _ in range(N)]
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 3, generator=g)  # a learnable rule, so val loss falls
    x, xv = torch.randn(64, 6, generator=g), torch.randn(32, 6, generator=g)
    y, yv = (x @ w).argmax(1), (xv @ w).argmax(1)
    batch = mb.ModelBatch(models)
    opt = mb.optim.SGD(batch, lr=LRS, momentum=0.9)
    train = DataLoader(TensorDataset(x, y), batch_size=16)
    val = DataLoader(TensorDataset(xv, yv), batch_size=32)
    return batch, opt, train, val


def weights(batch, i):
    return {k: v[i].detach().clone() for k, v in batch.stacked_params().items()}


def test_early_stopping_is_per_model():
    batch, opt, train, val = setup()
    snaps = {}

    class Snap(Callback):
        def on_epoch_end(self, loop, logs):
            snaps[loop.epoch] = weights(loop.batch, 0)

    es = EarlyStopping(monitor="val_loss", patience=2)
    hist = mb.fit(
        batch, opt, train, F.cross_entropy, epochs=6, val_loader=val, callbacks=[Snap(), es],
        progress=False,
    )  # fmt: skip
    # model 0: best at epoch 0, no improvement at epochs 1 and 2 -> stopped at epoch 2
    assert es.stopped_epoch[0] == 2
    assert hist.metric("skipped_steps")[:, 0].tolist() == [0, 0, 0, 4, 4, 4]
    val = hist.metric("val_loss")
    for i in range(N):  # the rule, model by model, on the logged values
        best, wait, stopped = float("inf"), 0, -1
        for epoch, v in enumerate(val[:, i].tolist()):
            if v < best:
                best, wait = v, 0
            else:
                wait += 1
            if wait >= 2:
                stopped = epoch
                break
        assert es.stopped_epoch[i] == stopped, i
        assert es.best[i] == best
        skipped = hist.metric("skipped_steps")[:, i]
        end = len(skipped) if stopped < 0 else stopped + 1
        assert (skipped[:end] == 0).all() and (skipped[end:] == 4).all()
    assert (es.stopped_epoch[1:] == -1).any()  # some models kept improving to the end


def test_early_stopping_restores_best_and_ends_the_run():
    batch, opt, train, val = setup()
    at_epoch = {}

    class Snap(Callback):
        def on_epoch_end(self, loop, logs):
            at_epoch[loop.epoch] = [weights(loop.batch, i) for i in range(N)]

    # min_delta so large that no model improves after its first epoch: all stop.
    es = EarlyStopping(patience=1, min_delta=10.0, restore_best=True)
    hist = mb.fit(
        batch, opt, train, F.cross_entropy, epochs=10, val_loader=val, callbacks=[Snap(), es],
        progress=False,
    )  # fmt: skip
    assert hist.epochs == 2 and es.stopped_epoch.tolist() == [1] * N
    assert es.best.tolist() == hist.metric("val_loss")[0].tolist()
    for i in range(1, N):  # restored to the epoch-0 weights, not the epoch-1 ones
        assert not torch.equal(at_epoch[0][i]["0.weight"], at_epoch[1][i]["0.weight"])
        for k, v in weights(batch, i).items():
            assert torch.equal(v, at_epoch[0][i][k]), (i, k)
    with pytest.raises(ValueError, match="patience must be an int >= 1"):
        EarlyStopping(patience=0)
    with pytest.raises(ValueError, match="mode must be 'min' or 'max'"):
        EarlyStopping(mode="best")


def test_model_checkpoint_keeps_each_models_best(tmp_path):
    batch, opt, train, val = setup()
    at_epoch = {}

    class Snap(Callback):
        def on_epoch_end(self, loop, logs):
            at_epoch[loop.epoch] = {i: loop.batch.model(i).state_dict() for i in range(N)}

    ck = ModelCheckpoint(tmp_path / "ck", monitor="val_accuracy", mode="max", save_last=True)
    hist = mb.fit(
        batch, opt, train, F.cross_entropy, epochs=4, val_loader=val, callbacks=[Snap(), ck],
        progress=False,
    )  # fmt: skip
    acc = hist.metric("val_accuracy")  # [epochs, N]
    summary = json.loads((tmp_path / "ck" / "best.json").read_text())
    for i in range(N):
        # the first epoch reaching the best accuracy (strict improvement only)
        best_epoch = int(acc[:, i].argmax())
        assert summary["best_epoch"][i] == best_epoch
        assert summary["best"][i] == acc[best_epoch, i].item()
        plain = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
        plain.load_state_dict(torch.load(ck.path(i), weights_only=True))
        for k, v in plain.state_dict().items():
            assert torch.equal(v, at_epoch[best_epoch][i][k]), (i, k)
    # the run's last state resumes
    fresh, fresh_opt, _, _ = setup(seed=5)
    extra = mb.load_checkpoint(tmp_path / "ck" / "last.ckpt", fresh, fresh_opt)
    assert extra == {"epoch": 3, "global_step": 16}
    for i in range(N):
        for k, v in weights(fresh, i).items():
            assert torch.equal(v, weights(batch, i)[k])
    assert torch.equal(fresh_opt.steps, opt.steps)


def test_csv_logger_rows(tmp_path):
    batch, opt, train, val = setup()
    path = tmp_path / "logs" / "run.csv"
    hist = mb.fit(
        batch, opt, train, F.cross_entropy, epochs=3, val_loader=val, callbacks=CSVLogger(path),
        progress=False,
    )  # fmt: skip
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * N
    assert set(rows[0]) == {"epoch", "model", *hist.keys}
    for row, ref in zip(rows, hist.rows):
        assert int(row["epoch"]) == ref["epoch"] and int(row["model"]) == ref["model"]
        for k in hist.keys:
            assert float(row[k]) == ref[k]  # written with repr: exact
    # appending with other columns is refused, and the file is kept
    size = path.stat().st_size
    with pytest.raises(ValueError, match="has columns"):
        mb.fit(batch, opt, train, F.cross_entropy, epochs=1, callbacks=CSVLogger(path, append=True),
               progress=False)  # fmt: skip
    assert path.stat().st_size == size


def test_tensorboard_writes_real_event_files(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    batch, opt, train, val = setup()
    tb = TensorBoardLogger(tmp_path / "tb", log_every_n_steps=2)
    hist = mb.fit(
        batch, opt, train, F.cross_entropy, epochs=2, val_loader=val, callbacks=tb, progress=False
    )
    files = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(files) == 1
    ea = EventAccumulator(str(tmp_path / "tb"))
    ea.Reload()
    tags = ea.Tags()["scalars"]
    for i in range(N):
        got = [e.value for e in ea.Scalars(f"model_{i}/val_loss")]
        assert got == pytest.approx(hist.metric("val_loss")[:, i].tolist(), rel=1e-6)
    best = [e.value for e in ea.Scalars("population/val_accuracy/best")]
    assert best == pytest.approx(hist.metric("val_accuracy").max(1).values.tolist())
    assert "population/step_loss/median" in tags
    assert [e.step for e in ea.Scalars("population/step_loss/best")] == [2, 4, 6, 8]


def test_callback_pack_runs_in_order_and_refuses_non_callbacks():
    calls = []

    class A(Callback):
        def __init__(self, tag):
            self.tag = tag

        def on_fit_start(self, loop):
            calls.append(("start", self.tag))

        def on_epoch_end(self, loop, logs):
            calls.append(("epoch", self.tag, loop.epoch))

    batch, opt, train, _ = setup()
    pack = CallbackPack([A(1), A(2)])
    pack.append(A(3))
    mb.fit(batch, opt, train, F.cross_entropy, epochs=2, callbacks=pack, progress=False)
    assert calls == [
        ("start", 1), ("start", 2), ("start", 3),
        ("epoch", 1, 0), ("epoch", 2, 0), ("epoch", 3, 0),
        ("epoch", 1, 1), ("epoch", 2, 1), ("epoch", 3, 1),
    ]  # fmt: skip
    with pytest.raises(ValueError, match="Callback instances"):
        CallbackPack([A(1), object()])
    with pytest.raises(ValueError, match="'freeze' or 'reset'"):
        NaNCallback("skip")
    with pytest.raises(KeyError, match="not in the epoch's logs"):
        mb.fit(batch, opt, train, F.cross_entropy, epochs=1, callbacks=EarlyStopping(),
               progress=False)  # fmt: skip
