"""modelbatch.integrations.lightning: a ModelBatch trained by a real lightning.Trainer
on CPU equals modelbatch.fit bit for bit, logs per-model metrics and resumes exactly
from Lightning's own checkpoints."""

import pytest

lightning = pytest.importorskip(
    "lightning", reason="needs the [lightning] extra: pip install 'modelbatch[lightning]'"
)

import csv  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import modelbatch as mb  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from modelbatch.integrations.lightning import ModelBatchModule  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

N = 4
LRS = [1e-3, 3e-3, 1e-2, 3e-2]
EXACT = {"rtol": 0.0, "atol": 0.0}

# Lightning's advice for toy loaders, irrelevant here.
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers.*", "ignore:.*LeafSpec.*", "ignore:.*litlogger.*"
)


def make_batch(seed=0, p=0.2):
    torch.manual_seed(seed)
    models = [
        nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(p), nn.Linear(16, 3))
        for _ in range(N)
    ]
    # Dropout draws from each model's Philox stream, whose state is in the
    # state_dict, so the runs below must also agree on every mask.
    return mb.ModelBatch(models, seeds=100)


def data():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 3, generator=g)
    x, xv = torch.randn(96, 8, generator=g), torch.randn(40, 8, generator=g)
    return TensorDataset(x, (x @ w).argmax(1)), TensorDataset(xv, (xv @ w).argmax(1))


class EpochShuffle(torch.utils.data.Sampler):
    """Epoch e visits the samples in permutation ``randperm(n, seed + e)``.

    Not ``shuffle=True``: torch's RandomSampler draws one more permutation from its
    generator once it is exhausted, which ``modelbatch.fit`` (iterating to
    StopIteration) triggers every epoch and Lightning (stopping after ``len``
    batches) does not, so from the second epoch on they would see other orders.
    """

    def __init__(self, n, seed=7):
        self.n, self.seed, self.epoch = n, seed, 0

    def __len__(self):
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        return iter(torch.randperm(self.n, generator=g).tolist())


def loaders(shuffle=True):
    train, val = data()
    sampler = EpochShuffle(len(train)) if shuffle else None
    return (
        DataLoader(train, batch_size=16, sampler=sampler),
        DataLoader(val, batch_size=16),
    )


def trainer(max_epochs, **kwargs):
    kwargs.setdefault("logger", False)
    kwargs.setdefault("log_every_n_steps", 1)
    return lightning.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def step_lr(opt):
    return torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)


def params(batch):
    return {k: v.detach().clone() for k, v in batch.stacked_params().items()}


def states(batch):
    return {k: v.detach().clone() for k, v in batch.state_dict().items() if torch.is_tensor(v)}


