"""Per-model random streams: every model draws its dropout masks as it would alone.

A vmapped ensemble draws the masks of all models from one generator in one call,
so model i's masks depend on N, on its position and on the other models. A
ModelBatch built with ``rng="philox"`` or ``rng="torch"`` gives each model its own
stream instead. While its forward runs, :mod:`modelbatch.interception` sends the
random calls listed below to :meth:`PhiloxStreams.call` / :meth:`TorchStreams.call`:

* ``F.dropout``, ``F.dropout1d``, ``F.dropout2d``, ``F.dropout3d``,
  ``F.alpha_dropout``, ``F.feature_alpha_dropout`` (so ``nn.Dropout``,
  ``nn.Dropout1d/2d/3d``, ``nn.AlphaDropout``, ``nn.FeatureAlphaDropout``), the
  ``torch.dropout`` / ``torch.feature_dropout`` / ``torch.alpha_dropout`` /
  ``torch.feature_alpha_dropout`` functions they call, and their in-place forms;
* ``F.scaled_dot_product_attention`` with ``dropout_p > 0`` (the attention of
  ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` in training; with
  ``need_weights=True`` MultiheadAttention calls ``F.dropout``, covered above).

A call draws randomness only in training with ``0 < p < 1``; otherwise it runs
unchanged and consumes nothing. Any *other* random operation inside a model's
forward (``torch.rand_like``, ``nn.RReLU`` in training, ...) raises an error that
says so: it would silently share one generator across the models.

The two kinds of stream:

``"philox"`` (:class:`PhiloxStreams`)
    Model i's stream is Philox4x32-10 keyed by its seed (see
    :mod:`modelbatch.ops.philox`), with a 64-bit counter that a random call
    advances by the number of Philox blocks it used, exactly as the same call
    advances it when model i runs in a batch of one. All N masks of a call come
    from one kernel launch (``modelbatch::batched_dropout``). The state is two
    int64 ``[N]`` buffers of the ModelBatch, ``rng_seeds`` and ``rng_offsets``, so
    it lives on the models' device and is part of ``state_dict()``.
``"torch"`` (:class:`TorchStreams`)
    Exact replay of plain PyTorch: model i owns a ``torch.Generator`` state,
    initially that of ``torch.manual_seed(seeds[i])``, per device. A random call
    runs the original torch function once *per model* on that model's slice,
    with model i's state swapped into the device's default generator and read
    back afterwards, so it consumes the generator exactly as plain PyTorch does
    (CPU and CUDA generators alike) and the global generator is left as it was.
    This loops over models in Python on every random call: use it to check or
    reproduce single-model runs, ``"philox"`` to train. (Torch's CPU masks depend on
    the memory layout of their input; each model's slice keeps the strides vmap
    gives it, which are those of the model running alone for the layers tested.)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._C import _functorch as _ft
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from modelbatch.ops import dropout as dropout_op

RNG_KINDS = ("philox", "torch")

#: What vmap says when a random op runs under ``randomness="error"``.
VMAP_RANDOM_ERROR = "called random operation while in randomness error mode"

#: Keys to leave out while a random call replays one model on plain tensors: vmap's
#: randomness check, and functorch's dynamic layer, under which composite ops such as
#: dropout decompose differently (and draw different numbers) than outside vmap.
_OUTSIDE_VMAP = (
    torch._C.DispatchKeySet(torch._C.DispatchKey.FuncTorchVmapMode)
    | torch._C.DispatchKeySet(torch._C.DispatchKey.FuncTorchDynamicLayerFrontMode)
    | torch._C.DispatchKeySet(torch._C.DispatchKey.FuncTorchDynamicLayerBackMode)
)


# ------------------------------------------------------------------ call table
class _Call:
    """How to read one random function's arguments.

    ``names``/``defaults``: its parameters; ``kind``: dropout kind of
    :mod:`modelbatch.ops.dropout`; ``feature``: channel-wise; ``spatial``: the
    spatial rank of F.dropout1d/2d/3d (``None`` otherwise); ``inplace``: the
    in-place ``torch.*_`` form.
    """

    def __init__(self, names, defaults, kind=0, feature=False, spatial=None, inplace=False):
        self.names = names
        self.defaults = defaults
        self.kind = kind
        self.feature = feature
        self.spatial = spatial
        self.inplace = inplace

    def bind(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        bound = dict(self.defaults)
        bound.update(zip(self.names, args))
        bound.update(kwargs)
        return bound


_F_ARGS = ("input", "p", "training", "inplace")
_TORCH_ARGS = ("input", "p", "train")
_TRAIN_ON = {"p": 0.5, "training": True, "inplace": False}
_TRAIN_OFF = {"p": 0.5, "training": False, "inplace": False}
SDPA_ARGS = (
    "query",
    "key",
    "value",
    "attn_mask",
    "dropout_p",
    "is_causal",
    "scale",
    "enable_gqa",
)

CALLS: dict[Callable, _Call] = {
    F.dropout: _Call(_F_ARGS, _TRAIN_ON),
    F.dropout1d: _Call(_F_ARGS, _TRAIN_ON, feature=True, spatial=1),
    F.dropout2d: _Call(_F_ARGS, _TRAIN_ON, feature=True, spatial=2),
    F.dropout3d: _Call(_F_ARGS, _TRAIN_ON, feature=True, spatial=3),
    F.alpha_dropout: _Call(_F_ARGS, _TRAIN_OFF, kind=1),
    F.feature_alpha_dropout: _Call(_F_ARGS, _TRAIN_OFF, kind=1, feature=True),
}
for _name, _kind, _feature in (
    ("dropout", 0, False),
    ("feature_dropout", 0, True),
    ("alpha_dropout", 1, False),
    ("feature_alpha_dropout", 1, True),
):
    CALLS[getattr(torch, _name)] = _Call(_TORCH_ARGS, {}, _kind, _feature)
    CALLS[getattr(torch, _name + "_")] = _Call(_TORCH_ARGS, {}, _kind, _feature, inplace=True)
SDPA = F.scaled_dot_product_attention
CALLS[SDPA] = _Call(
    SDPA_ARGS,
    {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False},
)


def is_random(call: _Call, bound: dict[str, Any]) -> bool:
    """Whether this call draws randomness (training, ``0 < p < 1``)."""
    if "dropout_p" in bound:
        p = bound["dropout_p"]
        return 0.0 < p < 1.0
    training = bound.get("training", bound.get("train"))
    return bool(training) and 0.0 < bound["p"] < 1.0


# -------------------------------------------------------------- vmap plumbing
def _level() -> int:
    level = _ft.maybe_current_level()
    if level is None:
        raise RuntimeError("per-model random streams are only drawn inside ModelBatch.forward")
    return level


def _unwrap(t: Tensor, level: int) -> tuple[Tensor, int | None]:
    """(value, batch dim) at ``level``; ``(t, None)`` for a tensor not batched there."""
    if isinstance(t, Tensor) and _ft.is_batchedtensor(t) and _ft.maybe_get_level(t) == level:
        return _ft._unwrap_batched(t, level)
    return t, None


# ------------------------------------------------------------------- philox
class PhiloxStreams:
    """Philox streams of N models: ``seeds`` and ``offsets``, int64 ``[N]``.

    ``offsets[i]`` counts the Philox blocks model i has consumed; each random call
    reads it and advances it in place (see the module docstring).
    """

    kind = "philox"

    def __init__(self, seeds: Tensor, offsets: Tensor) -> None:
        self.seeds = seeds
        self.offsets = offsets

    def _advance(self, count: int) -> Tensor:
        """The offsets this call starts at; the state moves past ``count`` values."""
        start = self.offsets.clone()
        self.offsets.add_(dropout_op.blocks(count))
        return start

    def dropout(self, x: Tensor, p: float, repeat: int, kind: int) -> Tensor:
        """Dropout of ``x`` (one model's view inside vmap) from every model's stream."""
        level = _ft.maybe_current_level()
        if level is None:
            # ModelBatch's per-model path: x is one model's tensor, the streams that
            # model's alone (N = 1); the same mask as inside the vectorised forward.
            start = self._advance(x.numel() // repeat)
            return dropout_op.batched_dropout(x.unsqueeze(0), self.seeds, start, p, repeat, kind)[0]
        count = x.numel() // repeat
        start = self._advance(count)
        value, bdim = _unwrap(x, level)
        if not (isinstance(value, Tensor) and _ft.is_batchedtensor(value)):
            # The usual case: one vmap level, ModelBatch's. Call the batched op directly.
            n = self.seeds.shape[0]
            if bdim is None:
                value = value.unsqueeze(0).expand(n, *value.shape)
            else:
                value = value.movedim(bdim, 0)
            out = dropout_op.batched_dropout(value, self.seeds, start, p, repeat, kind)
            return _ft._add_batch_dim(out, 0, level)
        # Nested transforms: let the op's vmap rule see every level.
        seed = _ft._add_batch_dim(self.seeds, 0, level)
        offset = _ft._add_batch_dim(start, 0, level)
        return dropout_op.dropout(x, seed, offset, p, repeat, kind, False)

    def call(self, func: Callable, call: _Call, args: tuple, kwargs: dict) -> Any:
        bound = call.bind(args, kwargs)
        if func is SDPA:
            return attention(bound, lambda a: self.dropout(a, bound["dropout_p"], 1, 0))
        x, p = bound["input"], bound["p"]
        inplace = call.inplace or bound.get("inplace", False)
        if call.spatial is not None:
            _check_spatial(func, x, p)
        unbatched = call.spatial in (1, 3) and x.dim() == call.spatial + 1
        y = x.unsqueeze(0) if unbatched else x
        if call.feature and y.dim() < 2:
            raise RuntimeError("Feature dropout requires at least 2 dimensions in the input")
        # (max: an empty spatial size leaves nothing to draw, but repeat must be >= 1)
        repeat = max(math.prod(y.shape[2:]), 1) if call.feature else 1
        out = self.dropout(y, p, repeat, call.kind)
        if unbatched:
            out = out.squeeze(0)
        if inplace:
            return x.copy_(out)
        return out

    def state(self) -> dict[str, Any]:
        return {"kind": self.kind, "seeds": self.seeds.cpu(), "offsets": self.offsets.cpu()}


def _check_spatial(func: Callable, x: Tensor, p: float) -> None:
    """Raise or warn exactly as ``F.dropout{1,2,3}d`` does for ``x``'s rank.

    They check the rank before drawing anything, so calling one in eval mode on an
    empty meta tensor of the same rank runs its checks and nothing else.
    """
    func(torch.empty((0,) * x.dim(), device="meta"), p, False)


def attention(bound: dict[str, Any], drop: Callable[[Tensor], Tensor]) -> Tensor:
    """``F.scaled_dot_product_attention`` in its documented math form, with the
    attention weights dropped out by ``drop``."""
    q, k, v = bound["query"], bound["key"], bound["value"]
    mask, scale = bound["attn_mask"], bound["scale"]
    if bound["is_causal"] and mask is not None:
        raise RuntimeError("scaled_dot_product_attention: pass attn_mask or is_causal, not both")
    if q.dim() < 2 or k.dim() < 2 or v.dim() < 2:
        raise RuntimeError("scaled_dot_product_attention: query, key and value need >= 2 dims")
    L, S = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if bound["enable_gqa"]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], -3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], -3)
    attn = q @ k.transpose(-2, -1) * scale
    if bound["is_causal"]:
        keep = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
        attn = attn.masked_fill(keep.logical_not(), float("-inf"))
    if mask is not None:
        if mask.dtype == torch.bool:
            attn = attn.masked_fill(mask.logical_not(), float("-inf"))
        else:
            attn = attn + mask
    attn = drop(torch.softmax(attn, dim=-1))
    return attn @ v


# -------------------------------------------------------------------- torch
def _default_generator(device: torch.device) -> torch.Generator:
    if device.type == "cpu":
        return torch.default_generator
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.default_generators[index]
    raise NotImplementedError(
        f"rng='torch' replays the CPU and CUDA generators; tensors on {device} are not "
        "supported (use rng='philox')"
    )


def _device_key(device: torch.device) -> str:
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


class TorchStreams:
    """One ``torch.Generator`` state per model and device; see the module docstring."""

    kind = "torch"

    def __init__(self, seeds: Tensor) -> None:
        self.seeds = seeds
        #: device -> the N generator states (uint8 tensors), created on first use.
        self.states: dict[str, list[Tensor]] = {}

    def _states_for(self, device: torch.device) -> list[Tensor]:
        key = _device_key(device)
        if key not in self.states:
            states = []
            for s in self.seeds.tolist():
                g = torch.Generator(device=key)
                g.manual_seed(int(s))  # as torch.manual_seed(s) seeds every device
                states.append(g.get_state())
            self.states[key] = states
        return self.states[key]

    def call(self, func: Callable, call: _Call, args: tuple, kwargs: dict) -> Any:
        """Run ``func`` once per model, model i on its slice and its generator."""
        level = _level()
        n = self.seeds.shape[0]
        leaves, spec = tree_flatten((args, kwargs))
        unwrapped = [_unwrap(t, level) for t in leaves]
        devices = [t.device for t in leaves if isinstance(t, Tensor)]
        for value, _ in unwrapped:
            if isinstance(value, Tensor) and _ft.is_batchedtensor(value):
                raise NotImplementedError(
                    "rng='torch' cannot replay a random call under a second vmap; use rng='philox'"
                )
        bound = call.bind(args, kwargs)
        inplace = call.inplace or bound.get("inplace", False)
        generator = _default_generator(devices[0])
        states = self._states_for(devices[0])
        saved = generator.get_state()
        outs = []
        try:
            for i in range(n):
                one = [v if d is None else v.select(d, i) for v, d in unwrapped]
                one_args, one_kwargs = tree_unflatten(one, spec)
                generator.set_state(states[i])
                # As if no transform were active: the slices are plain tensors.
                with torch._C._ExcludeDispatchKeyGuard(_OUTSIDE_VMAP):
                    outs.append(func(*one_args, **one_kwargs))
                states[i] = generator.get_state()
        finally:
            generator.set_state(saved)
        if inplace:
            return args[0]
        return tree_map(lambda *ts: _ft._add_batch_dim(torch.stack(ts), 0, level), *outs)

    @contextlib.contextmanager
    def model_generator(self, i: int, device: torch.device):
        """Model i's generator as the default one of ``device`` for a forward of model
        i alone (ModelBatch's per-model path): every random op replays plain PyTorch."""
        generator = _default_generator(device)
        states = self._states_for(device)
        saved = generator.get_state()
        generator.set_state(states[i])
        try:
            yield
        finally:
            states[i] = generator.get_state()
            generator.set_state(saved)

    def state(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "seeds": self.seeds.cpu(),
            "generator_states": {k: torch.stack(v) for k, v in self.states.items()},
        }

    def load_state(self, states: dict[str, Tensor]) -> None:
        self.states = {k: [t.clone() for t in v.unbind(0)] for k, v in states.items()}


# ---------------------------------------------------------------- seeds
def resolve_seeds(seeds: int | Sequence[int] | Tensor | None, n: int) -> Tensor | None:
    """``[N]`` int64 seeds (CPU) from an int (model i gets ``seeds + i``) or N ints."""
    if seeds is None:
        return None
    if isinstance(seeds, bool):
        raise ValueError("seeds must be an int or a sequence of N ints, not a bool")
    if isinstance(seeds, int):
        return torch.arange(n, dtype=torch.int64) + seeds
    if isinstance(seeds, Tensor):
        out = seeds.detach().cpu()
    else:
        try:
            out = torch.as_tensor(list(seeds))
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"seeds must be an int or {n} ints: {err}") from err
    if out.dim() != 1 or out.numel() != n:
        raise ValueError(f"seeds: expected an int or {n} values (one per model), got {out.numel()}")
    if out.is_floating_point() or out.dtype == torch.bool or out.is_complex():
        raise ValueError(f"seeds must be integers, got {out.dtype}")
    return out.to(torch.int64)


def draw_seeds(n: int) -> Tensor:
    """N seeds from torch's global generator (so ``torch.manual_seed`` fixes them)."""
    return torch.randint(0, 2**62, (n,), dtype=torch.int64)
