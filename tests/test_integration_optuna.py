"""modelbatch.integrations.optuna against the real Optuna: batched ask-and-tell.

Data: scikit-learn's digits, a fixed stratified 75/25 split, standardised; five
epochs of mini-batches of 256 rows in a fixed order (no shuffling), so every run
of the same models sees the same batches and results can be compared exactly.
"""

import pytest

optuna = pytest.importorskip(
    "optuna", reason="needs the [optuna] extra: pip install 'modelbatch[optuna]'"
)

import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import modelbatch as mb  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _models import digits_batches  # noqa: E402
from modelbatch.integrations.optuna import FitTrainer, ModelBatchStudy, build_seeded  # noqa: E402
from torch import nn  # noqa: E402

TrialState = optuna.trial.TrialState
EPOCHS = 5


@pytest.fixture(autouse=True)
def _quiet_optuna():
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    yield
    optuna.logging.set_verbosity(level)


@pytest.fixture(scope="module")
def digits():
    return digits_batches(batch_size=256)


def build(config):
    hidden = config.get("hidden", 32)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def trainer(digits, **kwargs):
    return FitTrainer(
        digits["train"], F.cross_entropy, epochs=EPOCHS, val_loader=digits["val"],
        metrics=("loss",), **kwargs,
    )  # fmt: skip


def plain_fit(digits, configs, seed=0):
    """The plain ModelBatch loop: the configs' models (built after
    ``torch.manual_seed(seed)``) as one ModelBatch, AdamW with their lr / weight decay."""
    models = [build_seeded(build, c, seed) for c in configs]
    batch = mb.ModelBatch(models, seeds=[seed] * len(configs))
    opt = mb.optim.AdamW(
        batch,
        lr=[c["lr"] for c in configs],
        weight_decay=[c.get("weight_decay", 0.01) for c in configs],
    )
    return mb.fit(
        batch, opt, digits["train"], F.cross_entropy, epochs=EPOCHS,
        val_loader=digits["val"], metrics=("loss",), progress=False,
    )  # fmt: skip


def suggest_lr(trial):
    return {"lr": trial.suggest_float("lr", 1e-4, 1.0, log=True)}


# ----------------------------------------------------------------- acceptance
@pytest.mark.parametrize(
    "sampler",
    [
        pytest.param(lambda: optuna.samplers.TPESampler(seed=0), id="tpe"),
        pytest.param(lambda: optuna.samplers.RandomSampler(seed=0), id="random"),
    ],
)
def test_two_rounds_find_lr_within_2x_of_grid_best(digits, sampler):
    # The reference: a 32-point log grid over the same range, one ModelBatch, the
    # same model seed, epochs and batches.
    grid = np.logspace(-4, 0, 32).tolist()
    grid_loss = plain_fit(digits, [{"lr": lr} for lr in grid]).last("val_loss")
    grid_best = grid[int(grid_loss.argmin())]

    study = optuna.create_study(direction="minimize", sampler=sampler())
    search = ModelBatchStudy(study, build, trainer(digits), suggest=suggest_lr)
    frozen = search.optimize(32, batch_size=16)

    assert len(frozen) == len(study.trials) == 32
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    # Two rounds, each one ModelBatch of 16 (one architecture).
    assert [t.user_attrs["modelbatch_models"] for t in study.trials] == [16] * 32
    best_lr = study.best_params["lr"]
    ratio = best_lr / grid_best
    assert 0.5 <= ratio <= 2.0, (best_lr, grid_best, study.best_value, grid_loss.min().item())
    # The study's best is as good as the grid's best, up to the grid's spacing.
    assert study.best_value <= grid_loss.min().item() * 1.1


