"""HuggingFace transformers: N ``PreTrainedModel``\\ s as one ModelBatch, and a Trainer for it.

Needs the ``[hf]`` extra (``pip install 'modelbatch[hf]'``: transformers, accelerate).

* :class:`HFModelBatch` ``(models)``: a :class:`~modelbatch.ModelBatch` of N
  ``transformers.PreTrainedModel``\\ s of one class and one config (up to names and
  paths), e.g. N seeds or N learning rates of one architecture. ``forward(**inputs)``
  takes the HF keyword inputs, shared by all models (``input_ids [B, T]``,
  ``attention_mask [B, T]``, ``labels [B]`` ...) or one set per model (``[N, B, T]``,
  ``labels [N, B]``), and returns the ``ModelOutput`` class one model returns with
  every tensor stacked along a leading model axis: ``logits [N, B, C]``, ``loss [N]``
  (model i's own loss), ``hidden_states``: a tuple of ``[N, B, T, H]``.
  ``save_pretrained(dir)`` writes ``dir/model_{i}/`` (``config.json`` +
  ``model.safetensors``, a standard HF folder that ``AutoModel*.from_pretrained``
  loads) per model; ``HFModelBatch.from_pretrained(dir or [folders])`` builds the
  batch back.
* :class:`HFTrainerMixin` and ``ModelBatchTrainer(HFTrainerMixin, transformers.Trainer)``
  (also ``BundledTrainer``): the Trainer's loop trains all N models at once, each as
  a plain Trainer would train it alone with its own hyper-parameters
  (``learning_rates``, ``weight_decays``, ``max_grad_norms``: N values each): one
  fused per-model optimizer (``modelbatch.optim``), the Trainer's LR schedule in
  every model's param group, per-model gradient clipping, per-model logs
  (``loss_model_{i}``, ``loss_best``, ``loss_median``), per-model evaluation
  (``eval_loss_model_{i}``, ``eval_<metric>_model_{i}``) and one HF folder per model
  in every checkpoint.

Attention: the template (the module whose code runs all N models under ``vmap``) is
switched to ``attn_implementation="eager"`` by default. Both ``"eager"`` and ``"sdpa"``
give each model exactly its own outputs (dropout included: attention dropout is drawn
from each model's stream either way), but torch has no vmap batching rule for the
CPU flash kernel of SDPA, so ``"sdpa"`` runs it through vmap's slow per-sample
fallback in eval; pass ``attn_implementation=None`` to keep the models' own. The two
differ only in query rows with no key to attend to (left padding in a decoder),
which losses ignore (labels -100 there), so a model trained here with "eager"
matches its "sdpa" run alone.

Per-model padding masks: transformers decides in Python whether a mask can be left
out ("any padding?"), which vmap cannot evaluate on a per-model mask; importing this
module wraps those two checks in ``transformers.masking_utils`` so that they answer
"keep the mask" for a vmap-batched mask (always correct; leaving it out is only a
shortcut) and behave as before for every other tensor.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch._C import _functorch
from torch.func import functional_call
from torch.utils._pytree import tree_map

from modelbatch import optim
from modelbatch.clip import clip_grad_norm_
from modelbatch.core import ModelBatch, model_indices
from modelbatch.integrations import require
from modelbatch.optim._base import per_model

transformers = require("transformers", "hf")
require("accelerate", "hf")  # (transformers.Trainer's own dependency)
from transformers import masking_utils  # noqa: E402
from transformers.trainer_pt_utils import find_batch_size  # noqa: E402
from transformers.trainer_utils import EvalLoopOutput, EvalPrediction  # noqa: E402
from transformers.utils.generic import can_return_loss, find_labels  # noqa: E402

__all__ = ["BundledTrainer", "HFModelBatch", "HFTrainerMixin", "ModelBatchTrainer"]

_META_FILE = "modelbatch.json"
_RNG_FILE = "rng.pt"
_MODEL_DIR = re.compile(r"^model_(\d+)$")
# Config entries that name or describe a model but do not change what it computes
# (the template's code runs every model; these may differ between them).
_NAMING_KEYS = frozenset(
    {
        "_name_or_path",
        "name_or_path",
        "transformers_version",
        "_commit_hash",
        "architectures",
        "dtype",
        "torch_dtype",
        "_attn_implementation",
        "_attn_implementation_internal",
        "_attn_implementation_autoset",
        "attn_implementation",
        # how a forward is run and what it returns, not what it computes (the
        # template's values apply to every model)
        "use_cache",
        "output_hidden_states",
        "output_attentions",
        "return_dict",
    }
)
# Filled in by a model's first forward when None (BERT's problem_type from the labels).
_INFERRED_KEYS = frozenset({"problem_type"})
# One model's rank of the inputs that tell shared [B, ...] from per-model [N, B, ...].
_ONE_MODEL_RANK = {
    "input_ids": 2,
    "inputs_embeds": 3,
    "attention_mask": 2,
    "token_type_ids": 2,
    "position_ids": 2,
    "pixel_values": 4,
    "input_values": 2,
    "input_features": 3,
}


def _skip_unless_batched(fn: Callable) -> Callable:
    """``fn`` (a "may this mask be left out?" check of transformers' masking_utils),
    answering False for a padding mask batched by a vmap (per-model masks inside a
    ModelBatch): the check reads the mask's values in Python, which vmap cannot do,
    and keeping the mask is always correct (leaving it out is only a shortcut)."""

    def check(padding_mask, *args, **kwargs):
        if isinstance(padding_mask, torch.Tensor) and _functorch.is_batchedtensor(padding_mask):
            return False
        return fn(padding_mask, *args, **kwargs)

    check.__wrapped__ = fn
    check._modelbatch = True
    return check


def _patch_masking_utils() -> None:
    for name in ("_ignore_causal_mask_sdpa", "_ignore_bidirectional_mask_sdpa"):
        fn = getattr(masking_utils, name, None)
        # (absent in other transformers versions: per-model masks then take the
        # per-model path, still correct)
        if fn is not None and not getattr(fn, "_modelbatch", False):
            setattr(masking_utils, name, _skip_unless_batched(fn))


_patch_masking_utils()


def _config_dict(config) -> dict[str, Any]:
    return {k: v for k, v in config.to_dict().items() if k not in _NAMING_KEYS}


def _check_models(models: Sequence[Any]) -> None:
    """Raise ValueError naming the first model that is no PreTrainedModel, of another
    class or of another config (beyond names and paths) than model 0."""
    if len(models) == 0:
        raise ValueError("HFModelBatch needs at least one model; got an empty list")
    for i, m in enumerate(models):
        if not isinstance(m, transformers.PreTrainedModel):
            raise ValueError(
                f"HFModelBatch takes transformers.PreTrainedModel instances; model {i} is a "
                f"{type(m).__name__} (use modelbatch.ModelBatch for other modules)"
            )
    ref, ref_cfg = models[0], _config_dict(models[0].config)
    for i, m in enumerate(models[1:], start=1):
        if type(m) is not type(ref):
            raise ValueError(
                f"model {i} is a {type(m).__name__}, model 0 a {type(ref).__name__}: all models "
                "of an HFModelBatch must be of one architecture (one class, one config)"
            )
        cfg = _config_dict(m.config)
        diff = sorted(
            k
            for k in set(cfg) | set(ref_cfg)
            if cfg.get(k) != ref_cfg.get(k)
            and not (k in _INFERRED_KEYS and None in (cfg.get(k), ref_cfg.get(k)))
        )
        if diff:
            shown = ", ".join(f"{k}={cfg.get(k)!r} vs {ref_cfg.get(k)!r}" for k in diff[:5])
            raise ValueError(
                f"model {i} has another config than model 0 ({shown}"
                f"{', ...' if len(diff) > 5 else ''}): an HFModelBatch runs one model's code "
                "for all N, so their configs must agree (only names and paths may differ); "
                "vary seeds and optimizer hyper-parameters instead"
            )


class HFModelBatch(ModelBatch):
    """N ``transformers.PreTrainedModel``\\ s of one architecture trained as one.

    Args:
        models: the N models (one class; configs equal up to names and paths). Their
            weights are copied and each one's config is kept for :meth:`save_pretrained`.
        attn_implementation: the attention the template runs (default ``"eager"``; see
            the module docstring); None keeps model 0's.
        shared_input: how inputs are read when they do not say it themselves (when no
            ``input_ids`` / ``inputs_embeds`` / ``attention_mask`` / ``pixel_values``
            ... is passed); see :meth:`forward`.
        seeds, rng, intercept, fallback: as for :class:`~modelbatch.ModelBatch`
            (``rng="philox"``: every model draws its dropout masks from its own stream).

    Attributes ``config`` (the template's), ``configs`` (each model's own),
    ``main_input_name`` and ``accepts_loss_kwargs`` are those the Trainer reads of one
    model.
    """

    def __init__(
        self,
        models: Iterable[Any],
        shared_input: bool = True,
        *,
        seeds: int | Sequence[int] | torch.Tensor | None = None,
        rng: str | None = "philox",
        intercept: bool = True,
        fallback: bool = True,
        attn_implementation: str | None = "eager",
    ) -> None:
        models = list(models)
        _check_models(models)
        super().__init__(
            models, shared_input, seeds=seeds, rng=rng, intercept=intercept, fallback=fallback
        )
        self._configs = [copy.deepcopy(m.config) for m in models]
        self._attn = [m.config._attn_implementation for m in models]
        if attn_implementation is not None:
            self.template.set_attn_implementation(attn_implementation)
        self._forward_params = list(inspect.signature(self.template.forward).parameters)
        self._static_kwargs: dict[str, Any] = {}
        self.last_inputs_per_model: bool | None = None

    # ------------------------------------------------------ what the Trainer reads
    @property
    def config(self):
        """The template's config (the one every model runs with)."""
        return self.template.config

    @property
    def configs(self) -> list[Any]:
        """Each model's own config (the template's, with the model's names and paths)."""
        return [self._model_config(i) for i in range(self.num_models)]

    @property
    def main_input_name(self) -> str:
        return self.template.main_input_name

    @property
    def accepts_loss_kwargs(self) -> bool:
        # What the Trainer decides for one model: whether to pass num_items_in_batch.
        one = self.template
        if hasattr(one, "accepts_loss_kwargs"):
            return bool(one.accepts_loss_kwargs)
        params = inspect.signature(one.forward).parameters.values()
        return any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params)

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """All N models' parameters (the Trainer's FLOP estimate reads this)."""
        one = self.template.num_parameters(
            only_trainable=only_trainable, exclude_embeddings=exclude_embeddings
        )
        return self.num_models * int(one)

    # ------------------------------------------------------------------- forward
    def _named(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The inputs by name (positional ones named after the models' forward)."""
        return {**dict(zip(self._forward_params, args)), **kwargs}

    def _inputs_per_model(self, args: tuple, kwargs: dict[str, Any], flag: bool | None) -> bool:
        if flag is not None:
            return bool(flag)
        named = self._named(args, kwargs)
        for name, rank in _ONE_MODEL_RANK.items():
            t = named.get(name)
            if isinstance(t, torch.Tensor):
                if t.dim() == rank:
                    return False
                if t.dim() == rank + 1:
                    return True
                raise ValueError(
                    f"HFModelBatch: {name} must be shared [B, ...] ({rank} dims, as one model "
                    f"takes it) or per-model [N={self.num_models}, B, ...] ({rank + 1} dims); "
                    f"got shape {tuple(t.shape)}"
                )
        return not self.shared_input

    def forward(self, *args: Any, inputs_per_model: bool | None = None, **kwargs: Any) -> Any:
        """All N models on the HF keyword inputs.

        Inputs are shared (``input_ids [B, T]``, ``labels [B]``: every model sees them)
        or per model (``input_ids [N, B, T]``, ``labels [N, B]``: model i sees row i),
        told apart by the rank of ``input_ids`` (or ``inputs_embeds``,
        ``attention_mask``, ``pixel_values`` ...); ``inputs_per_model`` says it
        explicitly. Per-model inputs must all have the leading N. Arguments that are
        no batch (scalars, 0-d tensors such as the Trainer's ``num_items_in_batch``,
        flags) go to every model unchanged. ``use_cache`` is False (no key/value caches:
        generate with :meth:`model`).

        Returns the models' ``ModelOutput`` class with every tensor stacked ``[N, ...]``:
        ``loss [N]`` when labels are given, ``logits [N, B, ...]``.
        """
        per = self._inputs_per_model(args, kwargs, inputs_per_model)
        if kwargs.get("use_cache"):
            raise ValueError(
                "HFModelBatch: use_cache=True is not supported (a vmapped forward returns "
                "tensors only, not the models' key/value caches; generate with batch.model(i))"
            )
        if "use_cache" in self._forward_params:
            # (decoders default to returning a cache object, which vmap cannot stack)
            kwargs = {"use_cache": False, **kwargs}
        static = {
            k: v for k, v in kwargs.items() if not (isinstance(v, torch.Tensor) and v.dim() > 0)
        }
        batched = {k: v for k, v in kwargs.items() if k not in static}
        if per:
            for k, v in self._named(args, batched).items():
                if not isinstance(v, torch.Tensor):
                    continue
                if v.shape[0] != self.num_models or v.dim() < 2:
                    raise ValueError(
                        f"HFModelBatch: per-model inputs must be [N={self.num_models}, B, ...]; "
                        f"{k} has shape {tuple(v.shape)} (pass shared inputs [B, ...] to feed "
                        "every model the same batch)"
                    )
        shared, self.shared_input = self.shared_input, not per
        self._static_kwargs = static
        try:
            out = super().forward(*args, **batched)
        finally:
            self.shared_input = shared
            self._static_kwargs = {}
        self.last_inputs_per_model = per
        return out

    def _call_one(self, params, buffers, args, kwargs):
        return functional_call(
            self.template, (params, buffers), args, {**kwargs, **self._static_kwargs}
        )

    def select(self, indices: Sequence[int] | torch.Tensor) -> HFModelBatch:
        """:meth:`ModelBatch.select`, keeping the selected models' own configs."""
        new = super().select(indices)
        idx = model_indices(indices, self.num_models, "HFModelBatch.select")
        new._configs = [copy.deepcopy(self._configs[i]) for i in idx]
        new._attn = [self._attn[i] for i in idx]
        new.template.set_attn_implementation(self.template.config._attn_implementation)
        return new

    # -------------------------------------------------------------- save / load
    def _model_config(self, i: int):
        cfg = copy.deepcopy(self.template.config)
        for key in ("_name_or_path", "architectures"):
            if hasattr(self._configs[i], key):
                setattr(cfg, key, copy.deepcopy(getattr(self._configs[i], key)))
        return cfg

    def model(self, i: int):
        """Model i as a standalone ``PreTrainedModel`` of the original class, with its
        weights, its own config and its own attention implementation."""
        m = super().model(i)
        i %= self.num_models
        mine = self._configs[i]
        for key in ("_name_or_path", "architectures"):
            if hasattr(mine, key):
                setattr(m.config, key, copy.deepcopy(getattr(mine, key)))
        if self._attn[i] is not None and m.config._attn_implementation != self._attn[i]:
            m.set_attn_implementation(self._attn[i])
        return m

    def save_pretrained(self, directory: str | os.PathLike, **kwargs: Any) -> list[str]:
        """Write ``directory/model_{i}/`` per model (``model.save_pretrained``: config.json
        + model.safetensors), plus ``modelbatch.json`` and ``rng.pt`` (the random
        streams) for :meth:`from_pretrained`. ``kwargs`` go to each ``save_pretrained``.
        Returns the N folders."""
        os.makedirs(directory, exist_ok=True)
        paths = []
        for i in range(self.num_models):
            path = os.path.join(directory, f"model_{i}")
            self.model(i).save_pretrained(path, **kwargs)
            paths.append(path)
        if self.rng is not None:
            target = os.path.join(directory, _RNG_FILE)
            torch.save(self.rng_state(), target + ".tmp")
            os.replace(target + ".tmp", target)
        meta = {
            "num_models": self.num_models,
            "class": type(self.template).__name__,
            "rng": self.rng,
            "seeds": None if self.seeds is None else self.seeds.tolist(),
        }
        target = os.path.join(directory, _META_FILE)
        with open(target + ".tmp", "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(target + ".tmp", target)
        return paths

    @staticmethod
    def _folders(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
        if not isinstance(source, str | os.PathLike):
            folders = [os.fspath(s) for s in source]
            if not folders:
                raise ValueError("HFModelBatch.from_pretrained: the list of folders is empty")
            return folders
        source = os.fspath(source)
        if not os.path.isdir(source):
            raise ValueError(f"HFModelBatch.from_pretrained: {source} is not a directory")
        found = {}
        for name in os.listdir(source):
            m = _MODEL_DIR.match(name)
            if m and os.path.isdir(os.path.join(source, name)):
                found[int(m.group(1))] = os.path.join(source, name)
        if not found:
            raise ValueError(
                f"{source} holds no model_{{i}} folders (written by HFModelBatch.save_pretrained)"
            )
        missing = sorted(set(range(max(found) + 1)) - set(found))
        if missing:
            raise ValueError(f"{source}: model folders {missing} are missing")
        return [found[i] for i in range(len(found))]

    @staticmethod
    def _model_class(folder: str, model_cls: Any):
        if model_cls is not None:
            return model_cls
        with open(os.path.join(folder, "config.json")) as f:
            archs = json.load(f).get("architectures") or []
        cls = getattr(transformers, archs[0], None) if archs else None
        if cls is None:
            raise ValueError(
                f"{folder}/config.json names no transformers class (architectures={archs}); "
                "pass model_cls (e.g. transformers.AutoModelForSequenceClassification)"
            )
        return cls

    @classmethod
    def from_pretrained(
        cls,
        source: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        model_cls: Any = None,
        attn_implementation: str | None = "eager",
        seeds: int | Sequence[int] | torch.Tensor | None = None,
        rng: str | None = None,
        **kwargs: Any,
    ) -> HFModelBatch:
        """An HFModelBatch of the models in ``source``: a directory written by
        :meth:`save_pretrained` (its ``model_{i}`` folders, seeds and random streams)
        or a list of HF model folders (or hub ids), one per model.

        ``model_cls``: the class to load each with (default: the ``architectures`` of
        the first ``config.json``; e.g. ``AutoModelForSequenceClassification``).
        ``rng`` (default: the saved one, else ``"philox"``) and ``seeds`` (default: the
        saved ones) as for the constructor; ``kwargs`` go to each ``from_pretrained``.
        """
        is_dir = isinstance(source, str | os.PathLike)
        folders = cls._folders(source)
        meta: dict[str, Any] = {}
        if is_dir and os.path.isfile(os.path.join(source, _META_FILE)):
            with open(os.path.join(source, _META_FILE)) as f:
                meta = json.load(f)
        klass = cls._model_class(folders[0], model_cls) if os.path.isdir(folders[0]) else model_cls
        if klass is None:
            klass = transformers.AutoModel
        models = [klass.from_pretrained(p, **kwargs) for p in folders]
        rng = rng if rng is not None else meta.get("rng", "philox")
        if seeds is None and rng is not None:
            seeds = meta.get("seeds")
        batch = cls(models, attn_implementation=attn_implementation, seeds=seeds, rng=rng)
        rng_path = os.path.join(source, _RNG_FILE) if is_dir else None
        if rng_path and batch.rng == meta.get("rng") and os.path.isfile(rng_path):
            batch.set_rng_state(torch.load(rng_path, map_location="cpu", weights_only=True))
        return batch

    def load_pretrained(
        self,
        source: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        model_cls: Any = None,
        **kwargs: Any,
    ) -> None:
        """Load the weights (and, from a :meth:`save_pretrained` directory, the random
        streams) of ``source`` into this batch; every folder is read and checked first."""
        folders = self._folders(source)
        if len(folders) != self.num_models:
            raise ValueError(
                f"load_pretrained: {source} holds {len(folders)} models, this batch has "
                f"{self.num_models}"
            )
        klass = model_cls or type(self.template)
        models = [klass.from_pretrained(p, **kwargs) for p in folders]
        _check_models([self.template, *models])
        states = [m.state_dict() for m in models]
        rng_state = None
        if isinstance(source, str | os.PathLike) and self.rng is not None:
            rng_path = os.path.join(source, _RNG_FILE)
            if os.path.isfile(rng_path):
                rng_state = torch.load(rng_path, map_location="cpu", weights_only=True)
                self._check_rng_state(rng_state)
        self.load_model_states(states)
        if rng_state is not None:
            self.set_rng_state(rng_state)


# ----------------------------------------------------------------- optimizers
class _NoDecayMixin:
    """A fused optimizer that, like the Trainer's, leaves some parameters (biases,
    LayerNorm weights) out of weight decay: those get a second kernel launch with a
    zero weight-decay vector, every other hyper-parameter and the step count as the
    rest's."""

    _no_decay: frozenset[int] = frozenset()

    def set_no_decay(self, names: Iterable[str]) -> None:
        """Exclude the parameters ``names`` (one model's names) from weight decay."""
        batch_names = list(self.batch.stacked_params())
        stacked = self.batch.stacked_params()
        by_id = {id(p): k for k, p in enumerate(self._params)}
        idx = set()
        for name in names:
            if name not in stacked:
                raise ValueError(f"no parameter {name!r} in the models (they have {batch_names})")
            if id(stacked[name]) in by_id:
                idx.add(by_id[id(stacked[name])])
        self._no_decay = frozenset(idx)

    def _launch(self, idx, params, grads, steps, device, inv_scale=None, found_inf=None):
        plain = [j for j, k in enumerate(idx) if k in self._no_decay]
        if not plain:
            return super()._launch(idx, params, grads, steps, device, inv_scale, found_inf)
        decay = [j for j, k in enumerate(idx) if k not in self._no_decay]
        extra = self._extra_state()
        start = steps.clone()
        zero_wd = torch.zeros_like(self.hparam("weight_decay", device))

        def hp(name):
            return self.hparam(name, device)

        def hp_no_decay(name):
            return zero_wd if name == "weight_decay" else self.hparam(name, device)

        # The kernel advances the step count it is given: the first launch advances
        # ``steps`` (which the caller keeps), the second a copy of where it started.
        first = True
        for part, hparams in ((decay, hp), (plain, hp_no_decay)):
            if not part:
                continue
            self._kernel(
                [params[j] for j in part],
                [grads[j] for j in part],
                self._state_lists([idx[j] for j in part], extra),
                steps if first else start.clone(),
                hparams,
                inv_scale,
                found_inf,
            )
            first = False

    def select(self, indices, *, batch):
        new = super().select(indices, batch=batch)
        new._no_decay = self._no_decay  # the same parameters, in the same order
        return new


class TrainerAdamW(_NoDecayMixin, optim.AdamW):
    """:class:`modelbatch.optim.AdamW` with the Trainer's no-decay parameters."""


class TrainerAdam(_NoDecayMixin, optim.Adam):
    """:class:`modelbatch.optim.Adam` with the Trainer's no-decay parameters."""


class TrainerSGD(_NoDecayMixin, optim.SGD):
    """:class:`modelbatch.optim.SGD` with the Trainer's no-decay parameters."""


_TRAINER_OPTIMIZERS = {
    torch.optim.AdamW: TrainerAdamW,
    torch.optim.Adam: TrainerAdam,
    torch.optim.SGD: TrainerSGD,
    optim.AdamW: TrainerAdamW,
    optim.Adam: TrainerAdam,
    optim.SGD: TrainerSGD,
}
_IMPL_KEYS = {"fused", "foreach", "capturable", "differentiable", "maximize"}


# -------------------------------------------------------------------- trainer
def _detach(t: Any) -> Any:
    return t.detach() if isinstance(t, torch.Tensor) else t


def _torch_model_slice(tree: Any, i: int) -> Any:
    return tree_map(lambda t: t[..., i] if isinstance(t, torch.Tensor) else t, tree)


def _model_axis_last(tree: Any) -> Any:
    return tree_map(lambda t: t.movedim(0, -1) if isinstance(t, torch.Tensor) else t, tree)


def _np_model_axis_first(tree: Any) -> Any:
    if isinstance(tree, np.ndarray):
        return np.moveaxis(tree, -1, 0)
    if isinstance(tree, list | tuple):
        return type(tree)(_np_model_axis_first(t) for t in tree)
    if isinstance(tree, dict):
        return {k: _np_model_axis_first(v) for k, v in tree.items()}
    return tree


def _np_model_slice(tree: Any, i: int) -> Any:
    if isinstance(tree, np.ndarray):
        return tree[..., i]
    if isinstance(tree, list | tuple):
        return type(tree)(_np_model_slice(t, i) for t in tree)
    if isinstance(tree, dict):
        return {k: _np_model_slice(v, i) for k, v in tree.items()}
    return tree


def _summary(prefix: str, values: Sequence[float]) -> dict[str, float]:
    """``{prefix_model_i, prefix_best, prefix_median}`` of per-model losses (NaN-aware)."""
    out = {f"{prefix}_model_{i}": float(v) for i, v in enumerate(values)}
    arr = np.asarray(values, dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    out[f"{prefix}_best"] = float(finite.min()) if finite.size else math.nan
    out[f"{prefix}_median"] = float(np.median(finite)) if finite.size else math.nan
    return out


class HFTrainerMixin:
    """Makes a ``transformers.Trainer`` (subclass) train an :class:`HFModelBatch`, each
    model exactly as that Trainer would train it alone with its own hyper-parameters.

    Mix it in before the Trainer: ``class MyTrainer(HFTrainerMixin, MyOwnTrainer)``.

    Args (keywords, besides the Trainer's own; ``model`` must be an HFModelBatch):
        learning_rates: N peak learning rates (default: ``args.learning_rate`` for all);
            the Trainer's schedule (``lr_scheduler_type``, warm-up) drives each model's.
        weight_decays: N weight decays (default: ``args.weight_decay``); biases and
            LayerNorm weights are left out, as the Trainer does.
        max_grad_norms: N clipping norms (default ``args.max_grad_norm``); each model is
            clipped by its own gradient norm. Clipping runs when ``args.max_grad_norm``
            > 0, as in the Trainer.

    What changes, where (the Trainer's hooks):

    * ``create_optimizer``: ``args.optim`` in adamw_torch(_fused) / sgd (or
      ``optimizer_cls_and_kwargs`` of torch/modelbatch AdamW, Adam, SGD) becomes the
      fused modelbatch optimizer with N learning rates and weight decays, the
      Trainer's betas / eps / optim_args, one param group per model;
    * ``compute_loss``: the models' losses ``[N]`` (their own ``loss``, or
      ``compute_loss_func`` / label smoothing per model); the loss the Trainer
      backprops is their SUM, so model i's gradient is that of its own loss;
    * ``_clip_grad_norm`` / ``_get_grad_norm``: :func:`modelbatch.clip_grad_norm_`;
    * ``log``: ``loss`` becomes the mean over models, with ``loss_model_{i}``,
      ``loss_best``, ``loss_median``, ``grad_norm_model_{i}`` and (when they differ)
      ``learning_rate_model_{i}``; ``train_loss`` likewise at the end;
    * ``prediction_step`` / ``evaluation_loop``: ``eval_loss_model_{i}`` (each model's
      Trainer eval loss), ``eval_loss`` their mean, ``eval_loss_best`` / ``_median``;
      ``compute_metrics`` (written for one model) runs per model and gives
      ``eval_<name>_model_{i}`` and ``eval_<name>`` (mean over models); predictions
      come back ``[N, S, ...]``;
    * ``_save`` / ``_load_from_checkpoint`` / ``_load_best_model``: a checkpoint holds
      ``model_{i}/`` HF folders (see :meth:`HFModelBatch.save_pretrained`) next to
      the Trainer's optimizer, scheduler and state files.

    Not supported: ``fp16=True`` (the Trainer's one loss scale for all models; use
    ``bf16`` or :class:`modelbatch.amp.GradScaler` in a loop of your own),
    DataParallel (several GPUs in one process), DeepSpeed / FSDP,
    ``batch_eval_metrics``; the Trainer's collator gives shared inputs only.
    """

    def __init__(
        self,
        *args: Any,
        learning_rates: Sequence[float] | torch.Tensor | None = None,
        weight_decays: Sequence[float] | torch.Tensor | None = None,
        max_grad_norms: Sequence[float] | torch.Tensor | None = None,
        **kwargs: Any,
    ) -> None:
        self._mb_hparams = {
            "learning_rates": learning_rates,
            "weight_decays": weight_decays,
            "max_grad_norms": max_grad_norms,
        }
        super().__init__(*args, **kwargs)
        batch = self._batch
        n = batch.num_models
        for name, value in self._mb_hparams.items():
            if value is not None:
                per_model(name, value, n)  # raises for a wrong count
        args_ = self.args
        if args_.fp16:
            raise ValueError(
                f"{type(self).__name__}: fp16=True is not supported: the Trainer's GradScaler "
                "keeps one loss scale for all models (one model's overflow would skip every "
                "model's step) and unscales through param_groups[i]['params'], which the fused "
                "per-model optimizer leaves empty; use bf16=True"
            )
        if args_.n_gpu > 1:
            raise ValueError(
                f"{type(self).__name__}: DataParallel over {args_.n_gpu} GPUs is not supported; "
                "run on one device (CUDA_VISIBLE_DEVICES) or one process per device"
            )
        if args_.batch_eval_metrics and self.compute_metrics is not None:
            raise ValueError(
                f"{type(self).__name__}: batch_eval_metrics is not supported (compute_metrics "
                "runs once per model on the gathered predictions)"
            )
        # The Trainer read these off HFModelBatch's class; they are the models'.
        one = type(batch.template)
        if args_.label_names is None:
            self.label_names = find_labels(one)
        self.can_return_loss = can_return_loss(one)
        self._mb_reset()

    # -------------------------------------------------------------- helpers
    @property
    def _batch(self) -> HFModelBatch:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not isinstance(model, HFModelBatch):
            raise ValueError(
                f"{type(self).__name__} trains an HFModelBatch (modelbatch.integrations."
                f"huggingface.HFModelBatch([...])), got a {type(model).__name__}"
            )
        return model

    def _mb_reset(self) -> None:
        self._mb_step_losses: torch.Tensor | None = None  # [N] of the latest compute_loss
        self._mb_tr_losses: torch.Tensor | None = None  # [N] since the last log
        self._mb_total_losses: torch.Tensor | None = None  # [N] over this train() call
        self._mb_last_logged: int | None = None
        self._mb_first_step: int | None = None
        self._mb_grad_norms: torch.Tensor | None = None
        self._mb_lrs: list[float] | None = None
        # per eval batch: (losses [N], the rows the Trainer's eval loss counts)
        self._mb_eval_losses: list[tuple[torch.Tensor, int]] = []

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            params = inspect.signature(self._batch.template.forward).parameters
            self._signature_columns = list(params) + list(
                set(["label", "label_ids", *self.label_names])
            )

    def train(self, *args: Any, **kwargs: Any):
        self._mb_reset()
        out = super().train(*args, **kwargs)
        # The Trainer's training_loss is over the summed loss; report the models' mean.
        loss = out.metrics.get("train_loss", out.training_loss)
        return transformers.trainer_utils.TrainOutput(out.global_step, loss, out.metrics)

    # ------------------------------------------------------------ optimizer
    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        batch = self._batch
        n = batch.num_models
        if self.optimizer_cls_and_kwargs is not None:
            cls, kwargs = self.optimizer_cls_and_kwargs
        else:
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, batch)
        fused = _TRAINER_OPTIMIZERS.get(cls)
        if fused is None:
            name = getattr(self.args.optim, "value", self.args.optim)
            raise ValueError(
                f"{type(self).__name__}: optim={name!r} "
                f"({getattr(cls, '__name__', cls)}) has no fused per-model version; use "
                "optim='adamw_torch' or 'sgd', or pass "
                "optimizers=(modelbatch.optim.<...>(batch, ...), None)"
            )
        hp = {k: v for k, v in kwargs.items() if k not in _IMPL_KEYS}
        lr = self._mb_hparams["learning_rates"]
        hp["lr"] = per_model("learning_rates", hp.get("lr", 0.0) if lr is None else lr, n)
        wd = self._mb_hparams["weight_decays"]
        hp["weight_decay"] = per_model(
            "weight_decays", self.args.weight_decay if wd is None else wd, n
        )
        accepted = set(inspect.signature(fused.__init__).parameters) - {"self", "batch"}
        unknown = sorted(set(hp) - accepted)
        if unknown:
            raise ValueError(
                f"{type(self).__name__}: {fused.__name__} does not take {unknown} "
                f"(accepted: {sorted(accepted)})"
            )
        opt = fused(batch, **hp)
        decay = set(self.get_decay_parameter_names(batch.template))
        trainable = [n_ for n_, p in batch.template.named_parameters() if p.requires_grad]
        opt.set_no_decay(n_ for n_ in trainable if n_ not in decay)
        self.optimizer = opt
        return opt

    def _get_learning_rate(self) -> float:
        groups = getattr(self.optimizer, "param_groups", None) or []
        # Called right after the optimizer step: the rates that step used.
        self._mb_lrs = [float(g["lr"]) for g in groups if "lr" in g] or None
        return super()._get_learning_rate()

    # ----------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batch = self._batch
        if (self.label_smoother is not None or self.compute_loss_func is not None) and (
            "labels" in inputs
        ):
            inputs = dict(inputs)
            labels = inputs.pop("labels")
        else:
            labels = None
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            inputs = {**inputs, "num_items_in_batch": num_items_in_batch}
        outputs = model(**inputs)
        if self.compute_loss_func is not None:
            fn = self.compute_loss_func

            def loss_fn(out, lab):
                return fn(out, lab, num_items_in_batch=num_items_in_batch)

            losses = batch.compute_loss(outputs, labels, loss_fn, reduction="none")
        elif labels is not None:
            causal = transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
            shift = batch.template._get_name() in causal.values()

            def loss_fn(out, lab):
                return self.label_smoother(
                    out, lab, shift_labels=shift, num_items_in_batch=num_items_in_batch
                )

            losses = batch.compute_loss(outputs, labels, loss_fn, reduction="none")
        else:
            if isinstance(outputs, dict) and "loss" not in outputs:
                raise ValueError(
                    "The models did not return a loss from the inputs, only the following keys: "
                    f"{','.join(outputs.keys())}. For reference, the inputs they received are "
                    f"{','.join(inputs.keys())}."
                )
            losses = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
        n = batch.num_models
        if not isinstance(losses, torch.Tensor) or losses.shape != (n,):
            got = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses)
            raise ValueError(f"expected one loss per model, [N={n}]; got {got}")
        if (
            self.args.average_tokens_across_devices
            and (self.model_accepts_loss_kwargs or self.compute_loss_func)
            and num_items_in_batch is not None
        ):
            losses = losses * (self.accelerator.num_processes // self.get_tp_size())
        batch.latest_losses = losses.detach()
        self._mb_step_losses = losses.detach()
        loss = losses.sum()
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._mb_last_logged is None:
            self._mb_last_logged = self._mb_first_step = self.state.global_step
        loss = super().training_step(model, inputs, num_items_in_batch)
        per = self._mb_step_losses
        # What the Trainer did to the scalar it returned, done to each model's loss.
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:
            scaled = (
                self.model_accepts_loss_kwargs and num_items_in_batch is not None
            ) or self.compute_loss_func is not None
        if not scaled:
            per = per / self.current_gradient_accumulation_steps
        if self._mb_tr_losses is None:
            self._mb_tr_losses = torch.zeros_like(per)
            self._mb_total_losses = torch.zeros_like(per)
        if self.args.logging_nan_inf_filter:
            # The Trainer's filter, per model: a non-finite loss counts as the mean so far.
            since = 1 + self.state.global_step - self._mb_last_logged
            per = torch.where(torch.isfinite(per), per, self._mb_tr_losses / since)
        self._mb_tr_losses += per
        self._mb_total_losses += per
        return loss

    # ------------------------------------------------------------- clipping
    def _clip_grad_norm(self, model):
        norm = self._mb_hparams["max_grad_norms"]
        return clip_grad_norm_(self._batch, self.args.max_grad_norm if norm is None else norm)

    def _get_grad_norm(self, model, grad_norm=None):
        if grad_norm is None:  # max_grad_norm == 0: measure only (a scale by 1 is exact)
            grad_norm = clip_grad_norm_(self._batch, math.inf)
        self._mb_grad_norms = grad_norm.detach()
        # The one norm the Trainer logs: that of all models' gradients together.
        return torch.linalg.vector_norm(grad_norm.double()).float()

    # -------------------------------------------------------------- logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        step = self.state.global_step
        if "loss" in logs and self._mb_tr_losses is not None and step > self._mb_last_logged:
            per = (self._mb_tr_losses / (step - self._mb_last_logged)).double().cpu().tolist()
            self._mb_tr_losses.zero_()
            self._mb_last_logged = step
            logs["loss"] = float(np.mean(per))
            logs.update(_summary("loss", per))
            if self._mb_grad_norms is not None:
                norms = self._mb_grad_norms.double().cpu().tolist()
                logs.update({f"grad_norm_model_{i}": v for i, v in enumerate(norms)})
            if self._mb_lrs is not None and len(set(self._mb_lrs)) > 1:
                logs.update({f"learning_rate_model_{i}": v for i, v in enumerate(self._mb_lrs)})
        if "train_loss" in logs and self._mb_total_losses is not None:
            steps = max(step - self._mb_first_step, 0.001)
            per = (self._mb_total_losses / steps).double().cpu().tolist()
            logs["train_loss"] = float(np.mean(per))
            logs.update({f"train_loss_model_{i}": v for i, v in enumerate(per)})
        super().log(logs, start_time)

    # ----------------------------------------------------------- evaluation
    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """``(loss, logits [B, ..., N], labels)``: the model axis goes last so the
        Trainer's concatenation (along the batch) and padding (along dim 1) apply. The
        loss handed to the Trainer's loop is the models' mean (the loop tiles and
        truncates it as one number per row); each model's is kept for
        :meth:`evaluation_loop`."""
        batch = self._batch
        has_labels = bool(self.label_names) and all(
            inputs.get(k) is not None for k in self.label_names
        )
        return_loss = inputs.get("return_loss")
        if return_loss is None:
            return_loss = self.can_return_loss
        loss_without_labels = len(self.label_names) == 0 and return_loss
        inputs = self._prepare_inputs(inputs)
        if ignore_keys is None:
            ignore_keys = getattr(batch.config, "keys_to_ignore_at_inference", ["cache"])
        if has_labels or loss_without_labels:
            labels = tuple(inputs.get(name) for name in self.label_names)
            labels = tuple(_detach(t) for t in labels)
            labels = labels[0] if len(labels) == 1 else labels
        else:
            labels = None
        with torch.no_grad():
            if has_labels or loss_without_labels:
                num_items = self._get_num_items_in_batch([inputs], self.args.device)
                with self.compute_loss_context_manager():
                    _, outputs = self.compute_loss(
                        model, inputs, return_outputs=True, num_items_in_batch=num_items
                    )
                per = self._mb_step_losses.detach()
                # The Trainer's loop counts batch_size rows per batch and truncates the
                # last one to what the dataset has left: on one process, its row count.
                rows = find_batch_size(inputs) or self.args.eval_batch_size
                self._mb_eval_losses.append((per, int(rows)))
                losses = per.mean()
                skip = ["loss", *ignore_keys]
            else:
                losses = None
                with self.compute_loss_context_manager():
                    outputs = model(**inputs)
                skip = list(ignore_keys)
        if prediction_loss_only:
            return (losses, None, None)
        if isinstance(outputs, dict):
            logits = tuple(v for k, v in outputs.items() if k not in skip)
        else:
            logits = outputs[1:] if losses is not None else outputs
        logits = _model_axis_last(tree_map(_detach, logits))
        if len(logits) == 1:
            logits = logits[0]
        if labels is not None and batch.last_inputs_per_model:
            labels = _model_axis_last(labels)
        return (losses, logits, labels)

    def _per_model_metrics(self, fn: Callable, n: int) -> Callable:
        def compute(pred: EvalPrediction) -> dict[str, float]:
            # (runs after the loop: the last forward tells the labels' layout)
            labels_per_model = bool(self._batch.last_inputs_per_model)
            out: dict[str, float] = {}
            columns: dict[str, list[float]] = {}
            losses = None
            if pred.losses is not None and self._mb_eval_losses:
                # model i's losses as the plain loop gives them: one per counted row
                rows = [r for _, r in self._mb_eval_losses]
                table = torch.stack([v for v, _ in self._mb_eval_losses]).double().cpu().numpy()
                losses = np.repeat(table, rows, axis=0)  # [rows, N]
            for i in range(n):
                res = fn(
                    EvalPrediction(
                        predictions=_np_model_slice(pred.predictions, i),
                        label_ids=_np_model_slice(pred.label_ids, i)
                        if labels_per_model
                        else pred.label_ids,
                        inputs=pred.inputs,
                        losses=None if losses is None else losses[:, i],
                    )
                )
                for k, v in (res or {}).items():
                    out[f"{k}_model_{i}"] = v
                    if isinstance(v, int | float | np.number) and not isinstance(v, bool):
                        columns.setdefault(k, []).append(float(v))
            for k, vs in columns.items():
                if len(vs) == n:
                    out[k] = float(np.mean(vs))
            return out

        return compute

    def _per_model_preprocess(self, fn: Callable) -> Callable:
        def preprocess(logits, labels):
            per = self._batch.last_inputs_per_model
            n = self._batch.num_models
            outs = [
                fn(
                    _torch_model_slice(logits, i),
                    _torch_model_slice(labels, i) if per else labels,
                )
                for i in range(n)
            ]
            return tree_map(lambda *ts: torch.stack(ts, dim=-1), *outs)

        return preprocess

    def evaluation_loop(
        self,
        dataloader,
        description,
        prediction_loss_only=None,
        ignore_keys=None,
        metric_key_prefix="eval",
    ):
        batch = self._batch
        n = batch.num_models
        self._mb_eval_losses = []
        user_metrics, user_pre = self.compute_metrics, self.preprocess_logits_for_metrics
        if user_metrics is not None:
            self.compute_metrics = self._per_model_metrics(user_metrics, n)
        if user_pre is not None:
            self.preprocess_logits_for_metrics = self._per_model_preprocess(user_pre)
        saved_latest = batch.latest_losses
        try:
            out = super().evaluation_loop(
                dataloader,
                description,
                prediction_loss_only=prediction_loss_only,
                ignore_keys=ignore_keys,
                metric_key_prefix=metric_key_prefix,
            )
        finally:
            self.compute_metrics, self.preprocess_logits_for_metrics = user_metrics, user_pre
            batch.latest_losses = saved_latest
        metrics = dict(out.metrics)
        if self._mb_eval_losses:
            table = torch.stack([v for v, _ in self._mb_eval_losses]).double().cpu().numpy()
            rows = np.asarray([r for _, r in self._mb_eval_losses], dtype=np.float64)
            per = []
            for i in range(n):  # the Trainer's mean over rows, NaN filter included
                col, weight = table[:, i], rows
                finite = np.isfinite(col)
                if self.args.logging_nan_inf_filter and finite.any():
                    col, weight = col[finite], weight[finite]
                per.append(float((col * weight).sum() / weight.sum()))
            metrics[f"{metric_key_prefix}_loss"] = float(np.mean(per))
            metrics.update(_summary(f"{metric_key_prefix}_loss", per))
        self._mb_eval_losses = []
        labels = out.label_ids
        if batch.last_inputs_per_model:
            labels = _np_model_axis_first(labels)
        return EvalLoopOutput(
            predictions=_np_model_axis_first(out.predictions),
            label_ids=labels,
            metrics=metrics,
            num_samples=out.num_samples,
        )

    # -------------------------------------------------------- checkpoints
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        self._batch.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, transformers.trainer.TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        try:
            self._batch.load_pretrained(resume_from_checkpoint)
        except ValueError as err:
            raise ValueError(
                f"Can't find a valid checkpoint of {self._batch.num_models} models at "
                f"{resume_from_checkpoint}: {err}"
            ) from err

    def _load_best_model(self) -> None:
        self._batch.load_pretrained(self.state.best_model_checkpoint)


class ModelBatchTrainer(HFTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` for an :class:`HFModelBatch`; see :class:`HFTrainerMixin`.

    Example::

        batch = HFModelBatch([BertForSequenceClassification(cfg) for _ in range(4)])
        trainer = ModelBatchTrainer(
            model=batch, args=TrainingArguments("out", max_steps=100, report_to="none"),
            train_dataset=train, eval_dataset=val, learning_rates=[1e-4, 3e-4, 1e-3, 3e-3],
        )
        trainer.train()
        trainer.evaluate()  # {"eval_loss_model_0": ..., ..., "eval_loss_best": ...}
    """


#: The seed design's name for :class:`ModelBatchTrainer`.
BundledTrainer = ModelBatchTrainer
