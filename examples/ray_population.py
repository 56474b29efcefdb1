"""A population of 64 digits MLPs, sharded over Ray Tune workers: one ModelBatch per
worker.

The population is learning rate x weight decay x seed (8 x 4 x 2 = 64 configs).
``modelbatch.integrations.ray.tune_population`` splits it into ``--workers``
shards (32 models each by default); every shard is one Ray Tune trial that builds
its models, stacks them into ONE ModelBatch and trains it with
``modelbatch.fit`` (AdamW, one learning rate and weight decay per model) on the
CPU(s) Ray gives it, reporting every model's metrics each epoch. The result is one
row per config.

Locally (a Ray cluster of ``--workers`` CPUs on this machine, < 1 minute on 2
cores)::

    python examples/ray_population.py

On a cluster (see :mod:`modelbatch.integrations.ray`): ``ray start --head`` on one
node, ``ray start --address=<head-ip>:6379`` on the others, then on any node::

    python examples/ray_population.py --address auto --workers 16 --gpus-per-worker 1
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import ray
import torch
import torch.nn.functional as F
from modelbatch.integrations.ray import FitTrainer, tune_population
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

LRS = np.logspace(-4, np.log10(3e-2), 8).tolist()
WDS = [0.0, 1e-3, 1e-2, 1e-1]
SEEDS = [0, 1]


def load_data(seed: int = 0, batch_size: int = 128) -> dict[str, list]:
    """Stratified 75/25 split of digits, standardised with the train statistics; the
    train split as fixed, pre-shuffled mini-batches (the same in every shard)."""
    x, y = load_digits(return_X_y=True)
    x_tr, x_va, y_tr, y_va = train_test_split(x, y, test_size=0.25, stratify=y, random_state=seed)
    mean, std = x_tr.mean(axis=0), x_tr.std(axis=0)
    std[std == 0] = 1.0  # pixels that are always 0 on the train split
    x_tr = torch.tensor((x_tr - mean) / std, dtype=torch.float32)
    x_va = torch.tensor((x_va - mean) / std, dtype=torch.float32)
    y_tr, y_va = torch.tensor(y_tr), torch.tensor(y_va)
    perm = torch.randperm(len(y_tr), generator=torch.Generator().manual_seed(seed))
    x_tr, y_tr = x_tr[perm], y_tr[perm]
    train = [
        (x_tr[i : i + batch_size], y_tr[i : i + batch_size])
        for i in range(0, len(y_tr), batch_size)
    ]
    return {"train": train, "val": [(x_va, y_va)]}


def build_model(config: dict[str, Any]) -> nn.Module:
    """64 -> hidden -> 10; called on the worker after torch.manual_seed(config["seed"])."""
    hidden = config["hidden"]
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def population(hidden: int) -> list[dict[str, Any]]:
    return [
        {"lr": lr, "weight_decay": wd, "seed": s, "hidden": hidden}
        for lr, wd, s in itertools.product(LRS, WDS, SEEDS)
    ]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", default=None, help="a Ray cluster ('auto'); default: local")
    p.add_argument("--workers", type=int, default=2, help="shards = Ray Tune trials")
    p.add_argument("--cpus-per-worker", type=float, default=1)
    p.add_argument("--gpus-per-worker", type=float, default=0)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="split and batch-order seed")
    p.add_argument("--storage-path", default=None, help="for Ray Tune's files")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t0 = time.perf_counter()
    started = False
    if not ray.is_initialized():
        if args.address:
            ray.init(address=args.address)
        else:
            ray.init(
                num_cpus=max(1, int(args.workers * args.cpus_per_worker)),
                include_dashboard=False,
                log_to_driver=False,
            )
        started = True
    data = load_data(args.seed)
    configs = population(args.hidden)
    # The data travel to the workers with the trainer. For data too large for that,
    # pass zero-argument callables (e.g. lambda: load_data(seed)["train"]) instead,
    # which each worker runs itself.
    trainer = FitTrainer(
        data["train"], F.cross_entropy, epochs=args.epochs, val_loader=data["val"],
        metrics=("loss", "accuracy"),
    )  # fmt: skip
    resources = {"cpu": args.cpus_per_worker}
    if args.gpus_per_worker:
        resources["gpu"] = args.gpus_per_worker
    try:
        table = tune_population(
            configs,
            build_model,
            trainer,
            num_shards=args.workers,
            resources_per_trial=resources,
            storage_path=args.storage_path,
            name="ray_population",
        )
    finally:
        if started:
            ray.shutdown()
    elapsed = time.perf_counter() - t0
    rows = table.to_dict("records") if hasattr(table, "to_dict") else table

    print(
        f"{len(rows)} models in {args.workers} shards of ~{len(rows) // args.workers}, "
        f"{args.epochs} epochs: {elapsed:.1f} s"
    )
    ranked = sorted(rows, key=lambda r: (-r["val_accuracy"], r["val_loss"]))
    print(f"{'id':>3}  {'shard':>5}  {'lr':>9}  {'wd':>7}  {'seed':>4}  {'val_acc':>7}  val_loss")
    for r in ranked[:10]:
        print(
            f"{r['id']:>3}  {r['shard']:>5}  {r['lr']:>9.2e}  {r['weight_decay']:>7.0e}  "
            f"{r['seed']:>4}  {r['val_accuracy']:>7.4f}  {r['val_loss']:.4f}"
        )
    return {"rows": rows, "best": ranked[0], "seconds": elapsed}


if __name__ == "__main__":
    main()
