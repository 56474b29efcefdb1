"""The ``modelbatch::`` custom ops: one module per op, each with its pure-torch
reference (the oracle of the tests and the kernel of last resort), its fake
implementation for ``torch.compile``, and its CUDA kernel (Triton) registration.
"""

from modelbatch import _backend  # noqa: F401  (loads _C, defines the ops)
from modelbatch.ops import (
    adam,
    amp,
    batch_norm,
    conv,
    cross_entropy,
    dropout,
    fused_mlp,
    linear,
    philox,
    rnn,
    sgd,
    small_bmm,
)

__all__ = [
    "adam",
    "amp",
    "batch_norm",
    "conv",
    "cross_entropy",
    "dropout",
    "fused_mlp",
    "linear",
    "philox",
    "rnn",
    "sgd",
    "small_bmm",
]
