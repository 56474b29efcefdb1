"""Find a learning rate on scikit-learn's digits with Optuna, 16 trials at a time.

``modelbatch.integrations.optuna.ModelBatchStudy`` asks a TPE study for 16 trials,
trains their 16 MLPs (64 -> 32 -> 10) as one ModelBatch with one learning rate
per model (AdamW, 5 epochs of mini-batches of 256), tells the study the 16
validation losses, and asks again: 2 rounds, 32 trials. For comparison it then
trains a 32-point log grid over the same range as one ModelBatch, from the same
initial weights, and prints how far the study's learning rate is from the grid's.

Run ``python examples/optuna_digits.py`` (a few seconds on 2 CPU cores). With
``--storage sqlite:///study.db`` the study lives in a database, and more workers
can join it by running this script with the same ``--storage`` and
``--study-name`` at the same time (on this or another machine).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import modelbatch
import numpy as np
import optuna
import torch
import torch.nn.functional as F
from modelbatch.integrations.optuna import FitTrainer, ModelBatchStudy, build_seeded
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

LR_RANGE = (1e-4, 1.0)


def load_data(seed: int = 0, batch_size: int = 256) -> dict[str, list]:
    """Stratified 75/25 split, standardised with the train statistics; the train
    split as fixed mini-batches (the same order in every run)."""
    x, y = load_digits(return_X_y=True)
    x_tr, x_va, y_tr, y_va = train_test_split(x, y, test_size=0.25, stratify=y, random_state=seed)
    mean, std = x_tr.mean(axis=0), x_tr.std(axis=0)
    std[std == 0] = 1.0  # pixels that are always 0 on the train split
    x_tr = torch.tensor((x_tr - mean) / std, dtype=torch.float32)
    x_va = torch.tensor((x_va - mean) / std, dtype=torch.float32)
    y_tr, y_va = torch.tensor(y_tr), torch.tensor(y_va)
    train = [
        (x_tr[i : i + batch_size], y_tr[i : i + batch_size])
        for i in range(0, len(y_tr), batch_size)
    ]
    return {"train": train, "val": [(x_va, y_va)]}


def build_model(config: dict[str, Any]) -> nn.Module:
    hidden = config.get("hidden", 32)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def suggest(trial: optuna.Trial) -> dict[str, Any]:
    return {"lr": trial.suggest_float("lr", *LR_RANGE, log=True)}


def grid_best(trainer: FitTrainer, points: int, seed: int) -> tuple[float, float]:
    """The best learning rate of a ``points``-point log grid (one ModelBatch)."""
    lrs = np.logspace(np.log10(LR_RANGE[0]), np.log10(LR_RANGE[1]), points).tolist()
    configs = [{"lr": lr} for lr in lrs]
    batch = modelbatch.ModelBatch(
        [build_seeded(build_model, c, seed) for c in configs], seeds=[seed] * points
    )
    val_loss = trainer(batch, configs).last("val_loss")
    i = int(val_loss.argmin())
    return lrs[i], float(val_loss[i])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16, help="trials per round (one ModelBatch)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seed", type=int, default=0, help="sampler, split and model seed")
    p.add_argument("--storage", default=None, help="e.g. sqlite:///study.db (default: memory)")
    p.add_argument("--study-name", default="optuna_digits")
    p.add_argument("--grid", type=int, default=32, help="grid points to compare with (0: none)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t0 = time.perf_counter()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    data = load_data(args.seed)
    trainer = FitTrainer(
        data["train"], F.cross_entropy, epochs=args.epochs, val_loader=data["val"],
        metrics=("loss", "accuracy"),
    )  # fmt: skip
    study = optuna.create_study(
        study_name=args.study_name,
        storage=args.storage,
        load_if_exists=True,
        direction="minimize",
        sampler=optuna.samplers.TPESampler(seed=args.seed),
    )
    # One seed for every trial: the trials differ only in their learning rate.
    search = ModelBatchStudy(study, build_model, trainer, suggest=suggest, seed=args.seed)
    n_trials = args.rounds * args.batch_size
    trials = search.optimize(n_trials, batch_size=args.batch_size)
    search_time = time.perf_counter() - t0

    print(f"{'round':>5}  {'trial':>5}  {'lr':>9}  {'val_loss':>8}  state")
    for k, t in enumerate(trials):
        value = f"{t.value:8.4f}" if t.value is not None else f"{'-':>8}"
        r = k // args.batch_size + 1
        print(f"{r:>5}  {t.number:>5}  {t.params['lr']:>9.3e}  {value}  {t.state.name}")
    best = study.best_trial
    print(
        f"\nbest of {len(trials)} trials ({args.rounds} rounds of {args.batch_size}, "
        f"{search_time:.1f} s): lr={best.params['lr']:.3e}, val_loss={best.value:.4f}"
    )
    result: dict[str, Any] = {
        "n_trials": len(trials),
        "best_lr": best.params["lr"],
        "best_value": best.value,
        "seconds": search_time,
    }
    if args.grid:
        lr, loss = grid_best(trainer, args.grid, args.seed)
        print(
            f"best of a {args.grid}-point log grid: lr={lr:.3e}, val_loss={loss:.4f} "
            f"(study / grid lr: {best.params['lr'] / lr:.2f}x)"
        )
        result.update(grid_best_lr=lr, grid_best_value=loss)
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return result


if __name__ == "__main__":
    main()
