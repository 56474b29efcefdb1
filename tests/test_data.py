"""Tests of ``modelbatch.data``: per-model routing of batches and the masked loss.

* The contract: N models trained batched on routed batches (masks, indices, k-fold,
  bootstrap, stratified) with ``masked_loss`` == each model trained alone with plain
  ``torch.optim`` on exactly its own rows of every batch (float32 tolerance). A
  model with no row in a batch gets zero gradients, so the reference steps its
  optimizer with ``p.grad = 0`` (momentum and Adam's moments still move it).
* Routed values, shapes, masks, counts and padding against Python loops.
* ``masked_loss`` against ``loss_fn`` on each model's real rows, for several losses.
* Fold partitions, class proportions, bootstrap multiplicities.
* Every bad input raises a ValueError saying what was expected.
"""

from __future__ import annotations

import copy

import modelbatch as mb
import pytest
import torch
import torch.nn.functional as F
from modelbatch.data import (
    BootstrapRouter,
    DataRouter,
    KFoldRouter,
    RoutedBatch,
    StratifiedRouter,
    create_random_masks,
    masked_loss,
)
from torch import nn

N = 5
S = 40  # data set size
B = 8  # batch size
STEPS = 10
LRS = [0.02, 0.05, 0.1, 0.15, 0.2]
TOL = {"rtol": 1e-5, "atol": 1e-6}


def make_models(n=N, seed=0):
    torch.manual_seed(seed)
    return [nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)) for _ in range(n)]


