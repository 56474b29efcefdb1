"""Hyper-parameter sweep on scikit-learn's digits: 256 MLPs trained as one ModelBatch.

The grid is learning rate x weight decay x seed (8 x 4 x 8 = 256 models). Every
model is an ordinary ``nn.Module`` built after ``torch.manual_seed(its seed)``;
``modelbatch.ModelBatch`` stacks them and ``modelbatch.optim.AdamW`` gives each its
own learning rate and weight decay. All models see the same mini-batches.

Outputs (under ``--out``, default ``examples/output/``):

* ``results.csv``: one row per model (config, final validation accuracy and loss);
* ``val_acc_vs_lr.png``: validation accuracy against learning rate, one line per
  weight decay (mean over seeds, band from min to max);
* ``best_model.pt``: the ``state_dict`` of the best model, exported as a plain module.

Run ``python examples/sweep_digits.py`` (about half a minute on 2 CPU cores) or
``--quick`` for a tiny run (32 models, 3 epochs).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import modelbatch
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from tqdm import tqdm

DEFAULT_OUT = Path(__file__).resolve().parent / "output"

# The full grid: 8 learning rates x 4 weight decays x 8 seeds = 256 models.
FULL_LRS = np.logspace(-4, np.log10(3e-2), 8).tolist()
FULL_WDS = [0.0, 1e-3, 1e-2, 1e-1]
FULL_SEEDS = 8
# --quick: 4 x 2 x 4 = 32 models.
QUICK_LRS = np.logspace(-3, np.log10(3e-2), 4).tolist()
QUICK_WDS = [0.0, 1e-2]
QUICK_SEEDS = 4


class MLP(nn.Module):
    """64 -> hidden -> hidden -> 10 with ReLU."""

    def __init__(self, n_in: int = 64, hidden: int = 64, n_out: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(n_in, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, n_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# ------------------------------------------------------------------------ data
def load_data(seed: int, val_size: float = 0.25) -> dict[str, torch.Tensor]:
    """Stratified train/val split of digits, standardised with the train statistics."""
    x, y = load_digits(return_X_y=True)
    x_tr, x_va, y_tr, y_va = train_test_split(
        x, y, test_size=val_size, stratify=y, random_state=seed
    )
    mean = x_tr.mean(axis=0)
    std = x_tr.std(axis=0)
    std[std == 0] = 1.0  # pixels that are constant (0) on the train split
    return {
        "x_train": torch.tensor((x_tr - mean) / std, dtype=torch.float32),
        "y_train": torch.tensor(y_tr, dtype=torch.long),
        "x_val": torch.tensor((x_va - mean) / std, dtype=torch.float32),
        "y_val": torch.tensor(y_va, dtype=torch.long),
    }


# ---------------------------------------------------------------------- models
def make_grid(
    lrs: Sequence[float], wds: Sequence[float], seeds: Sequence[int]
) -> list[dict[str, Any]]:
    """One config per model: every (lr, weight decay, seed) combination."""
    return [
        {"lr": float(lr), "weight_decay": float(wd), "seed": int(s)}
        for lr, wd, s in itertools.product(lrs, wds, seeds)
    ]


def build_models(configs: Sequence[dict[str, Any]], hidden: int) -> list[MLP]:
    models = []
    for cfg in configs:
        torch.manual_seed(cfg["seed"])
        models.append(MLP(hidden=hidden))
    return models


@torch.no_grad()
def evaluate(
    batch: modelbatch.ModelBatch, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-model ``[N]`` accuracy and loss of every model on (x, y)."""
    was_training = batch.training
    batch.eval()
    out = batch(x)  # [N, B, 10]
    losses = batch.compute_loss(out, y, F.cross_entropy, reduction="none")
    acc = (out.argmax(dim=-1) == y).float().mean(dim=1)
    batch.train(was_training)
    return acc, losses


