"""Fused per-model optimizers: one kernel launch per (device, dtype) per step."""

from modelbatch.optim._base import FusedOptimizer, ModelGroup
from modelbatch.optim.adam import Adam, AdamW
from modelbatch.optim.sgd import SGD

__all__ = ["SGD", "Adam", "AdamW", "FusedOptimizer", "ModelGroup"]