def make_dataset(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(S, 6, generator=g), torch.randint(0, 3, (S,), generator=g)


def batches_of_ids(steps=STEPS, seed=0):
    """``steps`` batches of B sample ids, as a shuffling DataLoader gives them."""
    g = torch.Generator().manual_seed(seed)
    perms = torch.cat([torch.randperm(S, generator=g) for _ in range(steps * B // S + 1)])
    return [perms[s * B : (s + 1) * B] for s in range(steps)]


def make_optimizers(batch, refs, kind):
    if kind == "sgd":
        fused = mb.optim.SGD(batch, lr=torch.tensor(LRS), momentum=0.9)
        plain = [torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9) for m, lr in zip(refs, LRS)]
    else:
        lrs = [lr / 10 for lr in LRS]
        fused = mb.optim.Adam(batch, lr=torch.tensor(lrs))
        plain = [torch.optim.Adam(m.parameters(), lr=lr) for m, lr in zip(refs, lrs)]
    return fused, plain


def train_both(steps, route, rows_of, kind="sgd"):
    """Train N models batched and one by one; return the largest parameter difference.

    ``steps``: a list of (x [B, 6], y [B], step info); ``route(x, y, info)`` returns
    the RoutedBatch of that step, ``rows_of(i, info)`` model i's batch rows (a list,
    repeats allowed), computed independently of the router's gather.
    """
    models = make_models()
    refs = [copy.deepcopy(m) for m in models]
    batch = mb.ModelBatch(models, shared_input=False)
    opt, ref_opts = make_optimizers(batch, refs, kind)
    saw_empty = False
    for x, y, info in steps:
        routed = route(x, y, info)
        assert isinstance(routed, RoutedBatch)
        xs, ys = routed.data
        opt.zero_grad()
        masked_loss(batch, batch(xs), ys, F.cross_entropy, routed.mask, reduction="sum").backward()
        opt.step()
        for i, (m, o) in enumerate(zip(refs, ref_opts)):
            rows = torch.tensor(rows_of(i, info), dtype=torch.long)
            assert int(routed.counts[i]) == len(rows)
            o.zero_grad()
            if len(rows) == 0:
                saw_empty = True
                for p in m.parameters():
                    p.grad = torch.zeros_like(p)
            else:
                F.cross_entropy(m(x[rows]), y[rows]).backward()
            o.step()
    assert saw_empty, "the scenario must include a model with no rows in some batch"
    worst = 0.0
    for i, ref in enumerate(refs):
        got = batch.model(i).state_dict()
        for name, want in ref.state_dict().items():
            torch.testing.assert_close(got[name], want, **TOL)
            worst = max(worst, float((got[name] - want).abs().max()))
    return worst


# ------------------------------------------------------------- equivalence
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_masks_train_like_models_alone(kind):
    x_all, y_all = make_dataset()
    steps = []
    for s, ids in enumerate(batches_of_ids()):
        masks = create_random_masks(N, B, 0.5, seed=s)
        if s == 4:
            masks[2] = False  # after momentum has built up
        steps.append((x_all[ids], y_all[ids], masks))
    router = DataRouter("mask", num_models=N)
    train_both(
        steps,
        lambda x, y, m: router.route_batch((x, y), masks=m),
        lambda i, m: m[i].nonzero().squeeze(1).tolist(),
        kind,
    )


def test_indices_train_like_models_alone():
    x_all, y_all = make_dataset()
    g = torch.Generator().manual_seed(1)
    steps = []
    for s, ids in enumerate(batches_of_ids()):
        # Ragged, with repeats (a row drawn twice weighs twice) and empty lists.
        idx = [torch.randint(0, B, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g)]
        idx += [torch.randint(0, B, (k,), generator=g) for k in (3, 0 if s % 3 == 1 else 5, 8, 1)]
        steps.append((x_all[ids], y_all[ids], idx))
    router = DataRouter("indices")
    train_both(
        steps,
        lambda x, y, idx: router.route_batch((x, y), indices=idx),
        lambda i, idx: idx[i].tolist(),
    )


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_kfold_trains_like_models_alone(kind):
    x_all, y_all = make_dataset()
    router = KFoldRouter(N, S, shuffle=True, seed=3)
    batches = batches_of_ids()
    batches[5] = router.val_indices(1)[:B]  # model 1 has no training row in it
    steps = [(x_all[ids], y_all[ids], ids) for ids in batches]
    val_sets = [set(router.val_indices(i).tolist()) for i in range(N)]
    train_both(
        steps,
        lambda x, y, ids: router.route_batch((x, y), ids, N, split="train"),
        lambda i, ids: [j for j, s in enumerate(ids.tolist()) if s not in val_sets[i]],
        kind,
    )


def test_bootstrap_trains_like_models_alone():
    x_all, y_all = make_dataset()
    router = BootstrapRouter(S, N, seed=5)
    batches = batches_of_ids()
    batches[3] = router.oob_indices(0)[:B]  # model 0 drew none of these
    steps = [(x_all[ids], y_all[ids], ids) for ids in batches]
    drawn = [router.bootstrap_indices(i).tolist() for i in range(N)]
    train_both(
        steps,
        lambda x, y, ids: router.route_batch((x, y), ids),
        # Row j once per time model i drew its sample: its multiset's rows in the batch.
        lambda i, ids: [j for j, s in enumerate(ids.tolist()) for _ in range(drawn[i].count(s))],
    )


def test_stratified_trains_like_models_alone():
    x_all, y_all = make_dataset()
    router = StratifiedRouter(y_all, N, fraction=0.3, seed=2)
    subsets = [set(t.tolist()) for t in router.model_indices()]
    batches = batches_of_ids()
    batches[2] = torch.tensor(sorted(set(range(S)) - subsets[4])[:B])
    steps = [(x_all[ids], y_all[ids], ids) for ids in batches]
    train_both(
        steps,
        lambda x, y, ids: router.route_batch((x, y), ids),
        lambda i, ids: [j for j, s in enumerate(ids.tolist()) if s in subsets[i]],
    )


# ---------------------------------------------------------------- routing
def check_routed(routed, batch_leaves, rows):
    """``routed`` holds model i's ``rows[i]`` of each leaf, padded by a real row."""
    counts = torch.tensor([len(r) for r in rows])
    b_max = max(int(counts.max()), 1)
    torch.testing.assert_close(routed.counts, counts)
    assert routed.counts.dtype == torch.int64
    assert routed.mask.dtype == torch.bool and routed.mask.shape == (len(rows), b_max)
    assert routed.index.shape == (len(rows), b_max)
    for i, r in enumerate(rows):
        assert routed.mask[i].tolist() == [j < len(r) for j in range(b_max)]
        pad_row = r[0] if r else 0
        want_index = list(r) + [pad_row] * (b_max - len(r))
        assert routed.index[i].tolist() == want_index
        for got, leaf in zip(routed_leaves(routed), batch_leaves):
            assert got.shape == (len(rows), b_max, *leaf.shape[1:])
            torch.testing.assert_close(got[i], leaf[torch.tensor(want_index)], rtol=0, atol=0)


def routed_leaves(routed):
    d = routed.data
    return [d["x"], d["pair"][0], d["pair"][1]]


def make_batch(b=B, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, 2, generator=g)
    y = torch.randint(0, 5, (b,), generator=g)
    w = torch.rand(b, generator=g, dtype=torch.float64)
    return {"x": x, "pair": (y, w), "name": "not a tensor"}, [x, y, w]


def test_route_masks_against_loop():
    batch, leaves = make_batch()
    masks = create_random_masks(4, B, 0.4, seed=7)
    masks[1] = False
    masks[3] = True
    routed = DataRouter("mask").route_batch(batch, masks=masks)
    assert routed.data["name"] == "not a tensor"
    assert routed.num_models == 4
    check_routed(routed, leaves, [m.nonzero().squeeze(1).tolist() for m in masks])


def test_route_masks_none_selected_keeps_one_padding_row():
    batch, leaves = make_batch()
    routed = DataRouter("mask").route_batch(batch, masks=torch.zeros(3, B, dtype=torch.bool))
    check_routed(routed, leaves, [[], [], []])


@pytest.mark.parametrize("form", ["list", "list_int32", "tensor"])
def test_route_indices_against_loop(form):
    batch, leaves = make_batch()
    if form == "tensor":
        rows = [[3, 3, 0], [7, 1, 2], [0, 0, 0]]
        indices = torch.tensor(rows)
    else:
        rows = [[5, 2, 5, 5], [], [7], [1, 0, 3, 6, 2, 4, 7, 5, 1, 1]]  # K_max > B
        dtype = torch.int32 if form == "list_int32" else torch.int64
        indices = [torch.tensor(r, dtype=dtype) for r in rows]
    routed = DataRouter("indices", num_models=len(rows)).route_batch(batch, indices=indices)
    check_routed(routed, leaves, rows)


def test_passthrough_returns_the_batch():
    batch, _ = make_batch()
    assert DataRouter().route_batch(batch) is batch
    x = torch.randn(B, 4)
    assert DataRouter("passthrough").route_batch(x) is x


def test_route_single_tensor():
    x = torch.randn(6, 2)
    masks = torch.tensor([[True, False, True, False, False, False], [False] * 5 + [True]])
    routed = DataRouter("mask").route_batch(x, masks=masks)
    torch.testing.assert_close(routed.data, torch.stack([x[[0, 2]], x[[5, 5]]]))


def test_padding_repeats_real_rows():
    # Rows nobody selects may hold anything; padding only ever repeats selected rows.
    x = torch.randn(B, 6)
    x[3] = float("inf")
    x[6] = float("nan")
    masks = torch.zeros(N, B, dtype=torch.bool)
    masks[0, [0, 1, 2, 4]] = True
    masks[1, 5] = True
    masks[2, [7, 0]] = True
    masks[4, :3] = True
    routed = DataRouter("mask").route_batch(x, masks=masks)
    assert torch.isfinite(routed.data).all()
    batch = mb.ModelBatch(make_models(), shared_input=False)
    y = torch.randint(0, 3, (B,))
    ys = y[routed.index]
    masked_loss(batch, batch(routed.data), ys, F.cross_entropy, routed.mask, "sum").backward()
    for p in batch.parameters():
        assert torch.isfinite(p.grad).all()
    assert (batch.stacked_params()["2.bias"].grad[3] == 0).all()  # model 3 has no row


def test_routed_data_is_on_the_batch_device():
    x = torch.randn(B, 2)
    routed = DataRouter("indices").route_batch(x, indices=[torch.tensor([1, 2])])
    assert routed.data.device == x.device == routed.mask.device == routed.index.device


# -------------------------------------------------------------- masked_loss
def _loss_inputs(kind, n, b_max, g):
    if kind in ("cross_entropy", "nll_loss"):
        out = torch.randn(n, b_max, 4, generator=g)
        if kind == "nll_loss":
            out = out.log_softmax(-1)
        return out, torch.randint(0, 4, (n, b_max), generator=g)
    return torch.randn(n, b_max, 3, generator=g), torch.randn(n, b_max, 3, generator=g)


class _Batch:
    """What masked_loss needs of a ModelBatch."""

    def __init__(self, n):
        self.num_models = n
        self.latest_losses = None


@pytest.mark.parametrize("kind", ["cross_entropy", "nll_loss", "mse_loss", "l1_loss"])
def test_masked_loss_against_loop(kind):
    loss_fn = getattr(F, kind)
    n, b_max = 4, 6
    g = torch.Generator().manual_seed(0)
    out, tgt = _loss_inputs(kind, n, b_max, g)
    out.requires_grad_(True)
    counts = torch.tensor([6, 0, 1, 4])
    mask = torch.arange(b_max) < counts[:, None]
    batch = _Batch(n)
    losses = masked_loss(batch, out, tgt, loss_fn, mask)
    assert losses.shape == (n,)
    torch.testing.assert_close(batch.latest_losses, losses.detach())
    assert not batch.latest_losses.requires_grad
    grads = torch.autograd.grad(losses.sum(), out)[0]
    for i in range(n):
        leaf = out.detach()[i].clone().requires_grad_(True)
        if counts[i] == 0:
            assert losses[i] == 0
            assert (grads[i] == 0).all()
            continue
        want = loss_fn(leaf[mask[i]], tgt[i][mask[i]])
        want.backward()
        torch.testing.assert_close(losses[i], want, **TOL)
        torch.testing.assert_close(grads[i], leaf.grad, **TOL)
        assert (grads[i][~mask[i]] == 0).all()  # padding: exactly zero gradient


def test_masked_loss_reductions():
    n, b_max = 3, 5
    g = torch.Generator().manual_seed(1)
    out, tgt = _loss_inputs("cross_entropy", n, b_max, g)
    mask = torch.rand(n, b_max, generator=g) < 0.6
    batch = _Batch(n)
    none = masked_loss(batch, out, tgt, F.cross_entropy, mask)
    torch.testing.assert_close(
        masked_loss(batch, out, tgt, F.cross_entropy, mask, "sum"), none.sum()
    )
    torch.testing.assert_close(
        masked_loss(batch, out, tgt, F.cross_entropy, mask, reduction="mean"), none.mean()
    )


def test_masked_loss_shared_targets_over_passthrough_batch():
    # Mask without gather: every model sees the whole (shared) batch, the loss keeps
    # each model's rows.
    models = make_models(3)
    batch = mb.ModelBatch(models)
    x, y = torch.randn(B, 6), torch.randint(0, 3, (B,))
    masks = create_random_masks(3, B, 0.5, seed=0)
    x_in = DataRouter("passthrough").route_batch(x)
    losses = masked_loss(batch, batch(x_in), y, F.cross_entropy, masks)
    for i, m in enumerate(models):
        torch.testing.assert_close(losses[i], F.cross_entropy(m(x[masks[i]]), y[masks[i]]), **TOL)
    per_model = y.expand(3, B)
    torch.testing.assert_close(
        masked_loss(batch, batch(x), per_model, F.cross_entropy, masks, targets_per_model=True),
        losses,
    )


# ------------------------------------------------------------- random masks
def test_create_random_masks():
    masks = create_random_masks(50, 400, 0.3, seed=0)
    assert masks.dtype == torch.bool and masks.shape == (50, 400)
    assert (masks.sum(1) >= 1).all()
    assert abs(masks.float().mean().item() - 0.3) < 0.02
    assert torch.equal(masks, create_random_masks(50, 400, 0.3, seed=0))
    assert not torch.equal(masks, create_random_masks(50, 400, 0.3, seed=1))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(create_random_masks(4, 9, 0.5, g1), create_random_masks(4, 9, 0.5, g2))
    assert torch.equal(create_random_masks(4, 9, 0.5, 3), create_random_masks(4, 9, 0.5, seed=3))
    assert create_random_masks(3, 7, 1.0).all()
    tiny = create_random_masks(200, 5, 1e-6, seed=0)
    assert (tiny.sum(1) == 1).all()  # at least one row even when the draws keep none


# -------------------------------------------------------------- stratified
def test_stratified_keeps_class_proportions():
    g = torch.Generator().manual_seed(0)
    labels = torch.cat([torch.full((k,), c) for c, k in enumerate([50, 23, 7, 1, 19])])
    labels = labels[torch.randperm(len(labels), generator=g)]
    fraction = 0.4
    router = StratifiedRouter(labels, 6, fraction=fraction, seed=1)
    subsets = router.model_indices()
    assert len(subsets) == 6
    sizes = torch.bincount(labels)
    for idx in subsets:
        assert idx.dtype == torch.int64
        assert idx.unique().numel() == idx.numel()
        assert ((idx >= 0) & (idx < len(labels))).all()
        per_class = torch.bincount(labels[idx], minlength=len(sizes))
        assert ((per_class - fraction * sizes).abs() <= 1).all()
        assert (per_class >= 1).all()  # every model sees every class
    assert len({tuple(t.tolist()) for t in subsets}) == 6  # the models' subsets differ
    again = StratifiedRouter(labels, 6, fraction=fraction, seed=1).model_indices()
    assert all(torch.equal(a, b) for a, b in zip(subsets, again))


def test_stratified_route_batch_against_loop():
    labels = torch.randint(0, 3, (30,), generator=torch.Generator().manual_seed(0))
    router = StratifiedRouter(labels, 4, fraction=0.5, seed=0)
    batch, leaves = make_batch(b=10)
    ids = torch.randperm(30, generator=torch.Generator().manual_seed(1))[:10]
    subsets = [set(t.tolist()) for t in router.model_indices()]
    rows = [[j for j, s in enumerate(ids.tolist()) if s in sub] for sub in subsets]
    check_routed(router.route_batch(batch, ids), leaves, rows)


# ------------------------------------------------------------------ k-fold
@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize(("k", "s"), [(5, 40), (3, 11), (4, 4)])
def test_kfold_partitions(k, s, shuffle):
    router = KFoldRouter(k, s, shuffle=shuffle, seed=2)
    everything = set(range(s))
    val_count = torch.zeros(s, dtype=torch.long)
    sizes = []
    for i in range(k):
        train, val = set(router.train_indices(i).tolist()), set(router.val_indices(i).tolist())
        assert train | val == everything
        assert not train & val
        assert val
        val_count[router.val_indices(i)] += 1
        sizes.append(len(val))
        # Model i + k (N a multiple of k) shares model i's fold.
        assert torch.equal(router.val_indices(i + k), router.val_indices(i))
    assert (val_count == 1).all()  # each sample in exactly one validation fold
    assert max(sizes) - min(sizes) <= 1


def test_kfold_contiguous_matches_sklearn():
    model_selection = pytest.importorskip("sklearn.model_selection")
    router = KFoldRouter(3, 11, shuffle=False)
    for i, (train, val) in enumerate(model_selection.KFold(3).split(range(11))):
        assert router.train_indices(i).tolist() == train.tolist()
        assert router.val_indices(i).tolist() == val.tolist()


def test_kfold_depends_on_seed_only():
    a, b = KFoldRouter(4, 30, seed=1), KFoldRouter(4, 30, seed=1)
    assert torch.equal(a.folds, b.folds)
    assert not torch.equal(a.folds, KFoldRouter(4, 30, seed=2).folds)


@pytest.mark.parametrize("split", ["train", "val"])
def test_kfold_route_batch_against_loop(split):
    router = KFoldRouter(3, 20, seed=0)
    batch, leaves = make_batch(b=9)
    ids = torch.tensor([19, 0, 4, 4, 11, 7, 2, 15, 8])  # a repeated id routes twice
    n = 6
    rows = []
    for i in range(n):
        val = set(router.val_indices(i).tolist())
        rows.append([j for j, s in enumerate(ids.tolist()) if (s in val) == (split == "val")])
    check_routed(router.route_batch(batch, ids, n, split=split), leaves, rows)
    by_default = router.route_batch(batch, ids, split=split)  # num_models defaults to k
    check_routed(by_default, leaves, rows[:3])


# ---------------------------------------------------------------- bootstrap
def test_bootstrap_multiplicities():
    router = BootstrapRouter(25, 4, seed=0)
    assert router.multiplicity.shape == (4, 25)
    assert (router.multiplicity.sum(1) == 25).all()
    for i in range(4):
        drawn = router.bootstrap_indices(i)
        assert drawn.numel() == 25
        assert torch.equal(torch.bincount(drawn, minlength=25), router.multiplicity[i].long())
        oob = set(router.oob_indices(i).tolist())
        assert oob == set(range(25)) - set(drawn.tolist())
        assert oob  # P(no OOB sample) is negligible at S = 25
    assert not torch.equal(router.multiplicity[0], router.multiplicity[1])
    assert torch.equal(router.multiplicity, BootstrapRouter(25, 4, seed=0).multiplicity)


def test_bootstrap_route_batch_repeats_rows():
    router = BootstrapRouter(12, 3, seed=4)
    # A batch of the samples model 0 drew: its count, the size of its multiset, exceeds B.
    ids = router.bootstrap_indices(0).unique()
    assert ids.numel() < 12
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(ids.numel(), 3, 2, generator=g), torch.randint(0, 5, (ids.numel(),))
    w = torch.rand(ids.numel(), dtype=torch.float64, generator=g)
    routed = router.route_batch({"x": x, "pair": (y, w)}, ids)
    mult = router.multiplicity
    rows = [
        [j for j, s in enumerate(ids.tolist()) for _ in range(int(mult[i, s]))] for i in range(3)
    ]
    check_routed(routed, [x, y, w], rows)
    assert int(routed.counts[0]) == 12 > ids.numel()
    oob = router.route_batch({"x": x, "pair": (y, w)}, ids, split="oob")
    assert int(oob.counts[0]) == 0
    oob_rows = [[j for j, s in enumerate(ids.tolist()) if mult[i, s] == 0] for i in range(3)]
    check_routed(oob, [x, y, w], oob_rows)


# ------------------------------------------------------------------- errors
X8 = torch.randn(8, 3)
M = torch.ones(2, 8, dtype=torch.bool)
IDX = [torch.tensor([0, 1]), torch.tensor([2])]


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: DataRouter("shuffle"), "mode must be one of"),
        (lambda: DataRouter("mask", num_models=0), "num_models must be an int >= 1"),
        (lambda: DataRouter().route_batch(X8, masks=M), "passthrough.*takes no masks"),
        (lambda: DataRouter("mask").route_batch(X8), "needs masks="),
        (lambda: DataRouter("mask").route_batch(X8, masks=M, indices=IDX), "no indices="),
        (lambda: DataRouter("indices").route_batch(X8), "needs indices="),
        (lambda: DataRouter("indices").route_batch(X8, indices=IDX, masks=M), "no masks="),
        (lambda: DataRouter().route_batch(["a", 1]), "found no tensor"),
        (lambda: DataRouter().route_batch(torch.tensor(1.0)), "leading batch dim"),
        (lambda: DataRouter().route_batch((X8, torch.ones(7))), r"sizes \[8, 7\]"),
        (lambda: DataRouter("mask").route_batch(X8[:0], masks=M[:, :0]), "empty batch"),
        (lambda: DataRouter("mask").route_batch(X8, masks=M.int()), "bool tensor"),
        (lambda: DataRouter("mask").route_batch(X8, masks=M[:, :5]), r"\[N, B=8\], got \(2, 5\)"),
        (lambda: DataRouter("mask").route_batch(X8, masks=M[0]), r"\[N, B=8\], got \(8,\)"),
        (lambda: DataRouter("mask", 3).route_batch(X8, masks=M), "for 2 models.*num_models=3"),
        (lambda: DataRouter("mask").route_batch(X8, masks=M[:0]), "0 models"),
        (lambda: DataRouter("indices").route_batch(X8, indices=[]), "0 models"),
        (lambda: DataRouter("indices", 3).route_batch(X8, indices=IDX), "num_models=3"),
        (
            lambda: DataRouter("indices").route_batch(X8, indices=[torch.tensor([0, 8])]),
            r"indices\[0\].*0 <= index < 8.*\[0, 8\]",
        ),
        (
            lambda: DataRouter("indices").route_batch(X8, indices=[IDX[0], torch.tensor([-1])]),
            r"indices\[1\].*out of range",
        ),
        (
            lambda: DataRouter("indices").route_batch(X8, indices=[torch.tensor([0.0])]),
            r"indices\[0\] must be a 1-D integer tensor, got float32",
        ),
        (
            lambda: DataRouter("indices").route_batch(X8, indices=[torch.tensor([[0]])]),
            r"indices\[0\] must be a 1-D",
        ),
        (
            lambda: DataRouter("indices").route_batch(X8, indices=torch.tensor([0, 1])),
            r"integer \[N, K\]",
        ),
        (lambda: DataRouter("indices").route_batch(X8, indices=3), "index tensors"),
        (lambda: create_random_masks(0, 4, 0.5), "num_models"),
        (lambda: create_random_masks(2, 0, 0.5), "batch_size"),
        (lambda: create_random_masks(2, 4, 0.0), r"fraction must be in \(0, 1\]"),
        (lambda: create_random_masks(2, 4, 1.5), r"fraction must be in \(0, 1\]"),
        (lambda: create_random_masks(2, 4, 0.5, "x"), "generator must be"),
        (lambda: create_random_masks(2, 4, 0.5, 1, seed=1), "not both"),
        (lambda: StratifiedRouter(torch.rand(5), 2), "integer tensor"),
        (lambda: StratifiedRouter(torch.zeros(0, dtype=torch.long), 2), "non-empty"),
        (lambda: StratifiedRouter(torch.zeros(4, 2, dtype=torch.long), 2), "1-D"),
        (lambda: StratifiedRouter(torch.zeros(4, dtype=torch.long), 2, fraction=2), "fraction"),
        (lambda: KFoldRouter(1, 10), "k must be an int >= 2"),
        (lambda: KFoldRouter(5, 3), r"num_samples \(3\) must be >= k \(5\)"),
        (lambda: KFoldRouter(2, 10).train_indices(-1), "model index"),
        (lambda: KFoldRouter(2, 10).route_batch(X8, torch.arange(8), 3), "multiple of k=2"),
        (lambda: KFoldRouter(2, 10).route_batch(X8, torch.arange(8), split="x"), "split must"),
        (lambda: KFoldRouter(2, 10).route_batch(X8, torch.arange(7)), r"\[B=8\].*\(7,\)"),
        (lambda: KFoldRouter(2, 10).route_batch(X8, torch.arange(8.0)), "integer tensor"),
        (lambda: KFoldRouter(2, 5).route_batch(X8, torch.arange(8)), r"\[0, 5\).*\[0, 7\]"),
        (lambda: BootstrapRouter(0, 2), "num_samples"),
        (lambda: BootstrapRouter(5, 0), "num_models"),
        (lambda: BootstrapRouter(5, 2).oob_indices(2), r"model index must be an int in \[0, 2\)"),
        (lambda: BootstrapRouter(5, 2).bootstrap_indices(-1), "model index"),
        (lambda: BootstrapRouter(5, 2).route_batch(X8[:3], torch.arange(3), "val"), "'oob'"),
        (lambda: BootstrapRouter(5, 2).route_batch(X8[:3], torch.tensor([0, 5, 1])), r"\[0, 5\)"),
        (
            lambda: StratifiedRouter(torch.arange(4) % 2, 2).route_batch(
                X8[:2], torch.tensor([9, 0])
            ),
            r"\[0, 4\)",
        ),
    ],
)
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()


