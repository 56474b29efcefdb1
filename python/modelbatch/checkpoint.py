"""Checkpoints of a whole ModelBatch training run, written atomically.

``save_checkpoint(path, batch, optimizer, scaler=None, extra=None)`` writes ONE
file holding everything a run needs to continue bit-identically: the stacked
weights and buffers with the models' random streams (``batch.state_dict()``),
the optimizer state (moments, per-model step counters, per-model
hyper-parameters), the per-model loss scales, torch's global generator states
(CPU and CUDA: data order drawn from them resumes too) and ``extra`` (plain data
of the caller: epoch, step, history; tensors, numbers, strings, lists and dicts).

The file is written to a temporary name in the same directory, flushed to disk,
then renamed over ``path``: a crash or kill mid-write leaves the previous
checkpoint intact (POSIX rename is atomic).

``load_checkpoint(path, batch, optimizer=None, scaler=None)`` reads and checks
the file before changing anything (a checkpoint of another class, another
population size or other shapes, and truncated or foreign files raise a
ValueError saying what was expected), then loads every part; should any part
still fail, everything already loaded is put back as it was. Returns ``extra``.
"""

from __future__ import annotations

import copy
import os
import pickle
import zipfile
from typing import Any

import torch

FORMAT = "modelbatch-checkpoint"
VERSION = 1


def _describe_model(batch) -> dict[str, Any]:
    template = batch.template
    return {
        "class": f"{type(template).__module__}.{type(template).__qualname__}",
        "num_models": batch.num_models,
        "shapes": {k: list(v.shape) for k, v in batch.state_dict().items() if torch.is_tensor(v)},
    }


def _global_rng() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_global_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    path: str | os.PathLike,
    batch,
    optimizer=None,
    scaler=None,
    extra: Any = None,
) -> None:
    """Write the run's state to ``path`` atomically (see the module docstring)."""
    path = os.fspath(path)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model": _describe_model(batch),
        "batch": batch.state_dict(),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "scaler": None if scaler is None else scaler.state_dict(),
        "global_rng": _global_rng(),
        "extra": extra,
    }
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    try:  # make the rename itself durable
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _read(path: str) -> dict[str, Any]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as err:
        raise ValueError(
            f"{path} is not a readable checkpoint (truncated or corrupt?): {err}"
        ) from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a modelbatch checkpoint (written by save_checkpoint)")
    if payload.get("version") != VERSION:
        raise ValueError(f"{path}: checkpoint version {payload.get('version')}, expected {VERSION}")
    return payload


def _check_model(path: str, saved: dict[str, Any], batch) -> None:
    mine = _describe_model(batch)
    if saved["class"] != mine["class"]:
        raise ValueError(f"{path} holds {saved['class']} models, this ModelBatch {mine['class']}")
    if saved["num_models"] != mine["num_models"]:
        raise ValueError(
            f"{path} holds {saved['num_models']} models, this ModelBatch {mine['num_models']}"
        )
    if saved["shapes"] != mine["shapes"]:
        theirs = {(k, tuple(v)) for k, v in saved["shapes"].items()}
        ours = {(k, tuple(v)) for k, v in mine["shapes"].items()}
        diff = sorted(theirs ^ ours, key=str)
        raise ValueError(
            f"{path}: the models' parameters and buffers differ from this ModelBatch's "
            f"(name, [N, ...] shape) in the checkpoint vs here: {diff[:6]}"
        )


def _snapshot(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in state.items()}


def load_checkpoint(path: str | os.PathLike, batch, optimizer=None, scaler=None) -> Any:
    """Restore what :func:`save_checkpoint` wrote; returns its ``extra``.

    Raises ValueError (and changes nothing) for a file that is not a readable
    checkpoint of this architecture and population size, or that lacks the
    optimizer / scaler state asked for.
    """
    path = os.fspath(path)
    payload = _read(path)
    _check_model(path, payload["model"], batch)
    for name, obj in (("optimizer", optimizer), ("scaler", scaler)):
        if obj is not None and payload[name] is None:
            raise ValueError(f"{path} has no {name} state (it was saved without one)")
    undo = [
        (batch.load_state_dict, _snapshot(batch.state_dict())),
        (_set_global_rng, _global_rng()),
    ]
    if optimizer is not None:
        undo.append((optimizer.load_state_dict, copy.deepcopy(optimizer.state_dict())))
    if scaler is not None:
        undo.append((scaler.load_state_dict, copy.deepcopy(scaler.state_dict())))
    try:
        batch.load_state_dict(payload["batch"])
        if optimizer is not None:
            optimizer.load_state_dict(payload["optimizer"])
        if scaler is not None:
            scaler.load_state_dict(payload["scaler"])
        _set_global_rng(payload["global_rng"])
    except Exception:
        for load, state in undo:
            load(state)
        raise
    return payload["extra"]