def train(
    batch: modelbatch.ModelBatch,
    optimizer: torch.optim.Optimizer,
    data: dict[str, torch.Tensor],
    epochs: int,
    batch_size: int,
    seed: int,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Train all models on shared mini-batches; evaluate them on val every epoch.

    Returns ``[epochs, N]`` histories of train loss, val accuracy and val loss.
    """
    x, y = data["x_train"], data["y_train"]
    n_train = x.shape[0]
    gen = torch.Generator().manual_seed(seed)
    hist: dict[str, list[torch.Tensor]] = {"train_loss": [], "val_acc": [], "val_loss": []}
    bar = tqdm(range(1, epochs + 1), desc="epochs", unit="epoch", disable=not progress)
    for epoch in bar:
        batch.train()
        perm = torch.randperm(n_train, generator=gen)
        epoch_loss = torch.zeros(batch.num_models)
        for start in range(0, n_train, batch_size):
            idx = perm[start : start + batch_size]
            xb, yb = x[idx], y[idx]
            optimizer.zero_grad()
            out = batch(xb)
            # "sum": model i's gradient is that of its own mean loss over the batch.
            loss = batch.compute_loss(out, yb, F.cross_entropy, reduction="sum")
            loss.backward()
            optimizer.step()
            epoch_loss += batch.latest_losses * len(idx)
        epoch_loss /= n_train
        val_acc, val_loss = evaluate(batch, data["x_val"], data["y_val"])
        hist["train_loss"].append(epoch_loss)
        hist["val_acc"].append(val_acc)
        hist["val_loss"].append(val_loss)
        bar.set_postfix(
            epoch=epoch,
            best_loss=f"{epoch_loss.min().item():.4f}",
            median_loss=f"{epoch_loss.median().item():.4f}",
            best_val_acc=f"{val_acc.max().item():.4f}",
        )
    bar.close()
    return {k: torch.stack(v) for k, v in hist.items()}


# --------------------------------------------------------------------- reports
def rank(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best first: highest val accuracy, ties broken by lower val loss."""
    return sorted(results, key=lambda r: (-r["val_acc"], r["val_loss"]))


def print_top(ranked: list[dict[str, Any]], k: int = 10) -> None:
    print(f"\nTop {min(k, len(ranked))} configurations (final epoch, validation split)")
    header = f"{'rank':>4}  {'model':>5}  {'lr':>9}  {'weight_decay':>12}  {'seed':>4}  "
    header += f"{'val_acc':>7}  {'val_loss':>8}"
    print(header)
    print("-" * len(header))
    for r, row in enumerate(ranked[:k], start=1):
        print(
            f"{r:>4}  {row['model']:>5}  {row['lr']:>9.2e}  {row['weight_decay']:>12.1e}  "
            f"{row['seed']:>4}  {row['val_acc']:>7.4f}  {row['val_loss']:>8.4f}"
        )


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Aggregate over seeds: one row per (lr, weight decay)."""
    groups: dict[tuple[float, float], list[dict[str, Any]]] = {}
    for row in results:
        groups.setdefault((row["lr"], row["weight_decay"]), []).append(row)
    summary = []
    for (lr, wd), rows in sorted(groups.items()):
        acc = np.array([r["val_acc"] for r in rows])
        loss = np.array([r["val_loss"] for r in rows])
        summary.append(
            {
                "lr": lr,
                "weight_decay": wd,
                "n_seeds": len(rows),
                "acc_mean": float(acc.mean()),
                "acc_std": float(acc.std()),
                "acc_min": float(acc.min()),
                "acc_max": float(acc.max()),
                "loss_mean": float(loss.mean()),
            }
        )
    return summary


def print_summary(summary: list[dict[str, Any]]) -> None:
    print("\nPer (lr, weight decay), over seeds")
    header = f"{'lr':>9}  {'weight_decay':>12}  {'seeds':>5}  {'val_acc mean +- std':>19}  "
    header += f"{'min':>6}  {'max':>6}  {'val_loss':>8}"
    print(header)
    print("-" * len(header))
    for s in summary:
        acc = f"{s['acc_mean']:.4f} +- {s['acc_std']:.4f}"
        print(
            f"{s['lr']:>9.2e}  {s['weight_decay']:>12.1e}  {s['n_seeds']:>5}  {acc:>19}  "
            f"{s['acc_min']:>6.4f}  {s['acc_max']:>6.4f}  {s['loss_mean']:>8.4f}"
        )


def write_csv(results: list[dict[str, Any]], path: Path) -> None:
    fields = ["model", "lr", "weight_decay", "seed", "val_acc", "val_loss", "train_loss"]
    fields += ["best_epoch_val_acc", "best_epoch"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in results:
            writer.writerow({k: row[k] for k in fields})


def plot(summary: list[dict[str, Any]], path: Path, epochs: int, n_models: int) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    wds = sorted({s["weight_decay"] for s in summary})
    for wd in wds:
        rows = sorted((s for s in summary if s["weight_decay"] == wd), key=lambda s: s["lr"])
        lr = [s["lr"] for s in rows]
        line = ax.plot(lr, [s["acc_mean"] for s in rows], marker="o", label=f"wd = {wd:g}")[0]
        ax.fill_between(
            lr,
            [s["acc_min"] for s in rows],
            [s["acc_max"] for s in rows],
            color=line.get_color(),
            alpha=0.2,
        )
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("validation accuracy")
    ax.set_title(f"digits, {n_models} MLPs, AdamW, {epochs} epochs (mean over seeds, min..max)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(title="weight decay")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------- export
@torch.no_grad()
def export_best(
    batch: modelbatch.ModelBatch,
    index: int,
    batched_acc: float,
    data: dict[str, torch.Tensor],
    path: Path,
    hidden: int,
) -> float:
    """Save model ``index`` as a plain state_dict, reload it, check its val accuracy."""
    best = batch.model(index)
    assert type(best) is MLP
    torch.save(best.state_dict(), path)
    fresh = MLP(hidden=hidden)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    fresh.eval()
    x, y = data["x_val"], data["y_val"]
    acc = (fresh(x).argmax(dim=-1) == y).float().mean().item()
    batch.eval()
    max_diff = (fresh(x) - batch(x)[index]).abs().max().item()
    ok = acc == batched_acc
    print(
        f"\nExported model {index} to {path}: reloaded plain MLP val acc {acc:.4f}, "
        f"batched {batched_acc:.4f} -> {'match' if ok else 'MISMATCH'} "
        f"(max |logit diff| {max_diff:.2e})"
    )
    assert ok, f"reloaded model has val acc {acc}, the batched model {index} {batched_acc}"
    return acc


# ------------------------------------------------------------------------ main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=None, help="default 30 (3 with --quick)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    p.add_argument("--quick", action="store_true", help="tiny run: 32 models, 3 epochs")
    p.add_argument("--seed", type=int, default=0, help="split/shuffle seed; model seeds start here")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = p.parse_args(argv)
    if args.epochs is None:
        args.epochs = 3 if args.quick else 30
    if args.epochs < 1:
        p.error("--epochs must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t0 = time.perf_counter()
    out_dir = Path(args.out)
    os.makedirs(out_dir, exist_ok=True)

    lrs, wds, n_seeds = (
        (QUICK_LRS, QUICK_WDS, QUICK_SEEDS) if args.quick else (FULL_LRS, FULL_WDS, FULL_SEEDS)
    )
    seeds = [args.seed + k for k in range(n_seeds)]
    configs = make_grid(lrs, wds, seeds)
    data = load_data(args.seed)

    batch = modelbatch.ModelBatch(
        build_models(configs, args.hidden), seeds=[c["seed"] for c in configs]
    )
    optimizer = modelbatch.optim.AdamW(
        batch,
        lr=[c["lr"] for c in configs],
        weight_decay=[c["weight_decay"] for c in configs],
    )
    n = batch.num_models
    print(
        f"digits: {len(data['y_train'])} train / {len(data['y_val'])} val samples; "
        f"{n} models = {len(lrs)} lr x {len(wds)} weight decay x {n_seeds} seeds; "
        f"{args.epochs} epochs, batch size {args.batch_size}"
    )

    hist = train(
        batch,
        optimizer,
        data,
        args.epochs,
        args.batch_size,
        args.seed,
        progress=not args.no_progress,
    )
    train_time = time.perf_counter() - t0

    best_epoch_acc, best_epoch = hist["val_acc"].max(dim=0)
    results = [
        {
            "model": i,
            **cfg,
            "val_acc": hist["val_acc"][-1, i].item(),
            "val_loss": hist["val_loss"][-1, i].item(),
            "train_loss": hist["train_loss"][-1, i].item(),
            "best_epoch_val_acc": best_epoch_acc[i].item(),
            "best_epoch": best_epoch[i].item() + 1,
        }
        for i, cfg in enumerate(configs)
    ]
    ranked = rank(results)
    summary = summarize(results)
    print_top(ranked)
    print_summary(summary)

    csv_path = out_dir / "results.csv"
    plot_path = out_dir / "val_acc_vs_lr.png"
    model_path = out_dir / "best_model.pt"
    write_csv(results, csv_path)
    plot(summary, plot_path, args.epochs, n)

    best = ranked[0]
    reloaded_acc = export_best(batch, best["model"], best["val_acc"], data, model_path, args.hidden)
    best_group = max(summary, key=lambda s: (s["acc_mean"], -s["loss_mean"]))
    elapsed = time.perf_counter() - t0
    print(
        f"\nBest model: #{best['model']} lr={best['lr']:.2e} weight_decay={best['weight_decay']:g} "
        f"seed={best['seed']}: val acc {best['val_acc']:.4f}, val loss {best['val_loss']:.4f}"
    )
    print(
        f"Best (lr, weight decay) over seeds: lr={best_group['lr']:.2e} "
        f"weight_decay={best_group['weight_decay']:g}: "
        f"{best_group['acc_mean']:.4f} +- {best_group['acc_std']:.4f}"
    )
    print(
        f"Wrote {csv_path}, {plot_path}, {model_path} "
        f"({elapsed:.1f} s, training {train_time:.1f} s)"
    )
    return {
        "num_models": n,
        "epochs": args.epochs,
        "best": best,
        "best_val_acc": best["val_acc"],
        "best_group": best_group,
        "reloaded_val_acc": reloaded_acc,
        "results": results,
        "summary": summary,
        "csv": csv_path,
        "plot": plot_path,
        "model": model_path,
        "seconds": elapsed,
    }


if __name__ == "__main__":
    main()
