"""Max pooling over valid steps (not an argmin: its gradient goes to the arg-max step)."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Pooling


def max_pool(V: Tensor, mask: Tensor) -> Tensor:
    """``max_t v_t`` per feature over valid steps; ``V: (B, T, p)``, ``mask: (B, T)`` → ``(B, p)``."""
    neg_inf = torch.tensor(float("-inf"), dtype=V.dtype, device=V.device)
    return torch.where(mask.unsqueeze(-1), V, neg_inf).amax(dim=1)


class MaxPool(Pooling):
    """Temporal max over valid steps. Padded steps can never win, so they get zero gradient.

    Example::

        >>> import torch
        >>> from poolings import MaxPool
        >>> MaxPool()(torch.arange(6.).view(1, 3, 2), torch.tensor([2]))
        tensor([[2., 3.]])
    """

    def pool(self, V: Tensor, mask: Tensor) -> Tensor:
        return max_pool(V, mask)