# ---------------------------------------------------------------- equivalence
def test_told_values_equal_the_plain_loop(digits):
    def suggest(trial):
        return {
            "lr": trial.suggest_float("lr", 1e-3, 1e-1, log=True),
            "weight_decay": trial.suggest_float("weight_decay", 1e-4, 1e-1, log=True),
            "hidden": trial.suggest_categorical("hidden", [16, 32]),
        }

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    search = ModelBatchStudy(study, build, trainer(digits), suggest=suggest)
    frozen = search.optimize(12, batch_size=12)

    seen = 0
    for hidden in (16, 32):
        trials = [t for t in frozen if t.params["hidden"] == hidden]
        assert trials, "the seeded sampler draws both widths"
        # One ModelBatch per architecture, holding exactly that group.
        assert {t.user_attrs["modelbatch_models"] for t in trials} == {len(trials)}
        configs = [t.params for t in trials]
        history = plain_fit(digits, configs)
        # The same models, order, hyper-parameters and batches: the same
        # computation, so the told values are the plain loop's bit for bit.
        assert [t.value for t in trials] == history.last("val_loss").tolist()
        # Each model alone (N=1): the same arithmetic per model up to the blocking
        # of the batched GEMMs, which changes with N (observed: most equal, a few
        # off by ~5e-7 relative).
        for t in trials:
            alone = plain_fit(digits, [t.params]).last("val_loss").item()
            assert math.isclose(t.value, alone, rel_tol=1e-5), (t.value, alone)
        seen += len(trials)
    assert seen == 12


def test_group_by_names_the_architecture(digits):
    def suggest(trial):
        return {
            "lr": trial.suggest_float("lr", 1e-3, 1e-1, log=True),
            "hidden": trial.suggest_categorical("hidden", [16, 32]),
        }

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    search = ModelBatchStudy(study, build, trainer(digits), suggest=suggest, group_by=("hidden",))
    frozen = search.optimize(8, batch_size=8)
    sizes = {h: sum(t.params["hidden"] == h for t in frozen) for h in (16, 32)}
    assert all(t.user_attrs["modelbatch_models"] == sizes[t.params["hidden"]] for t in frozen)

    # group_by=() puts both widths in one group: the ModelBatch refuses, and says why.
    lumped = ModelBatchStudy(
        optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1)),
        build, trainer(digits), suggest=suggest, group_by=(),
    )  # fmt: skip
    with pytest.raises(ValueError, match="add the parameter that changes the architecture"):
        lumped.optimize(8, batch_size=8)
    # The round's trials were failed, not left RUNNING in the storage.
    assert {t.state for t in lumped.study.trials} == {TrialState.FAIL}


def test_pruned_models_stop_alone_and_the_others_are_unchanged(digits):
    lrs = [1e-4, 1e-2, 2e-4, 2e-2]
    study = optuna.create_study(
        sampler=optuna.samplers.GridSampler({"lr": lrs}, seed=0),
        pruner=optuna.pruners.ThresholdPruner(upper=2.0, n_warmup_steps=1),
    )
    search = ModelBatchStudy(study, build, trainer(digits), suggest=suggest_lr, prune=True)
    frozen = search.optimize(4, batch_size=4)

    history = plain_fit(digits, [t.params for t in frozen])  # nobody stopped
    val = history.metric("val_loss")  # [epochs, 4]
    for i, t in enumerate(frozen):
        reported = [t.intermediate_values[s] for s in sorted(t.intermediate_values)]
        if t.params["lr"] < 1e-3:  # slow: val loss above 2.0 at epoch 1
            assert t.state == TrialState.PRUNED
            assert sorted(t.intermediate_values) == [0, 1]  # stopped after epoch 1
            assert t.value == reported[-1]
        else:
            assert t.state == TrialState.COMPLETE
            # Stopping the other models changed nothing in this one, every epoch.
            assert reported == val[:, i].tolist()
            assert t.value == val[-1, i].item()
        assert reported == val[: len(reported), i].tolist()
    # The grid is done: each point once.
    assert sorted(t.params["lr"] for t in frozen) == sorted(lrs)


# -------------------------------------------------------- results and failures
def _linear(config):
    return nn.Linear(2, 1)


