"""Four MLPs with four learning rates, trained as one ModelBatch by a Lightning Trainer.

The data is scikit-learn's digits (8x8 images, 10 classes; random blobs if
scikit-learn is missing), standardised, 75/25 split. ``ModelBatchModule`` runs each
step as one vectorised forward and backward for the 4 models and one fused AdamW
kernel that gives each model its own learning rate; per-model clipping and
per-model metrics (``val_loss_model_{i}``, ``val_loss_best``, ...) are built in.

Run ``python examples/lightning_fit.py`` (a few seconds on CPU; ``--epochs``,
``--out`` for a CSV log). Needs ``pip install 'modelbatch[lightning]'``.
"""

from __future__ import annotations

import argparse
import warnings
from typing import Any

import lightning
import modelbatch as mb
import torch
import torch.nn.functional as F
from modelbatch.integrations.lightning import ModelBatchModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

LRS = [1e-4, 1e-3, 1e-2, 1e-1]


def load_data(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """(train, val) of inputs ``[B, 64]`` float32 and labels ``[B]`` int64."""
    try:
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    except ImportError:
        g = torch.Generator().manual_seed(seed)
        centers = 3 * torch.randn(10, 64, generator=g)
        y = torch.randint(0, 10, (1797,), generator=g)
        x = centers[y] + torch.randn(len(y), 64, generator=g)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_train = int(0.75 * len(y))
    mean, std = x[:n_train].mean(0), x[:n_train].std(0).clamp(min=1e-6)
    x = (x - mean) / std
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--out", default=None, help="directory for a Lightning CSV log")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    models = [
        nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)) for _ in range(len(LRS))
    ]
    batch = mb.ModelBatch(models, seeds=0)
    module = ModelBatchModule(
        batch,
        F.cross_entropy,
        {"name": "adamw", "lr": LRS, "weight_decay": 1e-2},  # one lr per model
        max_grad_norm=1.0,  # each model clipped by its own gradient norm
    )
    train, val = load_data()
    logger = False
    if args.out:
        logger = lightning.pytorch.loggers.CSVLogger(args.out, name="lightning_fit")
    trainer = lightning.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*LeafSpec.*")  # Lightning 2.6 on torch 2.13
        trainer.fit(
            module,
            DataLoader(train, batch_size=64, shuffle=True),
            DataLoader(val, batch_size=256),
        )

    val_loss = module.history.last("val_loss")
    val_acc = module.history.last("val_accuracy")
    print(f"{'model':>5}  {'lr':>8}  {'val_loss':>8}  {'val_acc':>7}")
    for i, lr in enumerate(LRS):
        print(f"{i:>5}  {lr:>8.0e}  {val_loss[i].item():>8.4f}  {val_acc[i].item():>7.4f}")
    best = module.best_model("val_loss")
    winner = module.export_model(best)  # a plain nn.Sequential with model `best`'s weights
    print(f"best: model {best} (lr {LRS[best]:g}), exported as a {type(winner).__name__}")
    return {"val_loss": val_loss.tolist(), "best": best, "model": winner}


if __name__ == "__main__":
    main()