OUT = torch.randn(2, 4, 3)
TGT = torch.randint(0, 3, (2, 4))
MASK = torch.ones(2, 4, dtype=torch.bool)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((OUT, TGT, F.cross_entropy, MASK), {"reduction": "max"}, "reduction must be one of"),
        ((OUT, TGT, F.cross_entropy, MASK.float()), {}, "bool tensor"),
        ((OUT, TGT, F.cross_entropy, MASK[0]), {}, r"mask must be a bool tensor \[N=2, B_max\]"),
        ((OUT[:1], TGT[:1], F.cross_entropy, MASK[:1]), {}, "mask is for 1 models.*has 2"),
        ((OUT[:, :3], TGT, F.cross_entropy, MASK), {}, r"outputs must be \[N=2, B_max=4"),
        ((OUT, TGT[:, :3], F.cross_entropy, MASK), {}, "targets must be per-model"),
        ((OUT, TGT[0], F.cross_entropy, MASK), {"targets_per_model": True}, "needs targets"),
        ((OUT, TGT, F.cross_entropy, MASK), {"targets_per_model": False}, r"\[B_max=4, \.\.\.\]"),
        ((OUT, TGT, lambda o, t: o.sum(1), MASK), {}, "one scalar"),
        ((OUT, "labels", F.cross_entropy, MASK), {}, "targets must hold a tensor"),
    ],
)
def test_masked_loss_bad_input_raises(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        masked_loss(_Batch(2), *args, **kwargs)
