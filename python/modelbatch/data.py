"""Data routing: give each of the N models of a ModelBatch its own rows of every batch.

A batch is a tensor or a pytree (tuple, list, dict) of tensors whose leading dim is
the batch size ``B``, e.g. ``(x: [B, F], y: [B])``. Routing picks, per model, which
rows of the batch it trains on and gathers them, in one vectorised index op per
tensor, into a :class:`RoutedBatch`: every tensor becomes ``[N, B_max, ...]``
(``B_max`` the most rows any model got), with ``mask: [N, B_max]`` marking the real
rows and ``counts: [N]`` their number. Padding rows repeat a real row of the same
model (its first; row 0 of the batch for a model with no rows), so they are always
finite and a forward over them can never produce NaN or inf.

Feed ``routed.data`` to ``ModelBatch(models, shared_input=False)`` and reduce the
loss with :func:`masked_loss`, which ignores padding exactly::

    router = DataRouter("mask")
    routed = router.route_batch((x, y), masks=masks)  # masks: bool [N, B]
    xs, ys = routed.data  # [N, B_max, F], [N, B_max]
    loss = masked_loss(batch, batch(xs), ys, F.cross_entropy, routed.mask, reduction="sum")

Routers over a data set with ``S`` samples (the batch carries each row's sample id,
e.g. from a ``Dataset`` returning its index): :class:`StratifiedRouter` (class-
balanced subsets), :class:`KFoldRouter` (cross-validation folds) and
:class:`BootstrapRouter` (bagging). Each holds an ``[N, S]`` or ``[S]`` table, so a
sample is routed the same way whatever order a shuffling ``DataLoader`` gives it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import vmap
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

__all__ = [
    "BootstrapRouter",
    "DataRouter",
    "KFoldRouter",
    "RoutedBatch",
    "StratifiedRouter",
    "create_random_masks",
    "masked_loss",
]

_MODES = ("passthrough", "mask", "indices")
_REDUCTIONS = ("sum", "mean", "none")

Generator = torch.Generator | int | None


@dataclass
class RoutedBatch:
    """A batch gathered per model.

    Attributes:
        data: the batch's pytree with every tensor ``[B, ...]`` gathered to
            ``[N, B_max, ...]`` (other leaves unchanged).
        mask: bool ``[N, B_max]``, True for real rows, False for padding.
        counts: int64 ``[N]``, the real rows of each model (``mask.sum(1)``).
        index: int64 ``[N, B_max]``, the batch row each entry was taken from.
    """

    data: Any
    mask: Tensor
    counts: Tensor
    index: Tensor

    @property
    def num_models(self) -> int:
        return self.mask.shape[0]


# ------------------------------------------------------------------ helpers
def _generator(generator: Generator) -> torch.Generator | None:
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, int) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(generator)
    raise ValueError(
        f"generator must be None, an int seed or a torch.Generator, got {type(generator).__name__}"
    )


def _check_count(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_fraction(fraction: Any) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return float(fraction)


def _describe(t: Any) -> str:
    if isinstance(t, Tensor):
        return f"{str(t.dtype).replace('torch.', '')} {tuple(t.shape)}"
    return type(t).__name__


def _is_int_tensor(t: Any) -> bool:
    return (
        isinstance(t, Tensor)
        and not t.is_floating_point()
        and not t.is_complex()
        and t.dtype != torch.bool
    )


def _batch_size(batch: Any) -> tuple[int, torch.device]:
    """``B`` and the device of a batch's tensors, checking they all lead with ``B``."""
    leaves, _ = tree_flatten(batch)
    tensors = [t for t in leaves if isinstance(t, Tensor)]
    if not tensors:
        raise ValueError(
            "batch must be a tensor or a tuple/list/dict of tensors [B, ...]; "
            f"found no tensor in a {type(batch).__name__}"
        )
    for t in tensors:
        if t.dim() == 0:
            raise ValueError(
                "every tensor of the batch needs a leading batch dim [B, ...]; got a scalar"
            )
    sizes = [t.shape[0] for t in tensors]
    if len(set(sizes)) != 1:
        raise ValueError(
            f"every tensor of the batch must share the leading batch dim B; got sizes {sizes}"
        )
    if sizes[0] == 0:
        raise ValueError("cannot route an empty batch (B = 0)")
    return sizes[0], tensors[0].device


