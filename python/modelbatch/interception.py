"""Routes selected torch calls to modelbatch ops while a ModelBatch runs its forward.

A ``TorchFunctionMode`` is active only inside ``ModelBatch.forward``: users'
modules stay unmodified, and code outside a ModelBatch is never affected.
Routed today: ``F.linear`` (so every ``nn.Linear``) -> ``modelbatch::linear``, and
``F.cross_entropy`` (so ``nn.CrossEntropyLoss``) -> ``modelbatch::cross_entropy``
for the cases that op covers.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

from modelbatch.ops import cross_entropy as ce_op
from modelbatch.ops import linear as linear_op

_ROUTES = {
    torch._C._nn.linear: linear_op.linear,
    torch.nn.functional.linear: linear_op.linear,
    torch.nn.functional.cross_entropy: ce_op.route,
}


class ModelBatchMode(TorchFunctionMode):
    """The interception mode; see the module docstring."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        route = _ROUTES.get(func)
        if route is not None:
            return route(*args, **kwargs)
        return func(*args, **kwargs)
