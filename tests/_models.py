"""Small models and data shared by the tests (not a test module)."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, i=8, h=16, o=3):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(i, h), nn.ReLU(), nn.Linear(h, h), nn.Tanh(), nn.Linear(h, o)
        )

    def forward(self, x):
        return self.net(x)


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        # No conv bias: BatchNorm cancels it, so its gradient is pure rounding noise
        # that Adam would amplify to O(lr) differences between any two runs.
        self.conv = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn(self.conv(x))))
        return self.head(x.flatten(1))


class EmbedLN(nn.Module):
    def __init__(self, vocab=20, d=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, 3)

    def forward(self, tokens):
        return self.head(self.ln(self.emb(tokens)).mean(1))


class Transformer(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(
            d_model=d, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True
        )
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        return self.head(self.layer(x).mean(1))


def make_data(kind: str, steps: int, batch: int = 6, seed: int = 0):
    """A list of (inputs, targets) for a model kind, fixed by seed."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        if kind == "mlp":
            x = torch.randn(batch, 8, generator=g)
        elif kind == "cnn":
            x = torch.randn(batch, 2, 6, 6, generator=g)
        elif kind == "embed":
            x = torch.randint(0, 20, (batch, 5), generator=g)
        else:
            x = torch.randn(batch, 5, 8, generator=g)
        out.append((x, torch.randint(0, 3, (batch,), generator=g)))
    return out


MODELS = {"mlp": MLP, "cnn": CNN, "embed": EmbedLN, "transformer": Transformer}


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 when both are zero)."""
    scale = b.abs().max().item()
    diff = (a.double() - b.double()).abs().max().item()
    return diff / scale if scale > 0 else diff


def digits_batches(batch_size: int = 256) -> dict[str, list]:
    """scikit-learn's digits: a stratified 75/25 split standardised with the train
    statistics; the train split as fixed mini-batches, val as one batch."""
    import pytest

    datasets = pytest.importorskip("sklearn.datasets")
    model_selection = pytest.importorskip("sklearn.model_selection")
    x, y = datasets.load_digits(return_X_y=True)
    x_tr, x_va, y_tr, y_va = model_selection.train_test_split(
        x, y, test_size=0.25, stratify=y, random_state=0
    )
    mean, std = x_tr.mean(axis=0), x_tr.std(axis=0)
    std[std == 0] = 1.0
    x_tr = torch.tensor((x_tr - mean) / std, dtype=torch.float32)
    x_va = torch.tensor((x_va - mean) / std, dtype=torch.float32)
    y_tr, y_va = torch.tensor(y_tr), torch.tensor(y_va)
    train = [
        (x_tr[i : i + batch_size], y_tr[i : i + batch_size])
        for i in range(0, len(y_tr), batch_size)
    ]
    return {"train": train, "val": [(x_va, y_va)]}