def test_nonfinite_values_fail_their_trial_only():
    def values(batch, configs, callbacks):
        return torch.tensor([math.nan if c["k"] == 1 else float(c["k"]) for c in configs])

    def suggest(trial):
        return {"k": trial.suggest_int("k", 0, 3)}

    study = optuna.create_study(sampler=optuna.samplers.GridSampler({"k": [0, 1, 2, 3]}))
    # The grid sampler calls study.stop() once its 4 points are taken: the run ends
    # after that round instead of asking for 4 more.
    frozen = ModelBatchStudy(study, _linear, values, suggest=suggest).optimize(8, batch_size=4)
    assert len(frozen) == len(study.trials) == 4
    by_k = {t.params["k"]: t for t in frozen}
    assert by_k[1].state == TrialState.FAIL
    assert "nan" in by_k[1].user_attrs["modelbatch_fail_reason"]
    assert {k: by_k[k].value for k in (0, 2, 3)} == {0: 0.0, 2: 2.0, 3: 3.0}


def test_exceptions_fail_the_group():
    def boom(batch, configs, callbacks):
        raise RuntimeError("boom")

    study = optuna.create_study()
    search = ModelBatchStudy(study, _linear, boom, suggest=suggest_lr)
    frozen = search.optimize(6, batch_size=3, catch=RuntimeError)  # goes on after a failure
    assert len(frozen) == 6
    assert all(t.state == TrialState.FAIL for t in study.trials)
    assert "boom" in study.trials[0].user_attrs["modelbatch_fail_reason"]

    study = optuna.create_study()
    with pytest.raises(RuntimeError, match="boom"):
        ModelBatchStudy(study, _linear, boom, suggest=suggest_lr).optimize(6, batch_size=3)
    assert [t.state for t in study.trials] == [TrialState.FAIL] * 3  # none left RUNNING


def test_suggest_can_prune():
    def suggest(trial):
        x = trial.suggest_int("x", 0, 3)
        if x == 2:
            raise optuna.TrialPruned()
        return {"x": x}

    study = optuna.create_study(sampler=optuna.samplers.GridSampler({"x": [0, 1, 2, 3]}))
    search = ModelBatchStudy(study, _linear, lambda b, c, cb: [0.0] * len(c), suggest=suggest)
    frozen = search.optimize(4, batch_size=4)
    states = {t.params["x"]: t.state for t in frozen}
    assert states == {
        0: TrialState.COMPLETE, 1: TrialState.COMPLETE, 2: TrialState.PRUNED, 3: TrialState.COMPLETE
    }  # fmt: skip


# ------------------------------------------------------------------ storage
WORKER = """
import sys, torch, optuna
import torch.nn.functional as F
from torch import nn

from modelbatch.integrations.optuna import FitTrainer, ModelBatchStudy

optuna.logging.set_verbosity(optuna.logging.WARNING)
url, worker = sys.argv[1], int(sys.argv[2])
g = torch.Generator().manual_seed(0)
x = torch.randn(128, 8, generator=g)
y = (x[:, 0] > 0).long()

def suggest(trial):
    trial.set_user_attr("worker", worker)
    return {"lr": trial.suggest_float("lr", 1e-3, 1e-1, log=True)}

study = optuna.load_study(study_name="shared", storage=url)
train = FitTrainer([(x, y)], F.cross_entropy, epochs=3, val_loader=[(x, y)], metrics=("loss",))
build = lambda cfg: nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
done = ModelBatchStudy(study, build, train, suggest=suggest).optimize(8, batch_size=4)
print(len(done))
"""


def test_two_workers_share_one_sqlite_study(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    optuna.create_study(
        study_name="shared", storage=url, sampler=optuna.samplers.TPESampler(seed=0)
    )
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    # Two processes at once, as two machines would: they ask and tell concurrently.
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), url, str(w)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in (0, 1)
    ]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
        assert out.strip() == "8"

    study = optuna.load_study(study_name="shared", storage=url)
    trials = study.trials
    assert len(trials) == 16
    assert sorted(t.number for t in trials) == list(range(16))
    assert all(t.state == TrialState.COMPLETE and math.isfinite(t.value) for t in trials)
    assert sorted(t.user_attrs["worker"] for t in trials) == [0] * 8 + [1] * 8
    assert {t.user_attrs["modelbatch_models"] for t in trials} == {4}


