"""A population of 8 MLPs trained by ``modelbatch.fit``, logged to one offline W&B run.

Each model has its own learning rate (fused AdamW). ``WandbLogger`` records the
per-model hyper-parameters as config, every model's epoch metrics
(``model_{i}/val_loss``, ...), the population's best / median / worst, and a final
table with one row per model. Offline mode needs no account and no network; upload
later with ``wandb sync <run dir>``.

Run ``python examples/wandb_offline.py`` (a few seconds on CPU; ``--dir`` for where
the ``wandb/`` folder goes, default a temporary directory). Needs
``pip install 'modelbatch[wandb]'``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from typing import Any

import modelbatch as mb
import torch
import torch.nn.functional as F
from modelbatch.integrations.wandb import WandbLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

N = 8


def make_data(seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """A learnable 5-class rule on 20 features: inputs ``[B, 20]``, labels ``[B]``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(20, 5, generator=g)
    x, xv = torch.randn(1024, 20, generator=g), torch.randn(256, 20, generator=g)
    train = TensorDataset(x, (x @ w).argmax(1))
    val = TensorDataset(xv, (xv @ w).argmax(1))
    return DataLoader(train, batch_size=64, shuffle=True), DataLoader(val, batch_size=256)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where wandb/ goes (default: a temp dir)")
    args = parser.parse_args(argv)
    directory = args.dir or tempfile.mkdtemp(prefix="modelbatch-wandb-")
    os.environ.setdefault("WANDB_SILENT", "true")

    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 5)) for _ in range(N)]
    batch = mb.ModelBatch(models, seeds=0)
    lrs = torch.logspace(-4, -1, N)
    opt = mb.optim.AdamW(batch, lr=lrs, weight_decay=1e-2)
    train, val = make_data()
    logger = WandbLogger(
        project="modelbatch-example",
        name=f"adamw-{N}-lrs",
        config={"data": "synthetic 5-class"},
        log_every_n_steps=4,
        mode="offline",
        dir=directory,
    )
    history = mb.fit(
        batch, opt, train, F.cross_entropy, epochs=args.epochs, val_loader=val,
        callbacks=[logger], progress=False,
    )  # fmt: skip

    best = history.best_model("val_loss")
    print(
        f"best: model {best} (lr {lrs[best].item():.2e}), "
        f"val_loss {history.last('val_loss')[best].item():.4f}"
    )
    print(f"W&B offline run: {logger.run_dir}")
    print(f"upload with: wandb sync {logger.run_dir}")
    return {"run_dir": logger.run_dir, "history": history}


if __name__ == "__main__":
    main()