def test_fits_four_models_one_epoch_and_logs_per_model(tmp_path):
    batch = make_batch()
    before = params(batch)
    module = ModelBatchModule(batch, F.cross_entropy, "adam", optimizer_kwargs={"lr": LRS})
    logger = lightning.pytorch.loggers.CSVLogger(tmp_path, name="run", version=0)
    tr = trainer(1, logger=logger)
    train, val = loaders()
    tr.fit(module, train, val)

    assert module.history.epochs == 1
    val_loss = module.history.last("val_loss")
    assert torch.isfinite(val_loss).all()
    for k, v in batch.stacked_params().items():
        moved = (v.detach() - before[k]).flatten(1).abs().amax(1)
        assert (moved > 0).all(), k  # every model trained
    # Lightning's own metrics: per model and for the population (float32 there).
    m = tr.callback_metrics
    for i in range(N):
        assert float(m[f"val_loss_model_{i}"]) == pytest.approx(float(val_loss[i]), rel=1e-6)
        assert float(m[f"lr_model_{i}"]) == pytest.approx(LRS[i])
    assert float(m["val_loss_best"]) == pytest.approx(float(val_loss.min()), rel=1e-6)
    assert float(m["val_loss_median"]) == pytest.approx(float(val_loss.median()), rel=1e-6)
    val_acc = module.history.last("val_accuracy")
    assert float(m["val_accuracy_best"]) == pytest.approx(float(val_acc.max()), rel=1e-6)
    with open(tmp_path / "run" / "version_0" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    logged = [r for r in rows if r.get("val_loss_model_3")]
    assert len(logged) == 1
    assert float(logged[0]["val_loss_model_3"]) == pytest.approx(float(val_loss[3]), rel=1e-6)

    # A standalone validation reports the same per-model values (nothing trained since).
    (result,) = tr.validate(module, val, verbose=False)
    for i in range(N):
        assert result[f"val_loss_model_{i}"] == pytest.approx(float(val_loss[i]), rel=1e-6)
    torch.testing.assert_close(module.val_logs["val_loss"], val_loss, **EXACT)
    assert module.history.epochs == 1

    # Exported model i is a plain module computing what the batch computes for i.
    batch.eval()
    x = val.dataset.tensors[0][:5]
    out = batch(x)
    for i in range(N):
        model = module.export_model(i)
        assert isinstance(model, nn.Sequential)
        model.eval()
        torch.testing.assert_close(model(x), out[i], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", ["plain", "nonfinite"])
def test_equals_modelbatch_fit(case):
    """Same seeds, data order, per-model lrs, fused AdamW, per-model clipping and
    scheduler: Lightning's fit and modelbatch.fit give identical models."""

    def build():
        batch = make_batch()
        if case == "nonfinite":
            with torch.no_grad():  # model 2's outputs, hence its loss, are NaN
                batch.stacked_params()["0.weight"][2, 0, 0] = math.nan
        return batch

    ref = build()
    opt = mb.optim.AdamW(ref, lr=LRS, weight_decay=0.01)
    train, val = loaders()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the NaN model's warnings
        hist = mb.fit(
            ref, opt, train, F.cross_entropy, epochs=2, val_loader=val, max_grad_norm=0.5,
            scheduler=step_lr(opt), progress=False,
        )  # fmt: skip

    batch = build()
    module = ModelBatchModule(
        batch,
        F.cross_entropy,
        {"name": "adamw", "lr": LRS, "weight_decay": 0.01},
        scheduler=step_lr,
        max_grad_norm=0.5,
    )
    tr = trainer(2)
    train, val = loaders()
    tr.fit(module, train, val)

    # Bit-identical: the same ops run in the same order on the same tensors.
    torch.testing.assert_close(states(batch), states(ref), **EXACT, equal_nan=True)
    lit_opt = tr.optimizers[0]
    torch.testing.assert_close(lit_opt.steps, opt.steps, **EXACT)
    torch.testing.assert_close(
        lit_opt.state_dict()["state"], opt.state_dict()["state"], **EXACT, equal_nan=True
    )
    assert module.history.keys == hist.keys
    for key in hist.keys:
        torch.testing.assert_close(
            module.history.metric(key), hist.metric(key), **EXACT, equal_nan=True
        )
    if case == "nonfinite":
        steps = len(train) * 2
        assert module.history.metric("skipped_steps")[:, 2].tolist() == [steps / 2] * 2
        assert lit_opt.steps.tolist() == [steps, steps, 0, steps]
        assert torch.isnan(module.history.last("val_loss")[2])


def test_trainer_gradient_clip_val_is_per_model():
    """Trainer(gradient_clip_val=c) clips each model by its own norm, as
    max_grad_norm=c does (Lightning's own clipping would see no parameters)."""
    results = []
    for kwargs, module_kwargs in (({"gradient_clip_val": 0.05}, {}), ({}, {"max_grad_norm": 0.05})):
        batch = make_batch()
        module = ModelBatchModule(
            batch, F.cross_entropy, "sgd", optimizer_kwargs={"lr": LRS}, **module_kwargs
        )
        train, val = loaders()
        trainer(1, **kwargs).fit(module, train, val)
        results.append(states(batch))
    torch.testing.assert_close(results[0], results[1], **EXACT)
    unclipped = make_batch()
    module = ModelBatchModule(unclipped, F.cross_entropy, "sgd", optimizer_kwargs={"lr": LRS})
    train, val = loaders()
    trainer(1).fit(module, train, val)
    moved = (states(unclipped)["0__weight"] - results[0]["0__weight"]).flatten(1).abs().amax(1)
    assert (moved > 0).all()  # clipping changed every model's training


@pytest.mark.parametrize("skip_nonfinite", [True, False])
def test_gradient_accumulation(skip_nonfinite):
    """accumulate_grad_batches=2 over batches of 8 trains like batches of 16: Lightning
    averages the two micro-batches' gradients, which equals the gradient of the mean
    over 16 rows up to float rounding (summed in another order), hence the tolerance."""
    # No dropout: micro-batches of 8 would draw other masks than batches of 16.
    batch, ref = make_batch(p=0.0), make_batch(p=0.0)
    opt = mb.optim.Adam(ref, lr=LRS)
    train, val = data()
    mb.fit(ref, opt, DataLoader(train, batch_size=16), F.cross_entropy, epochs=1, progress=False)

    module = ModelBatchModule(
        batch, F.cross_entropy, "adam", optimizer_kwargs={"lr": LRS}, skip_nonfinite=skip_nonfinite
    )
    tr = trainer(1, accumulate_grad_batches=2, num_sanity_val_steps=0)
    tr.fit(module, DataLoader(train, batch_size=8), DataLoader(val, batch_size=16))
    torch.testing.assert_close(params(batch), params(ref), rtol=1e-5, atol=1e-6)
    assert tr.optimizers[0].steps.tolist() == [len(train) / 16] * N


def test_checkpoint_round_trip_continues_exactly(tmp_path):
    def module_for(batch):
        return ModelBatchModule(
            batch, F.cross_entropy, "adam", optimizer_kwargs={"lr": LRS}, scheduler=step_lr
        )

    # The loader is not shuffled: a resumed run starts a fresh loader, so only a
    # fixed order lets epoch 2 see the same batches in both runs.
    full = module_for(make_batch())
    tr_full = trainer(2)
    tr_full.fit(full, *loaders(shuffle=False))

    half = module_for(make_batch())
    tr_half = trainer(1)
    tr_half.fit(half, *loaders(shuffle=False))
    path = tmp_path / "half.ckpt"
    tr_half.save_checkpoint(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    assert ckpt["optimizer_states"][0]["kind"] == "Adam"
    assert ckpt["state_dict"]["batch.0__weight"].shape[0] == N
    assert ckpt["modelbatch"]["num_models"] == N

    # Another initialisation and other seeds: everything must come from the file.
    other_init = make_batch(seed=5)
    resumed = module_for(mb.ModelBatch([other_init.model(i) for i in range(N)], seeds=9))
    tr_resumed = trainer(2)
    tr_resumed.fit(resumed, *loaders(shuffle=False), ckpt_path=path)

    torch.testing.assert_close(states(resumed.batch), states(full.batch), **EXACT)
    a, b = tr_resumed.optimizers[0].state_dict(), tr_full.optimizers[0].state_dict()
    torch.testing.assert_close(a["state"], b["state"], **EXACT)
    torch.testing.assert_close(a["steps"], b["steps"], **EXACT)
    assert a["param_groups"] == b["param_groups"]  # the scheduler's lrs too
    assert resumed.history.epochs == 2
    for key in full.history.keys:
        torch.testing.assert_close(resumed.history.metric(key), full.history.metric(key), **EXACT)

    other = ModelBatchModule(mb.ModelBatch([make_batch().model(0)] * 2), F.cross_entropy)
    with pytest.raises(ValueError, match="holds 4 models, this ModelBatchModule has 2"):
        other.on_load_checkpoint(ckpt)


def test_bad_inputs_raise():
    batch = make_batch()
    loss = F.cross_entropy
    with pytest.raises(ValueError, match="takes a ModelBatch, got Sequential"):
        ModelBatchModule(batch.model(0), loss)
    with pytest.raises(ValueError, match="loss_fn must be callable"):
        ModelBatchModule(batch, "cross_entropy")
    with pytest.raises(ValueError, match="unknown optimizer 'lbfgs'"):
        ModelBatchModule(batch, loss, "lbfgs")
    with pytest.raises(ValueError, match="needs a 'name'"):
        ModelBatchModule(batch, loss, {"lr": 0.1})
    with pytest.raises(ValueError, match="not both"):
        ModelBatchModule(batch, loss, {"name": "sgd"}, optimizer_kwargs={"lr": 0.1})
    with pytest.raises(ValueError, match="a callable optimizer sets its own"):
        ModelBatchModule(batch, loss, lambda b: mb.optim.SGD(b), optimizer_kwargs={"lr": 1})
    with pytest.raises(ValueError, match="scheduler_interval must be one of"):
        ModelBatchModule(batch, loss, scheduler_interval="batch")
    with pytest.raises(ValueError, match=r"per_model: indices \[4\] out of range"):
        ModelBatchModule(batch, loss, per_model=[0, 4])
    with pytest.raises(ValueError, match="max_grad_norm: expected a scalar or 4 values"):
        ModelBatchModule(batch, loss, max_grad_norm=[1.0, 2.0])
    with pytest.raises(ValueError, match="max_grad_norm must be > 0"):
        ModelBatchModule(batch, loss, max_grad_norm=0.0)

    # Checked once Lightning asks for them.
    module = ModelBatchModule(batch, loss, "sgd", optimizer_kwargs={"lr": 0.1, "betas": 1})
    with pytest.raises(ValueError, match="SGD: bad optimizer_kwargs"):
        module.configure_optimizers()
    module = ModelBatchModule(batch, loss, lambda b: torch.optim.SGD(b.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="must be a modelbatch fused optimizer"):
        module.configure_optimizers()
    module = ModelBatchModule(batch, loss, lambda b: mb.optim.SGD(make_batch()))
    with pytest.raises(ValueError, match="over another ModelBatch"):
        module.configure_optimizers()
    module = ModelBatchModule(
        batch, loss, scheduler=lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o)
    )
    with pytest.raises(ValueError, match="ReduceLROnPlateau watches one scalar"):
        module.configure_optimizers()

    train, val = loaders()
    module = ModelBatchModule(batch, loss, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="max_grad_norm on the ModelBatchModule or"):
        trainer(1, gradient_clip_val=1.0).fit(module, train, val)
    x, y = train.dataset.tensors
    routed = DataLoader(TensorDataset(x, y, torch.arange(len(y))), batch_size=16)
    with pytest.raises(ValueError, match=r"takes loader items \(inputs, targets\)"):
        trainer(1).fit(ModelBatchModule(batch, loss), routed, val)


def test_missing_lightning_names_the_extra(monkeypatch):
    monkeypatch.delitem(sys.modules, "modelbatch.integrations.lightning")
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)  # `import` fails
    with pytest.raises(ImportError, match=r"pip install 'modelbatch\[lightning\]'"):
        importlib.import_module("modelbatch.integrations.lightning")


def test_example_runs(capsys):
    path = Path(__file__).resolve().parents[1] / "examples" / "lightning_fit.py"
    spec = importlib.util.spec_from_file_location("lightning_fit_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(["--epochs", "1"])
    assert len(result["val_loss"]) == 4 and all(math.isfinite(v) for v in result["val_loss"])
    assert isinstance(result["model"], nn.Sequential)
    assert f"best: model {result['best']}" in capsys.readouterr().out