# ---------------------------------------------------------------- bad input
def test_bad_input():
    study = optuna.create_study()
    ok = dict(suggest=suggest_lr)
    with pytest.raises(ValueError, match=r"must be an optuna\.Study"):
        ModelBatchStudy("study", _linear, lambda *a: None, **ok)
    with pytest.raises(ValueError, match="single-objective"):
        ModelBatchStudy(
            optuna.create_study(directions=["minimize", "maximize"]),
            _linear, lambda *a: None, **ok,
        )  # fmt: skip
    with pytest.raises(ValueError, match="suggest must be callable"):
        ModelBatchStudy(study, _linear, lambda *a: None, suggest={"lr": 0.1})
    with pytest.raises(ValueError, match="seed must be an int"):
        ModelBatchStudy(study, _linear, lambda *a: None, seed=1.5, **ok)
    search = ModelBatchStudy(study, _linear, lambda b, c, cb: [0.0] * len(c), **ok)
    with pytest.raises(ValueError, match="n_trials must be an int >= 1"):
        search.optimize(0, batch_size=4)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        search.optimize(4, batch_size=0)
    assert study.trials == []

    def run(train_fn, suggest=suggest_lr, **kwargs):
        s = optuna.create_study()
        ModelBatchStudy(s, _linear, train_fn, suggest=suggest, **kwargs).optimize(2, batch_size=2)
        return s

    with pytest.raises(ValueError, match="suggest must return a dict"):
        run(lambda b, c, cb: [0.0, 0.0], suggest=lambda t: 0.1)
    with pytest.raises(ValueError, match="group_by keys \\['width'\\] are not in"):
        run(lambda b, c, cb: [0.0, 0.0], group_by=("width",))
    with pytest.raises(ValueError, match="expected one value per model \\[N=2\\]"):
        run(lambda b, c, cb: [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="without 'val_loss'"):
        run(lambda b, c, cb: {"loss": [0.0, 0.0]})
    with pytest.raises(ValueError, match=r"build_model must return an nn\.Module"):
        ModelBatchStudy(optuna.create_study(), lambda c: "model", lambda *a: None, **ok).optimize(
            1, batch_size=1
        )

    x, y = torch.randn(4, 2), torch.zeros(4, 1)
    no_val = FitTrainer([(x, y)], F.mse_loss, epochs=1, metrics=None)
    with pytest.raises(ValueError, match="has no column 'val_loss'"):
        run(lambda b, c, cb: no_val(b, c))
    with pytest.raises(ValueError, match="pruning needs 'val_loss'"):
        run(lambda b, c, cb: no_val(b, c, cb), prune=True)
    with pytest.raises(ValueError, match="epochs must be an int >= 1"):
        FitTrainer([(x, y)], F.mse_loss, epochs=0)
    with pytest.raises(ValueError, match=r"optimizer_cls must be a torch\.optim\.Optimizer"):
        FitTrainer([(x, y)], F.mse_loss, epochs=1, optimizer_cls="adam")
    with pytest.raises(ValueError, match="config 0 has no hyper-parameter \\['momentum'\\]"):
        FitTrainer([(x, y)], F.mse_loss, epochs=1, hparams=("lr", "momentum")).optimizer_configs(
            [{"lr": 0.1}]
        )


# ------------------------------------------------------------------ example
def test_example_runs(tmp_path):
    pytest.importorskip("sklearn")
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "optuna_digits.py"
    spec = importlib.util.spec_from_file_location("optuna_digits", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--storage", f"sqlite:///{tmp_path / 'ex.db'}"])
    assert result["n_trials"] == 32
    assert 0.5 <= result["best_lr"] / result["grid_best_lr"] <= 2.0