def _sample_ids(sample_ids: Any, b: int, num_samples: int) -> Tensor:
    """The batch's sample ids as int64 ``[B]``, checked against the data set size."""
    if not _is_int_tensor(sample_ids):
        raise ValueError(
            f"sample_ids must be an integer tensor [B={b}], got {_describe(sample_ids)}"
        )
    if sample_ids.shape != (b,):
        raise ValueError(
            f"sample_ids must be 1-D [B={b}] (one id per batch row), got {tuple(sample_ids.shape)}"
        )
    ids = sample_ids.long()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_samples):
        raise ValueError(
            f"sample_ids must be in [0, {num_samples}) (the data set size); got ids in "
            f"[{int(ids.min())}, {int(ids.max())}]"
        )
    return ids


def _pad_index(rows: Tensor, model_of: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Padded per-model row index ``[N, B_max]`` and its mask from a ragged list.

    ``rows``: the batch rows of all models one after another (model 0's first),
    ``model_of``: the model of each entry, ``counts``: int64 ``[N]`` entries per model.
    """
    n = counts.shape[0]
    # B_max >= 1 keeps the forward shapes non-empty when no model got a row.
    b_max = max(int(counts.max()), 1)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(rows.numel(), device=rows.device) - starts[model_of]
    index = torch.zeros(n, b_max, dtype=torch.int64, device=rows.device)
    index[model_of, pos] = rows
    mask = torch.arange(b_max, device=rows.device) < counts[:, None]
    # Padding repeats the model's first row: column 0 holds it, or row 0 of the
    # batch when the model has none, so padding is always real, finite data.
    index = torch.where(mask, index, index[:, :1])
    return index, mask


def _index_from_mask(masks: Tensor) -> tuple[Tensor, Tensor]:
    """``[N, B_max]`` row index and mask of bool ``masks: [N, B]``, batch order kept."""
    counts = masks.sum(1)
    b_max = max(int(counts.max()), 1)
    # A stable sort of ~mask brings each model's selected rows to the front, in order.
    order = torch.sort((~masks).to(torch.uint8), dim=1, stable=True).indices[:, :b_max]
    mask = torch.arange(b_max, device=masks.device) < counts[:, None]
    # A model with no row has order[:, 0] == 0 (all keys equal), i.e. row 0.
    index = torch.where(mask, order, order[:, :1])
    return index, mask


def _gather(batch: Any, index: Tensor, mask: Tensor, device: torch.device) -> RoutedBatch:
    """Every tensor ``t: [B, ...]`` of the batch (on ``device``) as ``t[index]:
    [N, B_max, ...]``, one ``index_select`` per tensor."""
    index = index.to(device)
    mask = mask.to(device)
    flat = index.reshape(-1)
    n, b_max = index.shape

    def take(t):
        if not isinstance(t, Tensor):
            return t
        return t.index_select(0, flat).reshape(n, b_max, *t.shape[1:])

    return RoutedBatch(tree_map(take, batch), mask, mask.sum(1), index)


# ---------------------------------------------------------------- DataRouter
class DataRouter:
    """Routes each batch to the N models of a ModelBatch.

    Args:
        mode: ``"passthrough"``: every model sees the whole batch (use it with
            ``ModelBatch(shared_input=True)``); ``"mask"``: ``route_batch(batch,
            masks=...)`` with bool ``masks: [N, B]``; ``"indices"``: ``route_batch(batch,
            indices=...)`` with N 1-D index tensors into the batch (repeats allowed) or
            an int64 ``[N, K]`` tensor.
        num_models: N, checked against the masks or indices when given.
    """

    def __init__(self, mode: str = "passthrough", num_models: int | None = None) -> None:
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        self.mode = mode
        self.num_models = None if num_models is None else _check_count("num_models", num_models)

    def route_batch(
        self,
        batch: Any,
        masks: Tensor | None = None,
        indices: Tensor | Sequence[Tensor] | None = None,
    ) -> Any:
        """The batch unchanged (passthrough) or a :class:`RoutedBatch` (mask, indices).

        Args:
            batch: a tensor or pytree of tensors ``[B, ...]``.
            masks: bool ``[N, B]``: model i trains on the rows where ``masks[i]``.
            indices: N integer index tensors ``[K_i]`` into the batch, or ``[N, K]``.
        """
        if self.mode == "passthrough":
            if masks is not None or indices is not None:
                raise ValueError(
                    "mode='passthrough' routes the whole batch to every model and takes no "
                    "masks or indices; use DataRouter('mask') or DataRouter('indices')"
                )
            _batch_size(batch)
            return batch
        if self.mode == "mask":
            if indices is not None or masks is None:
                raise ValueError(
                    "mode='mask' needs masks= (bool [N, B]) and no indices=; "
                    f"got masks={'None' if masks is None else 'a value'}, "
                    f"indices={'None' if indices is None else 'a value'}"
                )
            return self._route_masks(batch, masks)
        if masks is not None or indices is None:
            raise ValueError(
                "mode='indices' needs indices= (N index tensors or [N, K]) and no masks=; "
                f"got masks={'None' if masks is None else 'a value'}, "
                f"indices={'None' if indices is None else 'a value'}"
            )
        return self._route_indices(batch, indices)

    def _check_n(self, n: int, what: str) -> None:
        if self.num_models is not None and n != self.num_models:
            raise ValueError(
                f"{what} are for {n} models, this router has num_models={self.num_models}"
            )
        if n == 0:
            raise ValueError(f"{what} are for 0 models; need at least one")

    def _route_masks(self, batch: Any, masks: Tensor) -> RoutedBatch:
        b, device = _batch_size(batch)
        if not isinstance(masks, Tensor) or masks.dtype != torch.bool:
            raise ValueError(f"masks must be a bool tensor [N, B={b}], got {_describe(masks)}")
        if masks.dim() != 2 or masks.shape[1] != b:
            raise ValueError(f"masks must be [N, B={b}], got {tuple(masks.shape)}")
        self._check_n(masks.shape[0], "masks")
        return _gather(batch, *_index_from_mask(masks), device)

    def _route_indices(self, batch: Any, indices: Tensor | Sequence[Tensor]) -> RoutedBatch:
        b, device = _batch_size(batch)
        if isinstance(indices, Tensor):
            if not _is_int_tensor(indices) or indices.dim() != 2:
                raise ValueError(
                    f"indices as one tensor must be integer [N, K]; got {_describe(indices)}"
                )
            n, k = indices.shape
            self._check_n(n, "indices")
            rows = indices.long().reshape(-1).to(device)
            counts = torch.full((n,), k, dtype=torch.int64, device=device)
        elif isinstance(indices, Sequence) and not isinstance(indices, str):
            for i, t in enumerate(indices):
                if not _is_int_tensor(t) or t.dim() != 1:
                    raise ValueError(
                        f"indices[{i}] must be a 1-D integer tensor, got {_describe(t)}"
                    )
            n = len(indices)
            self._check_n(n, "indices")
            rows = torch.cat([t.long().to(device) for t in indices])
            counts = torch.tensor([t.numel() for t in indices], dtype=torch.int64, device=device)
        else:
            raise ValueError(
                "indices must be N 1-D index tensors or an [N, K] tensor, got "
                f"{type(indices).__name__}"
            )
        model_of = torch.repeat_interleave(torch.arange(n, device=device), counts)
        bad = (rows < 0) | (rows >= b)
        if bad.any():
            i = int(model_of[bad][0])
            got = rows[model_of == i]
            raise ValueError(
                f"indices[{i}] holds rows out of range for a batch of B={b}: expected "
                f"0 <= index < {b}, got values in [{int(got.min())}, {int(got.max())}]"
            )
        return _gather(batch, *_pad_index(rows, model_of, counts), device)


def create_random_masks(
    num_models: int,
    batch_size: int,
    fraction: float,
    generator: Generator = None,
    *,
    seed: int | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Random bool masks ``[N, B]``: each row is kept with probability ``fraction``,
    independently per model, and each model keeps at least one row (its row of
    lowest draw when the draws kept none).

    Args:
        generator: None (torch's global generator), an int seed, or a CPU
            ``torch.Generator``; the draws are made on the CPU, then moved to ``device``.
        seed: the same as an int ``generator`` (the routers' name for it).
    """
    n = _check_count("num_models", num_models)
    b = _check_count("batch_size", batch_size)
    fraction = _check_fraction(fraction)
    if seed is not None:
        if generator is not None:
            raise ValueError("pass generator= or seed=, not both")
        generator = seed
    u = torch.rand(n, b, generator=_generator(generator))
    masks = u < fraction
    masks[torch.arange(n), u.argmin(1)] = True
    return masks.to(device) if device is not None else masks


# ------------------------------------------------------------- data-set routers
class StratifiedRouter:
    """Per-model subsets of a labelled data set that keep each class's proportion.

    Model i draws, without replacement and independently of the other models,
    ``max(1, round(fraction * S_c))`` of the ``S_c`` samples of each class c, so its
    count of each class is within one sample of ``fraction * S_c`` and every model
    sees every class.

    Args:
        labels: integer ``[S]``, the class of each sample of the data set.
        num_models: N.
        fraction: the share of each class each model keeps, in (0, 1].
        seed: an int seed or a CPU ``torch.Generator``.

    Attributes:
        membership: bool ``[N, S]``, sample s is in model i's subset (N * S bytes).
    """

    def __init__(
        self, labels: Tensor, num_models: int, fraction: float = 0.5, seed: Generator = 0
    ) -> None:
        if not _is_int_tensor(labels) or labels.dim() != 1 or labels.numel() == 0:
            raise ValueError(
                f"labels must be a non-empty 1-D integer tensor [S], got {_describe(labels)}"
            )
        n = _check_count("num_models", num_models)
        fraction = _check_fraction(fraction)
        labels = labels.long().cpu()
        s = labels.numel()
        # Sort each model's random draws, then stably by class: within each class the
        # samples come in random order, and the first k_c of them are the subset.
        u = torch.rand(n, s, generator=_generator(seed))
        order = u.argsort(1)
        order = order.gather(1, labels[order].argsort(dim=1, stable=True))
        _, inverse, class_sizes = torch.unique(labels, return_inverse=True, return_counts=True)
        class_start = torch.cumsum(class_sizes, 0) - class_sizes
        keep = (fraction * class_sizes).round().clamp(min=1).long()
        cls = inverse[order]
        rank = torch.arange(s) - class_start[cls]
        self.membership = torch.zeros(n, s, dtype=torch.bool)
        self.membership.scatter_(1, order, rank < keep[cls])
        self.labels = labels
        self.num_models = n
        self.num_samples = s

    def model_indices(self) -> list[Tensor]:
        """Model i's sample ids, int64 ``[S_i]`` ascending, for each model."""
        return [row.nonzero().squeeze(1) for row in self.membership]

    def route_batch(self, batch: Any, sample_ids: Tensor) -> RoutedBatch:
        """Route a batch whose row j is sample ``sample_ids[j]`` of the data set.

        Args:
            batch: a tensor or pytree of tensors ``[B, ...]``.
            sample_ids: integer ``[B]``, the data-set index of each row.
        """
        b, device = _batch_size(batch)
        ids = _sample_ids(sample_ids, b, self.num_samples).cpu()
        return _gather(batch, *_index_from_mask(self.membership[:, ids]), device)


class KFoldRouter:
    """k-fold cross-validation of N models (N a multiple of k) in one batch.

    Sample s belongs to fold ``folds[s]``; the k folds differ in size by at most one
    (the first ``S % k`` folds are one larger, as in scikit-learn's ``KFold``).
    Model i trains on every fold but ``i % k`` and validates on fold ``i % k``. The
    folds are a function of the sample id and the seed only, so a shuffling
    ``DataLoader`` routes each sample the same way every epoch.

    Args:
        k: the number of folds, >= 2.
        num_samples: S, the data set size (>= k).
        shuffle: assign samples to folds at random (seeded) instead of contiguously.
        seed: an int seed or a CPU ``torch.Generator`` (used when ``shuffle``).

    Attributes:
        folds: int64 ``[S]``, the fold of each sample.
    """

    def __init__(self, k: int, num_samples: int, shuffle: bool = True, seed: Generator = 0) -> None:
        self.k = _check_count("k", k, minimum=2)
        s = _check_count("num_samples", num_samples)
        if s < k:
            raise ValueError(f"num_samples ({s}) must be >= k ({k}) so that no fold is empty")
        self.num_samples = s
        sizes = torch.full((k,), s // k, dtype=torch.int64)
        sizes[: s % k] += 1
        contiguous = torch.repeat_interleave(torch.arange(k), sizes)
        if shuffle:
            self.folds = torch.empty(s, dtype=torch.int64)
            self.folds[torch.randperm(s, generator=_generator(seed))] = contiguous
        else:
            self.folds = contiguous

    def _fold(self, i: int) -> int:
        if isinstance(i, bool) or not isinstance(i, int) or i < 0:
            raise ValueError(f"model index must be an int >= 0, got {i!r}")
        return i % self.k

    def train_indices(self, i: int) -> Tensor:
        """Model i's training samples (every fold but ``i % k``), int64 ascending."""
        return (self.folds != self._fold(i)).nonzero().squeeze(1)

    def val_indices(self, i: int) -> Tensor:
        """Model i's validation samples (fold ``i % k``), int64 ascending."""
        return (self.folds == self._fold(i)).nonzero().squeeze(1)

    def route_batch(
        self,
        batch: Any,
        sample_ids: Tensor,
        num_models: int | None = None,
        split: str = "train",
    ) -> RoutedBatch:
        """Route a batch whose row j is sample ``sample_ids[j]``: model i gets the rows
        in its ``split`` (``"train"`` or ``"val"``).

        Args:
            batch: a tensor or pytree of tensors ``[B, ...]``.
            sample_ids: integer ``[B]``, the data-set index of each row.
            num_models: N, a multiple of k (default k).
        """
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        n = self.k if num_models is None else _check_count("num_models", num_models)
        if n % self.k:
            raise ValueError(
                f"num_models must be a multiple of k={self.k} so every fold is validated "
                f"equally often; got {n}"
            )
        b, device = _batch_size(batch)
        fold = self.folds[_sample_ids(sample_ids, b, self.num_samples).cpu()]
        in_val = fold[None, :] == (torch.arange(n) % self.k)[:, None]
        return _gather(batch, *_index_from_mask(in_val if split == "val" else ~in_val), device)


class BootstrapRouter:
    """Bagging: model i trains on a bootstrap sample of the data set.

    Model i draws S sample ids uniformly with replacement; sample s appears
    ``multiplicity[i, s]`` times in its training multiset. A routed batch repeats
    each row as often as the model drew its sample, so a mean loss over the routed
    rows is exactly the loss over the part of the model's multiset in the batch
    (``counts`` can exceed B). The samples it never drew are its out-of-bag set.

    Args:
        num_samples: S, the data set size.
        num_models: N.
        seed: an int seed or a CPU ``torch.Generator``.

    Attributes:
        multiplicity: int32 ``[N, S]``, the draws of each sample per model.
    """

    def __init__(self, num_samples: int, num_models: int, seed: Generator = 0) -> None:
        s = _check_count("num_samples", num_samples)
        n = _check_count("num_models", num_models)
        draws = torch.randint(0, s, (n, s), generator=_generator(seed))
        self.multiplicity = torch.zeros(n, s, dtype=torch.int32)
        self.multiplicity.scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.int32))
        self.num_samples = s
        self.num_models = n

    def _check_model(self, i: int) -> int:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.num_models:
            raise ValueError(f"model index must be an int in [0, {self.num_models}), got {i!r}")
        return i

    def bootstrap_indices(self, i: int) -> Tensor:
        """Model i's training multiset: S sample ids, int64 ascending, with repeats."""
        m = self.multiplicity[self._check_model(i)]
        return torch.repeat_interleave(torch.arange(self.num_samples), m.long())

    def oob_indices(self, i: int) -> Tensor:
        """Model i's out-of-bag samples (never drawn), int64 ascending."""
        return (self.multiplicity[self._check_model(i)] == 0).nonzero().squeeze(1)

    def route_batch(self, batch: Any, sample_ids: Tensor, split: str = "train") -> RoutedBatch:
        """Route a batch whose row j is sample ``sample_ids[j]``.

        ``split="train"``: model i gets row j ``multiplicity[i, sample_ids[j]]`` times
        (in batch order); ``"oob"``: once for each out-of-bag row.
        """
        if split not in ("train", "oob"):
            raise ValueError(f"split must be 'train' or 'oob', got {split!r}")
        b, device = _batch_size(batch)
        ids = _sample_ids(sample_ids, b, self.num_samples).cpu()
        mult = self.multiplicity[:, ids].long()  # [N, B]
        if split == "oob":
            return _gather(batch, *_index_from_mask(mult == 0), device)
        n = self.num_models
        rows = torch.repeat_interleave(torch.arange(b).repeat(n), mult.reshape(-1))
        counts = mult.sum(1)
        model_of = torch.repeat_interleave(torch.arange(n), counts)
        return _gather(batch, *_pad_index(rows, model_of, counts), device)


# ------------------------------------------------------------------ for fit
def route_split(
    router: Any, batch: Any, sample_ids: Tensor | None, split: str, num_models: int
) -> RoutedBatch | None:
    """What :func:`modelbatch.fit` routes for one loader item, or None where every
    model sees the whole batch.

    ``split="train"``: each router's training rows. ``split="val"``: k-fold models
    validate on their own fold, bootstrap models on their out-of-bag rows, and
    stratified or random subsets on the whole validation batch. A callable router
    is called as ``router(batch, sample_ids, split)``.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if isinstance(router, DataRouter):
        if router.mode != "passthrough":
            raise ValueError(
                f"DataRouter({router.mode!r}) needs per-batch masks or indices: call "
                "route_batch yourself, or give fit a StratifiedRouter / KFoldRouter / "
                "BootstrapRouter or a callable router(batch, sample_ids, split)"
            )
        return None
    if not isinstance(router, (StratifiedRouter, KFoldRouter, BootstrapRouter)):
        if not callable(router):
            raise ValueError(f"router must be a modelbatch.data router or callable, got {router!r}")
        return router(batch, sample_ids, split)
    if sample_ids is None:
        raise ValueError(
            f"{type(router).__name__} routes by sample id: the loader must yield "
            "(inputs, targets, sample_ids) with each row's index in the data set"
        )
    if isinstance(router, KFoldRouter):
        return router.route_batch(batch, sample_ids, num_models=num_models, split=split)
    if router.num_models != num_models:
        raise ValueError(
            f"the {type(router).__name__} is for {router.num_models} models, the "
            f"ModelBatch has {num_models}"
        )
    if isinstance(router, BootstrapRouter):
        return router.route_batch(batch, sample_ids, split="train" if split == "train" else "oob")
    return router.route_batch(batch, sample_ids) if split == "train" else None


# ----------------------------------------------------------------------- loss
def _per_model_targets(targets: Any, n: int, b_max: int, flag: bool | None) -> Any:
    """Targets as ``[N, B_max, ...]``: per-model ones as they are, shared ``[B_max, ...]``
    ones expanded (as for a mask over a passthrough batch)."""
    leaves, _ = tree_flatten(targets)
    t = next((x for x in leaves if isinstance(x, Tensor)), None)
    if t is None:
        raise ValueError("targets must hold a tensor [N, B_max, ...] or [B_max, ...]")
    per_model = t.dim() >= 2 and tuple(t.shape[:2]) == (n, b_max)
    shared = t.dim() >= 1 and t.shape[0] == b_max
    if flag is not None:
        if flag and not per_model:
            raise ValueError(
                f"targets_per_model=True needs targets [N={n}, B_max={b_max}, ...], "
                f"got {tuple(t.shape)}"
            )
        if not flag and not shared:
            raise ValueError(
                f"targets_per_model=False needs targets [B_max={b_max}, ...], got {tuple(t.shape)}"
            )
        per_model = flag
    elif not (per_model or shared):
        raise ValueError(
            f"targets must be per-model [N={n}, B_max={b_max}, ...] or shared [B_max={b_max}, ...] "
            f"to match the mask; got {tuple(t.shape)}"
        )
    if per_model:
        return targets
    return tree_map(lambda x: x.expand(n, *x.shape) if isinstance(x, Tensor) else x, targets)


def masked_loss(
    batch: Any,
    outputs: Any,
    targets: Any,
    loss_fn: Callable[..., Tensor],
    mask: Tensor,
    reduction: str = "none",
    *,
    targets_per_model: bool | None = None,
) -> Tensor:
    """Per-model losses over the real rows only: entry i is
    ``loss_fn(outputs[i][mask[i]], targets[i][mask[i]])``.

    Exact for losses that are a mean over samples (``F.cross_entropy`` without class
    weights or ignored targets, ``mse_loss``, ``l1_loss``, ``nll_loss``, ...):
    ``loss_fn`` runs on each row as a batch of one (``torch.vmap`` over ``[N * B_max,
    1, ...]``), and each model averages its real rows. Padding is selected away with
    ``torch.where``, never multiplied by 0, so it contributes exactly zero gradient.
    A model with no real row gets loss 0 and zero gradients (so a fused optimizer
    still applies its momentum and weight decay that step).

    Args:
        batch: the ModelBatch (``num_models``; sets ``batch.latest_losses``).
        outputs: ``[N, B_max, ...]`` (or a pytree of such) from the forward.
        targets: per-model ``[N, B_max, ...]`` (routed) or shared ``[B_max, ...]``;
            detected from the shape unless ``targets_per_model`` says which.
        loss_fn: the loss of ONE model, a mean over its batch, returning a scalar.
        mask: bool ``[N, B_max]``, True for the rows each model trains on.
        reduction: ``"none"`` (``[N]``), ``"sum"`` (model i's gradient is that of its
            own loss) or ``"mean"``.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    n = batch.num_models
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
        raise ValueError(f"mask must be a bool tensor [N={n}, B_max], got {_describe(mask)}")
    if mask.shape[0] != n:
        raise ValueError(f"mask is for {mask.shape[0]} models, the ModelBatch has {n}")
    b_max = mask.shape[1]
    out_leaves, out_spec = tree_flatten(outputs)
    for t in out_leaves:
        if isinstance(t, Tensor) and (t.dim() < 2 or tuple(t.shape[:2]) != (n, b_max)):
            raise ValueError(
                f"outputs must be [N={n}, B_max={b_max}, ...] to match the mask, "
                f"got {tuple(t.shape)}"
            )
    targets = _per_model_targets(targets, n, b_max, targets_per_model)

    def rows_of_one(t):
        # [N, B_max, ...] -> [N * B_max, 1, ...]: vmap hands loss_fn one batch of one.
        if not isinstance(t, Tensor):
            return t
        return t.reshape(n * b_max, 1, *t.shape[2:])

    flat_out = tree_unflatten([rows_of_one(t) for t in out_leaves], out_spec)
    flat_tgt = tree_map(rows_of_one, targets)
    interception = getattr(batch, "_interception", None)
    with interception() if interception is not None else contextlib.nullcontext():
        per_row = vmap(loss_fn, randomness="different")(flat_out, flat_tgt)
    if not isinstance(per_row, Tensor) or per_row.shape != (n * b_max,):
        shape = tuple(per_row.shape[1:]) if isinstance(per_row, Tensor) else type(per_row)
        raise ValueError(
            "loss_fn must return one scalar (a mean over its batch, e.g. F.cross_entropy); "
            f"got per-row shape {shape}"
        )
    per_row = per_row.reshape(n, b_max)
    mask = mask.to(per_row.device)
    total = torch.where(mask, per_row, torch.zeros((), dtype=per_row.dtype, device=per_row.device))
    counts = mask.sum(1).clamp(min=1).to(per_row.dtype)
    losses = total.sum(1) / counts
    batch.latest_losses = losses.detach()
    if reduction == "sum":
        return losses.sum()
    if reduction == "mean":
        return losses.mean()
    return losses
